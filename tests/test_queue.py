"""Properties of the pure receive and transmit queues (``udpx._queue``): no socket, no loop."""

from __future__ import annotations

import mmap
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from udpx._mmsg import slice_all
from udpx._queue import DATAGRAM_OVERHEAD, ProtocolRxQueue, RxPool, RxQueue, TxAccount, TxQueue

MACHINE_SETTINGS = settings(max_examples=150, stateful_step_count=40, deadline=None)

payloads = st.binary(max_size=40)


def build_arena(datagrams: list[bytes], gaps: list[int]) -> tuple[bytes, list[int], list[int]]:
    """Concatenate ``datagrams`` with filler bytes between them, as a receive arena would hold
    them; returns the arena, the offsets and the lengths."""
    arena = bytearray()
    offsets: list[int] = []
    lengths: list[int] = []
    for data, gap in zip(datagrams, gaps, strict=True):
        arena += b"\xee" * gap
        offsets.append(len(arena))
        lengths.append(len(data))
        arena += data
    arena += b"\xee" * 3
    return bytes(arena), offsets, lengths


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[bytes], list[int], list[int]]:
    """A batch of datagrams, the filler before each and some surplus offsets (a receive batch's
    offsets list is as long as the batch size, longer than the number received)."""
    datagrams = draw(st.lists(payloads, max_size=12))
    gaps = draw(st.lists(st.integers(0, 5), min_size=len(datagrams), max_size=len(datagrams)))
    surplus = draw(st.lists(st.integers(0, 50), max_size=4))
    return datagrams, gaps, surplus


class RxQueueMachine(RuleBasedStateMachine):
    """An ``RxQueue`` against a deque model, with every counter recomputed independently."""

    def __init__(self) -> None:
        super().__init__()
        self.queue = RxQueue(1)
        self.model: deque[bytes] = deque()
        self.offered = 0
        self.accepted = 0
        self.accepted_bytes = 0
        #: Queue length seen by each call of ``wake``, since the last rule cleared it.
        self.wakes: list[int] = []

    def _wake(self) -> None:
        self.wakes.append(len(self.queue))

    @initialize(limit=st.integers(1, 8))
    def create(self, limit: int) -> None:
        self.queue = RxQueue(limit, wake=self._wake)

    def _offer(self, datagrams: list[bytes]) -> None:
        """Update the model for datagrams offered in order."""
        for data in datagrams:
            self.offered += 1
            if len(self.model) < self.queue.limit:
                self.model.append(data)
                self.accepted += 1
                self.accepted_bytes += len(data)

    def _check_wakes(self, was_empty: bool) -> None:
        became_non_empty = was_empty and bool(self.model)
        # Woken exactly once when the queue went from empty to non-empty, after all the
        # datagrams of the call were queued; otherwise not at all.
        assert self.wakes == ([len(self.model)] if became_non_empty else [])
        self.wakes.clear()

    @rule(data=payloads)
    def put(self, data: bytes) -> None:
        was_empty = not self.model
        will_fit = len(self.model) < self.queue.limit
        assert self.queue.put(data) is will_fit
        self._offer([data])
        self._check_wakes(was_empty)

    @rule(batch=batches(), use_mmap=st.booleans())
    def put_batch(self, batch: tuple[list[bytes], list[int], list[int]], use_mmap: bool) -> None:
        datagrams, gaps, surplus = batch
        blob, offsets, lengths = build_arena(datagrams, gaps)
        offsets += surplus
        was_empty = not self.model
        if use_mmap:
            arena = mmap.mmap(-1, max(len(blob), 1))
            try:
                arena[:len(blob)] = blob
                self.queue.put_batch(slice_all(arena, offsets, lengths), lengths)
                # The queue holds copies: the arena is reused for the next batch.
                arena[:] = b"\xff" * len(arena)
            finally:
                arena.close()
        else:
            self.queue.put_batch(slice_all(blob, offsets, lengths), lengths)
        self._offer(datagrams)
        self._check_wakes(was_empty)

    @rule()
    def get(self) -> None:
        if not self.model:
            with pytest.raises(IndexError):
                self.queue.get()
            return
        assert self.queue.get() == self.model.popleft()

    @rule(max_count=st.none() | st.integers(0, 10))
    def get_many(self, max_count: int | None) -> None:
        taken = len(self.model) if max_count is None else min(max_count, len(self.model))
        expected = [self.model.popleft() for _ in range(taken)]
        assert self.queue.get_many(max_count) == expected

    @invariant()
    def bounded(self) -> None:
        assert len(self.queue) <= self.queue.limit

    @invariant()
    def fifo(self) -> None:
        assert list(self.queue.items) == list(self.model)
        assert all(type(item) is bytes for item in self.queue.items)

    @invariant()
    def accounting(self) -> None:
        queue = self.queue
        assert queue.rx_packets + queue.dropped_full == self.offered
        assert queue.rx_packets == self.accepted
        assert queue.rx_bytes == self.accepted_bytes
        assert queue.dropped_truncated == 0
        assert not self.wakes


