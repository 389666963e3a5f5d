"""The recvmmsg/sendmmsg binding (``udpx._mmsg``) on real loopback sockets, without a loop.

Waiting is done with ``select`` and bounded loops; nothing sleeps.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import os
import select
import socket
from collections.abc import Iterator

import pytest

from udpx import _mmsg as mmsg_module
from udpx._cmsg import SOL_UDP, UDP_GRO, UDP_SEGMENT
from udpx._mmsg import (
    HAVE_MMSG,
    MSG_TRUNC,
    UNIFORM_LAYOUTS,
    RecvBatch,
    SendBatch,
    make_receiver,
    make_sender,
)
from udpx._queue import BYTES_DATA_OFFSET, TxAccount
from udpx._sockets import address_from_sockaddr, key_from_address, sockaddr_from_address

from .conftest import HAVE_IPV6

pytestmark = pytest.mark.skipif(not HAVE_MMSG, reason="no recvmmsg/sendmmsg on this platform")




@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def family(request: pytest.FixtureRequest) -> int:
    value: int = request.param
    if value == socket.AF_INET6 and not HAVE_IPV6:
        pytest.skip("no IPv6 loopback")
    return value


def loopback(family: int) -> str:
    return "127.0.0.1" if family == socket.AF_INET else "::1"


def namelen(family: int) -> int:
    return 16 if family == socket.AF_INET else 28


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as exit_stack:
        yield exit_stack


def bound(stack: contextlib.ExitStack, family: int, blocking: bool = False) -> socket.socket:
    sock = stack.enter_context(socket.socket(family, socket.SOCK_DGRAM))
    # Room for the whole burst: the default buffer holds only a few hundred small datagrams.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    sock.bind((loopback(family), 0))
    sock.setblocking(blocking)
    return sock


def wait_readable(sock: socket.socket, timeout: float = 5.0) -> None:
    readable, _, _ = select.select([sock], [], [], timeout)
    assert readable, "nothing arrived on loopback in time"


def recv_batch(stack: contextlib.ExitStack, batch_size: int, slot_size: int, family: int,
               named: bool = True) -> RecvBatch:
    batch = RecvBatch(batch_size, slot_size, family, named)
    stack.callback(batch.close)
    return batch


def send_batch(stack: contextlib.ExitStack, batch_size: int, slot_size: int, family: int,
               named: bool) -> SendBatch:
    batch = SendBatch(batch_size, slot_size, named, namelen(family))
    stack.callback(batch.close)
    return batch


def receive_all(batch: RecvBatch, sock: socket.socket, expected: int
                ) -> tuple[list[bytes], list[int]]:
    """Receive ``expected`` datagrams; returns them and the count of each non-empty call."""
    datagrams: list[bytes] = []
    counts: list[int] = []
    for _ in range(2 * expected + 10):
        if len(datagrams) >= expected:
            break
        count = batch.receive(sock.fileno())
        if count == 0:
            wait_readable(sock)
            continue
        counts.append(count)
        assert batch.truncated(count) is None
        for offset, length in zip(batch.offsets, batch.lengths(count)):
            datagrams.append(batch.arena[offset:offset + length])
    assert len(datagrams) == expected
    return datagrams, counts


def burst_payload(index: int) -> bytes:
    """Datagram ``index`` of a burst: sizes from 0 up to 1,200 bytes, contents that differ."""
    size = (index * 37) % 1201 if index % 10 else 0
    return bytes((index + position) % 256 for position in range(size))


# -- RecvBatch ------------------------------------------------------------------------------


def test_burst_is_received_in_batches(stack: contextlib.ExitStack, family: int) -> None:
    receiver = bound(stack, family)
    sender = bound(stack, family, blocking=True)
    sent = [burst_payload(index) for index in range(100)]
    assert b"" in sent
    for data in sent:
        sender.sendto(data, receiver.getsockname())
    batch = recv_batch(stack, 16, 2048, family)
    received, counts = receive_all(batch, receiver, len(sent))
    assert received == sent
    assert all(1 <= count <= 16 for count in counts)
    # Batched: fewer calls than datagrams, and no more than needed with one wait per call.
    assert len(counts) >= 100 // 16
    assert batch.calls < len(sent)
    # Drained: the next call finds nothing and says so with 0.
    calls = batch.calls
    assert batch.receive(receiver.fileno()) == 0
    assert batch.calls == calls + 1


def _received_payloads(stack: contextlib.ExitStack, family: int, sent: list[bytes],
                       slot_size: int, batch: RecvBatch | None = None) -> list[bytes]:
    """``sent`` from one socket to another, received with ``datagrams()`` (copies: each batch
    is taken before the next call overwrites the arena)."""
    receiver = bound(stack, family)
    sender = bound(stack, family, blocking=True)
    for data in sent:
        sender.sendto(data, receiver.getsockname())
    batch = batch or recv_batch(stack, 16, slot_size, family)
    got: list[bytes] = []
    for _ in range(2 * len(sent) + 10):
        if len(got) >= len(sent):
            break
        count = batch.receive(receiver.fileno())
        if count == 0:
            wait_readable(receiver)
            continue
        payloads = batch.datagrams(batch.lengths(count))
        assert all(type(data) is bytes for data in payloads)
        got += payloads
    return got


@pytest.mark.parametrize("size", [0, 1, 64, 1200, 2048])
def test_datagrams_of_one_length_come_whole_and_as_copies(
        stack: contextlib.ExitStack, family: int, size: int) -> None:
    # One length in every batch: the one-call decoder, up to a payload that fills its slot.
    sent = [bytes([index]) * size for index in range(40)]
    assert _received_payloads(stack, family, sent, 2048) == sent


def test_datagrams_of_mixed_lengths_come_whole(stack: contextlib.ExitStack, family: int) -> None:
    sent = [burst_payload(index) for index in range(100)]
    assert _received_payloads(stack, family, sent, 2048) == sent


def test_uniform_layouts_are_bounded(stack: contextlib.ExitStack, family: int) -> None:
    # Each (length, count) seen compiles a layout; past the bound the cache starts over.
    batch = recv_batch(stack, 4, 600, family)
    sent = [bytes([length % 256]) * length for length in range(UNIFORM_LAYOUTS + 20)
            for _ in range(4)]
    assert _received_payloads(stack, family, sent, 600, batch) == sent
    assert 0 < len(batch._uniform) <= UNIFORM_LAYOUTS


def test_empty_socket_returns_zero(stack: contextlib.ExitStack, family: int) -> None:
    receiver = bound(stack, family)
    batch = recv_batch(stack, 8, 64, family)
    assert batch.receive(receiver.fileno()) == 0
    assert batch.receive(receiver.fileno()) == 0
    assert batch.calls == 2


def test_truncation_sets_the_mask(stack: contextlib.ExitStack, family: int) -> None:
    receiver = bound(stack, family)
    sender = bound(stack, family, blocking=True)
    sent = [b"short", b"x" * 20, b"", b"12345678", b"y" * 9]
    for data in sent:
        sender.sendto(data, receiver.getsockname())
    batch = recv_batch(stack, 8, 8, family)
    lengths: list[int] = []
    masks: list[bool] = []
    flagged: list[bool] = []
    heads: list[bytes] = []
    for _ in range(2 * len(sent)):
        if len(lengths) >= len(sent):
            break
        count = batch.receive(receiver.fileno())
        if count == 0:
            wait_readable(receiver)
            continue
        lengths += batch.lengths(count)
        masks += batch.truncated(count) or [False] * count
        flagged += [bool(flag & MSG_TRUNC) for flag in batch.flags(count)]
        heads += [batch.arena[offset:offset + 8] for offset in batch.offsets[:count]]
    # A datagram of exactly the slot size is whole; one byte more is cut.
    assert masks == flagged == [False, True, False, False, True]
    assert lengths == [5, 8, 0, 8, 8]
    assert heads[1] == b"x" * 8
    assert heads[4] == b"y" * 8
    # The headers are restored for the next call: whole datagrams are whole again, and the
    # sender's address is read again in full.
    sender.sendto(b"abc", receiver.getsockname())
    wait_readable(receiver)
    assert batch.receive(receiver.fileno()) == 1
    assert batch.truncated(1) is None
    assert batch.lengths(1) == [3]
    assert batch.keys(1) == [key_from_address(family, sender.getsockname())]


def test_truncation_with_single_receiver(stack: contextlib.ExitStack, family: int) -> None:
    receiver = bound(stack, family)
    sender = bound(stack, family, blocking=True)
    single = make_receiver(receiver, 1, 8, True, lambda address: key_from_address(family,
                                                                                  address))
    stack.callback(single.close)
    assert single.receive(receiver.fileno()) == 0
    sender.sendto(b"z" * 9, receiver.getsockname())
    sender.sendto(b"z" * 8, receiver.getsockname())
    results: list[tuple[list[bool] | None, list[int]]] = []
    for _ in range(10):
        if len(results) == 2:
            break
        if single.receive(receiver.fileno()) == 0:
            wait_readable(receiver)
            continue
        results.append((single.truncated(1), single.lengths(1)))
    assert results == [([True], [8]), (None, [8])]


def test_unnamed_batch_on_connected_socket(stack: contextlib.ExitStack, family: int) -> None:
    receiver = bound(stack, family)
    sender = bound(stack, family, blocking=True)
    receiver.connect(sender.getsockname())
    for data in (b"one", b"two"):
        sender.sendto(data, receiver.getsockname())
    batch = recv_batch(stack, 4, 16, family, named=False)
    received, _ = receive_all(batch, receiver, 2)
    assert received == [b"one", b"two"]


def test_bad_descriptor_raises_with_errno(stack: contextlib.ExitStack) -> None:
    batch = recv_batch(stack, 4, 16, socket.AF_INET)
    with pytest.raises(OSError) as caught:
        batch.receive(-1)
    assert caught.value.errno == errno.EBADF
    reader, writer = os.pipe()
    stack.callback(os.close, reader)
    stack.callback(os.close, writer)
    with pytest.raises(OSError) as caught:
        batch.receive(reader)
    assert caught.value.errno == errno.ENOTSOCK


def test_refused_surfaces_as_connection_refused_error(stack: contextlib.ExitStack,
                                                      family: int) -> None:
    """An ICMP port unreachable on a connected socket is reported by the next receive."""
    closed = bound(stack, family)
    address = closed.getsockname()
    closed.close()
    sock = bound(stack, family)
    sock.connect(address)
    sock.send(b"anyone?")
    wait_readable(sock)  # POLLERR makes it readable
    batch = recv_batch(stack, 4, 16, family, named=False)
    with pytest.raises(ConnectionRefusedError) as caught:
        batch.receive(sock.fileno())
    assert caught.value.errno == errno.ECONNREFUSED
    # Reported once: the socket is usable again.
    assert batch.receive(sock.fileno()) == 0


# -- SendBatch ------------------------------------------------------------------------------


def send_filled(batch: SendBatch, sock: socket.socket, count: int) -> None:
    start = 0
    for _ in range(count):
        if start >= count:
            break
        start += batch.send(sock.fileno(), start)
    assert start == count


def recv_n(sock: socket.socket, count: int) -> list[tuple[bytes, tuple[object, ...]]]:
    received: list[tuple[bytes, tuple[object, ...]]] = []
    for _ in range(count):
        wait_readable(sock)
        data, address = sock.recvfrom(70000)
        received.append((data, address))
    return received


def test_send_to_named_destinations(stack: contextlib.ExitStack, family: int) -> None:
    sender = bound(stack, family)
    receivers = [bound(stack, family) for _ in range(2)]
    # Each destination's sockaddr is kept by its account only (the batch points at it).
    names = [TxAccount(sockaddr_from_address(family, receiver.getsockname()))
             for receiver in receivers]
    batch = send_batch(stack, 8, 2048, family, named=True)
    datagrams = [b"", b"a" * 2048, b"bc", b"d" * 100, b"e"]
    targets = [0, 1, 0, 1, 1]
    assert batch.fill(datagrams, [names[target] for target in targets]) == len(datagrams)
    gc.collect()
    send_filled(batch, sender, len(datagrams))
    assert batch.calls < len(datagrams)
    for index, receiver in enumerate(receivers):
        expected = [data for data, target in zip(datagrams, targets) if target == index]
        got = recv_n(receiver, len(expected))
        assert [data for data, _ in got] == expected
        assert {address for _, address in got} == {sender.getsockname()}
    # A second, shorter batch with other sizes: the lengths and names of the first are not
    # reused.
    assert batch.fill([b"xyz", b""], [names[1], names[0]]) == 2
    send_filled(batch, sender, 2)
    assert recv_n(receivers[1], 1)[0][0] == b"xyz"
    assert recv_n(receivers[0], 1)[0][0] == b""


def test_batches_of_changing_layouts_send_what_was_filled(stack: contextlib.ExitStack,
                                                         family: int) -> None:
    """Each batch lies end to end at the arena's start and its iovecs are rewritten only when
    its layout (one size for all, and how many) differs from the last batch's: every batch,
    however it follows the one before, sends exactly its own datagrams."""
    receiver = bound(stack, family)
    sender = bound(stack, family)
    sender.connect(receiver.getsockname())
    batch = send_batch(stack, 4, 512, family, named=False)
    batches = [
        [b"a" * 8, b"b" * 8, b"c" * 8, b"d" * 8],    # one size
        [b"e" * 8, b"f" * 8, b"g" * 8, b"h" * 8],    # the same layout: iovecs kept
        [b"i" * 8, b"j" * 8],                        # the same size, fewer
        [b"k" * 3, b"", b"l" * 512, b"m"],           # mixed sizes
        [b"n" * 8, b"o" * 8, b"p" * 8, b"q" * 8],    # one size again, after mixed
        [b"", b""],                                  # empty datagrams
        [b"r" * 512] * 4,                            # the whole arena
        [b"s" * 20],                                 # one datagram
    ]
    for datagrams in batches:
        assert batch.fill(datagrams, None) == len(datagrams)
        send_filled(batch, sender, len(datagrams))
        assert [data for data, _ in recv_n(receiver, len(datagrams))] == datagrams


def test_without_object_addresses_an_unconnected_socket_sends_one_by_one(
        stack: contextlib.ExitStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where id() is not an address (not CPython), a batch cannot point at the destinations:
    an unconnected socket gets the one-datagram sender, a connected one keeps the batch."""
    monkeypatch.setattr(mmsg_module, "BYTES_DATA_OFFSET", None)
    sock = bound(stack, socket.AF_INET)
    unconnected = make_sender(sock, 8, 64, True, None)
    stack.callback(unconnected.close)
    connected = make_sender(sock, 8, 64, False, None)
    stack.callback(connected.close)
    assert not isinstance(unconnected, SendBatch)
    assert isinstance(connected, SendBatch)


