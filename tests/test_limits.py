"""Limits against floods of new peers, kernel drop counters, socket buffers, describe()."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from typing import Any

import pytest

import udpx
from udpx import _sockets

from .conftest import Runner, setpriv_dropping, settle
from .test_end_to_end import BIG_RCVBUF, family_of


def test_backlog_and_max_conns_hold_against_a_flood(run: Runner[Any], host: str) -> None:
    async def main() -> None:
        async with udpx.listen(host, 0, backlog=50, max_conns=100, rcvbuf=BIG_RCVBUF) as ln:
            with contextlib.ExitStack() as stack:
                senders = [stack.enter_context(socket.socket(family_of(host), socket.SOCK_DGRAM))
                           for _ in range(400)]
                for sock in senders[:300]:  # 300 distinct source ports, one datagram each
                    sock.sendto(b"hello", ln.local_addr[:2])
                await settle(ln, 300)
                stats = ln.stats
                assert (stats.conns, stats.drops["backlog_full"], stats.rx_packets) == (50, 250, 50)
                for _ in range(50):
                    await ln.accept()
                for sock in senders[300:]:  # 100 more: 50 fill max_conns, 50 are refused
                    sock.sendto(b"hello", ln.local_addr[:2])
                await settle(ln, 400)
                stats = ln.stats
                assert stats.conns == 100
                assert stats.drops["backlog_full"] == 250
                assert stats.drops["conn_limit"] == 50
                assert stats.rx_packets == 100
                assert stats.drops["kernel"] == 0

    run(main())


def test_kernel_drops_are_reported(run: Runner[Any], host: str) -> None:
    async def main() -> None:
        with socket.socket(family_of(host), socket.SOCK_DGRAM) as raw:
            raw.bind((host, 0))
            async with udpx.listen(host, 0, rcvbuf=4096) as ln, \
                    udpx.dial(host, raw.getsockname()[1], rcvbuf=4096) as conn:
                # The loop is blocked while these run: the small buffers overflow.
                for _ in range(2000):
                    raw.sendto(bytes(100), ln.local_addr[:2])
                assert ln.stats.drops["kernel"] > 0
                # A dialed connection's socket has its own counter.
                for _ in range(2000):
                    raw.sendto(bytes(100), conn.local_addr[:2])
                assert conn.stats.drops["kernel"] > 0

    run(main())


def test_describe_round_trips_through_json(run: Runner[Any], host: str) -> None:
    async def main() -> None:
        async with udpx.listen(host, 0) as ln, udpx.dial(host, ln.local_addr[1]) as conn:
            await conn.send(b"hi")
            server_conn = await ln.accept()
            await server_conn.recv()
            description = json.loads(json.dumps(ln.describe()))
            assert description["local_addr"][1] == ln.local_addr[1]
            assert description["options"]["rx_queue_size"] == 1024
            assert description["socket"]["rcvbuf"] > 0
            assert description["stats"]["rx_packets"] == 1
            [peer] = description["conns"]
            assert peer["remote_addr"][1] == conn.local_addr[1]
            assert peer["rx_queued"] == 0 and peer["tx_pending"] == 0
            assert peer["age"] >= 0 and peer["idle_at_least"] >= 0
            dialed = json.loads(json.dumps(conn.describe()))
            assert dialed["socket"]["sndbuf"] > 0
            assert dialed["stats"]["tx_packets"] == 1
        assert json.loads(json.dumps(ln.describe()))["closed"] is True


def test_describe_samples_idle_time(run: Runner[Any], host: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with udpx.listen(host, 0, idle_timeout=None) as ln, \
                udpx.dial(host, ln.local_addr[1]) as conn:
            await conn.send(b"hi")
            server_conn = await ln.accept()
            await server_conn.recv()
            # Read the clock before the sample: describe() starts the idle period at its own
            # reading, so it is no earlier than this one however long the process is preempted
            # between the two (read after it, the gap widened the bound's 2 ms of slack).
            sampled = loop.time()
            assert server_conn.describe()["idle_at_least"] == 0  # traffic since the last sample
            await asyncio.sleep(0.05)
            idle = server_conn.describe()["idle_at_least"]
            # (uvloop's timers have millisecond resolution: the sleep may end a little early)
            assert 0.045 <= idle <= loop.time() - sampled + 0.002  # (idle is rounded to 1 ms)
            await conn.send(b"again")
            await server_conn.recv()
            assert server_conn.describe()["idle_at_least"] == 0

    run(main())


def test_stats_survive_close(run: Runner[Any], host: str) -> None:
    async def main() -> None:
        with socket.socket(family_of(host), socket.SOCK_DGRAM) as raw:
            raw.bind((host, 0))
            ln = await udpx.listen(host, 0, rcvbuf=4096)
            conn = await udpx.dial(host, raw.getsockname()[1], rcvbuf=4096)
            for _ in range(2000):
                raw.sendto(bytes(100), ln.local_addr[:2])
                raw.sendto(bytes(100), conn.local_addr[:2])
            before = ln.stats.drops["kernel"], conn.stats.drops["kernel"]
            assert before[0] > 0 and before[1] > 0
            await ln.aclose()
            await conn.aclose()
            assert (ln.stats.drops["kernel"], conn.stats.drops["kernel"]) == before

    run(main())


def test_datagrams_of_unaccepted_connections_are_counted(run: Runner[Any], host: str) -> None:
    async def main() -> None:
        ln = await udpx.listen(host, 0, rcvbuf=BIG_RCVBUF)
        with contextlib.ExitStack() as stack:
            senders = [stack.enter_context(socket.socket(family_of(host), socket.SOCK_DGRAM))
                       for _ in range(3)]
            for sock in senders:
                sock.sendto(b"one", ln.local_addr[:2])
                sock.sendto(b"two", ln.local_addr[:2])
            await settle(ln, 6)
            accepted = await ln.accept()
            assert await accepted.recv() == b"one"
            await ln.aclose()
        stats = ln.stats
        # The accepted connection's datagrams are the application's (one read, one still
        # readable); the two never accepted connections' four are dropped, and counted.
        assert stats.rx_packets == 2
        assert stats.drops["unaccepted"] == 4
        assert await accepted.recv() == b"two"

    run(main())


#: Two listeners asking for 4x net.core.rmem_max each: what was granted, and the warnings.
_CAPPED_SCRIPT = """
import asyncio, json, logging, os, udpx
from udpx import _sockets

class Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []
    def emit(self, record):
        self.messages.append(record.getMessage())

keep = Keep()
logging.getLogger("udpx").addHandler(keep)
limit = _sockets._read_sysctl("net.core.rmem_max")
if os.environ.get("SYSCTL_UNREADABLE"):  # as in a sandbox that hides /proc/sys
    _sockets._read_sysctl = lambda name: None

async def main():
    granted = []
    for _ in range(2):
        async with udpx.listen("127.0.0.1", 0, rcvbuf=4 * limit) as ln:
            granted.append(ln.rcvbuf)
    print(json.dumps({"limit": limit, "granted": granted, "warnings": keep.messages}))

asyncio.run(main())
"""


def _may_force_buffers() -> bool:
    """Whether this process may set a buffer past the sysctl's cap (CAP_NET_ADMIN)."""
    force = _sockets._FORCE_OPTIONS.get(socket.SO_RCVBUF)
    if force is None:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, force, 1 << 20)
        except OSError:
            return False
    return True


@pytest.mark.parametrize("readable", [True, False], ids=["sysctl", "sysctl unreadable"])
def test_capped_buffer_request_warns_once(readable: bool) -> None:
    """Without CAP_NET_ADMIN (taken away here from a root process) a request past
    net.core.rmem_max is capped, and udpx warns once per process, saying how to raise it;
    also where the sysctl cannot be read (black-box: no warning then)."""
    limit = _sockets._read_sysctl("net.core.rmem_max")
    if limit is None:
        pytest.skip("no net.core.rmem_max here")
    if 4 * limit > 2**31 - 1:
        pytest.skip(f"net.core.rmem_max ({limit}) is too large to ask for 4 times as much")
    command = [sys.executable, "-c", _CAPPED_SCRIPT]
    if _may_force_buffers():
        setpriv = setpriv_dropping("net_admin")
        if setpriv is None:
            pytest.skip("needs setpriv(1), and the right to use it, to run without "
                        "CAP_NET_ADMIN")
        command = [*setpriv, *command]
    environment = {**os.environ, "SYSCTL_UNREADABLE": "" if readable else "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False,
                            env=environment)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    limit = report["limit"]
    assert report["granted"] == [2 * limit, 2 * limit]  # not the request
    [warning] = [message for message in report["warnings"] if "net.core.rmem_max" in message]
    assert (f"rcvbuf of {4 * limit} bytes requested, which the kernel doubles for its "
            f"bookkeeping: it granted {2 * limit} of those {8 * limit}, capped by "
            f"net.core.rmem_max{f' = {limit}' if readable else ''}; raise it with: sysctl -w "
            f"net.core.rmem_max={4 * limit}" in warning)
    assert "CAP_NET_ADMIN" in warning


