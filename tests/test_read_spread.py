"""A task-mode listener's reader reads past its budget while the datagrams spread over the
connections it already woke (BatchReader.spread), and only then; and it wakes a bounded
number of connections per wake-up."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest

import udpx
from udpx._cmsg import SOL_UDP, UDP_SEGMENT
from udpx._demux import WAKES_PER_TURN
from udpx._engine import SocketEngine
from udpx._listener import Listener
from udpx._reader import EXTENDED_BUDGET_FACTOR, MAX_DATAGRAMS_PER_WAKEUP

from .conftest import Runner, send_gso_runs

BUDGET = 64
BATCH = 16


def _set_budget(ln: Listener) -> None:
    engine = ln._engine
    assert isinstance(engine, SocketEngine)
    engine.reader.budget = BUDGET


def _send_round_robin(port: int, peers: int, each: int) -> None:
    """``each`` datagrams from each of ``peers`` sockets, one per peer per turn, all in the
    listener's socket buffer when this returns (loopback delivers as it sends)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(peers)]
    try:
        for turn in range(each):
            for index, sock in enumerate(sockets):
                sock.sendto(b"%d:%d" % (index, turn), ("127.0.0.1", port))
    finally:
        for sock in sockets:
            sock.close()


async def _first_wakeup(count: Any) -> int:
    """How many datagrams the listener's first reader wake-up took: the reader's callback runs
    whole between two steps of this task."""
    for _ in range(10_000):
        got: int = count()
        if got:
            return got
        await asyncio.sleep(0)
    raise AssertionError("nothing was read")


@pytest.mark.parametrize(("peers", "each", "expected"), [
    # Few peers: the wake-up reads on past the budget, everything queued.
    (20, 10, 200),
    # One peer: the budget, as before (a queue never takes more than the budget per wake-up).
    (1, 200, BUDGET),
    # More peers than the budget: each datagram wakes a new connection, so the budget (in
    # wake-ups) ends it, within a batch of the budget.
    (200, 2, BUDGET),
    # Peers that are few but each one deep: the average depth bound (16) ends it.
    (8, 40, 8 * 16),
])
def test_task_mode_reads_on_while_datagrams_land_in_woken_connections(
        run: Runner[Any], peers: int, each: int, expected: int) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, batch_size=BATCH, rcvbuf=4 << 20,
                               backlog=1024) as ln:
            _set_budget(ln)
            _send_round_robin(ln.local_addr[1], peers, each)
            first = await _first_wakeup(lambda: ln.stats.rx_packets)
            assert expected <= first < expected + BATCH
            assert first <= BUDGET * EXTENDED_BUDGET_FACTOR
            assert ln.stats.drops["rx_queue_full"] == 0
            # Everything arrives in the end, in order per peer.
            got: dict[int, list[bytes]] = {}
            for _ in range(peers):
                conn = await ln.accept()
                got[conn.remote_addr[1]] = [await conn.recv() for _ in range(each)]
            assert all(datagrams == sorted(datagrams, key=lambda d: int(d.split(b":")[1]))
                       for datagrams in got.values())

    run(main())


