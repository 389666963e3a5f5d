"""Fixtures shared by the tests: the event loop kind, the address family, a runner."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import udpx
from udpx._cmsg import hold_gro_switch
from udpx._engine import SocketEngine

T = TypeVar("T")

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None  # type: ignore[assignment]

LOOP_KINDS = ["asyncio", "uvloop"]

Runner = Callable[[Coroutine[Any, Any, T]], T]

#: No test should come near this; it only turns a hang into a failure.
TEST_TIMEOUT = 60.0


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


HAVE_IPV6 = _ipv6_loopback()


@pytest.fixture(scope="session", autouse=True)
def _gro_switch_held() -> None:
    """The sockets that hold the kernel's GRO switch (one per family, made once per process
    with its first GRO socket of that family) exist before any test counts this process's
    file descriptors, whatever the order the tests run in."""
    hold_gro_switch(socket.AF_INET)
    hold_gro_switch(socket.AF_INET6)


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    if kind == "uvloop" and uvloop is None:
        pytest.skip("uvloop is not installed")
    return kind


@pytest.fixture
def run(loop_kind: str) -> Runner[Any]:
    """Run a coroutine to completion on a new loop of the kind under test, bounded in time."""

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as loop_runner:
            return loop_runner.run(asyncio.wait_for(coro, TEST_TIMEOUT))

    return runner


@pytest.fixture(params=["mmsg", "transport"])
def engine(request: pytest.FixtureRequest) -> str:
    """The engine under test: udpx's batch engine, or the event loop's own datagram transport
    (the portable path), for the tests that run through both."""
    kind: str = request.param
    return kind


@pytest.fixture(params=["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def host(request: pytest.FixtureRequest) -> str:
    address: str = request.param
    if address == "::1" and not HAVE_IPV6:
        pytest.skip("no IPv6 loopback")
    return address


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port nothing listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


def setpriv_dropping(capability: str) -> list[str] | None:
    """``setpriv`` taking ``capability`` (e.g. "net_raw") away from the command it runs, or
    None where it cannot (no setpriv, or this process may not change its bounding set)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    command = [setpriv, "--bounding-set", f"-{capability}"]
    probe = subprocess.run([*command, "true"], capture_output=True, timeout=30, check=False)
    return command if probe.returncode == 0 else None


def raw_udp_packet(source: str, source_port: int, destination: str, destination_port: int,
                   payload: bytes) -> bytes:
    """An IPv4 + UDP packet for a raw ``IPPROTO_RAW`` socket (the kernel fills the IP
    checksum; UDP checksum 0 means none): how tests send from addresses and ports no socket
    could bind, such as source port 0."""
    udp_length = 8 + len(payload)
    ip_header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_length, 0, 0, 64,
                            socket.IPPROTO_UDP, 0, socket.inet_aton(source),
                            socket.inet_aton(destination))
    udp_header = struct.pack("!HHHH", source_port, destination_port, udp_length, 0)
    return ip_header + udp_header + payload
# -- network namespaces ---------------------------------------------------------------------
#
# For tests that need a network of their own (qdiscs, link-local addresses, veth pairs...): a
# fresh namespace per test, deleted at teardown. Creating one needs root (CAP_SYS_ADMIN) and the
# ``ip`` tool; where that is refused the test is skipped with the reason. Code runs inside with
# ``NetNS.python``: a child process (``ip netns exec``), so that every thread of it (the loops'
# resolver threads too) is in the namespace.

#: Any one command run for a namespace (the scenarios bound themselves well below this).
NETNS_COMMAND_TIMEOUT = 60.0

_netns_counter = itertools.count()


