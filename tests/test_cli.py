"""The command line, ``python -m udpx``: perf and echo run as real subprocesses, over loopback.

Every wait is bounded; the tests synchronise on the programs' output (the echo server's
"listening on HOST:PORT" line), never on sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, Literal, overload

import pytest

from udpx.__main__ import main
from udpx._perf import DEFAULT_PEERS, PerfConfig, perf_runs, raw_packets

from .conftest import HAVE_IPV6, free_udp_port, setpriv_dropping

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None  # type: ignore[assignment]

PYTHON = sys.executable
#: Generous: a perf run of 0.5 s takes about 2 s (the child's spawn and imports included).
PERF_TIMEOUT = 90.0
ECHO_TIMEOUT = 15.0

LOOPS = [
    "asyncio",
    pytest.param("uvloop", marks=pytest.mark.skipif(uvloop is None,
                                                    reason="uvloop is not installed")),
]
HOSTS = [
    "127.0.0.1",
    pytest.param("::1", marks=pytest.mark.skipif(not HAVE_IPV6, reason="no IPv6 loopback")),
]
DROP_REASONS = {"rx_queue_full", "truncated", "send_error", "backlog_full", "conn_limit",
                "kernel"}


def udpx_command(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "udpx", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


# -- help and argument errors ----------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    result = udpx_command("--help", timeout=30)
    assert result.returncode == 0, result.stderr
    assert "perf" in result.stdout
    assert "echo" in result.stdout


def test_perf_help_describes_the_options() -> None:
    result = udpx_command("perf", "--help", timeout=30)
    assert result.returncode == 0, result.stderr
    for option in ("--duration", "--size", "--clients", "--loop", "--batch-size", "--host",
                   "--compare", "--json"):
        assert option in result.stdout


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["perf", "--duration", "0"],
    ["perf", "--duration", "-1"],
    ["perf", "--duration", "nan"],
    ["perf", "--size", "-1"],
    ["perf", "--size", "65508"],  # over IPv4's limit
    ["perf", "--clients", "0"],
    ["perf", "--batch-size", "1025"],
    ["perf", "--loop", "trio"],
    ["perf", "--host", "10.0.0.1"],
    ["echo", "127.0.0.1"],
    ["echo", "127.0.0.1", "port"],
    ["echo", "127.0.0.1", "65536"],
    ["bogus"],
    ["perf", "--workers", "0"],
    ["perf", "--workers", "2", "--compare"],
    ["echo", "127.0.0.1", "9000", "--workers", "two"],
    ["echo", "127.0.0.1", "0", "--workers", "2"],  # each worker would get another port
])
def test_bad_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(args)
    assert raised.value.code == 2
    assert "error" in capsys.readouterr().err


# -- perf ------------------------------------------------------------------------------------


def run_perf(*args: str) -> dict[str, Any]:
    result = udpx_command("perf", "--json", *args, timeout=PERF_TIMEOUT)
    assert result.returncode == 0, result.stderr
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


def check_measurement(result: dict[str, Any], *, size: int) -> None:
    sender = result["sender"]
    received = result["received"]
    assert sender["kind"] in ("peers", "gso", "udpx")
    assert 0 < received["datagrams"] <= sender["sent"] <= sender["queued"]
    assert received["bytes"] == received["datagrams"] * size
    assert sender["sent_bytes"] == sender["sent"] * size
    assert sender["elapsed"] > 0
    assert received["elapsed"] > 0
    assert received["datagrams_per_s"] > 0
    assert received["mbit_per_s"] >= 0
    assert received["cpu_seconds"] >= 0
    assert received["cpu_percent"] >= 0
    assert received["cpu_us_per_datagram"] == pytest.approx(
        1e6 * received["cpu_seconds"] / received["datagrams"])
    assert result["loss"]["datagrams"] == sender["sent"] - received["datagrams"]
    assert 0 <= result["loss"]["percent"] < 100


@pytest.mark.parametrize("loop", LOOPS)
def test_perf_json(loop: str) -> None:
    # Without --sender: what most peers send first (each datagram alone, from many peers),
    # the udpx-to-udpx best case (GSO) beside it.
    summary = run_perf("--duration", "0.5", "--loop", loop)
    assert summary["cpu_count"] == os.cpu_count()
    assert summary["config"]["loop"] == loop
    assert summary["config"]["size"] == 64
    runs = summary["runs"]
    assert [(run["sender"], run["clients"]) for run in runs] == [("peers", DEFAULT_PEERS),
                                                                 ("udpx", 1)]
    assert summary["udpx"] == runs[0]["udpx"]
    assert summary["compare"] == []
    assert summary["ratios"] == {}
    for run in runs:
        assert run["compare"] == [] and run["ratios"] == run["cpu_ratios"] == {}
        result = run["udpx"]
        assert result["receiver"] == "udpx"
        assert result["loop"] == loop
        assert result["sender"]["kind"] == run["sender"]
        # Every peer sent in every turn of a 0.5 s run: each has its connection.
        assert result["connections"] == run["clients"]
        check_measurement(result, size=64)
        drops = result["drops"]
        assert set(drops) >= DROP_REASONS
        # Every datagram the kernel took from the sender was received or counted as dropped
        # by the listener (datagrams lost between the two sockets would not be counted): the
        # counted drops never exceed the loss.
        assert sum(drops.values()) <= result["loss"]["datagrams"]
        assert drops["truncated"] == drops["backlog_full"] == drops["conn_limit"] == 0


def test_perf_runs_of_a_config() -> None:
    runs = perf_runs(PerfConfig())
    assert [(run.sender, run.clients) for run in runs] == [("peers", DEFAULT_PEERS), ("udpx", 1)]
    runs = perf_runs(PerfConfig(workers=3))
    assert [(run.sender, run.clients) for run in runs] == [("peers", DEFAULT_PEERS), ("udpx", 3)]
    runs = perf_runs(PerfConfig(clients=5))
    assert [(run.sender, run.clients) for run in runs] == [("peers", 5), ("udpx", 5)]
    runs = perf_runs(PerfConfig(sender="gso"))
    assert [(run.sender, run.clients) for run in runs] == [("gso", 1)]
    with pytest.raises(ValueError, match="sender must be one of peers, udpx, gso, got 'x'"):
        perf_runs(PerfConfig(sender="x"))
    with pytest.raises(ValueError, match="mode must be one of task, protocol, got 'x'"):
        perf_runs(PerfConfig(mode="x"))


def test_raw_packets_are_ipv4_udp_from_one_port_per_peer() -> None:
    port = 1026  # among the source ports: skipped
    packets = raw_packets("127.0.0.1", port, 10, 4)
    assert len(packets) == 4
    sources = []
    for packet in packets:
        assert len(packet) == 20 + 8 + 10
        assert packet[0] == 0x45 and packet[9] == socket.IPPROTO_UDP
        assert int.from_bytes(packet[2:4], "big") == 38
        assert packet[12:16] == packet[16:20] == socket.inet_aton("127.0.0.1")
        sources.append(int.from_bytes(packet[20:22], "big"))
        assert int.from_bytes(packet[22:24], "big") == port
        assert int.from_bytes(packet[24:26], "big") == 18  # UDP length
        assert packet[26:28] == b"\0\0"  # no checksum
        assert packet[28:] == b"x" * 10
    assert sources == [1024, 1025, 1027, 1028]
    with pytest.raises(ValueError, match="do not fit"):
        raw_packets("127.0.0.1", port, 10, 65000)


@pytest.mark.parametrize("host", HOSTS)
def test_perf_peers_sender(host: str) -> None:
    # Over IPv4 a raw socket where this process may open one (root in CI), else, and over
    # IPv6, one socket per peer: either way each peer's datagrams arrive one by one, from its
    # own port, and the listener has a connection per peer.
    summary = run_perf("--duration", "0.5", "--sender", "peers", "--clients", "50", "--size",
                       "100", "--host", host)
    assert [run["sender"] for run in summary["runs"]] == ["peers"]
    result = summary["udpx"]
    assert result["sender"]["kind"] == "peers"
    assert result["connections"] == 50
    check_measurement(result, size=100)
    note = result["sender"]["note"]
    if host == "::1":
        assert note.startswith("one send() per datagram over 50 sockets")
    else:
        assert note.startswith(("raw socket, 50 source ports", "one send() per datagram over "
                                                               "50 sockets (no raw socket"))


@pytest.mark.parametrize("host", HOSTS)
def test_perf_udpx_sender_several_clients(host: str) -> None:
    summary = run_perf("--duration", "0.5", "--sender", "udpx", "--clients", "3", "--size",
                       "1200", "--host", host)
    result = summary["udpx"]
    assert result["sender"]["kind"] == "udpx"
    assert result["connections"] == 3
    check_measurement(result, size=1200)


@pytest.mark.parametrize("loop", LOOPS)
def test_perf_protocol_mode(loop: str) -> None:
    summary = run_perf("--duration", "0.5", "--mode", "protocol", "--clients", "20", "--loop",
                       loop)
    assert summary["config"]["mode"] == "protocol"
    assert [run["sender"] for run in summary["runs"]] == ["peers", "udpx"]
    for run in summary["runs"]:
        result = run["udpx"]
        assert result["receiver"] == "udpx protocol mode"
        assert result["connections"] == 20
        check_measurement(result, size=64)


def test_perf_workers_reports_each_workers_share() -> None:
    summary = run_perf("--duration", "0.3", "--workers", "2", "--clients", "8")
    assert summary["config"]["workers"] == 2
    result = summary["udpx"]
    check_measurement(result, size=64)
    workers = result["workers"]
    assert [worker["worker"] for worker in workers] == [0, 1]
    assert sum(worker["peers"] for worker in workers) == result["connections"] == 8
    assert sum(worker["datagrams"] for worker in workers) == result["received"]["datagrams"]
    assert sum(worker["datagrams_per_s"] for worker in workers) == pytest.approx(
        result["received"]["datagrams_per_s"])
    assert run_perf("--duration", "0.3")["udpx"]["workers"] == []


def test_perf_compare_runs_the_same_sender_against_the_baselines() -> None:
    summary = run_perf("--duration", "0.3", "--compare", "--loop", "asyncio")
    expected = ["udpx", "asyncio DatagramProtocol"] + (
        ["uvloop DatagramProtocol"] if uvloop is not None else [])
    assert [run["sender"] for run in summary["runs"]] == ["peers", "udpx"]
    assert summary["compare"] == summary["runs"][0]["compare"]
    for run in summary["runs"]:
        results = [run["udpx"], *run["compare"]]
        assert [result["receiver"] for result in results] == expected
        assert {result["sender"]["kind"] for result in results} == {run["sender"]}
        for result in results:
            check_measurement(result, size=64)
        assert set(run["ratios"]) == set(run["cpu_ratios"]) == set(expected[1:])
        udpx_received = run["udpx"]["received"]
        for name, ratio in run["ratios"].items():
            baseline = next(result for result in results if result["receiver"] == name)
            assert ratio == pytest.approx(udpx_received["datagrams_per_s"]
                                          / baseline["received"]["datagrams_per_s"])
            assert run["cpu_ratios"][name] == pytest.approx(
                udpx_received["cpu_us_per_datagram"]
                / baseline["received"]["cpu_us_per_datagram"])


def test_perf_isolate_runs_each_receiver_in_its_own_process() -> None:
    summary = run_perf("--duration", "0.3", "--compare", "--isolate", "--sender", "udpx")
    assert summary["config"]["isolate"] is True
    results = [summary["udpx"], *summary["compare"]]
    assert len(results) == (3 if uvloop is not None else 2)
    for result in results:
        assert result["sender"]["kind"] == "udpx"
        check_measurement(result, size=64)


def test_perf_text_summary() -> None:
    result = udpx_command("perf", "--duration", "0.3", "--quiet", timeout=PERF_TIMEOUT)
    assert result.returncode == 0, result.stderr
    for word in ("datagrams/s", "Mbit/s", "loss", "drops", "kernel", "µs per datagram"):
        assert word in result.stdout
    # Both runs, the one most peers send first.
    peers = result.stdout.index(f"{DEFAULT_PEERS:,} peers, each sending one datagram at a time")
    assert peers < result.stdout.index("the udpx-to-udpx best case")
    assert result.stderr == ""  # --quiet: no progress lines


# -- echo ------------------------------------------------------------------------------------


class EchoServer:
    """``python -m udpx echo HOST 0`` as a subprocess; ``address`` once it is listening."""

    def __init__(self, host: str, *args: str) -> None:
        self.process = subprocess.Popen([PYTHON, "-m", "udpx", "echo", host, "0", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.process.stdout is not None
        try:
            line = read_line(self.process.stdout.fileno(), ECHO_TIMEOUT)
        except BaseException:
            self.kill()
            raise
        prefix = "listening on "
        assert line.startswith(prefix), line
        address = line.removeprefix(prefix)
        host_part, _, port = address.rpartition(":")
        self.address = (host_part.strip("[]"), int(port))

    def stop(self, signum: int = signal.SIGINT) -> tuple[int, str]:
        """Send ``signum``; return the exit status and stderr."""
        self.process.send_signal(signum)
        _, stderr = self.process.communicate(timeout=ECHO_TIMEOUT)
        return self.process.returncode, stderr.decode(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=ECHO_TIMEOUT)


@overload
def read_line(fd: int, timeout: float) -> str: ...
@overload
def read_line(fd: int, timeout: float, *, all_lines: Literal[True]) -> list[str]: ...


def read_line(fd: int, timeout: float, *, all_lines: bool = False) -> str | list[str]:
    """The first line from ``fd``, waiting at most ``timeout`` seconds for it (with
    ``all_lines``: every complete line read by then). Reads unbuffered: nothing is kept for
    the next call beyond what is returned."""
    deadline = time.monotonic() + timeout
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise TimeoutError(f"no line within {timeout:.1f} s (got {data!r})")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError(f"the process closed its output (got {data!r})")
            data += chunk
    lines = data.decode().splitlines()
    return lines if all_lines else lines[0]


@pytest.fixture
def echo_server(request: pytest.FixtureRequest) -> Iterator[EchoServer]:
    host, loop = request.param
    server = EchoServer(host, "--loop", loop)
    try:
        yield server
    finally:
        server.kill()


ECHO_PARAMS = [pytest.param((host, loop), id=f"{host}-{loop}")
               for host in ("127.0.0.1", "::1") for loop in ("asyncio", "uvloop")
               if (host != "::1" or HAVE_IPV6) and (loop != "uvloop" or uvloop is not None)]


@pytest.mark.parametrize("echo_server", ECHO_PARAMS, indirect=True)
def test_echo_answers_a_plain_socket_and_stops_on_sigint(echo_server: EchoServer) -> None:
    host, port = echo_server.address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.settimeout(ECHO_TIMEOUT)
        for datagram in (b"hello", b"", b"x" * 1200, b"last"):
            client.sendto(datagram, (host, port))
            data, source = client.recvfrom(65535)
            assert data == datagram
            assert source[1] == port
    status, stderr = echo_server.stop(signal.SIGINT)
    assert status == 0, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("echo_server", ECHO_PARAMS[:1], indirect=True)
def test_echo_serves_several_clients_and_stops_on_sigterm(echo_server: EchoServer) -> None:
    host, port = echo_server.address
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5)]
    try:
        for index, client in enumerate(clients):
            client.settimeout(ECHO_TIMEOUT)
            client.sendto(b"client %d" % index, (host, port))
        for index, client in enumerate(clients):
            assert client.recv(100) == b"client %d" % index
    finally:
        for client in clients:
            client.close()
    status, stderr = echo_server.stop(signal.SIGTERM)
    assert status == 0, stderr


def test_echo_reaps_idle_connections_and_reports_counts() -> None:
    server = EchoServer("127.0.0.1", "--idle-timeout", "0.2", "--stats-interval", "0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(ECHO_TIMEOUT)
            client.sendto(b"ping", server.address)
            assert client.recv(100) == b"ping"
        # The stats lines on stderr show the connection open, then reaped (within 1.5 x the
        # idle timeout + a sweep, far less than the bound here).
        assert server.process.stderr is not None
        stderr = server.process.stderr.fileno()
        deadline = time.monotonic() + ECHO_TIMEOUT
        lines: list[str] = []
        while not any(line.startswith("udpx echo: 0 connection(s), 1 accepted")
                      for line in lines):
            lines += read_line(stderr, deadline - time.monotonic(), all_lines=True)
        status, _ = server.stop()
        assert status == 0
    finally:
        server.kill()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_echo_port_in_use_exits_1(workers: str) -> None:
    """One line and exit status 1, with several workers too (not a traceback per worker
    start and restart)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = udpx_command("echo", "127.0.0.1", str(port), "--workers", workers,
                              timeout=ECHO_TIMEOUT)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"udpx echo: error: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in "
        "use"], result.stderr
    assert result.stdout == ""


