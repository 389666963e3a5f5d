"""An echo server in protocol mode: no task per peer, for many busy peers.

    python examples/protocol_echo_server.py 127.0.0.1 9999

Try it with ``python examples/client.py 127.0.0.1 9999``. Ctrl-C stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import udpx


class Echo(udpx.ConnProtocol):
    """One per peer: answers each batch of datagrams with the same datagrams."""

    def connection_made(self, conn: udpx.UDPConn) -> None:
        self.conn = conn

    def datagrams_received(self, datagrams: list[bytes]) -> None:
        # The socket's transmit queue full: drop the echo, as UDP would.
        with contextlib.suppress(udpx.QueueFull):
            self.conn.send_many_nowait(datagrams)

    def connection_lost(self, exc: Exception | None) -> None:
        print(f"{self.conn.remote_addr} gone ({self.conn.close_reason}): {self.conn.stats}")


async def main(host: str, port: int) -> None:
    async with udpx.listen(host, port, protocol_factory=Echo, idle_timeout=60) as ln:
        print(f"echoing on {ln.local_addr}")
        await asyncio.Event().wait()  # until Ctrl-C


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1], int(sys.argv[2])))
