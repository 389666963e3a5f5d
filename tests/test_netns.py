"""Regression tests that need a network namespace of their own: a slow qdisc on ``lo`` (EAGAIN
on send while ICMP errors come back), IPv6 link-local addresses with a scope.

Each scenario runs in a child process inside the namespace (tests/netns_scenarios.py) on the
loop kind under test and reports JSON. Traffic stays on the namespace's loopback interface.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
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
