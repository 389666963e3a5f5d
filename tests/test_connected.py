"""Connected mode: ``listen(..., connected=True)`` gives each peer a socket of its own,
connect()ed to it. Real sockets on loopback, both loops, IPv4 and IPv6."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import udpx
from udpx._engine import SocketEngine

from .conftest import HAVE_IPV6, Runner, receive_plain

HOSTS = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not HAVE_IPV6, reason="no IPv6 loopback on this machine"))]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def peer_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


async def receive(sock: socket.socket, count: int) -> list[bytes]:
    return [data for data, _ in await receive_plain(sock, count)]


async def echoed_bursts(peers: list[socket.socket], address: tuple[Any, ...], count: int) -> None:
    """Each peer sends ``count`` datagrams (all of them before the loop reads) and gets them
    all back, in order."""
    for index, peer in enumerate(peers):
        for turn in range(count):
            peer.sendto(b"%d-%d" % (index, turn), address)
    for index, peer in enumerate(peers):
        assert await receive(peer, count) == [b"%d-%d" % (index, turn) for turn in range(count)]


async def echo_all(ln: udpx.Listener) -> None:
    async with asyncio.TaskGroup() as tasks:
        async for conn in ln:
            tasks.create_task(echo(conn))


async def echo(conn: udpx.UDPConn) -> None:
    async for data in conn:
        await conn.send(data)


@pytest.mark.parametrize("host", HOSTS)
def test_peers_echo_on_their_own_sockets(run: Runner[None], host: str) -> None:
    async def main() -> None:
        before = open_fds()
        ln = await udpx.listen(host, 0, connected=True)
        server = asyncio.create_task(echo_all(ln))
        peers = [peer_socket(host) for _ in range(100)]
        try:
            address = ln.local_addr
            for index, peer in enumerate(peers):
                peer.sendto(b"hello %d" % index, address)
            for index, peer in enumerate(peers):
                assert await receive(peer, 1) == [b"hello %d" % index]
                # The reply came from the listener's address (the connected socket's).
                peer.sendto(b"again", address)
                assert await receive(peer, 1) == [b"again"]
            assert ln.stats.conns == 100
            # One more file descriptor per open connection (the listener's and the peers'
            # sockets aside).
            assert open_fds() - before == 1 + 100 + 100
            info = ln.describe(max_conns=None)
            assert info["connected"] is True
            fds = {conn["socket"]["fd"] for conn in info["conns"]}
            assert len(fds) == 100 and info["socket"]["fd"] not in fds
            stats = ln.stats
            assert stats.rx_packets == 200 and stats.tx_packets == 200
        finally:
            server.cancel()
            await ln.aclose()
            for peer in peers:
                peer.close()
        assert open_fds() == before  # every connection's socket freed

    run(main())


def test_closing_a_connection_frees_its_socket(run: Runner[None]) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, connected=True) as ln:
            with peer_socket("127.0.0.1") as peer:
                peer.sendto(b"x", ln.local_addr)
                conn = await ln.accept()
                count = open_fds()
                await conn.send(b"bye")
                await conn.aclose()
                assert open_fds() == count - 1
                assert await receive(peer, 1) == [b"bye"]  # flushed before the close

    run(main())


@pytest.mark.parametrize("mode", ["task", "protocol"])
def test_what_waits_in_a_closed_connections_socket_is_counted(run: Runner[None],
                                                               mode: str) -> None:
    """Datagrams still in a connection's own socket when it closes (sent after its last read)
    are read out as the socket is freed and counted as ``closed``: every datagram that reached
    the listener is delivered or counted."""

    async def main() -> None:
        made: list[_Echo] = []

        def factory() -> _Echo:
            made.append(_Echo())
            return made[-1]

        async with udpx.listen("127.0.0.1", 0, connected=True,
                               protocol_factory=factory if mode == "protocol" else None) as ln:
            with peer_socket("127.0.0.1") as peer:
                peer.sendto(b"first", ln.local_addr)
                if mode == "task":
                    conn = await ln.accept()
                    assert await conn.recv() == b"first"
                    await conn.send(b"first")
                else:
                    assert await receive(peer, 1) == [b"first"]  # echoed
                    (conn,) = ln.conns()
                for index in range(50):  # into the connection's own socket, unread
                    peer.sendto(b"%d" % index, ln.local_addr)
                conn.close()
                await conn.wait_closed()
                stats = conn.stats
                assert (stats.rx_packets, stats.drops["closed"]) == (1, 50), stats
            listener = ln.stats
            assert listener.rx_packets + sum(listener.drops.values()) == 51, listener
            assert listener.drops["closed"] == 50, listener

    run(main())


#: Datagrams the burst below sends ahead of what the connection has received.
BURST_WINDOW = 100


def test_a_burst_across_the_handover_arrives_whole_and_in_order(run: Runner[None]) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, connected=True) as ln:
            received: list[bytes] = []
            done = asyncio.Event()
            # Datagrams sent and not yet received: a window small enough for any socket's
            # default buffer (about 1 KB each on loopback) whoever is scheduled when.
            in_flight = threading.Semaphore(BURST_WINDOW)

            async def collect() -> None:
                conn = await ln.accept()
                async for data in conn:
                    received.append(data)
                    in_flight.release()
                    if len(received) == 1000:
                        done.set()

            collector = asyncio.create_task(collect())
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            address = ln.local_addr

            def burst() -> None:
                # The first BURST_WINDOW go at once, across the handover; then each waits for
                # one to be received, so that no kernel buffer overflows however slowly the
                # loop is scheduled: what is tested is the handover, not the buffer.
                for index in range(1000):
                    if not in_flight.acquire(timeout=20):
                        return  # (the wait for done below reports it)
                    sender.sendto(b"%d" % index, address)

            thread = threading.Thread(target=burst)
            thread.start()
            try:
                await asyncio.wait_for(done.wait(), 20)
            finally:
                thread.join()
                sender.close()
                collector.cancel()
            assert received == [b"%d" % index for index in range(1000)]
            assert ln.stats.drops["kernel"] == 0

    run(main())


def test_port_unreachable_reaches_the_right_connection(run: Runner[None]) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, connected=True) as ln:
            gone = peer_socket("127.0.0.1")
            stays = peer_socket("127.0.0.1")
            gone.sendto(b"a", ln.local_addr)
            stays.sendto(b"b", ln.local_addr)
            first = await ln.accept()
            second = await ln.accept()
            by_port = {conn.remote_addr[1]: conn for conn in (first, second)}
            lost = by_port[gone.getsockname()[1]]
            kept = by_port[stays.getsockname()[1]]
            gone.close()
            await lost.send(b"anyone?")
            with pytest.raises(ConnectionRefusedError):
                for _ in range(100):  # the ICMP report comes back within a few iterations
                    await lost.recv()
            await kept.send(b"fine")
            assert await receive(stays, 1) == [b"fine"]
            assert kept.stats.icmp_errors == 0
            stays.close()

    run(main())


@pytest.fixture
def few_fds() -> Iterator[int]:
    """RLIMIT_NOFILE lowered to leave room for 10 connected sockets (udpx keeps 64 for the
    rest of the process); yields that count."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = open_fds() + 64 + 10 + 1  # + the listener's own socket
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield 10
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_peers_beyond_the_fd_limit_are_refused_and_counted(run: Runner[None],
                                                          few_fds: int) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, connected=True) as ln:
            cap = few_fds
            peers = [peer_socket("127.0.0.1") for _ in range(30)]
            try:
                for peer in peers:
                    peer.sendto(b"x", ln.local_addr)
                for _ in range(1000):
                    stats = ln.stats
                    if stats.conns + stats.drops["fd_limit"] >= 30:
                        break
                    await asyncio.sleep(0.005)
                stats = ln.stats
                # (The loop's own descriptors also count, so a few less than ``cap`` fit.)
                assert 0 < stats.conns <= cap
                assert stats.drops["fd_limit"] == 30 - stats.conns
                assert stats.drops["refused"] == 0
                # A refused peer sending several at once: each counts as fd_limit, not only
                # the one that asked for a socket.
                before = stats.drops["fd_limit"]
                extra = peer_socket("127.0.0.1")
                peers.append(extra)
                for _ in range(3):
                    extra.sendto(b"y", ln.local_addr)
                for _ in range(1000):
                    if ln.stats.drops["fd_limit"] >= before + 3:
                        break
                    await asyncio.sleep(0.005)
                assert (ln.stats.drops["fd_limit"], ln.stats.drops["refused"]) == (before + 3,
                                                                                   0)
                # The admitted peers are served; nothing crashed.
                conn = await ln.accept()
                await conn.send(b"served")
                assert await receive(peers[0], 1) == [b"served"]
            finally:
                for peer in peers:
                    peer.close()

    run(main())