def test_task_mode_paces_wakes_oldest_first(run: Runner[Any]) -> None:
    """A datagram from each of many peers, a task waiting on each connection: a reader wake-up
    wakes at most WAKES_PER_TURN of the tasks, later turns (one per loop iteration) the rest,
    in the order the datagrams arrived, and nothing is lost."""
    peers = WAKES_PER_TURN * 3
    assert peers < MAX_DATAGRAMS_PER_WAKEUP  # one wake-up reads them all

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, batch_size=BATCH, rcvbuf=4 << 20,
                               backlog=2 * peers) as ln:
            port = ln.local_addr[1]
            sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(peers)]
            try:
                for index, sock in enumerate(sockets):
                    sock.sendto(b"%d:0" % index, ("127.0.0.1", port))
                conns = [await ln.accept() for _ in range(peers)]
                index_of = {}
                for conn in conns:
                    index_of[conn] = int((await conn.recv()).split(b":")[0])
                done: list[int] = []
                woken_at_first: list[int] = []

                async def consume(conn: udpx.UDPConn) -> None:
                    data = await conn.recv()
                    assert data == b"%d:1" % index_of[conn]
                    if not done:
                        # Tasks woken so far: their connection has no waiter any more.
                        woken_at_first.append(sum(not other._receivers for other in conns))
                    done.append(index_of[conn])

                tasks = [asyncio.create_task(consume(conn)) for conn in conns]

                def ready() -> bool:
                    # Every task waits, and no wake of the first round is still paced.
                    return all(conn._receivers for conn in conns) and not ln._demux.paced

                for _ in range(100):
                    if ready():
                        break
                    await asyncio.sleep(0)
                assert ready()
                # All in the socket's buffer before the listener's next read.
                for index, sock in enumerate(sockets):
                    sock.sendto(b"%d:1" % index, ("127.0.0.1", port))
                await asyncio.wait_for(asyncio.gather(*tasks), 10)
            finally:
                for sock in sockets:
                    sock.close()
        # When the first woken task ran, one turn (or two: the reader's and a paced one) had
        # woken tasks; unpaced, the reader would have woken all of them.
        assert WAKES_PER_TURN <= woken_at_first[0] <= 2 * WAKES_PER_TURN
        # Oldest first: in the order of arrival, every datagram delivered.
        assert done == list(range(peers))

    run(main())


@pytest.mark.parametrize(("queue_size", "expected"), [
    # 20 peers: the 3rd turn (datagrams 40-59) overflows, within the budget: no extension.
    (2, BUDGET),
    # The 5th turn (80-99) overflows in the second batch past the budget: it is the last.
    (4, 96),
])
def test_extension_stops_when_a_queue_overflows(run: Runner[Any], queue_size: int,
                                                expected: int) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, batch_size=BATCH, rcvbuf=4 << 20,
                               rx_queue_size=queue_size) as ln:
            _set_budget(ln)
            _send_round_robin(ln.local_addr[1], 20, 10)
            first = await _first_wakeup(lambda: ln.stats.rx_packets + ln.stats.drops[
                "rx_queue_full"])
            assert first == expected

    run(main())


def test_protocol_mode_keeps_the_budget(run: Runner[Any]) -> None:
    class Count(udpx.ConnProtocol):
        total = 0

        def datagrams_received(self, datagrams: list[bytes]) -> None:
            Count.total += len(datagrams)

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, batch_size=BATCH, rcvbuf=4 << 20,
                               protocol_factory=Count) as ln:
            _set_budget(ln)
            _send_round_robin(ln.local_addr[1], 20, 10)
            first = await _first_wakeup(lambda: Count.total)
            assert BUDGET <= first < BUDGET + BATCH

    run(main())


def test_gro_runs_of_one_peer_do_not_overflow_its_queue(run: Runner[Any]) -> None:
    # A GSO peer's runs arrive as GRO messages of up to 64 datagrams. Asked for 64 messages at a
    # time, one call would bring 4,096 datagrams, four times what the connection's queue holds,
    # and drop the excess though the socket's buffer held it (seen as 40-67 % rx_queue_full in
    # `python -m udpx perf` on a busy machine). The reader asks for about a budget's worth.
    runs, run_length, size = 64, 64, 64

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, rcvbuf=4 << 20) as ln:
            engine = ln._engine
            assert isinstance(engine, SocketEngine)
            if not engine.reader.receiver.gro:
                pytest.skip("no UDP GRO on this socket")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                try:
                    sender.setsockopt(SOL_UDP, UDP_SEGMENT, size)
                except OSError as exc:
                    pytest.skip(f"no UDP GSO here: {exc}")
                # All of it in the listener's buffer before the loop reads (loopback delivers
                # as it sends, and this task does not yield meanwhile).
                expected = send_gso_runs(sender, ln.local_addr, runs, run_length, size)
            conn = await ln.accept()
            got: list[bytes] = []
            # (One deadline for the whole loop: wait_for would run each recv_many() in a task
            # of its own, a loop iteration late.)
            async with asyncio.timeout(10):
                while len(got) < len(expected):
                    got += await conn.recv_many()
            assert got == expected
            assert ln.stats.drops["rx_queue_full"] == 0
            receiver = engine.reader.receiver
            assert receiver.gro_segments > 0  # it did come as GRO runs
            assert receiver.vlen < receiver.size
            # Datagrams sent one at a time: whole batches again (one call per 64 messages).
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
                for index in range(100):
                    plain.sendto(b"%d" % index, ln.local_addr)
            other = await ln.accept()
            async with asyncio.timeout(10):
                assert [await other.recv() for _ in range(100)] == [
                    b"%d" % index for index in range(100)]
            assert receiver.vlen == receiver.size

    run(main())


