"""Read coalescing (``rx_coalesce``): under a steady stream the reader pauses between reads,
loses and reorders nothing, and stops pausing when a pause does not pay.

The reader measures the arrival rate with ``perf_counter``; these tests replace that clock
with one that advances a fixed step per reading, so that "a fast stream" does not depend on
the machine's speed. The sockets, the kernel and the loop's timers are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import udpx
from udpx import _reader
from udpx._endpoint import EndpointTransport
from udpx._engine import SocketEngine
from udpx._listener import Listener
from udpx._reader import COALESCE_BACKOFF, BatchReader

from .conftest import Runner

#: One burst: a full batch, read by one wake-up that then finds the socket empty.
BURST = 64
#: The fake clock's step per reading: 64 datagrams per 100 µs is 640,000 a second.
STEP = 0.0001


class Clock:
    """A perf_counter that advances STEP each time it is read."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.step = STEP

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(_reader, "perf_counter", fake)
    return fake


class Collect(udpx.ConnProtocol):
    """Every datagram of every connection, in order, and a way to wait for a count."""

    got: list[bytes]
    waiter: tuple[int, asyncio.Future[None]] | None = None

    def __init__(self) -> None:
        self.got = []

    def datagrams_received(self, datagrams: list[bytes]) -> None:
        self.got += datagrams
        waiter = self.waiter
        if waiter is not None and len(self.got) >= waiter[0] and not waiter[1].done():
            waiter[1].set_result(None)

    async def until(self, count: int) -> None:
        if len(self.got) < count:
            future = asyncio.get_running_loop().create_future()
            self.waiter = (count, future)
            await future


def _reader_of(ln: Listener) -> BatchReader:
    engine = ln._engine
    assert isinstance(engine, SocketEngine)
    return engine.reader


def _sender() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def _send(sock: socket.socket, port: int, first: int, count: int) -> None:
    for number in range(first, first + count):
        sock.sendto(b"%d" % number, ("127.0.0.1", port))


@contextlib.asynccontextmanager
async def _listening(**options: Any) -> AsyncIterator[
        tuple[Listener, BatchReader, Collect, socket.socket, int]]:
    """A protocol-mode listener (all its datagrams to one ``Collect``), its reader, and a
    socket to send to it from, with the listener's port."""
    proto = Collect()
    async with udpx.listen("127.0.0.1", 0, protocol_factory=lambda: proto,
                           **{"rcvbuf": 1 << 20, **options}) as ln:
        with _sender() as sock:
            yield ln, _reader_of(ln), proto, sock, ln.local_addr[1]


async def _until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition()`` holds (bounded by the test's timeout)."""
    while not condition():
        await asyncio.sleep(0)


async def _stream_until_paused(reader: BatchReader, proto: Collect, sock: socket.socket,
                               port: int, sent: int) -> int:
    """Send bursts, each read by one wake-up, until the reader pauses; the count sent."""
    for _ in range(50):
        _send(sock, port, sent, BURST)
        sent += BURST
        await proto.until(sent)
        if reader.paused:
            return sent
    raise AssertionError("the reader never paused under a fast stream")


def test_a_fast_stream_makes_the_reader_pause_and_nothing_is_lost_or_reordered(
        run: Runner[Any], clock: Clock) -> None:
    # A pause of 0.5 s, ended by the test as its timer would: with the default 1 ms the timer
    # could fire before the test looked, and a loaded machine then saw a second pause (CI).
    async def main() -> None:
        async with _listening(rx_coalesce=0.5) as (ln, reader, proto, sock, port):
            sent = await _stream_until_paused(reader, proto, sock, port, 0)
            assert reader.pauses == 1
            # Paused: the loop does not watch the socket, so what arrives now waits in the
            # kernel's buffer for the pause to end.
            _send(sock, port, sent, 100)
            for _ in range(20):
                await asyncio.sleep(0)
            assert reader.paused and len(proto.got) == sent
            _end_pause_now(reader)
            await proto.until(sent + 100)
            sent += 100
            assert proto.got == [b"%d" % number for number in range(sent)]
            described = ln.describe()["socket"]
            assert described["rx_coalesce"] == 0.5
            assert described["rx_pauses"] >= 1
            # The wake-up after the pause found more than the rate promised: it paid.
            assert described["rx_pauses_failed"] == 0
            assert ln.stats.drops["kernel"] == 0

    run(main())


def test_read_coalescing_is_on_by_default(run: Runner[Any]) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0) as ln:
            assert ln.describe()["socket"]["rx_coalesce"] == 0.001

    run(main())


