"""The writer: GSO runs, sendmmsg fallback, ordering and accounting."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest

import udpx
from udpx._mmsg import make_sender, split_segments
from udpx._queue import TxAccount, TxQueue
from udpx._writer import GSO_MIN_RUN, Writer

from .conftest import EchoProtocol, Runner, socket_engine
from .test_end_to_end import BIG_RCVBUF, recv_exactly


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "sendmmsg"])
def test_runs_of_mixed_sizes_arrive_whole_and_in_order(run: Runner[Any], host: str,
                                                       gso: bool) -> None:
    # Equal sizes, a shorter last one, empty datagrams, a size change, a single one...
    datagrams = ([b"a" * 100] * 70 + [b"b" * 30] + [b""] * 3 + [b"c" * 1200] * 60
                 + [b"d" * 1201] + [b"e" * 5000] * 20 + [b"f" * 7] * 2)

    async def main() -> None:
        async with udpx.listen(host, 0, rcvbuf=BIG_RCVBUF) as ln, \
                udpx.dial(host, ln.local_addr[1], gso=gso) as conn:
            await conn.send_many(datagrams)
            server_conn = await ln.accept()
            assert await recv_exactly(server_conn, len(datagrams)) == datagrams
            writer = conn._writer
            if gso:
                assert 0 < writer.gso_sends < len(datagrams) // 4
            else:
                assert writer.gso_sends == 0
            stats = conn.stats
            assert stats.tx_packets == len(datagrams)
            assert stats.tx_bytes == sum(map(len, datagrams))
            # The listener's side: runs to one peer, interleaved with another peer.
            async with udpx.dial(host, ln.local_addr[1]) as other:
                await other.send(b"hi")
                other_conn = await ln.accept()
                for index in range(10):
                    await server_conn.send_many([b"%d" % index] * 5)
                    await other_conn.send(b"x%d" % index)
                expected = [b"%d" % index for index in range(10) for _ in range(5)]
                assert await recv_exactly(conn, 50) == expected
                assert await recv_exactly(other, 10) == [b"x%d" % i for i in range(10)]
            assert ln.stats.tx_packets == 60

    run(main())


def test_batch_size_one_sends_one_datagram_per_syscall(run: Runner[Any], host: str) -> None:
    async def main() -> None:
        async with udpx.listen(host, 0) as ln, \
                udpx.dial(host, ln.local_addr[1], batch_size=1) as conn:
            await conn.send_many([b"same size"] * 10)
            server_conn = await ln.accept()
            assert await recv_exactly(server_conn, 10) == [b"same size"] * 10
            assert conn._writer.gso_sends == 0
            assert conn._writer.sender.calls == 10

    run(main())


def test_writer_waits_for_writability_on_eagain(run: Runner[Any]) -> None:
    # UDP on loopback never returns EAGAIN (a full receiver drops), but a Unix datagram socket
    # pair does: a real kernel socket that exercises the writer's wait-for-writable path.
    total = 2000

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sending, receiving = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        with sending, receiving:
            sending.setblocking(False)
            receiving.setblocking(False)
            writer = Writer(loop, sending, make_sender(sending, 64, 2048, False, None),
                            TxQueue(total), False)
            account = TxAccount(None)
            for index in range(total):
                writer.queue.put(b"%d" % index, account)
            account.enqueued = total
            writer.schedule()
            received: list[bytes] = []
            readable = asyncio.Event()
            loop.add_reader(receiving.fileno(), readable.set)
            try:
                while len(received) < total:
                    await readable.wait()
                    readable.clear()
                    while True:
                        try:
                            received.append(receiving.recv(2048))
                        except BlockingIOError:
                            break
            finally:
                loop.remove_reader(receiving.fileno())
            assert received == [b"%d" % index for index in range(total)]
            assert writer.blocked > 0
            assert account.packets == total and account.errors == 0
            writer.close()

    run(main())


@pytest.mark.parametrize("gro", [True, False], ids=["gro", "no-gro"])
def test_gro_receives_runs_in_few_calls(run: Runner[Any], host: str, gro: bool) -> None:
    datagrams = [b"%05d" % index for index in range(3000)] + [b"z" * 300] * 65 + [b"end"]

    async def main() -> None:
        async with udpx.listen(host, 0, rcvbuf=BIG_RCVBUF, rx_queue_size=4000, gro=gro) as ln, \
                udpx.dial(host, ln.local_addr[1], rcvbuf=BIG_RCVBUF, rx_queue_size=4000,
                          gro=gro) as conn:
            await conn.send_many(datagrams)
            server_conn = await ln.accept()
            assert await recv_exactly(server_conn, len(datagrams)) == datagrams
            await server_conn.send_many(datagrams)  # and back, into the dialed socket
            assert await recv_exactly(conn, len(datagrams)) == datagrams
            for receiver in (socket_engine(ln._engine).receiver,
                             socket_engine(conn._engine).receiver):
                if gro:
                    assert receiver.gro_segments >= len(datagrams) // 2
                    assert receiver.calls < len(datagrams) // 64
                else:
                    assert receiver.gro_segments == 0
            stats = ln.stats
            assert stats.rx_packets == len(datagrams)
            assert stats.rx_bytes == sum(map(len, datagrams))

    run(main())


def test_gro_is_off_when_a_run_might_not_fit_the_slot(run: Runner[Any]) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, max_datagram=2000) as ln, \
                udpx.dial("127.0.0.1", ln.local_addr[1], max_datagram=2000) as conn:
            assert not socket_engine(ln._engine).receiver.gro
            await conn.send_many([b"x" * 100] * 200)  # one GSO run of 6,400 bytes
            server_conn = await ln.accept()
            assert await recv_exactly(server_conn, 200) == [b"x" * 100] * 200
            assert ln.stats.drops["truncated"] == 0

    run(main())


def test_split_segments() -> None:
    keys, offsets, lengths = split_segments(
        [1, 2, 3], [0, 100, 200], [10, 25, 7], [0, 10, 7])
    assert keys == [1, 2, 2, 2, 3]
    assert offsets == [0, 100, 110, 120, 200]
    assert lengths == [10, 10, 10, 5, 7]
    assert split_segments(None, [0], [20], [10]) == (None, [0, 10], [10, 10])


def test_short_runs_share_a_sendmmsg_batch(run: Runner[Any]) -> None:
    """Runs to one peer shorter than GSO_MIN_RUN (an echo server answering many clients a few
    datagrams each) go out together in one sendmmsg, not as a GSO send each; a run of
    GSO_MIN_RUN is one GSO send, and so is a shorter run with nothing queued after it."""
    peers = 5

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0) as ln:
            clients = [await udpx.dial("127.0.0.1", ln.local_addr[1]) for _ in range(peers)]
            try:
                conns = []
                for client in clients:
                    await client.send(b"hello")
                    conn = await ln.accept()
                    assert await conn.recv() == b"hello"
                    conns.append(conn)
                writer = conns[0]._writer
                assert ln.describe()["socket"]["gso"] is True
                calls = writer.sender.calls
                for index, conn in enumerate(conns):
                    conn.send_many_nowait([b"%d" % index * 100] * (GSO_MIN_RUN - 1))
                for index, client in enumerate(clients):
                    assert await recv_exactly(client, GSO_MIN_RUN - 1) == [
                        b"%d" % index * 100] * (GSO_MIN_RUN - 1)
                assert writer.gso_sends == 0
                assert writer.sender.calls == calls + 1
                conns[0].send_many_nowait([b"z" * 100] * GSO_MIN_RUN)
                assert await recv_exactly(clients[0], GSO_MIN_RUN) == [b"z" * 100] * GSO_MIN_RUN
                assert writer.gso_sends == 1
                # A short run that is all that is queued (one peer's burst) goes with GSO:
                # one system call either way.
                conns[1].send_many_nowait([b"w" * 100] * 2)
                assert await recv_exactly(clients[1], 2) == [b"w" * 100] * 2
                assert writer.gso_sends == 2
            finally:
                for client in clients:
                    await client.aclose()

    run(main())


@pytest.mark.parametrize(("batch_size", "send_batch"), [(8, 32), (64, 256), (512, 1024), (1, 1)])
def test_a_listener_sends_four_batches_worth_per_call(run: Runner[Any], batch_size: int,
                                                      send_batch: int) -> None:
    """A listener's replies to many peers leave in sendmmsg calls of up to 4 x batch_size
    datagrams (at most 1,024), a dialed connection's of batch_size: 32 peers' requests, read
    in one wake-up, are answered by one call at batch_size 8."""

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, protocol_factory=EchoProtocol,
                               batch_size=batch_size,
                               rcvbuf=BIG_RCVBUF) as ln, \
                udpx.dial("127.0.0.1", ln.local_addr[1], batch_size=batch_size) as conn:
            assert ln.describe()["socket"]["send_batch"] == send_batch
            assert conn.describe()["socket"]["send_batch"] == batch_size
            if batch_size == 1:
                return  # (one datagram per call: nothing to batch)
            engine = socket_engine(ln._engine)
            with contextlib.ExitStack() as stack:
                peers = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                         for _ in range(32)]
                for peer in peers:  # warm-up: every peer's connection exists
                    peer.bind(("127.0.0.1", 0))
                    peer.settimeout(5)
                    peer.sendto(b"hello", ln.local_addr)
                    await asyncio.to_thread(peer.recv, 100)
                calls = engine.sender.calls
                # All 32 requests are in the socket before the loop runs again: one wake-up
                # reads them and its replies leave at its end.
                for index, peer in enumerate(peers):
                    peer.sendto(b"%d" % index, ln.local_addr)

                def collect() -> list[bytes]:
                    return [peer.recv(100) for peer in peers]

                assert await asyncio.to_thread(collect) == [b"%d" % i for i in range(32)]
                assert engine.sender.calls - calls == (1 if send_batch >= 32 else 32 // send_batch)

    run(main())


def _collecting_listener_protocol() -> tuple[type[udpx.ConnProtocol], list[udpx.UDPConn]]:
    conns: list[udpx.UDPConn] = []

    class Collect(udpx.ConnProtocol):
        def connection_made(self, conn: udpx.UDPConn) -> None:
            conns.append(conn)

    return Collect, conns


async def _greeting_peers(stack: contextlib.ExitStack, ln: udpx.Listener, count: int,
                          conns: list[udpx.UDPConn]) -> list[socket.socket]:
    """``count`` plain sockets (1 MiB receive buffers, 5-s timeouts) that each greet the
    listener, once the listener has a connection for each (``conns``, as the collecting
    protocol fills it)."""
    peers = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
             for _ in range(count)]
    for peer in peers:
        peer.bind(("127.0.0.1", 0))
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        peer.settimeout(5)
        peer.sendto(b"hello", ln.local_addr)
    while len(conns) < count:
        await asyncio.sleep(0.005)  # (bounded by the test's timeout)
    return peers


@pytest.mark.parametrize(("kind", "expected"), [("gso runs", 16 * 10), ("sendmmsg", 16 * 64)])
def test_one_drain_sends_sixteen_turns_of_a_listener(run: Runner[Any], kind: str,
                                                     expected: int) -> None:
    """One drain of a listener's queue (one loop callback) sends 16 turns, as a dialed
    connection's does: 16 GSO runs (here of 10 datagrams each), or 16 x batch_size datagrams
    by sendmmsg, though a listener's sendmmsg calls carry 4 x batch_size each."""

    async def main() -> None:
        protocol, conns = _collecting_listener_protocol()
        async with udpx.listen("127.0.0.1", 0, protocol_factory=protocol) as ln:
            with contextlib.ExitStack() as stack:
                await _greeting_peers(stack, ln, 40, conns)
                writer = socket_engine(ln._engine).writer
                if kind == "gso runs" and not writer.state.gso:
                    pytest.skip("the kernel refused UDP GSO on this socket")
                sent = writer.tx_packets
                # Queued at once: the drain below is the first. GSO runs: 10 datagrams of one
                # size per connection in a row; sendmmsg: the connections in turn, no run.
                if kind == "gso runs":
                    for conn in conns:
                        conn.send_many_nowait([b"x" * 1200] * 10)
                else:
                    for index in range(30):
                        for conn in conns:
                            conn.send_nowait(b"%d" % index)
                writer.flush_now()
                assert writer.tx_packets - sent == expected

    run(main())


