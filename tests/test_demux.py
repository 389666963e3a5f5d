"""Properties of the demultiplexer (``udpx._demux``): routing by peer key, admission of new
peers, drop accounting and wake-ups. No socket, no loop: batches are built in memory."""

from __future__ import annotations

import mmap
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from udpx._demux import WAKES_PER_TURN, Demux, PeerKey
from udpx._mmsg import slice_all
from udpx._queue import DATAGRAM_OVERHEAD, RxPool, RxQueue
from udpx._sockets import key_from_address

#: Peer keys as the receivers compute them: ints for IPv4 peers, bytes for IPv6 peers.
PEER_KEYS: list[PeerKey] = [
    key_from_address(socket.AF_INET, ("10.0.0.1", 4000)),
    key_from_address(socket.AF_INET, ("10.0.0.1", 4001)),
    key_from_address(socket.AF_INET, ("192.168.7.9", 4000)),
    key_from_address(socket.AF_INET6, ("2001:db8::1", 4000, 0, 0)),
    key_from_address(socket.AF_INET6, ("2001:db8::1", 4001, 0, 0)),
    key_from_address(socket.AF_INET6, ("fe80::1", 4000, 0, 2)),
]
PEERS = range(len(PEER_KEYS))


def fresh_key(peer: int) -> PeerKey:
    """A new object equal to the peer's key, as each received batch builds its own keys."""
    key = PEER_KEYS[peer]
    if isinstance(key, int):
        return int.from_bytes(key.to_bytes(8, "little"), "little")
    assert isinstance(key, bytes)
    return bytes(bytearray(key))


def peer_of_key(key: PeerKey) -> int:
    return PEER_KEYS.index(key)


def payload(peer: int, serial: int, size: int) -> bytes:
    """A datagram that names its sender: peer index, serial number, then filler; or, for size
    0, the empty datagram (which names nobody and is checked through the model only)."""
    if size == 0:
        return b""
    head = bytes([peer]) + serial.to_bytes(4, "big")
    return head + bytes([0x40 + peer]) * max(size - len(head), 0)


def test_payloads_name_their_peer() -> None:
    assert len(set(PEER_KEYS)) == len(PEER_KEYS)
    assert payload(3, 7, 9)[0] == 3
    assert payload(3, 7, 0) == b""


@dataclass(eq=False)
class Conn:
    """The model of one connection the demultiplexer created."""

    peer: int
    queue: RxQueue | None = None
    expected: deque[bytes] = field(default_factory=deque)
    delivered: int = 0
    delivered_bytes: int = 0
    dropped_full: int = 0
    truncated: int = 0
    open: bool = True
    #: Queue length seen at each wake since the model last checked.
    wakes: list[int] = field(default_factory=list)

    @property
    def rx(self) -> RxQueue:
        assert self.queue is not None
        return self.queue


# (peer, size); size None is a truncated datagram (fed through feed_one only).
datagram_specs = st.tuples(st.sampled_from(PEERS), st.integers(0, 12))


