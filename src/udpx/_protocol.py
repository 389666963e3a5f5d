"""ConnProtocol: the callbacks of a protocol-mode connection (no task per peer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._conn import UDPConn

__all__ = ["ConnProtocol", "check_factory", "make_protocol", "not_a_protocol"]


class ConnProtocol:
    """The callbacks of one protocol-mode connection. Subclass it and override what you need;
    every method is a no-op by default.

    ``udpx.listen(..., protocol_factory=F)`` calls ``F()`` for every new peer and
    ``udpx.dial(..., protocol_factory=F)`` once. The callbacks run synchronously in the socket's
    reader, as asyncio's ``DatagramProtocol`` callbacks do: no task and no future per peer,
    which is what makes tens of thousands of busy peers cheap. A callback must therefore not
    block; it answers with ``conn.send_nowait()`` / ``conn.send_many_nowait()`` and hands
    longer work to a task of its own.

    An exception raised by a callback goes to the loop's exception handler and closes that
    connection only (``connection_lost(exc)`` follows); the listener and the other connections
    go on.
    """

    def connection_made(self, conn: UDPConn) -> None:
        """The connection exists: on a listener, called for a new peer's first datagram, before
        that datagram is delivered; on ``dial()``, before it returns. Closing ``conn`` here
        refuses the peer (its datagram is counted as ``refused`` on the listener)."""

    def datagrams_received(self, datagrams: list[bytes]) -> None:
        """The connection's datagrams of one received batch, in arrival order (at least one).

        Called once per connection per batch that held its datagrams. The list is the
        callback's to keep. The default calls ``datagram_received(data)`` for each, and stops
        where that closed the connection, paused its reading or raised: the rest then waits
        for ``resume_reading()``, or is counted as ``closed``.
        """
        for data in datagrams:
            self.datagram_received(data)

    def datagram_received(self, data: bytes) -> None:
        """One datagram (called by the default ``datagrams_received``)."""

    def error_received(self, exc: OSError) -> None:
        """The network reported an error concerning this peer, such as an ICMP "port
        unreachable" (``ConnectionRefusedError``). The connection stays open."""

    def pause_writing(self) -> None:
        """The socket's transmit queue is above its high mark (three quarters of
        ``tx_queue_size``): stop sending until ``resume_writing()``. Called on this
        connection's first ``send_nowait()``/``send_many_nowait()`` that finds the queue above
        the mark, so only connections that send are told."""

    def resume_writing(self) -> None:
        """The transmit queue went down to its low mark (a quarter of ``tx_queue_size``)."""

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is closed and what it queued for sending has left: after
        ``conn.close()``, its listener's close, idle reaping (``exc`` is None) or an exception
        raised by a callback (``exc`` is that exception). Called once, soon after, from the
        event loop."""


def check_factory(factory: object) -> None:
    """``listen()``/``dial()``: refuse a ``protocol_factory`` that cannot be called.

    Raises:
        TypeError: ``factory`` is not None and not callable.
    """
    if factory is not None and not callable(factory):
        raise TypeError(f"protocol_factory must be callable (a udpx.ConnProtocol subclass, "
                        f"say), got {factory!r}")


def make_protocol(factory: Callable[[], ConnProtocol]) -> ConnProtocol:
    """Call ``factory`` for one connection.

    Raises:
        TypeError: it returned something else than a ``ConnProtocol``.
        Exception: what the factory raised.
    """
    protocol = factory()
    if not isinstance(protocol, ConnProtocol):
        raise not_a_protocol(protocol)
    return protocol


def not_a_protocol(protocol: object) -> TypeError:
    """The error for a ``protocol_factory`` that returned ``protocol``, not a ConnProtocol."""
    return TypeError(f"protocol_factory must return a udpx.ConnProtocol, got "
                     f"{type(protocol).__name__}")
