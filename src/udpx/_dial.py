"""dial(): a connection that owns a connected socket with its own batch reader and writer."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from typing import final

from ._conn import UDPConn
from ._engine import SocketEngine
from ._idle import sweep, sweep_interval
from ._opening import Opening
from ._options import Options
from ._queue import Arena, RxPool, RxQueue
from ._sockets import Address, PeerKey, bind_socket, max_payload, resolve

__all__ = ["dial"]

logger = logging.getLogger("udpx")


@final
class PeerSink:
    """The one-peer sink of a connected socket: every datagram is the peer's (the kernel
    delivers no other), so batches go straight into the connection's queue."""

    __slots__ = ("conn", "rx")

    def __init__(self) -> None:
        self.conn: UDPConn | None = None
        self.rx: RxQueue | None = None

    def attach(self, conn: UDPConn) -> None:
        self.conn = conn
        self.rx = conn._rx

    def feed_batch(self, keys: Sequence[PeerKey] | None, arena: Arena, offsets: Sequence[int],
                   lengths: Sequence[int]) -> None:
        rx = self.rx
        assert rx is not None
        rx.put_batch(arena, offsets, lengths)

    def feed_one(self, key: PeerKey | None, data: bytes | None) -> None:
        rx = self.rx
        assert rx is not None
        if data is None:
            rx.count_truncated()
        else:
            rx.put(data)

    def socket_error(self, exc: OSError) -> None:
        # On a connected socket, errors are ICMP reports about the peer (port unreachable...):
        # hand them to the connection, which raises them once from recv() or send().
        assert self.conn is not None
        logger.debug("udpx: %r reported %s", self.conn, exc)
        self.conn._set_error(exc)


@final
class _DialedSocket:
    """A dialed connection's socket: an engine with a one-peer sink, and the connection's own
    idle timer (a listener has one timer for all its connections)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 options: Options, remote: Address) -> None:
        sink = PeerSink()
        self._engine = SocketEngine(loop, sock, options, sink, named=False)
        self.conn = UDPConn(loop=loop, owner=self, engine=self._engine,
                            writer=self._engine.writer, rx_queue_size=options.rx_queue_size,
                            pool=RxPool(options.rx_memory_limit),
                            max_send=min(options.max_datagram, max_payload(sock.family, remote)),
                            local_addr=sock.getsockname(), remote_addr=remote, sockaddr=None)
        sink.attach(self.conn)
        self._loop = loop
        self._idle_timeout = options.idle_timeout
        self._sweeper: asyncio.TimerHandle | None = None
        if options.idle_timeout is not None:
            self._sweeper = loop.call_later(sweep_interval(options.idle_timeout), self._sweep)
        self._engine.start()

    def _sweep(self) -> None:
        timeout = self._idle_timeout
        assert timeout is not None
        if sweep(self._loop.time(), timeout, (self.conn,)):
            logger.debug("udpx: %r closed after %.1f s idle", self.conn, timeout)
            self.conn._close("idle")
            return
        self._sweeper = self._loop.call_later(sweep_interval(timeout), self._sweep)

    def _conn_closing(self, conn: UDPConn) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._engine.close(conn._finished)


def dial(host: str, port: int, *, batch_size: int = 64, max_datagram: int = 65535,
         rx_queue_size: int = 1024, tx_queue_size: int = 4096,
         rx_memory_limit: int = 64 * 2**20, idle_timeout: float | None = 3600.0,
         rcvbuf: int | None = None, sndbuf: int | None = None,
         local_addr: tuple[str, int] | None = None, gso: bool = True,
         gro: bool = True) -> Opening[UDPConn]:
    """Open a connection to ``host``/``port`` over a connected UDP socket.

    Await the result, or use it with ``async with``. No datagram is exchanged by dialing.

    Raises:
        ValueError: an option is invalid (raised here, at the call), naming it.
        OSError: the host cannot be resolved or the socket cannot be created, bound or
            connected (raised when awaited).
    """
    options = Options(batch_size=batch_size, max_datagram=max_datagram,
                      rx_queue_size=rx_queue_size, tx_queue_size=tx_queue_size,
                      rx_memory_limit=rx_memory_limit, idle_timeout=idle_timeout,
                      rcvbuf=rcvbuf, sndbuf=sndbuf,
                      local_addr=local_addr, gso=gso, gro=gro)
    if not isinstance(host, str):
        raise ValueError(f"host must be a str, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an int between 1 and 65535, got {port!r}")

    async def open_conn() -> UDPConn:
        loop = asyncio.get_running_loop()
        family, remote = await resolve(loop, host, port, passive=False)
        local: Address | None = None
        if options.local_addr is not None:
            local_family, local = await resolve(loop, options.local_addr[0],
                                                options.local_addr[1], passive=True)
            if local_family != family:
                raise ValueError(f"local_addr {options.local_addr!r} is not of the remote "
                                 f"address family")
        sock = bind_socket(family, local, connect_to=remote, rcvbuf=options.rcvbuf,
                           sndbuf=options.sndbuf)
        try:
            return _DialedSocket(loop, sock, options, sock.getpeername()).conn
        except BaseException:
            sock.close()
            raise

    return Opening(open_conn)