def test_echo_on_a_free_port_given_explicitly() -> None:
    port = free_udp_port()
    process = subprocess.Popen([PYTHON, "-m", "udpx", "echo", "127.0.0.1", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert read_line(process.stdout.fileno(), ECHO_TIMEOUT) == f"listening on 127.0.0.1:{port}"
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=ECHO_TIMEOUT)
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=ECHO_TIMEOUT)


def echo_workers(port: int, loop: str) -> subprocess.Popen[bytes]:
    """``python -m udpx echo`` on 127.0.0.1:``port`` with two workers."""
    return subprocess.Popen([PYTHON, "-m", "udpx", "echo", "127.0.0.1", str(port),
                             "--workers", "2", "--loop", loop],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("loop", LOOPS)
def test_echo_workers_share_the_port_and_stop_on_sigterm(loop: str) -> None:
    port = free_udp_port()
    process = echo_workers(port, loop)
    try:
        assert process.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + ECHO_TIMEOUT
        while len(lines) < 2:
            lines += read_line(process.stdout.fileno(), deadline - time.monotonic(),
                               all_lines=True)
        assert sorted(lines) == [f"listening on 127.0.0.1:{port} (worker {index})"
                                 for index in (0, 1)]
        clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
        try:
            for index, client in enumerate(clients):
                client.settimeout(ECHO_TIMEOUT)
                client.sendto(b"client %d" % index, ("127.0.0.1", port))
            for index, client in enumerate(clients):
                assert client.recv(100) == b"client %d" % index
            # SIGUSR1 to the supervisor's pid reaches every worker: one describe() line each
            # (it killed the supervisor, and the server with it: black-box pass 3).
            process.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + ECHO_TIMEOUT
            described: list[str] = []
            while len(described) < 2:
                described += read_line(process.stdout.fileno(), deadline - time.monotonic(),
                                       all_lines=True)
            snapshots = [json.loads(line) for line in described]
            assert [snapshot["local_addr"][1] for snapshot in snapshots] == [port, port]
            assert sum(len(snapshot["conns"]) for snapshot in snapshots) == len(clients)
            for index, client in enumerate(clients):  # and it still serves
                client.sendto(b"again %d" % index, ("127.0.0.1", port))
                assert client.recv(100) == b"again %d" % index
        finally:
            for client in clients:
                client.close()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=ECHO_TIMEOUT)
        assert process.returncode == 0, stderr
        text = stderr.decode()
        assert "Traceback" not in text
        assert "udpx: worker 0 started" in text and "udpx: worker 1 started" in text
        assert text.count("closed") == 2  # each worker closed its listener gracefully
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=ECHO_TIMEOUT)