def test_account_points_at_its_sockaddr(family: int) -> None:
    """A batch sender's message headers point at the account's sockaddr bytes, not a copy."""
    assert BYTES_DATA_OFFSET is not None  # CPython
    raw = sockaddr_from_address(family, ("::1", 9) if family == socket.AF_INET6
                                else ("127.0.0.1", 9))
    account = TxAccount(raw)
    assert ctypes.string_at(account.name_address, len(raw)) == raw
    assert TxAccount(None).name_address == 0


def test_send_on_connected_socket(stack: contextlib.ExitStack, family: int) -> None:
    receiver = bound(stack, family)
    sender = bound(stack, family)
    sender.connect(receiver.getsockname())
    batch = send_batch(stack, 4, 256, family, named=False)
    datagrams = [b"1", b"", b"333", b"4444"]
    batch.fill(datagrams, None)
    send_filled(batch, sender, 4)
    assert [data for data, _ in recv_n(receiver, 4)] == datagrams
    assert batch.calls == 1


def test_per_datagram_error_stops_the_call(stack: contextlib.ExitStack, family: int) -> None:
    """A datagram the kernel refuses (too long) ends the call; the ones before it were sent,
    the next call at it raises with its errno, and the ones after it can still be sent."""
    receiver = bound(stack, family)
    sender = bound(stack, family)
    sender.connect(receiver.getsockname())
    too_long = b"L" * 65528  # over both families' limits
    batch = send_batch(stack, 4, 65536, family, named=False)
    batch.fill([b"before", too_long, b"after"], None)
    assert batch.send(sender.fileno(), 0) == 1
    with pytest.raises(OSError) as caught:
        batch.send(sender.fileno(), 1)
    assert caught.value.errno == errno.EMSGSIZE
    assert batch.send(sender.fileno(), 2) == 1
    assert [data for data, _ in recv_n(receiver, 2)] == [b"before", b"after"]


