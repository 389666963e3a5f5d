"""Protocol-mode connections: ``listen(..., protocol_factory=F)`` and ``dial(...,
protocol_factory=F)``, over real sockets on loopback, on both loops."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import udpx

from .conftest import EchoProtocol, Runner, free_udp_port, settle

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None  # type: ignore[assignment]


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@contextlib.contextmanager
def _peers(host: str, count: int) -> Iterator[list[socket.socket]]:
    """``count`` plain blocking client sockets, each its own peer."""
    with contextlib.ExitStack() as stack:
        peers = [stack.enter_context(socket.socket(_family(host), socket.SOCK_DGRAM))
                 for _ in range(count)]
        for peer in peers:
            peer.bind((host, 0))
            peer.settimeout(5)
        yield peers


class Recorder(udpx.ConnProtocol):
    """Records every callback, in order, and signals what tests wait for."""

    def __init__(self, events: list[tuple[Recorder, str, Any]] | None = None) -> None:
        self.events = events if events is not None else []
        self.conn: udpx.UDPConn | None = None
        self.received: list[bytes] = []
        self.batches: list[list[bytes]] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.arrived = asyncio.Event()

    def connection_made(self, conn: udpx.UDPConn) -> None:
        self.conn = conn
        self.events.append((self, "made", conn))

    def datagrams_received(self, datagrams: list[bytes]) -> None:
        self.events.append((self, "received", list(datagrams)))
        self.batches.append(datagrams)
        self.received.extend(datagrams)
        self.arrived.set()

    def error_received(self, exc: OSError) -> None:
        self.events.append((self, "error", exc))
        self.arrived.set()

    def pause_writing(self) -> None:
        self.events.append((self, "pause_writing", None))

    def resume_writing(self) -> None:
        self.events.append((self, "resume_writing", None))

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append((self, "lost", exc))
        self.lost.set_result(exc)


class Factory:
    """A protocol factory that keeps what it made."""

    def __init__(self, cls: Callable[[], Recorder] = Recorder) -> None:
        self.cls = cls
        self.made: list[Recorder] = []
        self.new = asyncio.Event()

    def __call__(self) -> Recorder:
        protocol = self.cls()
        self.made.append(protocol)
        self.new.set()
        return protocol

    async def wait_for(self, count: int) -> None:
        while len(self.made) < count:
            self.new.clear()
            await self.new.wait()


async def _received(protocol: Recorder, count: int) -> None:
    while len(protocol.received) < count:
        protocol.arrived.clear()
        await protocol.arrived.wait()


# -- the callbacks ---------------------------------------------------------------------------


def test_callback_order_and_echo(run: Runner[Any], host: str, engine: str) -> None:
    """connection_made, then datagrams_received with the datagrams in order, once per batch
    (the three datagrams sent at once arrive in one batch), then connection_lost(None) after
    close; nothing goes to accept()."""

    class Echo(Recorder):
        def datagrams_received(self, datagrams: list[bytes]) -> None:
            super().datagrams_received(datagrams)
            assert self.conn is not None
            self.conn.send_many_nowait(datagrams)

    async def main() -> None:
        factory = Factory(Echo)
        async with udpx.listen(host, 0, protocol_factory=factory, engine=engine) as ln:
            with _peers(host, 1) as (peer,):
                for data in (b"one", b"two", b""):
                    peer.sendto(data, ln.local_addr[:2])
                replies = [await asyncio.to_thread(peer.recv, 100) for _ in range(3)]
            assert replies == [b"one", b"two", b""]
            (protocol,) = factory.made
            assert protocol.conn is not None and protocol.conn.protocol is protocol
            calls = 1 if engine == "mmsg" else 3
            assert [kind for _, kind, _ in protocol.events] == ["made"] + ["received"] * calls
            # One batch (the loop's transport delivers one datagram per call).
            assert protocol.batches == ([[b"one", b"two", b""]] if engine == "mmsg" else
                                        [[b"one"], [b"two"], [b""]])
            assert ln.conns() == [protocol.conn]
            stats = ln.stats
            assert (stats.rx_packets, stats.tx_packets, stats.conns, stats.accepted) == (
                3, 3, 1, 1)
            with pytest.raises(udpx.UDPXError, match="protocol mode"):
                await ln.accept()
            assert ln.describe()["mode"] == "protocol"
            with pytest.raises(udpx.UDPXError, match="protocol mode"):
                await protocol.conn.recv()
            protocol.conn.close()
            assert await protocol.lost is None
            assert [kind for _, kind, _ in protocol.events] == (
                ["made"] + ["received"] * calls + ["lost"])

    run(main())


def test_default_datagrams_received_calls_datagram_received(run: Runner[Any], engine: str) -> None:
    class One(udpx.ConnProtocol):
        def __init__(self) -> None:
            self.got: list[bytes] = []
            self.done = asyncio.Event()

        def datagram_received(self, data: bytes) -> None:
            self.got.append(data)
            if len(self.got) == 3:
                self.done.set()

    async def main() -> None:
        made: list[One] = []

        def factory() -> One:
            made.append(One())
            return made[-1]

        async with udpx.listen("127.0.0.1", 0, protocol_factory=factory, engine=engine) as ln:
            with _peers("127.0.0.1", 1) as (peer,):
                for data in (b"a", b"b", b"c"):
                    peer.sendto(data, ln.local_addr)
                await settle(ln, 3)
            await asyncio.wait_for(made[0].done.wait(), 5)
            assert made[0].got == [b"a", b"b", b"c"]

    run(main())


@pytest.mark.parametrize("action", ["close", "pause_reading", "raise"])
def test_default_datagrams_received_stops_where_a_callback_stopped(
        run: Runner[Any], action: str) -> None:
    """A protocol that keeps the default datagrams_received and closes its connection, pauses
    reading or raises in datagram_received on the first datagram of a batch gets no more of
    it: the rest is counted as ``closed`` (closed, raised) or waits for resume_reading().
    (The batch engine: the loop's transport delivers one datagram per call, and a closed
    connection's peer opens a new one with its next datagram.)"""

    class One(udpx.ConnProtocol):
        def __init__(self) -> None:
            self.got: list[bytes] = []
            self.conn: udpx.UDPConn | None = None

        def connection_made(self, conn: udpx.UDPConn) -> None:
            self.conn = conn

        def datagram_received(self, data: bytes) -> None:
            self.got.append(data)
            assert self.conn is not None
            if data == b"0":
                if action == "close":
                    self.conn.close()
                elif action == "pause_reading":
                    self.conn.pause_reading()
                else:
                    raise RuntimeError("refused")

    async def main() -> None:
        made: list[One] = []
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))

        def factory() -> One:
            made.append(One())
            return made[-1]

        async with udpx.listen("127.0.0.1", 0, protocol_factory=factory) as ln:
            with _peers("127.0.0.1", 1) as (peer,):
                for index in range(10):  # all sent before the listener reads: one batch
                    peer.sendto(b"%d" % index, ln.local_addr)
                await settle(ln, 10)
                (protocol,) = made
                conn = protocol.conn
                assert conn is not None
                assert protocol.got == [b"0"]
                if action == "pause_reading":
                    assert (conn.stats.rx_packets, conn.describe()["rx_queued"]) == (10, 9)
                    conn.resume_reading()
                    for _ in range(1000):  # delivered from the loop, soon
                        if len(protocol.got) == 10:
                            break
                        await asyncio.sleep(0.001)
                    assert protocol.got == [b"%d" % index for index in range(10)]
                    assert sum(ln.stats.drops.values()) == 0
                else:
                    assert conn.closed
                    assert (conn.stats.rx_packets, conn.stats.drops["closed"]) == (1, 9)
                    assert (ln.stats.rx_packets, ln.stats.drops["closed"]) == (1, 9)
                    assert len(errors) == (action == "raise")

    run(main())


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(peers=st.integers(1, 40),
       plan=st.lists(st.tuples(st.integers(0, 39), st.binary(max_size=40)), min_size=1,
                     max_size=150),
       paused=st.sets(st.integers(0, 39), max_size=5))
