"""The single writer of one socket: its transmit queue → sendmmsg → the kernel.

The writer is a loop callback, not a task: a send that finds it idle schedules it with
``call_soon``, so all the sends of one loop iteration leave in one batch. It waits for
writability with ``add_writer`` only after EAGAIN, and a datagram the kernel refuses is dropped
and counted on its connection while the rest of the batch goes on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from itertools import accumulate, islice
from typing import Protocol

from ._cmsg import ICMP_ERRNOS, SocketState
from ._queue import TxAccount, TxQueue
from ._sockets import address_from_sockaddr
from ._waiters import TurnWaiters

__all__ = ["Writer"]

logger = logging.getLogger("udpx")

#: Batches sent per callback before yielding to the loop (fairness, as for the reader).
MAX_BATCHES_PER_CALLBACK = 16

#: The shortest run of datagrams to one peer sent with one GSO sendmsg when other datagrams
#: follow it: a shorter one goes with its neighbours in a sendmmsg batch. A GSO send is a
#: system call and several microseconds of Python of its own; for runs of two or three (an
#: echo server whose clients each have a few datagrams queued) one sendmmsg for 64 datagrams
#: costs far less. A run that is all that is queued (one peer's burst: a QUIC flight) goes
#: with GSO from two datagrams on: one system call either way, and the kernel's per-datagram
#: work is done once.
GSO_MIN_RUN = 4


class Sender(Protocol):
    """What the writer sends through: the batch arrays (``_mmsg``), the one-datagram
    sender, or a loop transport (``_transport``)."""

    size: int
    #: Payload bytes one fill may hold (a batch sender's arena).
    capacity: int
    calls: int
    #: Between a writer's fill and the end of its sends (arrays shared by several sockets
    #: are not filled again meanwhile: see ``_engine.SharedBatches``).
    busy: bool

    def fill(self, datagrams: Sequence[bytes], owners: Sequence[TxAccount] | None,
             controls: Sequence[bytes] | None = None) -> int: ...

    def send(self, fd: int, start: int) -> int: ...

    def close(self) -> None: ...


class _Pausable(Protocol):
    """A protocol-mode connection, told to resume writing."""

    def _resume_writing(self) -> None: ...


class Writer:
    """Drains ``queue`` into ``sock``. ``named``: each datagram carries its destination.

    ``state`` says what the kernel does for the socket (GSO, per-datagram control messages)
    and judges GSO failures; the writer does the scheduling and the grouping.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, sender: Sender,
                 queue: TxQueue, named: bool, *, state: SocketState | None = None,
                 pending_error: Callable[[TxAccount], bool] | None = None,
                 send_failed: Callable[[OSError], None] | None = None,
                 flushed: Callable[[], None] | None = None, direct: bool = False,
                 retry_later: Callable[[Callable[[], None]], asyncio.Handle] | None = None,
                 release_sender: Callable[[Sender], None] | None = None,
                 make_spare: Callable[[], Sender] | None = None,
                 turn_size: int | None = None) -> None:
        self._loop = loop
        #: A drain sends MAX_BATCHES_PER_CALLBACK turns per loop callback before yielding: a
        #: GSO run, or a sendmmsg call of up to ``turn_size`` datagrams (``batch_size``; a
        #: listener's larger calls count as several turns).
        self._turn_size = turn_size or sender.size
        #: Hands a shared sender back as the writer closes (None: the sender is its own).
        self._release_sender = release_sender
        #: Makes arrays of the writer's own, for a drain that comes while another writer
        #: sends from the shared ones (``_spare``, made then and kept).
        self._make_spare = make_spare
        self._spare: Sender | None = None
        #: Between this writer's fill and the end of its sends.
        self._sending = False
        self._sock = sock
        self._fd = sock.fileno()
        self.sender = sender
        self.queue = queue
        self._named = named
        #: The socket's kernel mechanisms (a socket without any: a loop transport, a test).
        self.state = state if state is not None else SocketState(sock)
        #: Datagrams carry their connection's control messages (source address on packet-info
        #: listeners, TOS byte): per sendmmsg slot, and on the one-datagram path.
        self._controls = self.state.controls
        #: On an unconnected socket with IP_RECVERR, an ICMP error about one peer is also the
        #: socket's pending error, which fails its next send whatever the destination: this
        #: drains the error queue (handing each error to its peer's connection) and says
        #: whether there was one, so the send is tried again rather than counted as failed.
        #: It is given the failed datagram's account: the kernel's own refusal of that very
        #: datagram (over the device's MTU) is that datagram's failure, not a reason to retry.
        self._pending_error = pending_error
        #: Told of every datagram the kernel refused, after it was counted (a drop-in
        #: endpoint hands it to its protocol's ``error_received``, as asyncio does).
        self._send_failed = send_failed
        #: Called at the end of each drain (once per loop callback, not per datagram).
        self._flushed = flushed
        #: Whether a lone queued datagram goes out with one plain send/sendto/sendmsg (the
        #: batch engine's sockets) rather than through the sender.
        self.direct = direct
        #: Times EAGAIN made the writer wait (tests and benchmarks read it).
        self.blocked = 0
        #: How to wait after EAGAIN where the loop's transport owns the socket (no add_writer
        #: on it): schedule a retry (None: wait for writability with add_writer).
        self._retry_later = retry_later
        self._retry_handle: asyncio.Handle | None = None
        #: add_writer is watching the socket for us.
        self._watching = False
        #: Totals over every account of this socket (handed to the kernel / refused), kept as
        #: chunks go so that a listener's stats cost O(1).
        self.tx_packets = 0
        self.tx_bytes = 0
        self.tx_errors = 0
        #: A drain is due (a loop callback, or the end of the reader's wake-up): a sender that
        #: sees it true need not call schedule().
        self.scheduled = False
        self._handle: asyncio.Handle | None = None
        #: Inside a reader wake-up (see defer()).
        self._deferred = False
        self._waiting_writable = False
        self._closed = False
        #: Tasks waiting for room in the queue (``send()``), woken one per freed slot, each
        #: keeping its slot until it runs (FIFO among all senders: see TurnWaiters).
        self.space = TurnWaiters(loop, queue.hold_for)
        self._on_empty: list[Callable[[], None]] = []
        #: Accounts of closing connections, with what to call once their own datagrams left.
        self._draining: dict[TxAccount, Callable[[], None]] = {}
        #: Protocol-mode connections told to pause writing (the queue crossed its high mark),
        #: told to resume once it is down to its low mark.
        self.paused: list[_Pausable] = []

    @property
    def gso_sends(self) -> int:
        """GSO sends made on the socket (tests and benchmarks read it)."""
        return self.state.gso_sends

    # -- the application side ------------------------------------------------------------

    def schedule(self) -> None:
        """Make sure the queue gets drained soon (cheap when already scheduled)."""
        if not self.scheduled and not self._waiting_writable and not self._closed:
            self.scheduled = True
            if not self._deferred:
                self._handle = self._loop.call_soon(self._flush)

    def defer(self) -> None:
        """Until ``flush_scheduled()``, a send schedules no loop callback: the reader's
        wake-up has begun and drains the queue at its end. (A callback scheduled and then
        cancelled would still cost the loop an extra iteration, per wake-up.)"""
        self._deferred = True

    def flush_scheduled(self) -> None:
        """Drain now what waits for the scheduled drain (called at the end of a reader
        wake-up: the replies queued by its callbacks leave in the same loop iteration, in one
        batch, rather than one iteration later)."""
        self._deferred = False
        if self.scheduled:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
            self._flush()

    def flush_now(self) -> None:
        """Drain now, whether or not a drain is scheduled (a drop-in endpoint whose queue
        reached its limit mid-iteration: what waits is already a full batch)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._flush()

    def discard(self) -> int:
        """Forget every queued datagram unsent (an aborted endpoint); returns how many."""
        count = len(self.queue)
        self.queue.pop(count)
        if self.space:
            self.space.wake(count)  # the room is free: waiting sends may take it
        self._run_drained(everyone=True)
        if self._on_empty:
            self._run_on_empty()
        return count

    def block(self) -> None:
        """Hold sending back until ``unblock()`` (a loop transport's buffer is full)."""
        self.blocked += 1
        self._waiting_writable = True

    def unblock(self) -> None:
        self._waiting_writable = False
        if self.queue.datagrams:
            self.schedule()

    async def wait_space(self, owner: object = None, *, front: bool = False) -> None:
        """Wait for a turn at a free slot (FIFO among waiters; at the head of the line with
        ``front``), on behalf of ``owner`` (``space.withdraw(owner, ...)`` ends the wait).
        Cancellation-safe. A caller that is woken and does not queue a datagram must call
        ``space.wake(1)``."""
        await self.space.wait(owner, front=front)

    def when_drained(self, account: TxAccount | None, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every datagram ``account`` queued was handled (sent or
        counted as failed), or when the writer closes; at once if none is pending (None: a
        connection that never sent).

        This is what a closing connection waits for: its own datagrams, not the whole socket's
        queue (which another connection may keep busy for ever).
        """
        if account is None or account.pending() == 0 or self._closed:
            callback()
        else:
            self._draining[account] = callback

    def when_empty(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every datagram queued now was handled (sent or counted as
        failed), or when the writer closes; at once if the queue is empty."""
        if not self.queue.datagrams or self._closed:
            callback()
        else:
            self._on_empty.append(callback)

    def close(self) -> None:
        """Stop for good: queued datagrams are discarded (the caller flushed first)."""
        if self._closed:
            return
        self._closed = True
        self._waiting_writable = False
        if self._watching:
            self._watching = False
            self._loop.remove_writer(self._fd)
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        self._run_on_empty()
        self._run_drained(everyone=True)
        self.space.wake_all()
        if self._release_sender is not None:
            self._release_sender(self.sender)
        else:
            self.sender.close()
        if self._spare is not None:
            self._spare.close()

    # -- the loop side --------------------------------------------------------------------

    def _run_drained(self, *, everyone: bool = False) -> None:
        # Per handled chunk, O(closing connections): nothing per datagram.
        done = [account for account in self._draining
                if everyone or account.pending() == 0]
        for account in done:
            callback = self._draining.pop(account)
            try:
                callback()
            except Exception:  # a bug in a callback must not stop the writer
                logger.exception("udpx: error in a writer callback")

    def _run_on_empty(self) -> None:
        callbacks = self._on_empty
        self._on_empty = []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a bug in a callback must not stop the writer
                logger.exception("udpx: error in a writer callback")

    def _wait_writable(self) -> None:
        # EAGAIN: the kernel's buffer is full. Wait until it drains (never seen on loopback UDP,
        # where a full receiver just drops, but real on other paths).
        self.blocked += 1
        self._waiting_writable = True
        if self._retry_later is not None:
            self._retry_handle = self._retry_later(self._retry)
        else:
            self._watching = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        self._waiting_writable = False
        self._watching = False
        self._loop.remove_writer(self._fd)
        self._flush()

    def _retry(self) -> None:
        self._retry_handle = None
        if self._closed:
            return
        self._waiting_writable = False
        self._flush()

    def _flush(self) -> None:
        self.scheduled = False
        self._handle = None
        if self._closed or self._waiting_writable:
            return
        queue = self.queue
        datagrams = queue.datagrams
        owners = queue.owners
        sender = self.sender
        space = self.space
        state = self.state
        if len(datagrams) == 1 and self.direct:
            # One datagram (a reply in a ping-pong, a game tick): one plain send, without
            # filling the batch arrays and calling sendmmsg through ctypes for a batch of one
            # (about 3x cheaper per datagram).
            if self._send_one():
                queue.pop(1)
                if space:
                    space.wake(1)
            else:
                self._wait_writable()
        turns = MAX_BATCHES_PER_CALLBACK
        while turns > 0:
            if not datagrams or self._waiting_writable:
                break
            if state.gso:
                run = self._gso_run(datagrams, owners)
                if run >= GSO_MIN_RUN or 1 < run == len(datagrams):
                    handled = self._send_gso(run)
                    if handled >= 0:
                        queue.pop(handled)
                        if space:
                            space.wake(handled)
                        if handled < run:
                            self._wait_writable()
                            break
                        turns -= 1
                        continue
            if sender.busy:
                # Inside a send from these arrays: a send's error reached a callback that made
                # this writer drain at once.
                if self._sending:
                    # Its own send, its queue in the middle of a chunk: a loop callback later.
                    self.scheduled = True
                    self._handle = self._loop.call_soon(self._flush)
                    break
                # Another socket's writer sending from the shared arrays (only shared arrays
                # are busy outside their own writer's send): arrays of its own for this drain,
                # made the first time it happens.
                if self._spare is None:
                    assert self._make_spare is not None
                    self._spare = self._make_spare()
                sender = self._spare
            count = min(len(datagrams), sender.size)
            chunk = list(islice(datagrams, count))
            if count > self._turn_size:
                count = self._fit(chunk, sender.capacity, turns)
            turns -= -(-count // self._turn_size)
            chunk_owners: list[TxAccount] = list(islice(owners, count))
            controls = ([owner.control for owner in chunk_owners] if self._controls
                        else None)
            sender.busy = self._sending = True
            try:
                sender.fill(chunk, chunk_owners if self._named else None, controls)
                handled = self._send_chunk(chunk, chunk_owners, sender)
            finally:
                sender.busy = self._sending = False
            queue.pop(handled)
            if space:
                space.wake(handled)
            if handled < count:
                self._wait_writable()
                break
        else:
            if datagrams:
                self.scheduled = True
                self._handle = self._loop.call_soon(self._flush)
        if self._draining:
            self._run_drained()
        if self.paused and len(datagrams) <= queue.low:
            self._resume_paused()
        if not datagrams and self._on_empty:
            self._run_on_empty()
        if self._flushed is not None:
            self._flushed()

    def _fit(self, chunk: list[bytes], capacity: int, turns: int) -> int:
        """Trim a chunk larger than a turn (a listener's) to the turns left and to what the
        sender's arena holds; returns its new length."""
        count = min(len(chunk), turns * self._turn_size)
        if sum(map(len, islice(chunk, count))) > capacity:
            # Large datagrams (rare at this batch size): as many as fit, at least one (a
            # datagram is never larger than a slot).
            count = max(1, bisect_right(list(accumulate(map(len, chunk[:count]))), capacity))
        del chunk[count:]
        return count

    def _send_one(self) -> bool:
        """Send the datagram at the head of the queue with one send/sendto; False on EAGAIN
        (it stays queued). A refusal is counted as for a batch."""
        data = self.queue.datagrams[0]
        owner: TxAccount = self.queue.owners[0]
        sock = self._sock
        retried = False
        while True:
            try:
                if owner.sockaddr is None:
                    sock.send(data)
                else:
                    address = owner.address
                    if address is None:
                        address = owner.address = address_from_sockaddr(sock.family,
                                                                         owner.sockaddr)
                    if owner.ancillary:  # its source address, its TOS byte
                        sock.sendmsg((data,), owner.ancillary, 0, address)
                    else:
                        sock.sendto(data, address)
            except BlockingIOError:
                return False
            except InterruptedError:
                continue
            except OSError as exc:
                if not retried and self._earlier_error(exc, owner):
                    retried = True
                    continue
                self._refused(owner, data, exc)
                return True
            if len(data) == owner.packet_size:
                owner.packets += 1
            else:
                owner.count_sent(1, len(data))
            self.tx_packets += 1
            self.tx_bytes += len(data)
            return True

    def _refused(self, owner: TxAccount, data: bytes, exc: OSError) -> None:
        """The kernel refused one datagram: counted on its connection (``send_error``), told
        to ``send_failed``, and the writer goes on."""
        owner.errors += 1
        self.tx_errors += 1
        logger.debug("udpx: datagram of %d bytes dropped: %s", len(data), exc)
        if self._send_failed is not None:
            self._send_failed(exc)

    def _resume_paused(self) -> None:
        # Once per crossing of the low mark, O(connections told to pause).
        paused, self.paused = self.paused, []
        for conn in paused:
            conn._resume_writing()

    def _gso_run(self, datagrams: deque[bytes], owners: deque[TxAccount]) -> int:
        """How many datagrams at the head of the queue one GSO send can carry: same connection,
        same size (the last may be shorter, not empty), at most what the socket's state
        allows per send."""
        size = len(datagrams[0])
        if size == 0:
            return 0
        owner = owners[0]
        if len(owners) > 1 and owners[1] is not owner:
            return 1  # (the usual head of a busy server's queue: replies to many peers)
        limit = min(self.state.gso_limit(size), len(datagrams))
        run = 1
        for data, other in zip(islice(datagrams, 1, limit), islice(owners, 1, limit)):
            if other is not owner:
                break
            length = len(data)
            if length != size:
                if 0 < length < size:
                    run += 1
                break
            run += 1
        return run

    def _send_gso(self, run: int) -> int:
        """Send the ``run`` datagrams at the head of the queue with one UDP_SEGMENT sendmsg.

        Returns how many were handled: ``run``, or 0 on EAGAIN, or -1 when this run must go
        through sendmmsg instead: the destination refused it (the per-datagram path then
        counts each datagram's error), or the kernel or device refused GSO (then the socket's
        state turns it off, logged at WARNING).
        """
        queue = self.queue
        chunk = list(islice(queue.datagrams, run))
        owner: TxAccount = queue.owners[0]
        state = self.state
        control = state.gso_control(len(chunk[0]))
        if owner.ancillary:
            control = [*control, *owner.ancillary]  # the run's source address, TOS byte
        payload = b"".join(chunk)
        retried = False
        while True:
            try:
                if owner.sockaddr is None:
                    self._sock.sendmsg((payload,), control)
                else:
                    self._sock.sendmsg((payload,), control, 0,
                                       address_from_sockaddr(self._sock.family, owner.sockaddr))
            except BlockingIOError:
                return 0
            except InterruptedError:
                continue
            except OSError as exc:
                if self._earlier_error(exc, owner):
                    if not retried:
                        retried = True
                        continue
                    return -1
                state.gso_failed(exc, owner.sockaddr)
                # Either way, this run goes out (or fails, counted per datagram) with sendmmsg.
                return -1
            break
        state.gso_sent()
        owner.count_sent(run, len(payload))
        self.tx_packets += run
        self.tx_bytes += len(payload)
        return run

    def _earlier_error(self, exc: OSError, owner: TxAccount) -> bool:
        """Whether a failed send reported an earlier datagram's ICMP error rather than its
        own failure (then it is worth one more try), after handing that error on:
        - an unconnected socket with IP_RECVERR: the error queue says whose error it was (any
          peer's) and reading it clears the socket's pending error;
        - a connected socket: ECONNREFUSED is its peer's, for the connection to raise once.
        """
        if (self._pending_error is not None and exc.errno in ICMP_ERRNOS
                and self._pending_error(owner)):
            return True
        if exc.errno == errno.ECONNREFUSED and owner.on_error is not None:
            owner.on_error(exc)
            return True
        return False

    def send_now(self, datagrams: list[bytes], owner: TxAccount, sender: Sender) -> int:
        """Send ``datagrams`` of one connection at once through ``sender`` (a batch of the
        caller's choosing) when nothing is queued ahead of them; returns how many were handled.

        The rest, if any, is the caller's to queue. Used by ``BatchWriter`` to batch by hand on
        a ``batch_size=1`` socket.
        """
        if self._closed or self._waiting_writable or self.queue.datagrams:
            return 0
        chunk = datagrams[:sender.size]
        owners = [owner] * len(chunk)
        controls = [owner.control] * len(chunk) if self._controls else None
        sender.fill(chunk, owners if self._named else None, controls)
        owner.enqueued += len(chunk)
        handled = self._send_chunk(chunk, owners, sender)
        owner.enqueued -= len(chunk) - handled
        return handled

    def _send_chunk(self, chunk: list[bytes], owners: list[TxAccount],
                    sender: Sender | None = None) -> int:
        """Send a filled chunk; returns how many datagrams were handled (sent or dropped)."""
        # Hot path: one sendmmsg per chunk; a refused datagram costs an exception, the rest of the
        # chunk goes on with the next call.
        count = len(chunk)
        fd = self._fd
        send = (sender or self.sender).send
        start = 0
        retried_refusal = False
        while start < count:
            try:
                sent = send(fd, start)
            except BlockingIOError:
                return start
            except OSError as exc:
                owner = owners[start]
                if self._earlier_error(exc, owner) and not retried_refusal:
                    retried_refusal = True
                    continue
                self._refused(owner, chunk[start], exc)
                start += 1
                retried_refusal = False
                continue
            end = start + sent
            first = owners[start]
            sizes = list(map(len, chunk[start:end]))
            sent_bytes = sum(sizes)
            if owners.count(first) == count:
                first.count_sent(sent, sent_bytes)
            else:
                for owner, size in zip(owners[start:end], sizes):
                    if size == owner.packet_size:
                        owner.packets += 1
                    else:
                        owner.count_sent(1, size)
            self.tx_packets += sent
            self.tx_bytes += sent_bytes
            start = end
            retried_refusal = False
        return count
