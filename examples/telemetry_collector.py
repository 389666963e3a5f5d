"""A telemetry collector: many senders, batches read with recv_many, counters per peer.

    python examples/telemetry_collector.py 0.0.0.0 8125
"""

from __future__ import annotations

import asyncio
import sys

import udpx


async def collect(conn: udpx.UDPConn, totals: dict[str, int]) -> None:
    peer = f"{conn.remote_addr[0]}:{conn.remote_addr[1]}"
    try:
        while True:
            batch = await conn.recv_many()  # everything queued, in one call
            totals[peer] = totals.get(peer, 0) + len(batch)
    except udpx.ConnectionClosed:
        pass


async def report(ln: udpx.Listener, totals: dict[str, int]) -> None:
    while True:
        await asyncio.sleep(5)
        drops = dict(ln.stats.drops)
        print(f"{len(totals)} peers, {sum(totals.values())} datagrams, drops {drops}")


async def main(host: str, port: int) -> None:
    totals: dict[str, int] = {}
    async with udpx.listen(host, port, rx_queue_size=4096) as ln, asyncio.TaskGroup() as tasks:
        tasks.create_task(report(ln, totals))
        async for conn in ln:
            tasks.create_task(collect(conn, totals))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