def test_each_datagram_reaches_its_own_protocol_in_order(
        loop_kind: str, peers: int, plan: list[tuple[int, bytes]], paused: set[int]) -> None:
    """Up to 40 peers' datagrams interleaved as Hypothesis says, all sent before the listener
    reads, so that batches mix peers (with repeats, or all different: two routing paths), in
    two rounds (the second finds every peer known), some peers' reading paused in between:
    every protocol gets exactly its own peer's datagrams, in order, once resumed."""
    plan = [(index % peers, data) for index, data in plan]
    async def main() -> None:
        factory = Factory()
        async with udpx.listen("127.0.0.1", 0, protocol_factory=factory, rcvbuf=1 << 20,
                               batch_size=16) as ln:
            with _peers("127.0.0.1", peers) as sockets:
                expected: dict[int, list[bytes]] = {}
                for index, data in plan:
                    sockets[index].sendto(data, ln.local_addr)
                    expected.setdefault(sockets[index].getsockname()[1], []).append(data)
                await settle(ln, len(plan))
                by_port = {protocol.conn.remote_addr[1]: protocol
                           for protocol in factory.made if protocol.conn is not None}
                held = [by_port[sockets[index % peers].getsockname()[1]] for index in paused
                        if sockets[index % peers].getsockname()[1] in by_port]
                for protocol in held:
                    assert protocol.conn is not None
                    protocol.conn.pause_reading()
                for index, data in plan:
                    sockets[index].sendto(data, ln.local_addr)
                    expected[sockets[index].getsockname()[1]].append(data)
                await settle(ln, 2 * len(plan))
                for protocol in held:
                    assert protocol.conn is not None
                    protocol.conn.resume_reading()
                for port, protocol in by_port.items():
                    await _received(protocol, len(expected[port]))
            stats = ln.stats
            assert stats.rx_packets == 2 * len(plan), stats
            assert sum(stats.drops.values()) == 0, stats
            got = {port: protocol.received for port, protocol in by_port.items()}
            assert got == expected
            for protocol in factory.made:
                assert all(len(batch) >= 1 for batch in protocol.batches)

    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:  # the run fixture, per example
        runner.run(asyncio.wait_for(main(), 30))


