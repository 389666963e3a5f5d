"""Fixtures shared by the tests: the event loop kind, the address family, a runner."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

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
