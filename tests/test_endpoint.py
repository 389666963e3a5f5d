"""The drop-in endpoint (``udpx.create_datagram_endpoint``) against the stock loop's: each
method of the ``asyncio.DatagramTransport`` contract is exercised with the same calls on both
(``impl`` = "stock" or "udpx"), on asyncio and on uvloop, over real loopback sockets. Where
udpx differs on purpose (documented in ``udpx._endpoint``), the test says so and checks
udpx's behaviour."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import pytest

import udpx
from udpx._endpoint import _getaddrinfo

from .conftest import HAVE_IPV6, Runner, receive_plain

IMPLS = ["stock", "udpx"]


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


class Recorder(asyncio.DatagramProtocol):
    """Records every callback; ``until(n)`` waits for the n-th datagram."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.datagrams: list[tuple[bytes, Any]] = []
        self.errors: list[Exception] = []
        self.transport: asyncio.DatagramTransport | None = None
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self._waiting: tuple[int, asyncio.Future[None]] | None = None
        self._error_waiter: asyncio.Future[None] | None = None
        self.on_datagram: Callable[[Recorder, bytes], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (asyncio's own datagram transport does not subclass DatagramTransport.)
        self.transport = transport  # type: ignore[assignment]
        self.events.append("made")

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.events.append("datagram")
        self.datagrams.append((data, addr))
        if self.on_datagram is not None:
            self.on_datagram(self, data)
        self._check()

    def error_received(self, exc: Exception) -> None:
        self.events.append("error")
        self.errors.append(exc)
        if self._error_waiter is not None and not self._error_waiter.done():
            self._error_waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")

    def _check(self) -> None:
        waiting = self._waiting
        if waiting is not None and len(self.datagrams) >= waiting[0] and not waiting[1].done():
            waiting[1].set_result(None)

    async def until(self, count: int, timeout: float = 10.0) -> None:
        future = asyncio.get_running_loop().create_future()
        self._waiting = (count, future)
        self._check()
        await asyncio.wait_for(future, timeout)

    async def error(self, timeout: float = 10.0) -> Exception:
        if not self.errors:
            self._error_waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self._error_waiter, timeout)
        return self.errors[0]


async def endpoint(impl: str, factory: Callable[[], Recorder] = Recorder,
                   **kwargs: Any) -> tuple[Any, Recorder]:
    """An endpoint made by the stock loop's method or by udpx's. (Any: the stock transports
    have methods that typeshed's DatagramTransport lacks, such as the flow control.)"""
    if impl == "udpx":
        transport, protocol = await udpx.create_datagram_endpoint(factory, **kwargs)
        assert isinstance(transport, udpx.EndpointTransport)
    else:
        loop = asyncio.get_running_loop()
        assert not udpx.is_patched(loop)
        transport, protocol = await loop.create_datagram_endpoint(factory, **kwargs)
        assert not isinstance(transport, udpx.EndpointTransport)
    assert isinstance(protocol, Recorder)
    return transport, protocol


def plain_socket(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(10)
    return sock


async def receive_data(peer: socket.socket, count: int) -> list[bytes]:
    return [data for data, _ in await receive_plain(peer, count)]


HOSTS = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not HAVE_IPV6, reason="no IPv6 loopback on this machine"))]


# -- opening ---------------------------------------------------------------------------------

def test_connection_made_is_scheduled_before_the_await_returns(run: Runner[None],
                                                                impl: str) -> None:
    async def main() -> None:
        made_during_factory: list[bool] = []

        def factory() -> Recorder:
            protocol = Recorder()
            loop = asyncio.get_running_loop()
            # Scheduled before connection_made, so it runs first: connection_made is not
            # called synchronously while the endpoint is made.
            loop.call_soon(lambda: made_during_factory.append(bool(protocol.events)))
            return protocol

        transport, protocol = await endpoint(impl, factory, local_addr=("127.0.0.1", 0))
        assert protocol.events == ["made"]
        assert id(protocol.transport) == id(transport)
        assert made_during_factory == [False]
        transport.close()
        await protocol.lost

    run(main())