# -- reading paused ---------------------------------------------------------------------------


def test_pause_and_resume_reading_lose_nothing_uncounted(run: Runner[Any], host: str,
        engine: str) -> None:
    """While reading is paused, datagrams wait in the connection's queue (its bound drops the
    rest, counted); resume delivers what waited, in order, from the loop."""

    class Pausing(Recorder):
        def connection_made(self, conn: udpx.UDPConn) -> None:
            super().connection_made(conn)
            conn.pause_reading()
            assert not conn.is_reading()

    async def main() -> None:
        factory = Factory(Pausing)
        async with udpx.listen(host, 0, protocol_factory=factory, rx_queue_size=10,
                               engine=engine) as ln:
            with _peers(host, 1) as (peer,):
                for index in range(25):
                    peer.sendto(b"%d" % index, ln.local_addr[:2])
                await settle(ln, 25)
                (protocol,) = factory.made
                conn = protocol.conn
                assert conn is not None
                assert protocol.received == []
                assert conn.stats.drops["rx_queue_full"] == 15
                assert conn.describe()["rx_queued"] == 10
                conn.resume_reading()
                conn.resume_reading()  # idempotent
                assert protocol.received == []  # delivered from the loop, not from inside
                await _received(protocol, 10)
                assert protocol.received == [b"%d" % index for index in range(10)]
                assert conn.is_reading()
                peer.sendto(b"after", ln.local_addr[:2])
                await _received(protocol, 11)
                assert protocol.received[-1] == b"after"
                stats = ln.stats
                assert (stats.rx_packets, stats.drops["rx_queue_full"]) == (11, 15)

    run(main())


def test_closing_while_paused_counts_the_queued_datagrams(run: Runner[Any], engine: str) -> None:
    async def main() -> None:
        factory = Factory()
        async with udpx.listen("127.0.0.1", 0, protocol_factory=factory, engine=engine) as ln:
            with _peers("127.0.0.1", 1) as (peer,):
                peer.sendto(b"first", ln.local_addr)
                await factory.wait_for(1)
                (protocol,) = factory.made
                await _received(protocol, 1)
                assert protocol.conn is not None
                protocol.conn.pause_reading()
                for _ in range(4):
                    peer.sendto(b"unread", ln.local_addr)
                await settle(ln, 5)
                protocol.conn.close()
                assert await protocol.lost is None
            assert protocol.received == [b"first"]
            conn_stats = protocol.conn.stats
            assert (conn_stats.rx_packets, conn_stats.drops["closed"]) == (1, 4)
            assert (ln.stats.rx_packets, ln.stats.drops["closed"]) == (1, 4)

    run(main())


def test_datagrams_right_after_resume_reading_follow_the_held_ones(run: Runner[Any],
                                                                  engine: str) -> None:
    """Reading resumed with a full queue held: datagrams that the reader takes before the
    loop hands the held ones over (uvloop reads the socket first) are delivered after them,
    not dropped as if the queue were still full."""

    async def main() -> None:
        factory = Factory()
        async with udpx.listen("127.0.0.1", 0, protocol_factory=factory, rx_queue_size=8,
                               engine=engine) as ln:
            with _peers("127.0.0.1", 1) as (peer,):
                peer.sendto(b"first", ln.local_addr)
                await factory.wait_for(1)
                (protocol,) = factory.made
                await _received(protocol, 1)
                conn = protocol.conn
                assert conn is not None
                conn.pause_reading()
                for index in range(8):  # exactly fills the queue
                    peer.sendto(b"held %d" % index, ln.local_addr)
                await settle(ln, 9)
                conn.resume_reading()
                for index in range(2):  # in the socket before the loop runs again
                    peer.sendto(b"after %d" % index, ln.local_addr)
                await _received(protocol, 11)
            assert protocol.received == [b"first", *(b"held %d" % index for index in range(8)),
                                         b"after 0", b"after 1"]
            assert sum(ln.stats.drops.values()) == 0, ln.stats

    run(main())


def test_task_mode_connection_cannot_pause_reading(run: Runner[Any]) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0) as ln, udpx.dial(*ln.local_addr) as conn:
            with pytest.raises(udpx.UDPXError, match="protocol-mode"):
                conn.pause_reading()
            with pytest.raises(udpx.UDPXError, match="protocol-mode"):
                conn.resume_reading()
            assert conn.protocol is None

    run(main())


# -- writing paused ---------------------------------------------------------------------------


