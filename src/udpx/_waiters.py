"""FIFO waiters: tasks that wait for something that comes in units, served in order of arrival.

One primitive serves every wait in udpx: ``recv()`` waits for a queued datagram, ``accept()``
for a new connection, ``send()`` for a free slot in the socket's transmit queue.

The rule: **a wake-up is never lost.** ``wake(n)`` is called by whoever makes ``n`` units
available, and resolves the futures of the ``n`` oldest live waiters: each of those owns one
turn. A woken waiter must either take a unit or hand its turn on with ``wake(1)``:
- cancelled (or timed out) after it was woken: ``wait()`` hands the turn on itself;
- woken but unable to use the unit (its connection was closed meanwhile): the caller calls
  ``wake(1)`` before raising. ``Writer`` / ``UDPConn.send`` do this.
A waiter cancelled before it was woken owned no turn and is simply removed.

Why this is enough: let ``u`` be the units available and ``w`` the live (unresolved) waiters.
Every unit made available is either taken or followed by one ``wake(1)``: at each moment the
number of resolved-but-not-yet-resumed waiters is at least ``min(u, w + resolved)``. A unit can
only sit unused while someone waits if a turn for it was dropped; no path drops one: a turn
leaves a waiter only by taking a unit, by ``wake(1)``, or (when there is no waiter left) by
there being nobody to hand it to, in which case the unit waits for the next caller, who finds
it without waiting. A waiter that finds no unit after waking (another caller, e.g. a
``*_nowait``, took it first) has lost no turn: the unit was used, so it waits again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

__all__ = ["FifoWaiters", "TurnWaiters"]


class FifoWaiters(deque["asyncio.Future[None]"]):
    """Futures of waiting tasks, oldest first. Not thread-safe (one event loop).

    A deque subclass so that ``if waiters:`` and ``len(waiters)`` on the hot path (every
    ``recv()``, every batch's wake-up) cost no Python-level call.
    """

    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop

    async def wait(self) -> None:
        """Wait for a turn. Cancellation-safe: a turn given to a cancelled waiter goes on.

        Raises:
            asyncio.CancelledError: cancelled; nothing was taken.
        """
        future: asyncio.Future[None] = self._loop.create_future()
        self.append(future)
        try:
            await future
        except asyncio.CancelledError:
            self.abandon(future)
            raise

    def abandon(self, future: asyncio.Future[None]) -> None:
        """The waiter of ``future`` (appended to the line by the caller, as ``wait()`` does) was
        cancelled: a turn it was given goes on to the next waiter, else it leaves the line.

        For callers that await their future directly, without ``wait()``'s coroutine in
        between (``UDPConn.recv``: one coroutine less per wait on the hot path).
        """
        if future.done() and not future.cancelled():
            self.wake(1)  # woken, then cancelled before the task could use its turn
        else:
            with contextlib.suppress(ValueError):
                self.remove(future)

    def wake(self, count: int = 1) -> int:
        """Give a turn to each of the ``count`` oldest waiters; returns how many got one."""
        woken = 0
        while woken < count and self:
            future = self.popleft()
            if not future.done():
                future.set_result(None)
                woken += 1
        return woken

    def wake_all(self) -> None:
        """Every waiter must look again (closed, or an error to report)."""
        while self:
            future = self.popleft()
            if not future.done():
                future.set_result(None)


class TurnWaiters(FifoWaiters):
    """FifoWaiters for room in a shared queue: a woken waiter holds its turn until it resumes.

    ``turns`` counts the waiters woken and not yet resumed, and ``on_turns(turns)`` is told
    every change, so that the queue keeps that much of its room for them: a caller that did
    not wait cannot take a unit a waiter was woken for, and must queue behind anyone still
    waiting (``UDPConn.send``). Without this a busy sender that never has to wait refills the
    room freed for the others before their tasks run, every time, and they wait for ever.
    A waiter that resumes and still finds no room (taken anyway) waits again at the head of
    the line (``wait(front=True)``), not behind the newcomers.
    """

    __slots__ = ("_on_turns", "_owners", "turns")

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_turns: Callable[[int], None]) -> None:
        super().__init__(loop)
        self.turns = 0
        self._on_turns = on_turns
        #: Who each waiting future waits for (see ``withdraw``).
        self._owners: dict[asyncio.Future[None], object] = {}

    async def wait(self, owner: object = None, *, front: bool = False) -> None:
        """Wait for a turn (at the head of the line with ``front``), on behalf of ``owner``.
        Cancellation-safe.

        Raises:
            asyncio.CancelledError: cancelled; nothing was taken.
            Exception: what ``withdraw(owner, ...)`` made for it (its connection closed).
        """
        future: asyncio.Future[None] = self._loop.create_future()
        if front:
            self.appendleft(future)
        else:
            self.append(future)
        self._owners[future] = owner
        try:
            await future
        except asyncio.CancelledError:
            self.abandon(future)
            raise
        finally:
            del self._owners[future]
        self._resumed()

    def withdraw(self, owner: object, error: Callable[[], Exception]) -> None:
        """``owner`` will not take a unit (its connection closed): its waiters not yet woken
        leave the line and raise ``error()``; one already woken hands its turn on when it
        runs (``UDPConn._check_turn``). O(waiters), only when there are any."""
        gone = [future for future, waiting_for in self._owners.items()
                if waiting_for is owner and not future.done()]
        for future in gone:
            with contextlib.suppress(ValueError):
                self.remove(future)
            future.set_exception(error())

    def _resumed(self) -> None:
        self.turns -= 1
        self._on_turns(self.turns)

    def abandon(self, future: asyncio.Future[None]) -> None:
        if future.done() and not future.cancelled():
            self._resumed()  # its turn ends here; FifoWaiters.abandon hands it on (wake)
        super().abandon(future)

    def wake(self, count: int = 1) -> int:
        woken = super().wake(count)
        if woken:
            self.turns += woken
            self._on_turns(self.turns)
        return woken

    def wake_all(self) -> None:
        self.wake(len(self))  # every live waiter, each counted as a turn