@pytest.mark.parametrize("host", HOSTS)
def test_datagrams_both_ways_with_the_loops_address_format(run: Runner[None], impl: str,
                                                           host: str) -> None:
    async def main() -> None:
        transport, protocol = await endpoint(impl, local_addr=(host, 0))
        with plain_socket(host) as peer:
            address = transport.get_extra_info("sockname")
            for index in range(100):
                peer.sendto(b"d%d" % index, address)
            await protocol.until(100)
            assert [data for data, _ in protocol.datagrams] == [b"d%d" % i
                                                                  for i in range(100)]
            source = protocol.datagrams[0][1]
            expected = peer.getsockname()
            assert source == expected  # (host, port) or (host, port, flowinfo, scope_id)
            assert {addr for _, addr in protocol.datagrams} == {source}
            for index in range(100):
                transport.sendto(b"r%d" % index, source)
            replies = await receive_data(peer, 100)
            assert replies == [b"r%d" % i for i in range(100)]
        transport.close()
        await protocol.lost

    run(main())


@pytest.mark.skipif(not HAVE_IPV6, reason="no IPv6 loopback on this machine")
def test_dual_stack_reports_ipv4_mapped_addresses_as_the_loop_does(run: Runner[None],
                                                                   impl: str) -> None:
    async def main() -> None:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        transport, protocol = await endpoint(impl, sock=sock)
        port = transport.get_extra_info("sockname")[1]
        with plain_socket("127.0.0.1") as peer:
            peer.sendto(b"v4", ("127.0.0.1", port))
            await protocol.until(1)
            assert protocol.datagrams[0] == (
                b"v4", ("::ffff:127.0.0.1", peer.getsockname()[1], 0, 0))
            transport.sendto(b"back", protocol.datagrams[0][1])
            assert await receive_data(peer, 1) == [b"back"]
        transport.close()
        await protocol.lost

    run(main())


def test_connected_endpoint(run: Runner[None], impl: str) -> None:
    async def main() -> None:
        with plain_socket() as peer:
            remote = peer.getsockname()
            transport, protocol = await endpoint(impl, remote_addr=remote)
            assert transport.get_extra_info("peername") == remote
            local = transport.get_extra_info("sockname")
            assert local[0] == "127.0.0.1" and local[1] > 0
            transport.sendto(b"one")
            transport.sendto(b"two", remote)
            with pytest.raises(ValueError, match="Invalid address"):
                transport.sendto(b"three", ("127.0.0.1", 9))
            assert await receive_plain(peer, 2) == [(b"one", local), (b"two", local)]
            peer.sendto(b"hello", local)
            await protocol.until(1)
            assert protocol.datagrams == [(b"hello", remote)]
            transport.close()
            await protocol.lost

    run(main())


def test_extra_info(run: Runner[None], impl: str) -> None:
    async def main() -> None:
        transport, protocol = await endpoint(impl, local_addr=("127.0.0.1", 0))
        sock = transport.get_extra_info("socket")
        # A real socket behind it: options can be set and read (aioice does).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 1 << 16
        assert sock.family == socket.AF_INET and sock.type == socket.SOCK_DGRAM
        assert sock.getsockname() == transport.get_extra_info("sockname")
        assert transport.get_extra_info("peername") is None
        assert transport.get_extra_info("nothing", "default") == "default"
        transport.close()
        await protocol.lost

    run(main())


def test_argument_errors_match_the_loop(run: Runner[None], impl: str, loop_kind: str) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="unexpected address family"):
            await endpoint(impl)
        with (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock,
              pytest.raises(ValueError, match="socket modifier keyword arguments")):
            await endpoint(impl, sock=sock, local_addr=("127.0.0.1", 0))
        with (socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stream,
              pytest.raises(ValueError, match="A UDP Socket was expected")):
            await endpoint(impl, sock=stream)
        if impl == "stock" and loop_kind == "uvloop":
            return  # (uvloop leaks a transport when the bind fails: a ResourceWarning)
        with pytest.raises(OSError):
            # The port is taken (bound by the first endpoint).
            first, protocol = await endpoint(impl, local_addr=("127.0.0.1", 0))
            try:
                await endpoint(impl, local_addr=first.get_extra_info("sockname"))
            finally:
                first.close()
                await protocol.lost

    run(main())


def test_family_alone_gives_an_unbound_socket(run: Runner[None], impl: str) -> None:
    async def main() -> None:
        transport, protocol = await endpoint(impl, family=socket.AF_INET)
        with plain_socket() as peer:
            transport.sendto(b"x", peer.getsockname())
            [(data, source)] = await receive_plain(peer, 1)
            assert data == b"x"
            peer.sendto(b"y", source)
            await protocol.until(1)
            assert protocol.datagrams == [(b"y", peer.getsockname())]
        transport.close()
        await protocol.lost

    run(main())


