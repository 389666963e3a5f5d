"""Listener and listen(): one socket, one batch reader, one writer, many connections."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import math
import os
import resource
import socket
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self, final

from ._cmsg import pktinfo_ancillary
from ._conn import UDPConn
from ._demux import Demux
from ._dial import PeerSink
from ._engine import Engine, SharedBatches, SocketEngine
from ._errors import ListenerClosed, UDPXError
from ._idle import PRESSURE_FLOOR, PRESSURE_THRESHOLD, effective_timeout, sweep, sweep_interval
from ._opening import Opening
from ._options import DEFAULTS, Options
from ._protocol import ConnProtocol, check_factory, not_a_protocol
from ._queue import RxPool, RxQueue
from ._run import in_multi_worker_run
from ._sockets import (
    Address,
    PeerKey,
    address_from_key,
    bind_socket,
    buffer_sizes,
    ipv4_sockaddr,
    join_key,
    key_from_address,
    key_has_port,
    local_address,
    max_payload,
    resolve,
    sockaddr_from_key,
    split_key,
)
from ._stats import ListenerStats, drops_mapping, ecn_mapping
from ._transport import make_engine
from ._waiters import FifoWaiters

__all__ = ["Listener", "listen"]

logger = logging.getLogger("udpx")

#: Seconds between two warnings about a listener's drops (at most one per interval).
DROP_REPORT_INTERVAL = 10.0

#: Connections ``describe()`` lists by default: it runs on the loop (SIGUSR1 in the command
#: line), so it must not take seconds with a hundred thousand connections.
DESCRIBE_CONNS = 100

#: Connected mode leaves this many file descriptors of RLIMIT_NOFILE to the rest of the
#: process: a peer that would take one of them is refused (``fd_limit``).
FD_RESERVE = 64

#: Datagrams read from a new connected socket's queue before its reader starts (those that
#: reached it between bind() and connect()).
MAX_EARLY_DATAGRAMS = 1024

#: Local addresses whose connection details a packet-info listener remembers (a host has few;
#: all of 127/8 is local, so the cache is bounded).
_MAX_SOURCES = 1024


def _engine_totals(engine: Engine) -> tuple[int, int, int, int]:
    """A socket's tx packets, tx bytes, send errors and kernel drops."""
    writer = engine.writer
    return writer.tx_packets, writer.tx_bytes, writer.tx_errors, engine.kernel_drops()


