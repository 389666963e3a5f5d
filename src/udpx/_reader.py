"""The event-loop side of receiving: ``add_reader`` → batch receive → the owner's batch handler."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from time import perf_counter
from typing import Protocol

from ._mmsg import Receiver
from ._sockets import receive_memory

__all__ = ["BatchReader", "Overflow", "Spread"]

logger = logging.getLogger("udpx")

#: Datagrams drained per wake-up (16 batches of 64): enough to empty a busy socket, few enough
#: that the other tasks of the loop still run between wake-ups (the loop calls us again while
#: data is waiting). Counted in datagrams so that small batches get as many per wake-up.
MAX_DATAGRAMS_PER_WAKEUP = 1024

#: Datagrams one GRO message carries at most, in the usual case (the kernel's UDP_MAX_SEGMENTS
#: is 64 on older kernels, 128 on newer ones): a reader of a GRO socket starts by asking for a
#: budget's worth of such messages per call, and adapts (see ``BatchReader._read``).
GRO_RUN = 64

#: A task-mode listener's reader may read on past its budget, up to this many times the budget,
#: while the datagrams land in connections it already woke (see ``BatchReader.spread``). 8,192
#: datagrams of 64 bytes is most of what a socket with the usual 8 MiB of buffer holds.
EXTENDED_BUDGET_FACTOR = 8

#: ... and while the connections it woke hold on average fewer than this many of the datagrams
#: read in this wake-up, far below any useful ``rx_queue_size``: one busy peer never gets more
#: than the budget.
EXTENDED_MAX_DEPTH = 16


#: Read coalescing (``rx_coalesce``): a pause is taken only when the arrival rate, measured
#: over at least COALESCE_SPAN seconds of wake-ups, would bring at least COALESCE_MIN_BATCH
#: datagrams during it (with the default 1 ms: 64,000 datagrams/s and more).
COALESCE_MIN_BATCH = 64
COALESCE_SPAN = 0.0005

#: A pause that did not pay (the kernel dropped, the queue filled past a quarter of the
#: buffer, or less than half the expected datagrams came, twice in a row) stops pausing for
#: this long, doubled at each further failure up to COALESCE_MAX_BACKOFF; a pause that paid
#: resets it.
COALESCE_BACKOFF = 0.05
COALESCE_MAX_BACKOFF = 2.0


def _no_sends() -> int:
    return 0


class Overflow(Protocol):
    """Where the reader's datagrams go, as far as the reader needs to know."""

    @property
    def overflowed(self) -> int:
        """Datagrams dropped because a connection's queue or the memory budget was full (a
        running total)."""


class Spread(Overflow, Protocol):
    """How the datagrams a wake-up read spread over connections, as running totals."""

    @property
    def woken(self) -> int:
        """Connections a datagram made readable (each is one task to wake)."""

    def new_turn(self) -> None:
        """A wake-up begins: it may wake a new turn's worth of tasks."""

    @property
    def urgent(self) -> int:
        """Connections woken out of turn because their queue filled half-way (a running
        total): reading on would overflow such queues."""


