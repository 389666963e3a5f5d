"""Listener and listen(): one socket, one batch reader, one writer, many connections."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import warnings
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Hashable
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar, final

from ._conn import UDPConn
from ._demux import Demux
from ._errors import ListenerClosed
from ._idle import sweep, sweep_interval
from ._mmsg import SingleRecv, make_receiver, make_sender, message_datagrams
from ._options import Options
from ._queue import RxQueue, TxQueue
from ._reader import BatchReader
from ._sockets import (
    Address,
    address_from_key,
    address_from_sockaddr,
    bind_socket,
    buffer_sizes,
    kernel_drops,
    key_from_address,
    max_payload,
    resolve,
    sockaddr_from_key,
)
from ._stats import ListenerStats, drops_mapping
from ._writer import Writer

__all__ = ["Listener", "Opening", "listen"]

logger = logging.getLogger("udpx")

#: Seconds between two warnings about a listener's drops (at most one per interval).
DROP_REPORT_INTERVAL = 10.0

class _Closeable(Protocol):
    async def aclose(self) -> None: ...


T = TypeVar("T", bound=_Closeable)


class Opening(Generic[T]):
    """What ``listen()`` and ``dial()`` return: await it, or use it with ``async with``."""

    __slots__ = ("_factory", "_opened")

    def __init__(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> None:
        self._factory = factory
        self._opened: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._factory().__await__()

    async def __aenter__(self) -> T:
        self._opened = await self._factory()
        return self._opened

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._opened is not None:
            opened, self._opened = self._opened, None
            await opened.aclose()


@final
class Listener(asyncio.DatagramProtocol):
    """Accepts one ``UDPConn`` per remote peer on one UDP socket.

    Created by ``udpx.listen()``. It is also an asyncio ``DatagramProtocol``:
    ``datagram_received`` is the demultiplexer's one-datagram entry, which the batch reader
    bypasses with whole batches.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 options: Options) -> None:
        self._loop = loop
        self._sock = sock
        self._options = options
        self._family = sock.family
        self._local: Address = sock.getsockname()
        family = self._family
        self._demux = Demux(max_conns=options.max_conns, backlog=options.backlog,
                            create=self._create_conn)
        self._receiver = make_receiver(sock, options.batch_size, options.max_datagram, True,
                                       lambda address: key_from_address(family, address),
                                       gro=options.gro)
        self._sender = make_sender(sock, options.batch_size, options.max_datagram, True,
                                   lambda raw: address_from_sockaddr(family, raw))
        self._writer = Writer(loop, sock, self._sender, TxQueue(options.tx_queue_size), True,
                              gso=options.gso and options.batch_size > 1)
        on_batch = self._on_single if isinstance(self._receiver, SingleRecv) else self._on_batch
        self._reader = BatchReader(loop, sock, self._receiver, on_batch, self._on_error)
        self._conns: dict[Hashable, UDPConn] = {}
        self._closing: set[UDPConn] = set()
        self._backlog: deque[UDPConn] = deque()
        self._accept_waiters: list[asyncio.Future[None]] = []
        self._accepted = 0
        # Counters of connections that are finished, so that totals cover past connections.
        self._retired = {"rx_packets": 0, "rx_bytes": 0, "tx_packets": 0, "tx_bytes": 0,
                         "rx_queue_full": 0, "truncated": 0, "send_error": 0}
        self._dropped_unaccepted = 0
        # The kernel's drop count, read once more just before the socket is closed.
        self._kernel_final: int | None = None
        self._closed = False
        self._done: asyncio.Future[None] = loop.create_future()
        self.rcvbuf, self.sndbuf = buffer_sizes(sock)
        self._sweeper: asyncio.TimerHandle | None = None
        if options.idle_timeout is not None:
            self._sweeper = loop.call_later(sweep_interval(options.idle_timeout), self._sweep)
        self._drops_reported: dict[str, int] = {}
        self._drop_reporter = loop.call_later(DROP_REPORT_INTERVAL, self._report_drops)
        self._reader.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<udpx.Listener {state} {self._local!r} conns={len(self._conns)}>"

    # -- the receive side --------------------------------------------------------------------

    def _on_batch(self, count: int) -> int:
        """Route the ``count`` messages of one recvmmsg; returns how many datagrams they held."""
        receiver = self._receiver
        lengths = receiver.lengths(count)
        truncated = receiver.truncated(count)
        keys = receiver.keys(count)
        sizes = receiver.segment_sizes(count)
        if truncated is None:
            if sizes is None:
                self._demux.feed_batch(keys, receiver.arena, receiver.offsets, lengths)
                return count
            split_keys, offsets, lengths = receiver.split(keys, lengths, sizes)
            assert split_keys is not None
            self._demux.feed_batch(split_keys, receiver.arena, offsets, lengths)
            return len(lengths)
        # Rare: some message did not fit its slot. One message at a time.
        arena = receiver.arena
        feed_one = self._demux.feed_one
        delivered = 0
        for index, (key, offset, length, cut) in enumerate(
                zip(keys, receiver.offsets, lengths, truncated)):
            if cut:
                feed_one(key, None)
                delivered += 1
                continue
            datagrams = message_datagrams(arena, offset, length,
                                          sizes[index] if sizes is not None else 0)
            for data in datagrams:
                feed_one(key, data)
            delivered += len(datagrams)
        return delivered

    def _on_single(self, count: int) -> int:
        receiver = self._receiver
        assert isinstance(receiver, SingleRecv)
        self._demux.feed_one(receiver.key, receiver.data)
        return 1

    def _on_error(self, exc: OSError) -> None:
        # An unconnected socket reports few errors (no ICMP without IP_RECVERR); log and go on.
        logger.warning("udpx: receive error on listener %r: %s", self._local, exc)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        """Route one datagram from ``addr`` (asyncio's DatagramProtocol entry point)."""
        if self._closed:
            return
        cut = len(data) > self._options.max_datagram
        self._demux.feed_one(key_from_address(self._family, addr), None if cut else data)

    def error_received(self, exc: Exception) -> None:
        logger.warning("udpx: error on listener %r: %s", self._local, exc)

    def _create_conn(self, key: Hashable) -> RxQueue:
        remote = address_from_key(self._family, key)
        conn = UDPConn(loop=self._loop, owner=self, writer=self._writer,
                       rx_queue_size=self._options.rx_queue_size,
                       max_send=min(self._options.max_datagram, max_payload(self._family, remote)),
                       local_addr=self._local, remote_addr=None,  # built from key on demand
                       sockaddr=sockaddr_from_key(self._family, key), key=key)
        self._conns[key] = conn
        self._backlog.append(conn)
        logger.debug("udpx: new connection from %r on %r", remote, self._local)
        if self._accept_waiters:
            self._wake_acceptors()
        return conn._rx

    def _wake_acceptors(self) -> None:
        waiters = self._accept_waiters
        self._accept_waiters = []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    # -- connections -------------------------------------------------------------------------

    async def accept(self) -> UDPConn:
        """Wait for the next connection (a datagram from a new peer).

        Cancellation-safe: a cancelled ``accept()`` takes no connection.

        Raises:
            ListenerClosed: the listener is closed.
        """
        while True:
            if self._closed:
                raise ListenerClosed("listener closed")
            if self._backlog:
                conn = self._backlog.popleft()
                self._demux.accepted()
                self._accepted += 1
                return conn
            future: asyncio.Future[None] = self._loop.create_future()
            self._accept_waiters.append(future)
            try:
                await future
            finally:
                if not future.done():
                    with contextlib.suppress(ValueError):
                        self._accept_waiters.remove(future)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> UDPConn:
        try:
            return await self.accept()
        except ListenerClosed:
            raise StopAsyncIteration from None

    def conns(self) -> list[UDPConn]:
        """A new list of the open connections, accepted or not yet."""
        return list(self._conns.values())

    def _conn_closing(self, conn: UDPConn) -> None:
        key = conn._key
        if self._conns.get(key) is conn:
            del self._conns[key]
            self._demux.remove(key)
        if conn in self._backlog:
            self._backlog.remove(conn)
            self._demux.accepted()
            self._discard_unaccepted(conn)
        self._closing.add(conn)
        logger.debug("udpx: connection from %r closed", conn.remote_addr)
        self._writer.when_empty(lambda: self._retire(conn))

    def _discard_unaccepted(self, conn: UDPConn) -> None:
        """A connection closed before accept() returned it: the application can never read its
        queue, so what is queued there counts as dropped (``unaccepted``), not delivered."""
        rx = conn._rx
        count = len(rx.items)
        if count:
            rx.rx_packets -= count
            rx.rx_bytes -= sum(map(len, rx.items))
            rx.items.clear()
            self._dropped_unaccepted += count

    def _retire(self, conn: UDPConn) -> None:
        if conn not in self._closing:
            return
        self._closing.discard(conn)
        stats = conn.stats
        retired = self._retired
        retired["rx_packets"] += stats.rx_packets
        retired["rx_bytes"] += stats.rx_bytes
        retired["tx_packets"] += stats.tx_packets
        retired["tx_bytes"] += stats.tx_bytes
        for reason in ("rx_queue_full", "truncated", "send_error"):
            retired[reason] += stats.drops[reason]
        conn._finished()

    def _kernel_drops(self) -> int | None:
        return None  # counted once, on the listener

    def _abort(self) -> None:
        return None  # the listener's own finaliser frees the socket

    def _describe_socket(self) -> dict[str, Any] | None:
        return None  # described once, by the listener

    def _report_drops(self) -> None:
        # At most one warning per interval, and only when something was dropped: never per
        # datagram. O(connections), like the idle sweep.
        drops = dict(self.stats.drops)
        new = {reason: count - self._drops_reported.get(reason, 0)
               for reason, count in drops.items() if count > self._drops_reported.get(reason, 0)}
        if new:
            logger.warning("udpx: listener %r dropped datagrams in the last %.0f s: %s",
                           self._local, DROP_REPORT_INTERVAL,
                           ", ".join(f"{reason}={count}" for reason, count in new.items()))
        self._drops_reported = drops
        self._drop_reporter = self._loop.call_later(DROP_REPORT_INTERVAL, self._report_drops)

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the listener and every open connection: address,
        options, socket buffer sizes granted by the kernel, queue depths, stats."""
        options = {item.name: getattr(self._options, item.name)
                   for item in dataclasses.fields(self._options)}
        options.pop("local_addr", None)
        rcvbuf, sndbuf = buffer_sizes(self._sock) if self._sock.fileno() >= 0 else (0, 0)
        return {
            "local_addr": list(self._local),
            "closed": self._closed,
            "options": options,
            "socket": {"rcvbuf": rcvbuf, "sndbuf": sndbuf, "batch_size": self._receiver.size,
                       "gso": self._writer.gso, "gro": self._receiver.gro,
                       "tx_queued": len(self._writer.queue)},
            "backlog": len(self._backlog),
            "stats": self.stats.as_dict(),
            "conns": [conn.describe() for conn in self._conns.values()],
        }

    def _sweep(self) -> None:
        # One timer per listener, O(connections) per sweep; nothing per datagram.
        timeout = self._options.idle_timeout
        assert timeout is not None
        idle = sweep(self._loop.time(), timeout, self._conns.values())
        for conn in idle:
            logger.debug("udpx: connection from %r reaped after %.1f s idle", conn.remote_addr,
                         self._loop.time() - conn.idle_since)
            conn._close("idle")
        self._sweeper = self._loop.call_later(sweep_interval(timeout), self._sweep)

    # -- introspection ----------------------------------------------------------------------

    @property
    def local_addr(self) -> Address:
        """The address the listener is bound to."""
        return self._local

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def options(self) -> Options:
        return self._options

    @property
    def stats(self) -> ListenerStats:
        """A snapshot of the counters: totals over all connections, past and present."""
        totals = dict(self._retired)
        for conn in (*self._conns.values(), *self._closing):
            stats = conn.stats
            totals["rx_packets"] += stats.rx_packets
            totals["rx_bytes"] += stats.rx_bytes
            totals["tx_packets"] += stats.tx_packets
            totals["tx_bytes"] += stats.tx_bytes
            for reason in ("rx_queue_full", "truncated", "send_error"):
                totals[reason] += stats.drops[reason]
        demux = self._demux
        drops = drops_mapping(
            rx_queue_full=totals["rx_queue_full"],
            truncated=totals["truncated"] + demux.dropped_truncated,
            send_error=totals["send_error"],
            backlog_full=demux.dropped_backlog,
            conn_limit=demux.dropped_conn_limit,
            kernel=kernel_drops(self._sock) if self._kernel_final is None else self._kernel_final,
            unaccepted=self._dropped_unaccepted,
        )
        return ListenerStats(totals["rx_packets"], totals["rx_bytes"], totals["tx_packets"],
                             totals["tx_bytes"], drops, len(self._conns), self._accepted)

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the listener and all its connections. Idempotent.

        Receiving stops at once; what connections queued for sending is still sent, then the
        socket is closed. ``accept()`` waiters get ``ListenerClosed``; connections' ``recv()``
        return what was received, then raise ``ConnectionClosed``.
        """
        if self._closed:
            return
        self._closed = True
        self._reader.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._drop_reporter.cancel()
        # Empty the backlog first, so that closing each connection need not search it.
        for conn in self._backlog:
            self._discard_unaccepted(conn)
        self._backlog.clear()
        self._demux.pending = 0
        for conn in list(self._conns.values()):
            conn.close()
        self._wake_acceptors()
        self._writer.when_empty(self._release)

    def _release(self) -> None:
        self._writer.close()
        for conn in list(self._closing):
            self._retire(conn)
        self._receiver.close()
        self._kernel_final = kernel_drops(self._sock)
        self._sock.close()
        if not self._done.done():
            self._done.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until a closed listener has flushed and freed its socket."""
        await asyncio.shield(self._done)

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
        if not getattr(self, "_closed", True):
            _warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self._sock.close()


def listen(host: str | None, port: int, *, batch_size: int = 64, max_datagram: int = 65535,
           rx_queue_size: int = 1024, tx_queue_size: int = 4096,
           idle_timeout: float | None = 3600.0, max_conns: int = 65536, backlog: int = 1024,
           reuse_port: bool = False, rcvbuf: int | None = None,
           sndbuf: int | None = None, gso: bool = True, gro: bool = True) -> Opening[Listener]:
    """Listen for datagrams on ``host``/``port`` (``host=None``: every interface, IPv6
    dual-stack where available; ``port=0``: a free port, see ``local_addr``).

    Await the result, or use it with ``async with``.

    Raises:
        ValueError: an option is invalid (raised here, at the call), naming it.
        OSError: the socket cannot be created or bound (raised when awaited).
    """
    options = Options(batch_size=batch_size, max_datagram=max_datagram,
                      rx_queue_size=rx_queue_size, tx_queue_size=tx_queue_size,
                      idle_timeout=idle_timeout, max_conns=max_conns, backlog=backlog,
                      reuse_port=reuse_port, rcvbuf=rcvbuf, sndbuf=sndbuf, gso=gso,
                      gro=gro)
    if port is None or isinstance(port, bool) or not isinstance(port, int) or not (
            0 <= port <= 65535):
        raise ValueError(f"port must be an int between 0 and 65535, got {port!r}")

    async def open_listener() -> Listener:
        loop = asyncio.get_running_loop()
        family, address = await resolve(loop, host, port, passive=True)
        sock = bind_socket(family, address, reuse_port=options.reuse_port,
                           rcvbuf=options.rcvbuf, sndbuf=options.sndbuf)
        try:
            return Listener(loop, sock, options)
        except BaseException:
            sock.close()
            raise

    return Opening(open_listener)