def test_paced_wakes_overflow_no_queue_the_kernel_could_hold(run: Runner[Any]) -> None:
    """Small queues, tasks waiting, a burst the socket buffer holds: nothing is dropped. (The
    reader reads on while wakes are paced; a queue half full while it waits for its turn is
    woken at once, and a wake-up stops reading past its budget after such a wake.)"""
    peers, each, queue_size = 900, 5, 3

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, rcvbuf=8 << 20, backlog=peers,
                               rx_queue_size=queue_size) as ln:
            port = ln.local_addr[1]
            sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(peers)]
            try:
                for sock in sockets:
                    sock.sendto(b"hello", ("127.0.0.1", port))
                conns = [await ln.accept() for _ in range(peers)]
                got: list[bytes] = []

                async def consume(conn: udpx.UDPConn) -> None:
                    with contextlib.suppress(udpx.ConnectionClosed):
                        while True:
                            got.append(await conn.recv())

                tasks = [asyncio.create_task(consume(conn)) for conn in conns]
                for _ in range(100):
                    if len(got) == peers and all(conn._receivers for conn in conns):
                        break
                    await asyncio.sleep(0)
                assert len(got) == peers
                got.clear()
                for turn in range(each):
                    for sock in sockets:
                        sock.sendto(b"%d" % turn, ("127.0.0.1", port))
                async with asyncio.timeout(10):
                    while len(got) + sum(ln.stats.drops.values()) < peers * each:
                        await asyncio.sleep(0)
                assert {name: count for name, count in ln.stats.drops.items() if count} == {}
                assert len(got) == peers * each
                for task in tasks:
                    task.cancel()
            finally:
                for sock in sockets:
                    sock.close()

    run(main())


def test_paced_line_holds_each_connection_once(run: Runner[Any]) -> None:
    """Connections drained by polling (recv_nowait) while every peer sends each iteration: a
    connection waits in the paced line at most once, so the line stays within the number of
    connections, and a task waiting in recv() still gets its datagrams within a few turns."""
    peers, iterations = 3 * WAKES_PER_TURN, 40

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, rcvbuf=8 << 20, backlog=peers + 1) as ln:
            port = ln.local_addr[1]
            sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(peers)]
            waiter_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                waiter_sock.sendto(b"hello", ("127.0.0.1", port))
                waiter = await ln.accept()
                assert await waiter.recv() == b"hello"
                for sock in sockets:
                    sock.sendto(b"hello", ("127.0.0.1", port))
                polled = [await ln.accept() for _ in range(peers)]
                received = asyncio.Queue[bytes]()

                async def wait_in_recv() -> None:
                    while True:
                        received.put_nowait(await waiter.recv())

                task = asyncio.create_task(wait_in_recv())
                longest = 0
                for iteration in range(iterations):
                    for sock in sockets:
                        sock.sendto(b"%d" % iteration, ("127.0.0.1", port))
                    waiter_sock.sendto(b"%d" % iteration, ("127.0.0.1", port))
                    for conn in polled:
                        with contextlib.suppress(udpx.WouldBlock):
                            while True:
                                conn.recv_nowait()
                    await asyncio.sleep(0)
                    longest = max(longest, len(ln._demux.paced))
                async with asyncio.timeout(10):
                    for iteration in range(iterations):
                        assert await received.get() == b"%d" % iteration
                assert longest <= peers + 1
                task.cancel()
            finally:
                for sock in [*sockets, waiter_sock]:
                    sock.close()

    run(main())
