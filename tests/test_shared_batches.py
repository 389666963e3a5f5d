"""The connected sockets of one loop (dialed connections, connected endpoints) share their
batch arrays: one receiver (arena, headers, control space) and one sender per layout, as a
connected-mode listener's peer sockets do (test_connected.py). Real sockets on loopback, both
loops."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import pytest

import udpx
from udpx._cmsg import SOL_UDP, UDP_SEGMENT
from udpx._engine import MAX_IDLE_LAYOUTS, SocketEngine, loop_batches

from .conftest import Runner, send_gso_runs
from .test_connected import peer_socket, receive, resident_bytes

CONNS = 100


def engine_of(conn: udpx.UDPConn) -> SocketEngine:
    engine = conn._engine
    assert isinstance(engine, SocketEngine)
    return engine


def test_dialed_connections_share_one_receiver(run: Runner[None]) -> None:
    """A client of many connections (a relay's upstreams): each dialed socket had an arena of
    its own, and its first batch of 64 faulted in about 256 KiB. Now one receiver serves them
    all, and it is kept, idle, for the loop's next connection."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        peers = [peer_socket("127.0.0.1") for _ in range(CONNS)]
        conns = [await udpx.dial(*peer.getsockname()) for peer in peers]
        try:
            before = resident_bytes()
            for index, (peer, conn) in enumerate(zip(peers, conns)):
                for turn in range(64):
                    peer.sendto(b"%d-%d" % (index, turn), conn.local_addr)
            for index, conn in enumerate(conns):
                async with asyncio.timeout(10):
                    got: list[bytes] = []
                    while len(got) < 64:
                        got += await conn.recv_many()
                assert got == [b"%d-%d" % (index, turn) for turn in range(64)]
            grown = resident_bytes() - before
            shared_ids = {id(engine_of(conn).receiver) for conn in conns}
            sender_ids = {id(engine_of(conn).sender) for conn in conns}
            assert len(shared_ids) == len(sender_ids) == 1
            assert len(loop_batches(loop)) == 2  # a receiver and a sender
            # An arena each: about 21 MiB here (0.6 shared).
            assert grown < 10 * 2**20, f"{grown / 2**20:.1f} MiB for {CONNS} connections"
            # Replies still go out from each connection's own socket.
            for index, conn in enumerate(conns):
                await conn.send(b"reply %d" % index)
            for index, peer in enumerate(peers):
                assert await receive(peer, 1) == [b"reply %d" % index]
            shared = engine_of(conns[0]).receiver
        finally:
            for conn in conns:
                await conn.aclose()
            for peer in peers:
                peer.close()
        receivers = loop_batches(loop)
        assert receivers.in_use() == 0 and len(receivers) == 2
        assert not shared._closed  # type: ignore[union-attr]
        with peer_socket("127.0.0.1") as peer:
            async with udpx.dial(*peer.getsockname()) as conn:
                assert engine_of(conn).receiver is shared
                peer.sendto(b"reused", conn.local_addr)
                assert await conn.recv() == b"reused"

    run(main())


def test_idle_receivers_are_kept_for_a_few_layouts_only(run: Runner[None]) -> None:
    """A client that opens a socket per query reuses the idle arrays of its layout, and a
    loop keeps at most MAX_IDLE_LAYOUTS idle receivers and as many senders (the oldest go
    first)."""

    async def main() -> None:
        receivers = loop_batches(asyncio.get_running_loop())
        made: list[Any] = []
        with peer_socket("127.0.0.1") as peer:
            for size in range(1000, 1000 + MAX_IDLE_LAYOUTS + 2):  # a layout each
                for _ in range(3):  # one query each: the same receiver every time
                    async with udpx.dial(*peer.getsockname(), max_datagram=size) as conn:
                        peer.sendto(b"q", conn.local_addr)
                        assert await conn.recv() == b"q"
                        receiver = engine_of(conn).receiver
                        assert not made or made[-1][0] != size or made[-1][1] is receiver
                        made.append((size, receiver))
        assert receivers.in_use() == 0 and len(receivers) == 2 * MAX_IDLE_LAYOUTS
        firsts = [receiver for size, receiver in made[::3]]
        assert [receiver._closed for receiver in firsts] == [True, True] + [False] * 4
        receivers.close_idle()
        assert len(receivers) == 0 and all(receiver._closed for receiver in firsts)

    run(main())


def test_readers_sharing_a_receiver_keep_their_own_batch_sizes(run: Runner[None]) -> None:
    """How many messages a reader asks for per call is its own socket's business: a peer's GRO
    runs make its reader ask for fewer, and another reader of the same receiver still asks
    for whole batches (and the other way round)."""
    runs, run_length, size = 16, 64, 64

    async def main() -> None:
        with peer_socket("127.0.0.1") as gso_peer, peer_socket("127.0.0.1") as plain_peer:
            async with udpx.dial(*gso_peer.getsockname()) as runs_conn, \
                    udpx.dial(*plain_peer.getsockname()) as plain_conn:
                runs_reader = engine_of(runs_conn).reader
                plain_reader = engine_of(plain_conn).reader
                receiver = runs_reader.receiver
                assert receiver is plain_reader.receiver
                if not receiver.gro:
                    pytest.skip("no UDP GRO on this socket")
                try:
                    gso_peer.setsockopt(SOL_UDP, UDP_SEGMENT, size)
                except OSError as exc:
                    pytest.skip(f"no UDP GSO here: {exc}")
                expected = send_gso_runs(gso_peer, runs_conn.local_addr, runs, run_length,
                                         size)
                got: list[bytes] = []
                async with asyncio.timeout(10):
                    while len(got) < len(expected):
                        got += await runs_conn.recv_many()
                assert got == expected
                assert runs_reader.vlen < receiver.size
                for index in range(100):
                    plain_peer.sendto(b"%d" % index, plain_conn.local_addr)
                async with asyncio.timeout(10):
                    assert [await plain_conn.recv() for _ in range(100)] == [
                        b"%d" % index for index in range(100)]
                assert plain_reader.vlen == receiver.size
                assert runs_reader.vlen < receiver.size  # not the other reader's

    run(main())


def test_a_socket_closed_with_datagrams_in_it_counts_them(run: Runner[None]) -> None:
    """A freed socket's leftovers are read out and counted with the layout's second receiver
    (the shared one may be in the middle of another socket's batch), freed with the layout's
    receiver."""

    async def main() -> None:
        with peer_socket("127.0.0.1") as peer, peer_socket("127.0.0.1") as other_peer:
            other = await udpx.dial(*other_peer.getsockname())  # keeps the receiver shared
            conn = await udpx.dial(*peer.getsockname())
            try:
                peer.sendto(b"first", conn.local_addr)
                assert await conn.recv() == b"first"
                engine_of(conn).stop_reading()
                for index in range(40):
                    peer.sendto(b"%d" % index, conn.local_addr)
                await conn.aclose()
                stats = conn.stats
                assert (stats.rx_packets, stats.drops["closed"]) == (1, 40), stats
                # The shared receiver is untouched and still serves the other connection.
                other_peer.sendto(b"still here", other.local_addr)
                assert await other.recv() == b"still here"
                receivers = loop_batches(asyncio.get_running_loop())
                leftovers = receivers.leftovers(engine_of(other).receiver)  # type: ignore[arg-type]
            finally:
                await other.aclose()
            assert receivers.in_use() == 0
            receivers.close_idle()
            assert leftovers._closed and len(receivers) == 0

    run(main())


def test_gro_runs_left_in_a_freed_socket_count_as_datagrams(run: Runner[None]) -> None:
    """The leftovers receiver has the layout's control space: a GSO peer's runs left in a
    freed socket count one per datagram, not one per message."""

    async def main() -> None:
        with peer_socket("127.0.0.1") as peer:
            conn = await udpx.dial(*peer.getsockname())
            if not engine_of(conn).receiver.gro:
                await conn.aclose()
                pytest.skip("no UDP GRO on this socket")
            try:
                peer.setsockopt(SOL_UDP, UDP_SEGMENT, 100)
            except OSError as exc:
                await conn.aclose()
                pytest.skip(f"no UDP GSO here: {exc}")
            peer.sendto(b"x" * 100, conn.local_addr)
            assert await conn.recv() == b"x" * 100
            engine_of(conn).stop_reading()
            for _ in range(5):
                peer.sendto(b"y" * 1000, conn.local_addr)  # runs of 10 datagrams
            await conn.aclose()
            stats = conn.stats
            assert (stats.rx_packets, stats.drops["closed"]) == (1, 50), stats

    run(main())


def test_listeners_do_not_share_their_receivers(run: Runner[None]) -> None:
    """An unconnected socket's receiver carries peer addresses; each listener keeps its own."""

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0) as first, udpx.listen("127.0.0.1", 0) as second:
            engines = [first._engine, second._engine]
            assert all(isinstance(engine, SocketEngine) for engine in engines)
            assert engines[0].receiver is not engines[1].receiver  # type: ignore[attr-defined]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
                peer.sendto(b"one", first.local_addr)
                peer.sendto(b"two", second.local_addr)
                assert await (await first.accept()).recv() == b"one"
                assert await (await second.accept()).recv() == b"two"

    run(main())


