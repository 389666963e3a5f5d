"""The demultiplexer: routes datagrams to connections by peer key. No I/O, no asyncio.

A peer key is derived from the raw socket address without building a ``(host, port)`` tuple:
for IPv4 it is one integer (the first eight bytes of the ``sockaddr_in``), for IPv6 the bytes of
the ``sockaddr_in6`` (see ``_sockets``). The demultiplexer only needs keys to be hashable and
equal for equal peers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ._queue import DATAGRAM_OVERHEAD, ProtocolRxQueue, RxPool, RxQueue

__all__ = ["Demux", "PeerKey"]

#: A peer's key: for IPv4 the first 8 bytes of its ``sockaddr_in`` as one native-order int, for
#: IPv6 the 28 bytes of its ``sockaddr_in6`` (see ``_sockets``). Equal for equal peers; no
#: ``(host, port)`` tuple is built to make one.
PeerKey = int | bytes

# Placeholders for "no peer yet" in the hot loop, so that it needs no None checks.
_NO_KEY = object()
_NO_QUEUE = RxQueue(1)
_NO_LIST: list[bytes] = []


#: Task mode: tasks a reader wake-up wakes at most; the connections past it wait in line
#: (``Demux.paced``, each at most once) and are woken in later loop iterations, this many per
#: iteration, oldest first; while the line is not empty a reader wake-up wakes none itself,
#: and a queue that fills half-way while in line is woken at once (``urgent``). Waking a task
#: costs a few microseconds and makes an object (the loop's handle) that lives until the task
#: runs; a wake-up that read 1,024 datagrams from as many peers woke 1,024 tasks at once,
#: past CPython's first-generation threshold (700 new objects): the collector then ran at
#: every wake-up and moved the thousands of futures and coroutines of waiting receivers into
#: older generations, to be visited again and again (a quarter of the CPU, at 10,000 peers).
#: Paced, they die young, and a connection whose turn comes later takes, with one wake-up,
#: every datagram that arrived for it meanwhile: under a flood from thousands of peers, the
#: cost of a wake-up is shared by several datagrams instead of paid by each.
WAKES_PER_TURN = 256

#: A turn's size when wakes are not paced: more than any batch touches.
_UNPACED = 1 << 62

#: Connections a listener opens at most per loop iteration. Opening one costs several µs
#: (its protocol or task side, its queue, ``connection_made``), twenty times what reading and
#: routing a datagram costs. A flood of new peers (10,000 at once) took the reader 50-70 ms
#: of opening, a wake-up of 1,024 new peers at a time, while the kernel's buffer (which
#: charges 832 bytes for a 64-byte datagram) filled and overflowed. Past this many in one
#: iteration, new peers' datagrams are held (``Demux.held``) in arrival order, and opened in
#: later iterations, this many each; the reader meanwhile keeps the kernel's buffer drained,
#: and the datagrams of peers whose connections are open go on being routed at once.
OPEN_PER_TURN = 256

#: Datagrams of held batches routed at most per loop iteration, whatever they open: more than
#: a reader's wake-up reads (MAX_DATAGRAMS_PER_WAKEUP), so that what is held shrinks once the
#: connections are open.
ROUTE_PER_TURN = 4096

#: Datagrams held at most before the owner is asked to stop reading (``on_held_full``) until
#: half of them were routed: what arrives meanwhile waits in the kernel's buffer, or is
#: dropped there. A spoofed flood of new peers would otherwise fill the memory budget
#: (``rx_memory_limit``) with datagrams that each cost an opening (about 5 µs: 32,768 take
#: about 0.16 s), while a known peer's datagrams wait in the kernel's buffer whenever reading
#: stops. Half the memory budget is the other bound. (A 10,000-peer flood held 8,000-15,000
#: at its peak.)
HELD_MAX = 32768


def _always_valid(key: PeerKey) -> bool:
    return True


def _do_nothing() -> None:
    return None


def _budget_cost(datagrams: Sequence[bytes | None], lengths: Sequence[int] | None) -> int:
    """What held datagrams take of the memory budget, as queued ones do."""
    if lengths is None:  # one, fed alone (None: truncated)
        return DATAGRAM_OVERHEAD + len(datagrams[0] or b"")
    return sum(lengths) + len(lengths) * DATAGRAM_OVERHEAD


def _no_schedule(callback: Callable[[], None]) -> None:
    raise AssertionError("wakes are not paced: nothing waits for a turn")


class Demux:
    """Peer table, admission of new peers and listener-level drop accounting.

    ``create(key)`` is called for a datagram from an unknown peer once admission allows it
    (a valid source, fewer than ``max_conns`` open, fewer than ``backlog`` not yet accepted); it
    returns the new connection's receive queue, or None when the connection refused the peer
    as it was made (a protocol-mode connection closed in ``connection_made``), which counts as
    ``dropped_refused``, or as the counter ``create`` named in ``refusal`` before returning
    (``dropped_fd_limit``: no file descriptor left for a connected-mode socket). Within one
    batch a refused peer is asked once: its other datagrams in the batch are counted the
    same way. The owner calls ``accepted()`` when a connection leaves the backlog
    (``backlog=None``: there is none, connections are handed over as they are made) and
    ``remove(key)`` when a connection closes, so that the peer's next datagram opens a new
    connection.

    ``valid(key)`` vets a new peer's source (port 0 is never a real peer: answering it fails);
    refused ones count as ``dropped_bad_source``. ``on_pressure()`` is called when the table
    reaches ``pressure_mark`` entries, so the owner can reap idle connections sooner.
    All receive queues share ``pool``, which counts every datagram they are fed.

    After ``defer_opening(loop.call_soon)`` it opens at most ``open_per_turn`` connections per
    loop iteration (OPEN_PER_TURN): once that many were opened, the datagrams of new peers,
    and the later datagrams of every peer with datagrams held, are held (``held``, in arrival
    order, their bytes counted in ``pool``'s budget) and routed in later iterations
    (``route_per_turn`` datagrams at most each); those of peers whose connections are open
    are routed at once. Before, every new peer's connection is opened as its first datagram
    is routed. Once ``held_max`` datagrams, or half the budget, are held, ``on_held_full()``
    asks the owner to stop reading, and ``on_held_room()`` to go on once half of that was
    routed. Datagrams that the budget has no room left for are dropped (``dropped_memory``),
    as a queue would drop them.
    """

    __slots__ = ("_defer", "_feed_mixed", "_held_cost", "_held_max", "_held_per_peer",
                 "_on_held_full", "_on_held_room", "_open_per_turn", "_paced_scheduled",
                 "_route_per_turn", "_schedule", "_turn", "_work_due", "backlog", "closed",
                 "create", "dropped_backlog", "dropped_bad_source", "dropped_closed",
                 "dropped_conn_limit", "dropped_fd_limit", "dropped_refused", "held", "held_count",
                 "held_full", "max_conns", "on_pressure", "open_left", "paced", "pending", "pool",
                 "pressure_mark", "refusal", "table", "urgent", "valid", "wakes_left", "woken")

    def __init__(self, *, max_conns: int, backlog: int | None,
                 create: Callable[[PeerKey], RxQueue | None], pool: RxPool | None = None,
                 valid: Callable[[PeerKey], bool] = _always_valid,
                 pressure_mark: int | None = None,
                 on_pressure: Callable[[], None] = _do_nothing, protocol: bool = False,
                 schedule: Callable[[Callable[[], None]], object] | None = None) -> None:
        self.table: dict[PeerKey, RxQueue] = {}
        # ``protocol``: every queue is a ProtocolRxQueue, delivered to as the batch ends.
        self._feed_mixed = self._feed_mixed_protocol if protocol else self._feed_mixed_tasks
        self.max_conns = max_conns
        # No backlog: an unreachable bound, and ``pending`` stays 0.
        self.backlog = backlog if backlog is not None else -1
        self.create = create
        self.pool = pool if pool is not None else RxPool()
        self.valid = valid
        self.pressure_mark = pressure_mark if pressure_mark is not None else max_conns + 1
        self.on_pressure = on_pressure
        #: Connections created and not yet accepted.
        self.pending = 0
        self.dropped_backlog = 0
        self.dropped_conn_limit = 0
        self.dropped_bad_source = 0
        self.dropped_refused = 0
        #: New peers refused because no file descriptor was left for their own socket
        #: (connected mode: create() names this reason in ``refusal``).
        self.dropped_fd_limit = 0
        #: New peers' datagrams that arrived after the owner closed (``closed``): a callback
        #: closed the listener in the middle of a batch.
        self.dropped_closed = 0
        self.closed = False
        #: Why admit() last refused a peer (the counter's name), for feed_batch_refused().
        self.refusal = ""
        #: Task mode: queues that a batch of several peers made non-empty (each wakes a task),
        #: a running total for the reader (``BatchReader.spread``).
        self.woken = 0
        #: Task mode, paced wakes (see WAKES_PER_TURN and ``pace``): the queues whose wake
        #: waits for a later turn, oldest first, and what the current turn may still wake.
        #: Not paced, a turn has no end: every wake at once.
        self.paced: deque[RxQueue] = deque()
        self._schedule: Callable[[Callable[[], None]], object] = _no_schedule
        self._turn = self.wakes_left = _UNPACED
        self._paced_scheduled = False
        if schedule is not None:
            self.pace(schedule)
        #: Task mode: queues woken out of turn, half full (a running total, for the reader).
        self.urgent = 0
        #: Batches held until their new peers' connections may be opened (see
        #: ``defer_opening``): (keys, datagrams, lengths), or ([key], [datagram or None],
        #: None) for one fed alone.
        self.held: deque[tuple[Sequence[PeerKey], Sequence[Any], Sequence[int] | None]] = (
            deque())
        #: Datagrams held, and their cost in the pool's budget.
        self.held_count = 0
        self._held_cost = 0
        #: How many datagrams each peer has held: its next ones are held behind them.
        self._held_per_peer: dict[PeerKey, int] = {}
        #: Connections this loop iteration may still open before batches with new peers are
        #: held (until ``defer_opening``: an unreachable bound).
        self.open_left = _UNPACED
        self._open_per_turn = self._route_per_turn = self._held_max = _UNPACED
        self._defer: Callable[[Callable[[], None]], object] = _no_schedule
        self._on_held_full = self._on_held_room = _do_nothing
        #: The owner was asked to stop reading (``on_held_full``), and not yet to go on.
        self.held_full = False
        # A callback that routes held batches is scheduled.
        self._work_due = False

    @property
    def overflowed(self) -> int:
        """Datagrams dropped because a queue or the memory budget was full (a running total,
        for the reader: ``BatchReader.spread``)."""
        return self.pool.dropped_full + self.pool.dropped_memory

    def admit(self, key: PeerKey) -> RxQueue | None:
        """Create the connection for a new peer, or count why it cannot be created."""
        if self.closed:
            self.dropped_closed += 1
            self.refusal = "dropped_closed"
            return None
        if not self.valid(key):
            self.dropped_bad_source += 1
            self.refusal = "dropped_bad_source"
            return None
        if len(self.table) >= self.max_conns:
            self.dropped_conn_limit += 1
            self.refusal = "dropped_conn_limit"
            return None
        backlog = self.backlog
        if self.pending >= backlog >= 0:
            self.dropped_backlog += 1
            self.refusal = "dropped_backlog"
            return None
        self.refusal = "dropped_refused"  # unless create() names another reason
        # (Counted before: a connection refused as it is made cost as much to make.)
        self.open_left -= 1
        queue = self.create(key)
        if queue is None:
            self.feed_batch_refused(1)
            return None
        self.table[key] = queue
        if backlog >= 0:
            self.pending += 1
        if len(self.table) == self.pressure_mark:
            self.on_pressure()
        return queue

    def defer_opening(self, schedule: Callable[[Callable[[], None]], object], *,
                      on_held_full: Callable[[], None] = _do_nothing,
                      on_held_room: Callable[[], None] = _do_nothing,
                      open_per_turn: int = OPEN_PER_TURN, route_per_turn: int = ROUTE_PER_TURN,
                      held_max: int = HELD_MAX) -> None:
        """Open at most ``open_per_turn`` connections per loop iteration from now on, holding
        what arrives past that (see the class's docstring); ``schedule(callback)`` runs
        ``callback`` in the loop's next iteration (``loop.call_soon``)."""
        self._defer = schedule
        self._on_held_full = on_held_full
        self._on_held_room = on_held_room
        self._open_per_turn = self.open_left = open_per_turn
        self._route_per_turn = route_per_turn
        self._held_max = held_max

    def accepted(self) -> None:
        """One connection left the backlog."""
        self.pending -= 1

    def remove(self, key: PeerKey) -> None:
        """Forget a closed connection's peer (no-op if unknown)."""
        self.table.pop(key, None)

    def feed_batch(self, keys: Sequence[PeerKey] | None, datagrams: Sequence[bytes],
                   lengths: Sequence[int]) -> None:
        """Route one received batch: datagram i is ``datagrams[i]``, ``lengths[i]`` bytes long,
        from peer ``keys[i]``.

        Every datagram ends up queued on its peer's connection or counted as a drop. Each queue
        that became non-empty is woken once, after the whole batch.
        """
        # Hot path, run for every datagram a listener receives.
        assert keys is not None  # a listener's socket is unconnected: every datagram has one
        if self.held_count or (self.open_left <= 0 and None in map(self.table.get, keys)):
            # Datagrams are held, or this batch has a new peer and the iteration opened its
            # share of connections.
            self._split(keys, datagrams, lengths)
            return
        self._route(keys, datagrams, lengths)

    def _split(self, keys: Sequence[PeerKey], datagrams: Sequence[bytes],
               lengths: Sequence[int]) -> None:
        """While new peers wait for their connections: hold the batch's datagrams from new
        peers and from peers with datagrams held (their order is kept), and route the others,
        from peers whose connections are open, now."""
        table = self.table
        waiting = self._held_per_peer
        held_keys: list[PeerKey] = []
        held_data: list[bytes] = []
        held_lengths: list[int] = []
        keys_now: list[PeerKey] = []
        data_now: list[bytes] = []
        lengths_now: list[int] = []
        for key, data, length in zip(keys, datagrams, lengths):
            if key in waiting or key not in table:
                held_keys.append(key)
                held_data.append(data)
                held_lengths.append(length)
            else:
                keys_now.append(key)
                data_now.append(data)
                lengths_now.append(length)
        if keys_now:
            self._route(keys_now, data_now, lengths_now)
        if held_keys:
            self._hold(held_keys, held_data, held_lengths)

    def _route(self, keys: Sequence[PeerKey], datagrams: Sequence[bytes],
               lengths: Sequence[int]) -> None:
        count = len(lengths)
        if count > 1 and keys[-1] == keys[0] and keys.count(keys[0]) == count:
            # A whole batch from one peer (a bulk sender, a dialed client): one lookup and one
            # list comprehension, as for a connected socket. (The first and last keys rule
            # out most batches of many peers without a comparison per datagram.)
            queue = self.table.get(keys[0])
            if queue is None:
                queue = self.admit(keys[0])
            if queue is None:
                # admit() counted one drop; the rest of the batch is refused the same way.
                self.feed_batch_refused(count - 1)
            else:
                queue.put_batch(datagrams, lengths)
            return
        self._feed_mixed(keys, datagrams, lengths)

    def _feed_mixed_tasks(self, keys: Sequence[PeerKey], datagrams: Sequence[bytes],
                          lengths: Sequence[int]) -> None:
        # Mixed peers: locals only, the lookup skipped within runs of one peer, no per-datagram
        # call except the slice; the pool's totals are added once, after the batch.
        table_get = self.table.get
        pool = self.pool
        buffered = start = pool.buffered
        memory_limit = pool.limit - DATAGRAM_OVERHEAD  # compared with buffered + length
        delivered = dropped_full = dropped_memory = 0
        touched: list[RxQueue] = []
        urgent: list[RxQueue] = []
        last_key: object = _NO_KEY
        current = _NO_QUEUE
        items = current.items
        limit = urgent_depth = 0
        refused: dict[PeerKey, str] = {}
        for key, data, length in zip(keys, datagrams, lengths):
            if key != last_key:
                found = table_get(key)
                if found is None:
                    found = self._admit_once(key, refused)
                    if found is None:
                        last_key = _NO_KEY
                        continue
                current = found
                last_key = key
                items = found.items
                limit = found.limit
                urgent_depth = (limit - 1) >> 1
            depth = len(items)
            if depth >= limit:
                current.dropped_full += 1
                dropped_full += 1
                continue
            if buffered + length > memory_limit:
                dropped_memory += 1
                continue
            if not depth:
                touched.append(current)
            if depth == urgent_depth:
                urgent.append(current)
            items.append(data)
            buffered += length + DATAGRAM_OVERHEAD
            if length == current.rx_size:
                current.rx_packets += 1
            else:
                current.count_rx(1, length)
            delivered += 1
        # Bytes delivered, from the budget's growth: one addition less per datagram.
        pool.rx_bytes += buffered - start - delivered * DATAGRAM_OVERHEAD
        # (Added, not assigned: the budget may have changed meanwhile, if a connection's
        # creation closed the owner, which drops what is held.)
        pool.buffered += buffered - start
        pool.rx_packets += delivered
        pool.dropped_full += dropped_full
        pool.dropped_memory += dropped_memory
        self.woken += len(touched)
        if len(touched) <= self.wakes_left and not self.paced:
            self.wakes_left -= len(touched)
            for queue in touched:
                queue.wake()
            return
        self._pace(touched)
        for queue in urgent:
            if queue.turn_waiting:
                # Half full while it waits for its turn: it cannot wait any longer without
                # overflowing (its place in line stays, harmless: it finds nothing to do).
                self.urgent += 1
                queue.wake()

    def pace(self, schedule: Callable[[Callable[[], None]], object]) -> None:
        """Pace wakes from now on (see WAKES_PER_TURN); ``schedule(callback)`` runs
        ``callback`` in the loop's next iteration (``loop.call_soon``)."""
        self._schedule = schedule
        self._turn = self.wakes_left = WAKES_PER_TURN

    def new_turn(self) -> None:
        """A reader wake-up begins: it may wake a turn's worth of tasks, or none while older
        wakes wait for their turns (one turn per loop iteration, theirs)."""
        self.wakes_left = 0 if self.paced else self._turn

    def _pace(self, touched: list[RxQueue]) -> None:
        """Wake what this turn still may, oldest first; the rest waits for later turns."""
        paced = self.paced
        append = paced.append
        for queue in touched:
            if not queue.turn_waiting:
                queue.turn_waiting = True
                append(queue)
        self.wakes_left = self._wake_paced(self.wakes_left)
        if paced and not self._paced_scheduled:
            self._paced_scheduled = True
            self._schedule(self._paced_turn)

    def _wake_paced(self, count: int) -> int:
        """Wake up to ``count`` waiting tasks of paced queues, oldest first; returns how many
        more may be. A queue emptied meanwhile (its task or ``recv_nowait`` took its
        datagrams), or with no task waiting, costs no wake."""
        paced = self.paced
        popleft = paced.popleft
        while count and paced:
            queue = popleft()
            queue.turn_waiting = False
            # (A closed connection's queue no longer wakes anyone.)
            if queue.items and queue.wake():
                count -= 1
        return count

    def _paced_turn(self) -> None:
        """A loop iteration's turn for the paced queues, until none is left."""
        self._paced_scheduled = False
        try:
            self._wake_paced(WAKES_PER_TURN)
        finally:
            # Whatever happened, the rest keep their turns: a wake is never lost.
            if self.paced:
                self._paced_scheduled = True
                self._schedule(self._paced_turn)

    def _feed_mixed_protocol(self, keys: Sequence[PeerKey], datagrams: Sequence[bytes],
                             lengths: Sequence[int]) -> None:
        # Protocol mode, mixed peers (hot path: many busy peers land here). Delivery is
        # synchronous, after the routing, so nothing is queued, limited or budgeted per
        # datagram: each connection's datagrams are collected in a plain list, and each
        # connection is counted and delivered to once (ProtocolRxQueue.flush). The run-of-one-
        # peer lookup repeats _feed_mixed_tasks' on purpose: a shared helper would cost a call
        # per datagram.
        table_get = self.table.get
        # Every datagram from a different known peer, the usual batch with thousands of peers:
        # lookups in C, one delivery per datagram. Both tests use one set of the queues found
        # (None for an unknown peer): the set is needed for the distinct test anyway, and
        # ``None in`` a list compares each queue with None (measured: 36 ns per datagram
        # against 100 for set(keys) when IPv4 keys began with the address family, and 28 for
        # the list test).
        queues = list(map(table_get, keys))
        distinct = set(queues)
        if len(distinct) == len(queues) and None not in distinct:
            self._deliver_distinct(queues, datagrams, lengths)  # type: ignore[arg-type]
            return
        touched: list[ProtocolRxQueue] = []
        last_key: object = _NO_KEY
        incoming = _NO_LIST
        refused: dict[PeerKey, str] = {}
        for key, data in zip(keys, datagrams):
            if key != last_key:
                found = table_get(key)
                if found is None:
                    found = self._admit_once(key, refused)
                    if found is None:
                        last_key = _NO_KEY
                        continue
                last_key = key
                incoming = found.incoming  # type: ignore[attr-defined]
                if not incoming:
                    # Its first datagram of the batch: a list of its own (flush hands it over).
                    incoming = found.incoming = []  # type: ignore[attr-defined]
                    touched.append(found)  # type: ignore[arg-type]
            incoming.append(data)
        for queue in touched:
            queue.flush()

    def _deliver_distinct(self, queues: list[ProtocolRxQueue], datagrams: Sequence[bytes],
                          lengths: Sequence[int]) -> None:
        """One datagram for each of ``queues``: ProtocolRxQueue.flush inlined, the pool's
        totals added once."""
        total = len(datagrams)
        held = held_bytes = 0
        # One iterator, resumed after a callback raised: no position to keep per datagram.
        items = zip(queues, datagrams, lengths)
        queue: ProtocolRxQueue | None = None
        while True:
            try:
                for queue, data, length in items:
                    if queue.hold:
                        # Paused or closed (held back or dropped), or resumed with held
                        # datagrams still to deliver first: the queue's own path, which
                        # counts what it does.
                        queue.incoming = [data]
                        queue.flush()
                        held += 1
                        held_bytes += length
                        continue
                    if length == queue.rx_size:
                        queue.rx_packets += 1
                    else:
                        queue.count_rx(1, length)
                    queue.protocol.datagrams_received([data])
                break
            except Exception as exc:
                # The current datagram's callback raised: its connection handles it (closes),
                # the rest of the batch goes on.
                assert queue is not None
                queue.conn._datagrams_failed(exc)
        pool = self.pool
        pool.rx_packets += total - held
        pool.rx_bytes += sum(lengths) - held_bytes

    def _admit_once(self, key: PeerKey, refused: dict[PeerKey, str]) -> RxQueue | None:
        """``admit(key)`` for a peer of a mixed batch, asked at most once per batch: a peer
        refused earlier in the batch (``refused``: its reason) is refused again for the same
        reason, counted, without asking again. (Interleaved with other peers, a refused
        peer's datagrams would otherwise each make and close a connection, or each report a
        failing factory.)"""
        if refused and not self.closed:  # (closed meanwhile: counted as closed from now on)
            reason = refused.get(key)
            if reason is not None:
                self.refusal = reason
                self.feed_batch_refused(1)
                return None
        queue = self.admit(key)
        if queue is None:
            refused[key] = self.refusal
        return queue

    def feed_batch_refused(self, count: int) -> None:
        """Count ``count`` more datagrams from a peer that admission just refused, for the same
        reason (a refusing protocol refuses them all: asking it again per datagram would
        make and close a connection per datagram)."""
        name = self.refusal
        setattr(self, name, getattr(self, name) + count)

    def feed_one(self, key: PeerKey | None, data: bytes | None) -> None:
        """Route one datagram (``None``: it was truncated and is dropped, counted)."""
        assert key is not None
        # (As feed_batch and _split do for a batch.)
        if key in self._held_per_peer or (key not in self.table
                                          and (self.held_count or self.open_left <= 0)):
            self._hold([key], [data], None)
            return
        self._route_one(key, data)

    def _route_one(self, key: PeerKey, data: bytes | None) -> None:
        queue = self.table.get(key)
        if data is None:
            if queue is None:
                self.pool.dropped_truncated += 1
            else:
                queue.count_truncated()
            return
        if queue is None:
            queue = self.admit(key)
            if queue is None:
                return
        queue.put(data)

    # -- deferred opening (see ``defer_opening``) ----------------------------------------

    def new_open_turn(self) -> None:
        """A loop iteration's share of openings begins: the reader's wake-up (see
        ``BatchReader.on_wake``), or a turn of the held batches."""
        self.open_left = self._open_per_turn

    def _hold(self, keys: Sequence[PeerKey], datagrams: Sequence[Any],
              lengths: Sequence[int] | None) -> None:
        """Hold a batch (or one datagram fed alone: ``lengths`` None) until its turn comes."""
        cost = _budget_cost(datagrams, lengths)
        pool = self.pool
        if pool.buffered + cost > pool.limit:
            # No room in the memory budget: dropped, as a queue drops what does not fit.
            pool.dropped_memory += len(datagrams)
            return
        pool.buffered += cost
        self._held_cost += cost
        self.held_count += len(datagrams)
        self.held.append((keys, datagrams, lengths))
        waiting = self._held_per_peer
        for key in keys:
            waiting[key] = waiting.get(key, 0) + 1
        if not self._work_due:
            self._work_due = True
            self._defer(self._work_turn)
        if not self.held_full and (self.held_count >= self._held_max
                                   or 2 * self._held_cost > pool.limit):
            # Enough is held: what arrives next waits in the kernel's buffer.
            self.held_full = True
            self._on_held_full()

    def _route_held(self, keys: Sequence[PeerKey], datagrams: Sequence[Any],
                    lengths: Sequence[int] | None) -> None:
        if lengths is None:
            self._route_one(keys[0], datagrams[0])
        else:
            self._route(keys, datagrams, lengths)

    def _work_turn(self) -> None:
        self._work_due = False
        self.new_open_turn()
        try:
            self._work_held()
        finally:
            # Whatever a callback raised, the rest keeps its turn.
            if self.held and not self._work_due:
                self._work_due = True
                self._defer(self._work_turn)
            if (self.held_full and 2 * self.held_count <= self._held_max
                    and 4 * self._held_cost <= self.pool.limit):
                self.held_full = False
                self._on_held_room()

    def _work_held(self) -> None:
        """Route held batches, oldest first, until ``route_per_turn`` datagrams were routed or
        the next batch has a new peer and the iteration's share of connections
        (``open_per_turn``) was opened."""
        held = self.held
        pool = self.pool
        table = self.table
        waiting = self._held_per_peer
        routed = 0
        most = self._route_per_turn
        while held and routed < most:
            keys, datagrams, lengths = held[0]
            if self.open_left <= 0 and None in map(table.get, keys):
                break  # it has a new peer: its turn is the next iteration
            held.popleft()
            for key in keys:
                left = waiting[key] - 1
                if left:
                    waiting[key] = left
                else:
                    del waiting[key]
            cost = _budget_cost(datagrams, lengths)
            self.held_count -= len(datagrams)
            self._held_cost -= cost
            pool.buffered -= cost
            routed += len(datagrams)
            self._route_held(keys, datagrams, lengths)

    def discard_held(self) -> None:
        """The owner closed: what is held is dropped, counted as ``closed``."""
        self.dropped_closed += self.held_count
        self.pool.buffered -= self._held_cost
        self.held_count = self._held_cost = 0
        self.held.clear()
        self._held_per_peer.clear()
        self.held_full = False