def test_pause_writing_above_the_high_mark_and_resume_at_the_low_mark(
        run: Runner[Any], host: str, engine: str) -> None:
    """tx_queue_size=8: the high mark is 6 and the low mark 2. A callback that queues 7
    datagrams is told to pause at the 6th; once the writer has sent them, to resume. A full
    queue refuses more with QueueFull, and send_many_nowait queues all or nothing."""

    class Burst(Recorder):
        def datagrams_received(self, datagrams: list[bytes]) -> None:
            super().datagrams_received(datagrams)
            conn = self.conn
            assert conn is not None
            for index in range(5):
                conn.send_nowait(b"%d" % index)
            self.events.append((self, "sent 5", None))
            conn.send_nowait(b"5")
            self.events.append((self, "sent 6", None))
            with pytest.raises(udpx.QueueFull):
                conn.send_many_nowait([b"6", b"7", b"8"])  # 6 + 3 > 8: none queued
            conn.send_many_nowait([b"6", b"7"])
            with pytest.raises(udpx.QueueFull):
                conn.send_nowait(b"8")
            self.events.append((self, "sent 8", None))

    async def main() -> None:
        factory = Factory(Burst)
        async with udpx.listen(host, 0, protocol_factory=factory, tx_queue_size=8,
                               engine=engine) as ln:
            with _peers(host, 1) as (peer,):
                peer.sendto(b"go", ln.local_addr[:2])
                replies = [await asyncio.to_thread(peer.recv, 100) for _ in range(8)]
            assert replies == [b"%d" % index for index in range(8)]
            (protocol,) = factory.made
            while "resume_writing" not in [kind for _, kind, _ in protocol.events]:
                protocol.arrived.clear()
                await asyncio.sleep(0)
            kinds = [kind for _, kind, _ in protocol.events]
            assert kinds == ["made", "received", "sent 5", "pause_writing", "sent 6", "sent 8",
                             "resume_writing"]

    run(main())


@pytest.mark.parametrize("send", ["send_nowait", "send_many_nowait"])
def test_a_send_refused_with_queue_full_is_told_to_pause_and_resume(
        run: Runner[Any], send: str) -> None:
    """Two new peers in one batch; the first one's callback fills the shared transmit queue,
    so the second one's first send meets QueueFull: it is told pause_writing() too, then
    resume_writing() once the queue drained (a protocol that waits for resume_writing after
    QueueFull would otherwise wait for ever). A batch larger than the whole queue, on an
    empty queue, can never fit: QueueFull without a pause."""

    class Filler(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.resumed = asyncio.Event()

        def resume_writing(self) -> None:
            super().resume_writing()
            self.resumed.set()

        def datagrams_received(self, datagrams: list[bytes]) -> None:
            super().datagrams_received(datagrams)
            conn = self.conn
            assert conn is not None
            for index in range(20):
                try:
                    if send == "send_nowait":
                        conn.send_nowait(b"%d" % index)
                    else:
                        conn.send_many_nowait([b"%d" % index] * 3)
                except udpx.QueueFull:
                    self.events.append((self, "full", None))
                    return

    async def main() -> None:
        factory = Factory(Filler)
        async with udpx.listen("127.0.0.1", 0, protocol_factory=factory,
                               tx_queue_size=8) as ln:
            with _peers("127.0.0.1", 2) as peers:
                for peer in peers:  # both before the listener reads: one batch
                    peer.sendto(b"go", ln.local_addr)
                await factory.wait_for(2)
                for protocol in factory.made:
                    assert isinstance(protocol, Filler)
                    await asyncio.wait_for(protocol.resumed.wait(), 10)
                    kinds = [kind for _, kind, _ in protocol.events]
                    assert kinds.count("pause_writing") == 1, kinds
                    assert kinds.index("pause_writing") < kinds.index("full"), kinds
            last = factory.made[-1]
            assert last.conn is not None
            with pytest.raises(udpx.QueueFull):
                last.conn.send_many_nowait([b"x"] * 9)  # 9 > tx_queue_size, queue empty
            assert [kind for _, kind, _ in last.events].count("pause_writing") == 1

    run(main())


def test_send_many_nowait_checks_every_datagram_first(run: Runner[Any]) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, max_datagram=100) as ln, \
                udpx.dial(*ln.local_addr, max_datagram=100) as conn:
            with pytest.raises(TypeError, match="bytes-like"):
                conn.send_many_nowait([b"ok", "text"])  # type: ignore[list-item]
            with pytest.raises(udpx.MessageTooLong):
                conn.send_many_nowait([b"ok", b"x" * 101])
            assert conn.describe()["tx_pending"] == 0
            mixed: list[bytes | bytearray | memoryview] = [b"a", bytearray(b"b"), memoryview(b"c")]
            conn.send_many_nowait(iter(mixed))
            conn.send_many_nowait([])
            server = await ln.accept()
            assert [await server.recv() for _ in range(3)] == [b"a", b"b", b"c"]
            conn.close()
            with pytest.raises(udpx.ConnectionClosed):
                conn.send_many_nowait([b"late"])

    run(main())


# -- errors in callbacks --------------------------------------------------------------------


