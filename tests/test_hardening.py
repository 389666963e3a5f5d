"""Regression tests for the defects a black-box pass found (issue "Hardening").

Each test failed on the code before the fix; the ones that need EAGAIN, link-local addresses
or floods of spoofed sources live in ``test_netns.py`` and ``test_flood.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

import udpx
from udpx import _idle
from udpx._conn import UDPConn

from .conftest import Runner, raw_udp_packet, settle

# -- 1. a wake-up for room to send is never lost ------------------------------------------


def test_send_wakeup_is_passed_on_by_a_closed_connection(run: Runner[Any], host: str) -> None:
    """The writer frees one slot and wakes the oldest waiter; that waiter's connection was
    closed meanwhile, so it raises ConnectionClosed. It must hand its turn to the next waiter,
    or that one waits forever with an empty queue."""

    async def main() -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        async with udpx.listen(host, 0, tx_queue_size=1) as ln:
            with contextlib.ExitStack() as stack:
                peers = [stack.enter_context(socket.socket(family, socket.SOCK_DGRAM))
                         for _ in range(3)]
                for peer in peers:
                    peer.bind((host, 0))
                    peer.setblocking(False)
                    peer.sendto(b"hello", ln.local_addr[:2])
                conns = {}
                for _ in range(3):
                    conn = await ln.accept()
                    conns[conn.remote_addr[1]] = conn
                first, doomed, waiting = (conns[peer.getsockname()[1]] for peer in peers)
                doomed_send = asyncio.create_task(doomed.send(b"doomed"))
                waiting_send = asyncio.create_task(waiting.send(b"waiting"))
                # Fills the one-slot queue; the writer runs after both tasks started waiting.
                first.send_nowait(b"first")
                await asyncio.sleep(0)
                doomed.close()
                with pytest.raises(udpx.ConnectionClosed):
                    await doomed_send
                async with asyncio.timeout(5):
                    await waiting_send
                loop = asyncio.get_running_loop()
                async with asyncio.timeout(5):
                    assert await loop.sock_recv(peers[2], 100) == b"waiting"
                assert ln.stats.tx_packets == 2

    run(main())


def test_cancelled_space_waiters_pass_their_turn_on(run: Runner[Any]) -> None:
    """Many connections wait for room; some are cancelled, some closed, in every order. Every
    remaining send completes."""

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, tx_queue_size=2) as ln:
            with contextlib.ExitStack() as stack:
                senders = []
                for _ in range(20):
                    peer = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    peer.bind(("127.0.0.1", 0))
                    peer.sendto(b"x", ln.local_addr)
                    senders.append(peer)
                conns = [await ln.accept() for _ in senders]
                for trial in range(10):
                    tasks = [asyncio.create_task(conn.send(b"y" * trial)) for conn in conns[2:]]
                    conns[0].send_nowait(b"a")
                    conns[1].send_nowait(b"b")
                    await asyncio.sleep(0)
                    for index, task in enumerate(tasks):
                        if (index + trial) % 3 == 0:
                            task.cancel()
                    async with asyncio.timeout(5):
                        await asyncio.gather(*tasks, return_exceptions=True)
                    assert all(task.cancelled() or task.exception() is None for task in tasks)

    run(main())


@pytest.mark.parametrize("flood", ["send", "send_many", "send_nowait"])
def test_a_waiting_send_is_not_overtaken_by_a_busy_connection(run: Runner[Any],
                                                              flood: str) -> None:
    """One connection keeps the shared transmit queue full; another's send() waits for room.
    Its turn comes at the next drain: the busy one, which never has to wait for a freed slot
    before the waiter runs, may not refill the room the waiter was woken for (it used to, at
    every drain, and the waiter waited for ever)."""
    limit = 32

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, tx_queue_size=limit) as ln:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy_peer, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as quiet_peer:
                for peer in (busy_peer, quiet_peer):
                    peer.bind(("127.0.0.1", 0))
                    peer.sendto(b"hi", ln.local_addr)
                conns = {}
                for _ in range(2):
                    conn = await ln.accept()
                    conns[conn.remote_addr[1]] = conn
                busy, quiet = (conns[peer.getsockname()[1]] for peer in (busy_peer, quiet_peer))
                queued = 0
                stop = asyncio.Event()

                async def keep_full() -> None:
                    nonlocal queued
                    for _ in range(200_000):  # bounded; stopped long before
                        if stop.is_set():
                            return
                        if flood == "send":
                            await busy.send(b"b" * 100)
                            queued += 1
                        elif flood == "send_many":
                            await busy.send_many([b"b" * 100] * 4)
                            queued += 4
                        else:
                            try:
                                busy.send_nowait(b"b" * 100)
                            except udpx.QueueFull:
                                await asyncio.sleep(0)
                            else:
                                queued += 1

                flooder = asyncio.create_task(keep_full())
                try:
                    for _ in range(3):
                        await asyncio.sleep(0)  # the queue is full, or being drained
                    before = queued
                    async with asyncio.timeout(5):
                        await quiet.send(b"quiet")
                    # Its turn came within a drain or two of the queue.
                    assert queued - before <= 2 * limit + 4, (before, queued)
                finally:
                    stop.set()
                    await flooder
                assert quiet.stats.tx_packets in (0, 1)  # queued, maybe not yet sent
                async with asyncio.timeout(5):
                    await quiet.aclose()
                assert quiet.stats.tx_packets == 1

    run(main())


# -- 3. a connection's close waits only for its own datagrams ------------------------------


def test_close_waits_only_for_the_connections_own_datagrams(run: Runner[Any],
                                                            host: str) -> None:
    async def main() -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        async with udpx.listen(host, 0) as ln:
            with socket.socket(family, socket.SOCK_DGRAM) as busy_peer, \
                    socket.socket(family, socket.SOCK_DGRAM) as quiet_peer:
                for peer in (busy_peer, quiet_peer):
                    peer.bind((host, 0))
                    peer.setblocking(False)
                busy_peer.sendto(b"hi", ln.local_addr[:2])
                busy = await ln.accept()
                quiet_peer.sendto(b"hi", ln.local_addr[:2])
                quiet = await ln.accept()
                stop = asyncio.Event()
                streaming = asyncio.Event()

                async def stream() -> None:
                    # Keeps the shared queue from ever being empty; bounded in count.
                    for _ in range(50_000):
                        if stop.is_set():
                            return
                        await busy.send_many([b"s" * 64] * 64)
                        streaming.set()

                streamer = asyncio.create_task(stream())
                await streaming.wait()
                await quiet.send(b"bye")
                async with asyncio.timeout(5):
                    await quiet.aclose()
                assert quiet.stats.tx_packets == 1
                assert not streamer.done()  # the queue was busy all along
                stop.set()
                await streamer
                loop = asyncio.get_running_loop()
                async with asyncio.timeout(5):
                    assert await loop.sock_recv(quiet_peer, 100) == b"bye"

    run(main())


def test_closing_connections_do_not_pile_up_behind_a_streamer(run: Runner[Any]) -> None:
    """The README's ``async with conn: async for ...`` pattern under idle reaping while
    another connection streams: closed connections finish and are let go."""

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, idle_timeout=0.1) as ln:
            with contextlib.ExitStack() as stack:
                streamer_peer = stack.enter_context(
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                streamer_peer.sendto(b"go", ln.local_addr)
                busy = await ln.accept()
                stop = asyncio.Event()

                async def stream() -> None:
                    for _ in range(200_000):
                        if stop.is_set():
                            return
                        await busy.send_many([b"s" * 64] * 64)

                finished: list[UDPConn] = []

                async def serve(conn: UDPConn) -> None:
                    async with conn:
                        async for data in conn:
                            await conn.send(data)
                    finished.append(conn)

                streamer = asyncio.create_task(stream())
                servers = []
                for _ in range(20):
                    peer = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    peer.sendto(b"ping", ln.local_addr)
                    servers.append(asyncio.create_task(serve(await ln.accept())))
                async with asyncio.timeout(10):
                    await asyncio.gather(*servers)  # reaped after 0.1 s, then closed
                assert len(finished) == 20
                assert not streamer.done()
                stop.set()
                await streamer

    run(main())


# -- 4. a remote peer cannot switch GSO off ------------------------------------------------


def test_peer_on_port_zero_opens_no_connection_and_keeps_gso(run: Runner[Any]) -> None:
    """Datagrams from source port 0 used to make an echo app reply to port 0; the kernel
    refused the GSO send (EINVAL) and GSO was switched off for every peer, for good."""
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError as exc:
        pytest.skip(f"raw sockets are refused here ({exc}): cannot send from port 0")

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0) as ln:
            async def serve(conn: UDPConn) -> None:
                async for data in conn:
                    await conn.send(data)

            async def echo() -> None:
                async with asyncio.TaskGroup() as group:
                    async for conn in ln:
                        group.create_task(serve(conn))

            server = asyncio.create_task(echo())
            port = ln.local_addr[1]
            with raw:
                for _ in range(8):
                    raw.sendto(raw_udp_packet("127.0.0.1", 0, "127.0.0.1", port, b"z" * 64),
                               ("127.0.0.1", 0))
            # A legitimate peer's echo, in a run of equal datagrams: GSO-eligible.
            async with udpx.dial("127.0.0.1", port) as client:
                await client.send_many([b"q" * 100] * 8)
                received: list[bytes] = []
                async with asyncio.timeout(5):
                    while len(received) < 8:
                        received.extend(await client.recv_many())
            assert ln.describe()["socket"]["gso"] is True
            stats = ln.stats
            assert stats.drops["bad_source"] == 8
            assert stats.conns == 1 and stats.accepted == 1
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server

    run(main())


# -- 5. memory bounded under a flood ------------------------------------------------------


def test_rx_memory_limit_bounds_buffered_bytes(run: Runner[Any], host: str) -> None:
    async def main() -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        limit = 100_000
        async with udpx.listen(host, 0, rx_memory_limit=limit, rcvbuf=4 * 2**20) as ln:
            with contextlib.ExitStack() as stack:
                peers = [stack.enter_context(socket.socket(family, socket.SOCK_DGRAM))
                         for _ in range(4)]
                for peer in peers:
                    for _ in range(50):
                        peer.sendto(b"m" * 2000, ln.local_addr[:2])
                await settle(ln, 200)
                stats = ln.stats
                kept = stats.rx_packets
                # 4 x 50 x 2,000 B = 400 kB offered, 100 kB allowed
                assert stats.drops["memory_limit"] == 200 - kept
                assert 0 < kept * 2000 <= limit
                assert kept * (2000 + _overhead()) <= limit
                # Reading gives the budget back: new datagrams are buffered again.
                conn = await ln.accept()
                first = len(await conn.recv_many())
                peers[0].sendto(b"again", ln.local_addr[:2])
                await settle(ln, 201)
                assert ln.stats.rx_packets == kept + 1
                assert first > 0
                assert (await conn.recv_many())[-1] == b"again"

    run(main())


def test_memory_of_an_abandoned_connection_is_given_back(run: Runner[Any]) -> None:
    """An accepted connection closed and dropped with datagrams still queued returns their
    share of the listener's budget."""

    async def main() -> None:
        limit = 50_000
        async with udpx.listen("127.0.0.1", 0, rx_memory_limit=limit) as ln:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
                for _ in range(20):
                    peer.sendto(b"m" * 2000, ln.local_addr)
                await settle(ln, 20)
                conn = await ln.accept()
                conn.close()
                await conn.wait_closed()
                del conn
                peer2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                with peer2:
                    for _ in range(20):
                        peer2.sendto(b"n" * 2000, ln.local_addr)
                    await settle(ln, 40)
                    assert ln.stats.rx_packets == 40
                    assert ln.stats.drops["memory_limit"] == 0

    run(main())