# -- sendto ------------------------------------------------------------------------------------

def test_sendto_copies_mutable_buffers_at_the_call(run: Runner[None], impl: str) -> None:
    async def main() -> None:
        transport, protocol = await endpoint(impl, local_addr=("127.0.0.1", 0))
        with plain_socket() as peer:
            buffer = bytearray(b"first")
            view = memoryview(bytearray(b"second"))
            transport.sendto(buffer, peer.getsockname())
            transport.sendto(view, peer.getsockname())
            buffer[:] = b"XXXXX"
            view[:] = b"YYYYYY"
            assert await receive_data(peer, 2) == [b"first", b"second"]
        transport.close()
        await protocol.lost

    run(main())


def test_sendto_takes_a_bytes_subclass(run: Runner[None], impl: str) -> None:
    """As the loop's transports do: a ``bytes`` subclass is bytes-like (sent as plain bytes)."""

    class Tagged(bytes):
        pass

    async def main() -> None:
        transport, protocol = await endpoint(impl, local_addr=("127.0.0.1", 0))
        with plain_socket() as peer:
            transport.sendto(Tagged(b"tagged"), peer.getsockname())
            assert await receive_data(peer, 1) == [b"tagged"]
        transport.close()
        await protocol.lost

    run(main())


def test_sendto_type_errors(run: Runner[None], impl: str) -> None:
    async def main() -> None:
        transport, protocol = await endpoint(impl, local_addr=("127.0.0.1", 0))
        with pytest.raises(TypeError, match="bytes-like object"):
            transport.sendto("text", ("127.0.0.1", 9))
        transport.close()
        await protocol.lost

    run(main())


def test_zero_length_datagrams_are_sent(run: Runner[None]) -> None:
    # UDP allows them and asyncio sends them from Python 3.12 on; 3.11's loop and uvloop skip
    # them silently. udpx sends them.
    async def main() -> None:
        transport, protocol = await endpoint("udpx", local_addr=("127.0.0.1", 0))
        with plain_socket() as peer:
            transport.sendto(b"", peer.getsockname())
            transport.sendto(b"after", peer.getsockname())
            assert await receive_data(peer, 2) == [b"", b"after"]
            peer.sendto(b"", transport.get_extra_info("sockname"))
            await protocol.until(1)
            assert protocol.datagrams[0][0] == b""
        transport.close()
        await protocol.lost

    run(main())


def test_sendto_address_errors_are_clear(run: Runner[None]) -> None:
    # udpx validates the address at the call and never blocks on DNS (as uvloop).
    async def main() -> None:
        transport, protocol = await endpoint("udpx", local_addr=("127.0.0.1", 0))
        with pytest.raises(ValueError, match="no remote address"):
            transport.sendto(b"x")
        with pytest.raises(ValueError, match="DNS"):
            transport.sendto(b"x", ("localhost", 9))
        with pytest.raises(ValueError, match="invalid address"):
            transport.sendto(b"x", ("127.0.0.1", 70000))
        with pytest.raises(ValueError, match="invalid address"):
            transport.sendto(b"x", ("::1", 9, 0, 0))
        with pytest.raises(TypeError, match="address must be a tuple"):
            transport.sendto(b"x", ["127.0.0.1", 9])
        # Nothing was queued, nothing broke: the endpoint still works.
        with plain_socket() as peer:
            transport.sendto(b"ok", peer.getsockname())
            assert await receive_data(peer, 1) == [b"ok"]
        transport.close()
        await protocol.lost

    run(main())


def test_refused_send_reaches_error_received(run: Runner[None], impl: str) -> None:
    async def main() -> None:
        transport, protocol = await endpoint(impl, local_addr=("127.0.0.1", 0))
        transport.sendto(b"x", ("127.0.0.1", 0))  # the kernel refuses port 0
        exc = await protocol.error()
        assert isinstance(exc, OSError) and exc.errno == errno.EINVAL
        if impl == "udpx":
            assert isinstance(transport, udpx.EndpointTransport)
            assert transport.stats.drops["send_error"] == 1
        transport.close()
        await protocol.lost

    run(main())


def test_icmp_error_on_a_connected_endpoint(run: Runner[None], impl: str) -> None:
    async def main() -> None:
        with plain_socket() as gone:
            address = gone.getsockname()
        transport, protocol = await endpoint(impl, remote_addr=address)
        transport.sendto(b"anyone?")
        exc = await protocol.error()
        assert isinstance(exc, ConnectionRefusedError)
        assert not transport.is_closing()
        transport.close()
        await protocol.lost

    run(main())