def test_an_exception_in_a_callback_closes_only_that_connection(run: Runner[Any],
                                                                host: str, engine: str) -> None:
    class Fragile(Recorder):
        def datagrams_received(self, datagrams: list[bytes]) -> None:
            super().datagrams_received(datagrams)
            if b"boom" in datagrams:
                raise RuntimeError("boom")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: reported.append(context))
        factory = Factory(Fragile)
        async with udpx.listen(host, 0, protocol_factory=factory, engine=engine) as ln:
            with _peers(host, 2) as (good, bad):
                good.sendto(b"hello", ln.local_addr[:2])
                bad.sendto(b"boom", ln.local_addr[:2])
                await settle(ln, 2)
                by_port = {protocol.conn.remote_addr[1]: protocol
                           for protocol in factory.made if protocol.conn is not None}
                failed = by_port[bad.getsockname()[1]]
                fine = by_port[good.getsockname()[1]]
                exc = await failed.lost
                assert isinstance(exc, RuntimeError) and str(exc) == "boom"
                assert failed.conn is not None and failed.conn.close_reason == "error"
                assert len(reported) == 1 and reported[0]["exception"] is exc
                assert "Fragile.datagrams_received" in reported[0]["message"]
                # The listener and the other connection go on.
                good.sendto(b"still here", ln.local_addr[:2])
                await _received(fine, 2)
                assert fine.received == [b"hello", b"still here"]
                assert not fine.lost.done()
                # The failed peer's next datagram opens a new connection.
                bad.sendto(b"again", ln.local_addr[:2])
                await factory.wait_for(3)
                assert ln.stats.conns == 2
                # Known peers, one datagram each in one batch (the all-different-peers path):
                # the one that raises closes, the ones after it still get theirs.
                again = factory.made[2]
                await _received(again, 1)
                with _peers(host, 1) as (third,):
                    third.sendto(b"hello", ln.local_addr[:2])
                    await factory.wait_for(4)
                    last = factory.made[3]
                    await _received(last, 1)
                    good.sendto(b"one", ln.local_addr[:2])
                    bad.sendto(b"boom", ln.local_addr[:2])
                    third.sendto(b"two", ln.local_addr[:2])
                    await _received(last, 2)
                    assert last.received == [b"hello", b"two"]
                    assert fine.received[-1] == b"one"
                    assert isinstance(await again.lost, RuntimeError)
                    assert len(reported) == 2

    run(main())


def test_refused_peers_are_counted(run: Runner[Any], engine: str) -> None:
    """A factory that raises, or a connection_made that closes the connection, refuses the
    peer: its datagrams are counted as ``refused``, the exception is reported, and nothing is
    left open."""

    class Picky(Recorder):
        def connection_made(self, conn: udpx.UDPConn) -> None:
            super().connection_made(conn)
            if conn.remote_addr[1] % 2:
                conn.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: reported.append(context))
        factory = Factory(Picky)
        async with udpx.listen("127.0.0.1", 0, protocol_factory=factory, engine=engine) as ln:
            with _peers("127.0.0.1", 6) as peers:
                odd = sum(1 for peer in peers if peer.getsockname()[1] % 2)
                for peer in peers:
                    peer.sendto(b"x", ln.local_addr)
                await settle(ln, 6)
            stats = ln.stats
            assert (stats.conns, stats.rx_packets, stats.drops["refused"]) == (6 - odd, 6 - odd,
                                                                              odd)
            refused = [protocol for protocol in factory.made if not protocol.received]
            assert len(refused) == odd
            for protocol in refused:
                assert await protocol.lost is None
            assert reported == []

        def broken() -> udpx.ConnProtocol:
            raise ValueError("no protocol today")

        async with udpx.listen("127.0.0.1", 0, protocol_factory=broken, engine=engine) as ln:
            with _peers("127.0.0.1", 1) as (peer,):
                peer.sendto(b"x", ln.local_addr)
                peer.sendto(b"y", ln.local_addr)
                await settle(ln, 2)
            assert (ln.stats.conns, ln.stats.drops["refused"]) == (0, 2)
            # Both arrived in one batch: the factory is asked once, the batch refused with it
            # (the loop's transport delivers them one by one: asked twice).
            assert len(reported) == (1 if engine == "mmsg" else 2)
            assert isinstance(reported[0]["exception"], ValueError)
        async with udpx.listen("127.0.0.1", 0, engine=engine,
                               protocol_factory=object) as ln:  # type: ignore[arg-type]
            with _peers("127.0.0.1", 1) as (peer,):
                peer.sendto(b"x", ln.local_addr)
                await settle(ln, 1)
            assert isinstance(reported[-1]["exception"], TypeError)
            assert "udpx.ConnProtocol" in str(reported[-1]["exception"])

    run(main())


