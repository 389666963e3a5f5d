"""A flood of new peers: a listener opens at most ``OPEN_PER_TURN`` connections per loop
iteration and holds what arrives meanwhile, in order, up to a bound (``udpx._demux``). Real
sockets on loopback: every client socket's datagrams are in the listener's socket before its
loop runs, so that one reader wake-up meets far more new peers than one iteration may open.
The loop's own transport (``engine="transport"``) opens every connection at once."""

from __future__ import annotations

import asyncio
import resource
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import udpx
from udpx._demux import OPEN_PER_TURN
from udpx._queue import DATAGRAM_OVERHEAD

from .conftest import Runner

#: New peers: over two iterations' share, so that some wait two iterations.
PEERS = 2 * OPEN_PER_TURN + 50
#: Peers that send more after their first datagram (seen by the reader before their
#: connection is open).
CHATTY = 20
#: Datagrams each chatty peer sends in all.
CHATTY_COUNT = 3
TOTAL = PEERS + CHATTY * (CHATTY_COUNT - 1)


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < PEERS + 200:
        pytest.skip(f"needs {PEERS + 200} file descriptors (RLIMIT_NOFILE)")
    socks: list[socket.socket] = []
    try:
        for _ in range(PEERS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
        yield socks
    finally:
        for sock in socks:
            sock.close()


def flood(clients: list[socket.socket], address: Any) -> dict[tuple[str, int], list[bytes]]:
    """Every client sends its first datagram, then the first CHATTY send more: all of it is
    queued in the listener's socket when this returns. What each peer sent, in order."""
    sent: dict[tuple[str, int], list[bytes]] = {}
    for index, sock in enumerate(clients):
        data = b"%d:0" % index
        sock.sendto(data, address)
        sent[sock.getsockname()] = [data]
    for serial in range(1, CHATTY_COUNT):
        for index, sock in enumerate(clients[:CHATTY]):
            data = b"%d:%d" % (index, serial)
            sock.sendto(data, address)
            sent[sock.getsockname()].append(data)
    return sent


class Recorder(udpx.ConnProtocol):
    """Keeps what its connection received; the listener's opening state as connections open."""

    got: dict[tuple[str, int], list[bytes]]
    held_seen: list[int]
    listener: udpx.Listener | None
    done: asyncio.Event

    def connection_made(self, conn: udpx.UDPConn) -> None:
        self.remote = conn.remote_addr
        self.got[self.remote] = []
        if len(self.got) % 50 == 0 and self.listener is not None:
            self.held_seen.append(self.listener.describe(max_conns=0)["opening_held"])

    def datagrams_received(self, datagrams: list[bytes]) -> None:
        self.got[self.remote].extend(datagrams)
        if sum(map(len, self.got.values())) == TOTAL:
            self.done.set()


@dataclass
class Flooded:
    sent: dict[tuple[str, int], list[bytes]]
    got: dict[tuple[str, int], list[bytes]]
    #: describe()["opening_held"] as every 50th connection was made.
    held_seen: list[int]
    stats: udpx.ListenerStats
    description: dict[str, Any]


async def flood_protocol_listener(clients: list[socket.socket], **options: Any) -> Flooded:
    """Flood a protocol-mode listener (8 MiB buffer, ``options``) from ``clients`` (see
    ``flood``); what was sent and received, once every datagram arrived."""
    got: dict[tuple[str, int], list[bytes]] = {}
    held_seen: list[int] = []
    done = asyncio.Event()
    holder: list[udpx.Listener] = []

    def factory() -> Recorder:
        protocol = Recorder()
        protocol.got, protocol.held_seen, protocol.done = got, held_seen, done
        protocol.listener = holder[0] if holder else None
        return protocol

    async with udpx.listen("127.0.0.1", 0, protocol_factory=factory, rcvbuf=8 * 2**20,
                           **options) as ln:
        holder.append(ln)
        sent = flood(clients, ln.local_addr)
        await asyncio.wait_for(done.wait(), 10)
        return Flooded(sent, got, held_seen, ln.stats, ln.describe(max_conns=0))


@pytest.mark.parametrize("engine", ["mmsg", "transport"])
def test_protocol_mode_flood_of_new_peers_opens_all_in_order(
        run: Runner[Any], clients: list[socket.socket], engine: str) -> None:
    flooded = run(flood_protocol_listener(clients, engine=engine))
    # Every peer's datagrams, in its order, to its connection.
    assert flooded.got == flooded.sent
    if engine == "mmsg":
        # One wake-up read the whole flood: connections past the iteration's share were
        # opened later, while their datagrams were held.
        assert max(flooded.held_seen) > 0, flooded.held_seen
    else:
        assert max(flooded.held_seen) == 0, flooded.held_seen  # opened as the loop hands them
    assert flooded.description["opening_held"] == 0
    stats = flooded.stats
    assert stats.rx_packets == TOTAL and stats.conns == stats.accepted == PEERS
    assert not any(stats.drops.values()), stats.drops


def test_task_mode_flood_of_new_peers_opens_all_in_order(
        run: Runner[Any], clients: list[socket.socket]) -> None:
    async def main() -> None:
        async with udpx.listen("127.0.0.1", 0, rcvbuf=8 * 2**20, backlog=2 * PEERS) as ln:
            sent = flood(clients, ln.local_addr)
            got: dict[tuple[str, int], list[bytes]] = {}
            conns: list[udpx.UDPConn] = []
            held_seen: list[int] = []
            while len(conns) < PEERS:
                # (The run is bounded in time as a whole: no wait_for here, whose task would
                # return a loop iteration later, when nothing may be held any more.)
                conns.append(await ln.accept())
                held_seen.append(ln.describe(max_conns=0)["opening_held"])
            assert max(held_seen) > 0, held_seen
            for conn in conns:
                count = len(sent[conn.remote_addr])
                got[conn.remote_addr] = [await asyncio.wait_for(conn.recv(), 10)
                                         for _ in range(count)]
            assert got == sent
            stats = ln.stats
            assert stats.rx_packets == TOTAL and not any(stats.drops.values()), stats

    run(main())


def test_closing_while_datagrams_are_held_counts_them(
        run: Runner[Any], clients: list[socket.socket]) -> None:
    """A callback closes the listener while datagrams wait for their connections: they are
    counted as ``closed``, with every other datagram delivered or counted; nothing raises."""
    opened: list[udpx.UDPConn] = []
    holder: list[udpx.Listener] = []
    at_close: list[Any] = []

    class Closer(udpx.ConnProtocol):
        def connection_made(self, conn: udpx.UDPConn) -> None:
            opened.append(conn)
            if len(opened) == OPEN_PER_TURN + 10:  # opened in a later iteration
                ln = holder[0]
                ln.close()
                # What was held is dropped at once, counted.
                at_close.append((ln.describe(max_conns=0)["opening_held"],
                                 ln.stats.drops["closed"]))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        ln = await udpx.listen("127.0.0.1", 0, protocol_factory=Closer, rcvbuf=8 * 2**20)
        holder.append(ln)
        flood(clients, ln.local_addr)
        await asyncio.wait_for(ln.wait_closed(), 10)
        stats = ln.stats
        assert len(opened) == OPEN_PER_TURN + 10
        assert at_close[0][0] == 0 and at_close[0][1] > 0, at_close
        assert stats.drops["closed"] > 0
        assert stats.rx_packets + sum(stats.drops.values()) == TOTAL, stats
        assert ln.describe(max_conns=0)["opening_held"] == 0
        assert not errors, errors

    run(main())


def test_what_is_held_is_bounded_by_half_the_memory_budget(
        run: Runner[Any], clients: list[socket.socket]) -> None:
    """Once half of ``rx_memory_limit`` is held, the listener stops reading until a quarter is
    left: the kernel's buffer holds what arrives meanwhile. Nothing is lost or reordered."""
    budget = 8 * 1024
    flooded = run(flood_protocol_listener(clients, rx_memory_limit=budget))
    assert flooded.got == flooded.sent
    # Each held datagram costs its payload (3-5 bytes) plus 48: reading stops past half the
    # budget, once the batch being read is held (64 datagrams at most).
    assert 0 < max(flooded.held_seen) <= budget // 2 // DATAGRAM_OVERHEAD + 64, flooded.held_seen
    stats = flooded.stats
    assert stats.rx_packets == TOTAL and not any(stats.drops.values()), stats.drops
