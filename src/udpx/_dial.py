"""dial(): a connection that owns a connected socket with its own batch reader and writer."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from typing import final

from ._conn import UDPConn
from ._engine import SocketEngine, loop_batches
from ._idle import sweep, sweep_interval
from ._opening import Opening
from ._options import DEFAULTS, Options
from ._protocol import ConnProtocol, check_factory, make_protocol
from ._queue import RxPool, RxQueue
from ._sockets import Address, PeerKey, bind_socket, max_payload, resolve
from ._transport import make_engine

__all__ = ["dial"]

logger = logging.getLogger("udpx")


@final
class PeerSink:
    """The one-peer sink of a connected socket: every datagram is the peer's (the kernel
    delivers no other), so batches go straight into the connection's queue."""

    __slots__ = ("conn", "ecn_totals", "rx")

    def __init__(self) -> None:
        self.conn: UDPConn | None = None
        self.rx: RxQueue | None = None
        #: A connected-mode listener's per-codepoint totals, which count its peer sockets'
        #: marked datagrams too (None: a dialed connection's, counted on it alone).
        self.ecn_totals: list[int] | None = None

    def attach(self, conn: UDPConn) -> None:
        self.conn = conn
        self.rx = conn._rx

    @property
    def overflowed(self) -> int:
        """Datagrams dropped for want of room in the connection's queue or memory budget."""
        pool = self.rx.pool if self.rx is not None else None
        return pool.dropped_full + pool.dropped_memory if pool is not None else 0

    def feed_batch(self, keys: Sequence[PeerKey] | None, datagrams: Sequence[bytes],
                   lengths: Sequence[int]) -> None:
        rx = self.rx
        assert rx is not None
        rx.put_batch(datagrams, lengths)

    def feed_one(self, key: PeerKey | None, data: bytes | None) -> None:
        rx = self.rx
        assert rx is not None
        if data is None:
            rx.count_truncated()
        else:
            rx.put(data)

    def count_ecn(self, keys: Sequence[PeerKey] | None, codes: Sequence[int],
                  pieces: Sequence[int]) -> None:
        assert self.conn is not None
        counts = self.conn._ecn_counts()
        totals = self.ecn_totals
        for code, count in zip(codes, pieces):
            counts[code] += count
            if totals is not None:
                totals[code] += count

    def closed_unread(self, count: int) -> None:
        rx = self.rx
        if rx is not None:
            rx.count_closed(count)

    def peer_error(self, key: PeerKey, exc: OSError, info: int) -> None:
        # From the error queue (read when dont_fragment asked for it): the peer's, by nature.
        assert self.conn is not None
        self.conn._network_error(exc, info)

    def socket_error(self, exc: OSError) -> None:
        # On a connected socket, errors are ICMP reports about the peer (port unreachable...):
        # hand them to the connection, which raises them once from recv() or send().
        assert self.conn is not None
        logger.debug("udpx: %r reported %s", self.conn, exc)
        self.conn._socket_error(exc)