def test_rx_queue_machine() -> None:
    run_state_machine_as_test(RxQueueMachine, settings=MACHINE_SETTINGS)


class TxQueueMachine(RuleBasedStateMachine):
    """A ``TxQueue`` against a deque of (datagram, owner) pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.queue = TxQueue(1)
        self.model: deque[tuple[bytes, object]] = deque()
        self.owners = [object() for _ in range(3)]

    @initialize(limit=st.integers(1, 8))
    def create(self, limit: int) -> None:
        self.queue = TxQueue(limit)

    # The caller checks ``full()`` before ``put()``, as UDPConn.send does.
    @precondition(lambda self: len(self.model) < self.queue.limit)
    @rule(data=payloads, owner=st.integers(0, 2))
    def put(self, data: bytes, owner: int) -> None:
        assert not self.queue.full()
        self.queue.put(data, self.owners[owner])
        self.model.append((data, self.owners[owner]))

    @rule(count=st.integers(0, 10))
    def pop(self, count: int) -> None:
        self.queue.pop(count)
        for _ in range(min(count, len(self.model))):
            self.model.popleft()

    @invariant()
    def contents(self) -> None:
        queue = self.queue
        assert len(queue) == len(self.model) == len(queue.datagrams) == len(queue.owners)
        assert list(queue.datagrams) == [data for data, _ in self.model]
        assert all(a is b for a, (_, b) in zip(queue.owners, self.model, strict=True))

    @invariant()
    def capacity(self) -> None:
        queue = self.queue
        assert 0 <= len(queue) <= queue.limit
        assert queue.space() == queue.limit - len(self.model)
        assert queue.full() is (len(self.model) >= queue.limit)
        assert queue.full() is (queue.space() == 0)


def test_tx_queue_machine() -> None:
    run_state_machine_as_test(TxQueueMachine, settings=MACHINE_SETTINGS)


# -- examples -------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, -1])
def test_rx_queue_rejects_limit_below_one(limit: int) -> None:
    with pytest.raises(ValueError, match="rx_queue_size"):
        RxQueue(limit)


@pytest.mark.parametrize("limit", [0, -5])
def test_tx_queue_rejects_limit_below_one(limit: int) -> None:
    with pytest.raises(ValueError, match="tx_queue_size"):
        TxQueue(limit)


def test_rx_queue_default_wake_is_harmless() -> None:
    queue = RxQueue(2)
    assert queue.put(b"a")
    queue.put_batch([b"b", b"c"], [1, 1])
    assert list(queue.items) == [b"a", b"b"]
    assert queue.dropped_full == 1


def test_put_batch_partial_fit_keeps_the_oldest() -> None:
    woken: list[int] = []
    queue = RxQueue(3, wake=lambda: woken.append(1))
    queue.put(b"x")
    woken.clear()
    queue.put_batch([b"01", b"23", b"45", b"67", b"89"], [2, 2, 2, 2, 2])
    assert list(queue.items) == [b"x", b"01", b"23"]
    assert (queue.rx_packets, queue.rx_bytes, queue.dropped_full) == (3, 5, 3)
    assert woken == []  # it was not empty


def test_put_batch_into_full_queue_drops_all_without_wake() -> None:
    woken: list[int] = []
    queue = RxQueue(1, wake=lambda: woken.append(1))
    queue.put(b"")
    queue.put_batch([b"a", b"b", b"c"], [1, 1, 1])
    assert woken == [1]
    assert queue.dropped_full == 3
    assert list(queue.items) == [b""]


def test_empty_batch_wakes_nobody() -> None:
    woken: list[int] = []
    queue = RxQueue(4, wake=lambda: woken.append(1))
    queue.put_batch([], [])
    assert woken == []
    assert (queue.rx_packets, queue.dropped_full, len(queue)) == (0, 0, 0)


def test_zero_length_datagrams_count_as_packets() -> None:
    woken: list[int] = []
    queue = RxQueue(4, wake=lambda: woken.append(1))
    queue.put_batch([b"", b""], [0, 0])
    assert list(queue.items) == [b"", b""]
    assert (queue.rx_packets, queue.rx_bytes) == (2, 0)
    assert woken == [1]


def test_get_many_none_drains_everything() -> None:
    queue = RxQueue(10)
    for index in range(5):
        queue.put(bytes([index]))
    assert queue.get_many(None) == [bytes([index]) for index in range(5)]
    assert len(queue) == 0
    assert queue.get_many(None) == []
    with pytest.raises(IndexError):
        queue.get()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 1500)), max_size=30))
def test_byte_counts_follow_every_size(steps: list[tuple[int, int]]) -> None:
    """A receive queue's and a transmit account's bytes (counted as packets times the first
    size plus the rest) are the sum of what was counted, whatever the sizes and order, taking
    back included (negative counts)."""
    queue = RxQueue(10)
    account = TxAccount(None)
    packets = total = 0
    for count, size in steps:
        if packets + count < 0:
            continue  # (nothing takes back more than was counted)
        payload = count * size + (count > 1)  # not always a multiple of the count
        queue.count_rx(count, payload)
        account.count_sent(count, payload)
        packets += count
        total += payload
        assert (queue.rx_packets, queue.rx_bytes) == (packets, total)
        assert (account.packets, account.sent_bytes) == (packets, total)


def test_datagrams_of_the_usual_size_only_count() -> None:
    """The point of the representation: a datagram of the size the last other one had adds
    to the packet count and to nothing else (no int object made per datagram per byte); a
    datagram of another size becomes the size the next ones are taken to have, so a first
    datagram of its own size (a keepalive, a handshake) does not hold the count back."""
    queue = RxQueue(10)
    queue.count_rx(1, 700)
    assert (queue.rx_size, queue.rx_extra) == (700, 0)
    queue.rx_packets += 1  # what the routing does for a datagram of rx_size bytes
    assert queue.rx_bytes == 1400
    queue.count_rx(1, 20)
    assert (queue.rx_size, queue.rx_packets, queue.rx_bytes) == (20, 3, 1420)
    keepalive_first = RxQueue(10)
    keepalive_first.count_rx(1, 0)
    keepalive_first.count_rx(1, 100)
    assert keepalive_first.rx_size == 100
    keepalive_first.rx_packets += 1
    assert keepalive_first.rx_bytes == 200
    account = TxAccount(None)
    account.count_sent(3, 300)
    assert (account.packet_size, account.extra_bytes, account.sent_bytes) == (100, 0, 300)
    account.count_sent(1, 0)
    account.count_sent(1, 50)
    assert (account.packet_size, account.packets, account.sent_bytes) == (50, 5, 350)


def test_tx_account_pending() -> None:
    errors: list[OSError] = []
    account = TxAccount(b"\x02\x00", on_error=errors.append)
    assert account.pending() == 0
    account.enqueued += 5
    account.packets += 2
    account.errors += 1
    assert account.pending() == 2
    assert account.sockaddr == b"\x02\x00"
    assert TxAccount(None).on_error is None


class _Recorder:
    """A protocol and connection for a bare ProtocolRxQueue: what it was handed."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.failures: list[Exception] = []

    def datagrams_received(self, datagrams: list[bytes], /) -> None:
        self.batches.append(datagrams)

    def _datagrams_failed(self, exc: Exception, /) -> None:
        self.failures.append(exc)