def test_a_refused_peer_is_asked_once_per_batch_among_other_peers(run: Runner[Any],
                                                                   engine: str) -> None:
    """A peer refused by connection_made (or by a raising factory), its datagrams interleaved
    with an accepted peer's in one batch: the batch engine asks once for that batch and
    counts every datagram of it as ``refused``; the accepted peer gets all of its own. (The
    loop's transport hands datagrams over one by one, so it asks once per datagram.)"""
    # 12 datagrams: one receive call (a new listener's first asks for 16 messages or more).
    rounds = 6

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: reported.append(context))
        with _peers("127.0.0.1", 2) as (good, bad):
            refused_port = bad.getsockname()[1]

            class Picky(Recorder):
                def connection_made(self, conn: udpx.UDPConn) -> None:
                    super().connection_made(conn)
                    if conn.remote_addr[1] == refused_port:
                        conn.close()

            def raising() -> udpx.ConnProtocol:
                made.append(None)
                if len(made) > 1:  # the first asked is the good peer's (it sends first)
                    raise ValueError("not this peer")
                return Recorder()

            made: list[None] = []
            factory = Factory(Picky)
            for protocol_factory in (factory, raising):
                async with udpx.listen("127.0.0.1", 0, engine=engine,
                                       protocol_factory=protocol_factory) as ln:
                    # All sent before the listener reads: one batch on the batch engine.
                    for index in range(rounds):
                        good.sendto(b"g%d" % index, ln.local_addr)
                        bad.sendto(b"b%d" % index, ln.local_addr)
                    await settle(ln, 2 * rounds)
                    stats = ln.stats
                    # (A refused peer is not accepted: it counted as one, once per time
                    # asked, when connection_made closed it; black-box pass 3.)
                    assert (stats.conns, stats.accepted, stats.rx_packets,
                            stats.drops["refused"]) == (1, 1, rounds, rounds), stats
                    asked = 1 if engine == "mmsg" else rounds
                    if protocol_factory is factory:
                        assert len(factory.made) == 1 + asked
                        assert factory.made[0].received == [b"g%d" % i for i in range(rounds)]
                        for refused in factory.made[1:]:
                            assert refused.received == [] and await refused.lost is None
                    else:
                        assert len(made) == 1 + asked
                        assert len(reported) == asked
                        assert all(isinstance(context["exception"], ValueError)
                                   for context in reported)

    run(main())


def test_closing_the_listener_in_connection_made_admits_no_more_peers(
        run: Runner[Any], engine: str) -> None:
    """Five new peers in one batch; the first connection_made closes the listener: no other
    connection is made (their datagrams count as ``closed``), and the first gets
    connection_lost."""

    async def main() -> None:
        class Closer(Recorder):
            def connection_made(self, conn: udpx.UDPConn) -> None:
                super().connection_made(conn)
                ln.close()

        factory = Factory(Closer)
        ln = await udpx.listen("127.0.0.1", 0, protocol_factory=factory, engine=engine)
        with _peers("127.0.0.1", 5) as peers:
            for peer in peers:  # all before the listener reads: one batch
                peer.sendto(b"hello", ln.local_addr)
            await asyncio.wait_for(ln.wait_closed(), 10)
        (protocol,) = factory.made
        assert await protocol.lost is None
        stats = ln.stats
        # Its connection closed inside connection_made (with the listener): refused, so not
        # accepted.
        assert stats.conns == 0 and stats.accepted == 0, stats
        # The first peer's datagram came after its connection_made closed it (refused);
        # on the batch engine the other four were in the same batch.
        assert stats.drops["refused"] + stats.drops["closed"] == (5 if engine == "mmsg"
                                                                  else 1), stats

    run(main())


def test_bad_protocol_factory_is_refused_at_the_call() -> None:
    with pytest.raises(TypeError, match="protocol_factory must be callable"):
        udpx.listen("127.0.0.1", 0, protocol_factory=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="protocol_factory must be callable"):
        udpx.dial("127.0.0.1", 9, protocol_factory="x")  # type: ignore[arg-type]


# -- connection_lost ---------------------------------------------------------------------------


def test_connection_lost_on_listener_close_and_on_idle_reaping(run: Runner[Any],
                                                              host: str, engine: str) -> None:
    async def main() -> None:
        factory = Factory()
        ln = await udpx.listen(host, 0, protocol_factory=factory, idle_timeout=0.2, engine=engine)
        with _peers(host, 2) as (first, second):
            first.sendto(b"a", ln.local_addr[:2])
            await factory.wait_for(1)
            reaped = factory.made[0]
            assert await asyncio.wait_for(reaped.lost, 10) is None
            assert reaped.conn is not None and reaped.conn.close_reason == "idle"
            second.sendto(b"b", ln.local_addr[:2])
            await factory.wait_for(2)
            open_one = factory.made[1]
            await _received(open_one, 1)
            await ln.aclose()
            assert await open_one.lost is None
            assert open_one.conn is not None and open_one.conn.close_reason == "closed"
            assert [kind for _, kind, _ in open_one.events] == ["made", "received", "lost"]

    run(main())


