"""Objects left unclosed warn with ResourceWarning."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from typing import Any

import pytest

import udpx

from .conftest import LOOP_KINDS

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None  # type: ignore[assignment]


@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize("what", ["listener", "dialed"])
def test_unclosed_objects_warn(kind: str, what: str) -> None:
    if kind == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")
    factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop

    async def leak() -> None:
        ln = await udpx.listen("127.0.0.1", 0)
        if what == "dialed":
            await udpx.dial("127.0.0.1", ln.local_addr[1])
            await ln.aclose()

    # The socket object may be finalised first and warn too; udpx's own warning must be there.
    with pytest.warns(ResourceWarning) as record:
        loop = factory()
        try:
            loop.run_until_complete(leak())
        finally:
            loop.close()
        del loop
        for _ in range(3):
            gc.collect()
    assert any(f"unclosed <udpx.{name}" in str(w.message) for w in record
               for name in ("Listener", "UDPConn"))


def test_no_warning_when_closed() -> None:
    async def tidy() -> Any:
        async with udpx.listen("127.0.0.1", 0) as ln, udpx.dial("127.0.0.1", ln.local_addr[1]):
            pass

    asyncio.run(tidy())
    gc.collect()  # filterwarnings=error turns any ResourceWarning into a failure


_GRO_SWITCH_PROGRAM = r"""
import asyncio, os, socket, subprocess, sys
import udpx

def fds():
    return set(os.listdir("/proc/self/fd"))

class Lost(asyncio.DatagramProtocol):
    def __init__(self):
        self.lost = asyncio.get_running_loop().create_future()
    def connection_lost(self, exc):
        self.lost.set_result(exc)

async def query(port):
    async with udpx.dial("127.0.0.1", port) as conn:
        await conn.send(b"q")

async def main():
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    before = fds()
    await query(port)  # closed (and flushed) when the async with ends
    added = fds() - before
    assert len(added) == 1, added  # the switch's socket, made with the first GRO socket
    after_first = fds()
    for _ in range(3):
        await query(port)
    transport, protocol = await udpx.create_datagram_endpoint(
        Lost, remote_addr=("127.0.0.1", port))
    transport.close()
    await protocol.lost
    assert fds() == after_first, (fds(), after_first)  # and only one
    fd = int(added.pop())
    assert not os.get_inheritable(fd)
    anchor = socket.fromfd(fd, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert anchor.getsockopt(socket.SOL_UDP, 104) == 1  # UDP_GRO
        assert anchor.getsockname()[1] == 0  # unbound: it receives nothing
    finally:
        anchor.close()
    # Not inherited by a program the process runs, even one that keeps what it inherits.
    look = (f"import os; p = '/proc/self/fd/{fd}'; "
            f"print(os.readlink(p) if os.path.exists(p) else 'none')")
    child = subprocess.run([sys.executable, "-c", look], capture_output=True, text=True,
                           check=True, close_fds=False)
    assert not child.stdout.startswith("socket:"), child.stdout
    server.close()

asyncio.run(main())
print("ok")
"""


def test_one_socket_holds_the_kernels_gro_switch() -> None:
    """The kernel turns its UDP GRO receive hook on with the first GRO socket and off with the
    last, each turn costing about 60 us: the first GRO socket (of a family) also makes one
    unbound socket with UDP_GRO, kept for the process's life (one, however many sockets come
    and go), not inherited, and never warned about at exit (-X dev -W error)."""
    result = subprocess.run([sys.executable, "-X", "dev", "-W", "error", "-c",
                             _GRO_SWITCH_PROGRAM], capture_output=True, text=True, timeout=60,
                            check=False)
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "ok", "")
