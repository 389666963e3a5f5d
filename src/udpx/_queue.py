"""Bounded datagram queues with their counters. No I/O, no asyncio.

The receive queue is written by the batch reader (through the demultiplexer) and read by the
application; it never blocks the writer side: a datagram that finds the queue full is dropped and
counted. The transmit queue is shared by every connection of one socket and drained by that
socket's single writer.
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any, Protocol

from ._cmsg import whole_cmsg

__all__ = ["DATAGRAM_OVERHEAD", "ProtocolRxQueue", "RxPool", "RxQueue", "TxAccount",
           "TxQueue"]


#: What one queued datagram costs beyond its payload, as the memory budget counts it: the
#: ``bytes`` object's header (33 bytes on 64-bit CPython) and the deque slot that holds it,
#: rounded up. It keeps a flood of empty datagrams from costing "nothing".
DATAGRAM_OVERHEAD = 48


def _do_nothing() -> None:
    return None


class RxPool:
    """The receive side of one socket: a memory budget shared by all its connections' queues,
    and running totals over them, past and present.

    Every datagram that reaches a queue of the pool is counted here exactly once: as delivered
    (``rx_packets``) or as one of the drops. ``buffered`` is the cost (payload plus
    ``DATAGRAM_OVERHEAD``) of what is queued now and not yet taken by the application; a
    datagram that would take it over ``limit`` is dropped (``dropped_memory``). Totals are kept
    as datagrams pass, so reading them is O(1) whatever the number of connections.
    """

    __slots__ = ("buffered", "dropped_closed", "dropped_full", "dropped_memory",
                 "dropped_truncated", "dropped_unaccepted", "limit", "rx_bytes", "rx_packets")

    def __init__(self, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"rx_memory_limit must be at least 1, got {limit}")
        #: Bytes allowed in all queues together (None: no bound beyond the queue lengths).
        self.limit = limit if limit is not None else 2**63
        self.buffered = 0
        self.rx_packets = 0
        self.rx_bytes = 0
        self.dropped_full = 0
        self.dropped_truncated = 0
        self.dropped_memory = 0
        self.dropped_unaccepted = 0
        self.dropped_closed = 0


def _rebase(size: int, packets: int, count: int, payload: int) -> tuple[int, int]:
    """Bytes counted as ``packets * size + extra``, and ``count`` more datagrams of
    ``payload`` bytes in all, not all of ``size``: the new nominal size (their average) and
    what ``extra`` changes by, so that the total, counted with the new size and the packets
    added, is exact."""
    new = payload // count
    return new, packets * (size - new) + payload - count * new


class _RxHot:
    """The fields of a receive queue that routing reads or writes per datagram, in a base
    class of their own so that they come first in the object's layout, next to its reference
    count: a busy server with thousands of peers finds each peer's queue out of the CPU's
    caches, and fields side by side cost one cache miss where fields spread over the object
    (CPython lays slots out in alphabetical order) cost two or three. ``hold`` and
    ``protocol`` are a protocol-mode queue's (see ProtocolRxQueue).

    Bytes are counted as ``rx_packets * rx_size + rx_extra`` (``rx_bytes``): ``rx_size`` is
    the size of the connection's first datagrams, so a datagram of that size, the usual one
    (a protocol's fixed-size messages), only adds to ``rx_packets``. A counter above 256 is an
    int object that every addition replaces, and the old one, out of the caches by the time
    its connection's next datagram comes, costs two or three cache misses to free: at 10,000
    busy peers a byte counter per datagram cost about 15 % of the routing (measured).
    """

    __slots__ = ("hold", "items", "limit", "protocol", "rx_extra", "rx_packets", "rx_size")
    hold: bool
    items: deque[bytes]
    limit: int
    protocol: _Protocol
    rx_extra: int
    rx_packets: int
    rx_size: int

    @property
    def rx_bytes(self) -> int:
        """Bytes accepted into the queue (delivered to the connection)."""
        return self.rx_packets * self.rx_size + self.rx_extra

    def count_rx(self, count: int, payload: int) -> None:
        """``count`` more datagrams of ``payload`` bytes in all were accepted (negative: taken
        back). The hot paths add 1 to ``rx_packets`` themselves for a datagram of
        ``rx_size`` bytes and call this for any other, whose size (the average, for several)
        becomes ``rx_size``: the next datagrams most likely have it (a first datagram of
        another size, a keepalive or a handshake, does not hold the count back for ever)."""
        size = self.rx_size
        if payload != count * size:
            if count > 0:
                self.rx_size, change = _rebase(size, self.rx_packets, count, payload)
                self.rx_extra += change
            else:
                self.rx_extra += payload - count * size
        self.rx_packets += count


class RxQueue(_RxHot):
    """A connection's bounded receive queue.

    ``wake`` is called when a put makes the queue non-empty (at most once per batch), so the
    owner can release whoever waits for data. The queue's own counters are the connection's;
    ``pool`` (shared by the socket's queues) keeps the totals and the memory budget.
    """

    __slots__ = ("dropped_closed", "dropped_full", "dropped_truncated", "pool", "turn_waiting",
                 "wake")

    def __init__(self, limit: int, wake: Callable[[], object] = _do_nothing,
                 pool: RxPool | None = None) -> None:
        if limit < 1:
            raise ValueError(f"rx_queue_size must be at least 1, got {limit}")
        self.items: deque[bytes] = deque()
        self.limit = limit
        #: Returns whether it woke a waiting task (a paced turn counts only those).
        self.wake = wake
        #: Task mode: its wake waits for a paced turn (see ``Demux``): at most once in line.
        self.turn_waiting = False
        self.pool = pool if pool is not None else RxPool()
        #: Datagrams and bytes accepted into the queue (delivered to the connection): see
        #: _RxHot.
        self.rx_packets = self.rx_size = self.rx_extra = 0
        self.dropped_full = 0
        self.dropped_truncated = 0
        self.dropped_closed = 0

    def __len__(self) -> int:
        return len(self.items)

    def put(self, data: bytes) -> bool:
        """Queue one datagram, or count it as dropped when the queue or the pool is full.

        Returns whether it was queued. Calls ``wake`` when the queue was empty.
        """
        items = self.items
        pool = self.pool
        if len(items) >= self.limit:
            self.dropped_full += 1
            pool.dropped_full += 1
            return False
        cost = len(data) + DATAGRAM_OVERHEAD
        if pool.buffered + cost > pool.limit:
            pool.dropped_memory += 1
            return False
        items.append(data)
        pool.buffered += cost
        if len(data) == self.rx_size:  # (count_rx's common case inlined: run per datagram)
            self.rx_packets += 1
        else:
            self.count_rx(1, len(data))
        pool.rx_packets += 1
        pool.rx_bytes += len(data)
        if len(items) == 1:
            self.wake()
        return True

    def put_batch(self, datagrams: Sequence[bytes], lengths: Sequence[int]) -> None:
        """Queue ``datagrams`` (``lengths`` are theirs) in order (hot path).

        What does not fit (the queue's length or the pool's memory) is dropped and counted,
        exactly as if each datagram were ``put()`` in turn.
        """
        # Hot path: the fitting datagrams appended in one call.
        items = self.items
        pool = self.pool
        total = len(lengths)
        count = min(total, max(self.limit - len(items), 0))
        fitting = lengths[:count] if count < total else lengths
        payload = sum(fitting)
        cost = payload + count * DATAGRAM_OVERHEAD
        if pool.buffered + cost > pool.limit:
            self._put_each(datagrams)
            return
        if count < total:
            self.dropped_full += total - count
            pool.dropped_full += total - count
        if count == 0:
            return
        was_empty = not items
        items.extend(datagrams if count == total else islice(datagrams, count))
        pool.buffered += cost
        if payload == count * self.rx_size:
            self.rx_packets += count
        else:
            self.count_rx(count, payload)
        pool.rx_packets += count
        pool.rx_bytes += payload
        if was_empty:
            self.wake()

    def _put_each(self, datagrams: Sequence[bytes]) -> None:
        """Rare: the memory budget runs out within a batch. One datagram at a time, so that
        what is dropped, and why, is the same as with put() whatever the path; the queue is
        still woken once, after the batch."""
        was_empty = not self.items
        wake = self.wake
        self.wake = _do_nothing
        try:
            for data in datagrams:
                self.put(data)
        finally:
            self.wake = wake
        if was_empty and self.items:
            wake()

    def count_closed(self, count: int) -> None:
        """``count`` datagrams for this queue arrived after its connection closed, dropped."""
        self.dropped_closed += count
        self.pool.dropped_closed += count

    def count_truncated(self, count: int = 1) -> None:
        """``count`` datagrams for this queue arrived cut short and were dropped."""
        self.dropped_truncated += count
        self.pool.dropped_truncated += count

    def get(self) -> bytes:
        """Remove and return the oldest datagram. Raises IndexError when empty."""
        data = self.items.popleft()
        self.pool.buffered -= len(data) + DATAGRAM_OVERHEAD
        return data

    def get_many(self, max_count: int | None) -> list[bytes]:
        """Remove and return up to ``max_count`` (None: all) queued datagrams, oldest first."""
        items = self.items
        if max_count is None or len(items) <= max_count:
            batch = list(items)
            items.clear()
        else:
            popleft = items.popleft
            batch = [popleft() for _ in range(max_count)]
        self.pool.buffered -= sum(map(len, batch)) + len(batch) * DATAGRAM_OVERHEAD
        return batch

    def _undeliver(self) -> int:
        """Remove what is queued from the queue and from the delivered counts (the caller
        counts it as a drop); returns how many datagrams that was."""
        items = self.items
        count = len(items)
        if count:
            payload = sum(map(len, items))
            items.clear()
            self.count_rx(-count, -payload)
            pool = self.pool
            pool.rx_packets -= count
            pool.rx_bytes -= payload
            pool.buffered -= payload + count * DATAGRAM_OVERHEAD
        return count

    def discard_unread(self) -> int:
        """The application will never read this queue (its connection closed before it was
        accepted): what is queued is not delivered but dropped, counted as ``unaccepted``.
        Returns how many datagrams that was."""
        count = self._undeliver()
        self.pool.dropped_unaccepted += count
        return count

    def discard_closed(self) -> None:
        """Drop what is queued, counted as ``closed``: datagrams that a closed protocol-mode
        connection will never deliver (queued while its reading was paused, or arriving in the
        batch that closed it). Delivered means handed to the protocol, so they leave the
        delivered counts."""
        self.count_closed(self._undeliver())

    def release(self) -> None:
        """The queue is being freed with datagrams in it (its connection was dropped unread):
        give their share of the memory budget back. They stay counted as delivered."""
        items = self.items
        if items:
            self.pool.buffered -= sum(map(len, items)) + len(items) * DATAGRAM_OVERHEAD
            items.clear()


class _Protocol(Protocol):
    def datagrams_received(self, datagrams: list[bytes], /) -> object: ...


class _Conn(Protocol):
    def _datagrams_failed(self, exc: Exception, /) -> None: ...


class _Nowhere:
    """A queue's protocol and connection before it has them: takes everything, does nothing."""

    def datagrams_received(self, datagrams: list[bytes], /) -> None:
        return None

    def _datagrams_failed(self, exc: Exception, /) -> None:
        return None


_NOWHERE = _Nowhere()

#: What a protocol-mode queue holds until it first holds something back: most never do, and
#: an empty deque costs 760 bytes (it allocates its first block) and one more object for the
#: garbage collector per connection. Nothing is ever appended to it (``hold_back`` makes the
#: queue its own deque first); its ``maxlen`` only makes that mistake harmless to others.
_NOTHING_HELD: deque[bytes] = deque(maxlen=0)

#: What ``incoming`` is between batches: the demultiplexer gives a queue its own list when the
#: batch has datagrams for it, and ``flush`` hands that list over.
_NO_INCOMING: list[bytes] = []


class ProtocolRxQueue(RxQueue):
    """A protocol-mode connection's receive side: each batch's datagrams for the connection
    are collected in ``incoming`` (a plain list) and handed to ``protocol``'s
    ``datagrams_received`` by ``flush()``, once per batch; what that raises goes to ``conn``'s
    ``_datagrams_failed``. The bounded queue (``items``) holds datagrams only while delivery is
    held back (``hold``: reading paused, older held datagrams not yet delivered, or closed),
    with the same limits and drop accounting as a task-mode queue.

    Delivery is synchronous, so a delivered datagram never counts against the memory budget:
    only held ones do. The protocol and the connection are referred to, not their bound
    methods: a connection opens with as few objects as possible (thousands open at once when a
    flood of new peers arrives), and calling through the reference measured faster.
    """

    __slots__ = ("closed", "conn", "incoming", "one_by_one", "paused")

    def __init__(self, limit: int, pool: RxPool) -> None:
        # Every attribute set here, no super().__init__ call: this runs once per new peer.
        self.items = _NOTHING_HELD
        self.limit = limit
        self.wake = _do_nothing
        self.turn_waiting = False
        self.pool = pool
        self.rx_packets = self.rx_size = self.rx_extra = 0
        self.dropped_full = self.dropped_truncated = self.dropped_closed = 0
        #: This batch's datagrams for the connection, not yet flushed (``_NO_INCOMING``: none).
        self.incoming = _NO_INCOMING
        self.protocol: _Protocol = _NOWHERE
        self.conn: _Conn = _NOWHERE
        #: Reading paused: datagrams are held in ``items``.
        self.paused = False
        #: The connection is closed: datagrams are dropped, counted as ``closed``.
        self.closed = False
        #: Paused, closed, or held datagrams wait for delivery: hold new ones back too.
        self.hold = False
        #: The protocol keeps ConnProtocol's own datagrams_received, which calls
        #: datagram_received per datagram: the queue does that loop itself (``deliver``), so
        #: that a callback that closes the connection or pauses reading gets no more.
        self.one_by_one = False

    def flush(self) -> None:
        """Hand ``incoming`` to the protocol (called once per batch that added to it), or
        hold it back."""
        batch = self.incoming
        self.incoming = _NO_INCOMING
        if self.hold:
            self._flush_held(batch)
            return
        # Hot path: _count and deliver inlined (a call each per connection per batch).
        count = len(batch)
        payload = sum(map(len, batch))
        if payload == count * self.rx_size:
            self.rx_packets += count
        else:
            self.count_rx(count, payload)
        pool = self.pool
        pool.rx_packets += count
        pool.rx_bytes += payload
        try:
            if self.one_by_one:
                self._one_by_one(batch)
            else:
                self.protocol.datagrams_received(batch)
        except Exception as exc:
            self.conn._datagrams_failed(exc)

    def _flush_held(self, batch: list[bytes]) -> None:
        if self.paused or self.closed:
            self.hold_back(batch)
            return
        # Reading resumed, and the datagrams held meanwhile still wait for their delivery from
        # the loop (uvloop reads the socket before running that callback): they go now, ahead
        # of this batch, rather than filling the queue and dropping it.
        held = self.take_held()
        self._count(batch)
        held += batch
        self.deliver(held)

    def _count(self, batch: list[bytes], sign: int = 1) -> None:
        """``batch`` is delivered (``sign`` -1: was counted so and is not): count it on the
        queue's counters and the pool's."""
        count = sign * len(batch)
        payload = sign * sum(map(len, batch))
        self.count_rx(count, payload)
        pool = self.pool
        pool.rx_packets += count
        pool.rx_bytes += payload

    def deliver(self, batch: list[bytes]) -> None:
        """Hand ``batch`` (counted as delivered) to the protocol; what it raises goes to the
        connection (which closes)."""
        try:
            if self.one_by_one:
                self._one_by_one(batch)
            else:
                self.protocol.datagrams_received(batch)
        except Exception as exc:
            self.conn._datagrams_failed(exc)

    def _one_by_one(self, batch: list[bytes]) -> None:
        # ConnProtocol.datagrams_received's loop, stopping where a callback closed the
        # connection, paused reading or raised: the rest was not delivered, so it leaves the
        # delivered counts and is held (paused; raised: until the close drops it) or dropped
        # as ``closed``.
        received = self.protocol.datagram_received  # type: ignore[attr-defined]
        done = 0
        try:
            for data in batch:
                done += 1
                received(data)
                if self.hold:
                    break
        finally:
            if done < len(batch):
                rest = batch[done:]
                self._count(rest, -1)
                self.hold_back(rest)

    def hold_back(self, batch: list[bytes]) -> None:
        """Queue ``batch`` (bounded and counted, as ``put``), or count it as ``closed``."""
        if self.closed:
            self.count_closed(len(batch))
            return
        if self.items is _NOTHING_HELD:
            self.items = deque()
        put = super().put
        for data in batch:
            put(data)  # ``wake`` does nothing here

    def put(self, data: bytes) -> bool:
        """One datagram, delivered (or held back) at once."""
        if self.incoming is _NO_INCOMING:
            self.incoming = [data]
        else:
            self.incoming.append(data)
        self.flush()
        return True

    def put_batch(self, datagrams: Sequence[bytes], lengths: Sequence[int]) -> None:
        """A batch of one peer: one list, one delivery (hot path)."""
        self.incoming = list(datagrams)
        self.flush()

    def pause(self) -> None:
        self.paused = self.hold = True

    def resume(self) -> bool:
        """Reading resumed; returns whether held datagrams wait for ``take_held()`` (new ones
        are held behind them until then)."""
        self.paused = False
        self.hold = self.closed or bool(self.items)
        return self.hold and not self.closed

    def take_held(self) -> list[bytes]:
        """The held datagrams, oldest first, once reading resumed; delivery is direct again."""
        batch = self.get_many(None)
        self.hold = self.paused or self.closed
        return batch

    def close(self) -> None:
        """Deliver nothing more: drop what is held and what still arrives (``closed``)."""
        self.closed = self.hold = True
        self.discard_closed()


class TxQueue:
    """A socket's bounded transmit queue: datagrams with, in parallel, the connection that sent
    each (kept in a second deque rather than as pairs, so that a send allocates no tuple)."""

    __slots__ = ("datagrams", "high", "limit", "low", "open_limit", "owners", "quiet")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"tx_queue_size must be at least 1, got {limit}")
        self.datagrams: deque[bytes] = deque()
        self.owners: deque[Any] = deque()
        self.limit = limit
        #: ``limit`` less the room held for ``send()`` calls woken and not yet resumed (see
        #: _waiters.TurnWaiters): what a sender that did not wait may fill up to.
        self.open_limit = limit
        #: Flow-control marks for protocol-mode connections: above ``high`` a sender is told
        #: to pause, at ``low`` the paused ones are told to resume (hysteresis, so that a busy
        #: queue does not flap).
        self.high = max(1, limit * 3 // 4)
        self.low = limit // 4
        #: Below this length a datagram can be queued with no test of either mark: below
        #: ``open_limit``, and queueing it leaves the queue below ``high``.
        self.quiet = min(self.open_limit, self.high - 1)

    def __len__(self) -> int:
        return len(self.datagrams)

    def hold_for(self, turns: int) -> None:
        """Keep room for ``turns`` woken waiters (TurnWaiters' ``on_turns``)."""
        self.open_limit = self.limit - turns
        self.quiet = min(self.open_limit, self.high - 1)

    def full(self) -> bool:
        return len(self.datagrams) >= self.open_limit

    def space(self) -> int:
        return self.open_limit - len(self.datagrams)

    def full_message(self) -> str:
        """Why a datagram does not fit now, for QueueFull."""
        held = self.limit - self.open_limit
        return (f"transmit queue full ({self.limit} datagrams"
                + (f", {held} of them kept for send() calls woken to take them)" if held
                   else ")"))

    def put(self, data: bytes, owner: object) -> None:
        """Append one datagram; the caller has checked ``full()``."""
        self.datagrams.append(data)
        self.owners.append(owner)

    def put_many(self, datagrams: list[bytes], account: TxAccount) -> None:
        """Append ``account``'s datagrams in order and count them as its ``enqueued``; the
        caller has checked ``space()``. (``UDPConn.send`` inlines the one-datagram case.)"""
        self.datagrams.extend(datagrams)
        self.owners.extend([account] * len(datagrams))
        account.enqueued += len(datagrams)

    def pop(self, count: int) -> None:
        """Forget the ``count`` oldest datagrams (handled by the writer)."""
        datagrams = self.datagrams
        owners = self.owners
        if count >= len(datagrams):
            datagrams.clear()
            owners.clear()
            return
        for _ in range(count):
            datagrams.popleft()
            owners.popleft()


def _bytes_data_offset() -> int | None:
    """Where a bytes object's data starts, counted from its address (``id()``): CPython's
    layout, checked on two objects; None where ``id()`` is not an address."""
    offsets = set()
    for probe in (b"udpx", bytes(range(40))):
        address = ctypes.cast(ctypes.c_char_p(probe), ctypes.c_void_p).value
        if address is None:  # pragma: no cover - not CPython
            return None
        offsets.add(address - id(probe))
    return offsets.pop() if len(offsets) == 1 else None


#: See _bytes_data_offset: a batch sender points each message at its account's sockaddr
#: (``TxAccount.name_address``) instead of copying it (None: it cannot).
BYTES_DATA_OFFSET = _bytes_data_offset()
_NAME_OFFSET = BYTES_DATA_OFFSET or 0


class _TxHot:
    """The fields of a transmit account that sends read or write per datagram, first in the
    object's layout (see _RxHot)."""

    __slots__ = ("enqueued", "name_address", "packet_size", "packets")
    enqueued: int
    name_address: int
    packet_size: int
    packets: int


class TxAccount(_TxHot):
    """One connection's side of a shared transmit queue: its destination and its counters.

    The writer counts the datagrams the kernel took in ``packets`` (their bytes: ``sent_bytes``,
    counted as ``packets * packet_size + extra_bytes``, see _RxHot) and those it refused in
    ``errors``; ``enqueued - packets - errors`` is what is still queued.
    """

    __slots__ = ("address", "ancillary", "control", "errors", "extra_bytes", "key", "on_error",
                 "sockaddr")

    def __init__(self, sockaddr: bytes | None,
                 on_error: Callable[[OSError], None] | None = None,
                 key: int | bytes | None = None) -> None:
        #: Raw destination sockaddr; None on a connected socket.
        self.sockaddr = sockaddr
        #: The peer key of the connection (a listener's), for errors the error queue reports
        #: without a usable address (see SocketEngine.drain_errors).
        self.key = key
        #: Where ``sockaddr``'s bytes are in memory, for a batch sender's message headers: the
        #: bytes object is immutable, never moves, and lives as long as the account, which every
        #: queued datagram refers to (0: no sockaddr).
        self.name_address = id(sockaddr) + _NAME_OFFSET if sockaddr is not None else 0
        #: The same as an address tuple, made by the writer the first time it sends one
        #: datagram alone (a plain sendto is cheaper than a batch of one).
        self.address: tuple[object, ...] | None = None
        self.on_error = on_error
        self.control = b""
        # A shared empty tuple until there is something to carry: most accounts never do, and
        # a list per connection is one more object for the garbage collector to visit.
        self.ancillary: Sequence[tuple[int, int, bytes]] = ()
        self.enqueued = 0
        self.packets = self.packet_size = self.extra_bytes = 0
        self.errors = 0

    @property
    def sent_bytes(self) -> int:
        """Bytes of the datagrams the kernel took."""
        return self.packets * self.packet_size + self.extra_bytes

    def count_sent(self, count: int, payload: int) -> None:
        """The kernel took ``count`` more datagrams, ``payload`` bytes in all (the writer adds
        1 to ``packets`` itself for one of ``packet_size`` bytes; another size becomes
        ``packet_size``, as in _RxHot.count_rx)."""
        if payload != count * self.packet_size:
            self.packet_size, change = _rebase(self.packet_size, self.packets, count, payload)
            self.extra_bytes += change
        self.packets += count

    def set_ancillary(self, ancillary: list[tuple[int, int, bytes]]) -> None:
        """The control messages every datagram of this account carries (its source address
        on a packet-info listener, its TOS byte): as ``(level, type, data)`` for sendmsg, and
        as whole control messages for sendmmsg slots."""
        self.ancillary = ancillary
        self.control = b"".join(whole_cmsg(item) for item in ancillary)

    def pending(self) -> int:
        """Datagrams queued and not yet handled by the writer."""
        return self.enqueued - self.packets - self.errors
