"""The portable engine: the same sinks, fed by the event loop's own datagram transport.

Where a loop cannot watch a socket with ``add_reader`` (Windows' IOCP Proactor loop), or where
recvmmsg/sendmmsg do not exist, udpx still runs: the socket is handed to the loop's
``create_datagram_endpoint`` and this engine is its ``DatagramProtocol``. Each datagram goes
to the sink one at a time (``feed_one``); the writer drains the transmit queue into
``transport.sendto``, one datagram per call, and waits while the transport says its buffer is
full (``pause_writing``). Listeners, dialed connections and protocol mode work unchanged; only
the speed differs. On Linux it can be chosen with ``engine="transport"``, which is how the test
suite runs its portable path.

What the loop does not report, udpx cannot count: a failed send reaches ``error_received``
without saying which datagram failed, so in this mode send errors are logged (listeners) or
handed to the connection (dialed sockets), not counted as ``send_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, final

from ._cmsg import SocketState
from ._engine import Engine, Releasing, SharedBatches, Sink, SocketEngine
from ._options import Options
from ._queue import TxAccount, TxQueue
from ._sockets import (
    Address,
    PeerKey,
    address_from_sockaddr,
    buffer_sizes,
    kernel_drops,
    key_from_address,
)
from ._writer import Writer

__all__ = ["Engine", "TransportEngine", "make_engine"]

logger = logging.getLogger("udpx")

#: Peer keys remembered per address tuple (computing one costs about a microsecond).
_KEY_CACHE_SIZE = 4096
#: Seconds before the writer tries again after EAGAIN on a transport's socket.
EAGAIN_RETRY = 0.001


@final
class TransportSender:
    """The writer's sender in transport mode: ``transport.sendto`` per datagram."""

    def __init__(self, sock: socket.socket, size: int) -> None:
        self.sock = sock
        self.size = size
        self.capacity = sys.maxsize  # (no arena: the transport takes each datagram as it is)
        self.calls = 0
        self.busy = False
        self.transport: asyncio.DatagramTransport | None = None
        self._family = sock.family
        self._datagrams: Sequence[bytes] = ()
        self._owners: Sequence[TxAccount] | None = None

    def fill(self, datagrams: Sequence[bytes], owners: Sequence[TxAccount] | None,
             controls: Sequence[bytes] | None = None) -> int:
        # (No packet info through a loop transport: ``controls`` is always None here.)
        self._datagrams = datagrams
        self._owners = owners
        return len(datagrams)

    def send(self, fd: int, start: int) -> int:
        """Hand the filled datagrams from ``start`` on to the transport; it takes them all
        (what the kernel does not take at once, it buffers and reports by pausing us)."""
        transport = self.transport
        assert transport is not None
        datagrams = self._datagrams
        owners = self._owners
        self.calls += 1
        for index in range(start, len(datagrams)):
            data = datagrams[index]
            address = None
            if owners is not None:
                # The destination as an address tuple, made once per connection.
                owner = owners[index]
                address = owner.address
                if address is None:
                    assert owner.sockaddr is not None  # an unconnected socket's account
                    address = owner.address = address_from_sockaddr(self._family,
                                                                    owner.sockaddr)
            if data:
                transport.sendto(data, address)
                continue
            # Loop transports silently skip empty datagrams (asyncio before 3.12, uvloop); UDP
            # allows them, so they go straight to the socket, once the transport holds nothing
            # queued before them (else they would overtake it). A failure is that datagram's:
            # raised when it is the first of the call (the writer counts it, or on EAGAIN
            # tries again shortly), else the call ends before it.
            try:
                buffered = getattr(transport, "get_write_buffer_size", None)
                if buffered is not None and buffered():
                    raise BlockingIOError(errno.EAGAIN, "the transport is still sending")
                if address is None:
                    self.sock.send(b"")
                else:
                    self.sock.sendto(b"", address)
            except OSError:
                if index == start:
                    raise
                return index - start
        return len(datagrams) - start

    def close(self) -> None:
        self._datagrams = ()