def test_a_burst_leaves_as_gso_and_arrives_whole(run: Runner[None]) -> None:
    async def main() -> None:
        transport, protocol = await endpoint("udpx", local_addr=("127.0.0.1", 0))
        assert isinstance(transport, udpx.EndpointTransport)
        receiver, received = await endpoint("udpx", local_addr=("127.0.0.1", 0))
        address = receiver.get_extra_info("sockname")
        for index in range(40):
            transport.sendto(bytes([index]) * 1200, address)
        await received.until(40)
        assert [data for data, _ in received.datagrams] == [bytes([i]) * 1200
                                                            for i in range(40)]
        assert transport._writer.gso_sends >= 1
        assert transport.stats.tx_packets == 40
        for item in (transport, receiver):
            item.close()
        await protocol.lost
        await received.lost

    run(main())


def test_a_small_tx_queue_is_drained_at_once_when_full(run: Runner[None]) -> None:
    async def main() -> None:
        transport, protocol = await endpoint("udpx", local_addr=("127.0.0.1", 0),
                                             tx_queue_size=8)
        assert isinstance(transport, udpx.EndpointTransport)
        receiver, received = await endpoint("udpx", local_addr=("127.0.0.1", 0))
        address = receiver.get_extra_info("sockname")
        for index in range(500):
            transport.sendto(b"%d" % index, address)
        await received.until(500)
        assert [data for data, _ in received.datagrams] == [b"%d" % i for i in range(500)]
        assert transport.stats.drops["tx_queue_full"] == 0
        for item in (transport, receiver):
            item.close()
        await protocol.lost
        await received.lost

    run(main())


def test_a_send_above_max_datagram_is_reported(run: Runner[None]) -> None:
    async def main() -> None:
        transport, protocol = await endpoint("udpx", local_addr=("127.0.0.1", 0),
                                             max_datagram=100)
        assert isinstance(transport, udpx.EndpointTransport)
        transport.sendto(b"x" * 101, ("127.0.0.1", 9))
        exc = await protocol.error()
        assert isinstance(exc, OSError) and exc.errno == errno.EMSGSIZE
        assert transport.stats.drops["too_long"] == 1
        transport.close()
        await protocol.lost

    run(main())


# -- write buffer ---------------------------------------------------------------------------

def test_write_buffer_limits(run: Runner[None], impl: str, loop_kind: str) -> None:
    async def main() -> None:
        transport, protocol = await endpoint(impl, local_addr=("127.0.0.1", 0))
        assert transport.get_write_buffer_size() == 0
        # asyncio's defaults (uvloop starts with a low mark of 16 bytes).
        initial = (16, 65536) if (impl, loop_kind) == ("stock", "uvloop") else (16384, 65536)
        assert transport.get_write_buffer_limits() == initial
        transport.set_write_buffer_limits(high=100)
        assert transport.get_write_buffer_limits() == (25, 100)
        transport.set_write_buffer_limits(low=10)
        assert transport.get_write_buffer_limits() == (10, 40)
        transport.set_write_buffer_limits()
        assert transport.get_write_buffer_limits() == (16384, 65536)
        with pytest.raises(ValueError, match="must be >="):
            transport.set_write_buffer_limits(high=10, low=20)
        assert protocol.events == ["made"]  # nothing buffered: nothing paused
        transport.close()
        await protocol.lost

    run(main())


def test_queued_bytes_count_until_the_iteration_ends(run: Runner[None]) -> None:
    # udpx queues until the end of the loop iteration (one batch); asyncio sends at once.
    async def main() -> None:
        transport, protocol = await endpoint("udpx", local_addr=("127.0.0.1", 0))
        with plain_socket() as peer:
            for _ in range(3):
                transport.sendto(b"x" * 100, peer.getsockname())
            assert transport.get_write_buffer_size() == 300
            assert await receive_data(peer, 3) == [b"x" * 100] * 3
            assert transport.get_write_buffer_size() == 0
        # Above the high mark the queue is sent at once; the kernel took it, so no pause.
        transport.set_write_buffer_limits(high=1000)
        with plain_socket() as peer:
            for _ in range(20):
                transport.sendto(b"y" * 100, peer.getsockname())
            assert transport.get_write_buffer_size() < 1000
            assert await receive_data(peer, 20) == [b"y" * 100] * 20
        assert "pause_writing" not in protocol.events
        transport.close()
        await protocol.lost

    run(main())