def _end_pause_now(reader: BatchReader) -> None:
    """End the reader's pause now, as its timer would (the tests below pause for 0.5 s, so
    that what they send lands within the pause, and end it themselves)."""
    pause = reader._pause
    assert pause is not None
    pause.cancel()
    reader._end_pause()


def test_while_pauses_pay_the_reader_pauses_again_at_once(run: Runner[Any],
                                                           clock: Clock) -> None:
    # A network card's interrupt moderation: under a steady stream, the wake-up that ends a
    # pause reads what the pause gathered and pauses again, with no wake-up for a handful of
    # datagrams in between.
    async def main() -> None:
        async with _listening(rx_coalesce=0.5) as (ln, reader, proto, sock, port):
            sent = await _stream_until_paused(reader, proto, sock, port, 0)
            for pauses in range(2, 6):
                _send(sock, port, sent, 100)
                sent += 100
                _end_pause_now(reader)
                assert len(proto.got) == sent  # read as the pause ended ...
                assert reader.paused  # ... and paused again at once
                assert reader.pauses == pauses
            assert reader.pauses_failed == 0
            # The stream stops: the pause brings nothing, and the reader watches the socket.
            _end_pause_now(reader)
            assert not reader.paused
            _send(sock, port, sent, 7)
            sent += 7
            await proto.until(sent)
            assert not reader.paused
            assert proto.got == [b"%d" % number for number in range(sent)]
            assert ln.stats.drops["kernel"] == 0

    run(main())


def test_two_pauses_in_a_row_that_bring_too_little_stop_pausing_for_a_while(
        run: Runner[Any], clock: Clock) -> None:
    # Peers that wait for replies (a request/response client, an echo window) send nothing
    # more during a pause: it only delays them, so the reader backs off. One such pause may
    # be a sender's hiccup (a stream's sender descheduled for a millisecond): the reader backs
    # off at the second in a row, with no paid pause between them and within COALESCE_BACKOFF.
    async def main() -> None:
        async with _listening(rx_coalesce=0.5) as (_, reader, proto, sock, port):
            sent = await _stream_until_paused(reader, proto, sock, port, 0)
            _end_pause_now(reader)  # nothing came: one short pause
            assert not reader.paused
            assert reader.pauses_failed == 0
            sent = await _stream_until_paused(reader, proto, sock, port, sent)
            _send(sock, port, sent, 100)
            sent += 100
            _end_pause_now(reader)  # a pause that paid: the short one is forgiven
            assert reader.paused
            _end_pause_now(reader)  # short again, but not twice in a row
            assert not reader.paused
            assert reader.pauses_failed == 0
            # Nor is a short pause long after the last one (another hiccup).
            clock.now += COALESCE_BACKOFF
            sent = await _stream_until_paused(reader, proto, sock, port, sent)
            _end_pause_now(reader)
            assert not reader.paused
            assert reader.pauses_failed == 0
            sent = await _stream_until_paused(reader, proto, sock, port, sent)
            pauses = reader.pauses
            _end_pause_now(reader)  # twice in a row: back off
            assert reader.pauses_failed == 1
            assert not reader.paused
            # Backing off: the same fast stream (ten bursts: twice what it took to pause) does
            # not pause ...
            for _ in range(10):
                _send(sock, port, sent, BURST)
                sent += BURST
                await proto.until(sent)
                assert not reader.paused
            assert reader.pauses == pauses
            # ... until the back-off has passed.
            clock.now += COALESCE_BACKOFF
            sent = await _stream_until_paused(reader, proto, sock, port, sent)
            assert reader.pauses == pauses + 1
            _send(sock, port, sent, 200)
            sent += 200
            _end_pause_now(reader)
            await proto.until(sent)
            assert proto.got == [b"%d" % number for number in range(sent)]
            assert reader.pauses_failed == 1

    run(main())


def test_a_pause_that_lets_the_kernel_drop_stops_pausing(run: Runner[Any],
                                                         clock: Clock) -> None:
    async def main() -> None:
        # A small buffer (the kernel doubles it: about 150 datagrams of this size).
        # (A pause of 0.5 s, ended by the test: a 1 ms one could end before the test sends.)
        async with _listening(rcvbuf=64 * 1024, rx_coalesce=0.5) as (ln, reader, proto, sock,
                                                                     port):
            sent = await _stream_until_paused(reader, proto, sock, port, 0)
            _send(sock, port, sent, 2000)  # far more than the buffer holds
            _end_pause_now(reader)
            assert reader.pauses_failed == 1
            assert reader.pauses == 1
            dropped = ln.stats.drops["kernel"]
            assert dropped > 0
            await proto.until(sent + 2000 - dropped)
            assert len(proto.got) == sent + 2000 - dropped  # every datagram read or counted
            assert proto.got == sorted(proto.got, key=int)

    run(main())


