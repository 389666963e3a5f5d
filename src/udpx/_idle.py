"""Idle tracking without clock reads or timers per connection. No I/O; ``now`` is passed in.

A connection's activity is a counter it keeps anyway (datagrams received, dropped on arrival,
or queued for sending), so the hot path pays nothing for idle tracking. A sweep, run every
``timeout / 2`` seconds, compares each counter with the value seen by the previous sweep: a
changed counter restarts the idle period at this sweep's time; one unchanged for ``timeout``
seconds means idle. A connection last active at ``t`` is found idle no earlier than
``t + timeout`` and no later than ``t + 1.5 * timeout`` (sweeps ``timeout / 2`` apart).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

__all__ = ["Tracked", "sweep", "sweep_interval"]


class Tracked(Protocol):
    """What the sweep needs of a connection."""

    idle_count: int
    idle_since: float

    def activity_count(self) -> int: ...


T = TypeVar("T", bound=Tracked)


def sweep_interval(timeout: float) -> float:
    """Seconds between sweeps for ``timeout``."""
    return timeout / 2


def sweep(now: float, timeout: float, items: Iterable[T]) -> list[T]:
    """Return the items idle for at least ``timeout`` at ``now``; update the others. O(n)."""
    idle: list[T] = []
    for item in items:
        count = item.activity_count()
        if count != item.idle_count:
            item.idle_count = count
            item.idle_since = now
        elif now - item.idle_since >= timeout:
            idle.append(item)
    return idle