@st.composite
def batch_specs(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Runs of datagrams from a few peers, so that both the run shortcut and peer switches in
    the middle of a batch are exercised."""
    runs = draw(st.lists(st.tuples(datagram_specs, st.integers(1, 4)), max_size=8))
    specs: list[tuple[int, int]] = []
    for (peer, size), count in runs:
        specs.extend([(peer, size)] * count)
    return specs


class DemuxMachine(RuleBasedStateMachine):
    """A ``Demux`` driven as the listener drives it, against an independent model."""

    def __init__(self) -> None:
        super().__init__()
        self.max_conns = self.backlog = self.queue_limit = 1
        self.memory_limit: int | None = None
        self.buffered = 0
        self.dropped_memory = 0
        self.demux = Demux(max_conns=1, backlog=1, create=self._create)
        self.serial = 0
        self.received = 0
        # The model.
        self.open: dict[int, Conn] = {}
        self.conns: list[Conn] = []
        self.pending: deque[Conn] = deque()
        self.dropped_backlog = 0
        self.dropped_conn_limit = 0
        self.dropped_truncated = 0
        #: Connections ``create`` made that the model has not yet routed a datagram to.
        self.made: deque[Conn] = deque()
        #: The model's share of the memory budget taken by held datagrams (see
        #: DeferringDemuxMachine), and whether the owner closed.
        self.held_cost = 0
        self.closed = False
        self.dropped_closed = 0

    @initialize(max_conns=st.integers(1, 4), backlog=st.integers(1, 4),
                queue_limit=st.integers(1, 4),
                memory_limit=st.none() | st.integers(DATAGRAM_OVERHEAD, 4 * DATAGRAM_OVERHEAD))
    def setup(self, max_conns: int, backlog: int, queue_limit: int,
              memory_limit: int | None) -> None:
        self.max_conns, self.backlog, self.queue_limit = max_conns, backlog, queue_limit
        self.memory_limit = memory_limit
        self.demux = Demux(max_conns=max_conns, backlog=backlog, create=self._create,
                           pool=RxPool(memory_limit))

    # -- the callbacks ----------------------------------------------------------------------

    def _create(self, key: PeerKey) -> RxQueue:
        demux = self.demux
        # Admission must allow it, and the peer must be new.
        assert key not in demux.table
        assert len(demux.table) < demux.max_conns
        assert demux.pending < demux.backlog
        conn = Conn(peer_of_key(key))
        conn.queue = RxQueue(self.queue_limit, wake=lambda: conn.wakes.append(len(conn.rx)),
                             pool=demux.pool)
        self.made.append(conn)
        return conn.queue

    # -- the model --------------------------------------------------------------------------

    def _route(self, peer: int, data: bytes | None) -> None:
        """What must happen to one datagram, applied to the model."""
        self.received += 1
        conn = self.open.get(peer)
        if data is None:
            if conn is None:
                self.dropped_truncated += 1
            else:
                conn.truncated += 1
            return
        if conn is None:
            if self.closed:
                self.dropped_closed += 1
                return
            if len(self.open) >= self.max_conns:
                self.dropped_conn_limit += 1
                return
            if len(self.pending) >= self.backlog:
                self.dropped_backlog += 1
                return
            assert self.made, f"create was not called for peer {peer}"
            conn = self.made.popleft()
            assert conn.peer == peer, (conn.peer, peer)
            self.open[peer] = conn
            self.conns.append(conn)
            self.pending.append(conn)
        if len(conn.expected) >= self.queue_limit:
            conn.dropped_full += 1
            return
        cost = len(data) + DATAGRAM_OVERHEAD
        if (self.memory_limit is not None
                and self.buffered + self.held_cost + cost > self.memory_limit):
            self.dropped_memory += 1
            return
        self.buffered += cost
        conn.expected.append(data)
        conn.delivered += 1
        conn.delivered_bytes += len(data)

    def _make(self, peer: int, size: int) -> bytes:
        self.serial += 1
        return payload(peer, self.serial, size)

    def _check_wakes(self, was_empty: dict[int, bool], *, batches: int = 1) -> None:
        """Each queue that went from empty to non-empty is woken exactly once, after the whole
        call (``batches``: after the batch that made it non-empty, the call routed several);
        no other queue is woken."""
        for conn in self.conns:
            became_non_empty = was_empty.get(id(conn), True) and bool(conn.expected)
            if batches == 1:
                assert conn.wakes == ([len(conn.expected)] if became_non_empty else []), conn
            else:
                assert len(conn.wakes) == became_non_empty, conn
            conn.wakes.clear()

    def _emptiness(self) -> dict[int, bool]:
        return {id(conn): not conn.expected for conn in self.conns}

    # -- the rules --------------------------------------------------------------------------

    @rule(specs=batch_specs(), use_mmap=st.booleans(), gap=st.integers(0, 3),
          surplus=st.integers(0, 3))
    def feed_batch(self, specs: list[tuple[int, int]], use_mmap: bool, gap: int,
                   surplus: int) -> None:
        was_empty = self._emptiness()
        datagrams = [(peer, self._make(peer, size)) for peer, size in specs]
        blob = bytearray()
        offsets: list[int] = []
        for _, data in datagrams:
            blob += b"\xee" * gap
            offsets.append(len(blob))
            blob += data
        lengths = [len(data) for _, data in datagrams]
        # A receive batch has one offset per slot, more than the datagrams received.
        offsets += [len(blob)] * surplus
        keys = [fresh_key(peer) for peer, _ in datagrams]
        self._before_feed(datagrams)
        if use_mmap:
            arena = mmap.mmap(-1, max(len(blob), 1))
            try:
                arena[:len(blob)] = bytes(blob)
                self.demux.feed_batch(keys, slice_all(arena, offsets, lengths), lengths)
                arena[:] = b"\xff" * len(arena)  # the queues must hold copies
            finally:
                arena.close()
        else:
            self.demux.feed_batch(keys, slice_all(bytes(blob), offsets, lengths), lengths)
        routed = self._fed(datagrams)
        assert not self.made, "create was called for a peer that was not admitted"
        self._check_wakes(was_empty, batches=routed)

    @rule(peer=st.sampled_from(PEERS), size=st.none() | st.integers(0, 12))
    def feed_one(self, peer: int, size: int | None) -> None:
        was_empty = self._emptiness()
        data = None if size is None else self._make(peer, size)
        self._before_feed([(peer, data)])
        self.demux.feed_one(fresh_key(peer), data)
        routed = self._fed([(peer, data)])
        assert not self.made, "create was called for a peer that was not admitted"
        self._check_wakes(was_empty, batches=routed)

    def _before_feed(self, batch: Sequence[tuple[int, bytes | None]]) -> None:
        """The demultiplexer is about to be fed ``batch``."""

    def _fed(self, batch: Sequence[tuple[int, bytes | None]]) -> int:
        """The demultiplexer was fed ``batch``: what it must have done, applied to the model;
        the batches it routed."""
        for peer, data in batch:
            self._route(peer, data)
        return 1

    @precondition(lambda self: bool(self.pending))
    @rule()
    def accept(self) -> None:
        self.pending.popleft()
        self.demux.accepted()

    @rule(peer=st.sampled_from(PEERS))
    def close(self, peer: int) -> None:
        """Close the peer's connection if it has one (``remove`` of an unknown key is a no-op).
        As the listener does, a connection closed before it was accepted leaves the backlog."""
        conn = self.open.pop(peer, None)
        self.demux.remove(fresh_key(peer))
        if conn is None:
            return
        conn.open = False
        if conn in self.pending:
            self.pending.remove(conn)
            self.demux.accepted()

    @rule(peer=st.sampled_from(PEERS), max_count=st.none() | st.integers(1, 3))
    def drain(self, peer: int, max_count: int | None) -> None:
        """The application reads from the peer's open connection."""
        conn = self.open.get(peer)
        if conn is None:
            return
        taken = len(conn.expected) if max_count is None else min(max_count,
                                                                  len(conn.expected))
        expected = [conn.expected.popleft() for _ in range(taken)]
        self.buffered -= sum(map(len, expected)) + len(expected) * DATAGRAM_OVERHEAD
        assert conn.rx.get_many(max_count) == expected

    # -- the invariants ---------------------------------------------------------------------

    @invariant()
    def no_datagram_reaches_another_peer(self) -> None:
        for conn in self.conns:
            for item in conn.rx.items:
                assert item == b"" or item[0] == conn.peer, (conn.peer, item)

    @invariant()
    def queues_are_bounded(self) -> None:
        for conn in self.conns:
            assert len(conn.rx) <= conn.rx.limit == self.queue_limit

    @invariant()
    def matches_the_model(self) -> None:
        demux = self.demux
        assert {peer_of_key(key): queue for key, queue in demux.table.items()} == {
            peer: conn.rx for peer, conn in self.open.items()}
        assert demux.pending == len(self.pending)
        assert demux.dropped_backlog == self.dropped_backlog
        assert demux.dropped_conn_limit == self.dropped_conn_limit
        pool = demux.pool
        assert pool.dropped_truncated == self.dropped_truncated + sum(
            conn.truncated for conn in self.conns)
        assert pool.dropped_memory == self.dropped_memory
        assert pool.buffered == self.buffered + self.held_cost
        assert demux.dropped_closed == self.dropped_closed
        assert pool.rx_packets == sum(conn.delivered for conn in self.conns)
        assert pool.rx_bytes == sum(conn.delivered_bytes for conn in self.conns)
        assert pool.dropped_full == sum(conn.dropped_full for conn in self.conns)
        for conn in self.conns:
            queue = conn.rx
            assert list(queue.items) == list(conn.expected)
            assert (queue.rx_packets, queue.rx_bytes, queue.dropped_full,
                    queue.dropped_truncated) == (conn.delivered, conn.delivered_bytes,
                                                 conn.dropped_full, conn.truncated)

    @invariant()
    def delivered_plus_dropped_is_received(self) -> None:
        demux = self.demux
        pool = demux.pool
        # The pool's totals alone account for every datagram (what ln.stats reports).
        assert (demux.dropped_backlog + demux.dropped_conn_limit + demux.dropped_bad_source
                + demux.dropped_closed + pool.rx_packets + pool.dropped_full
                + pool.dropped_truncated + pool.dropped_memory) == self.received
        total = (demux.dropped_backlog + demux.dropped_conn_limit + demux.dropped_closed
                 + pool.dropped_memory
                 + pool.dropped_truncated - sum(conn.rx.dropped_truncated for conn in self.conns))
        for conn in self.conns:
            queue = conn.rx
            total += queue.rx_packets + queue.dropped_full + queue.dropped_truncated
        assert total == self.received

    @invariant()
    def admission_bounds(self) -> None:
        assert len(self.demux.table) <= self.max_conns
        assert 0 <= self.demux.pending <= self.backlog


def test_demux_machine() -> None:
    run_state_machine_as_test(
        DemuxMachine,
        settings=settings(max_examples=200, stateful_step_count=30, deadline=None))


class DeferringDemuxMachine(DemuxMachine):
    """The same with deferred opening, as a listener's demultiplexer runs: at most
    ``open_per_turn`` connections per loop iteration (a ``turn``: the callbacks it scheduled),
    the batches past that held in arrival order and routed in later turns. The model does not
    know when a held batch is routed, only that held batches are routed whole, oldest first,
    and are counted in the memory budget while held: it routes, in order, every batch the
    demultiplexer no longer holds. It checks when the owner is asked to stop reading and to
    go on, and that reading never stays stopped with nothing to come."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduled: list[Callable[[], None]] = []
        #: Batches fed and held, oldest first, each with its cost in the memory budget.
        self.waiting: deque[tuple[Sequence[tuple[int, bytes | None]], int]] = deque()
        self.waiting_count = 0
        self.fed = 0
        self.held_max = 0
        #: For each datagram of the batch about to be fed: whether it is to be held.
        self.will_hold: list[bool] = []
        #: The owner was asked to stop reading (and not yet to go on).
        self.stopped = False

    @initialize(max_conns=st.integers(1, 4), backlog=st.integers(1, 4),
                queue_limit=st.integers(1, 4),
                memory_limit=st.none() | st.integers(DATAGRAM_OVERHEAD, 6 * DATAGRAM_OVERHEAD),
                open_per_turn=st.integers(1, 3), route_per_turn=st.integers(1, 6),
                held_max=st.integers(1, 6))
    def setup_deferring(self, *, max_conns: int, backlog: int, queue_limit: int,
                        memory_limit: int | None, open_per_turn: int, route_per_turn: int,
                        held_max: int) -> None:
        self.max_conns, self.backlog, self.queue_limit = max_conns, backlog, queue_limit
        self.memory_limit = memory_limit
        self.held_max = held_max
        self.demux = Demux(max_conns=max_conns, backlog=backlog, create=self._create,
                           pool=RxPool(memory_limit))
        self.demux.defer_opening(self.scheduled.append, on_held_full=self._held_full,
                                 on_held_room=self._held_room, open_per_turn=open_per_turn,
                                 route_per_turn=route_per_turn, held_max=held_max)

    def setup(self, max_conns: int, backlog: int, queue_limit: int,
              memory_limit: int | None) -> None:
        raise AssertionError("replaced by setup_deferring")

    def _held_full(self) -> None:
        assert not self.stopped, "asked to stop reading twice"
        self.stopped = True

    def _held_room(self) -> None:
        assert self.stopped, "asked to read again, never asked to stop"
        self.stopped = False

    def _before_feed(self, batch: Sequence[tuple[int, bytes | None]]) -> None:
        # Holding: datagrams are held, or the turn's share of openings is spent and the batch
        # has a new peer. Then a datagram is held if its peer is new or has datagrams held
        # (its order is kept); the others, from open connections, are routed at once.
        holding = self.waiting_count > 0 or (
            self.demux.open_left <= 0 and any(peer not in self.open for peer, _ in batch))
        waiting_peers = {peer for held, _ in self.waiting for peer, _ in held}
        self.will_hold = [holding and (peer in waiting_peers or peer not in self.open)
                          for peer, _ in batch]

    def _fed(self, batch: Sequence[tuple[int, bytes | None]]) -> int:
        self.fed += len(batch)
        now = [item for item, held in zip(batch, self.will_hold) if not held]
        later = [item for item, held in zip(batch, self.will_hold) if held]
        routed = 0
        if not later:
            routed = super()._fed(batch)  # (an empty batch is routed too: nothing happens)
        elif now:
            routed = super()._fed(now)
        if not later:
            assert self.waiting_count == self.demux.held_count
            return routed
        cost = sum(DATAGRAM_OVERHEAD + len(data or b"") for _, data in later)
        limit = self.memory_limit if self.memory_limit is not None else 2**63
        if self.buffered + self.held_cost + cost > limit:
            # No room in the budget: dropped, not held.
            self.received += len(later)
            self.dropped_memory += len(later)
        else:
            self.waiting.append((later, cost))
            self.waiting_count += len(later)
            self.held_cost += cost
            if self.waiting_count >= self.held_max or 2 * self.held_cost > limit:
                assert self.stopped, "held past the bound, reading not stopped"
        assert self.waiting_count == self.demux.held_count
        return routed

    def _catch_up(self) -> int:
        """Route, oldest first, the batches the demultiplexer no longer holds; how many."""
        routed = 0
        while self.waiting_count > self.demux.held_count:
            batch, cost = self.waiting.popleft()
            self.waiting_count -= len(batch)
            self.held_cost -= cost  # (out of the budget before it is routed)
            super()._fed(batch)
            routed += 1
        assert self.waiting_count == self.demux.held_count
        return routed

    @rule()
    def turn(self) -> None:
        """One loop iteration: the callbacks the demultiplexer scheduled run."""
        was_empty = self._emptiness()
        was_stopped = self.stopped
        callbacks = list(self.scheduled)
        self.scheduled.clear()
        for callback in callbacks:
            callback()
        routed = self._catch_up()
        assert not self.made, "create was called for a peer that was not admitted"
        self._check_wakes(was_empty, batches=routed)
        if self.waiting:
            assert self.scheduled, "held batches with no turn to come"
        limit = self.memory_limit if self.memory_limit is not None else 2**63
        if was_stopped:
            # Asked to go on once half of the bound was routed.
            assert self.stopped == (2 * self.waiting_count > self.held_max
                                    or 4 * self.held_cost > limit)

    @rule()
    def reader_wakes(self) -> None:
        """A wake-up of the owner's reader: a new iteration's share of openings."""
        self.demux.new_open_turn()

    @precondition(lambda self: not self.closed)
    @rule()
    def shut(self) -> None:
        """The owner closes: held datagrams are dropped (``closed``), new peers refused."""
        self.demux.closed = True
        self.demux.discard_held()
        self.closed = True
        self.stopped = False  # (the owner reads no more)
        for batch, _ in self.waiting:
            self.received += len(batch)
            self.dropped_closed += len(batch)
        self.waiting.clear()
        self.waiting_count = self.held_cost = 0

    @invariant()
    def every_datagram_routed_or_held(self) -> None:
        assert self.fed == self.received + self.demux.held_count

    @invariant()
    def reading_stops_only_while_something_is_to_come(self) -> None:
        assert not self.stopped or self.scheduled


def test_deferring_demux_machine() -> None:
    run_state_machine_as_test(
        DeferringDemuxMachine,
        settings=settings(max_examples=300, stateful_step_count=40, deadline=None))


# -- examples -------------------------------------------------------------------------------


def make_demux(max_conns: int = 8, backlog: int = 8, limit: int = 8
               ) -> tuple[Demux, dict[PeerKey, RxQueue], list[PeerKey]]:
    queues: dict[PeerKey, RxQueue] = {}
    woken: list[PeerKey] = []
    pool = RxPool()

    def create(key: PeerKey) -> RxQueue:
        queue = RxQueue(limit, wake=lambda: woken.append(key), pool=pool)
        queues[key] = queue
        return queue

    return Demux(max_conns=max_conns, backlog=backlog, create=create, pool=pool), queues, woken


def test_batch_from_a_slot_arena() -> None:
    """The receiver's layout: fixed-size slots in an mmap, one offset per slot."""
    demux, queues, woken = make_demux()
    slot = 16
    arena = mmap.mmap(-1, 8 * slot)
    try:
        peers = [0, 0, 3, 0, 3, 1]
        datagrams = [payload(peer, index, 3 + index) for index, peer in enumerate(peers)]
        for index, data in enumerate(datagrams):
            arena[index * slot:index * slot + len(data)] = data
        lengths = [len(d) for d in datagrams]
        demux.feed_batch([fresh_key(peer) for peer in peers],
                         slice_all(arena, [index * slot for index in range(8)], lengths), lengths)
    finally:
        arena.close()
    assert list(queues) == [PEER_KEYS[0], PEER_KEYS[3], PEER_KEYS[1]]
    assert list(queues[PEER_KEYS[0]].items) == [datagrams[0], datagrams[1], datagrams[3]]
    assert list(queues[PEER_KEYS[3]].items) == [datagrams[2], datagrams[4]]
    assert list(queues[PEER_KEYS[1]].items) == [datagrams[5]]
    assert woken == [PEER_KEYS[0], PEER_KEYS[3], PEER_KEYS[1]]
    assert demux.pending == 3


def test_refused_peer_does_not_stick_within_a_batch() -> None:
    """After a peer is refused, the next datagram of the same run is judged again, and a
    different peer in the same batch still gets through once there is room."""
    demux, queues, _ = make_demux(max_conns=1)
    demux.feed_batch([fresh_key(0), fresh_key(1), fresh_key(1), fresh_key(0)],
                     [b"a", b"b", b"c", b"d"], [1, 1, 1, 1])
    assert list(queues) == [PEER_KEYS[0]]
    assert list(queues[PEER_KEYS[0]].items) == [b"a", b"d"]
    assert demux.dropped_conn_limit == 2


def test_backlog_full_then_accept_admits_again() -> None:
    demux, queues, _ = make_demux(backlog=1)
    demux.feed_one(fresh_key(0), b"x")
    demux.feed_one(fresh_key(1), b"y")
    assert demux.dropped_backlog == 1
    demux.accepted()
    demux.feed_one(fresh_key(1), b"y")
    assert list(queues) == [PEER_KEYS[0], PEER_KEYS[1]]


def test_removed_peer_opens_a_new_connection() -> None:
    demux, _, _ = make_demux()
    created: list[RxQueue] = []
    original = demux.create

    def create(key: PeerKey) -> RxQueue | None:
        queue = original(key)
        assert queue is not None
        created.append(queue)
        return queue

    demux.create = create
    demux.feed_one(fresh_key(4), b"1")
    demux.accepted()
    demux.remove(fresh_key(4))
    demux.remove(fresh_key(4))  # unknown now: no-op
    demux.feed_one(fresh_key(4), b"2")
    assert len(created) == 2
    assert created[0] is not created[1]
    assert list(created[1].items) == [b"2"]


@pytest.mark.parametrize("known", [False, True])
def test_truncated_datagram_is_counted_never_delivered(known: bool) -> None:
    demux, queues, woken = make_demux()
    if known:
        demux.feed_one(fresh_key(2), b"ok")
        woken.clear()
    demux.feed_one(fresh_key(2), None)
    if known:
        queue = queues[PEER_KEYS[2]]
        # Counted on the connection, and in the listener-wide totals.
        assert (queue.dropped_truncated, demux.pool.dropped_truncated) == (1, 1)
        assert list(queue.items) == [b"ok"]
    else:
        # A truncated datagram from an unknown peer opens no connection.
        assert queues == {}
        assert demux.pool.dropped_truncated == 1
        assert demux.pending == 0
    assert woken == []


def test_paced_wakes_oldest_first_and_never_lost() -> None:
    """Task mode's paced wakes (WAKES_PER_TURN): a reader's turn wakes at most its share, the
    rest wait in line for turns scheduled one at a time (a reader's turn wakes nothing while
    the line is not empty), and what later batches touch waits behind them; a queue is in line
    at most once; a wake that raises loses no other wake."""
    woken: list[int] = []
    scheduled: list[Callable[[], None]] = []
    failing = 650

    def make(key: PeerKey) -> RxQueue:
        index = len(demux.table)  # the order of arrival

        def wake() -> bool:
            if index == failing:
                raise RuntimeError("wake failed")
            woken.append(index)
            return True  # a task was woken

        return RxQueue(8, wake)

    demux = Demux(max_conns=10_000, backlog=None, create=make, schedule=scheduled.append)
    keys = [key_from_address(socket.AF_INET, ("10.0.0.1", 1000 + i)) for i in range(700)]
    demux.new_turn()
    demux.feed_batch(keys[:600], [b"x"] * 600, [1] * 600)
    assert woken == list(range(WAKES_PER_TURN))
    assert len(scheduled) == 1
    assert len(demux.paced) == 600 - WAKES_PER_TURN
    # The next wake-up: its new queues wait behind the line, and so do the queues already in
    # line that get more datagrams (not twice).
    demux.new_turn()
    demux.feed_batch(keys[WAKES_PER_TURN:], [b"x"] * (700 - WAKES_PER_TURN),
                     [1] * (700 - WAKES_PER_TURN))
    assert woken == list(range(WAKES_PER_TURN))
    assert len(demux.paced) == 700 - WAKES_PER_TURN
    assert len(scheduled) == 1  # still the one turn
    scheduled.pop()()
    assert woken == list(range(2 * WAKES_PER_TURN))
    # The next turn reaches the failing wake: it raises, and the rest get a turn all the same.
    with pytest.raises(RuntimeError, match="wake failed"):
        scheduled.pop()()
    assert woken == list(range(failing))
    assert len(scheduled) == 1
    scheduled.pop()()
    assert not scheduled
    assert not demux.paced
    assert woken == [index for index in range(700) if index != failing]
    assert demux.woken == 700


def test_a_queue_half_full_in_line_is_woken_at_once() -> None:
    """A queue whose wake waits in line and that fills half-way is woken out of turn (counted
    in ``urgent``); its place in line then costs nothing (its task took the datagrams)."""
    woken: list[int] = []
    scheduled: list[Callable[[], None]] = []
    queues: list[RxQueue] = []

    def make(key: PeerKey) -> RxQueue:
        index = len(demux.table)

        def wake() -> bool:
            woken.append(index)
            return True

        queue = RxQueue(8, wake)
        queues.append(queue)
        return queue

    demux = Demux(max_conns=10_000, backlog=None, create=make, schedule=scheduled.append)
    keys = [key_from_address(socket.AF_INET, ("10.0.0.1", 1000 + i)) for i in range(300)]
    demux.new_turn()
    demux.feed_batch(keys, [b"x"] * 300, [1] * 300)
    assert woken == list(range(WAKES_PER_TURN))
    last = keys[-1]  # in line; limit 8: half full at its 4th datagram
    demux.new_turn()
    demux.feed_batch([last] * 2 + keys[:2], [b"x"] * 4, [1] * 4)
    assert demux.urgent == 0
    demux.feed_batch([last, *keys[:1]], [b"x"] * 2, [1] * 2)
    assert demux.urgent == 1
    assert woken[-1] == 299
    queues[299].items.clear()  # its task took them
    del woken[:]
    scheduled.pop()()
    assert woken == list(range(WAKES_PER_TURN, 299))  # no wake for the emptied queue


@dataclass
class Deferring:
    """A demultiplexer with deferred opening and the loop played by hand: ``turn()`` runs the
    callbacks it scheduled (one loop iteration). Its peers are ``keys``, its connections'
    queues (limit 100, sharing the demultiplexer's pool) ``queues``."""

    demux: Demux
    queues: dict[PeerKey, RxQueue]
    scheduled: list[Callable[[], None]]
    keys: list[PeerKey]

    def turn(self) -> None:
        callbacks = list(self.scheduled)
        self.scheduled.clear()
        for callback in callbacks:
            callback()

    def items(self, peer: int) -> list[bytes]:
        return list(self.queues[self.keys[peer]].items)


def deferring(*, pool: RxPool | None = None, peers: int = 30,
              create: Callable[[PeerKey], RxQueue | None] | None = None,
              on_held_full: Callable[[], None] = lambda: None,
              on_held_room: Callable[[], None] = lambda: None, open_per_turn: int = 1,
              route_per_turn: int = 4096, held_max: int = 32768) -> Deferring:
    scheduled: list[Callable[[], None]] = []
    queues: dict[PeerKey, RxQueue] = {}
    shared = pool if pool is not None else RxPool()

    def make(key: PeerKey) -> RxQueue:
        queue = queues[key] = RxQueue(100, pool=shared)
        return queue

    demux = Demux(max_conns=100, backlog=None, create=create or make, pool=shared)
    demux.defer_opening(scheduled.append, on_held_full=on_held_full, on_held_room=on_held_room,
                        open_per_turn=open_per_turn, route_per_turn=route_per_turn,
                        held_max=held_max)
    keys = [key_from_address(socket.AF_INET, ("10.0.0.1", 1000 + i)) for i in range(peers)]
    return Deferring(demux, queues, scheduled, keys)


def test_deferred_opening_holds_past_the_turns_share_and_keeps_order() -> None:
    """With deferred opening: once a turn opened its share of connections, a new peer's
    datagrams are held, and so are the later datagrams of every peer with datagrams held
    (their order is kept), while those of peers whose connections are open are routed at
    once; later turns open their share each, and route at most ``route_per_turn`` datagrams
    of held batches."""
    d = deferring(open_per_turn=3, route_per_turn=4)
    demux, queues, keys, turn, items = d.demux, d.queues, d.keys, d.turn, d.items

    def feed(peers: list[int], tag: bytes) -> None:
        demux.feed_batch([keys[i] for i in peers], [tag] * len(peers), [len(tag)] * len(peers))

    feed([0, 1], b"a")  # opens 2
    feed([2, 3], b"a")  # one left as the batch began: opens both (one past the share)
    assert len(queues) == 4 and demux.held_count == 0
    feed([0, 1], b"b")  # known peers only: routed
    feed([4, 0], b"c")  # a new peer past the share: held; the known peer's datagram is not
    feed([1], b"c")
    assert demux.held_count == 1 and len(queues) == 4
    assert items(0) == items(1) == [b"a", b"b", b"c"]
    # (The pool counts what the queues hold and what is held.)
    assert demux.pool.buffered == 9 * (1 + DATAGRAM_OVERHEAD)
    feed([5, 6, 7, 8, 9], b"d")
    feed([5], b"e")  # behind its held datagram
    assert demux.held_count == 7
    # A turn: [4] opens one (two left), then [5..9] (routed whole: it opens five), and the
    # datagrams routed reached route_per_turn: [5] waits for the next turn.
    turn()
    assert all(key in queues for key in keys[:10])
    assert items(4) == [b"c"] and items(5) == [b"d"]
    assert demux.held_count == 1 and d.scheduled
    feed([5, 0], b"x")  # 5 has a datagram held: held behind it; 0 is routed
    assert items(5) == [b"d"] and items(0) == [b"a", b"b", b"c", b"x"]
    turn()
    assert items(5) == [b"d", b"e", b"x"]
    assert demux.held_count == 0
    assert demux.pool.rx_packets == 17 and demux.pool.buffered == 17 * (1 + DATAGRAM_OVERHEAD)
    # A new turn's share: three new peers, one batch each; the fourth is held, the next
    # datagram of an open peer is not. The next turn opens it.
    for peer in (10, 11, 12, 13):
        feed([peer], b"f")
    feed([10], b"g")
    assert keys[13] not in queues and demux.held_count == 1
    assert items(10) == [b"f", b"g"]
    turn()
    assert items(13) == [b"f"]
    assert demux.held_count == 0
    turn()
    assert not d.scheduled


def test_deferred_opening_bounds_what_it_holds() -> None:
    """Past ``held_max`` datagrams, or half the memory budget, held, the owner is asked to stop
    reading, and to go on once half of that was routed; a batch the budget has no room for is
    dropped (``memory_limit``), not held."""
    calls: list[str] = []
    cost = 10 + DATAGRAM_OVERHEAD
    pool = RxPool(20 * cost)
    d = deferring(pool=pool, on_held_full=lambda: calls.append("full"),
                  on_held_room=lambda: calls.append("room"), held_max=4)
    demux, queues, keys, turn = d.demux, d.queues, d.keys, d.turn
    for key in keys[:4]:
        demux.feed_batch([key], [b"x" * 10], [10])
    assert demux.held_count == 3 and not calls
    demux.feed_batch([keys[4]], [b"x" * 10], [10])
    assert demux.held_count == 4 and calls == ["full"]
    turn()  # one new connection per turn: 3 held, more than half of 4
    assert demux.held_count == 3 and calls == ["full"]
    turn()
    assert demux.held_count == 2 and calls == ["full", "room"]
    turn()
    turn()
    assert demux.held_count == 0 and len(queues) == 5
    assert not d.scheduled
    # Half the memory budget held (10 of 20 datagrams' worth): stop.
    del calls[:]
    demux.defer_opening(d.scheduled.append, on_held_full=lambda: calls.append("full"),
                        on_held_room=lambda: calls.append("room"), open_per_turn=1,
                        held_max=1000)
    demux.feed_batch([keys[5]], [b"x" * 10], [10])
    for key in keys[6:16]:
        demux.feed_batch([key], [b"x" * 10], [10])
    assert demux.held_count == 10 and calls == [] and pool.buffered == 16 * cost
    demux.feed_batch([keys[16]], [b"x" * 10], [10])
    assert demux.held_count == 11 and calls == ["full"]
    # The budget's room: three more; a batch of four has none and is dropped whole.
    demux.feed_batch(keys[17:21], [b"x" * 10] * 4, [10] * 4)
    assert demux.held_count == 11 and pool.dropped_memory == 4
    demux.feed_batch(keys[17:20], [b"x" * 10] * 3, [10] * 3)
    assert demux.held_count == 14 and pool.buffered == 20 * cost
    # Routed as their connections open, one per turn: once a quarter of the budget or less
    # is held (5 datagrams' worth, after 9 turns), go on.
    for _ in range(8):
        turn()
    assert demux.held_count == 6 and calls == ["full"]
    turn()
    assert demux.held_count == 5 and calls == ["full", "room"]
    for _ in range(5):
        turn()
    assert calls == ["full", "room"] and demux.held_count == 0 and not d.scheduled
    assert pool.rx_packets == 20 and pool.dropped_memory == 4


def test_deferred_opening_one_datagram_at_a_time_and_closing() -> None:
    """``feed_one`` (the loop's own transport, truncated datagrams) is held the same way; the
    owner's close drops what is held, counted as ``closed``."""
    d = deferring()
    demux, queues, keys = d.demux, d.queues, d.keys
    demux.feed_one(keys[0], b"a")
    demux.feed_one(keys[1], b"b")  # past the share: held
    demux.feed_one(keys[1], None)  # truncated, from a peer with a datagram held: held too
    demux.feed_one(keys[1], b"c")
    demux.feed_one(keys[0], b"d")  # an open connection's: routed at once
    assert demux.held_count == 3 and d.items(0) == [b"a", b"d"]
    d.turn()
    assert demux.held_count == 0
    assert d.items(1) == [b"b", b"c"] and queues[keys[1]].dropped_truncated == 1
    demux.feed_one(keys[2], b"e")  # the turn's share was spent opening 1: held
    demux.feed_batch([keys[2], keys[1]], [b"f", b"g"], [1, 1])
    assert demux.held_count == 2 and d.items(1) == [b"b", b"c", b"g"]
    demux.closed = True
    demux.discard_held()
    assert demux.held_count == 0 and demux.dropped_closed == 2
    assert demux.pool.buffered == 5 * (1 + DATAGRAM_OVERHEAD)


def test_deferred_opening_one_datagram_keeps_an_opened_peers_order() -> None:
    """A peer whose connection was opened from held datagrams, with more of them still held:
    its next datagram fed alone waits behind them."""
    d = deferring(route_per_turn=1)
    demux, keys = d.demux, d.keys
    demux.feed_one(keys[0], b"a")
    demux.feed_one(keys[1], b"b")  # past the share: held
    demux.feed_one(keys[1], b"c")
    d.turn()  # one datagram per turn: 1 is open, its "c" still held
    assert d.items(1) == [b"b"] and demux.held_count == 1
    demux.feed_one(keys[1], b"d")
    demux.feed_batch([keys[1]], [b"e"], [1])
    assert d.items(1) == [b"b"] and demux.held_count == 3
    for _ in range(4):
        d.turn()
    assert d.items(1) == [b"b", b"c", b"d", b"e"] and demux.held_count == 0


def test_deferred_opening_routes_known_peers_past_the_share_and_stops_at_a_new_one() -> None:
    """Within a turn whose share of connections is spent, held batches from known peers are
    still routed; the first held batch with a new peer waits for the next turn, and so does
    everything behind it."""
    d = deferring(open_per_turn=2)
    demux, queues, keys = d.demux, d.queues, d.keys
    for peer, tag in ((0, b"a"), (1, b"a"), (2, b"a"), (3, b"a"), (2, b"b"), (4, b"a"),
                      (3, b"b")):
        demux.feed_batch([keys[peer]], [tag], [1])
    assert set(queues) == {keys[0], keys[1]} and demux.held_count == 5
    d.turn()
    # Opened 2 and 3 (the share), routed 2's second datagram, and stopped at 4: 3's second
    # waits behind it.
    assert keys[3] in queues and keys[4] not in queues
    assert d.items(2) == [b"a", b"b"] and d.items(3) == [b"a"]
    assert demux.held_count == 2
    d.turn()
    assert d.items(4) == [b"a"] and d.items(3) == [b"a", b"b"]


def test_deferred_opening_counts_refused_peers_and_schedules_nothing_to_open() -> None:
    """A peer refused as its connection is made (a protocol closing it in connection_made, a
    failing factory) cost as much to make: it counts against the turn's share. Opening within
    the share schedules no callback (a loop iteration each, for a server that sees a new peer
    per request); the share starts again at the owner's next reader wake-up."""
    d = deferring(create=lambda key: None, open_per_turn=2)
    demux, keys = d.demux, d.keys
    demux.feed_batch(keys[:1], [b"a"], [1])
    assert demux.dropped_refused == 1 and not d.scheduled
    demux.feed_batch(keys[1:2], [b"a"], [1])
    demux.feed_batch(keys[2:3], [b"a"], [1])
    assert demux.dropped_refused == 2 and demux.held_count == 1
    demux.new_open_turn()  # the reader's next wake-up
    demux.feed_batch(keys[3:4], [b"a"], [1])  # behind the held one
    assert demux.held_count == 2 and len(d.scheduled) == 1
    d.turn()
    assert demux.dropped_refused == 4 and demux.held_count == 0 and not d.scheduled