def test_connected_mode_needs_the_batch_engine() -> None:
    with pytest.raises(ValueError, match="connected=True needs the batch engine"):
        udpx.listen("127.0.0.1", 0, connected=True, engine="transport")


WILDCARDS = [("0.0.0.0", "127.0.0.1"),
             pytest.param("::", "::1", marks=pytest.mark.skipif(
                 not HAVE_IPV6, reason="no IPv6 loopback on this machine")),
             pytest.param("::", "127.0.0.1", marks=pytest.mark.skipif(
                 not HAVE_IPV6, reason="no IPv6 loopback on this machine"))]


@pytest.mark.parametrize(("host", "peer_host"), WILDCARDS)
def test_wildcard_listener_binds_the_exact_local_address(run: Runner[None], host: str,
                                                         peer_host: str) -> None:
    async def main() -> None:
        async with udpx.listen(host, 0, connected=True) as ln:
            port = ln.local_addr[1]
            with peer_socket(peer_host) as peer:
                peer.sendto(b"one", (peer_host, port))
                conn = await ln.accept()
                sockname = conn.describe()["socket"]
                assert sockname["fd"] != ln.describe()["socket"]["fd"]
                # Its own socket is bound to the address the peer sent to (IPv4-mapped on a
                # dual-stack listener), so the replies come from there.
                expected = peer_host if host == "0.0.0.0" or ":" in peer_host else (
                    "::ffff:" + peer_host)
                assert conn.local_addr[0] == expected and conn.local_addr[1] == port
                await conn.send(b"reply")
                [reply] = await receive(peer, 1)
                assert reply == b"reply"
                peer.sendto(b"two", (peer_host, port))
                assert [await conn.recv(), await conn.recv()] == [b"one", b"two"]
                # "two" came through its own socket: the handover is done.
                assert ln.describe()["handover_pending"] == 0

    run(main())


