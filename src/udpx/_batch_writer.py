"""BatchWriter: batch sends by hand, like a buffered writer, on any connection."""

from __future__ import annotations

from typing import final

from ._conn import UDPConn
from ._mmsg import Sender, make_sender
from ._options import MAX_BATCH_SIZE
from ._sockets import address_from_sockaddr

__all__ = ["BatchWriter"]


@final
class BatchWriter:
    """Buffers datagrams for one connection and sends them together on ``flush()``.

    Meant for connections opened with ``batch_size=1`` (one syscall per datagram in the
    background): the application decides where batches end, and each flush goes out in one
    sendmmsg of up to ``size`` datagrams. The buffer flushes itself when it holds ``size``.
    Ordering with the connection's other sends is kept: when the connection has datagrams
    queued, a flush queues behind them instead.
    """

    def __init__(self, conn: UDPConn, size: int = 64) -> None:
        """Raises TypeError when ``conn`` is not a connection, ValueError when ``size`` is not
        between 1 and 1024."""
        if not isinstance(conn, UDPConn):
            raise TypeError(f"conn must be a udpx.UDPConn, got {type(conn).__name__}")
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BATCH_SIZE:
            raise ValueError(f"size must be an int between 1 and {MAX_BATCH_SIZE}, got {size!r}")
        self._conn = conn
        self._size = size
        self._buffer: list[bytes] = []
        self._sender: Sender | None = None

    @property
    def size(self) -> int:
        return self._size

    def buffered(self) -> int:
        """Datagrams written and not yet flushed."""
        return len(self._buffer)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Add one datagram to the buffer; flushes first when the buffer is full.

        Raises:
            MessageTooLong, ConnectionClosed, TypeError: as ``UDPConn.send()``, at once.
        """
        self._buffer.append(self._conn._check_send(data))
        if len(self._buffer) >= self._size:
            await self.flush()

    async def flush(self) -> None:
        """Send every buffered datagram: one sendmmsg when the socket is idle, else queued.

        Raises:
            ConnectionClosed: the connection was closed (the buffer is kept).
        """
        if not self._buffer:
            return
        conn = self._conn
        writer = conn._writer
        if self._sender is None:
            family = writer._sock.family
            # Laid out as the socket's own sender (room for a wildcard listener's source
            # address, a TOS byte).
            self._sender = make_sender(writer._sock, max(self._size, 2), conn._max_send,
                                       conn._account().sockaddr is not None,
                                       lambda raw: address_from_sockaddr(family, raw),
                                       state=writer.state)
        buffer = self._buffer
        self._buffer = []
        handled = 0 if conn.closed else writer.send_now(buffer, conn._account(), self._sender)
        try:
            await conn.send_many(buffer[handled:])
        except BaseException:
            self._buffer = buffer[handled:] + self._buffer
            raise

    def close(self) -> None:
        """Free the batch arrays (buffered datagrams are discarded)."""
        self._buffer.clear()
        if self._sender is not None:
            self._sender.close()
            self._sender = None