class _Errors(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.errors: list[OSError] = []
        self.error: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def error_received(self, exc: Exception) -> None:
        assert isinstance(exc, OSError)
        self.errors.append(exc)
        if not self.error.done():
            self.error.set_result(None)


class _SendsElsewhereOnError(udpx.ConnProtocol):
    """On its ICMP error, fills another endpoint's small queue: that endpoint drains at once,
    from inside this connection's send."""

    def __init__(self, other: asyncio.DatagramTransport, payloads: list[bytes]) -> None:
        self.other = other
        self.payloads = payloads
        self.errors: list[OSError] = []

    def error_received(self, exc: OSError) -> None:
        self.errors.append(exc)
        for data in self.payloads:
            self.other.sendto(data)


def peer_socket_on(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def test_a_writer_that_drains_inside_another_writers_send_uses_arrays_of_its_own(
        run: Runner[None]) -> None:
    """A connected socket's send fails with an earlier ICMP error and its callback makes
    another connected socket of the loop drain at once (a drop-in endpoint whose queue is
    full): that drain must not refill the shared sender under the first one's retry, which
    would send the second socket's datagrams from the first's, nor wait (the endpoint would
    refuse what its full queue cannot hold): it sends from arrays of its own."""

    async def main() -> None:
        with peer_socket("127.0.0.1") as gone, peer_socket("127.0.0.1") as b_peer:
            port = gone.getsockname()[1]
            endpoint, endpoint_protocol = await udpx.create_datagram_endpoint(
                _Errors, remote_addr=b_peer.getsockname(), tx_queue_size=4)
            assert isinstance(endpoint, udpx.EndpointTransport)
            assert isinstance(endpoint_protocol, _Errors)
            # The fifth finds the queue full: the endpoint drains at once, inside the
            # connection's send, or (its turn not come) refuses it as full.
            # Sizes differ (no GSO run: the batch arrays are used).
            payloads = [b"b" * (index + 1) for index in range(5)]
            protocol = _SendsElsewhereOnError(endpoint, payloads)
            conn = await udpx.dial("127.0.0.1", port, protocol_factory=lambda: protocol)
            try:
                assert engine_of(conn).sender is endpoint._engine.sender  # shared (the loop's)
                engine_of(conn).stop_reading()  # the ICMP error stays pending on the socket
                gone.close()
                conn.send_nowait(b"probe")  # -> port unreachable, pending
                async with asyncio.timeout(10):
                    while conn.stats.tx_packets < 1:  # (it leaves at the iteration's end)
                        await asyncio.sleep(0)
                with peer_socket_on(port) as a_peer:
                    conn.send_many_nowait([b"a", b"aa", b"aaa"])
                    # (Without the turn: the endpoint's datagrams, sent from this socket.)
                    assert await receive(a_peer, 3) == [b"a", b"aa", b"aaa"]
                    assert await receive(b_peer, 5) == payloads
                assert [exc.errno for exc in protocol.errors] == [errno.ECONNREFUSED]
                stats = endpoint.stats
                assert (stats.tx_packets, stats.drops["tx_queue_full"]) == (5, 0), stats
                assert endpoint_protocol.errors == []
                spare = endpoint._writer._spare
                assert spare is not None and spare is not engine_of(conn).sender
            finally:
                await conn.aclose()
                endpoint.close()

    run(main())
