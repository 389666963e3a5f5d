"""Peer keys and raw socket addresses (``udpx._sockets``): round trips, and agreement with the
keys the receivers compute from what the kernel writes (checked on real loopback sockets)."""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import struct
import sys
from collections.abc import Hashable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpx._mmsg import HAVE_MMSG, RecvBatch, make_receiver
from udpx._sockets import (
    Address,
    address_from_key,
    address_from_sockaddr,
    join_key,
    key_from_address,
    key_has_port,
    max_payload,
    sockaddr_from_address,
    sockaddr_from_key,
)

from .conftest import HAVE_IPV6

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)

ports = st.integers(0, 65535)
flowinfos = st.integers(0, 2**20 - 1)
scope_ids = st.integers(0, 2**32 - 1)


needs_mmsg = pytest.mark.skipif(not HAVE_MMSG, reason="no recvmmsg on this platform")


# -- pure round trips -----------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(ip=st.ip_addresses(v=4), port=ports)
def test_ipv4_round_trip(ip: ipaddress.IPv4Address, port: int) -> None:
    address = (str(ip), port)
    raw = sockaddr_from_address(socket.AF_INET, address)
    # struct sockaddr_in: sa_family (host order), port (network order), address, 8 zeros.
    assert raw == struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + ip.packed \
        + bytes(8)
    key = key_from_address(socket.AF_INET, address)
    assert isinstance(key, int)
    assert key == int.from_bytes(raw[2:10], sys.byteorder)  # port, address, 2 zeros
    assert sockaddr_from_key(socket.AF_INET, key) == raw
    assert address_from_key(socket.AF_INET, key) == address
    assert address_from_sockaddr(socket.AF_INET, raw) == address


@PROPERTY_SETTINGS
@given(ip=st.ip_addresses(v=6), port=ports, flowinfo=flowinfos, scope_id=scope_ids)
def test_ipv6_round_trip(ip: ipaddress.IPv6Address, port: int, flowinfo: int,
                         scope_id: int) -> None:
    address = (str(ip), port, flowinfo, scope_id)
    raw = sockaddr_from_address(socket.AF_INET6, address)
    # struct sockaddr_in6: family, port, flow info (cleared: it does not tell peers apart),
    # address, scope id (host order).
    assert raw == (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", port) + bytes(4)
                   + ip.packed + struct.pack("=I", scope_id))
    key = key_from_address(socket.AF_INET6, address)
    assert isinstance(key, bytes)
    assert key == raw
    assert sockaddr_from_key(socket.AF_INET6, key) == raw
    host, back_port, back_flowinfo, back_scope = address_from_key(socket.AF_INET6, key)
    # inet_ntop and ipaddress may spell the same address differently (::1.2.3.4).
    assert ipaddress.IPv6Address(host) == ip
    assert (back_port, back_flowinfo, back_scope) == (port, 0, scope_id)
    assert key_from_address(socket.AF_INET6, (host, back_port, back_flowinfo, back_scope)) == key
    assert address_from_sockaddr(socket.AF_INET6, raw) == (host, port, 0, scope_id)


@PROPERTY_SETTINGS
@given(ip=st.ip_addresses(v=6), port=ports, scope_id=scope_ids)
def test_ipv6_key_ignores_flowinfo_and_host_scope_suffix(ip: ipaddress.IPv6Address, port: int,
                                                          scope_id: int) -> None:
    plain = key_from_address(socket.AF_INET6, (str(ip), port, 0, scope_id))
    assert key_from_address(socket.AF_INET6, (str(ip), port, 12345, scope_id)) == plain
    # getsockname()/recvfrom() spell link-local hosts with a %scope suffix.
    assert key_from_address(socket.AF_INET6, (f"{ip}%lo", port, 0, scope_id)) == plain
    # A two-element tuple means scope 0.
    assert key_from_address(socket.AF_INET6, (str(ip), port)) == key_from_address(
        socket.AF_INET6, (str(ip), port, 0, 0))


@PROPERTY_SETTINGS
@given(first=st.tuples(st.ip_addresses(v=4), ports), second=st.tuples(st.ip_addresses(v=4),
                                                                       ports))
