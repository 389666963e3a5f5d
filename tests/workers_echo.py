"""An echo server in several workers of ``udpx.run()``, which tests/test_run.py runs as a child
process: ``python workers_echo.py LOOP_KIND PORT WORKERS``.

Each reply is ``b"WORKER_ID PID " + datagram``, so that the test sees which worker answered.
Each worker prints ``ready WORKER_ID PID`` on stdout once its listener is open. When stopped
(``main`` cancelled) a worker queues ``b"bye WORKER_ID PID"`` to every peer it has; leaving the
listener's ``async with`` flushes it. ``udpx`` logs go to stderr, ``run returned`` to stdout
at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import udpx

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None  # type: ignore[assignment]


async def echo(conn: udpx.UDPConn, tag: bytes) -> None:
    async for datagram in conn:
        await conn.send(tag + datagram)


def make_main(port: int) -> Callable[[], Coroutine[Any, Any, None]]:
    # A closure: udpx.run forks its workers, so main need not be picklable.
    async def main() -> None:
        tag = b"%d %d " % (udpx.worker_id() or 0, os.getpid())
        async with udpx.listen("127.0.0.1", port, idle_timeout=None) as ln:
            # One write per line: print() may write the text and the newline separately, and
            # the workers share the pipe.
            os.write(sys.stdout.fileno(), f"ready {udpx.worker_id()} {os.getpid()}\n".encode())
            try:
                async with asyncio.TaskGroup() as tasks:
                    async for conn in ln:
                        tasks.create_task(echo(conn, tag))
            finally:
                for conn in ln.conns():
                    with contextlib.suppress(udpx.UDPXError):
                        conn.send_nowait(b"bye " + tag.strip())

    return main


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(process)d %(message)s")
    loop_kind, port, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    udpx.run(make_main(port), workers=workers,
             loop_factory=uvloop.new_event_loop if loop_kind == "uvloop" else None)
    print("run returned", flush=True)