def test_echo_describes_itself_on_sigusr1_and_at_exit() -> None:
    server = EchoServer("127.0.0.1", "--describe")
    try:
        assert server.process.stdout is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(ECHO_TIMEOUT)
            client.sendto(b"hello", server.address)
            assert client.recv(100) == b"hello"
            server.process.send_signal(signal.SIGUSR1)
            snapshot = json.loads(read_line(server.process.stdout.fileno(), ECHO_TIMEOUT))
            assert snapshot["local_addr"][1] == server.address[1]
            [conn] = snapshot["conns"]
            assert conn["remote_addr"][1] == client.getsockname()[1]
            assert conn["stats"]["rx_packets"] == 1
        server.process.send_signal(signal.SIGINT)
        stdout, stderr = server.process.communicate(timeout=ECHO_TIMEOUT)
        assert server.process.returncode == 0, stderr
        at_exit = json.loads(stdout.decode().splitlines()[0])
        assert at_exit["stats"]["tx_packets"] == 1
    finally:
        server.kill()


def test_perf_describe_at_exit() -> None:
    result = udpx_command("perf", "--duration", "0.3", "--quiet", "--describe",
                          timeout=PERF_TIMEOUT)
    assert result.returncode == 0, result.stderr
    snapshots = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    # One per run: the peers' listener, then the GSO sender's.
    assert len(snapshots) == 2
    assert all(snapshot["stats"]["rx_packets"] > 0 for snapshot in snapshots)
    assert snapshots[0]["stats"]["conns"] == DEFAULT_PEERS
    assert len(snapshots[1]["conns"]) == 1