class _Echo(udpx.ConnProtocol):
    def connection_made(self, conn: udpx.UDPConn) -> None:
        self.conn = conn

    def datagrams_received(self, datagrams: list[bytes]) -> None:
        self.conn.send_many_nowait(datagrams)


def test_protocol_mode_on_connected_sockets(run: Runner[None]) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, connected=True, protocol_factory=_Echo) as ln:
            peers = [peer_socket("127.0.0.1") for _ in range(20)]
            try:
                await echoed_bursts(peers, ln.local_addr, 5)
                info = ln.describe(max_conns=None)
                assert info["mode"] == "protocol" and info["connected"] is True
                assert len({conn["socket"]["fd"] for conn in info["conns"]}) == 20
            finally:
                for peer in peers:
                    peer.close()

    run(main())


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("mode", ["task", "protocol"])
def test_peer_sockets_share_one_receive_arena(run: Runner[None], mode: str) -> None:
    """Every peer socket of a listener is read through one batch receiver, freed with the last
    of them. (Each had an arena of its own, a slot of max_datagram bytes per message, so a
    first batch of 64 faulted in about 256 KiB: 200 such peers grew the resident memory by
    63 MiB, against 4 MiB shared, and 1,000 new peers under load stalled the loop for half a
    second.)"""

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, connected=True,
                               protocol_factory=_Echo if mode == "protocol" else None) as ln:
            server = asyncio.create_task(echo_all(ln)) if mode == "task" else None
            peers = [peer_socket("127.0.0.1") for _ in range(200)]
            try:
                before = resident_bytes()
                for index, peer in enumerate(peers):
                    peer.sendto(b"%d" % index, ln.local_addr)
                for index, peer in enumerate(peers):
                    assert await receive(peer, 1) == [b"%d" % index]
                # Then a batch of 64 through each peer's own socket.
                await echoed_bursts(peers, ln.local_addr, 64)
                grown = resident_bytes() - before
                conns = ln.conns()
                assert len(conns) == 200
                engines = [ln._peer_engines[conn] for conn in conns]
                assert len({id(engine.receiver) for engine in engines}) == 1
                assert len({id(engine.sender) for engine in engines}) == 1
                listener_engine = ln._engine
                assert isinstance(listener_engine, SocketEngine)
                assert engines[0].receiver is not listener_engine.receiver
                assert len(ln._peer_batches) == 2  # a receiver and a sender
                assert grown < 20 * 2**20, f"{grown / 2**20:.1f} MiB for 200 connections"
                shared = engines[0].receiver
                for conn in conns:
                    conn.close()
                for conn in conns:
                    await conn.wait_closed()
                assert len(ln._peer_batches) == 0 and shared._closed  # type: ignore[union-attr]
                # A new peer gets a new one.
                peers[0].sendto(b"again", ln.local_addr)
                assert await receive(peers[0], 1) == [b"again"]
                peers[0].sendto(b"own socket", ln.local_addr)
                assert await receive(peers[0], 1) == [b"own socket"]
                assert len(ln._peer_batches) == 2
            finally:
                if server is not None:
                    server.cancel()
                for peer in peers:
                    peer.close()

    run(main())


