"""Scenarios that tests/test_netns.py runs inside a network namespace of its own.

Run as ``python netns_scenarios.py SCENARIO LOOP_KIND [ARGS...]`` (under ``ip netns exec``): the
scenario runs on a new loop of LOOP_KIND ("asyncio" or "uvloop") and its result is printed as one
line of JSON on stdout, for the test to assert on. A separate process, rather than a thread that
calls setns(2), because every thread of a process must be in the namespace: uvloop and asyncio
resolve names in threads of their own.

Traffic goes only to loopback addresses of the namespace the test created.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import udpx

#: Bounds every scenario (the parent's subprocess timeout is larger).
SCENARIO_TIMEOUT = 30.0

Result = dict[str, Any]


def icmp_counter(name: str) -> int:
    """One of this namespace's ``Icmp:`` counters in /proc/net/snmp (per network namespace)."""
    with open("/proc/net/snmp") as file:
        rows = [line.split() for line in file if line.startswith("Icmp:")]
    header, values = rows[0], rows[1]
    return int(values[header.index(name)])


def drain_raw(sock: socket.socket, limit: int) -> list[bytes]:
    """Read (without blocking) what is waiting in a socket's receive queue, at most ``limit``
    datagrams; socket errors (pending ICMP reports) are skipped."""
    found: list[bytes] = []
    for _ in range(limit + 10):  # a few spare rounds for errors
        if len(found) >= limit:
            break
        try:
            found.append(sock.recv(65535, socket.MSG_DONTWAIT))
        except BlockingIOError:
            break
        except ConnectionRefusedError:
            continue
    return found


async def deaf_after_icmp(count: int, size: int, sndbuf: int) -> Result:
    """Dial a closed port of 127.0.0.1 and send ``count`` datagrams of ``size`` bytes through a
    small send buffer (the namespace's lo has a slow tbf qdisc, so the writer hits EAGAIN and
    waits in add_writer) while ICMP port-unreachable errors come back. Then a peer binds that
    port and sends 5 datagrams: how many does ``recv()`` get within 5 s?"""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    icmp_before = icmp_counter("InDestUnreachs")
    conn = await udpx.dial("127.0.0.1", port, sndbuf=sndbuf)
    writer = conn._writer
    refused_on_send = 0
    payload = bytes(size)
    for _ in range(count):
        try:
            await conn.send(payload)
        except ConnectionRefusedError:
            refused_on_send += 1

    # Wait (bounded; kernel state, so polled) until the writer has met EAGAIN and ICMP errors
    # have come back while it waits: counted by the namespace, and reported to this socket (the
    # connection holds an error for its next recv() or send()).
    wanted_icmp = 20
    deadline = loop.time() + 5.0
    while loop.time() < deadline:
        if (writer.blocked > 0 and conn._error is not None
                and icmp_counter("InDestUnreachs") - icmp_before >= wanted_icmp):
            break
        await asyncio.sleep(0.01)
    icmp_seen = icmp_counter("InDestUnreachs") - icmp_before
    icmp_reported = conn._error is not None
    blocked = writer.blocked

    replies = [b"reply %d" % index for index in range(5)]
    received: list[bytes] = []
    refused_on_recv = 0
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", port))
        for reply in replies:
            peer.sendto(reply, conn.local_addr)
        deadline = loop.time() + 5.0
        for _ in range(1000):  # each round receives a datagram, an error, or times out
            if len(received) == len(replies) or loop.time() >= deadline:
                break
            try:
                async with asyncio.timeout_at(deadline):
                    data = await conn.recv()
            except ConnectionRefusedError:
                refused_on_recv += 1
                continue
            except TimeoutError:
                break
            if data.startswith(b"reply "):  # the writer's datagrams go to the peer, not here
                received.append(data)
        waited = time.monotonic() - started
        # What recv() did not get, where it is: still in the kernel socket (the reader is not
        # registered) or nowhere.
        sock: socket.socket = conn._engine.sock  # type: ignore[union-attr]
        left_in_kernel = [data for data in drain_raw(sock, 64)
                          if data.startswith(b"reply ")]
        # Close gracefully without waiting for the rest of the queue to crawl through the slow
        # qdisc: remove it (this namespace is ours), then the queue drains at once.
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False, timeout=10)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await conn.aclose()
    return {"received": [data.decode() for data in received],
            "expected": [reply.decode() for reply in replies],
            "left_in_kernel": len(left_in_kernel), "waited": round(waited, 3),
            "refused_on_send": refused_on_send, "refused_on_recv": refused_on_recv,
            "blocked": blocked, "icmp_in_dest_unreachs": icmp_seen,
            "icmp_reported": icmp_reported, "tx_packets": conn.stats.tx_packets}


