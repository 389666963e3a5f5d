"""Tests that need a network namespace of their own: a slow qdisc on ``lo`` (EAGAIN on send
while ICMP errors come back), IPv6 link-local addresses with a scope, a host with several
addresses per family behind a veth link.

Each scenario runs in a child process inside the namespace (tests/netns_scenarios.py) on the
loop kind under test and reports JSON. Traffic stays on the namespace's loopback interface.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import NetNS

SCENARIOS = Path(__file__).with_name("netns_scenarios.py")


def run_scenario(netns: NetNS, scenario: str, loop_kind: str, *args: str) -> dict[str, Any]:
    """Run one scenario of netns_scenarios.py inside ``netns``; its JSON result."""
    done = netns.python(SCENARIOS, scenario, loop_kind, *args)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise AssertionError(f"{scenario} on {loop_kind} exited with {done.returncode}:\n"
                             f"{done.stderr.strip()}\n{done.stdout.strip()}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@contextlib.contextmanager
def background_scenario(netns: NetNS, scenario: str, loop_kind: str, *args: str,
                        ) -> Iterator[tuple[Callable[[], dict[str, Any]], int]]:
    """Start a serving scenario of netns_scenarios.py inside ``netns``: yields a function that
    closes its stdin and returns its final JSON, and the port it printed first. Killed at exit
    if still running."""
    process = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, sys.executable, str(SCENARIOS), scenario,
         loop_kind, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdin is not None
        stdout, stdin = process.stdout, process.stdin
        port = int(json.loads(stdout.readline())["port"])

        def finish() -> dict[str, Any]:
            stdin.close()
            result: dict[str, Any] = json.loads(stdout.readline())
            return result

        yield finish, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def test_dialed_conn_keeps_reading_after_icmp_errors_while_writer_waits(
        netns: NetNS, loop_kind: str) -> None:
    """ICMP errors that arrive while the writer waits for writability (add_writer after
    EAGAIN) must not stop the reader.

    uvloop reports the POLLERR of an ICMP error as a fatal error of the fd's poll handle: it
    runs the read callback (whose error handler re-registers the reader: udpx's
    ``BatchReader._handle_error``), then sets the handle's reader to None, wiping the new
    registration, since the pending writer kept the same poll handle alive.

    Observed at a472594 (1 Mbit/s tbf on lo, sndbuf=4096, 1,500 x 1,000 B; the writer blocked
    2-25 times, 20-50 ICMP errors came back before the peer sent):
    asyncio: all 5 datagrams, after recv() raised ConnectionRefusedError ~30 times; ~1 s.
    uvloop: 0 of 5 within 5 s, all 5 still queued in the kernel socket (FIONREAD > 0; the
    scenario reads them back with a plain non-blocking recv); ~5.7 s.
    """
    if shutil.which("tc") is None:
        pytest.skip("the tc tool (iproute2) is not installed")
    # A slow lo: a socket with a small send buffer meets EAGAIN at once (its datagrams sit in
    # the qdisc, charged to the socket), and the port-unreachable errors come back meanwhile.
    netns.run("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit",
              "burst", "32kbit", "latency", "400ms")
    result = run_scenario(netns, "deaf_after_icmp", loop_kind, "1500", "1000", "4096")
    assert result["blocked"] > 0, f"the writer never met EAGAIN: {result}"
    assert result["icmp_in_dest_unreachs"] > 0 and result["icmp_reported"], (
        f"no ICMP error reached the socket: {result}")
    assert result["received"] == result["expected"], (
        f"recv() got {len(result['received'])} of 5 datagrams in {result['waited']} s, "
        f"{result['left_in_kernel']} left unread in the kernel socket: {result}")


def test_transport_engine_pauses_the_writer_and_loses_nothing(netns: NetNS,
                                                              loop_kind: str) -> None:
    """The loop-transport engine under real EAGAIN (a 4 Mbit/s tbf on the namespace's lo, a
    small send buffer): the loop's transport buffers, tells udpx to pause, udpx's transmit
    queue fills and send_many() waits; all 1,000 datagrams arrive in order."""
    if shutil.which("tc") is None:
        pytest.skip("the tc tool (iproute2) is not installed")
    netns.run("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "4mbit",
              "burst", "32kbit", "latency", "400ms")
    result = run_scenario(netns, "transport_backpressure", loop_kind, "1000", "400", "4096")
    assert result["describe"]["engine"] == "transport", result
    assert result["in_order"] and result["received"] == 1000, result
    assert result["paused"] > 0, f"the transport never paused the writer: {result}"


def test_transport_engine_sends_empty_datagrams_in_order_under_eagain(
        netns: NetNS, loop_kind: str) -> None:
    """An empty datagram goes past the loop's transport (which would skip it), and only once
    the transport holds nothing queued before it; meeting EAGAIN, the writer tries again
    shortly. Before, EAGAIN on an empty datagram made the writer call add_writer() on the
    transport's socket, which the loop refuses: nothing more was ever sent and close hung."""
    if shutil.which("tc") is None:
        pytest.skip("the tc tool (iproute2) is not installed")
    netns.run("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "4mbit",
              "burst", "32kbit", "latency", "400ms")
    result = run_scenario(netns, "transport_backpressure", loop_kind, "300", "400", "4096",
                          "7")
    assert result["in_order"] and result["received"] == 300, result
    assert result["tx_packets"] == 300, result
    assert result["paused"] > 0, f"the writer never met a full socket: {result}"