def test_ipv4_keys_tell_peers_apart(first: tuple[ipaddress.IPv4Address, int],
                                    second: tuple[ipaddress.IPv4Address, int]) -> None:
    key_one = key_from_address(socket.AF_INET, (str(first[0]), first[1]))
    key_two = key_from_address(socket.AF_INET, (str(second[0]), second[1]))
    assert (key_one == key_two) == (first == second)


@PROPERTY_SETTINGS
@given(first=st.tuples(st.ip_addresses(v=6), ports, scope_ids),
       second=st.tuples(st.ip_addresses(v=6), ports, scope_ids))
def test_ipv6_keys_tell_peers_apart(first: tuple[ipaddress.IPv6Address, int, int],
                                    second: tuple[ipaddress.IPv6Address, int, int]) -> None:
    key_one = key_from_address(socket.AF_INET6, (str(first[0]), first[1], 0, first[2]))
    key_two = key_from_address(socket.AF_INET6, (str(second[0]), second[1], 0, second[2]))
    assert (key_one == key_two) == (first == second)


@PROPERTY_SETTINGS
@given(ip=st.ip_addresses(), port=ports, local=st.ip_addresses())
def test_key_has_port_reads_the_port_of_plain_and_joined_keys(
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int,
        local: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    # A new peer with port 0 is refused (dropped_bad_source): the check reads the key alone,
    # plain or joined with a packet-info listener's local address.
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    key = key_from_address(family, (str(ip), port))
    assert key_has_port(key) == (port != 0)
    local_raw = local.packed if ip.version == local.version else (
        bytes(4) if ip.version == 4 else bytes(16))
    assert key_has_port(join_key(family, key, local_raw)) == (port != 0)


def test_max_payload() -> None:
    assert max_payload(socket.AF_INET, ("127.0.0.1", 1)) == 65507
    assert max_payload(socket.AF_INET6, ("::1", 1, 0, 0)) == 65527
    assert max_payload(socket.AF_INET6, None) == 65527
    # An IPv4 peer seen through a dual-stack socket is still IPv4.
    assert max_payload(socket.AF_INET6, ("::ffff:127.0.0.1", 1, 0, 0)) == 65507


# -- agreement with the kernel's sockaddrs --------------------------------------------------


def _family_host(family: int) -> str:
    return "127.0.0.1" if family == socket.AF_INET else "::1"


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def family(request: pytest.FixtureRequest) -> int:
    value: int = request.param
    if value == socket.AF_INET6 and not HAVE_IPV6:
        pytest.skip("no IPv6 loopback")
    return value


@contextlib.contextmanager
def udp_socket(family: int, host: str) -> Iterator[socket.socket]:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        yield sock


def wait_readable(sock: socket.socket, timeout: float = 5.0) -> None:
    readable, _, _ = select.select([sock], [], [], timeout)
    assert readable, "nothing arrived on loopback in time"


def receive_with_batch(batch: RecvBatch, receiver: socket.socket, expected: int
                       ) -> list[tuple[Hashable, bytes, bytes]]:
    """(key, payload, raw sockaddr) of ``expected`` datagrams received with ``batch``."""
    received: list[tuple[Hashable, bytes, bytes]] = []
    for _ in range(expected + 10):
        if len(received) >= expected:
            break
        count = batch.receive(receiver.fileno())
        if count == 0:
            wait_readable(receiver)
            continue
        keys = batch.keys(count)
        lengths = batch.lengths(count)
        for index in range(count):
            offset = batch.offsets[index]
            name_offset = batch.name_offsets[index]
            received.append((keys[index], batch.arena[offset:offset + lengths[index]],
                             batch._names[name_offset:name_offset + 28]))
    assert len(received) == expected
    return received


@pytest.mark.skipif(sys.byteorder != "little", reason="the key's low bits are the port's only "
                    "where ints are little-endian (on big-endian the key is correct, less spread)")
def test_ipv4_keys_of_one_host_differ_in_their_low_bits() -> None:
    """A dict's first probe goes by a key's low bits (14 of them in a dict of 10,000): the
    keys of one host's 10,000 ports take thousands of values there (the port's bytes come
    first), so that a listener's lookups among thousands of peers do not all collide, as
    they did when the key began with the family (one value)."""
    keys = [key_from_address(socket.AF_INET, ("10.0.0.1", port)) for port in range(20000, 30000)]
    assert len({key & 0x3FFF for key in keys if isinstance(key, int)}) >= 2000


@needs_mmsg
def test_batch_keys_match_key_from_address(family: int) -> None:
    host = _family_host(family)
    with contextlib.ExitStack() as stack:
        receiver = stack.enter_context(udp_socket(family, host))
        receiver.setblocking(False)
        senders = [stack.enter_context(udp_socket(family, host)) for _ in range(3)]
        batch = RecvBatch(16, 64, family, named=True)
        stack.callback(batch.close)
        # Interleaved senders, so that a batch holds several peers.
        order = [0, 1, 1, 2, 0, 2, 2, 1, 0, 0]
        for serial, index in enumerate(order):
            senders[index].sendto(bytes([index, serial]), receiver.getsockname())
        received = receive_with_batch(batch, receiver, len(order))
        for serial, (key, data, raw) in enumerate(received):
            sender = senders[data[0]]
            assert data == bytes([order[serial], serial])
            assert key == key_from_address(family, sender.getsockname())
            assert address_from_key(family, key) == sender.getsockname()
            if family == socket.AF_INET:
                assert key == int.from_bytes(raw[2:10], sys.byteorder)  # port, address, 2 zeros
                assert sockaddr_from_key(family, key) == raw[:16]
            else:
                assert key == raw[:28]
                assert sockaddr_from_key(family, key) == raw[:28]
        assert len({key for key, _, _ in received}) == 3


def test_single_receiver_keys_match(family: int) -> None:
    """The one-datagram receiver computes keys from Python's address tuples; they equal the
    batch receiver's (checked above against the raw sockaddr)."""
    host = _family_host(family)
    with contextlib.ExitStack() as stack:
        receiver = stack.enter_context(udp_socket(family, host))
        receiver.setblocking(False)
        sender = stack.enter_context(udp_socket(family, host))
        single = make_receiver(receiver, 1, 64, True,
                               lambda address: key_from_address(family, address))
        stack.callback(single.close)
        sender.sendto(b"hello", receiver.getsockname())
        wait_readable(receiver)
        assert single.receive(receiver.fileno()) == 1
        assert single.keys(1) == [key_from_address(family, sender.getsockname())]
        assert single.arena[single.offsets[0]:single.offsets[0] + single.lengths(1)[0]] \
            == b"hello"


@pytest.mark.skipif(not HAVE_IPV6, reason="no IPv6 loopback")
@needs_mmsg
def test_ipv4_mapped_peer_on_dual_stack_socket() -> None:
    """An IPv4 peer of an IPv6 socket: the key from the kernel's sockaddr_in6 equals the key of
    the ``::ffff:a.b.c.d`` address Python reports."""
    with contextlib.ExitStack() as stack:
        receiver = stack.enter_context(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
        receiver.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            receiver.bind(("::ffff:127.0.0.1", 0))
        except OSError:
            pytest.skip("cannot bind an IPv4-mapped address")
        receiver.setblocking(False)
        sender = stack.enter_context(udp_socket(socket.AF_INET, "127.0.0.1"))
        batch = RecvBatch(4, 64, socket.AF_INET6, named=True)
        stack.callback(batch.close)
        sender.sendto(b"v4", ("127.0.0.1", receiver.getsockname()[1]))
        [(key, data, _)] = receive_with_batch(batch, receiver, 1)
        assert data == b"v4"
        port = sender.getsockname()[1]
        mapped: Address = ("::ffff:127.0.0.1", port, 0, 0)
        assert key == key_from_address(socket.AF_INET6, mapped)
        assert address_from_key(socket.AF_INET6, key) == mapped
        assert max_payload(socket.AF_INET6, address_from_key(socket.AF_INET6, key)) == 65507