def test_a_listener_batch_of_large_datagrams_is_cut_to_its_arena(run: Runner[Any]) -> None:
    """A listener's sendmmsg may carry 4 x batch_size datagrams but its arena holds
    batch_size of the largest: 32 datagrams of 60,000 bytes to 32 peers (more than the
    arena) leave in batches it holds, every one whole."""

    async def main() -> None:
        protocol, conns = _collecting_listener_protocol()
        async with udpx.listen("127.0.0.1", 0, protocol_factory=protocol, batch_size=8,
                               gso=False, sndbuf=4 << 20) as ln:
            sender = socket_engine(ln._engine).sender
            assert (sender.size, sender.capacity) == (32, 8 * 65535)
            with contextlib.ExitStack() as stack:
                peers = await _greeting_peers(stack, ln, 32, conns)
                by_port = {conn.remote_addr[1]: conn for conn in conns}
                calls = sender.calls
                for index, peer in enumerate(peers):
                    by_port[peer.getsockname()[1]].send_nowait(bytes([index]) * 60_000)

                def collect() -> list[bytes]:
                    return [peer.recv(65535) for peer in peers]

                received = await asyncio.to_thread(collect)
                assert received == [bytes([index]) * 60_000 for index in range(32)]
                assert sender.calls - calls >= 4  # at most 8 x 65,535 bytes per call

    run(main())