def test_no_pause_when_rx_coalesce_is_0(run: Runner[Any], clock: Clock) -> None:
    async def main() -> None:
        async with _listening(rx_coalesce=0) as (ln, reader, proto, sock, port):
            for burst in range(20):
                _send(sock, port, burst * BURST, BURST)
                await proto.until((burst + 1) * BURST)
                assert not reader.paused
            assert reader.pauses == 0
            assert ln.describe()["socket"]["rx_coalesce"] == 0

    run(main())


def test_request_response_traffic_is_never_paused(run: Runner[Any]) -> None:
    # The real clock: one datagram in flight is far below the rate that pauses.
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0) as ln:
            async with udpx.dial("127.0.0.1", ln.local_addr[1]) as client:
                await client.send(b"hello")
                server = await ln.accept()
                await server.send(await server.recv())
                for number in range(300):
                    assert await client.recv() in (b"hello", b"%d" % (number - 1))
                    await client.send(b"%d" % number)
                    await server.send(await server.recv())
                await client.recv()
                assert client.describe()["socket"]["rx_pauses"] == 0
            assert ln.describe()["socket"]["rx_pauses"] == 0

    run(main())


def test_closing_during_a_pause_cancels_it(run: Runner[Any], clock: Clock) -> None:
    async def main() -> None:
        proto = Collect()
        ln = await udpx.listen("127.0.0.1", 0, protocol_factory=lambda: proto,
                               rcvbuf=1 << 20, rx_coalesce=0.5)
        reader = _reader_of(ln)
        with _sender() as sock:
            await _stream_until_paused(reader, proto, sock, ln.local_addr[1], 0)
        assert reader.paused  # (for 0.5 s: closing comes first)
        fd = ln.describe()["socket"]["fd"]
        ln.close()
        await ln.wait_closed()
        assert not reader.paused
        assert reader._pause is None
        with pytest.raises(OSError):
            socket.socket(fileno=fd).close()  # the listener's descriptor is gone

    run(main())


class DropIn(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.target = 0
        self.reached: asyncio.Event | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append(data)
        if self.reached is not None and len(self.got) >= self.target:
            self.reached.set()

    async def until(self, count: int) -> None:
        self.target = count
        self.reached = asyncio.Event()
        if len(self.got) < count:
            await self.reached.wait()


def test_pause_reading_during_a_pause_is_kept_when_the_pause_ends(run: Runner[Any],
                                                                  clock: Clock) -> None:
    # The drop-in endpoint's pause_reading() is the owner's: the end of a coalescing pause
    # must not start reading again behind its back.
    async def main() -> None:
        transport, proto = await udpx.create_datagram_endpoint(
            DropIn, local_addr=("127.0.0.1", 0), rcvbuf=1 << 20)
        assert isinstance(transport, EndpointTransport)
        assert isinstance(proto, DropIn)
        reader = transport._engine.reader
        assert isinstance(reader, BatchReader)
        port = transport.get_extra_info("sockname")[1]
        try:
            with _sender() as sock:
                sent = 0
                for _ in range(50):
                    _send(sock, port, sent, BURST)
                    sent += BURST
                    await proto.until(sent)
                    if reader.paused:
                        break
                assert reader.paused
                transport.pause_reading()
                assert not reader.paused
                _send(sock, port, sent, 10)
                started = asyncio.get_running_loop().time()
                # Past the end the pause would have had: still nothing is read.
                while asyncio.get_running_loop().time() - started < 0.01:
                    await asyncio.sleep(0)
                assert len(proto.got) == sent
                transport.resume_reading()
                await proto.until(sent + 10)
            assert proto.got == [b"%d" % number for number in range(sent + 10)]
        finally:
            transport.close()

    run(main())


def test_no_pause_while_connection_queues_overflow(run: Runner[Any], clock: Clock) -> None:
    # The consumer is the bottleneck (its queue overflows): a pause would only make bigger
    # bursts for it to drop, so the fast stream is read as it comes.
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, rcvbuf=1 << 20, rx_queue_size=16) as ln:
            reader = _reader_of(ln)
            port = ln.local_addr[1]
            with _sender() as sock:
                for burst in range(20):  # nobody reads the connection: all but 16 overflow
                    _send(sock, port, burst * BURST, BURST)
                    await _until(lambda b=burst: ln.stats.rx_packets  # type: ignore[misc]
                                 + ln.stats.drops["rx_queue_full"] >= (b + 1) * BURST)
                    assert not reader.paused
                assert reader.pauses == 0
                conn = await ln.accept()
                assert await conn.recv_many() == [b"%d" % number for number in range(16)]
            assert ln.stats.drops["rx_queue_full"] == 20 * BURST - 16

    run(main())