def test_buffer_request_is_granted_in_full_with_cap_net_admin(
        run: Runner[Any], caplog: pytest.LogCaptureFixture) -> None:
    limit = _sockets._read_sysctl("net.core.rmem_max")
    wlimit = _sockets._read_sysctl("net.core.wmem_max")
    if limit is None or wlimit is None:
        pytest.skip("no net.core.rmem_max/wmem_max here")
    if 4 * max(limit, wlimit) > 2**31 - 1:
        pytest.skip("net.core.rmem_max/wmem_max are too large to ask for 4 times as much")
    if not _may_force_buffers():
        pytest.skip("needs CAP_NET_ADMIN (root) to set a buffer past the sysctl")

    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="udpx"):
            async with udpx.listen("127.0.0.1", 0, rcvbuf=4 * limit,
                                   sndbuf=2 * wlimit) as ln, \
                    udpx.dial("127.0.0.1", ln.local_addr[1], rcvbuf=3 * limit) as conn:
                assert (ln.rcvbuf, ln.sndbuf) == (8 * limit, 4 * wlimit)
                assert conn.describe()["socket"]["rcvbuf"] == 6 * limit
            # Past INT_MAX / 2 Linux grants the most it can (twice that): no warning either.
            async with udpx.listen("127.0.0.1", 0, rcvbuf=2**30 + 1) as ln:
                assert ln.rcvbuf == 2 * ((2**31 - 1) // 2)
        assert not caplog.records

    run(main())


def _refuse_99_peers(ln: Any) -> None:
    """100 new peers at a listener with ``backlog=1``: 99 of them dropped as backlog_full."""
    for port in range(40000, 40100):
        ln.datagram_received(b"x", ("127.0.0.1", port))


def test_drops_are_summarised_not_logged_per_datagram(
        run: Runner[Any], caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="udpx"):
            async with udpx.listen("127.0.0.1", 0, backlog=1) as ln:
                _refuse_99_peers(ln)
                assert not caplog.records  # nothing logged per datagram
                ln._report_drops()  # what the listener's timer runs every interval
                ln._report_drops()  # nothing new: no second warning
        [record] = caplog.records
        assert "backlog_full=99" in record.getMessage()
        assert "kernel" not in record.getMessage()

    run(main())


def test_drops_not_yet_reported_are_reported_as_the_listener_closes(
        run: Runner[Any], caplog: pytest.LogCaptureFixture) -> None:
    # A server that runs for less than the report interval (or whose last seconds dropped)
    # would otherwise never hear of its drops (black-box). What closing drops is no news.
    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="udpx"):
            async with udpx.listen("127.0.0.1", 0, backlog=1) as ln:
                _refuse_99_peers(ln)
                assert not caplog.records
        [record] = caplog.records
        message = record.getMessage()
        assert "dropped datagrams since the last report, as it closes: " in message
        # Not the datagram queued on the connection closing left unaccepted.
        assert message.rsplit(": ", 1)[1] == "backlog_full=99"
        assert ln.stats.drops["unaccepted"] == 1  # (counted, as ever)

    run(main())


def test_kernel_drops_are_reported_with_what_overflowed(
        run: Runner[Any], caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        with caplog.at_level(logging.WARNING, logger="udpx"):
            async with udpx.listen("127.0.0.1", 0, rcvbuf=4096) as ln:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                    # Loopback delivers at once, and the loop does not run the listener's
                    # reader in between: the small buffer overflows (counted by the kernel).
                    for _ in range(200):
                        sender.sendto(b"x" * 100, ln.local_addr)
                ln._report_drops()  # what the listener's timer runs every interval
                drops = ln.stats.drops["kernel"]
        assert drops > 0
        [record] = caplog.records
        message = record.getMessage()
        assert f"kernel={drops}" in message
        assert (f"kernel: most likely a receive buffer of {ln.rcvbuf:,} bytes overflowed; a "
                f"larger rcvbuf holds more" in message)

    run(main())