@final
class TransportEngine(Releasing, asyncio.DatagramProtocol):
    """One UDP socket served by the loop's datagram transport, feeding ``sink``; the same
    surface as ``SocketEngine``. ``open()`` hands the socket to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, options: Options,
                 sink: Sink, *, named: bool) -> None:
        Releasing.__init__(self)
        self.loop = loop
        self.sock = sock
        self.family = sock.family
        self.sink = sink
        self._named = named
        self._max_datagram = options.max_datagram
        self.sender = TransportSender(sock, options.batch_size)
        #: The loop's transport uses none of the kernel's mechanisms (no local addresses).
        self.state = SocketState(sock)
        # (The loop's transport owns the socket: after EAGAIN, which only an empty datagram
        # sent past it meets, the writer tries again shortly rather than watching the socket.)
        self.writer = Writer(loop, sock, self.sender, TxQueue(options.tx_queue_size), named,
                             state=self.state,
                             retry_later=lambda retry: loop.call_later(EAGAIN_RETRY, retry))
        self.transport: asyncio.DatagramTransport | None = None
        self._keys: dict[Address, PeerKey] = {}
        self._closing = False

    async def open(self) -> None:
        """Hand the socket to the loop's datagram transport."""
        transport, _ = await self.loop.create_datagram_endpoint(lambda: self, sock=self.sock)
        self.transport = transport
        self.sender.transport = transport
        if self._closing:
            _pause_reading(transport)

    # -- the loop's DatagramProtocol -----------------------------------------------------

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if self._closing:
            return
        key: PeerKey | None = None
        if self._named:
            key = self._keys.get(addr)
            if key is None:
                if len(self._keys) >= _KEY_CACHE_SIZE:
                    self._keys.clear()
                key = self._keys[addr] = key_from_address(self.family, addr)
        self.sink.feed_one(key, None if len(data) > self._max_datagram else data)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError):
            self.sink.socket_error(exc)
        else:  # pragma: no cover - loops report OSErrors
            logger.warning("udpx: transport error: %r", exc)

    def pause_writing(self) -> None:
        self.writer.block()

    def resume_writing(self) -> None:
        self.writer.unblock()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            logger.warning("udpx: transport of %r lost: %s", self.sock, exc)
        self._release()

    # -- the engine's surface ----------------------------------------------------------

    def feed_datagram(self, data: bytes, addr: Address) -> None:
        """One datagram from ``addr``, from someone else than the transport."""
        self.datagram_received(data, addr)

    def describe(self) -> dict[str, Any]:
        rcvbuf, sndbuf = buffer_sizes(self.sock) if not self._released else (0, 0)
        return {"engine": "transport", "rcvbuf": rcvbuf, "sndbuf": sndbuf, "batch_size": 1,
                "send_batch": 1,
                **self.state.describe(), "tx_queued": len(self.writer.queue)}

    def stop_reading(self) -> None:
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            _pause_reading(self.transport)

    def close(self, on_release: Callable[[], None] | None = None) -> None:
        """Stop reading, flush the queue into the transport, close it (it flushes its own
        buffer), then call ``on_release`` once the loop reports the socket closed."""
        self.stop_reading()
        self._when_released(on_release)
        self.writer.when_empty(self._close_transport)

    def _close_transport(self) -> None:
        if self._kernel_final is None and self.sock.fileno() >= 0:
            self._kernel_final = kernel_drops(self.sock)
        if self.transport is None:
            self.sock.close()
            self._release()
        elif not self.transport.is_closing():
            self.transport.close()  # connection_lost follows, from the loop

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self.writer.close()
        if self._kernel_final is None:
            self._kernel_final = 0
        self._released_now()

    def abort(self) -> None:
        """Garbage collection of an unclosed owner: free the socket, send nothing more."""
        if not self._released:
            self._released = True
            if self.transport is not None:
                self.transport.abort()
            else:
                self.sock.close()


def _pause_reading(transport: asyncio.DatagramTransport) -> None:
    # asyncio's datagram transport can pause reading in later 3.11 releases (3.11.7), not in
    # earlier ones (3.11.2: the base class's method raises NotImplementedError); uvloop's has
    # no such method. Where it cannot, what still arrives before the close is ignored: the
    # socket is closing.
    pause = getattr(transport, "pause_reading", None)
    if pause is not None:
        with contextlib.suppress(NotImplementedError):
            pause()


def _has_add_reader(loop: asyncio.AbstractEventLoop) -> bool:
    # The IOCP Proactor loop (Windows) cannot watch a socket for readiness.
    proactor = getattr(asyncio, "ProactorEventLoop", None)
    return not (proactor is not None and isinstance(loop, proactor))


def make_engine(loop: asyncio.AbstractEventLoop, sock: socket.socket, options: Options,
                sink: Sink, *, named: bool, pktinfo: bool = False,
                recverr: bool = False, on_empty: Callable[[], None] | None = None,
                batches: SharedBatches | None = None) -> Engine:
    """The engine ``options.engine`` asks for: ``"mmsg"`` (the batch engine: add_reader and
    recvmmsg/sendmmsg, one datagram per syscall where those do not exist), ``"transport"``
    (the loop's own datagram transport), or ``"auto"`` (the batch engine wherever the loop can
    watch a socket). ``pktinfo`` (wildcard listeners): per-datagram local addresses, which
    only the batch engine has; ``batches``: where the batch engine of a connected socket
    takes its batch arrays from."""
    kind = options.engine
    if kind == "auto":
        kind = "mmsg" if _has_add_reader(loop) else "transport"
        batch_only = [name for name in ("ecn", "dont_fragment") if getattr(options, name)]
        if kind == "transport" and batch_only:
            # (Options refuses engine="transport" with these; "auto" is decided only here.)
            raise ValueError(f"{batch_only[0]}=True needs the batch engine, and this loop "
                             f"({type(loop).__name__}) cannot watch a socket: engine 'auto' "
                             f"would use the loop's own transport, which has no "
                             f"{batch_only[0]}")
    if kind == "transport":
        return TransportEngine(loop, sock, options, sink, named=named)
    return SocketEngine(loop, sock, options, sink, named=named, pktinfo=pktinfo,
                        recverr=recverr, on_empty=on_empty, batches=batches)