def test_drop_in_endpoint_pauses_its_protocol_and_loses_nothing(netns: NetNS,
                                                                loop_kind: str) -> None:
    """The drop-in endpoint under real EAGAIN (the same slow lo): its write buffer passes the
    high mark, the protocol is told pause_writing and later resume_writing, and all 1,000
    datagrams arrive, in order, none dropped by udpx."""
    if shutil.which("tc") is None:
        pytest.skip("the tc tool (iproute2) is not installed")
    netns.run("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "4mbit",
              "burst", "32kbit", "latency", "400ms")
    result = run_scenario(netns, "endpoint_backpressure", loop_kind, "1000", "400", "4096")
    assert result["in_order"] and result["received"] == 1000, result
    assert result["writer_waits"] > 0, f"the kernel never refused: {result}"
    assert result["paused"] > 0 and result["resumed"] == result["paused"], result
    assert result["drops"]["tx_queue_full"] == 0 and result["drops"]["send_error"] == 0, result


def test_ipv6_link_local_listen_and_dial_keep_the_scope(netns: NetNS, loop_kind: str) -> None:
    """``listen("fe80::1%lo", 0)`` and ``dial`` to it work, with the interface's scope id.

    udpx resolves scoped hosts through ``loop.getaddrinfo``; uvloop's returns the address with
    scope id 0, and binding a link-local address without a scope fails.

    Observed at a472594: asyncio passes; uvloop: listen() raises OSError(22, 'Invalid
    argument'). Each run takes well under a second.
    """
    # Link-local on lo (the kernel skips duplicate address detection on lo, so the address is
    # usable at once; "nodad" says so for other devices too). Traffic stays on the
    # namespace's lo.
    netns.ip("-6", "addr", "add", "fe80::1/64", "dev", "lo", "nodad")
    result = run_scenario(netns, "link_local", loop_kind, "lo")
    assert "error" not in result, result["error"]
    scope_id = result["scope_id"]
    assert scope_id == 1  # lo's index in a fresh namespace; also what if_nametoindex says there
    port = result["listener_local"][1]
    assert result["listener_local"] == ["fe80::1", port, 0, scope_id]
    assert result["dialed_remote"] == ["fe80::1", port, 0, scope_id]
    assert result["dialed_local"][0] == "fe80::1" and result["dialed_local"][3] == scope_id
    assert result["accepted_remote"] == result["dialed_local"]
    assert (result["to_listener"], result["to_dialer"]) == ("ping", "pong")