@pytest.mark.parametrize("loop", LOOPS)
def test_echo_workers_survive_sigusr1_while_starting_and_stopping(loop: str) -> None:
    """SIGUSR1 to the main pid while a worker is still starting (no handler yet), and right
    after SIGTERM (the workers are closing, then run() has returned): nothing dies of it, and
    the server stops with status 0 (black-box pass 4: workers killed and restarted, and the
    main process ending with -10)."""
    process = echo_workers(free_udp_port(), loop)
    try:
        assert process.stdout is not None
        # (Every line read so far: both workers' may come in one read.)
        lines = read_line(process.stdout.fileno(), ECHO_TIMEOUT, all_lines=True)
        assert lines[0].startswith("listening on"), lines
        for _ in range(3):  # the other worker may still be starting
            process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + ECHO_TIMEOUT
        while sum(line.startswith("listening on") for line in lines) < 2:
            lines += read_line(process.stdout.fileno(), deadline - time.monotonic(),
                               all_lines=True)
        process.send_signal(signal.SIGTERM)
        for _ in range(5):
            process.send_signal(signal.SIGUSR1)
        _, stderr = process.communicate(timeout=ECHO_TIMEOUT)
        text = stderr.decode()
        assert process.returncode == 0, text
        assert "killed by SIGUSR1" not in text and "Traceback" not in text, text
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=ECHO_TIMEOUT)


