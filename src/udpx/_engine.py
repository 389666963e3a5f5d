"""The socket engine: one object owns one UDP socket and everything the kernel does for it.

It owns the socket, its kernel capabilities (``_cmsg.SocketState``: what the kernel agreed to
do for the socket, which lays out the batch arrays and judges GSO failures), the batch reader,
the single writer with its transmit queue, the kernel's drop counter, the socket's part of
``describe()`` and the flush-then-close. What the datagrams mean
is a **sink**'s business:

- a listener is an engine plus the demultiplexer sink (``Listener``);
- ``dial()`` is an engine plus a one-peer sink (``_dial.PeerSink``).

The reader decodes each batch once (lengths, truncation, GRO runs split into datagrams) and
hands the result to the sink: a clean batch as arrays in one ``feed_batch`` call, a batch with
a truncated message one message at a time through ``feed_one``. Like trio's ``DTLSEndpoint``,
the engine owns the socket and the receive loop, and what it feeds owns none.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol, final

from ._cmsg import SO_EE_ORIGIN_LOCAL, SocketState, read_error
from ._mmsg import (
    HAVE_MMSG,
    Receiver,
    RecvBatch,
    SendBatch,
    Sender,
    SingleRecv,
    make_receiver,
    make_sender,
    message_datagrams,
)
from ._options import MAX_BATCH_SIZE, Options
from ._queue import TxAccount, TxQueue
from ._reader import MAX_DATAGRAMS_PER_WAKEUP, BatchReader
from ._sockets import (
    Address,
    PeerKey,
    address_from_sockaddr,
    buffer_sizes,
    join_key,
    kernel_drops,
    key_from_address,
)
from ._writer import Writer

__all__ = ["Engine", "Releasing", "SharedBatches", "Sink", "SocketEngine", "loop_batches"]

logger = logging.getLogger("udpx")

#: Error-queue entries read per drain (a flood of ICMP errors cannot hold the loop).
MAX_ERRORS_PER_DRAIN = 256
#: Layouts of each kind (receive, send) whose shared arrays a loop keeps while no socket
#: uses them.
MAX_IDLE_LAYOUTS = 4
#: Receive calls a freed socket's engine makes at most to count what was left in its buffer
#: (64 messages each: more than a 64 MiB buffer of small datagrams holds).
MAX_UNREAD_CALLS = 2048
#: An unconnected socket (a listener, a drop-in endpoint) sends up to this many times
#: ``batch_size`` datagrams per sendmmsg (at most MAX_BATCH_SIZE, the kernel's limit): its
#: queue holds replies to many peers, and a server answering thousands of them spent an
#: eighth of its instructions on the per-batch work of 64-datagram sends (cachegrind), and
#: woke its clients more often (the many-peer echo at 10,000 clients, measured: about 5 %
#: less CPU per round trip with 256).
#: Its arena keeps the size of ``batch_size`` slots (a batch of large datagrams is cut to
#: what it holds), and the writer counts such a call as several turns of its per-callback
#: share. Receives, whose arena every message lands in at its own slot, keep ``batch_size``.
LISTENER_SEND_FACTOR = 4


def _datagrams_per_message(lengths: list[int], sizes: list[int]) -> list[int]:
    """The datagrams in each received message: a GRO message of ``length`` bytes holds a run
    of ``size``-byte segments (the last may be shorter); ``size`` 0 is a plain datagram."""
    return [-(-length // size) if size else 1 for length, size in zip(lengths, sizes)]


class SharedBatches:
    """Batch arrays shared by the connected sockets of one loop thread: a connected-mode
    listener's peer sockets, one per peer; the dialed connections and connected endpoints of
    a loop.

    A batch receiver's arena has a slot of ``max_datagram`` bytes per message, so each message
    lands on a page of its own: an engine of its own per peer socket touched (and faulted in)
    about 64 pages, 256 KiB, on its first read. With 1,000 new peers under load that was one
    loop iteration of about half a second and over 500 MiB of resident memory, and making the
    arrays was most of what opening a socket cost. So sockets of the same layout share them:

    - Receivers: the engine decodes every batch into ``bytes`` before its sink sees any of it,
      and no receive call runs inside another. A freed engine, which may be freed from a
      callback in the middle of another socket's batch, counts what its socket still held
      with a second receiver of the layout (``leftovers``): counting runs no callback, so it
      never runs inside another count. Per-socket read state (how many messages to ask for)
      stays in each reader.
    - Senders: a writer fills the arrays and sends them before it returns, except where a
      send's error reaches a callback that makes another writer drain at once; a sender says
      it is ``busy`` meanwhile, and that other writer drains a loop callback later.

    A layout's arrays are freed when its last engine is, or, with ``keep_idle`` (a loop's own
    sockets), kept for the next socket of that layout, for up to ``MAX_IDLE_LAYOUTS`` layouts
    of each kind: a program that opens a socket per query (DNS clients open an endpoint each)
    would otherwise make and free them per query.
    """

    __slots__ = ("_entries", "_keep_idle")

    def __init__(self, *, keep_idle: bool = False) -> None:
        # Layout -> [arrays, engines using them, leftovers' receiver or None], oldest first.
        self._entries: dict[tuple[object, ...], list[Any]] = {}
        self._keep_idle = keep_idle

    def _acquire(self, layout: tuple[object, ...], make: Callable[[], object]) -> Any:
        entry = self._entries.get(layout)
        if entry is None:
            entry = self._entries[layout] = [make(), 0, None]
        entry[1] += 1
        return entry[0]

    def receiver(self, sock: socket.socket, options: Options, state: SocketState) -> RecvBatch:
        """A receiver laid out for ``sock`` (connected: no peer addresses) and what ``state``
        says the kernel reports; ``release()`` it when the engine is freed."""
        layout = ("recv", sock.family, options.batch_size, options.max_datagram, state.gro,
                  state.pktinfo, state.ecn)
        receiver: RecvBatch = self._acquire(layout, lambda: make_receiver(
            sock, options.batch_size, options.max_datagram, False, None, state=state))
        return receiver

    def sender(self, sock: socket.socket, options: Options, state: SocketState) -> SendBatch:
        """A sender laid out for ``sock`` (connected: no destinations) and the control messages
        ``state`` says datagrams may carry; ``release()`` it when the engine is freed."""
        layout = ("send", sock.family, options.batch_size, options.max_datagram,
                  state.pktinfo, state.ecn)
        sender: SendBatch = self._acquire(layout, lambda: make_sender(
            sock, options.batch_size, options.max_datagram, False, None, state=state))
        return sender

    def leftovers(self, receiver: RecvBatch) -> RecvBatch:
        """The receiver that counts what a freed socket of ``receiver``'s layout still held
        (made on first use, kept with the layout's receiver: making one per freed socket cost
        an arena's mapping and its page faults each)."""
        for entry in self._entries.values():
            if entry[0] is receiver:
                if entry[2] is None:
                    entry[2] = RecvBatch(receiver.size, receiver.slot_size, receiver.family,
                                         False, gro=receiver.gro, pktinfo=receiver.pktinfo,
                                         tos=receiver.tos)
                leftovers: RecvBatch = entry[2]
                return leftovers
        raise ValueError("not a shared receiver")

    def release(self, arrays: object) -> None:
        """An engine is done with ``arrays`` (a receiver or a sender it was given)."""
        for layout, entry in self._entries.items():
            if entry[0] is arrays:
                entry[1] -= 1
                if not entry[1]:
                    if self._keep_idle or getattr(arrays, "busy", False):
                        # (Busy: freed from a callback inside its own send; kept idle.)
                        # The most recently used last: the oldest idle layouts go first.
                        self._entries[layout] = self._entries.pop(layout)
                        self._free_idle(MAX_IDLE_LAYOUTS, str(layout[0]))
                    else:
                        self._free(layout)
                return

    def _free(self, layout: tuple[object, ...]) -> None:
        arrays, _, leftovers = self._entries.pop(layout)
        arrays.close()
        if leftovers is not None:
            leftovers.close()

    def _free_idle(self, keep: int, kind: str | None = None) -> None:
        idle = [layout for layout, entry in self._entries.items()
                if not entry[1] and (kind is None or layout[0] == kind)
                and not getattr(entry[0], "busy", False)]
        for layout in idle[:max(0, len(idle) - keep)]:
            self._free(layout)

    def close_idle(self) -> None:
        """Free every layout no socket uses now."""
        self._free_idle(0)

    def __len__(self) -> int:
        """Arrays in use or kept idle (tests)."""
        return len(self._entries)

    def in_use(self) -> int:
        """Arrays some socket uses now (tests)."""
        return sum(1 for entry in self._entries.values() if entry[1])


#: The arrays the connected sockets of each loop share (one thread uses them all).
_loop_batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SharedBatches] = (
    weakref.WeakKeyDictionary())


