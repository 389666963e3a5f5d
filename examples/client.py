"""A client: sends a few datagrams to a server and prints the answers.

    python examples/client.py 127.0.0.1 9999
"""

from __future__ import annotations

import asyncio
import sys

import udpx


async def main(host: str, port: int) -> None:
    async with udpx.dial(host, port) as conn:
        await conn.send_many([b"ping %d" % index for index in range(3)])
        for _ in range(3):
            async with asyncio.timeout(2):
                print(await conn.recv())
        print(conn.stats)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
