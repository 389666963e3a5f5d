"""Bounded datagram queues with their counters. No I/O, no asyncio.

The receive queue is written by the batch reader (through the demultiplexer) and read by the
application; it never blocks the writer side: a datagram that finds the queue full is dropped and
counted. The transmit queue is shared by every connection of one socket and drained by that
socket's single writer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = ["Arena", "RxQueue", "TxQueue"]


class Arena(Protocol):
    """A buffer whose slices are ``bytes``: an ``mmap`` (the batch arenas) or ``bytes``."""

    def __getitem__(self, index: slice, /) -> bytes: ...


def _do_nothing() -> None:
    return None


class RxQueue:
    """A connection's bounded receive queue.

    ``wake`` is called when a put makes the queue non-empty (at most once per batch), so the
    owner can release whoever waits for data.
    """

    __slots__ = ("dropped_full", "dropped_truncated", "items", "limit", "rx_bytes", "rx_packets",
                 "wake")

    def __init__(self, limit: int, wake: Callable[[], None] = _do_nothing) -> None:
        if limit < 1:
            raise ValueError(f"rx_queue_size must be at least 1, got {limit}")
        self.items: deque[bytes] = deque()
        self.limit = limit
        self.wake = wake
        #: Datagrams and bytes accepted into the queue (delivered to the connection).
        self.rx_packets = 0
        self.rx_bytes = 0
        self.dropped_full = 0
        self.dropped_truncated = 0

    def __len__(self) -> int:
        return len(self.items)

    def put(self, data: bytes) -> bool:
        """Queue one datagram, or count it as dropped when the queue is full.

        Returns whether it was queued. Calls ``wake`` when the queue was empty.
        """
        items = self.items
        if len(items) >= self.limit:
            self.dropped_full += 1
            return False
        items.append(data)
        self.rx_packets += 1
        self.rx_bytes += len(data)
        if len(items) == 1:
            self.wake()
        return True

    def put_batch(self, arena: Arena, offsets: Sequence[int], lengths: Sequence[int]) -> None:
        """Queue the datagrams ``arena[offset:offset + length]`` in order (hot path).

        ``lengths`` gives the batch size; ``offsets`` may be longer. What does not fit is dropped
        and counted. ``arena`` must return ``bytes`` when sliced (an ``mmap`` or ``bytes``).
        """
        # Hot path: one list comprehension per batch, one bytes object per datagram.
        items = self.items
        count = len(lengths)
        was_empty = not items
        space = self.limit - len(items)
        if count > space:
            self.dropped_full += count - space
            count = max(space, 0)
            lengths = lengths[:count]
        if count == 0:
            return
        items.extend([arena[offset:offset + length] for offset, length in zip(offsets, lengths)])
        self.rx_packets += count
        self.rx_bytes += sum(lengths)
        if was_empty:
            self.wake()

    def get(self) -> bytes:
        """Remove and return the oldest datagram. Raises IndexError when empty."""
        return self.items.popleft()

    def get_many(self, max_count: int | None) -> list[bytes]:
        """Remove and return up to ``max_count`` (None: all) queued datagrams, oldest first."""
        items = self.items
        if max_count is None or len(items) <= max_count:
            batch = list(items)
            items.clear()
            return batch
        popleft = items.popleft
        return [popleft() for _ in range(max_count)]


class TxQueue:
    """A socket's bounded transmit queue: datagrams with, in parallel, the connection that sent
    each (kept in a second deque rather than as pairs, so that a send allocates no tuple)."""

    __slots__ = ("datagrams", "limit", "owners")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"tx_queue_size must be at least 1, got {limit}")
        self.datagrams: deque[bytes] = deque()
        self.owners: deque[Any] = deque()
        self.limit = limit

    def __len__(self) -> int:
        return len(self.datagrams)

    def full(self) -> bool:
        return len(self.datagrams) >= self.limit

    def space(self) -> int:
        return self.limit - len(self.datagrams)

    def put(self, data: bytes, owner: object) -> None:
        """Append one datagram; the caller has checked ``full()``."""
        self.datagrams.append(data)
        self.owners.append(owner)

    def pop(self, count: int) -> None:
        """Forget the ``count`` oldest datagrams (handled by the writer)."""
        datagrams = self.datagrams
        owners = self.owners
        if count >= len(datagrams):
            datagrams.clear()
            owners.clear()
            return
        for _ in range(count):
            datagrams.popleft()
            owners.popleft()


class TxAccount:
    """One connection's side of a shared transmit queue: its destination and its counters.

    The writer updates ``packets``/``bytes`` for datagrams the kernel took and ``errors`` for
    datagrams it refused; ``enqueued - packets - errors`` is what is still queued.
    """

    __slots__ = ("bytes", "enqueued", "errors", "on_error", "packets", "sockaddr")

    def __init__(self, sockaddr: bytes | None,
                 on_error: Callable[[OSError], None] | None = None) -> None:
        #: Raw destination sockaddr; None on a connected socket.
        self.sockaddr = sockaddr
        self.on_error = on_error
        self.enqueued = 0
        self.packets = 0
        self.bytes = 0
        self.errors = 0

    def pending(self) -> int:
        """Datagrams queued and not yet handled by the writer."""
        return self.enqueued - self.packets - self.errors