def loop_batches(loop: asyncio.AbstractEventLoop) -> SharedBatches:
    """The batch arrays shared by the connected sockets a program opens on ``loop`` (dialed
    connections, connected endpoints): a client of many connections (a relay's upstreams, a
    load generator) uses one set per layout, not one each, and a client that opens one per
    query reuses it. Kept while the loop lives."""
    batches = _loop_batches.get(loop)
    if batches is None:
        batches = _loop_batches[loop] = SharedBatches(keep_idle=True)
    return batches


class Sink(Protocol):
    """Where an engine's received datagrams go."""

    def feed_batch(self, keys: Sequence[PeerKey] | None, datagrams: Sequence[bytes],
                   lengths: Sequence[int]) -> None:
        """Datagram i is ``datagrams[i]``, ``lengths[i]`` bytes long, from ``keys[i]``
        (``keys`` is None on a connected socket) (hot path)."""

    def feed_one(self, key: PeerKey | None, data: bytes | None) -> None:
        """One datagram (None: it arrived truncated, to be counted and dropped)."""

    def socket_error(self, exc: OSError) -> None:
        """The socket reported an error (ICMP errors on a connected socket come this way)."""

    def peer_error(self, key: PeerKey, exc: OSError, info: int) -> None:
        """The network reported an error about a datagram sent to ``key``'s peer (the error
        queue of an unconnected socket); ``info`` is the ICMP's extra (an MTU)."""

    def count_ecn(self, keys: Sequence[PeerKey] | None, codes: Sequence[int],
                  pieces: Sequence[int]) -> None:
        """Message i, from ``keys[i]`` (None: the connected peer), carried ECN codepoint
        ``codes[i]`` on each of its ``pieces[i]`` datagrams."""

    def closed_unread(self, count: int) -> None:
        """``count`` datagrams were still in the socket when it was freed (they arrived after
        reading stopped): never delivered, to be counted as ``closed``."""