# -- reading control ---------------------------------------------------------------------------

def _has_pause_reading(transport: Any) -> bool:
    try:
        transport.is_reading()
    except (NotImplementedError, AttributeError):  # uvloop's has no such methods
        return False
    return True


def test_pause_and_resume_reading(run: Runner[None], impl: str) -> None:
    async def main() -> None:
        transport, protocol = await endpoint(impl, local_addr=("127.0.0.1", 0))
        if not _has_pause_reading(transport):
            transport.close()
            await protocol.lost
            pytest.skip(f"this loop's datagram transport ({type(transport).__name__}) cannot "
                        "pause reading (uvloop's; early CPython 3.11 releases' such as 3.11.2)")
        assert transport.is_reading()
        transport.pause_reading()
        transport.pause_reading()  # idempotent
        assert not transport.is_reading()
        with plain_socket() as peer:
            for index in range(10):
                peer.sendto(b"%d" % index, transport.get_extra_info("sockname"))
            # Loopback delivery is synchronous: the datagrams wait in the socket's buffer,
            # and a few loop iterations deliver none of them.
            for _ in range(5):
                await asyncio.sleep(0)
            assert protocol.datagrams == []
            transport.resume_reading()
            assert transport.is_reading()
            await protocol.until(10)
            assert [data for data, _ in protocol.datagrams] == [b"%d" % i for i in range(10)]
        transport.close()
        assert not transport.is_reading()
        await protocol.lost

    run(main())


def test_pause_reading_from_a_callback_stops_between_datagrams(run: Runner[None],
                                                               impl: str) -> None:
    async def main() -> None:
        def pause_at_three(protocol: Recorder, data: bytes) -> None:
            if len(protocol.datagrams) == 3:
                transport: Any = protocol.transport
                transport.pause_reading()

        def factory() -> Recorder:
            protocol = Recorder()
            protocol.on_datagram = pause_at_three
            return protocol

        transport, protocol = await endpoint(impl, factory, local_addr=("127.0.0.1", 0))
        if not _has_pause_reading(transport):
            transport.close()
            await protocol.lost
            pytest.skip(f"this loop's datagram transport ({type(transport).__name__}) cannot "
                        "pause reading (uvloop's; early CPython 3.11 releases' such as 3.11.2)")
        with plain_socket() as peer:
            for index in range(10):
                peer.sendto(b"%d" % index, transport.get_extra_info("sockname"))
            await protocol.until(3)
            for _ in range(5):
                await asyncio.sleep(0)
            assert len(protocol.datagrams) == 3  # the rest of the batch is held
            transport.resume_reading()
            await protocol.until(10)
            assert [data for data, _ in protocol.datagrams] == [b"%d" % i for i in range(10)]
        transport.close()
        await protocol.lost

    run(main())


def test_an_exception_in_datagram_received_goes_to_the_handler(run: Runner[None],
                                                               impl: str,
                                                               loop_kind: str) -> None:
    if impl == "stock" and loop_kind == "uvloop":
        pytest.skip("uvloop closes the transport on such an exception")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reported: list[BaseException] = []
        loop.set_exception_handler(lambda _, context: reported.append(context["exception"]))

        def fail_on_bad(protocol: Recorder, data: bytes) -> None:
            if data == b"bad":
                raise RuntimeError("bad datagram")

        def factory() -> Recorder:
            protocol = Recorder()
            protocol.on_datagram = fail_on_bad
            return protocol

        transport, protocol = await endpoint(impl, factory, local_addr=("127.0.0.1", 0))
        with plain_socket() as peer:
            for data in (b"a", b"bad", b"c"):
                peer.sendto(data, transport.get_extra_info("sockname"))
            await protocol.until(3)
        assert [data for data, _ in protocol.datagrams] == [b"a", b"bad", b"c"]
        assert len(reported) == 1 and isinstance(reported[0], RuntimeError)
        assert not transport.is_closing()
        transport.close()
        await protocol.lost

    run(main())


# -- closing -----------------------------------------------------------------------------------

