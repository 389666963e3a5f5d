"""The udpx exception hierarchy: small and flat, one base class."""

from __future__ import annotations

__all__ = [
    "ConnectionClosed",
    "ListenerClosed",
    "MessageTooLong",
    "QueueFull",
    "UDPXError",
    "WouldBlock",
]


class UDPXError(Exception):
    """Base class of every error udpx raises on its own account.

    Operating-system errors (``ConnectionRefusedError`` and other ``OSError``) are raised as
    themselves.
    """


class ConnectionClosed(UDPXError):
    """The connection is closed (and, for ``recv``, drained).

    ``reason`` says why: ``"closed"`` (the application or its listener closed it),
    ``"idle"`` (reaped after ``idle_timeout``) or ``"error"`` (a protocol-mode callback
    raised).
    """

    def __init__(self, message: str = "connection closed", *, reason: str = "closed") -> None:
        super().__init__(message)
        self.reason = reason


class ListenerClosed(UDPXError):
    """The listener is closed; ``accept()`` can return no more connections."""


class QueueFull(UDPXError):
    """``send_nowait()`` found the socket's transmit queue full."""


class WouldBlock(UDPXError):
    """``recv_nowait()`` found nothing queued."""


class MessageTooLong(UDPXError, ValueError):
    """A datagram is larger than ``max_datagram``, than the address family allows, or (with
    ``dont_fragment``) than the path MTU the network reported.

    It is raised by the send that tried; nothing was queued. ``mtu`` is the path MTU in bytes
    when that was the limit, else None.
    """

    def __init__(self, message: str, *, mtu: int | None = None) -> None:
        super().__init__(message)
        self.mtu = mtu