def test_connection_lost_comes_after_the_queued_datagrams_left(run: Runner[Any],
        engine: str) -> None:
    """close() from inside a callback: the datagrams queued before it are still sent, and
    connection_lost is called later, from the loop."""

    class Closer(Recorder):
        def datagrams_received(self, datagrams: list[bytes]) -> None:
            super().datagrams_received(datagrams)
            assert self.conn is not None
            self.conn.send_many_nowait([b"bye"] * 3)
            self.conn.close()
            assert not self.lost.done()

    async def main() -> None:
        factory = Factory(Closer)
        async with udpx.listen("127.0.0.1", 0, protocol_factory=factory, engine=engine) as ln:
            with _peers("127.0.0.1", 1) as (peer,):
                peer.sendto(b"x", ln.local_addr)
                replies = [await asyncio.to_thread(peer.recv, 10) for _ in range(3)]
            assert replies == [b"bye"] * 3
            assert await factory.made[0].lost is None

    run(main())


# -- dial --------------------------------------------------------------------------------------


def test_dialed_protocol_connection(run: Runner[Any], host: str, engine: str) -> None:
    """A dialed protocol-mode connection: connection_made before dial() returns, replies to
    datagrams_received, ICMP port unreachable to error_received (the connection stays open),
    connection_lost after close."""

    async def main() -> None:
        async with udpx.listen(host, 0, engine=engine) as ln:
            made: list[Recorder] = []

            def factory() -> Recorder:
                made.append(Recorder())
                return made[-1]

            conn = await udpx.dial(ln.local_addr[0], ln.local_addr[1], protocol_factory=factory,
                                   engine=engine)
            (protocol,) = made
            assert protocol.events == [(protocol, "made", conn)]
            conn.send_nowait(b"ping")
            server = await ln.accept()
            assert await server.recv() == b"ping"
            await server.send_many([b"pong", b"pong"])
            await _received(protocol, 2)
            assert protocol.received == [b"pong", b"pong"]
            await conn.aclose()
            assert await protocol.lost is None

        async with udpx.dial(host, free_udp_port(host), protocol_factory=Recorder,
                             engine=engine) as conn:
            dialed = conn.protocol
            assert isinstance(dialed, Recorder)
            protocol = dialed
            conn.send_nowait(b"anyone?")
            while not any(kind == "error" for _, kind, _ in protocol.events):
                protocol.arrived.clear()
                await asyncio.wait_for(protocol.arrived.wait(), 5)
            errors = [exc for _, kind, exc in protocol.events if kind == "error"]
            assert isinstance(errors[0], ConnectionRefusedError)
            assert conn.stats.icmp_errors == len(errors)
            assert not conn.closed

    run(main())


def test_dial_raises_what_connection_made_raised_and_closes_the_socket(
        run: Runner[Any]) -> None:
    """dial() raises what connection_made raised, and (as a listener's connection does) the
    protocol gets connection_lost(that exception) once, from the loop, to undo what
    connection_made set up (it got none: black-box pass 3)."""

    class Fails(udpx.ConnProtocol):
        def __init__(self) -> None:
            self.lost: list[Exception | None] = []
            self.gone = asyncio.Event()
            self.dial_returned = False

        def connection_made(self, conn: udpx.UDPConn) -> None:
            self.conn = conn
            raise RuntimeError("not today")

        def connection_lost(self, exc: Exception | None) -> None:
            assert self.dial_returned  # from the loop, not inside dial()
            self.lost.append(exc)
            self.gone.set()

    async def main() -> None:
        made: list[Fails] = []

        def factory() -> Fails:
            made.append(Fails())
            return made[-1]

        with pytest.raises(RuntimeError, match="not today") as raised:
            await udpx.dial("127.0.0.1", 9, protocol_factory=factory)
        protocol = made[0]
        protocol.dial_returned = True
        conn = protocol.conn
        assert conn.closed and conn.close_reason == "error"
        await asyncio.wait_for(conn.wait_closed(), 5)
        await asyncio.wait_for(protocol.gone.wait(), 5)
        await asyncio.sleep(0)  # (a second call would come in the same iteration)
        assert protocol.lost == [raised.value]
        with pytest.raises(TypeError, match=r"udpx\.ConnProtocol"):
            await udpx.dial("127.0.0.1", 9, protocol_factory=object)  # type: ignore[arg-type]
        await asyncio.sleep(0)

    run(main())


def test_protocol_listener_many_peers_all_served(run: Runner[Any], engine: str) -> None:
    """200 peers, each answered by its own protocol, with one idle sweep's worth of
    bookkeeping: conns, accepted and stats agree."""

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, protocol_factory=EchoProtocol, rcvbuf=1 << 20,
                               engine=engine) as ln:
            with _peers("127.0.0.1", 200) as peers:
                for index, peer in enumerate(peers):
                    peer.sendto(b"%d" % index, ln.local_addr)

                def collect() -> list[bytes]:
                    return [peer.recv(10) for peer in peers]

                replies = await asyncio.to_thread(collect)
            assert replies == [b"%d" % index for index in range(200)]
            stats = ln.stats
            assert (stats.conns, stats.accepted, stats.rx_packets, stats.tx_packets) == (
                200, 200, 200, 200)
            assert all(isinstance(conn.protocol, EchoProtocol) for conn in ln.conns())

    run(main())


