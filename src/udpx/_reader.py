"""The event-loop side of receiving: ``add_reader`` → batch receive → the owner's batch handler."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Protocol

from ._mmsg import Receiver

__all__ = ["BatchReader", "Spread"]

logger = logging.getLogger("udpx")

#: Datagrams drained per wake-up (16 batches of 64): enough to empty a busy socket, few enough
#: that the other tasks of the loop still run between wake-ups (the loop calls us again while
#: data is waiting). Counted in datagrams so that small batches get as many per wake-up.
MAX_DATAGRAMS_PER_WAKEUP = 1024

#: A task-mode listener's reader may read on past its budget, up to this many times the budget,
#: while the datagrams land in connections it already woke (see ``BatchReader.spread``). 8,192
#: datagrams of 64 bytes is most of what a socket with the usual 8 MiB of buffer holds.
EXTENDED_BUDGET_FACTOR = 8

#: ... and while the connections it woke hold on average fewer than this many of the datagrams
#: read in this wake-up, far below any useful ``rx_queue_size``: one busy peer never gets more
#: than the budget.
EXTENDED_MAX_DEPTH = 16


class Spread(Protocol):
    """How the datagrams a wake-up read spread over connections, as running totals."""

    @property
    def woken(self) -> int:
        """Connections a datagram made readable (each is one task to wake)."""

    @property
    def overflowed(self) -> int:
        """Datagrams dropped because a connection's queue or the memory budget was full."""


class BatchReader:
    """Drains one socket with its receiver whenever it is readable.

    ``on_batch(count)`` handles the ``count`` messages now in the receiver's arrays and returns
    how many datagrams they held;
    ``on_error(exc)`` handles an error the socket reported (ICMP errors on a connected socket
    arrive this way). Neither stops the reader.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, receiver: Receiver,
                 on_batch: Callable[[int], int], on_error: Callable[[OSError], None], *,
                 on_nothing: Callable[[], object] | None = None,
                 after: Callable[[], None] | None = None,
                 before: Callable[[], None] | None = None,
                 on_empty: Callable[[], None] | None = None,
                 budget: int = MAX_DATAGRAMS_PER_WAKEUP) -> None:
        self._loop = loop
        #: Datagrams read at most per wake-up (then the loop runs other callbacks first).
        self.budget = budget
        self._sock = sock
        self._fd = sock.fileno()
        self.receiver = receiver
        self._on_batch = on_batch
        self._on_error = on_error
        # Called when a wake-up finds nothing to read: the socket may be readable for its error
        # queue alone (IP_RECVERR), which must be drained or the loop calls us again at once.
        self._on_nothing = on_nothing
        # Called once a wake-up's batches were handled: the writer sends the replies their
        # callbacks queued, in the same loop iteration.
        self._after = after
        # Called as a wake-up begins (the writer then waits for ``after`` to drain).
        self._before = before
        # Called when a receive found the socket empty: every datagram that reached the socket
        # before that call was read (connected mode's handover waits for it). While
        # ``drain_to_empty`` is set, a short batch does not end the wake-up: the reader receives
        # until a call returns nothing (one more syscall), so that ``on_empty`` comes soon.
        self.on_empty = on_empty
        self.drain_to_empty = False
        # Set by a task-mode listener. What the loop does after a wake-up is mostly one task
        # wake-up per connection that got datagrams (a few µs each), far more than a datagram
        # costs to read: with hundreds of peers sending one datagram each per turn, a budget of
        # 1,024 datagrams woke a task for nearly every datagram. So the budget also counts in
        # wake-ups: past it, the wake-up reads on, one batch at a time, up to
        # EXTENDED_BUDGET_FACTOR x the budget, while it has woken fewer connections than the
        # budget, those hold fewer than EXTENDED_MAX_DEPTH of its datagrams on average, and no
        # queue overflowed. With one busy peer, or with more peers than the budget (every
        # datagram a new wake-up), it stops at the budget as before.
        self.spread: Spread | None = None
        self._active = False
        self._reregister_pending = False

    def start(self) -> None:
        if not self._active:
            self._loop.add_reader(self._fd, self._on_readable)
            self._active = True

    def stop(self) -> None:
        if self._active:
            self._active = False
            self._loop.remove_reader(self._fd)

    def _on_readable(self) -> None:
        if self._before is not None:
            self._before()
        try:
            self._read()
        finally:
            if self._after is not None:
                self._after()

    def _read(self) -> None:
        # Hot path: one recvmmsg per batch; stop on a short batch rather than paying for a call
        # that only says EAGAIN.
        receive = self.receiver.receive
        size = self.receiver.size
        fd = self._fd
        on_batch = self._on_batch
        budget = self.budget
        read = 0
        spread = self.spread
        if spread is not None:
            first_woken = spread.woken
            overflowed = spread.overflowed
            wakes = budget
            extended = budget * EXTENDED_BUDGET_FACTOR
        while read < budget:
            try:
                count = receive(fd)
            except OSError as exc:
                self._handle_error(exc)
                return
            if count == 0:
                if self.on_empty is not None:
                    self.on_empty()
                if read == 0 and self._on_nothing is not None:
                    # Woken for nothing: the error queue (POLLERR). uvloop drops a reader after
                    # POLLERR even when the error was already read (by the writer's drain),
                    # so register again, as after an error.
                    self._on_nothing()
                    self._reregister_soon()
                return
            got = on_batch(count)  # datagrams: a GRO message holds several
            read += got
            if not self._active or (count < size and not self.drain_to_empty):
                return
            if spread is not None and read >= budget:
                # Past the budget: one more batch while it pays (see ``spread``).
                woken = spread.woken - first_woken
                if (read < extended and woken < wakes and read < EXTENDED_MAX_DEPTH * woken
                        and spread.overflowed == overflowed):
                    budget = read + 1

    def _handle_error(self, exc: OSError) -> None:
        try:
            self._on_error(exc)
        finally:
            # uvloop drops an add_reader registration after POLLERR (the way an ICMP error
            # shows up). Registering again from inside this callback is not enough: when the
            # poll handle saw an error, uvloop runs the read callback (us) and *then* clears
            # its reading handle, wiping a registration made here (seen when the writer waits
            # on EAGAIN as ICMP errors arrive). So register again once uvloop's handler has
            # returned. On asyncio this is a harmless re-registration.
            self._reregister_soon()

    def _reregister_soon(self) -> None:
        if self._active and not self._reregister_pending:
            self._reregister_pending = True
            self._loop.call_soon(self._reregister)

    def _reregister(self) -> None:
        self._reregister_pending = False
        if self._active:
            self._loop.remove_reader(self._fd)
            self._loop.add_reader(self._fd, self._on_readable)
