"""UDPConn: one peer's connection, on a listener's socket or on its own dialed socket."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import warnings
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, final

from ._cmsg import TOS_KINDS, set_tos, tos_ancillary
from ._errors import ConnectionClosed, MessageTooLong, QueueFull, UDPXError, WouldBlock
from ._protocol import ConnProtocol
from ._queue import DATAGRAM_OVERHEAD, ProtocolRxQueue, RxPool, RxQueue, TxAccount
from ._sockets import PeerKey, address_from_key, is_ipv4
from ._stats import ConnStats, drops_mapping, ecn_mapping
from ._waiters import FifoWaiters

if TYPE_CHECKING:
    from ._engine import Engine
    from ._sockets import Address
    from ._writer import Writer

__all__ = ["UDPConn"]


class _Owner(Protocol):
    """What a connection tells when it closes: its listener, or its dialed socket."""

    def _conn_closing(self, conn: UDPConn) -> None: ...


def _do_nothing() -> None:
    return None


def _as_bytes(data: object) -> bytes:
    # The queue keeps the datagram until the writer runs: take a snapshot of anything mutable
    # (bytearray, memoryview, array, mmap, ctypes...) so that changing it after send() returns
    # cannot change what is sent. Any object with the buffer protocol is accepted, as by
    # socket.send.
    if type(data) is bytes:
        return data
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"datagram must be a bytes-like object (bytes, bytearray, memoryview or another "
            f"buffer), got {type(data).__name__}") from None
    with view:
        return view.tobytes()


#: The ECN counts of a connection that never received a marked datagram.
_NO_ECN = (0, 0, 0, 0)
#: What a connection that never sent reads its counters from (never written to).
_NO_ACCOUNT = TxAccount(None)


class _ConnHot:
    """The fields of a connection that sending reads per datagram, first in the object's
    layout (see _queue._RxHot)."""

    __slots__ = ("_quick_max", "_tx", "_txq", "_writer")


@final
class UDPConn(_ConnHot):
    """A connection with one remote peer: whole datagrams in, whole datagrams out.

    Only udpx creates connections: ``Listener.accept()`` and ``udpx.dial()`` return them.
    ``async with conn`` closes it on exit; ``async for data in conn`` receives until the
    connection is closed and drained.
    """

    # Slots, and objects made only when needed (the receivers list, the closed future, the
    # remote address tuple of a listener's connection), keep an idle connection small: a
    # listener may hold a hundred thousand of them.
    __slots__ = ("__weakref__", "_close_reason", "_closed", "_created", "_done", "_ecn",
                 "_engine", "_error", "_icmp_errors", "_key", "_local", "_loop", "_lost",
                 "_max_send", "_max_send_base", "_owner", "_path_mtu", "_protocol", "_receivers",
                 "_remote", "_rx", "_sockaddr", "_source", "_tos", "_writing_paused",
                 "idle_count", "idle_since")

    # No keyword-only parameters: a listener makes a connection per new peer, thousands at
    # once under a flood, and calling a class with keyword arguments costs about 1.5 us more
    # (CPython 3.11 builds a dict for __init__), so the listener passes them by position.
    def __init__(self, loop: asyncio.AbstractEventLoop, owner: _Owner,  # noqa: PLR0917
                 engine: Engine | None, writer: Writer,
                 rx_queue_size: int, pool: RxPool, max_send: int, local_addr: Address,
                 remote_addr: Address | None, sockaddr: bytes | None,
                 key: PeerKey | None = None, protocol_mode: bool = False,
                 source: tuple[int, int, bytes] | None = None) -> None:
        self._loop = loop
        self._owner = owner
        # The socket this connection owns (dialed), None on a listener's shared socket.
        self._engine = engine
        self._writer = writer
        self._txq = writer.queue
        # Protocol mode (see _start_protocol) delivers each batch to the protocol as it ends.
        self._rx = (ProtocolRxQueue(rx_queue_size, pool) if protocol_mode
                    else RxQueue(rx_queue_size, self._wake_receivers, pool))
        # Its side of the transmit queue, made by the first send (_account) from the peer's
        # sockaddr and the source control message: a connection that only receives (most of a
        # telemetry collector's, a flood of new peers) never makes one (measured: opening
        # 10,000 protocol-mode connections costs about 13 % less).
        self._tx: TxAccount | None = None
        self._sockaddr = sockaddr
        self._source = source
        # Made on the first wait: most of a listener's connections may never have a waiter.
        self._receivers: FifoWaiters | None = None
        self._max_send = self._max_send_base = max_send
        #: ``_max_send`` while the connection is open with no error to report, else -1: one
        #: comparison per datagram on the hot send paths (see ``_quick_check``).
        self._quick_max = max_send
        self._path_mtu: int | None = None
        self._local = local_addr
        self._remote = remote_addr
        self._key = key
        self._closed = False
        self._close_reason = "closed"
        self._error: int | None = None
        self._done: asyncio.Future[None] | bool = False  # True: finished before anyone waited
        # Protocol mode: the protocol, whether it was told to pause writing, and the exception
        # for its connection_lost.
        self._protocol: ConnProtocol | None = None
        self._writing_paused = False
        self._icmp_errors = 0
        # Datagrams received per ECN codepoint (``ecn``), made by the first marked one
        # (``_ecn_counts``): most connections never see one.
        self._ecn: list[int] | None = None
        self._tos = 0
        self._lost: Exception | None = None
        # Idle tracking (see _idle): the activity count seen by the last sweep, and since when.
        self._created = self.idle_since = loop.time()
        self.idle_count = 0

    def activity_count(self) -> int:
        """Datagrams received (delivered or dropped on arrival) or queued for sending so far."""
        rx = self._rx
        return (rx.rx_packets + rx.dropped_full + rx.dropped_truncated
                + (self._tx or _NO_ACCOUNT).enqueued)

    def _account(self) -> TxAccount:
        """This connection's side of the transmit queue, made on first use."""
        tx = self._tx
        if tx is None:
            sockaddr = self._sockaddr
            # Only a connected socket reports ICMP errors, so only a dialed connection needs
            # on_error.
            tx = self._tx = TxAccount(sockaddr,
                                      self._socket_error if sockaddr is None else None,
                                      self._key if sockaddr is not None else None)
            if self._source is not None:
                tx.set_ancillary([self._source])
        return tx

    def _ecn_counts(self) -> list[int]:
        """The per-codepoint counts of ECN-marked datagrams received, for the sink to add to
        (made on the first marked datagram)."""
        if self._ecn is None:
            self._ecn = [0, 0, 0, 0]
        return self._ecn

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<udpx.UDPConn {state} local={self._local!r} remote={self.remote_addr!r}>"

    # -- addresses and state ---------------------------------------------------------------

    @property
    def local_addr(self) -> Address:
        """The local socket address."""
        return self._local

    @property
    def remote_addr(self) -> Address:
        """The peer's socket address."""
        if self._remote is not None:
            return self._remote
        family = socket.AF_INET if len(self._local) == 2 else socket.AF_INET6
        assert self._key is not None  # a listener's connection: its remote address is its key
        return address_from_key(family, self._key)

    @property
    def closed(self) -> bool:
        """True from the moment ``close()`` was called (or the connection was reaped)."""
        return self._closed

    @property
    def close_reason(self) -> str | None:
        """None while open; then ``"closed"``, ``"idle"`` or (protocol mode) ``"error"``: a
        callback raised."""
        return self._close_reason if self._closed else None

    @property
    def stats(self) -> ConnStats:
        """A snapshot of the counters."""
        rx = self._rx
        tx = self._tx or _NO_ACCOUNT
        drops = {"rx_queue_full": rx.dropped_full, "truncated": rx.dropped_truncated,
                 "send_error": tx.errors, "closed": rx.dropped_closed}
        if self._engine is not None:
            drops["kernel"] = self._engine.kernel_drops()
        return ConnStats(rx.rx_packets, rx.rx_bytes, tx.packets, tx.sent_bytes,
                         drops_mapping(**drops), self._icmp_errors,
                         ecn_mapping(self._ecn or _NO_ECN))

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: addresses, age, idle time, queue depths, stats.

        ``idle_at_least`` is a lower bound on the time without traffic: udpx reads no clock per
        datagram, so it samples each connection's activity counters instead (in the idle sweep,
        every ``idle_timeout / 2``, and in every ``describe()``). It is the time since the
        first sample that saw the latest traffic: 0 when there was traffic since the previous
        sample, and more precise the more often it is sampled.
        """
        now = self._loop.time()
        count = self.activity_count()
        if count != self.idle_count:
            # The same update as the idle sweep's: it can only move the start of an idle period
            # later (closer to the real last activity), never make reaping come early.
            self.idle_count = count
            self.idle_since = now
        idle = now - self.idle_since
        description: dict[str, Any] = {
            "local_addr": list(self._local),
            "remote_addr": list(self.remote_addr),
            "closed": self._closed,
            "close_reason": self.close_reason,
            "age": round(now - self._created, 3),
            "idle_at_least": round(idle, 3),
            "rx_queued": len(self._rx),
            "tx_pending": (self._tx or _NO_ACCOUNT).pending(),
            "stats": self.stats.as_dict(),
        }
        if self._engine is not None:
            description["socket"] = self._engine.describe()
        return description

    # -- errors reported by the socket -------------------------------------------------------

    def _network_error(self, exc: OSError, info: int) -> None:
        """An ICMP error about this connection's peer, from its socket's error queue."""
        self._icmp_errors += 1
        if exc.errno == errno.EMSGSIZE:
            # "Fragmentation needed" / "packet too big" (or the local device's limit), with
            # the MTU: it bounds later sends; it is not an error of the connection.
            if info > 0:
                self._set_path_mtu(info)
            return
        self._set_error(exc)

    def _set_path_mtu(self, mtu: int) -> None:
        self._path_mtu = mtu
        payload = mtu - (20 if is_ipv4(self.remote_addr) else 40) - 8  # the IP, UDP headers
        self._max_send = max(0, min(self._max_send_base, payload))
        self._quick_check()

    @property
    def tos(self) -> int:
        """The TOS / traffic class byte (DSCP << 2 | ECN) every datagram this connection sends
        carries; 0 by default. Setting it marks every later datagram: on a dialed
        connection's own socket, or per datagram on a listener opened with ``ecn=True``.

        Raises (setting):
            ValueError: not an int from 0 to 255.
            UDPXError: a listener's connection, and the listener has no ``ecn=True``.
        """
        return self._tos

    @tos.setter
    def tos(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise ValueError(f"tos must be an int from 0 to 255, got {value!r}")
        if self._engine is not None:
            # A dialed connection owns its socket: the socket option marks everything.
            set_tos(self._engine.sock, value)
        else:
            if not self._writer.state.controls:
                raise UDPXError("conn.tos on a listener's connection needs the listener "
                                "opened with ecn=True (per-datagram control messages)")
            tx = self._account()
            ancillary = [item for item in tx.ancillary if item[:2] not in TOS_KINDS]
            if value:
                ancillary.append(tos_ancillary(value, ipv4=is_ipv4(self.remote_addr)))
            tx.set_ancillary(ancillary)
        self._tos = value

    @property
    def path_mtu(self) -> int | None:
        """The path MTU the network reported (``dont_fragment``), None until it reports one."""
        return self._path_mtu

    def _socket_error(self, exc: OSError) -> None:
        """An error this connection's own (connected) socket reported to a receive or a send:
        the kernel's word for an ICMP report about the peer, counted as such."""
        self._icmp_errors += 1
        self._set_error(exc)

    def _set_error(self, exc: OSError) -> None:
        # Called by the reader or the writer of a connected socket (ICMP errors): the error is
        # raised once, by the next recv() or send(); in protocol mode it goes to the protocol.
        protocol = self._protocol
        if protocol is not None:
            if not self._closed:
                try:
                    protocol.error_received(exc)
                except Exception as error:
                    self._callback_failed(error, "error_received")
            return
        self._error = exc.errno
        self._quick_max = -1
        self._wake_all()

    def _raise_error(self) -> None:
        code = self._error
        self._error = None
        self._quick_check()
        assert code is not None
        raise OSError(code, os.strerror(code))

    def _quick_check(self) -> None:
        """Keep ``_quick_max`` in step with the connection's state (after any change to its
        ``_max_send``, ``_error`` or ``_closed``)."""
        self._quick_max = (self._max_send if self._error is None and not self._closed
                           else -1)

    # -- receiving ---------------------------------------------------------------------------

    def _wake_receivers(self) -> bool:
        """Datagrams arrived: wake one waiting receiver per queued datagram, oldest first (as
        asyncio.Queue hands items to its getters), so that several tasks share the work.
        Returns whether a receiver was woken."""
        # Hot path: with many peers every datagram wakes a connection's one waiting task, so
        # the first turn is given here (FifoWaiters.wake inlined), the rest by wake().
        receivers = self._receivers
        if receivers:
            future = receivers.popleft()
            if future.done():  # cancelled, not yet removed by its task: it takes no turn
                return receivers.wake(len(self._rx.items)) > 0
            future.set_result(None)
            if receivers:
                count = len(self._rx.items) - 1
                if count > 0:
                    receivers.wake(count)
            return True
        return False

    def _wake(self, count: int) -> None:
        if self._receivers:
            self._receivers.wake(count)

    def _wake_all(self) -> None:
        """Closed or failed: every waiting receiver must look again."""
        if self._receivers:
            self._receivers.wake_all()

    def _readable_future(self) -> asyncio.Future[None]:
        """A new turn at the end of the receivers' line (FifoWaiters.wait's first half): the
        caller awaits it directly and calls ``FifoWaiters.abandon`` if cancelled. No coroutine
        between the task and the future: a wait is the hot path with many peers."""
        if self._protocol is not None:
            self._no_recv()
        receivers = self._receivers
        if receivers is None:
            receivers = self._receivers = FifoWaiters(self._loop)
        future = self._loop.create_future()
        receivers.append(future)
        return future

    async def recv(self) -> bytes:
        """Receive one whole datagram, waiting until one arrives.

        Cancellation-safe: a cancelled ``recv()`` takes nothing from the queue.

        Raises:
            ConnectionClosed: the connection is closed and every received datagram was returned.
            ConnectionRefusedError: (dialed connections) an ICMP error arrived since the last
                call; raised once, the connection stays usable.
        """
        # Hot path: when a datagram is queued this returns without suspending.
        rx = self._rx
        items = rx.items
        while True:
            if self._error is not None:
                self._raise_error()
            if items:
                data = items.popleft()
                rx.pool.buffered -= len(data) + DATAGRAM_OVERHEAD  # RxQueue.get, inlined
                if items and self._receivers:
                    self._receivers.wake(len(items))  # more arrived meanwhile: pass it on
                return data
            if self._closed:
                raise ConnectionClosed(reason=self._close_reason)
            # The same five lines end recv_many(): on purpose, since a shared awaiting helper
            # would put back the coroutine per wait that awaiting the future here saves.
            future = self._readable_future()
            try:
                await future
            except asyncio.CancelledError:
                # Nothing was taken; a turn given to this receiver goes on to the next one.
                self._receivers.abandon(future)  # type: ignore[union-attr]
                raise

    def recv_nowait(self) -> bytes:
        """Return a queued datagram without waiting.

        Raises:
            WouldBlock: nothing is queued (and the connection is open).
            ConnectionClosed: the connection is closed and drained.
            ConnectionRefusedError: as for ``recv()``.
        """
        if self._error is not None:
            self._raise_error()
        if self._protocol is not None:
            self._no_recv()
        if self._rx.items:
            return self._rx.get()
        if self._closed:
            raise ConnectionClosed(reason=self._close_reason)
        raise WouldBlock("no datagram queued")

    async def recv_many(self, max_count: int | None = None) -> list[bytes]:
        """Receive at least one and at most ``max_count`` (None: all queued) datagrams.

        Raises:
            ValueError: ``max_count`` is not a positive int.
            ConnectionClosed, ConnectionRefusedError: as for ``recv()``.
        """
        if max_count is not None and (
                isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1):
            raise ValueError(f"max_count must be a positive int or None, got {max_count!r}")
        rx = self._rx
        while True:
            if self._error is not None:
                self._raise_error()
            items = rx.items
            if items:
                if len(items) == 1:
                    # The usual case with many peers (RxQueue.get, inlined).
                    data = items.popleft()
                    rx.pool.buffered -= len(data) + DATAGRAM_OVERHEAD
                    return [data]
                batch = rx.get_many(max_count)
                if items and self._receivers:
                    self._receivers.wake(len(items))
                return batch
            if self._closed:
                raise ConnectionClosed(reason=self._close_reason)
            future = self._readable_future()
            try:
                await future
            except asyncio.CancelledError:
                # Nothing was taken; a turn given to this receiver goes on to the next one.
                self._receivers.abandon(future)  # type: ignore[union-attr]
                raise

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration from None

    # -- protocol mode -----------------------------------------------------------------------

    def _no_recv(self) -> None:
        raise UDPXError(
            f"{self!r} is in protocol mode: its datagrams go to its protocol's "
            f"datagrams_received(), so recv() has nothing to return")

    def _start_protocol(self, protocol: ConnProtocol, *, propagate: bool = False) -> None:
        """Hand this new connection (made with ``protocol_mode``) to ``protocol``: from now on
        each received batch goes to ``protocol.datagrams_received``. Calls
        ``connection_made``; if that raises, the connection is closed (``closed`` is then
        true), or with ``propagate`` the exception is the caller's."""
        rx = self._rx
        assert isinstance(rx, ProtocolRxQueue)
        self._protocol = protocol
        # The queue calls the protocol itself: one call per connection per batch.
        rx.protocol = protocol
        rx.conn = self
        rx.one_by_one = type(protocol).datagrams_received is ConnProtocol.datagrams_received
        try:
            protocol.connection_made(self)
        except Exception as exc:
            if propagate:
                raise
            self._callback_failed(exc, "connection_made")

    def _forget_protocol(self) -> None:
        """Its connection_made failed: the protocol gets no connection_lost."""
        self._protocol = None

    @property
    def protocol(self) -> ConnProtocol | None:
        """The connection's protocol in protocol mode (None: task mode, read with ``recv``)."""
        return self._protocol

    def _datagrams_failed(self, exc: Exception) -> None:
        self._callback_failed(exc, "datagrams_received")

    def _callback_failed(self, exc: Exception, name: str) -> None:
        protocol = self._protocol
        self._loop.call_exception_handler({
            "message": f"udpx: {type(protocol).__name__}.{name}() raised; closing {self!r}",
            "exception": exc,
            "protocol": protocol,
        })
        self._close("error", exc)

    def _protocol_rx(self, method: str) -> ProtocolRxQueue:
        rx = self._rx
        if not isinstance(rx, ProtocolRxQueue):
            raise UDPXError(f"{method}() is for protocol-mode connections; a task-mode "
                            f"connection receives only when it calls recv()")
        return rx

    def pause_reading(self) -> None:
        """Protocol mode: stop delivering datagrams. They wait in the connection's receive
        queue (``rx_queue_size`` and ``rx_memory_limit``; beyond them they are dropped and
        counted as ``rx_queue_full`` / ``memory_limit``) and are delivered after
        ``resume_reading()``. Idempotent.

        Raises:
            UDPXError: the connection is in task mode (it reads when it calls ``recv``).
        """
        self._protocol_rx("pause_reading").pause()

    def resume_reading(self) -> None:
        """Protocol mode: deliver again, starting (soon, from the event loop) with what was
        held meanwhile. Idempotent.

        Raises:
            UDPXError: the connection is in task mode.
        """
        rx = self._protocol_rx("resume_reading")
        if rx.paused and rx.resume():
            # Not from inside this call (it may come from a callback): as asyncio delivers
            # after resume_reading(), from the loop. Until then new datagrams are held behind
            # the held ones, so the order holds.
            self._loop.call_soon(self._deliver_held)

    def _deliver_held(self) -> None:
        rx = self._rx
        assert isinstance(rx, ProtocolRxQueue)
        if not rx.paused and not rx.closed and rx.items:
            rx.deliver(rx.take_held())

    def is_reading(self) -> bool:
        """Protocol mode: False between ``pause_reading()`` and ``resume_reading()``, and once
        closed.

        Raises:
            UDPXError: the connection is in task mode.
        """
        rx = self._protocol_rx("is_reading")
        return not rx.paused and not rx.closed

    def _over_high_mark(self) -> None:
        # A protocol-mode send found the transmit queue above its high mark: tell this
        # connection's protocol once; the writer tells it to resume at the low mark.
        if self._protocol is None or self._writing_paused or self._closed:
            return
        self._writing_paused = True
        self._writer.paused.append(self)
        try:
            self._protocol.pause_writing()
        except Exception as exc:
            self._callback_failed(exc, "pause_writing")

    def _resume_writing(self) -> None:
        """Called by the writer when the transmit queue is down to its low mark."""
        self._writing_paused = False
        if self._protocol is not None and not self._closed:
            try:
                self._protocol.resume_writing()
            except Exception as exc:
                self._callback_failed(exc, "resume_writing")

    # -- sending -----------------------------------------------------------------------------

    def _check_send(self, data: object) -> bytes:
        if self._error is not None:
            self._raise_error()
        if self._closed:
            raise ConnectionClosed(reason=self._close_reason)
        datagram = _as_bytes(data)
        if len(datagram) > self._max_send:
            if len(datagram) <= self._max_send_base:
                raise MessageTooLong(
                    f"datagram of {len(datagram)} bytes is larger than the path allows (MTU "
                    f"{self._path_mtu}: {self._max_send} bytes of payload)", mtu=self._path_mtu)
            raise MessageTooLong(
                f"datagram of {len(datagram)} bytes is larger than the limit of "
                f"{self._max_send} bytes (max_datagram or the address family)")
        return datagram

    def _enqueue(self, datagram: bytes) -> None:
        # Hot path: TxQueue.put and the account's count inlined (A/B with a C receiver: the
        # method call cost ~3% per send). Every other enqueue goes through TxQueue.put_many.
        txq = self._txq
        tx = self._tx
        if tx is None:
            tx = self._account()
        txq.datagrams.append(datagram)
        txq.owners.append(tx)
        tx.enqueued += 1
        if not self._writer.scheduled:
            self._writer.schedule()

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Queue one datagram for sending, waiting while the socket's transmit queue is full.

        Cancellation-safe: a cancelled ``send()`` queued nothing.

        Raises:
            MessageTooLong: the datagram is larger than ``max_datagram`` or the family allows.
            ConnectionClosed: the connection is closed.
            ConnectionRefusedError: (dialed connections) as for ``recv()``; nothing was queued.
            TypeError: ``data`` is not bytes-like.
        """
        # Hot path: no suspension while the queue has room and nobody waits for it.
        datagram = self._check_send(data)
        txq = self._txq
        if len(txq.datagrams) >= txq.open_limit or self._writer.space:
            await self._wait_room()
        self._enqueue(datagram)

    async def _wait_room(self) -> None:
        """Wait in line for room in the socket's transmit queue: FIFO among every ``send()``
        of the socket, whichever connection it is for (a connection that keeps sending does
        not overtake one that waits). Returns with room for at least one datagram."""
        txq = self._txq
        writer = self._writer
        front = False
        while True:
            await writer.wait_space(self, front=front)
            self._check_turn()
            if len(txq.datagrams) < txq.open_limit:
                return
            front = True  # a *_nowait() took the room meanwhile: first in line again

    def _check_turn(self) -> None:
        """After a wait for room: a closed connection will not use its turn, so it hands it
        to the next waiter (else an open connection could wait for ever with room free)."""
        if self._closed:
            self._writer.space.wake(1)
            raise ConnectionClosed(reason=self._close_reason)

    def send_nowait(self, data: bytes | bytearray | memoryview) -> None:
        """Queue one datagram without waiting.

        Raises:
            QueueFull: the transmit queue is full; nothing was queued. In protocol mode the
                protocol is told ``pause_writing()`` (once), and ``resume_writing()`` when the
                queue is down to its low mark.
            MessageTooLong, ConnectionClosed, ConnectionRefusedError, TypeError: as ``send()``.
        """
        # Hot path: bytes within the limit on an open connection, into a queue below its high
        # mark, from a connection that sent before, pass one test (``_quick_max`` is -1 when
        # closed or with an error to report; ``quiet`` is below both of the queue's marks).
        txq = self._txq
        queued = txq.datagrams
        tx = self._tx
        if (type(data) is bytes and len(data) <= self._quick_max and len(queued) < txq.quiet
                and tx is not None):
            queued.append(data)
            txq.owners.append(tx)
            tx.enqueued += 1
            if not self._writer.scheduled:
                self._writer.schedule()
            return
        datagram = self._check_send(data)
        if len(queued) >= txq.open_limit:
            self._over_high_mark()
            raise QueueFull(txq.full_message())
        self._enqueue(datagram)
        if len(txq.datagrams) >= txq.high:
            self._over_high_mark()

    def send_many_nowait(self, datagrams: Iterable[bytes | bytearray | memoryview]) -> None:
        """Queue several datagrams in order without waiting: all of them, or none.

        Raises:
            QueueFull: the transmit queue has no room for all of them; nothing was queued. In
                protocol mode the protocol is told ``pause_writing()`` as by ``send_nowait()``
                (unless the queue is empty: then the batch is larger than ``tx_queue_size``).
            MessageTooLong, ConnectionClosed, ConnectionRefusedError, TypeError: as ``send()``;
                nothing was queued.
        """
        given = datagrams if type(datagrams) is list else list(datagrams)
        if len(given) == 1:
            # Hot path (a reply to each of many peers' one datagram: DNS, game ticks, the
            # many-peer echo): send_nowait()'s quick path inlined (calling send_nowait
            # instead costs a call per datagram); anything else goes through send_nowait.
            data = given[0]
            txq = self._txq
            queued = txq.datagrams
            tx = self._tx
            if (type(data) is bytes and len(data) <= self._quick_max
                    and len(queued) < txq.quiet and tx is not None):
                queued.append(data)
                txq.owners.append(tx)
                tx.enqueued += 1
                if not self._writer.scheduled:
                    self._writer.schedule()
                return
            self.send_nowait(data)  # raises, or queues (a bytes-like object as bytes)
            return
        if not given:
            return
        # Hot path (an echo in datagrams_received): the common case, a list of bytes within
        # the limit on an open connection, is checked in C, not per datagram in Python.
        batch: list[bytes]
        if (self._error is None and not self._closed and set(map(type, given)) == {bytes}
                and max(map(len, given)) <= self._max_send):
            batch = given  # type: ignore[assignment]  # all bytes, just checked
        else:
            batch = [self._check_send(data) for data in given]
        txq = self._txq
        count = len(batch)
        if len(txq.datagrams) + count > txq.open_limit:
            if txq.datagrams or txq.open_limit < txq.limit:
                # (The writer tells it to resume once the queue is down to its low mark; an
                # empty queue will not go down, and a batch larger than the limit never fits.)
                self._over_high_mark()
            raise QueueFull(f"transmit queue has room for {max(txq.space(), 0)} datagrams, "
                            f"not {count} ({txq.limit} in all)")
        txq.put_many(batch, self._account())
        self._writer.schedule()
        if len(txq.datagrams) >= txq.high:
            self._over_high_mark()

    async def send_many(self, datagrams: Iterable[bytes | bytearray | memoryview]) -> None:
        """Queue several datagrams in order, waiting for room as needed.

        All are checked before any is queued. If cancelled while waiting for room, the datagrams
        before the one that waited were queued and the rest were not.

        Raises:
            MessageTooLong, ConnectionClosed, ConnectionRefusedError, TypeError: as ``send()``.
        """
        batch = [self._check_send(data) for data in datagrams]
        txq = self._txq
        tx = self._account()
        index = 0
        total = len(batch)
        waited = False
        while index < total:
            space = txq.open_limit - len(txq.datagrams)
            if space <= 0 or (not waited and self._writer.space):
                # (Behind those already waiting, as send(); once it has had a turn, it takes
                # what room there is, and waits at the end of the line when there is none.)
                await self._wait_room()
                waited = True
                continue
            part = batch[index:index + space]
            txq.put_many(part, tx)
            index += len(part)
            self._writer.schedule()

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection. Idempotent.

        What was queued for sending is still sent; ``recv()`` returns what was received and then
        raises ``ConnectionClosed``. Use ``wait_closed()`` to wait until the socket resources are
        released.
        """
        self._close("closed")

    def _close(self, reason: str, exc: Exception | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._quick_max = -1
        self._close_reason = reason
        self._wake_all()
        if self._writer.space:  # its sends waiting for room raise now, not at their turn
            self._writer.space.withdraw(self, lambda: ConnectionClosed(reason=reason))
        rx = self._rx
        if isinstance(rx, ProtocolRxQueue):
            # A closed protocol connection delivers nothing more (as an asyncio transport after
            # close()): what is held (reading paused) or still arrives in the batch at hand
            # is dropped and counted as ``closed``.
            self._lost = exc
            rx.close()
        else:
            # Nothing is put into a closed connection's queue any more: drop the queue's
            # reference back to the connection, so that an application that lets go of it
            # frees it (and gives its unread datagrams' share of the memory budget back) at
            # once, not at the next garbage collection.
            rx.wake = _do_nothing
        self._owner._conn_closing(self)

    def _finished(self) -> None:
        """Everything this connection queued was handled; its resources are free."""
        done = self._done
        if done is True or (isinstance(done, asyncio.Future) and done.done()):
            return  # already finished
        if done is False:
            self._done = True
        elif isinstance(done, asyncio.Future) and not done.done():
            done.set_result(None)
        if self._protocol is not None:
            # From the loop, never from inside close() (which a callback may have called), as
            # asyncio calls connection_lost; an exception there goes to the exception handler.
            self._loop.call_soon(self._protocol.connection_lost, self._lost)

    async def wait_closed(self) -> None:
        """Wait until a closed connection has flushed its queued datagrams and freed its
        resources."""
        done = self._done
        if done is True:
            return
        if done is False:
            done = self._done = self._loop.create_future()
        await asyncio.shield(done)

    async def aclose(self) -> None:
        """``close()`` then ``wait_closed()``."""
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # Datagrams nobody will read any more give their share of the memory budget back.
        self._rx.release()
        if not self._closed and self._key is None:
            # A dialed connection owns a socket: leaving it open is a leak worth a warning.
            _warn(f"unclosed {self!r}", ResourceWarning, source=self)
            if self._engine is not None:
                self._engine.abort()