async def link_local(ifname: str) -> Result:
    """Listen on ``fe80::1%IFNAME``, dial it at the same scoped address, exchange one datagram
    each way; report the addresses (with scope ids) both sides saw."""
    host = f"fe80::1%{ifname}"
    result: Result = {"scope_id": socket.if_nametoindex(ifname)}
    try:
        ln = await udpx.listen(host, 0)
    except OSError as exc:
        result["error"] = f"listen({host!r}, 0): {exc!r}"
        return result
    async with ln:
        result["listener_local"] = list(ln.local_addr)
        try:
            conn = await udpx.dial(host, ln.local_addr[1])
        except OSError as exc:
            result["error"] = f"dial({host!r}, {ln.local_addr[1]}): {exc!r}"
            return result
        async with conn:
            result["dialed_local"] = list(conn.local_addr)
            result["dialed_remote"] = list(conn.remote_addr)
            await conn.send(b"ping")
            accepted = await ln.accept()
            result["to_listener"] = (await accepted.recv()).decode()
            result["accepted_remote"] = list(accepted.remote_addr)
            await accepted.send(b"pong")
            result["to_dialer"] = (await conn.recv()).decode()
    return result


async def transport_backpressure(count: int, size: int, sndbuf: int,
                                 empty_every: int = 0) -> Result:
    """A dialed connection on the loop-transport engine sends ``count`` datagrams into a slow
    link: the transport's buffer fills (EAGAIN), it pauses udpx's writer, ``send_many`` waits
    for room, and every datagram still arrives, in order. With ``empty_every``, every such
    datagram is empty (udpx sends those past the transport, which would skip them); the
    connection then closes, within the scenario's time bound."""
    received: list[bytes] = []
    async with udpx.listen("127.0.0.1", 0, rcvbuf=4 << 20) as ln, \
            udpx.dial("127.0.0.1", ln.local_addr[1], engine="transport", sndbuf=sndbuf,
                      tx_queue_size=64) as conn:
        datagrams = [b"" if empty_every and index % empty_every == empty_every - 1
                     else index.to_bytes(4, "big") * (size // 4) for index in range(count)]
        started = time.monotonic()
        await conn.send_many(datagrams)
        server = await ln.accept()
        while len(received) < count:
            async with asyncio.timeout(20):
                received.extend(await server.recv_many())
        writer = conn._writer
        result = {"in_order": received == datagrams, "received": len(received),
                  "first_out_of_order": _first_difference(received, datagrams),
                  "paused": writer.blocked, "seconds": round(time.monotonic() - started, 2),
                  "describe": conn.describe()["socket"]}
        async with asyncio.timeout(10):
            await conn.aclose()
        result["tx_packets"] = conn.stats.tx_packets
        return result


def _first_difference(received: list[bytes], sent: list[bytes]) -> int | None:
    """Where the received sequence first differs from the sent one (diagnostics)."""
    for index, (got, expected) in enumerate(zip(received, sent)):
        if got != expected:
            return index
    return None


class _PacedSender(asyncio.DatagramProtocol):
    """Sends while the transport lets it: stops at pause_writing, goes on at resume_writing."""

    def __init__(self) -> None:
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.paused = self.resumed = 0

    def pause_writing(self) -> None:
        self.paused += 1
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.resumed += 1
        self.can_write.set()


async def endpoint_backpressure(count: int, size: int, sndbuf: int) -> Result:
    """The drop-in endpoint sends ``count`` datagrams into a slow link, its protocol honouring
    pause_writing: the kernel refuses (EAGAIN), the write buffer passes its high mark, the
    protocol is paused and resumed, and every datagram arrives, in order."""
    received: list[bytes] = []
    async with udpx.listen("127.0.0.1", 0, rcvbuf=4 << 20) as ln:
        transport, protocol = await udpx.create_datagram_endpoint(
            _PacedSender, remote_addr=ln.local_addr, sndbuf=sndbuf)
        assert isinstance(transport, udpx.EndpointTransport)
        assert isinstance(protocol, _PacedSender)
        datagrams = [index.to_bytes(4, "big") * (size // 4) for index in range(count)]
        started = time.monotonic()
        for datagram in datagrams:
            await protocol.can_write.wait()
            transport.sendto(datagram)
        server = await ln.accept()
        while len(received) < count:
            async with asyncio.timeout(20):
                received.extend(await server.recv_many())
        stats = transport.stats
        transport.close()
        return {"in_order": received == datagrams, "received": len(received),
                "first_out_of_order": _first_difference(received, datagrams),
                "paused": protocol.paused, "resumed": protocol.resumed,
                "writer_waits": transport._writer.blocked,
                "drops": dict(stats.drops), "seconds": round(time.monotonic() - started, 2)}


async def until_stdin_closes(seconds: float) -> None:
    """Wait until the parent closes our stdin (it has what it needs), at most ``seconds``."""
    loop = asyncio.get_running_loop()
    stdin_closed: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not stdin_closed.done():
            stdin_closed.set_result(None)

    loop.add_reader(sys.stdin.fileno(), readable)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stdin_closed
    loop.remove_reader(sys.stdin.fileno())


async def wildcard_echo(seconds: float) -> Result:
    """Serve on every address (``::``, dual-stack): answer each datagram with itself, the local
    address its connection has, and whether that is where the datagram was sent (the client
    checks the reply's source). Prints the port first; stops after ``seconds`` or when stdin
    closes."""
    async with udpx.listen(None, 0) as ln:
        print(json.dumps({"port": ln.local_addr[1]}), flush=True)

        async def echo(conn: udpx.UDPConn) -> None:
            async for data in conn:
                await conn.send(data + b"|" + conn.local_addr[0].encode())

        async def serve() -> None:
            async with asyncio.TaskGroup() as group:
                async for conn in ln:
                    group.create_task(echo(conn))

        server = asyncio.create_task(serve())
        await until_stdin_closes(seconds)
        result = {"conns": sorted([list(conn.remote_addr), list(conn.local_addr)]
                                  for conn in ln.conns())}
        ln.close()
        await server
    return result


async def dial_each(port: int, *targets: str) -> Result:
    """Dial ``port`` at each target address, send one datagram, report the reply (or None)."""
    replies: dict[str, Any] = {}
    for target in targets:
        async with udpx.dial(target, port) as conn:
            await conn.send(target.encode())
            try:
                async with asyncio.timeout(3):
                    replies[target] = (await conn.recv()).decode()
            except TimeoutError:
                replies[target] = None
    return {"replies": replies}


async def path_mtu(host: str, port: int) -> Result:
    """Dial ``host``/``port`` with dont_fragment across a router whose far link has a smaller
    MTU: a datagram too big for it comes back as the router's ICMP, which sets path_mtu; a
    send above it then raises MessageTooLong; one below it is echoed."""
    result: Result = {}
    async with udpx.dial(host, port, dont_fragment=True) as conn:
        result["socket"] = conn.describe()["socket"]
        await conn.send(bytes(1400))
        for _ in range(300):  # the ICMP comes back within milliseconds; bounded at 3 s
            if conn.path_mtu is not None:
                break
            await asyncio.sleep(0.01)
        result["path_mtu"] = conn.path_mtu
        result["icmp_errors"] = conn.stats.icmp_errors
        try:
            await conn.send(bytes(1400))
        except udpx.MessageTooLong as exc:
            result["too_long_mtu"] = exc.mtu
        try:  # (the quick path of a connection that has sent)
            conn.send_nowait(bytes(1400))
        except udpx.MessageTooLong as exc:
            result["nowait_too_long_mtu"] = exc.mtu
        await conn.send(b"x" * 1200)
        async with asyncio.timeout(5):
            result["echoed"] = len(await conn.recv())
    return result


async def close_while_waiting(engine: str, what: str) -> Result:
    """A send() waits for room in a listener's full transmit queue (a slow tbf on lo keeps the
    writer blocked on EAGAIN); its connection (``what``: "conn") or the listener ("listener")
    is closed: the send raises ConnectionClosed at once, not when the queue has drained."""
    ln = await udpx.listen("127.0.0.1", 0, tx_queue_size=4, sndbuf=4096, engine=engine)
    with contextlib.ExitStack() as stack:
        peers = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                 for _ in range(2)]
        conns = {}
        for peer in peers:
            peer.bind(("127.0.0.1", 0))
            peer.sendto(b"hi", ln.local_addr)
        for _ in peers:
            conn = await asyncio.wait_for(ln.accept(), 5)
            conns[conn.remote_addr[1]] = conn
        busy, closing = (conns[peer.getsockname()[1]] for peer in peers)
        full = 0
        for _ in range(10_000):  # until the kernel's buffer and then the queue stay full
            try:
                busy.send_nowait(bytes(1400))
                full = 0
            except udpx.QueueFull:
                full += 1
                if full == 20:  # 20 loop iterations without room: the writer is blocked
                    break
            await asyncio.sleep(0)
        waiting = asyncio.create_task(closing.send(b"waiting"))
        for _ in range(10):
            await asyncio.sleep(0)
        result: Result = {"filled": full == 20, "waited": not waiting.done()}
        started = time.monotonic()
        if what == "conn":
            closing.close()
        else:
            ln.close()
        try:
            async with asyncio.timeout(5):
                await waiting
            result["outcome"] = "sent"
        except udpx.ConnectionClosed as exc:
            result["outcome"] = f"ConnectionClosed({exc.reason})"
        except TimeoutError:
            result["outcome"] = "still waiting"
        result["within_a_second"] = time.monotonic() - started < 1
        ln.close()  # (its queue drains at the link's pace, after this scenario)
    return result


async def local_mtu(listen_host: str, peer_host: str) -> Result:
    """A listener's connection with dont_fragment sends more than the device's MTU (lo set
    to 1,500 by the test): the kernel refuses it itself (EMSGSIZE with the MTU on the error
    queue, with port 0 on IPv4): the connection learns path_mtu, counts one ICMP error, and a
    second such send raises MessageTooLong."""
    family = socket.AF_INET6 if ":" in peer_host else socket.AF_INET
    async with udpx.listen(listen_host, 0, dont_fragment=True, max_datagram=4000) as ln:
        with socket.socket(family, socket.SOCK_DGRAM) as peer:
            peer.bind((peer_host, 0))
            peer.sendto(b"hi", (peer_host, ln.local_addr[1]))
            conn = await asyncio.wait_for(ln.accept(), 5)
            # Behind another datagram, in the same batch: sendmmsg sends that one, stops at
            # this one (its error queued), and the writer's next call fails on it again.
            conn.send_nowait(b"first")
            await conn.send(bytes(2000))
            for _ in range(300):  # the writer's next drain; bounded at 3 s
                if conn.stats.drops["send_error"]:
                    break
                await asyncio.sleep(0.01)
            result: Result = {"path_mtu": conn.path_mtu, "icmp_errors": conn.stats.icmp_errors,
                              "listener_icmp_errors": ln.stats.icmp_errors,
                              "send_error": conn.stats.drops["send_error"]}
            try:
                await conn.send(bytes(2000))
            except udpx.MessageTooLong as exc:
                result["too_long_mtu"] = exc.mtu
            try:
                conn.send_many_nowait([bytes(2000)])
            except udpx.MessageTooLong as exc:
                result["nowait_too_long_mtu"] = exc.mtu
            await conn.send(b"fits")
            peer.setblocking(False)
            received = []
            for _ in range(2):
                async with asyncio.timeout(5):
                    received.append(
                        (await asyncio.get_running_loop().sock_recv(peer, 100)).decode())
            result["received"] = received
    return result


async def echo_on(host: str, seconds: float) -> Result:
    """Echo on ``host`` (port printed first) until stdin closes or ``seconds`` passed."""
    async with udpx.listen(host, 0) as ln:
        print(json.dumps({"port": ln.local_addr[1]}), flush=True)

        async def serve() -> None:
            async for conn in ln:
                async for data in conn:
                    await conn.send(data)

        server = asyncio.create_task(serve())
        await until_stdin_closes(seconds)
        result = {"received": ln.stats.rx_packets}
        ln.close()
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server
    return result


async def ecn_marks(listen_host: str, dial_host: str) -> Result:
    """Datagrams marked with conn.tos both ways; what each side counted (``ecn=True``)."""
    async with udpx.listen(listen_host, 0, ecn=True) as ln, \
            udpx.dial(dial_host, ln.local_addr[1], ecn=True) as client:
        client.tos = 0xB8 | 2  # DSCP EF, ECT(0)
        await client.send_many([b"ect0"] * 5)
        server = await ln.accept()
        for _ in range(5):
            await server.recv()
        server.tos = 1  # ECT(1)
        await server.send_many([b"ect1"] * 3)
        for _ in range(3):
            await client.recv()
        client.tos = 3  # CE, as a sender never marks it: the test's stand-in for a router
        await client.send(b"ce")
        await server.recv()
        return {"server": dict(server.stats.ecn), "listener": dict(ln.stats.ecn),
                "client": dict(client.stats.ecn)}


SCENARIOS: dict[str, Callable[[list[str]], Coroutine[Any, Any, Result]]] = {
    "ecn_marks": lambda args: ecn_marks(args[0], args[1]),
    "path_mtu": lambda args: path_mtu(args[0], int(args[1])),
    "local_mtu": lambda args: local_mtu(args[0], args[1]),
    "close_while_waiting": lambda args: close_while_waiting(args[0], args[1]),
    "echo_on": lambda args: echo_on(args[0], float(args[1])),
    "wildcard_echo": lambda args: wildcard_echo(float(args[0])),
    "dial_each": lambda args: dial_each(int(args[0]), *args[1:]),
    "transport_backpressure": lambda args: transport_backpressure(
        int(args[0]), int(args[1]), int(args[2]), *map(int, args[3:])),
    "endpoint_backpressure": lambda args: endpoint_backpressure(
        int(args[0]), int(args[1]), int(args[2])),
    "deaf_after_icmp": lambda args: deaf_after_icmp(int(args[0]), int(args[1]), int(args[2])),
    "link_local": lambda args: link_local(args[0]),
}


#: Scenarios that check the order datagrams arrive in. On loopback with a qdisc, a datagram the
#: qdisc holds back is sent on by its watchdog, and lands in the receive backlog of the CPU that
#: runs it: with the process on two CPUs, two datagrams can cross in the kernel, whatever order
#: udpx sent them in (seen once in CI). Pinned to one CPU, the whole path is on one backlog, so
#: the order received is the order udpx handed them to the kernel, which is what is tested.
_ONE_CPU = frozenset({"transport_backpressure", "endpoint_backpressure"})


def main(argv: list[str]) -> None:
    scenario, loop_kind, args = argv[0], argv[1], argv[2:]
    if scenario in _ONE_CPU and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if loop_kind == "uvloop":
        import uvloop  # noqa: PLC0415 - only where asked for
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(asyncio.wait_for(SCENARIOS[scenario](args), SCENARIO_TIMEOUT))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