def test_peers_sharing_a_receiver_keep_their_own_ecn_marks(run: Runner[None]) -> None:
    """The shared receiver's control space is read per batch, before anything is delivered:
    each connection counts its own peer's ECN codepoints, and the listener all of them."""

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, connected=True, ecn=True,
                               protocol_factory=_Echo) as ln:
            peers = [peer_socket("127.0.0.1") for _ in range(4)]
            try:
                marks = [0, 1, 2, 3]  # not-ECT, ECT(1), ECT(0), CE
                for peer, mark in zip(peers, marks):
                    peer.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, mark)
                for turn in range(3):
                    for index, peer in enumerate(peers):
                        peer.sendto(b"%d-%d" % (index, turn), ln.local_addr)
                    for index, peer in enumerate(peers):
                        assert await receive(peer, 1) == [b"%d-%d" % (index, turn)]
                by_peer = {conn.remote_addr: conn for conn in ln.conns()}
                for peer, mark in zip(peers, marks):
                    ecn = dict(by_peer[peer.getsockname()].stats.ecn)
                    expected = {"ect0": 0, "ect1": 0, "ce": 0}
                    if mark:
                        expected[{1: "ect1", 2: "ect0", 3: "ce"}[mark]] = 3
                    assert ecn == expected, (mark, ecn)
                # The listener's totals count what the peers' own sockets read too (they
                # counted only its own socket's: the first datagram of each peer).
                assert dict(ln.stats.ecn) == {"ect0": 3, "ect1": 3, "ce": 3}
            finally:
                for peer in peers:
                    peer.close()

    run(main())


@pytest.mark.parametrize("total", [1008, 1024, 1040])
def test_the_handover_does_not_wait_for_more_traffic(run: Runner[None], total: int) -> None:
    """The handover waits for a read of the listener's socket that finds it empty. When the
    wake-up that emptied it ended at its read budget (1,024 datagrams), no read found it
    empty, and an empty socket wakes no one: the new connections' own sockets were never read
    until more traffic reached the listener's socket, perhaps never."""

    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, connected=True, rcvbuf=1 << 22,
                               protocol_factory=_Echo) as ln:
            peers = [peer_socket("127.0.0.1") for _ in range(16)]
            per = total // len(peers)
            try:
                for peer in peers:  # all of it in the socket before the loop reads
                    for turn in range(per):
                        peer.sendto(b"%d" % turn, ln.local_addr)
                for peer in peers:
                    assert await receive(peer, per) == [b"%d" % turn for turn in range(per)]
                for peer in peers:  # through each peer's own socket
                    peer.sendto(b"own", ln.local_addr)
                for peer in peers:
                    assert await receive(peer, 1) == [b"own"]
                assert ln.describe()["handover_pending"] == 0
            finally:
                for peer in peers:
                    peer.close()

    run(main())


class _ClosesTheListener(udpx.ConnProtocol):
    """Echoes, and closes its listener when told to."""

    listener: udpx.Listener | None = None

    def connection_made(self, conn: udpx.UDPConn) -> None:
        self.conn = conn

    def datagrams_received(self, datagrams: list[bytes]) -> None:
        if b"close" in datagrams:
            assert self.listener is not None
            self.listener.close()
            return
        self.conn.send_many_nowait(datagrams)


@pytest.mark.parametrize("connected", [True, False])
def test_closing_the_listener_in_a_batch_with_a_truncated_datagram(run: Runner[None],
                                                                    connected: bool) -> None:
    """A batch with a truncated message is handed over one message at a time; a callback that
    closes the listener there frees every peer socket's engine, and with the last one the
    shared receiver's arena. The rest of the batch was read from the freed arena: an exception
    in the loop's reader and datagrams neither delivered nor counted (found by a black-box
    pass; the listener's own socket's batch alike). Every message is decoded first now."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        ln = await udpx.listen("127.0.0.1", 0, connected=connected, max_datagram=100,
                               protocol_factory=_ClosesTheListener)
        _ClosesTheListener.listener = ln
        peers = [peer_socket("127.0.0.1") for _ in range(3)]
        try:
            for peer in peers:
                peer.sendto(b"hello", ln.local_addr)
            for peer in peers:
                assert await receive(peer, 1) == [b"hello"]
            async with asyncio.timeout(10):
                while ln.describe().get("handover_pending"):
                    await asyncio.sleep(0)
            # One batch (on the first peer's own socket in connected mode): the close, a
            # truncated one, five more.
            peers[0].sendto(b"close", ln.local_addr)
            peers[0].sendto(b"y" * 500, ln.local_addr)
            for index in range(5):
                peers[0].sendto(b"after %d" % index, ln.local_addr)
            await ln.wait_closed()
            stats = ln.stats
            assert stats.rx_packets + sum(stats.drops.values()) == 3 + 7, stats
            assert (stats.drops["truncated"], stats.drops["closed"]) == (1, 5), stats
            assert errors == []
        finally:
            _ClosesTheListener.listener = None
            for peer in peers:
                peer.close()

    run(main())