@final
class _DialedSocket:
    """A dialed connection's socket: an engine with a one-peer sink, and the connection's own
    idle timer (a listener has one timer for all its connections)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 options: Options, remote: Address, *, protocol_mode: bool = False) -> None:
        sink = PeerSink()
        self._engine = make_engine(loop, sock, options, sink, named=False,
                                   batches=loop_batches(loop))
        self.conn = UDPConn(loop=loop, owner=self, engine=self._engine,
                            writer=self._engine.writer, rx_queue_size=options.rx_queue_size,
                            pool=RxPool(options.rx_memory_limit),
                            max_send=min(options.max_datagram, max_payload(sock.family, remote)),
                            local_addr=sock.getsockname(), remote_addr=remote, sockaddr=None,
                            protocol_mode=protocol_mode)
        sink.attach(self.conn)
        if isinstance(self._engine, SocketEngine):
            self._engine.reader.overflow = sink
        self._loop = loop
        self._idle_timeout = options.idle_timeout
        self._sweeper: asyncio.TimerHandle | None = None
        if options.idle_timeout is not None:
            self._sweeper = loop.call_later(sweep_interval(options.idle_timeout), self._sweep)

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


def dial(host: str, port: int, *,
         protocol_factory: Callable[[], ConnProtocol] | None = None,
         batch_size: int = DEFAULTS.batch_size, max_datagram: int = DEFAULTS.max_datagram,
         rx_queue_size: int = DEFAULTS.rx_queue_size,
         tx_queue_size: int = DEFAULTS.tx_queue_size,
         rx_memory_limit: int = DEFAULTS.rx_memory_limit,
         idle_timeout: float | None = DEFAULTS.idle_timeout,
         rcvbuf: int | None = DEFAULTS.rcvbuf, sndbuf: int | None = DEFAULTS.sndbuf,
         local_addr: tuple[str, int] | None = DEFAULTS.local_addr, gso: bool = DEFAULTS.gso,
         gro: bool = DEFAULTS.gro, dont_fragment: bool = DEFAULTS.dont_fragment,
         ecn: bool = DEFAULTS.ecn, engine: str = DEFAULTS.engine,
         rx_coalesce: float = DEFAULTS.rx_coalesce) -> Opening[UDPConn]:
    """Open a connection to ``host``/``port`` over a connected UDP socket.

    Await the result, or use it with ``async with``. No datagram is exchanged by dialing.

    ``protocol_factory`` (protocol mode): a callable returning a ``udpx.ConnProtocol``; the
    connection's datagrams go to that protocol's callbacks (``connection_made`` is called
    before the await returns) instead of to ``recv()``. The options are described in
    ``udpx.Options``.

    Raises:
        ValueError: an option is invalid (raised here, at the call), naming it.
        TypeError: ``protocol_factory`` is not callable, or did not return a ConnProtocol
            (raised when awaited).
        OSError: the host cannot be resolved or the socket cannot be created, bound or
            connected (raised when awaited).
        Exception: what ``protocol_factory()`` or ``connection_made()`` raised (when awaited;
            the socket is closed, and a protocol whose ``connection_made`` raised gets
            ``connection_lost`` with that exception, from the loop).
    """
    options = Options(batch_size=batch_size, max_datagram=max_datagram,
                      rx_queue_size=rx_queue_size, tx_queue_size=tx_queue_size,
                      rx_memory_limit=rx_memory_limit, idle_timeout=idle_timeout,
                      rcvbuf=rcvbuf, sndbuf=sndbuf,
                      local_addr=local_addr, gso=gso, gro=gro, dont_fragment=dont_fragment,
                      ecn=ecn, engine=engine, rx_coalesce=rx_coalesce)
    if not isinstance(host, str):
        raise ValueError(f"host must be a str, got {host!r}")
    check_factory(protocol_factory)
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
            protocol = (make_protocol(protocol_factory) if protocol_factory is not None
                        else None)
            dialed = _DialedSocket(loop, sock, options, sock.getpeername(),
                                   protocol_mode=protocol is not None)
        except BaseException:
            sock.close()
            raise
        conn = dialed.conn
        try:
            await dialed._engine.open()
        except BaseException:
            conn._forget_protocol()
            conn.close()
            raise
        if protocol is not None:
            # Nothing was received yet (the reader runs from the loop, after this step). What
            # connection_made raises is dial()'s to raise, with the socket closed, rather than
            # the exception handler's: the application is right here, awaiting. As on a
            # listener, the protocol whose connection_made ran gets connection_lost(exc), from
            # the loop, to undo what it set up.
            try:
                conn._start_protocol(protocol, propagate=True)
            except Exception as exc:
                conn._close("error", exc)
                raise
            except BaseException:
                conn._close("error")
                raise
        return conn

    return Opening(open_conn)