def test_protocol_queues_held_back_datagrams_are_their_own() -> None:
    # A protocol-mode queue shares one empty placeholder (for the held datagrams and for the
    # batch being collected) with every other until it needs its own: holding back in one
    # queue must neither lose datagrams nor show up in another.
    pool = RxPool()
    first, second = ProtocolRxQueue(4, pool), ProtocolRxQueue(4, pool)
    seen = _Recorder()
    first.protocol = second.protocol = seen
    first.pause()
    for data in (b"a", b"b", b"c", b"d", b"e"):
        first.put(data)
    second.put(b"x")
    assert list(first.items) == [b"a", b"b", b"c", b"d"]
    assert (first.dropped_full, pool.dropped_full) == (1, 1)
    assert len(second) == 0
    assert seen.batches == [[b"x"]]
    assert first.resume()
    assert first.take_held() == [b"a", b"b", b"c", b"d"]
    second.pause()
    second.put_batch([b"y", b"z"], [1, 1])
    assert (list(second.items), len(first)) == ([b"y", b"z"], 0)
    assert (pool.rx_packets, pool.buffered) == (7, 2 * (1 + DATAGRAM_OVERHEAD))


def test_protocol_queue_passes_callback_errors_to_its_connection() -> None:
    queue = ProtocolRxQueue(2, RxPool())
    recorder = _Recorder()
    error = ValueError("bad datagram")

    class Failing:
        def datagrams_received(self, datagrams: list[bytes], /) -> None:
            raise error

    queue.protocol, queue.conn = Failing(), recorder
    queue.put(b"a")
    assert recorder.failures == [error]
    assert (queue.rx_packets, queue.items) == (1, deque())