def descendants(pid: int) -> set[int]:
    """The live processes below ``pid`` (from /proc: each process's parent)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found.update(children)
        todo += children
    return found


@pytest.mark.parametrize("mode", [["--workers", "2", "--clients", "4"], ["--isolate"], []],
                         ids=["workers", "isolate", "in-process"])
def test_perf_stops_on_sigterm_as_on_ctrl_c(mode: list[str]) -> None:
    """SIGTERM to perf's pid stops the measurement and every process it started, reports
    "interrupted" and exits 130, as Ctrl-C does (black-box: it ended perf alone, its workers
    then printed EOFError tracebacks)."""
    process = subprocess.Popen([PYTHON, "-m", "udpx", "perf", "--duration", "30", *mode],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Measuring: a progress line on stderr, or with workers (no progress line) the
        # describe() line a worker prints on the SIGUSR1 that perf passes on once they all
        # measure.
        workers = "--workers" in mode
        assert process.stderr is not None
        early = b""
        deadline = time.monotonic() + PERF_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(process.stderr.fileno(), selectors.EVENT_READ)
            while b"{" not in early if workers else b"datagrams/s" not in early:
                assert time.monotonic() < deadline, early
                if workers and descendants(process.pid):
                    # (Not before perf runs: SIGUSR1 ends a Python that is still starting.)
                    process.send_signal(signal.SIGUSR1)
                if selector.select(0.2):
                    chunk = os.read(process.stderr.fileno(), 65536)
                    assert chunk, early
                    early += chunk
        started = descendants(process.pid)
        assert len(started) >= (4 if workers else 2 if mode else 1), started
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=PERF_TIMEOUT)
        text = (early + stderr).decode()
        assert process.returncode == 130, text
        assert "udpx perf: interrupted" in text
        assert "Traceback" not in text, text
        deadline = time.monotonic() + ECHO_TIMEOUT
        while descendants(1) & started:  # (orphans would have been adopted by init)
            assert time.monotonic() < deadline, f"left running: {descendants(1) & started}"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=PERF_TIMEOUT)


def read_stderr_until(process: subprocess.Popen[bytes], marker: bytes) -> bytes:
    """What ``process`` wrote to stderr until ``marker`` appeared (bounded by PERF_TIMEOUT)."""
    assert process.stderr is not None
    seen = b""
    deadline = time.monotonic() + PERF_TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr.fileno(), selectors.EVENT_READ)
        while marker not in seen:
            assert time.monotonic() < deadline, seen
            if selector.select(0.2):
                chunk = os.read(process.stderr.fileno(), 65536)
                assert chunk, seen
                seen += chunk
    return seen


@pytest.mark.parametrize("mode", [[], ["--compare", "--isolate"]], ids=["in-process", "isolate"])
def test_perf_sender_stops_when_perf_dies(mode: list[str]) -> None:
    """Where SIGINT is ignored (a shell script's background job), SIGTERM keeps its default
    action and ends perf at once: its sender must not go on flooding loopback for the rest of
    the duration (black-box: it did, adopted by init, at 94 % of a CPU), nor a baseline's
    receiver process and its sender (review: they did)."""
    # In-process: while udpx receives. Isolated: once udpx's run is over, while the first
    # baseline receives, in a process of its own (its progress line says so).
    # Whatever is left running must be gone well before its run would have ended.
    duration, marker, patience = (["60"], b"datagrams/s", ECHO_TIMEOUT) if not mode else (
        ["6"], b"asyncio DatagramProtocol (asyncio, udpx sender):", 3.0)
    process = subprocess.Popen(
        [PYTHON, "-m", "udpx", "perf", "--duration", *duration, "--sender", "udpx", *mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # noqa: PLW1509
    started: set[int] = set()
    try:
        read_stderr_until(process, marker)  # measuring: the sender sends
        started = descendants(process.pid)
        assert len(started) >= (2 if mode else 1), started
        process.send_signal(signal.SIGTERM)
        # (Not communicate(): a sender left running would hold the pipes open.)
        assert process.wait(timeout=PERF_TIMEOUT) == -signal.SIGTERM
        deadline = time.monotonic() + patience
        while descendants(1) & started:  # (orphans would have been adopted by init)
            assert time.monotonic() < deadline, f"left running: {descendants(1) & started}"
            time.sleep(0.05)
    finally:
        for pid in descendants(process.pid) | (descendants(1) & started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=PERF_TIMEOUT)


def limit_open_files(soft: int, hard: int | None = None) -> None:
    """A preexec_fn: this soft (and hard) RLIMIT_NOFILE for the command."""
    current = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, current if hard is None else hard))


@pytest.mark.parametrize("sender", ["udpx", "peers without raw sockets"])
def test_perf_sender_raises_its_open_file_limit(sender: str) -> None:
    # 1,024 sockets (the most --clients allows) under the usual soft limit of 1,024: the
    # sender raises its soft limit (black-box: it failed with EMFILE from about 1,010 on; the
    # review: the peers sender's socket per peer, where it has no raw socket, too).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard RLIMIT_NOFILE here ({hard}) is below what 1,024 sockets need")
    prefix: list[str] = []
    if sender != "udpx" and os.geteuid() == 0:
        # (A raw socket it could open: take the capability away.)
        setpriv = setpriv_dropping("net_raw")
        if setpriv is None:
            pytest.skip("needs setpriv(1), and the right to use it, to run without CAP_NET_RAW")
        prefix = setpriv
    result = subprocess.run(
        [*prefix, PYTHON, "-m", "udpx", "perf", "--json", "--duration", "0.3", "--sender",
         sender.split(maxsplit=1)[0], "--clients", "1024"], capture_output=True, text=True,
        timeout=PERF_TIMEOUT, check=False, preexec_fn=lambda: limit_open_files(1024))
    assert result.returncode == 0, result.stderr
    measurement = json.loads(result.stdout)["udpx"]
    check_measurement(measurement, size=64)
    if sender != "udpx":
        assert measurement["sender"]["note"].startswith("one send() per datagram over 1,024 "
                                                        "sockets (no raw socket")


def test_perf_too_few_file_descriptors_is_a_clear_error() -> None:
    result = subprocess.run(
        [PYTHON, "-m", "udpx", "perf", "--duration", "0.3", "--sender", "udpx", "--clients",
         "1024"], capture_output=True, text=True, timeout=PERF_TIMEOUT, check=False,
        preexec_fn=lambda: limit_open_files(1040, 1040))
    assert result.returncode == 1
    assert ("udpx perf: error: the sender process failed: 1024 sender sockets need about"
            in result.stderr)
    assert "the limit is 1040 (ulimit -n)" in result.stderr
    assert "Traceback" not in result.stderr


def test_perf_peers_sender_without_raw_sockets() -> None:
    """Without CAP_NET_RAW (here: dropped from the bounding set of a root process) the peers
    sender sends from a socket per peer, and says so."""
    setpriv = setpriv_dropping("net_raw") if os.geteuid() == 0 else None
    if setpriv is None:
        pytest.skip("needs root and setpriv(1), and the right to use it, to take CAP_NET_RAW "
                    "away from the command")
    result = subprocess.run(
        [*setpriv, PYTHON, "-m", "udpx", "perf", "--json",
         "--duration", "0.5", "--sender", "peers", "--clients", "50"],
        capture_output=True, text=True, timeout=PERF_TIMEOUT, check=False)
    assert result.returncode == 0, result.stderr
    measurement = json.loads(result.stdout)["udpx"]
    assert measurement["sender"]["note"] == (
        "one send() per datagram over 50 sockets (no raw socket: Operation not permitted; "
        "needs root or CAP_NET_RAW)")
    assert measurement["connections"] == 50
    check_measurement(measurement, size=64)
