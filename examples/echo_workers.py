"""An echo server in several worker processes sharing one port (udpx.run).

    python examples/echo_workers.py 127.0.0.1 9999 4
    echo hello | socat -t1 - UDP:127.0.0.1:9999

Each worker has its own socket on the port (SO_REUSEPORT, the default inside a multi-worker
run); the kernel keeps every peer on one worker. Ctrl-C or SIGTERM closes them all gracefully.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys

import udpx


async def echo(conn: udpx.UDPConn) -> None:
    async with conn:
        async for datagram in conn:
            await conn.send(datagram)


async def main(host: str, port: int) -> None:
    async with udpx.listen(host, port) as ln, asyncio.TaskGroup() as tasks:
        print(f"worker {udpx.worker_id()} echoing on {ln.local_addr}", flush=True)
        async for conn in ln:
            tasks.create_task(echo(conn))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)  # shows workers starting, restarting, stopping
    host, port, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    udpx.run(functools.partial(main, host, port), workers=workers)