class BatchReader:
    """Drains one socket with its receiver whenever it is readable.

    ``on_batch(count)`` handles the ``count`` messages now in the receiver's arrays and returns
    how many datagrams they held;
    ``on_error(exc)`` handles an error the socket reported (ICMP errors on a connected socket
    arrive this way). Neither stops the reader.

    ``coalesce`` (seconds, 0: never) is read coalescing, what a NIC's interrupt moderation does.
    A reader that keeps up with a steady stream is woken again as soon as the next few datagrams
    arrive: on this path most of the cost of a datagram is then the wake-up, the poll and the
    receive call it shares with only a handful of others (measured here: 2.6 µs per datagram at
    5 per call, 1.2 µs at 60). So when the socket was drained and datagrams arrive fast enough
    to fill a batch within ``coalesce`` (over two spans of measuring in a row), the reader stops
    watching the socket for that long and then reads what came in fewer, fuller calls. Each
    pause is checked when it ends: if the kernel dropped, if the queue filled past a quarter of
    the socket's buffer, if the wake-up after it overflowed a connection's queue (``overflow``),
    or if fewer than half the datagrams the rate promised came for the second pause in a row
    (the peers were waiting for replies: a pause then only adds delay; one such pause may be a
    sender's hiccup), the reader stops pausing for a while (COALESCE_BACKOFF, doubling). A pause
    that paid is followed at once by the next while the wake-up that ended it read the socket
    empty at a rate still high enough. Nor does it pause while queues overflow: the consumers
    are then the bottleneck, and bigger bursts would only overflow them more; nor while the
    socket sends at least half as many datagrams as it reads (``sent``, a running total of the
    datagrams it sent: see ``_answering``). Light traffic is never delayed; a steady stream
    waits at most ``coalesce`` (plus the loop's timer granularity) longer.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, receiver: Receiver,
                 on_batch: Callable[[int], int], on_error: Callable[[OSError], None], *,
                 on_nothing: Callable[[], object] | None = None,
                 after: Callable[[], None] | None = None,
                 before: Callable[[], None] | None = None,
                 on_empty: Callable[[], None] | None = None,
                 budget: int = MAX_DATAGRAMS_PER_WAKEUP, coalesce: float = 0.0,
                 sent: Callable[[], int] = _no_sends) -> None:
        self._loop = loop
        #: Datagrams read at most per wake-up (then the loop runs other callbacks first).
        self.budget = budget
        self._sock = sock
        self._fd = sock.fileno()
        self.receiver = receiver
        #: Messages asked for per call. The reader's, set on the receiver before each
        #: wake-up's first call: sockets of one layout may share a receiver
        #: (``_engine.SharedBatches``), each with its own peers.
        self.vlen = receiver.size
        if receiver.gro:
            # Until the first batch says otherwise, messages may be GSO peers' runs.
            self.vlen = receiver.vlen = max(1, min(receiver.size, budget // GRO_RUN))
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
        #: Called as each wake-up begins (a listener's demultiplexer: a new iteration's share
        #: of connections to open).
        self.on_wake: Callable[[], None] | None = None
        # A look at the socket is due next iteration (see the end of ``_read``).
        self._recheck_due = False
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
        #: The owner's count of datagrams its queues dropped for want of room, if it has
        #: queues (read coalescing neither pauses nor keeps pausing while it grows).
        self.overflow: Overflow | None = None
        #: Whether the owner wants the socket read (a coalescing pause does not change it).
        self._active = False
        self._reregister_pending = False
        # Read coalescing (see the class's docstring).
        self.coalesce = coalesce
        #: Pauses taken, and how many of them did not pay (then the reader backed off).
        self.pauses = 0
        self.pauses_failed = 0
        #: Whether the last wake-up emptied the socket (else the budget ended it).
        self._drained = False
        self._pause: asyncio.TimerHandle | None = None
        self._since = perf_counter()  # the rate is measured from here ...
        self._count = 0  # ... over this many datagrams
        self._dropped = 0  # ... and ``overflow`` stood here
        self._no_pause_until = 0.0
        self._backoff = COALESCE_BACKOFF
        self._pause_began = 0.0
        self._pause_rate = 0.0
        self._pause_drops = 0
        # Datagrams read while coalescing, and ``sent()`` (the datagrams the socket sent, a
        # running total), as the current window (a span of measuring, or a pause and the
        # wake-up after it) began, and as the one before it began (None: no window has ended
        # yet), see ``_answering``.
        self._sent = sent
        self._read_total = 0
        self._mark = (0, 0)
        self._mark_before: tuple[int, int] | None = None
        self._expected = 0.0  # datagrams the wake-up after a pause should find, at least
        # Until when a pause that brings too little backs off: the last one did (0.0: none).
        self._short_until = 0.0
        # The last span of measuring was fast enough to pause (one more is needed).
        self._fast = False

    def start(self) -> None:
        if not self._active:
            self._loop.add_reader(self._fd, self._on_readable)
            self._active = True

    def stop(self) -> None:
        if self._active:
            self._active = False
            if self._pause is not None:  # not watched during a pause
                self._pause.cancel()
                self._pause = None
            else:
                self._loop.remove_reader(self._fd)

    @property
    def paused(self) -> bool:
        """Whether a coalescing pause is under way."""
        return self._pause is not None

    def _on_readable(self) -> None:
        if self._before is not None:
            self._before()
        if self.on_wake is not None:
            self.on_wake()
        try:
            read = self._read()
        finally:
            if self._after is not None:
                self._after()
        if self.coalesce:
            self._read_total += read
            self._coalesce(read)

    # -- read coalescing --------------------------------------------------------------------

    def _coalesce(self, read: int) -> None:
        """After a wake-up that read ``read`` datagrams: pause, or go on measuring the rate."""
        now = perf_counter()
        if self._expected:  # the wake-up right after a pause: did it pay?
            # (A wake-up that spent its budget left more behind than it read: it did.)
            short = read < self._expected and self._drained
            overflowed, answering = self._end_window(now)
            self._expected = 0.0
            if overflowed or (short and now < self._short_until):
                self._back_off(now)
            elif short:
                # One short pause is no proof that the peers wait for replies: a sender that
                # stalled for a millisecond (descheduled, a shared host) does it too, a few
                # times a second. Two in a row are: with no paid pause between them, and
                # within COALESCE_BACKOFF (a closed loop's next pause comes two spans of
                # measuring later).
                self._short_until = now + COALESCE_BACKOFF
            else:
                self._short_until = 0.0
                self._backoff = COALESCE_BACKOFF
                # It paid, and the wake-up read the socket empty: while the stream stays fast
                # enough, pause again at once, as a network card moderates interrupts. (Else
                # the next pause waited for a new COALESCE_SPAN of measuring, during which the
                # reader was woken for every few datagrams again: a third of a flood's
                # datagrams were read that way, at twice the cost.)
                elapsed = now - self._pause_began
                if (elapsed > 0 and read * self.coalesce >= COALESCE_MIN_BATCH * elapsed
                        and self._may_pause(answering)):
                    self._start_pause(now, read / elapsed)
            return
        count = self._count + read
        span = now - self._since
        if span < COALESCE_SPAN:
            self._count = count
            return
        overflowed, answering = self._end_window(now)
        if (overflowed or count < COALESCE_MIN_BATCH * span / self.coalesce
                or now < self._no_pause_until or not self._may_pause(answering)):
            self._fast = False
            return
        if not self._fast:
            # The first span fast enough: the next must be too. A burst, or a backlog read
            # after the loop was busy elsewhere, is fast for one span; and a task-mode
            # server's answers to a span's requests leave after it (``_answering``).
            self._fast = True
            return
        self._start_pause(now, count / span)

    def _end_window(self, now: float) -> tuple[bool, bool]:
        """The current span of measuring, or pause cycle, ends now and the next begins:
        whether a connection's queue overflowed during it, and whether the socket answered
        (``_answering``) over it and the one before."""
        dropped = self._overflowed()
        overflowed = dropped != self._dropped
        answering = self._answering()
        self._since, self._count, self._dropped = now, 0, dropped
        self._mark_before = self._mark
        self._mark = (self._read_total, self._sent())
        return overflowed, answering

    def _may_pause(self, answering: bool) -> bool:
        """Whether a pause may start after this wake-up, the rate aside."""
        return self._drained and self._active and not self.drain_to_empty and not answering

    def _answering(self) -> bool:
        """Whether the socket sent at least half as many datagrams as it read, over this
        span of measuring or pause cycle and the one before it: its peers are then likely to
        wait for those answers (requests in flight, each peer's next request sent on its
        reply). Such a closed loop's every pause is a wait for all of them, and its server
        idles meanwhile: a pause then costs round trips (measured: 10-18 % of an echo
        server's, 100 and 1,000 peers each with a request in flight, on loopback) and saves
        no CPU. Two windows, because answers may leave a window after their requests came
        (a task-mode server's, sent once its tasks ran; a server that answers in batches):
        over one window of a single wake-up, a task-mode echo server was paused. Until a
        first window has ended, it is not known: no pause."""
        if self._mark_before is None:
            return True
        read, sent = self._mark_before
        return 2 * (self._sent() - sent) >= self._read_total - read

    def _start_pause(self, now: float, rate: float) -> None:
        """Stop watching the socket for ``coalesce`` seconds; ``rate``: the datagrams per
        second the pause is expected to gather."""
        memory = receive_memory(self._sock)
        if memory is None:  # the kernel cannot say whether the buffer would hold: never
            self.coalesce = 0.0
            return
        self.pauses += 1
        self._fast = False
        self._pause_began = now
        self._pause_rate = rate
        self._pause_drops = memory[2]
        self._loop.remove_reader(self._fd)
        self._pause = self._loop.call_later(self.coalesce, self._end_pause)

    def _overflowed(self) -> int:
        overflow = self.overflow
        return overflow.overflowed if overflow is not None else 0

    def _end_pause(self) -> None:
        # (stop() cancels a pause: the owner still wants the socket read.)
        self._pause = None
        memory = receive_memory(self._sock)
        now = perf_counter()
        if memory is None or memory[2] != self._pause_drops or 4 * memory[0] > memory[1]:
            self._back_off(now)
        else:
            self._expected = max(1.0, self._pause_rate * (now - self._pause_began) / 2)
        self._loop.add_reader(self._fd, self._on_readable)
        self._on_readable()  # what the pause gathered, now rather than after one more poll

    def _back_off(self, now: float) -> None:
        self.pauses_failed += 1
        self._short_until = 0.0
        self._no_pause_until = now + self._backoff
        self._backoff = min(2 * self._backoff, COALESCE_MAX_BACKOFF)

    def _read(self) -> int:
        """Read until the socket is empty or the budget is spent; the datagrams read."""
        # Hot path: one recvmmsg per batch; stop on a short batch rather than paying for a call
        # that only says EAGAIN.
        receiver = self.receiver
        receive = receiver.receive
        size = receiver.size
        vlen = receiver.vlen = self.vlen
        fd = self._fd
        on_batch = self._on_batch
        budget = self.budget
        read = 0
        spread = self.spread
        if spread is not None:
            spread.new_turn()
            first_woken = spread.woken
            overflowed = spread.overflowed
            urgent = spread.urgent
            wakes = budget
            extended = budget * EXTENDED_BUDGET_FACTOR
        self._drained = False
        while read < budget:
            try:
                count = receive(fd)
            except OSError as exc:
                self._handle_error(exc)
                return read
            if count == 0:
                self._drained = True
                if self.on_empty is not None:
                    self.on_empty()
                if read == 0 and self._on_nothing is not None:
                    # Woken for nothing: the error queue (POLLERR). uvloop drops a reader after
                    # POLLERR even when the error was already read (by the writer's drain),
                    # so register again, as after an error.
                    self._on_nothing()
                    self._reregister_soon()
                return read
            got = on_batch(count)  # datagrams: a GRO message holds several
            read += got
            asked = vlen
            if got > count or vlen < size:
                # GRO messages (a GSO peer's runs, up to 64 datagrams each): ask for about a
                # budget's worth of datagrams per call, not ``size`` messages. A call of 64
                # such messages from one peer brings more than its connection's queue holds
                # (rx_queue_size, 1,024 by default) before its task can run, and the excess
                # is dropped, though the kernel's buffer had room for it.
                vlen = receiver.vlen = self.vlen = max(
                    1, min(size, self.budget * count // max(got, 1)))
            if not self._active or (count < asked and not self.drain_to_empty):
                self._drained = count < asked
                return read
            if spread is not None and read >= budget:
                # Past the budget: one more batch while it pays (see ``spread``).
                woken = spread.woken - first_woken
                if (read < extended and woken < wakes and read < EXTENDED_MAX_DEPTH * woken
                        and spread.overflowed == overflowed and spread.urgent == urgent):
                    budget = read + 1
        if self.drain_to_empty and not self._recheck_due:
            # The budget ended the wake-up, but someone waits for a read that finds the socket
            # empty (``on_empty``). If this one emptied it, nothing wakes the reader again (an
            # empty socket is not readable) and the handover would wait for the next datagram
            # to arrive, perhaps for ever: look again next iteration.
            self._recheck_due = True
            self._loop.call_soon(self._recheck)
        return read

    def _recheck(self) -> None:
        self._recheck_due = False
        if self._active and self._pause is None and self.drain_to_empty:
            self._on_readable()

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
        if self._active and self._pause is None:
            self._loop.remove_reader(self._fd)
            self._loop.add_reader(self._fd, self._on_readable)