class NetNS:
    """A network namespace created for one test (``lo`` up), deleted at teardown."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<NetNS {self.name}>"

    def run(self, *argv: str, check: bool = True,
            timeout: float = NETNS_COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace; ``check``: fail with its output if it fails."""
        return _command(["ip", "netns", "exec", self.name, *argv], check, timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NAME ARGS...``, e.g. ``ns.ip("-6", "addr", "add", "fe80::1/64", "dev", "lo",
        "nodad")``. A veth pair to another namespace: ``ns.ip("link", "add", "a0", "type",
        "veth", "peer", "name", "b0", "netns", other.name)`` (then set both ends up)."""
        return _command(["ip", "-n", self.name, *args], check, NETNS_COMMAND_TIMEOUT)

    def python(self, script: Path, *args: str,
               timeout: float = NETNS_COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with this interpreter inside the namespace (not checked: the caller
        reads the exit status, stdout and stderr)."""
        return self.run(sys.executable, str(script), *args, check=False, timeout=timeout)

    def delete(self) -> None:
        _command(["ip", "netns", "delete", self.name], True, NETNS_COMMAND_TIMEOUT)


def _command(argv: list[str], check: bool, timeout: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited with {done.returncode}: "
                             f"{done.stderr.strip() or done.stdout.strip()}")
    return done


def netns_skip_reason() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if shutil.which("ip") is None:
        return "the ip tool (iproute2) is not installed"
    return None


@pytest.fixture
def netns_factory() -> Iterator[Callable[[], NetNS]]:
    """Creates uniquely named namespaces (``lo`` up) on demand; deletes them all at teardown.

    Skips the test when namespaces cannot be created (not root, no iproute2...).
    """
    reason = netns_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    created: list[NetNS] = []

    def make() -> NetNS:
        name = f"udpx-test-{os.getpid()}-{next(_netns_counter)}-{secrets.token_hex(3)}"
        added = _command(["ip", "netns", "add", name], False, NETNS_COMMAND_TIMEOUT)
        if added.returncode != 0:
            pytest.skip(f"cannot create a network namespace (ip netns add {name}): "
                        f"{added.stderr.strip()}")
        namespace = NetNS(name)
        created.append(namespace)
        namespace.ip("link", "set", "lo", "up")
        return namespace

    try:
        yield make
    finally:
        errors = []
        for namespace in reversed(created):
            try:
                namespace.delete()
            except (AssertionError, subprocess.TimeoutExpired) as exc:
                errors.append(str(exc))
        if errors:
            raise AssertionError("; ".join(errors))


@pytest.fixture
def netns(netns_factory: Callable[[], NetNS]) -> NetNS:
    """One network namespace of the test's own, ``lo`` up."""
    return netns_factory()


class EchoProtocol(udpx.ConnProtocol):
    """A protocol-mode echo: each batch goes back as it came."""

    def connection_made(self, conn: udpx.UDPConn) -> None:
        self.conn = conn

    def datagrams_received(self, datagrams: list[bytes]) -> None:
        self.conn.send_many_nowait(datagrams)


def socket_engine(engine: object) -> SocketEngine:
    """The batch engine behind a listener or a dialed connection (tests look inside it)."""
    assert isinstance(engine, SocketEngine), engine
    return engine


async def settle(ln: udpx.Listener, count: int) -> None:
    """Wait until the listener has accounted for ``count`` datagrams (delivered or dropped),
    bounded in time (10 s)."""
    for _ in range(2000):
        stats = ln.stats
        if stats.rx_packets + sum(stats.drops.values()) >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"listener saw {ln.stats} after 10 s, expected {count} datagrams")


async def receive_plain(sock: socket.socket, count: int,
                        timeout: float = 10.0) -> list[tuple[bytes, Any]]:
    """The next ``count`` datagrams of a plain socket, with their sources, read from the
    running loop (udpx sends at the end of a loop iteration, so a blocking recv in the test's
    own task would wait for ever)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    got: list[tuple[bytes, Any]] = []
    sock.setblocking(False)

    def readable() -> None:
        while len(got) < count:
            try:
                got.append(sock.recvfrom(70000))
            except BlockingIOError:
                return
        if not done.done():
            done.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await asyncio.wait_for(done, timeout)
    finally:
        loop.remove_reader(sock.fileno())
    return got


def send_gso_runs(sender: socket.socket, address: Any, runs: int, run_length: int,
                  size: int) -> list[bytes]:
    """Send ``runs`` GSO runs of ``run_length`` datagrams of ``size`` bytes (the sender has
    UDP_SEGMENT set to ``size``) to ``address``; returns the datagrams, in order."""
    datagrams = [(b"%d:%d:" % (index, piece)).ljust(size, b".")
                 for index in range(runs) for piece in range(run_length)]
    for index in range(runs):
        sender.sendto(b"".join(datagrams[index * run_length:(index + 1) * run_length]),
                      address)
    return datagrams
