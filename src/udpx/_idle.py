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

__all__ = [
    "MIN_SWEEP_INTERVAL",
    "PRESSURE_FLOOR",
    "PRESSURE_THRESHOLD",
    "Tracked",
    "effective_timeout",
    "sweep",
    "sweep_interval",
]

#: Sweeps never come closer together than this: a tiny ``idle_timeout`` (say 1e-6) must not
#: make an idle listener spin. A connection is still reaped within the contract's
#: ``1.5 * idle_timeout + 1`` seconds.
MIN_SWEEP_INTERVAL = 0.05

#: Above this share of ``max_conns`` open, the idle timeout in force shrinks (see
#: ``effective_timeout``).
PRESSURE_THRESHOLD = 0.75

#: The idle timeout in force when ``max_conns`` is full: a flood of one-datagram connections
#: from spoofed sources is reaped within 1.5 x this after it ends, so new peers get in again
#: within a minute instead of after up to 1.5 x ``idle_timeout``. Legitimate connections idle
#: that long are reaped too while the table is that full (they reconnect on their next
#: datagram).
PRESSURE_FLOOR = 30.0


class Tracked(Protocol):
    """What the sweep needs of a connection."""

    idle_count: int
    idle_since: float

    def activity_count(self) -> int: ...


T = TypeVar("T", bound=Tracked)


def sweep_interval(timeout: float) -> float:
    """Seconds between sweeps for ``timeout`` (half of it, at least ``MIN_SWEEP_INTERVAL``)."""
    return max(timeout / 2, MIN_SWEEP_INTERVAL)


def effective_timeout(timeout: float, open_conns: int, max_conns: int) -> float:
    """The idle timeout in force with ``open_conns`` of ``max_conns`` open.

    Up to ``PRESSURE_THRESHOLD`` of the table it is ``timeout``; from there it falls linearly
    to ``PRESSURE_FLOOR`` at a full table (never above ``timeout``: a short timeout stays).
    """
    mark = PRESSURE_THRESHOLD * max_conns
    floor = min(PRESSURE_FLOOR, timeout)
    if open_conns <= mark:
        return timeout
    fill = min(1.0, (open_conns - mark) / (max_conns - mark))
    return timeout - (timeout - floor) * fill


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