class Engine(Protocol):
    """What listeners, dialed connections and connections use of an engine: the batch engine
    here, or the loop-transport engine (``_transport``)."""

    sock: socket.socket
    writer: Writer
    #: What the kernel does for the socket (all off on a loop transport).
    state: SocketState

    async def open(self) -> None: ...

    def feed_datagram(self, data: bytes, addr: Address) -> None: ...

    def kernel_drops(self) -> int: ...

    def describe(self) -> dict[str, Any]: ...

    @property
    def released(self) -> bool: ...

    def stop_reading(self) -> None: ...

    def close(self, on_release: Callable[[], None] | None = None) -> None: ...

    def abort(self) -> None: ...


class Releasing:
    """What both engines do alike about their end: the kernel drop count kept after close,
    and the callbacks waiting for the socket to be freed."""

    sock: socket.socket

    def __init__(self) -> None:
        # The kernel's drop count, read once more just before the socket is closed.
        self._kernel_final: int | None = None
        self._released = False
        self._on_release: list[Callable[[], None]] = []

    def kernel_drops(self) -> int:
        """The kernel's drop count for the socket (kept after close)."""
        return kernel_drops(self.sock) if self._kernel_final is None else self._kernel_final

    @property
    def released(self) -> bool:
        return self._released

    def _when_released(self, on_release: Callable[[], None] | None) -> None:
        if on_release is not None:
            if self._released:
                on_release()
            else:
                self._on_release.append(on_release)

    def _released_now(self) -> None:
        callbacks, self._on_release = self._on_release, []
        for callback in callbacks:
            callback()