def test_close_flushes_then_reports_lost(run: Runner[None], impl: str) -> None:
    async def main() -> None:
        transport, protocol = await endpoint(impl, local_addr=("127.0.0.1", 0))
        with plain_socket() as peer:
            for index in range(50):
                transport.sendto(b"%d" % index, peer.getsockname())
            transport.close()
            assert transport.is_closing()
            assert "lost" not in protocol.events  # not called from inside close()
            assert await protocol.lost is None
            assert await receive_data(peer, 50) == [b"%d" % i for i in range(50)]
            transport.close()  # idempotent
            if impl == "udpx":
                # Ignored and counted (asyncio 3.11's unconnected transport crashes here).
                transport.sendto(b"late", peer.getsockname())
                assert isinstance(transport, udpx.EndpointTransport)
                assert transport.stats.drops["closed"] == 1
        assert protocol.events.count("lost") == 1
        if impl == "udpx":
            assert transport.get_extra_info("socket").fileno() == -1  # freed

    run(main())


def test_abort_drops_what_is_queued(run: Runner[None], impl: str) -> None:
    async def main() -> None:
        transport, protocol = await endpoint(impl, local_addr=("127.0.0.1", 0))
        with plain_socket() as peer:
            peer.setblocking(False)
            for index in range(50):
                transport.sendto(b"%d" % index, peer.getsockname())
            transport.abort()
            assert transport.is_closing()
            assert await protocol.lost is None
            if impl == "udpx":
                # Queued until the iteration's end, so all 50 were dropped (and counted).
                assert isinstance(transport, udpx.EndpointTransport)
                assert transport.stats.drops["closed"] == 50
                with pytest.raises(BlockingIOError):
                    peer.recv(10)
        assert protocol.events.count("lost") == 1

    run(main())


def test_datagrams_after_close_are_not_delivered(run: Runner[None], impl: str) -> None:
    async def main() -> None:
        def close_on_first(protocol: Recorder, data: bytes) -> None:
            assert protocol.transport is not None
            protocol.transport.close()

        def factory() -> Recorder:
            protocol = Recorder()
            protocol.on_datagram = close_on_first
            return protocol

        transport, protocol = await endpoint(impl, factory, local_addr=("127.0.0.1", 0))
        with plain_socket() as peer:
            for index in range(10):
                peer.sendto(b"%d" % index, transport.get_extra_info("sockname"))
            await protocol.lost
        assert len(protocol.datagrams) == 1
        assert protocol.events == ["made", "datagram", "lost"]

    run(main())


# -- udpx's own -------------------------------------------------------------------------------

@pytest.mark.parametrize("action", ["close", "abort", "pause, then close"])
def test_what_a_close_keeps_from_delivery_is_counted_once(run: Runner[None],
                                                           action: str) -> None:
    """A protocol that closes (aborts; pauses, then closes) on the first datagram of a batch:
    the rest of the batch leaves the delivered count and is counted as ``closed``, once, so
    that delivered + dropped is what arrived."""
    async def main() -> None:
        def stop_on_first(protocol: Recorder, data: bytes) -> None:
            assert isinstance(protocol.transport, udpx.EndpointTransport)
            if action == "close":
                protocol.transport.close()
            elif action == "abort":
                protocol.transport.abort()
            else:
                protocol.transport.pause_reading()

        def factory() -> Recorder:
            protocol = Recorder()
            protocol.on_datagram = stop_on_first
            return protocol

        transport, protocol = await endpoint("udpx", factory, local_addr=("127.0.0.1", 0))
        assert isinstance(transport, udpx.EndpointTransport)
        with plain_socket() as peer:
            for index in range(10):  # all sent before the loop reads: one batch
                peer.sendto(b"%d" % index, transport.get_extra_info("sockname"))
            await protocol.until(1)
        if action == "pause, then close":
            stats = transport.stats  # the rest is held, to be delivered on resume
            assert (stats.rx_packets, stats.drops["closed"]) == (10, 0), stats
            transport.close()
        await protocol.lost
        stats = transport.stats
        assert [data for data, _ in protocol.datagrams] == [b"0"]
        assert (stats.rx_packets, stats.rx_bytes, stats.drops["closed"]) == (1, 1, 9), stats

    run(main())


