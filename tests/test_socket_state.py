"""The per-socket kernel state (``_cmsg.SocketState``): what it asks the kernel for, how it
judges a GSO failure, and that everything built on a socket (the engine's arrays, the writer, a
``BatchWriter``'s own sender) follows it."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest

import udpx
from udpx._cmsg import (
    GSO_MAX_BYTES,
    GSO_MAX_SEGMENTS,
    HAVE_GSO,
    IP_PKTINFO,
    IP_RECVERR,
    IPPROTO_IP,
    SocketState,
)

from .conftest import Runner, socket_engine


@pytest.fixture
def udp_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    with sock:
        yield sock


def test_nothing_asked_nothing_on(udp_socket: socket.socket) -> None:
    state = SocketState(udp_socket)
    assert state.describe() == {"pktinfo": False, "recverr": False, "dont_fragment": False,
                                "ecn": False, "gso": False, "gro": False}
    assert not state.controls


def test_what_is_asked_is_what_the_kernel_agreed(udp_socket: socket.socket) -> None:
    state = SocketState(udp_socket, batched=True, slot_size=65535, named=True, gso=True,
                        gro=True, pktinfo=True, ecn=True, recverr=True, dont_fragment=True)
    assert state.describe() == {"pktinfo": True, "recverr": True, "dont_fragment": True,
                                "ecn": True, "gso": HAVE_GSO, "gro": True}
    assert state.controls
    # The options really are set on the socket.
    assert udp_socket.getsockopt(IPPROTO_IP, IP_PKTINFO) == 1
    assert udp_socket.getsockopt(IPPROTO_IP, IP_RECVERR) == 1


def test_gro_needs_batches_and_a_slot_that_holds_any_run(udp_socket: socket.socket) -> None:
    assert not SocketState(udp_socket, batched=True, slot_size=2000, gro=True).gro
    assert not SocketState(udp_socket, batched=False, slot_size=65535, gro=True).gro
    assert not SocketState(udp_socket, batched=False, gso=True).gso


def test_controls_only_where_datagrams_carry_their_own(udp_socket: socket.socket) -> None:
    # A connected socket marks TOS with the socket option: no per-datagram control messages.
    assert not SocketState(udp_socket, batched=True, ecn=True, named=False).controls
    assert SocketState(udp_socket, batched=True, ecn=True, named=True).controls


def test_gso_limit() -> None:
    assert SocketState.gso_limit(64) == GSO_MAX_SEGMENTS
    assert SocketState.gso_limit(1200) == GSO_MAX_BYTES // 1200
    assert SocketState.gso_limit(GSO_MAX_BYTES) == 1


def test_gso_control_is_cached_per_size(udp_socket: socket.socket) -> None:
    state = SocketState(udp_socket, batched=True, gso=True)
    first = state.gso_control(1200)
    assert state.gso_control(1200) is first
    assert state.gso_control(64) != first


_PEER = b"\x02\x00\x30\x39" + bytes(12)  # sockaddr_in: port 12345
_PORT_ZERO = b"\x02\x00\x00\x00" + bytes(12)


@pytest.mark.skipif(not HAVE_GSO, reason="UDP GSO is Linux-only")
@pytest.mark.parametrize("case", [
    (errno.EIO, _PEER, True, True),  # the device cannot checksum segments
    (errno.EOPNOTSUPP, None, False, True),
    (errno.ENOPROTOOPT, _PEER, False, True),
    (errno.EINVAL, _PEER, False, True),  # the first GSO send to a well-formed address
    (errno.EINVAL, None, False, True),
    (errno.EINVAL, _PEER, True, False),  # GSO worked before: the destination is at fault
    (errno.EINVAL, _PORT_ZERO, False, False),  # a peer from port 0 cannot switch GSO off
    (errno.ECONNREFUSED, _PEER, False, False),
    (errno.EMSGSIZE, _PEER, False, False),
], ids=["EIO", "EOPNOTSUPP", "ENOPROTOOPT", "EINVAL-first", "EINVAL-connected",
        "EINVAL-proven", "EINVAL-port0", "ECONNREFUSED", "EMSGSIZE"])
def test_only_a_capability_refusal_turns_gso_off(
        udp_socket: socket.socket, caplog: pytest.LogCaptureFixture,
        case: tuple[int, bytes | None, bool, bool]) -> None:
    code, sockaddr, proven, off = case
    state = SocketState(udp_socket, batched=True, gso=True)
    if proven:
        state.gso_sent()
    with caplog.at_level(logging.WARNING, logger="udpx"):
        state.gso_failed(OSError(code, "refused"), sockaddr)
    assert state.gso is not off
    assert ("GSO turned off" in caplog.text) is off
    if off:  # for good: later failures change nothing and log nothing more
        caplog.clear()
        state.gso_failed(OSError(errno.EIO, "again"), _PEER)
        assert not state.gso and not caplog.text


def test_engine_and_writer_share_the_state(run: Runner[Any]) -> None:
    async def main() -> None:
        async with udpx.listen("0.0.0.0", 0, ecn=True) as ln:
            engine = socket_engine(ln._engine)
            assert engine.writer.state is engine.state
            assert ln.describe()["socket"] | engine.state.describe() == ln.describe()["socket"]
            assert engine.receiver.pktinfo and engine.receiver.tos  # type: ignore[union-attr]
            assert engine.sender.control_space > 0  # type: ignore[union-attr]

    run(main())


def test_transport_engine_reports_no_mechanisms(run: Runner[Any]) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, engine="transport") as ln:
            described = ln.describe()["socket"]
            assert described["engine"] == "transport"
            assert not any(described[name] for name in
                           ("pktinfo", "recverr", "dont_fragment", "ecn", "gso", "gro"))

    run(main())


@pytest.mark.parametrize("burst", [1, 5])
def test_batch_writer_on_a_wildcard_listener_answers_from_the_dialed_address(
        run: Runner[Any], burst: int) -> None:
    """A ``BatchWriter`` sends through its own arrays: they must carry the source address
    as the socket's own sender does (a client that dialed 127.0.0.2 drops anything else)."""

    async def main() -> None:
        async with udpx.listen("0.0.0.0", 0) as ln, \
                udpx.dial("127.0.0.2", ln.local_addr[1]) as client:
            await client.send(b"hello")
            async with asyncio.timeout(5):
                conn = await ln.accept()
            assert conn.local_addr[0] == "127.0.0.2"
            writer = udpx.BatchWriter(conn, size=8)
            sent = [b"%d" % index for index in range(burst)]
            for data in sent:
                await writer.write(data)
            await writer.flush()
            async with asyncio.timeout(5):
                received = [await client.recv() for _ in sent]
            assert received == sent
            assert conn.stats.tx_packets == burst and conn.stats.drops["send_error"] == 0

    run(main())