def test_byte_counts_are_exact_whatever_the_sizes(run: Runner[Any], engine: str) -> None:
    """Each connection counts its bytes in and out exactly when its datagrams change size:
    its first size, then the same, then others, empty ones, a size another peer had first.
    (The counters take a datagram of a connection's first size as a count only.) 100 peers in
    each round, so that a batch holds many peers' datagrams and a send many connections'."""
    rounds: list[Callable[[int], int]] = [
        lambda index: 10, lambda index: 10 if index % 2 else 11 + index, lambda index: 0,
        lambda index: 1000 + index, lambda index: 10]

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, protocol_factory=EchoProtocol, rcvbuf=1 << 20,
                               engine=engine) as ln:
            with _peers("127.0.0.1", 100) as peers:
                for size_of in rounds:
                    for index, peer in enumerate(peers):
                        peer.sendto(b"x" * size_of(index), ln.local_addr)

                    def collect() -> list[int]:
                        return [len(peer.recv(2000)) for peer in peers]

                    sizes = await asyncio.to_thread(collect)
                    assert sizes == [size_of(index) for index in range(100)]
                by_port = {conn.remote_addr[1]: conn for conn in ln.conns()}
                for index, peer in enumerate(peers):
                    stats = by_port[peer.getsockname()[1]].stats
                    sent = sum(size_of(index) for size_of in rounds)
                    assert (stats.rx_packets, stats.rx_bytes, stats.tx_packets,
                            stats.tx_bytes) == (5, sent, 5, sent), (index, stats)
            total = sum(size_of(index) for size_of in rounds for index in range(100))
            totals = ln.stats
            assert (totals.rx_packets, totals.rx_bytes, totals.tx_packets,
                    totals.tx_bytes) == (500, total, 500, total)

    run(main())


def test_send_many_nowait_of_one_datagram_checks_it_as_send_nowait(run: Runner[Any]) -> None:
    # One datagram takes a shorter path (a reply per peer): the same checks, the same results.
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, max_datagram=100) as ln, \
                udpx.dial(*ln.local_addr, max_datagram=100, tx_queue_size=2) as conn:
            with pytest.raises(TypeError, match="bytes-like"):
                conn.send_many_nowait(["text"])  # type: ignore[list-item]
            with pytest.raises(udpx.MessageTooLong):
                conn.send_many_nowait([b"x" * 101])
            assert conn.describe()["tx_pending"] == 0
            buffer = bytearray(b"b")
            conn.send_many_nowait([buffer])
            buffer[0] = ord("X")  # queued as a copy
            conn.send_many_nowait(view for view in [memoryview(b"c")])
            with pytest.raises(udpx.QueueFull):
                conn.send_many_nowait([b"d"])  # the queue (2) is full: nothing queued
            server = await ln.accept()
            assert [await server.recv() for _ in range(2)] == [b"b", b"c"]
            conn.send_many_nowait([b"x" * 100])
            assert await server.recv() == b"x" * 100
            assert conn.stats.tx_packets == 3
            conn.close()
            with pytest.raises(udpx.ConnectionClosed):
                conn.send_many_nowait([b"late"])

    run(main())


def test_a_connection_that_only_receives_sends_later_as_any_other(run: Runner[Any], host: str,
                                                                   engine: str) -> None:
    """A connection's side of the transmit queue is made by its first send: until then its
    counters read zero and it closes at once; its first send, made long after it opened,
    reaches the peer and is counted. (Both listener kinds: on a wildcard listener the first
    send carries the local address the peer sent to.)"""

    class Quiet(Recorder):
        pass

    async def main() -> None:
        factory = Factory(Quiet)
        listen_host = "::" if ":" in host else "0.0.0.0"
        async with udpx.listen(listen_host, 0, protocol_factory=factory, engine=engine) as ln:
            port = ln.local_addr[1]
            with _peers(host, 2) as peers:
                for index, peer in enumerate(peers):
                    peer.sendto(b"in %d" % index, (host, port))
                await factory.wait_for(2)
                for protocol in factory.made:
                    await _received(protocol, 1)
                    conn = protocol.conn
                    assert conn is not None
                    stats = conn.stats
                    assert (stats.rx_packets, stats.tx_packets, stats.tx_bytes,
                            stats.drops["send_error"]) == (1, 0, 0, 0)
                    assert conn.describe()["tx_pending"] == 0
                by_port = {made.conn.remote_addr[1]: made for made in factory.made
                           if made.conn is not None}
                quiet, talker = (by_port[peer.getsockname()[1]] for peer in peers)
                assert quiet.conn is not None and talker.conn is not None
                # The quiet one closes at once: nothing of its own to wait for.
                quiet.conn.close()
                assert await quiet.lost is None
                talker.conn.send_nowait(b"out")
                reply, source = await asyncio.to_thread(peers[1].recvfrom, 100)
                assert reply == b"out" and source[:2] == (host, port)
                assert talker.conn.stats.tx_packets == 1
                assert talker.conn.stats.tx_bytes == 3
                assert talker.conn.activity_count() == 2
            assert ln.stats.tx_packets == 1

    run(main())