def _fd_cap() -> int:
    """How many sockets connected mode may open: RLIMIT_NOFILE, less what the process has
    open now and ``FD_RESERVE`` for what it opens later (EMFILE is caught all the same)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:  # no procfs
        open_now = 0
    return max(0, soft - FD_RESERVE - open_now)


@final
class Listener(asyncio.DatagramProtocol):
    """Accepts one ``UDPConn`` per remote peer on one UDP socket.

    Created by ``udpx.listen()``. It is also an asyncio ``DatagramProtocol``:
    ``datagram_received`` is the demultiplexer's one-datagram entry, which the batch reader
    bypasses with whole batches.

    With a ``protocol_factory`` (protocol mode) every new connection is handed to its own
    protocol as it is made, and ``accept()`` is not used.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 options: Options,
                 protocol_factory: Callable[[], ConnProtocol] | None = None) -> None:
        self._loop = loop
        self._options = options
        self._protocol_factory = protocol_factory
        self._family = sock.family
        #: The largest datagram an IPv4 listener's connections send (an IPv6 one's depends on
        #: the peer: IPv4-mapped or not), computed once rather than per new peer.
        self._max_send = min(options.max_datagram, max_payload(socket.AF_INET, None))
        self._local: Address = sock.getsockname()
        self._pool = RxPool(options.rx_memory_limit)
        self._rx_queue_size = options.rx_queue_size
        self._protocol_mode = protocol_factory is not None
        self._demux = Demux(max_conns=options.max_conns,
                            backlog=options.backlog if protocol_factory is None else None,
                            create=self._create_conn if protocol_factory is None
                            else self._create_protocol_conn,
                            # Port 0 is no peer's real port: a reply to it fails (EINVAL),
                            # so it opens no connection.
                            pool=self._pool, valid=key_has_port,
                            pressure_mark=math.ceil(PRESSURE_THRESHOLD * options.max_conns),
                            on_pressure=self._pressure, protocol=protocol_factory is not None)
        # The sink interface, bound straight to the demultiplexer: no call layer per batch.
        self.feed_batch = self._demux.feed_batch
        self.feed_one = self._demux.feed_one
        # A wildcard listener answers each peer from the address it sent to (see _cmsg).
        self._engine = make_engine(loop, sock, options, self, named=True,
                                   pktinfo=self._local[0] in ("0.0.0.0", "::"), recverr=True,
                                   on_empty=self._hand_over if options.connected else None)
        if isinstance(self._engine, SocketEngine):
            # Read coalescing does not pause while the connections' queues overflow.
            self._engine.reader.overflow = self._demux
            if protocol_factory is None:
                # Task mode: with many peers a wake-up reads on past its budget while the
                # datagrams land in connections it already woke (see BatchReader.spread); and
                # its wake-ups wake a bounded number of tasks each (see WAKES_PER_TURN).
                self._engine.reader.spread = self._demux
                self._demux.pace(loop.call_soon)
            if not options.connected and not options.ecn:
                # A flood of new peers: connections are opened a few hundred per loop
                # iteration, while the reader goes on emptying the socket into held batches
                # (see OPEN_PER_TURN), up to a bound past which it stops reading for a while.
                # Not in connected mode, whose handover needs every earlier datagram routed
                # once the socket reads empty, nor with ``ecn``, whose counts go to the
                # connections as the datagrams are read.
                reader = self._engine.reader
                self._demux.defer_opening(loop.call_soon, on_held_full=reader.stop,
                                          on_held_room=self._read_again)
                reader.on_wake = self._demux.new_open_turn
        # Connected mode (see _peer_engine): each connection's own socket, the ones whose
        # reader waits for the listener's socket to be drained, totals of the closed ones.
        self._connected = options.connected
        if self._connected and not isinstance(self._engine, SocketEngine):
            raise UDPXError("connected=True needs the batch engine, which this loop cannot "
                            "drive")
        self._peer_engines: dict[UDPConn, SocketEngine] = {}
        # Their sockets' batch arrays: one set for all of them (see SharedBatches).
        self._peer_batches = SharedBatches()
        # Each with the datagrams its socket held right after connect() (see _read_early).
        self._handover: list[tuple[UDPConn, SocketEngine, list[tuple[bytes, Address]]]] = []
        self._retired = [0, 0, 0, 0]  # tx packets, tx bytes, send errors, kernel drops
        self._fd_cap = _fd_cap() if self._connected else 0
        self._engine_released = False
        #: Connections are (peer, local address) and answer from it (wildcard listeners).
        self._pktinfo = self._engine.state.pktinfo
        # A new connection on an IPv4 listener on one address, sharing its socket, needs
        # nothing decided per peer but its sockaddr (see _new_conn).
        self._plain = (self._family == socket.AF_INET and not self._pktinfo
                       and not self._connected)
        #: Per local address (raw) of a packet-info listener: the connections' local address
        #: and source control message, built once per address rather than per connection.
        self._sources: dict[bytes, tuple[Address, tuple[int, int, bytes]]] = {}
        self._writer = self._engine.writer
        self._conns: dict[PeerKey, UDPConn] = {}
        # Connections created and not yet accepted, oldest first. An OrderedDict so that a
        # connection closed before accept() leaves it in O(1) (a deque's remove scans).
        self._backlog: OrderedDict[UDPConn, None] = OrderedDict()
        self._acceptors = FifoWaiters(loop)
        self._accepted = 0
        self._icmp_errors = 0
        self._ecn = [0, 0, 0, 0]  # datagrams received per ECN codepoint (``ecn``)
        self._closed = False
        self._done: asyncio.Future[None] = loop.create_future()
        self.rcvbuf, self.sndbuf = buffer_sizes(self._engine.sock)
        self._sweeper: asyncio.TimerHandle | None = None
        if options.idle_timeout is not None:
            self._sweeper = loop.call_later(sweep_interval(options.idle_timeout), self._sweep)
        self._drops_reported: dict[str, int] = {}
        self._drop_reporter = loop.call_later(DROP_REPORT_INTERVAL, self._report_drops)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<udpx.Listener {state} {self._local!r} conns={len(self._conns)}>"

    # -- the receive side --------------------------------------------------------------------

    def _read_again(self) -> None:
        """What was held while connections opened is down to half its bound: read again."""
        if not self._closed and isinstance(self._engine, SocketEngine):
            self._engine.reader.start()

    def socket_error(self, exc: OSError) -> None:
        # An error the error queue did not attribute to a peer: log and go on.
        logger.warning("udpx: receive error on listener %r: %s", self._local, exc)

    def closed_unread(self, count: int) -> None:
        self._pool.dropped_closed += count

    def count_ecn(self, keys: Sequence[PeerKey] | None, codes: Sequence[int],
                  pieces: Sequence[int]) -> None:
        # Opt-in (``ecn``), and only for marked datagrams: a lookup per marked message.
        assert keys is not None
        conns_get = self._conns.get
        totals = self._ecn
        for key, code, count in zip(keys, codes, pieces):
            if code:
                totals[code] += count
                conn = conns_get(key)
                if conn is not None:
                    conn._ecn_counts()[code] += count

    def peer_error(self, key: PeerKey, exc: OSError, info: int) -> None:
        """An ICMP error about a datagram sent to ``key``'s peer (from the socket's error
        queue): it goes to that connection only, as on a dialed one."""
        self._icmp_errors += 1
        conn = self._conns.get(key)
        if conn is not None:
            conn._network_error(exc, info)
        else:
            logger.debug("udpx: listener %r: %s from a peer with no connection", self._local,
                         exc)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        """Route one datagram from ``addr`` (asyncio's DatagramProtocol entry point)."""
        if self._closed:
            return
        self._engine.feed_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        logger.warning("udpx: error on listener %r: %s", self._local, exc)

    def _new_conn(self, key: PeerKey) -> UDPConn | None:
        # Run for every new peer (10,000 of them arrive at once under a flood): the address
        # tuple is built only where it decides something (an IPv6 socket's limit depends on
        # whether the peer is IPv4-mapped) or is logged.
        if self._plain:
            # The usual listener, and the cheapest case: the rest of this method, decided
            # once (measured: opening 10,000 protocol-mode connections costs about 10 % less).
            conn = UDPConn(self._loop, self, None, self._writer, self._rx_queue_size,
                           self._pool, self._max_send, self._local, None, ipv4_sockaddr(key),
                           key, self._protocol_mode, None)
            self._conns[key] = conn
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("udpx: new connection from %r on %r", conn.remote_addr,
                             self._local)
            return conn
        family = self._family
        remote = address_from_key(family, key) if family != socket.AF_INET else None
        local_addr = self._local
        source = None
        if self._pktinfo:
            # The connection is (peer, local address): it answers from that address.
            local = split_key(family, key)[1]
            if local is not None:
                known = self._sources.get(local)
                if known is None:
                    if len(self._sources) >= _MAX_SOURCES:
                        self._sources.clear()
                    known = self._sources[local] = (
                        local_address(family, local, self._local[1]),
                        pktinfo_ancillary(family, local))
                local_addr, source = known
        engine: SocketEngine | None = None
        max_send = (self._max_send if family == socket.AF_INET
                    else min(self._options.max_datagram, max_payload(family, remote)))
        if self._connected:
            engine = self._peer_engine(key, local_addr)
            if engine is None:
                return None
        # By position (see UDPConn.__init__): loop, owner, engine, writer, rx_queue_size, pool,
        # max_send, local_addr, remote_addr (built from the key on demand), sockaddr, key,
        # protocol_mode, source.
        conn = UDPConn(self._loop, self, engine,
                       self._writer if engine is None else engine.writer,
                       self._options.rx_queue_size, self._pool, max_send, local_addr, None,
                       sockaddr_from_key(family, key) if engine is None else None,
                       key, self._protocol_factory is not None,
                       source if engine is None else None)
        if engine is not None:
            # Its socket's reader starts once the listener's socket was read empty, after
            # every datagram the peer sent there before connect() (_hand_over).
            sink = engine.sink
            assert isinstance(sink, PeerSink)
            sink.attach(conn)
            sink.ecn_totals = self._ecn  # the listener's totals count every socket's
            self._peer_engines[conn] = engine
            self._handover.append((conn, engine, self._read_early(engine)))
            self._engine.reader.drain_to_empty = True  # type: ignore[attr-defined]
        self._conns[key] = conn
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("udpx: new connection from %r on %r", conn.remote_addr, self._local)
        return conn

    def _create_conn(self, key: PeerKey) -> RxQueue | None:
        conn = self._new_conn(key)
        if conn is None:
            return None
        self._backlog[conn] = None
        if self._acceptors:
            self._acceptors.wake(1)
        return conn._rx

    def _create_protocol_conn(self, key: PeerKey) -> RxQueue | None:
        # Protocol mode: the connection goes to its protocol now, not to a backlog. A failing
        # factory, or a connection_made that raises or closes the connection, refuses the peer
        # (the demultiplexer counts its datagram as ``refused``).
        factory = self._protocol_factory
        assert factory is not None
        try:
            # (make_protocol's check, inlined: this runs for every new peer.)
            protocol = factory()
            if not isinstance(protocol, ConnProtocol):
                raise not_a_protocol(protocol)
        except Exception as exc:
            self._loop.call_exception_handler({
                "message": f"udpx: protocol_factory raised on listener {self._local!r}; "
                           f"peer {address_from_key(self._family, key)!r} refused",
                "exception": exc,
            })
            return None
        conn = self._new_conn(key)
        if conn is None:
            return None
        conn._start_protocol(protocol)
        if conn.closed:  # connection_made raised or closed it: the peer was refused
            return None
        self._accepted += 1
        return conn._rx

    # -- connections -------------------------------------------------------------------------

    # -- connected mode ----------------------------------------------------------------------

    def _peer_engine(self, key: PeerKey, local_addr: Address) -> SocketEngine | None:
        """A socket of the new peer's own, bound to the local address it sent to and
        connect()ed to it, with its engine (reading starts at the handover); None when the
        peer is refused (no file descriptor left: counted as ``fd_limit``)."""
        if len(self._peer_engines) >= self._fd_cap:
            self._demux.refusal = "dropped_fd_limit"
            return None
        options = self._options
        # SO_REUSEADDR on both sockets lets this one bind the listener's address; once it is
        # connected the kernel prefers it (a full 4-tuple match) for this peer's datagrams,
        # and every other peer still reaches the listener's socket.
        try:
            sock = bind_socket(self._family, local_addr,
                               connect_to=address_from_key(self._family, key),
                               reuse_port=options.reuse_port, reuse_addr=True,
                               rcvbuf=options.rcvbuf, sndbuf=options.sndbuf)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._demux.refusal = "dropped_fd_limit"
            else:
                logger.warning("udpx: listener %r: no socket for a new peer: %s", self._local,
                               exc)
            return None
        try:
            # One batch per wake-up: the loop wakes every readable peer socket in the same
            # iteration, so the usual budget (1,024 per socket) would let one iteration read
            # up to N x 1,024 datagrams under load (about a second with 1,000 busy peers:
            # timers and tasks starve); a batch each keeps an iteration near what the shared
            # socket's reader takes, and the rest waits in each socket's kernel buffer.
            sink = PeerSink()
            engine = SocketEngine(self._loop, sock, options, sink, named=False,
                                  read_budget=options.batch_size,
                                  batches=self._peer_batches)
            engine.reader.overflow = sink
            return engine
        except BaseException:
            sock.close()
            raise

    def _hand_over(self) -> None:
        """The listener's socket was read empty, after the pending connections' sockets were
        connected: every datagram their peers sent to the listener's socket before is in
        their queues now, so their own sockets' readers may start (order is kept)."""
        self._engine.reader.drain_to_empty = False  # type: ignore[attr-defined]
        if not self._handover:
            return
        pending, self._handover = self._handover, []
        for conn, engine, early in pending:
            if conn.closed:
                continue
            self._take_early(conn, engine, early)
            engine.reader.start()

    def _read_early(self, engine: SocketEngine) -> list[tuple[bytes, Address]]:
        """Read, right after its connect(), what reached the new socket between its bind()
        and its connect() (that socket then matched any peer as well as the listener's did),
        to be delivered at the handover. Read now, not at the handover: by then the socket
        also holds everything the peer sent since the connect, which its batch reader takes
        (reading that here, one recvfrom of max_datagram + 1 bytes per datagram for every
        pending connection in one callback, stalled the loop for seconds under a flood of
        new peers)."""
        early: list[tuple[bytes, Address]] = []
        recvfrom = engine.sock.recvfrom
        size = self._options.max_datagram + 1
        for _ in range(MAX_EARLY_DATAGRAMS):
            try:
                early.append(recvfrom(size))
            except OSError:  # BlockingIOError: nothing (more); or a pending ICMP error
                break
        return early

    def _take_early(self, conn: UDPConn, engine: SocketEngine,
                    early: list[tuple[bytes, Address]]) -> None:
        """Deliver the datagrams ``_read_early`` took from the new socket: the peer's go to
        its connection; another peer's go through the listener, as if the listener had read
        them."""
        family = self._family
        key = conn._key
        assert key is not None
        peer_key, local = split_key(family, key) if self._pktinfo else (key, None)
        sink = engine.sink
        for data, address in early:
            source = key_from_address(family, address)
            if source == peer_key:
                sink.feed_one(None, data if len(data) <= self._options.max_datagram else None)
            else:
                self.feed_one(source if local is None else join_key(family, source, local),
                              data if len(data) <= self._options.max_datagram else None)

    def _retire(self, engine: SocketEngine) -> None:
        self._retired = [total + count for total, count in zip(self._retired,
                                                               _engine_totals(engine))]

    async def accept(self) -> UDPConn:
        """Wait for the next connection (a datagram from a new peer).

        Cancellation-safe: a cancelled ``accept()`` takes no connection.

        Raises:
            ListenerClosed: the listener is closed.
            UDPXError: the listener is in protocol mode (its connections go to their
                protocols).
        """
        if self._protocol_factory is not None:
            raise UDPXError("this listener is in protocol mode: every connection is handed to "
                            "a protocol from protocol_factory as it is made, so accept() has "
                            "none to return")
        while True:
            if self._closed:
                raise ListenerClosed("listener closed")
            if self._backlog:
                conn, _ = self._backlog.popitem(last=False)
                self._demux.accepted()
                self._accepted += 1
                return conn
            await self._acceptors.wait()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> UDPConn:
        try:
            return await self.accept()
        except ListenerClosed:
            raise StopAsyncIteration from None

    def conns(self) -> list[UDPConn]:
        """A new list of the open connections, accepted or not yet."""
        return list(self._conns.values())

    def _conn_closing(self, conn: UDPConn) -> None:
        key = conn._key
        assert key is not None
        if self._conns.get(key) is conn:
            del self._conns[key]
            self._demux.remove(key)
        if self._protocol_factory is None and self._backlog.pop(conn, False) is None:
            # Closed before accept() returned it: the application can never read its queue,
            # so what is queued there counts as dropped (``unaccepted``), not delivered.
            self._demux.accepted()
            conn._rx.discard_unread()
        logger.debug("udpx: connection from %r closed", conn.remote_addr)
        engine = self._peer_engines.get(conn)
        if engine is None:
            # Finished once its own queued datagrams have left, however busy the socket is.
            self._writer.when_drained(conn._tx, conn._finished)
            return

        def released() -> None:
            # Its own socket (connected mode) is freed, after its queued datagrams left.
            del self._peer_engines[conn]
            self._retire(engine)
            conn._finished()
            self._maybe_done()

        engine.close(released)

    def _report_drops(self) -> None:
        # At most one warning per interval, and only when something was dropped: never per
        # datagram. O(connections), like the idle sweep.
        self._log_drops(f"in the last {DROP_REPORT_INTERVAL:.0f} s")
        self._drop_reporter = self._loop.call_later(DROP_REPORT_INTERVAL, self._report_drops)

    def _log_drops(self, when: str, *, ignore: frozenset[str] = frozenset()) -> None:
        """Warn of the drops since the last warning, by reason (``ignore``: reasons left out
        of the warning, still taken as reported)."""
        drops = dict(self.stats.drops)
        new = {reason: count - self._drops_reported.get(reason, 0)
               for reason, count in drops.items()
               if count > self._drops_reported.get(reason, 0) and reason not in ignore}
        if new:
            # The kernel's drops are the one reason the application cannot see coming from its
            # own code: say what overflowed and what holds more.
            hint = (f" (kernel: most likely a receive buffer of {self.rcvbuf:,} bytes "
                    f"overflowed; a larger rcvbuf holds more, and a datagram takes far more of it "
                    f"than its payload)" if "kernel" in new else "")
            logger.warning("udpx: listener %r dropped datagrams %s: %s%s", self._local, when,
                           ", ".join(f"{reason}={count}" for reason, count in new.items()), hint)
        self._drops_reported = drops

    def describe(self, *, max_conns: int | None = DESCRIBE_CONNS) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the listener and of its open connections: address,
        options, socket buffer sizes granted by the kernel, queue depths, stats.

        ``conns`` lists at most ``max_conns`` connections (None: all of them, which takes about
        10 us each); ``conns_open`` says how many are open.

        Raises:
            ValueError: ``max_conns`` is not None or a non-negative int.
        """
        if max_conns is not None and (isinstance(max_conns, bool)
                                      or not isinstance(max_conns, int) or max_conns < 0):
            raise ValueError(f"max_conns must be None or an int >= 0, got {max_conns!r}")
        listed = list(self._conns.values()) if max_conns is None else [
            conn for conn, _ in zip(self._conns.values(), range(max_conns))]
        options = {item.name: getattr(self._options, item.name)
                   for item in dataclasses.fields(self._options)}
        options.pop("local_addr", None)
        return {
            "local_addr": list(self._local),
            "closed": self._closed,
            "mode": "task" if self._protocol_factory is None else "protocol",
            "connected": self._connected,
            # Connected mode: new connections whose own sockets are not read yet (they wait for
            # the listener's socket to be read empty, so that their peers' order is kept).
            "handover_pending": len(self._handover),
            # Datagrams read and held while their new peers' connections wait to be opened
            # (a flood of new peers: a few hundred are opened per loop iteration).
            "opening_held": self._demux.held_count,
            "options": options,
            "socket": self._engine.describe(),
            "backlog": len(self._backlog),
            "idle_timeout_now": self._effective_timeout(),
            "stats": self.stats.as_dict(),
            "conns_open": len(self._conns),
            "conns": [conn.describe() for conn in listed],
        }

    # -- idle reaping -----------------------------------------------------------------------

    def _effective_timeout(self) -> float | None:
        timeout = self._options.idle_timeout
        if timeout is None:
            return None
        return effective_timeout(timeout, len(self._conns), self._options.max_conns)

    def _sweep(self) -> None:
        # One timer per listener, O(connections) per sweep; nothing per datagram. Under
        # pressure (many connections, e.g. a flood of one-datagram peers) the timeout in force
        # shrinks toward PRESSURE_FLOOR and sweeps come as often, so new peers get in again.
        timeout = self._effective_timeout()
        assert timeout is not None
        idle = sweep(self._loop.time(), timeout, self._conns.values())
        for conn in idle:
            logger.debug("udpx: connection from %r reaped after %.1f s idle", conn.remote_addr,
                         self._loop.time() - conn.idle_since)
            conn._close("idle")
        if idle and timeout < self._options.idle_timeout:  # type: ignore[operator]
            logger.info("udpx: listener %r reaped %d connections idle for %.0f s (under "
                        "pressure: %d open of max_conns %d)", self._local, len(idle), timeout,
                        len(self._conns) + len(idle), self._options.max_conns)
        self._sweeper = self._loop.call_later(
            sweep_interval(self._effective_timeout() or timeout), self._sweep)

    def _pressure(self) -> None:
        """The table reached 75 % of max_conns: make sure a sweep comes within the floor's
        interval rather than in up to half an hour."""
        if self._sweeper is None or self._closed:
            return
        soon = self._loop.time() + sweep_interval(min(PRESSURE_FLOOR, self._options.idle_timeout
                                                      or PRESSURE_FLOOR))
        if self._sweeper.when() > soon:
            self._sweeper.cancel()
            self._sweeper = self._loop.call_at(soon, self._sweep)

    @property
    def next_sweep(self) -> float | None:
        """The loop time of the next idle sweep (None: no idle reaping)."""
        return self._sweeper.when() if self._sweeper is not None else None

    # -- introspection ----------------------------------------------------------------------

    @property
    def local_addr(self) -> Address:
        """The address the listener is bound to."""
        return self._local

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def options(self) -> Options:
        return self._options

    @property
    def stats(self) -> ListenerStats:
        """A snapshot of the counters: totals over all connections, past and present.

        O(1): the totals are kept as datagrams pass, not summed over connections."""
        pool = self._pool
        demux = self._demux
        # Connected mode adds each connection's own socket: O(open connections) there.
        tx_packets, tx_bytes, tx_errors, kernel = map(sum, zip(
            self._retired, _engine_totals(self._engine),
            *map(_engine_totals, self._peer_engines.values())))
        counts = {
            "rx_queue_full": pool.dropped_full,
            "truncated": pool.dropped_truncated,
            "send_error": tx_errors,
            "backlog_full": demux.dropped_backlog,
            "conn_limit": demux.dropped_conn_limit,
            "kernel": kernel,
            "unaccepted": pool.dropped_unaccepted,
            "memory_limit": pool.dropped_memory,
            "bad_source": demux.dropped_bad_source,
            "refused": demux.dropped_refused,
            "closed": pool.dropped_closed + demux.dropped_closed,
        }
        if self._connected:
            counts["fd_limit"] = demux.dropped_fd_limit
        return ListenerStats(pool.rx_packets, pool.rx_bytes, tx_packets, tx_bytes,
                             drops_mapping(**counts), len(self._conns), self._accepted,
                             self._icmp_errors, ecn_mapping(self._ecn))

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the listener and all its connections. Idempotent.

        Receiving stops at once; what connections queued for sending is still sent, then the
        socket is closed. ``accept()`` waiters get ``ListenerClosed``; connections' ``recv()``
        return what was received, then raise ``ConnectionClosed``.
        """
        if self._closed:
            return
        self._closed = True
        # No new connection either, not even for the rest of a batch whose callback closed
        # the listener.
        self._demux.closed = True
        self._demux.discard_held()
        self._engine.stop_reading()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._drop_reporter.cancel()
        # What the last interval dropped would otherwise never be told (a short-lived server's
        # only report); what closing itself drops (``closed``, ``unaccepted``) is no news.
        self._log_drops("since the last report, as it closes",
                        ignore=frozenset({"closed", "unaccepted"}))
        for conn in list(self._conns.values()):
            conn.close()
        self._demux.paced.clear()  # closing woke every waiter
        self._acceptors.wake_all()
        self._engine.close(self._released)

    def _released(self) -> None:
        self._engine_released = True
        self._maybe_done()

    def _maybe_done(self) -> None:
        # Closed once its own socket and every connection's (connected mode) are freed.
        if self._engine_released and not self._peer_engines and not self._done.done():
            self._done.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until a closed listener has flushed and freed its socket."""
        await asyncio.shield(self._done)

    async def aclose(self) -> None:
        """``close()`` then ``wait_closed()``."""
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if not getattr(self, "_closed", True):
            _warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self._engine.abort()


def listen(host: str | None, port: int, *,
           protocol_factory: Callable[[], ConnProtocol] | None = None,
           batch_size: int = DEFAULTS.batch_size, max_datagram: int = DEFAULTS.max_datagram,
           rx_queue_size: int = DEFAULTS.rx_queue_size,
           tx_queue_size: int = DEFAULTS.tx_queue_size,
           rx_memory_limit: int = DEFAULTS.rx_memory_limit,
           idle_timeout: float | None = DEFAULTS.idle_timeout,
           max_conns: int = DEFAULTS.max_conns, backlog: int = DEFAULTS.backlog,
           reuse_port: bool | None = None, rcvbuf: int | None = DEFAULTS.rcvbuf,
           sndbuf: int | None = DEFAULTS.sndbuf, gso: bool = DEFAULTS.gso,
           gro: bool = DEFAULTS.gro, dont_fragment: bool = DEFAULTS.dont_fragment,
           ecn: bool = DEFAULTS.ecn, engine: str = DEFAULTS.engine,
           connected: bool = DEFAULTS.connected,
           rx_coalesce: float = DEFAULTS.rx_coalesce) -> Opening[Listener]:
    """Listen for datagrams on ``host``/``port`` (``host=None``: every interface, IPv6
    dual-stack where available; ``port=0``: a free port, see ``local_addr``).

    Await the result, or use it with ``async with``.

    ``protocol_factory`` (protocol mode): a callable returning a ``udpx.ConnProtocol``, called
    for every new peer; the connection's datagrams then go to its protocol's callbacks, in
    the reader, with no task per peer, and ``accept()`` is not used (``backlog`` does not
    apply). The options are described in ``udpx.Options``.

    ``reuse_port=None`` (the default) means: True in a worker of ``udpx.run()`` with more than
    one worker (every worker then has its own socket on the port, and the kernel keeps each
    peer on one of them), False anywhere else. ``port=0`` cannot be shared that way (each
    worker would get a different free port): in such a worker it raises ``ValueError``
    unless ``reuse_port`` is given explicitly.

    Raises:
        ValueError: an option is invalid (raised here, at the call), naming it.
        TypeError: ``protocol_factory`` is not callable.
        OSError: the socket cannot be created or bound (raised when awaited).
    """
    if reuse_port is None:
        reuse_port = in_multi_worker_run()
        if reuse_port and port == 0:
            raise ValueError(
                "port=0 in a worker of udpx.run() with several workers would give each worker "
                "a different free port: pass a port number (or reuse_port=False for a socket "
                "of this worker's own)")
    options = Options(batch_size=batch_size, max_datagram=max_datagram,
                      rx_queue_size=rx_queue_size, tx_queue_size=tx_queue_size,
                      rx_memory_limit=rx_memory_limit,
                      idle_timeout=idle_timeout, max_conns=max_conns, backlog=backlog,
                      reuse_port=reuse_port, rcvbuf=rcvbuf, sndbuf=sndbuf, gso=gso,
                      gro=gro, dont_fragment=dont_fragment, ecn=ecn, engine=engine,
                      connected=connected, rx_coalesce=rx_coalesce)
    check_factory(protocol_factory)
    if port is None or isinstance(port, bool) or not isinstance(port, int) or not (
            0 <= port <= 65535):
        raise ValueError(f"port must be an int between 0 and 65535, got {port!r}")

    async def open_listener() -> Listener:
        loop = asyncio.get_running_loop()
        family, address = await resolve(loop, host, port, passive=True)
        sock = bind_socket(family, address, reuse_port=options.reuse_port,
                           reuse_addr=options.connected, rcvbuf=options.rcvbuf,
                           sndbuf=options.sndbuf)
        try:
            listener = Listener(loop, sock, options, protocol_factory)
        except BaseException:
            sock.close()
            raise
        try:
            await listener._engine.open()
        except BaseException:
            listener.close()
            raise
        return listener

    return Opening(open_listener)