def test_rx_memory_limit_is_validated() -> None:
    for bad in (0, -1, True, 1.5, "64M"):
        with pytest.raises(ValueError, match="rx_memory_limit"):
            udpx.listen("127.0.0.1", 0, rx_memory_limit=bad)  # type: ignore[arg-type]


def test_idle_timeout_shrinks_under_connection_pressure() -> None:
    effective = _idle.effective_timeout
    floor = _idle.PRESSURE_FLOOR
    assert effective(3600.0, 0, 65536) == 3600.0
    assert effective(3600.0, 49152, 65536) == 3600.0  # 75 %: not yet
    assert floor < effective(3600.0, 57344, 65536) < 3600.0  # 87.5 %: in between
    assert effective(3600.0, 65536, 65536) == floor
    assert effective(10.0, 65536, 65536) == 10.0  # already below the floor
    # Monotonic in the number of open connections.
    values = [effective(3600.0, count, 1000) for count in range(0, 1001, 10)]
    assert values == sorted(values, reverse=True)


def test_sweeps_come_sooner_under_pressure() -> None:
    assert _idle.sweep_interval(3600.0) == 1800.0
    assert _idle.sweep_interval(_idle.PRESSURE_FLOOR) == _idle.PRESSURE_FLOOR / 2


def test_pressure_reschedules_the_listeners_sweep(run: Runner[Any]) -> None:
    """A flood that fills 75 % of max_conns between two sweeps of a one-hour timeout brings
    the next sweep forward to within the floor, so flooded connections go within a minute."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with udpx.listen("127.0.0.1", 0, max_conns=100, backlog=100) as ln:
            before = ln.next_sweep
            assert before is not None and before - loop.time() > 1000
            for port in range(20000, 20080):
                ln.datagram_received(b"x", ("127.0.0.2", port))
            after = ln.next_sweep
            assert after is not None
            assert after - loop.time() <= _idle.PRESSURE_FLOOR / 2 + 0.01
            assert ln.stats.conns == 80

    run(main())


# -- 7. closing unaccepted connections is O(1) each -----------------------------------------


async def _all_opened(ln: udpx.Listener) -> None:
    """Wait until every connection the datagrams fed so far call for is open: a listener opens
    at most a few hundred per loop iteration (``OPEN_PER_TURN``), holding the rest."""
    for _ in range(10_000):
        if ln.describe(max_conns=0)["opening_held"] == 0:
            return
        await asyncio.sleep(0)
    raise AssertionError("held datagrams never routed")


def _close_time(run: Runner[Any], order: str) -> float:
    async def main() -> float:
        async with udpx.listen("127.0.0.1", 0, backlog=10**6, max_conns=10**6) as ln:
            for port in range(1, 20001):
                ln.datagram_received(b"x", ("127.0.0.3", port))
            await _all_opened(ln)
            conns = ln.conns()
            if order == "reverse":
                conns.reverse()
            started = time.perf_counter()
            for conn in conns:
                conn.close()
            elapsed = time.perf_counter() - started
            assert ln.stats.drops["unaccepted"] == 20000
            return elapsed

    result: float = run(main())
    return result


def test_closing_unaccepted_connections_does_not_scan_the_backlog(run: Runner[Any]) -> None:
    # A ratio in the same run, not a time: with a scanned backlog, closing the newest first
    # costs O(n) per close (about 1000x the oldest-first order at 20,000).
    forward = min(_close_time(run, "forward") for _ in range(2))
    reverse = min(_close_time(run, "reverse") for _ in range(2))
    assert reverse < 3 * forward, (forward, reverse)


# -- 8. a tiny idle_timeout cannot make an idle listener spin -------------------------------


def test_tiny_idle_timeout_does_not_spin(run: Runner[Any]) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, idle_timeout=1e-6) as ln:
            started = resource.getrusage(resource.RUSAGE_SELF)
            await asyncio.sleep(0.3)
            ended = resource.getrusage(resource.RUSAGE_SELF)
            cpu = (ended.ru_utime - started.ru_utime) + (ended.ru_stime - started.ru_stime)
            # Spinning burns the whole 0.3 s; a sweep every MIN_SWEEP_INTERVAL costs nothing.
            assert cpu < 0.15, cpu
            assert ln.stats.conns == 0

    run(main())
    assert _idle.sweep_interval(1e-6) >= _idle.MIN_SWEEP_INTERVAL > 0


# -- 9. smaller defects -----------------------------------------------------------------------


def test_listener_stats_cost_nothing_per_connection(run: Runner[Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``ln.stats`` is read by the drop reporter every 10 s: it keeps running totals rather
    than asking each of (maybe 100,000) connections."""

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, backlog=5000) as ln:
            for port in range(1, 3001):
                ln.datagram_received(b"abc", ("127.0.0.4", port))
            await _all_opened(ln)
            conn = await ln.accept()
            await conn.recv()
            conn.close()

            def forbidden(self: UDPConn) -> None:
                raise AssertionError("ln.stats asked a connection for its stats")

            monkeypatch.setattr(UDPConn, "stats", property(forbidden))
            stats = ln.stats
            assert stats.rx_packets == 3000 and stats.rx_bytes == 9000
            assert stats.conns == 2999 and stats.accepted == 1
            monkeypatch.undo()
            description = ln.describe()  # lists a bounded number of connections
            assert len(description["conns"]) == 100
            assert description["conns_open"] == 2999

    run(main())


def test_describe_lists_a_bounded_number_of_connections(run: Runner[Any]) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, backlog=5000) as ln:
            for port in range(1, 301):
                ln.datagram_received(b"abc", ("127.0.0.5", port))
            await _all_opened(ln)
            assert len(ln.describe()["conns"]) == 100
            assert len(ln.describe(max_conns=None)["conns"]) == 300
            assert len(ln.describe(max_conns=7)["conns"]) == 7
            with pytest.raises(ValueError, match="max_conns"):
                ln.describe(max_conns=-1)

    run(main())


def test_perf_size_error_shows_perfs_usage() -> None:
    result = subprocess.run([sys.executable, "-m", "udpx", "perf", "--size", "65508"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "usage: python -m udpx perf" in result.stderr
    assert "--size" in result.stderr


def test_library_warnings_do_not_reach_stderr_unconfigured() -> None:
    code = ("import logging, udpx\n"
            "logging.getLogger('udpx').warning('udpx: something was dropped')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0
    assert result.stderr == ""


# -- helpers ----------------------------------------------------------------------------------


def _overhead() -> int:
    from udpx._queue import DATAGRAM_OVERHEAD  # noqa: PLC0415

    return DATAGRAM_OVERHEAD
