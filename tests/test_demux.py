"""Properties of the demultiplexer (``udpx._demux``): routing by peer key, admission of new
peers, drop accounting and wake-ups. No socket, no loop: batches are built in memory."""

from __future__ import annotations

import mmap
import socket
from collections import deque
from collections.abc import Callable
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
        #: Connections the model expects ``create`` to be called for, in order.
        self.creations: deque[Conn] = deque()

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
        assert self.creations, f"unexpected create({key!r})"
        conn = self.creations.popleft()
        assert peer_of_key(key) == conn.peer
        conn.queue = RxQueue(self.queue_limit, wake=lambda: conn.wakes.append(len(conn.rx)),
                             pool=demux.pool)
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
            if len(self.open) >= self.max_conns:
                self.dropped_conn_limit += 1
                return
            if len(self.pending) >= self.backlog:
                self.dropped_backlog += 1
                return
            conn = Conn(peer)
            self.open[peer] = conn
            self.conns.append(conn)
            self.pending.append(conn)
            self.creations.append(conn)
        if len(conn.expected) >= self.queue_limit:
            conn.dropped_full += 1
            return
        cost = len(data) + DATAGRAM_OVERHEAD
        if self.memory_limit is not None and self.buffered + cost > self.memory_limit:
            self.dropped_memory += 1
            return
        self.buffered += cost
        conn.expected.append(data)
        conn.delivered += 1
        conn.delivered_bytes += len(data)

    def _make(self, peer: int, size: int) -> bytes:
        self.serial += 1
        return payload(peer, self.serial, size)

    def _check_wakes(self, was_empty: dict[int, bool]) -> None:
        """Each queue that went from empty to non-empty is woken exactly once, after the whole
        call; no other queue is woken."""
        for conn in self.conns:
            became_non_empty = was_empty.get(id(conn), True) and bool(conn.expected)
            assert conn.wakes == ([len(conn.expected)] if became_non_empty else []), conn
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
        for peer, data in datagrams:
            self._route(peer, data)
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
        assert not self.creations, "create was not called for an admitted peer"
        self._check_wakes(was_empty)

    @rule(peer=st.sampled_from(PEERS), size=st.none() | st.integers(0, 12))
    def feed_one(self, peer: int, size: int | None) -> None:
        was_empty = self._emptiness()
        data = None if size is None else self._make(peer, size)
        self._route(peer, data)
        self.demux.feed_one(fresh_key(peer), data)
        assert not self.creations, "create was not called for an admitted peer"
        self._check_wakes(was_empty)

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
        assert pool.buffered == self.buffered
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
                + pool.rx_packets + pool.dropped_full + pool.dropped_truncated
                + pool.dropped_memory) == self.received
        total = (demux.dropped_backlog + demux.dropped_conn_limit + pool.dropped_memory
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