def test_send_bad_descriptor(stack: contextlib.ExitStack) -> None:
    batch = send_batch(stack, 2, 16, socket.AF_INET, named=False)
    batch.fill([b"x"], None)
    with pytest.raises(OSError) as caught:
        batch.send(-1, 0)
    assert caught.value.errno == errno.EBADF


def test_single_sender_matches(stack: contextlib.ExitStack, family: int) -> None:
    receiver = bound(stack, family)
    sender = bound(stack, family)
    single = make_sender(sender, 1, 64, True, lambda raw: address_from_sockaddr(family, raw))
    stack.callback(single.close)
    name = TxAccount(sockaddr_from_address(family, receiver.getsockname()))
    assert single.fill([b"p", b"q"], [name, name]) == 1
    assert single.send(sender.fileno(), 0) == 1
    assert recv_n(receiver, 1)[0] == (b"p", sender.getsockname())


def test_split_expands_gro_runs_into_their_datagrams(stack: contextlib.ExitStack,
                                                     family: int) -> None:
    # A GSO send of 10 x 100 bytes + 37 arrives (UDP_GRO) as one message of 1,037 bytes with
    # segment size 100; split() makes its 11 datagrams, the last one short, with their keys,
    # beside a plain datagram of the same batch.
    receiver = bound(stack, family)
    try:
        receiver.setsockopt(SOL_UDP, UDP_GRO, 1)
        sender = bound(stack, family, blocking=True)
        sender.setsockopt(SOL_UDP, UDP_SEGMENT, 100)
    except OSError as exc:
        pytest.skip(f"no UDP GSO/GRO here: {exc}")
    run = b"".join(bytes([index]) * 100 for index in range(10)) + b"t" * 37
    sender.sendto(run, receiver.getsockname())
    sender.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
    sender.sendto(b"plain", receiver.getsockname())
    batch = RecvBatch(8, 65535, family, True, gro=True)
    stack.callback(batch.close)
    got: list[bytes] = []
    keys: list[object] = []
    for _ in range(20):
        if len(got) >= 12:
            break
        count = batch.receive(receiver.fileno())
        if count == 0:
            wait_readable(receiver)
            continue
        lengths = batch.lengths(count)
        sizes = batch.segment_sizes(count)
        if sizes is None:
            got += batch.datagrams(lengths)
            keys += batch.keys(count)
            continue
        split_keys, datagrams, split_lengths = batch.split(batch.keys(count), lengths, sizes)
        assert split_keys is not None
        assert split_lengths == [len(data) for data in datagrams]
        got += datagrams
        keys += split_keys
    assert got == [bytes([index]) * 100 for index in range(10)] + [b"t" * 37, b"plain"]
    assert len(set(keys)) == 1  # all from the one sender
    assert batch.gro_segments == 11