def test_wildcard_listener_on_a_host_with_two_addresses_per_family(
        netns_factory: Callable[[], NetNS], loop_kind: str) -> None:
    """A server namespace with two IPv4 and two IPv6 addresses on a veth link to a client
    namespace; a listener on every address (dual-stack ``::``) answers the client at each of
    the four from the address it dialed (the client's connected sockets drop anything else),
    and each connection's ``local_addr`` is that address."""
    server_ns, client_ns = netns_factory(), netns_factory()
    server_ns.ip("link", "add", "srv0", "type", "veth", "peer", "name", "cli0", "netns",
                 client_ns.name)
    for namespace, device, v4, v6 in ((server_ns, "srv0", ("10.200.0.1", "10.200.0.2"),
                                       ("fd00:200::1", "fd00:200::2")),
                                      (client_ns, "cli0", ("10.200.0.10",),
                                       ("fd00:200::10",))):
        for address in v4:
            namespace.ip("addr", "add", f"{address}/24", "dev", device)
        for address in v6:
            namespace.ip("-6", "addr", "add", f"{address}/64", "dev", device, "nodad")
        namespace.ip("link", "set", device, "up")
    with background_scenario(server_ns, "wildcard_echo", loop_kind, "20") as (server, port):
        targets = ["10.200.0.1", "10.200.0.2", "fd00:200::1", "fd00:200::2"]
        result = run_scenario(client_ns, "dial_each", loop_kind, str(port), *targets)
        served = server()
    expected_local = {"10.200.0.1": "::ffff:10.200.0.1", "10.200.0.2": "::ffff:10.200.0.2",
                      "fd00:200::1": "fd00:200::1", "fd00:200::2": "fd00:200::2"}
    assert result["replies"] == {target: f"{target}|{expected_local[target]}"
                                 for target in targets}, result
    assert sorted(local[0] for _, local in served["conns"]) == sorted(expected_local.values())


def test_dont_fragment_learns_the_path_mtu_from_a_router(
        netns_factory: Callable[[], NetNS], loop_kind: str) -> None:
    """Client, router and server namespaces; the router's link to the server has a 1,280-byte
    MTU. A dialed connection with dont_fragment sends 1,400 bytes: the router drops it and
    answers with ICMP "fragmentation needed" (MTU 1280), which sets ``conn.path_mtu`` (counted,
    not raised); a 1,400-byte send then raises MessageTooLong with ``.mtu == 1280``; 1,200
    bytes still cross and are echoed."""
    client, router, server = netns_factory(), netns_factory(), netns_factory()
    client.ip("link", "add", "c0", "type", "veth", "peer", "name", "r0", "netns", router.name)
    router.ip("link", "add", "r1", "type", "veth", "peer", "name", "s0", "netns", server.name)
    client.ip("addr", "add", "10.201.1.2/24", "dev", "c0")
    router.ip("addr", "add", "10.201.1.1/24", "dev", "r0")
    router.ip("addr", "add", "10.201.2.1/24", "dev", "r1")
    server.ip("addr", "add", "10.201.2.2/24", "dev", "s0")
    router.ip("link", "set", "r1", "mtu", "1280")
    server.ip("link", "set", "s0", "mtu", "1280")
    for namespace, device in ((client, "c0"), (router, "r0"), (router, "r1"), (server, "s0")):
        namespace.ip("link", "set", device, "up")
    client.ip("route", "add", "default", "via", "10.201.1.1")
    server.ip("route", "add", "default", "via", "10.201.2.1")
    router.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    with background_scenario(server, "echo_on", loop_kind, "10.201.2.2", "20") as (echo, port):
        result = run_scenario(client, "path_mtu", loop_kind, "10.201.2.2", str(port))
        echo()
    assert result["socket"]["dont_fragment"] is True, result
    assert result["path_mtu"] == 1280, result
    assert result["icmp_errors"] >= 1, result
    assert result["too_long_mtu"] == result["nowait_too_long_mtu"] == 1280, result
    assert result["echoed"] == 1200, result


@pytest.mark.parametrize("engine", ["mmsg", "transport"])
@pytest.mark.parametrize("what", ["conn", "listener"])
def test_closing_ends_a_send_waiting_for_room_at_once(netns: NetNS, loop_kind: str,
                                                       engine: str, what: str) -> None:
    """A send() waiting for room in a listener's transmit queue, which a slow link keeps full
    (an 8 kbit/s tbf on lo: one 1,400-byte datagram leaves every 1.4 s): closing its
    connection, or the listener, makes it raise ConnectionClosed at once, as the README
    says, rather than at its turn, once the queue has drained."""
    netns.run("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "8kbit",
              "burst", "2000", "limit", "1000000")
    result = run_scenario(netns, "close_while_waiting", loop_kind, engine, what)
    assert result == {"filled": True, "waited": True, "outcome": "ConnectionClosed(closed)",
                      "within_a_second": True}, result