class Answer(Collect):
    """Collects, and answers every ``every``-th datagram of its connection."""

    every = 1

    def connection_made(self, conn: udpx.UDPConn) -> None:
        self.conn = conn

    def datagrams_received(self, datagrams: list[bytes]) -> None:
        start = len(self.got)
        super().datagrams_received(datagrams)
        answers = [data for number, data in enumerate(datagrams, start)
                   if number % self.every == self.every - 1]
        self.conn.send_many_nowait(answers)


@pytest.mark.parametrize("every", [1, 2, 3, 8])
def test_a_socket_that_answers_what_it_reads_is_not_paused(run: Runner[Any], clock: Clock,
                                                           every: int) -> None:
    # Peers with requests in flight each send the next on its reply: a pause is then a wait
    # for all of them, while the server idles. A socket that sent at least half as many
    # datagrams as it read does not pause; one that answers less keeps coalescing.
    async def main() -> None:
        proto = Answer()
        proto.every = every
        async with udpx.listen("127.0.0.1", 0, protocol_factory=lambda: proto,
                               rcvbuf=1 << 20) as ln:
            reader = _reader_of(ln)
            with _sender() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                port = ln.local_addr[1]
                sent = 0
                for _ in range(20):  # four times what it takes a silent socket to pause
                    _send(sock, port, sent, BURST)
                    sent += BURST
                    await proto.until(sent)
                    if reader.paused:
                        _end_pause_now(reader)
                answered = ln.stats.tx_packets
                assert answered == sent // every
                sock.setblocking(False)
                replies = 0
                with contextlib.suppress(BlockingIOError):
                    while True:
                        sock.recv(64)
                        replies += 1
                assert replies == answered
            assert proto.got == [b"%d" % number for number in range(sent)]
            if every <= 2:
                assert reader.pauses == 0
            else:
                assert reader.pauses > 0

    run(main())


@pytest.mark.parametrize("together", [1, 2, 3],
                         ids=["each-batch", "two-batches-at-once", "three-batches-at-once"])
def test_a_task_mode_server_that_answers_is_not_paused(run: Runner[Any], clock: Clock,
                                                       together: int) -> None:
    # Its answers leave after the wake-up that read the requests (its task runs later), in the
    # next window. With ``together`` > 1 it answers every second (third) batch, two (three)
    # at once, and each wake-up is a window of its own (the clock's step is a span): one
    # window in two (two in three) sends nothing. A first pause needs two fast spans in a row
    # (without it, black-box pass 5 saw an echo server paused: every case here fails), and
    # answers count over two windows (without it, the case of three fails: two silent
    # windows in a row).
    async def main() -> None:
        if together > 1:
            clock.step = 2 * _reader.COALESCE_SPAN
        async with udpx.listen("127.0.0.1", 0, rcvbuf=1 << 20) as ln:
            reader = _reader_of(ln)
            with _sender() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                port = ln.local_addr[1]
                _send(sock, port, 0, 1)
                conn = await ln.accept()
                got = [await conn.recv()]
                await conn.send(got[0])
                sent = 1
                held: list[bytes] = []
                for burst in range(20):
                    _send(sock, port, sent, BURST)
                    sent += BURST
                    while len(got) < sent:
                        batch = await conn.recv_many()
                        got += batch
                        held += batch
                    # (The first burst answered at once: the windows' answers then go 64, 0,
                    # 128, 0, 128, ... against 64 requests each, or 64, 0, 0, 192, ...)
                    if burst == 0 or len(held) >= together * BURST:
                        await conn.send_many(held)
                        held = []
                    assert not reader.paused
                assert reader.pauses == 0
                assert got == [b"%d" % number for number in range(sent)]
                await conn.send_many(held)
                await _until(lambda: ln.stats.tx_packets == sent)

    run(main())
