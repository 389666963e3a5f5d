"""dial(): a connection that owns a connected socket with its own batch reader and writer."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, final

from ._conn import UDPConn
from ._idle import sweep, sweep_interval
from ._mmsg import SingleRecv, make_receiver, make_sender, message_datagrams
from ._opening import Opening
from ._options import Options
from ._queue import RxPool, TxQueue
from ._reader import BatchReader
from ._sockets import Address, bind_socket, buffer_sizes, kernel_drops, max_payload, resolve
from ._writer import Writer

__all__ = ["dial"]

logger = logging.getLogger("udpx")


@final
class _DialedSocket:
    """The connected socket behind a dialed ``UDPConn``: the same reader and writer classes as
    a listener's, with no demultiplexer (the kernel only delivers the peer's datagrams)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 options: Options, remote: Address) -> None:
        self._sock = sock
        self._receiver = make_receiver(sock, options.batch_size, options.max_datagram, False,
                                       None, gro=options.gro)
        self._sender = make_sender(sock, options.batch_size, options.max_datagram, False, None)
        self._writer = Writer(loop, sock, self._sender, TxQueue(options.tx_queue_size), False,
                              gso=options.gso and options.batch_size > 1)
        on_batch = self._on_single if isinstance(self._receiver, SingleRecv) else self._on_batch
        self._reader = BatchReader(loop, sock, self._receiver, on_batch, self._on_error)
        self.conn = UDPConn(loop=loop, owner=self, writer=self._writer,
                            rx_queue_size=options.rx_queue_size,
                            pool=RxPool(options.rx_memory_limit),
                            max_send=min(options.max_datagram, max_payload(sock.family, remote)),
                            local_addr=sock.getsockname(), remote_addr=remote, sockaddr=None)
        self._rx = self.conn._rx
        self._released = False
        self._kernel_final: int | None = None
        self._loop = loop
        self._idle_timeout = options.idle_timeout
        # A dialed connection owns its socket, reader and writer; one sweep timer of its own is
        # in proportion (a listener has one timer for all its connections).
        self._sweeper: asyncio.TimerHandle | None = None
        if options.idle_timeout is not None:
            self._sweeper = loop.call_later(sweep_interval(options.idle_timeout), self._sweep)
        self._reader.start()

    def _sweep(self) -> None:
        timeout = self._idle_timeout
        assert timeout is not None
        if sweep(self._loop.time(), timeout, (self.conn,)):
            logger.debug("udpx: %r closed after %.1f s idle", self.conn, timeout)
            self.conn._close("idle")
            return
        self._sweeper = self._loop.call_later(sweep_interval(timeout), self._sweep)

    def _on_batch(self, count: int) -> int:
        """Queue the ``count`` messages of one recvmmsg; returns how many datagrams they held."""
        receiver = self._receiver
        lengths = receiver.lengths(count)
        truncated = receiver.truncated(count)
        sizes = receiver.segment_sizes(count)
        if truncated is None:
            if sizes is None:
                self._rx.put_batch(receiver.arena, receiver.offsets, lengths)
                return count
            _, offsets, lengths = receiver.split(None, lengths, sizes)
            self._rx.put_batch(receiver.arena, offsets, lengths)
            return len(lengths)
        arena = receiver.arena
        delivered = 0
        for index, (offset, length, cut) in enumerate(zip(receiver.offsets, lengths, truncated)):
            if cut:
                self._rx.count_truncated()
                delivered += 1
                continue
            datagrams = message_datagrams(arena, offset, length,
                                          sizes[index] if sizes is not None else 0)
            for data in datagrams:
                self._rx.put(data)
            delivered += len(datagrams)
        return delivered

    def _on_single(self, count: int) -> int:
        receiver = self._receiver
        assert isinstance(receiver, SingleRecv)
        if receiver.data is None:
            self._rx.count_truncated()
        else:
            self._rx.put(receiver.data)
        return 1

    def _on_error(self, exc: OSError) -> None:
        # On a connected socket, errors are ICMP reports about the peer (port unreachable...):
        # hand them to the connection, which raises them once from recv() or send().
        logger.debug("udpx: %r reported %s", self.conn, exc)
        self.conn._set_error(exc)

    def _conn_closing(self, conn: UDPConn) -> None:
        self._reader.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._writer.when_empty(self._release)

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self._writer.close()
        self._receiver.close()
        self._kernel_final = kernel_drops(self._sock)
        self._sock.close()
        self.conn._finished()

    def _abort(self) -> None:
        """Garbage collection of an unclosed connection: free the socket, send nothing more."""
        if not self._released:
            self._released = True
            self._kernel_final = kernel_drops(self._sock)
            self._sock.close()

    def _describe_socket(self) -> dict[str, Any] | None:
        rcvbuf, sndbuf = buffer_sizes(self._sock) if not self._released else (0, 0)
        return {"rcvbuf": rcvbuf, "sndbuf": sndbuf, "batch_size": self._receiver.size,
                "gso": self._writer.gso, "gro": self._receiver.gro,
                "tx_queued": len(self._writer.queue)}

    def _kernel_drops(self) -> int | None:
        return kernel_drops(self._sock) if self._kernel_final is None else self._kernel_final


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