def test_stats_and_describe(run: Runner[None]) -> None:
    async def main() -> None:
        transport, protocol = await endpoint("udpx", local_addr=("127.0.0.1", 0))
        assert isinstance(transport, udpx.EndpointTransport)
        with plain_socket() as peer:
            for _ in range(7):
                peer.sendto(b"12345", transport.get_extra_info("sockname"))
            await protocol.until(7)
            transport.sendto(b"reply", peer.getsockname())
            assert await receive_data(peer, 1) == [b"reply"]
        stats = transport.stats
        assert (stats.rx_packets, stats.rx_bytes, stats.tx_packets, stats.tx_bytes) == (
            7, 35, 1, 5)
        info = transport.describe()
        assert info["mode"] == "endpoint" and info["socket"]["engine"] == "mmsg"
        assert info["peers_cached"] == 1 and info["reading"] is True
        assert info["stats"]["rx_packets"] == 7
        transport.close()
        await protocol.lost

    run(main())


def test_udpx_options_are_checked(run: Runner[None]) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="batch_size"):
            await udpx.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0),
                                                batch_size=0)
        # The options of an endpoint are validated once per set of values and kept: a value
        # equal to a valid one but of another type is checked on its own, not taken for it.
        transport, _ = await udpx.create_datagram_endpoint(
            Recorder, local_addr=("127.0.0.1", 0), batch_size=1)
        transport.close()
        with pytest.raises(ValueError, match="batch_size"):
            await udpx.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0),
                                                batch_size=True)
        # An unhashable value is no key for the memo: still the option's own error.
        with pytest.raises(ValueError, match="rcvbuf must be"):
            await udpx.create_datagram_endpoint(Recorder, local_addr=("127.0.0.1", 0),
                                                rcvbuf=[1])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="idle_timeout"):
            udpx.patch_loop(asyncio.get_running_loop(), idle_timeout=3)

    run(main())


def test_what_udpx_cannot_serve_falls_back_to_the_loop(run: Runner[None]) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(path)
            transport, protocol = await udpx.create_datagram_endpoint(Recorder, sock=sock)
            assert not isinstance(transport, udpx.EndpointTransport)
            assert transport.get_extra_info("sockname") == path
            transport.close()
            await protocol.lost  # type: ignore[attr-defined]

    run(main())


# -- what opening an endpoint costs ---------------------------------------------------------


class _NoLookups:
    """A loop whose getaddrinfo records the names it is asked to look up."""

    def __init__(self) -> None:
        self.asked: list[Any] = []

    async def getaddrinfo(self, host: Any, port: Any, **kwargs: Any) -> list[Any]:
        self.asked.append(host)
        return socket.getaddrinfo(host, port, kwargs.get("family", 0), socket.SOCK_DGRAM,
                                  kwargs.get("proto", 0), kwargs.get("flags", 0))


@pytest.mark.parametrize(("host", "port", "flags"), [
    ("127.0.0.1", 53, 0), ("::0001", 53, 0), ("::1", "53", 0), (None, 0, socket.AI_PASSIVE),
    ("0.0.0.0", 0, 0), (b"127.0.0.1", b"53", 0), ("fe80::1%lo", 53, 0), ("127.0.0.1", None, 0)])
def test_numeric_addresses_resolve_without_a_lookup(host: Any, port: Any, flags: int) -> None:
    """An endpoint per query (DNS clients open one each) pays no trip through a resolver
    thread for a numeric address, and gets the address getaddrinfo gives."""
    loop = _NoLookups()
    found = asyncio.run(_getaddrinfo(loop, host, port, family=0, proto=0,  # type: ignore[arg-type]
                                     flags=flags))
    expected = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM, 0, flags)
    assert loop.asked == []
    assert [(info[0], info[1], info[2]) for info in found] == [
        (info[0], info[1], info[2]) for info in expected[:len(found)]]
    for (family, *_, address), (*_, wanted) in zip(found, expected):
        # The same address, as written or as getaddrinfo normalises it ("::0001" is "::1").
        assert socket.inet_pton(family, str(address[0]).split("%")[0]) == socket.inet_pton(
            family, str(wanted[0]).split("%")[0])
        assert address[1:] == wanted[1:]


#: Addresses read as asyncio's own method reads them (its _ipaddr_info): a numeric host
#: takes any port int() takes, a NUL in the host is refused, a name with a float port goes
#: to getaddrinfo, which refuses it. Each entry: (host, port), and the port it connects to
#: or the exception.
_ASYNCIO_ADDRESSES: list[tuple[tuple[Any, Any], int | type[BaseException]]] = [
    (("127.0.0.1", 53.0), 53), (("127.0.0.1", True), 1), (("127.0.0.1", 53.9), 53),
    (("127.0.0.1", "53"), 53), (("127.0.0.1", b"53"), 53), ((b"127.0.0.1", 53), 53),
    (("::1", "53"), 53), (("127.0.0.1", "70000"), OverflowError),
    (("127.0.0.1", -1.0), OverflowError), (("127.0.0.1\x00", 53), ValueError),
    (("localhost", 53.0), OSError), (("127.0.0.1", object()), OSError)]


