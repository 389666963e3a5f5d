"""An echo server: every datagram goes back to the peer that sent it.

    python examples/echo_server.py 127.0.0.1 9999
    echo hello | socat -t1 - UDP:127.0.0.1:9999
"""

from __future__ import annotations

import asyncio
import sys

import udpx


async def echo(conn: udpx.UDPConn) -> None:
    async with conn:
        async for datagram in conn:
            await conn.send(datagram)


async def main(host: str, port: int) -> None:
    async with udpx.listen(host, port) as ln, asyncio.TaskGroup() as tasks:
        print(f"echoing on {ln.local_addr}", flush=True)
        async for conn in ln:
            tasks.create_task(echo(conn))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