@final
class SocketEngine(Releasing):
    """One UDP socket, read in batches into ``sink`` and written by one writer.

    ``named``: the socket is unconnected, so every datagram carries its peer's address (keys
    on receive, destinations on send). Reading starts with ``start()``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, options: Options,
                 sink: Sink, *, named: bool, pktinfo: bool = False,
                 recverr: bool = False, on_empty: Callable[[], None] | None = None,
                 read_budget: int = MAX_DATAGRAMS_PER_WAKEUP,
                 batches: SharedBatches | None = None) -> None:
        super().__init__()
        self.loop = loop
        self.sock = sock
        self.family = family = sock.family
        self.sink = sink
        #: What the kernel does for this socket (GSO, GRO, packet info, TOS bytes, the error
        #: queue, don't-fragment): asked for once here, downgraded where it refuses.
        self.state = state = SocketState(
            sock, batched=options.batch_size > 1 and HAVE_MMSG,
            slot_size=options.max_datagram, named=named, gso=options.gso, gro=options.gro,
            pktinfo=pktinfo, ecn=options.ecn, recverr=recverr,
            dont_fragment=options.dont_fragment)
        #: ``batches``: where this (connected) socket's batch arrays are shared from.
        self._batches = batches = (batches if batches is not None and not named
                                   and options.batch_size > 1 and HAVE_MMSG else None)
        # An unconnected socket (a listener, a drop-in endpoint) sends up to
        # LISTENER_SEND_FACTOR times batch_size datagrams per sendmmsg; see there.
        send_size = (min(options.batch_size * LISTENER_SEND_FACTOR, MAX_BATCH_SIZE)
                     if named and options.batch_size > 1 else options.batch_size)

        def own_sender() -> Sender:
            return make_sender(sock, send_size, options.max_datagram, named,
                               lambda raw: address_from_sockaddr(family, raw), state=state,
                               arena_slots=options.batch_size)

        self.receiver: Receiver
        self.sender: Sender
        if batches is not None:
            self.receiver = batches.receiver(sock, options, state)
            self.sender = batches.sender(sock, options, state)
        else:
            self.receiver = make_receiver(sock, options.batch_size, options.max_datagram, named,
                                          lambda address: key_from_address(family, address),
                                          state=state)
            self.sender = own_sender()
        # A writer of shared arrays makes arrays of its own when it must drain while another
        # writer sends from them (see Writer._flush).
        self.writer = Writer(loop, sock, self.sender, TxQueue(options.tx_queue_size), named,
                             state=state,
                             pending_error=self.drain_errors if state.recverr else None,
                             direct=True,
                             release_sender=batches.release if batches is not None else None,
                             make_spare=own_sender if batches is not None else None,
                             turn_size=options.batch_size)
        single = isinstance(self.receiver, SingleRecv)
        self.reader = BatchReader(loop, sock, self.receiver,
                                  self._on_single if single else self._on_batch,
                                  self._on_error,
                                  on_nothing=self.drain_errors if state.recverr else None,
                                  before=self.writer.defer, after=self.writer.flush_scheduled,
                                  on_empty=on_empty, budget=read_budget,
                                  coalesce=options.rx_coalesce, sent=self._tx_packets)
        self._named = named
        self._max_datagram = options.max_datagram

    async def open(self) -> None:
        """Start reading (the loop watches the socket from now on)."""
        self.reader.start()

    def _tx_packets(self) -> int:
        """Datagrams this socket sent (a running total: read coalescing's hint that the
        peers wait for answers)."""
        return self.writer.tx_packets

    # -- receiving: decode once, feed the sink ------------------------------------------------

    def _on_batch(self, count: int) -> int:
        """Decode the ``count`` messages of one recvmmsg for the sink; returns how many
        datagrams they held (a GRO message holds several)."""
        receiver = self.receiver
        lengths = receiver.lengths(count)
        keys = receiver.keys(count) if self._named else None
        sizes = receiver.segment_sizes(count)
        # (Read before the sink runs anything: the receiver may be shared.)
        codes = receiver.codepoints(count) if self.state.ecn else None  # type: ignore[union-attr]
        delivered = self._feed(lengths, receiver.truncated(count), keys, sizes)
        if codes is not None and any(codes):
            # After the batch (a new peer's connection is made there): its marks.
            self._count_ecn(codes, keys, lengths, sizes)
        return delivered

    def _feed(self, lengths: list[int], truncated: list[bool] | None,
              keys: Sequence[PeerKey] | None, sizes: list[int] | None) -> int:
        receiver = self.receiver
        assert isinstance(receiver, RecvBatch)  # the one-datagram receiver feeds feed_one
        count = len(lengths)
        sink = self.sink
        if truncated is None:
            if sizes is None:
                sink.feed_batch(keys, receiver.datagrams(lengths), lengths)
                return count
            split_keys, datagrams, lengths = receiver.split(keys, lengths, sizes)
            sink.feed_batch(split_keys, datagrams, lengths)
            return len(lengths)
        # Rare: some message did not fit its slot. One message at a time, every message
        # decoded before any is fed: a callback may close what owns the receiver (or the
        # last socket sharing it), which frees its arena.
        arena = receiver.arena
        messages: list[tuple[PeerKey | None, Sequence[bytes | None]]] = []
        for index, (offset, length, cut) in enumerate(zip(receiver.offsets, lengths,
                                                          truncated)):
            key = keys[index] if keys is not None else None
            messages.append((key, (None,) if cut else message_datagrams(
                arena, offset, length, sizes[index] if sizes is not None else 0)))
        feed_one = sink.feed_one
        delivered = 0
        for key, pieces in messages:
            for data in pieces:
                feed_one(key, data)
            delivered += len(pieces)
        return delivered

    def _count_ecn(self, codes: list[int], keys: Sequence[PeerKey] | None,
                   lengths: list[int], sizes: list[int] | None) -> None:
        # Opt-in (``ecn``): one control-message walk per message, and per-datagram work only
        # for the ECN-marked ones (a GRO run's segments share their message's mark).
        count = len(codes)
        pieces = [1] * count if sizes is None else _datagrams_per_message(lengths, sizes)
        self.sink.count_ecn(keys, codes, pieces)

    def _on_single(self, count: int) -> int:
        receiver = self.receiver
        assert isinstance(receiver, SingleRecv)
        self.sink.feed_one(receiver.key if self._named else None, receiver.data)
        return 1

    def _on_error(self, exc: OSError) -> None:
        # With IP_RECVERR the error is the first queued one: the queue says whose it is.
        if not (self.state.recverr and self.drain_errors()):
            self.sink.socket_error(exc)

    def drain_errors(self, own: TxAccount | None = None) -> bool:
        """Read the socket's error queue (IP_RECVERR), handing each error to the sink with the
        key of the peer it concerns; whether there was any error other than ``own``'s. Also
        clears the socket's pending error, so that it fails no unrelated send.

        ``own``: the account whose datagram the writer just failed to send. An error the local
        stack raised about that very datagram (EMSGSIZE over the device's MTU, with the MTU)
        is its own failure, not an earlier datagram's: it goes to ``own``'s peer, and the
        writer does not try again. (On an unconnected IPv4 socket such an entry carries the
        destination with port 0, so it is matched with the failing datagram, not looked up.)
        """
        family = self.family
        found = own_seen = False
        for _ in range(MAX_ERRORS_PER_DRAIN):
            try:
                entry = read_error(self.sock)
            except OSError:
                break
            if entry is None:
                break
            address, code, info, local, origin = entry
            if (own is not None and origin == SO_EE_ORIGIN_LOCAL and code
                    and self._concerns(own, address)):
                # Reported once. A sendmmsg that stopped at this datagram already queued an
                # entry for it (and returned the count before it); the writer's next call,
                # starting from it, failed and queued a second one.
                if own_seen:
                    continue
                own_seen = True
                if own.key is not None:
                    self.sink.peer_error(own.key, OSError(code, os.strerror(code)), info)
                    continue
            else:
                found = True
            if not code or not isinstance(address, tuple):
                continue
            try:
                key = key_from_address(family, address)
            except (OSError, ValueError, TypeError):
                continue
            if self.state.pktinfo and local is not None:
                key = join_key(family, key, local)
            self.sink.peer_error(key, OSError(code, os.strerror(code)), info)
        return found

    def _concerns(self, own: TxAccount, address: object) -> bool:
        """Whether an error-queue entry for ``address`` may be about ``own``'s datagram: its
        destination's address, and its port or 0."""
        if own.sockaddr is None:  # a connected socket: its one peer
            return True
        if not isinstance(address, tuple):
            return False
        destination = own.address
        if destination is None:
            destination = own.address = address_from_sockaddr(self.family, own.sockaddr)
        return bool(address[0] == destination[0] and address[1] in (0, destination[1]))

    def feed_datagram(self, data: bytes, addr: Address) -> None:
        """One datagram from ``addr``, delivered by someone else than the batch reader."""
        key = key_from_address(self.family, addr) if self._named else None
        self.sink.feed_one(key, None if len(data) > self._max_datagram else data)

    # -- introspection --------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The socket's part of ``describe()``."""
        rcvbuf, sndbuf = buffer_sizes(self.sock) if not self._released else (0, 0)
        return {"engine": "mmsg", "fd": self.sock.fileno(), "rcvbuf": rcvbuf, "sndbuf": sndbuf,
                "batch_size": self.receiver.size, "send_batch": self.sender.size,
                **self.state.describe(),
                "rx_coalesce": self.reader.coalesce, "rx_pauses": self.reader.pauses,
                "rx_pauses_failed": self.reader.pauses_failed,
                "tx_queued": len(self.writer.queue)}

    # -- closing ----------------------------------------------------------------------------

    def stop_reading(self) -> None:
        self.reader.stop()

    def close(self, on_release: Callable[[], None] | None = None) -> None:
        """Stop reading, flush what is queued, then free the socket; ``on_release`` is called
        then (at once if it already was)."""
        self.reader.stop()
        self._when_released(on_release)
        self.writer.when_empty(self._release)

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        self.writer.close()  # calls every closing connection's when_drained callback
        unread = self._count_unread()
        if unread:
            self.sink.closed_unread(unread)
        if self._batches is not None:
            self._batches.release(self.receiver)
        else:
            self.receiver.close()
        self._kernel_final = kernel_drops(self.sock)
        self.sock.close()
        self._released_now()

    def _count_unread(self) -> int:
        """Read out what is left in the socket as it is freed (what arrived after reading
        stopped, while the queue was flushed): how many datagrams, none delivered. Every
        datagram that reached the socket is delivered or counted, this one too."""
        receiver = self.receiver
        if self._batches is not None:
            # A shared receiver may be in the middle of another socket's batch (this engine
            # can be freed from a callback of that batch): the layout's leftovers receiver.
            assert isinstance(receiver, RecvBatch)
            receiver = self._batches.leftovers(receiver)
        fd = self.sock.fileno()
        unread = 0
        for _ in range(MAX_UNREAD_CALLS):
            try:
                count = receiver.receive(fd)
            except OSError:
                continue  # a pending error (an ICMP report), reported once: read on
            if count == 0:
                break
            sizes = receiver.segment_sizes(count)  # None: no GRO (one datagram per message)
            unread += (count if sizes is None
                       else sum(_datagrams_per_message(receiver.lengths(count), sizes)))
        return unread

    def abort(self) -> None:
        """Garbage collection of an unclosed owner: free the socket, send nothing more."""
        if not self._released:
            self._released = True
            self._kernel_final = kernel_drops(self.sock)
            self.sock.close()