@pytest.mark.parametrize(("address", "outcome"), _ASYNCIO_ADDRESSES,
                         ids=[repr(address) for address, _ in _ASYNCIO_ADDRESSES])
def test_remote_addresses_read_as_asyncio_reads_them(run: Runner[None], address: Any,
                                                     outcome: Any) -> None:
    """Where uvloop's own method differs from asyncio's (it refuses a float port, and reads a
    host only up to a NUL), udpx's endpoint is asyncio's, on either loop; on asyncio's loop
    the loop's own method is checked to agree."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        makers: list[Callable[..., Any]] = [udpx.create_datagram_endpoint]
        if isinstance(loop, asyncio.BaseEventLoop):
            makers.append(functools.partial(asyncio.BaseEventLoop.create_datagram_endpoint,
                                            loop))
        for make in makers:
            if isinstance(outcome, int):
                transport, _ = await make(Recorder, remote_addr=address)
                try:
                    assert transport.get_extra_info("peername")[1] == outcome
                finally:
                    transport.close()
            else:
                with pytest.raises(outcome):
                    await make(Recorder, remote_addr=address)

    run(main())


@pytest.mark.parametrize(("host", "port"), [("localhost", 53), ("127.0.0.1", "domain")])
def test_names_are_looked_up_through_the_loop(host: str, port: Any) -> None:
    loop = _NoLookups()
    try:
        expected = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        pytest.skip(f"{host}:{port} does not resolve here: {exc}")
    found = asyncio.run(_getaddrinfo(loop, host, port, family=0, proto=0,  # type: ignore[arg-type]
                                     flags=0))
    assert found == expected and loop.asked == [host]


def test_connected_endpoints_share_the_loops_receiver(run: Runner[None]) -> None:
    """Connected endpoints read through the receiver the loop's dialed sockets share (an arena
    each made an endpoint per query cost 6x the loop's own); an unconnected one keeps its own
    (its datagrams carry their sources)."""

    async def main() -> None:
        with plain_socket() as peer:
            remote = peer.getsockname()
            first, first_protocol = await endpoint("udpx", remote_addr=remote)
            second, second_protocol = await endpoint("udpx", remote_addr=remote)
            unconnected, unconnected_protocol = await endpoint(
                "udpx", local_addr=("127.0.0.1", 0))
            async with udpx.dial(*remote) as conn:
                engines = [first._engine, second._engine, conn._engine, unconnected._engine]
                receivers = [engine.receiver for engine in engines]
                assert receivers[0] is receivers[1] is receivers[2]
                assert receivers[3] is not receivers[0]
                for transport, protocol in ((first, first_protocol),
                                            (second, second_protocol)):
                    peer.sendto(b"to %d" % id(transport), transport.get_extra_info("sockname"))
                    await protocol.until(1)
                    assert protocol.datagrams == [(b"to %d" % id(transport), remote)]
            for transport, protocol in ((first, first_protocol), (second, second_protocol),
                                        (unconnected, unconnected_protocol)):
                transport.close()
                await protocol.lost

    run(main())


@pytest.mark.parametrize("which", ["local_addr", "remote_addr"])
def test_a_port_out_of_range_is_refused(run: Runner[None], which: str) -> None:
    """getaddrinfo wraps an int port round (65536 + p is p); asyncio's own method lets the
    socket refuse it with OverflowError, and so does udpx (uvloop's own endpoint wraps it)."""

    async def main() -> None:
        with plain_socket() as peer:
            port = peer.getsockname()[1]

            def address(number: int) -> dict[str, Any]:
                return {which: ("127.0.0.1", number)}

            with pytest.raises(OverflowError, match="port must be 0-65535"):
                await udpx.create_datagram_endpoint(Recorder, **address(65536 + port))
            with pytest.raises(OverflowError, match="port must be 0-65535"):
                await udpx.create_datagram_endpoint(Recorder, **address(-1))
            loop = asyncio.get_running_loop()
            if type(loop).__module__.startswith("asyncio"):
                with pytest.raises(OverflowError, match="port must be 0-65535"):
                    await loop.create_datagram_endpoint(Recorder, **address(65536 + port))

    run(main())
