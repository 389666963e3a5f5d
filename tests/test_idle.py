"""Idle reaping: the pure sweep with a fake clock, then listeners and dialed connections."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import udpx
from udpx._idle import sweep, sweep_interval

from .conftest import Runner


class FakeConn:
    __slots__ = ("activity", "idle_count", "idle_since")

    def __init__(self, now: float) -> None:
        self.activity = 0
        self.idle_count = 0
        self.idle_since = now

    def activity_count(self) -> int:
        return self.activity


def test_sweep_reaps_within_the_promised_window() -> None:
    timeout = 10.0
    interval = sweep_interval(timeout)
    conns = [FakeConn(0.0) for _ in range(4)]
    reaped_at: dict[int, float] = {}
    last_active = {index: 0.0 for index in range(4)}
    now = 0.0
    for step in range(1, 200):
        now = step * 0.5  # traffic happens between sweeps, at half-second steps
        if step % 10 == 0 and now < 40:
            conns[1].activity += 1  # active until 40 s
            last_active[1] = now
        if now < 25:
            conns[2].activity += 1  # active until 25 s
            last_active[2] = now
        if step % int(interval / 0.5) == 0:
            live = [conn for index, conn in enumerate(conns) if index not in reaped_at]
            for conn in sweep(now, timeout, live):
                reaped_at[conns.index(conn)] = now
    for index, when in reaped_at.items():
        assert last_active[index] + timeout <= when <= last_active[index] + 1.5 * timeout + 1
    assert set(reaped_at) == {0, 1, 2, 3}


def test_sweep_never_reaps_an_active_connection() -> None:
    conn = FakeConn(0.0)
    for step in range(1, 1000):
        conn.activity += 1
        assert sweep(step * 5.0, 10.0, [conn]) == []


def test_sweep_over_100000_connections() -> None:
    timeout = 60.0
    conns = [FakeConn(0.0) for _ in range(100_000)]
    for conn in conns[::2]:
        conn.activity = 1
    assert sweep(30.0, timeout, conns) == []  # counts seen: the active half restarts at 30 s
    idle = sweep(60.0, timeout, conns)
    assert len(idle) == 50_000 and all(conn.activity == 0 for conn in idle)
    assert sweep(89.0, timeout, conns) == idle  # the others: idle since 30 s, not yet 60 s
    assert len(sweep(90.0, timeout, conns)) == 100_000


def test_listener_reaps_idle_connections_keeps_active_ones(run: Runner[Any], host: str) -> None:
    timeout = 0.2

    async def main() -> None:
        async with udpx.listen(host, 0, idle_timeout=timeout) as ln, \
                udpx.dial(host, ln.local_addr[1], idle_timeout=None) as quiet, \
                udpx.dial(host, ln.local_addr[1], idle_timeout=None) as chatty:
            await quiet.send(b"once")
            await chatty.send(b"first")
            first = await ln.accept()
            second = await ln.accept()
            quiet_conn = first if first.remote_addr[1] == quiet.local_addr[1] else second
            chatty_conn = second if quiet_conn is first else first
            started = asyncio.get_running_loop().time()

            async def keep_talking() -> None:
                while True:
                    await chatty.send(b"ping")
                    await chatty_conn.recv()
                    await asyncio.sleep(timeout / 10)

            talker = asyncio.create_task(keep_talking())
            assert await quiet_conn.recv() == b"once"
            with pytest.raises(udpx.ConnectionClosed) as info:
                await quiet_conn.recv()  # woken by the reaper
            elapsed = asyncio.get_running_loop().time() - started
            assert info.value.reason == "idle"
            assert quiet_conn.close_reason == "idle"
            assert timeout * 0.9 <= elapsed <= 1.5 * timeout + 1
            assert not chatty_conn.closed
            assert ln.conns() == [chatty_conn]
            talker.cancel()
            # The reaped peer's next datagram opens a new connection.
            await quiet.send(b"back")
            again = await ln.accept()
            assert await again.recv() == b"back"

    run(main())


def test_dialed_connection_reaps_itself(run: Runner[Any], host: str) -> None:
    async def main() -> None:
        async with udpx.listen(host, 0, idle_timeout=None) as ln:
            conn = await udpx.dial(host, ln.local_addr[1], idle_timeout=0.1)
            await conn.send(b"x")
            async for _ in conn:
                pass  # ends without an exception when the connection is reaped
            assert conn.closed and conn.close_reason == "idle"
            with pytest.raises(udpx.ConnectionClosed) as info:
                await conn.recv()
            assert info.value.reason == "idle"
            await conn.wait_closed()

    run(main())