@pytest.mark.parametrize(("listen_host", "peer_host"), [("127.0.0.1", "127.0.0.1"),
                                                        ("0.0.0.0", "127.0.0.1"),
                                                        ("::1", "::1"), ("::", "127.0.0.1")])
def test_a_listeners_connection_learns_the_local_devices_mtu(
        netns: NetNS, loop_kind: str, listen_host: str, peer_host: str) -> None:
    """Over the device's MTU with dont_fragment, the kernel refuses a datagram itself and
    queues the MTU on the error queue, on an unconnected IPv4 socket with the destination's
    port as 0: it must still reach the connection that sent it (path_mtu, one ICMP error, not
    two from a retry, also when another datagram came before it in the same batch), as it
    does a dialed one's."""
    netns.ip("-6", "addr", "add", "::1/128", "dev", "lo", "nodad", check=False)
    netns.ip("link", "set", "lo", "mtu", "1500")
    result = run_scenario(netns, "local_mtu", loop_kind, listen_host, peer_host)
    assert result == {"path_mtu": 1500, "icmp_errors": 1, "listener_icmp_errors": 1,
                      "send_error": 1, "too_long_mtu": 1500, "nowait_too_long_mtu": 1500,
                      "received": ["first", "fits"]}, result


@pytest.mark.parametrize(("listen_host", "dial_host"), [("127.0.0.1", "127.0.0.1"),
                                                        ("0.0.0.0", "127.0.0.2"),
                                                        ("::", "127.0.0.1"), ("::1", "::1")])
def test_ecn_marks_are_sent_and_counted(netns: NetNS, loop_kind: str, listen_host: str,
                                        dial_host: str) -> None:
    """conn.tos marks every datagram (a dialed socket's option, a listener's connection per
    datagram); the other side counts the codepoints as QUIC's ACK_ECN does."""
    netns.ip("-6", "addr", "add", "::1/128", "dev", "lo", "nodad", check=False)
    result = run_scenario(netns, "ecn_marks", loop_kind, listen_host, dial_host)
    assert result["server"] == {"ect0": 5, "ect1": 0, "ce": 1}, result
    assert result["listener"] == result["server"], result
    assert result["client"] == {"ect0": 0, "ect1": 3, "ce": 0}, result


def test_ce_marked_on_the_way_is_counted(netns: NetNS, loop_kind: str) -> None:
    """A router's congestion mark: an nftables rule in the namespace rewrites ECT(0) to CE on
    the way out; the listener counts CE, not ECT(0)."""
    if shutil.which("nft") is None:
        pytest.skip("the nft tool (nftables) is not installed: apt-get install nftables")
    netns.run("nft", "add", "table", "ip", "udpx_test")
    netns.run("nft", "add", "chain", "ip", "udpx_test", "out",
              "{ type filter hook output priority 0 ; }")
    netns.run("nft", "add", "rule", "ip", "udpx_test", "out", "udp", "dport", "!=", "0", "ip",
              "ecn", "ect0", "ip", "ecn", "set", "ce")
    result = run_scenario(netns, "ecn_marks", loop_kind, "127.0.0.1", "127.0.0.1")
    assert result["server"] == {"ect0": 0, "ect1": 0, "ce": 6}, result
    assert result["client"] == {"ect0": 0, "ect1": 3, "ce": 0}, result


def test_netns_fixtures_link_two_namespaces_with_veth(
        netns_factory: Callable[[], NetNS]) -> None:
    """The fixtures give separate namespaces that a veth pair can join (no traffic sent)."""
    left, right = netns_factory(), netns_factory()
    assert left.name != right.name
    left.ip("link", "add", "v-left", "type", "veth", "peer", "name", "v-right",
            "netns", right.name)
    assert "v-left" in left.ip("link", "show").stdout
    assert "v-right" in right.ip("link", "show").stdout
    assert "v-right" not in left.ip("link", "show").stdout
    for namespace in (left, right):  # each has its own lo, up
        assert "UP" in namespace.ip("link", "show", "lo").stdout.split(">")[0]
