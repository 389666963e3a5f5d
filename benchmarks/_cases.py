"""The cases of the suite: which processes each configuration runs, and what is kept of them."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ._harness import (
    BenchError,
    Case,
    Config,
    Metric,
    Metrics,
    Proc,
    Settings,
    worker,
)

#: Slack for a child process beyond its own time budget (start-up, a slow machine).
SLACK = 15.0
#: Datagrams per turn of the saturating sender (one UDP GSO send each).
RECEIVE_BURST = 64
#: In the many-connections case every peer sends this many per turn, round-robin, so that a
#: receive batch holds datagrams of many peers (GSO, so that the sender still outruns udpx).
MANY_BURST = 8
#: Round trips in flight in the echo case.
ECHO_WINDOW = 64
#: An upper bound on what any sender is allowed to send in one run.
MAX_COUNT = 50_000_000

Programs = dict[str, Path]


def _has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def _has_asyncio_dgram() -> bool:
    return importlib.util.find_spec("asyncio_dgram") is not None


def _loop_skip(loop: str) -> str | None:
    if loop == "uvloop" and not _has_uvloop():
        return "uvloop is not installed"
    return None


def _timing(settings: Settings, extra: float = 0.0) -> tuple[float, float, float, float]:
    """Warm-up, window, quiet period and deadline of a run; ``extra``: seconds the receiver may
    need before its warm-up starts (opening connections)."""
    deadline = settings.warmup + extra + settings.window + 10.0
    return settings.warmup, settings.window, settings.quiet, deadline


# -- receive ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """What the saturating C sender of a receive run does."""

    size: int
    peers: int = 1
    burst: int = RECEIVE_BURST
    #: Seconds the receiver may need before its warm-up (opening connections).
    extra_time: float = 0.0


def _receive_once(receiver: list[str], label: str, traffic: Traffic, *, programs: Programs,
                  settings: Settings, raw: list[dict[str, object]]) -> Metrics:
    warmup, window, _, deadline = _timing(settings, traffic.extra_time)
    with Proc(receiver, name=label) as proc:
        port = proc.event("ready", SLACK)["port"]
        # The sender runs until the receiver's window closed (at most ``duration``).
        duration = warmup + traffic.extra_time + window + 2.0
        blast = [str(programs["blast"]), str(port), str(traffic.size), f"{duration:.3f}",
                 str(MAX_COUNT), str(traffic.peers), str(traffic.burst), "gso"]
        with Proc(blast, name="C GSO sender") as sender:
            proc.event("window_closed", deadline + SLACK)
            sender.terminate()
            sent = sender.event("result", SLACK)
            sender.finish(SLACK)
        got = proc.event("result", deadline + SLACK)
        proc.finish(SLACK)
    if got["window_count"] <= 0 or sent["total"] <= 0:
        raise BenchError(f"{label}: nothing measured ({got}, sender {sent})")
    raw.append({"receiver": got, "sender": sent})
    return {"rate": got["rate"], "loss": max(0.0, 1 - got["total"] / sent["total"]),
            "cpu_us": got["cpu_us_per_dgram"], "sender_rate": sent["rate"]}


RECEIVE_METRICS = [
    Metric("rate", "datagrams/s", "rate", True, ratio=True),
    Metric("loss", "loss", "percent", False),
    Metric("cpu_us", "CPU µs/datagram", "us", False, ratio=True),
]


class Receivers:
    """Builds the receiver configurations of one case (receive, or many connections)."""

    def __init__(self, programs: Programs, settings: Settings) -> None:
        self.programs = programs
        self.settings = settings
        self.configs: list[Config] = []

    def add(self, name: str, loop: str, impl: str, traffic: Traffic, *, udpx: bool = False,
            group: str = "", skip: str | None = None) -> None:
        """``impl``: a receiver of _workers.py, or "c" for the C recvmmsg receiver."""
        warmup, window, quiet, deadline = _timing(self.settings, traffic.extra_time)
        if impl == "c":
            command = [str(self.programs["sink"]), f"{warmup}", f"{window}", f"{quiet}",
                       f"{deadline}"]
        else:
            command = worker("recv", impl, "--loop", loop, "--warmup", f"{warmup}",
                             "--window", f"{window}", "--quiet", f"{quiet}", "--deadline",
                             f"{deadline}", "--peers", str(traffic.peers))
        config = Config(name=name, loop=loop, role="udpx" if udpx else "baseline",
                        run=lambda: {}, group=group, skip=skip or _loop_skip(loop))
        config.run = partial(_receive_once, command, f"{name} ({loop})", traffic,
                             programs=self.programs, settings=self.settings, raw=config.raw)
        self.configs.append(config)


def receive_case(size: int, settings: Settings, programs: Programs) -> Case:
    receivers = Receivers(programs, settings)
    traffic = Traffic(size)
    for impl, name in (("udpx-recv", "udpx recv()"), ("udpx-recv_many", "udpx recv_many()")):
        for loop in ("asyncio", "uvloop"):
            receivers.add(name, loop, impl, traffic, udpx=True)
    for loop in ("asyncio", "uvloop"):
        receivers.add("DatagramProtocol", loop, "proto", traffic)
    receivers.add("asyncio-dgram", "asyncio", "asyncio-dgram", traffic,
                  skip=None if _has_asyncio_dgram() else
                  "asyncio-dgram is not installed (pip install asyncio-dgram)")
    receivers.add("C recvmmsg", "-", "c", traffic)
    return Case(
        case="receive", title="Receive (one peer, saturating C GSO sender)", size=size,
        metrics=RECEIVE_METRICS, configs=receivers.configs,
        notes=[
            f"Sender: C, UDP GSO, {RECEIVE_BURST} segments per send (fewer for 1,200 B: at "
            "most 65,507 bytes per send), one socket, as fast as it can.",
            "Receivers ask for a 4 MiB receive buffer. Loss: datagrams sent but never "
            "received (the receiver could not keep up). CPU: receiver process, user + system.",
            "On 2 CPUs the sender and the kernel's loopback delivery (softirq) share one CPU: "
            "the C receiver's rate is the most this machine delivers, not recvmmsg's limit; "
            "compare receivers on CPU µs/datagram.",
            "udpx: one accepted connection, one task; recv() takes one datagram per await, "
            "recv_many() all that are queued.",
        ])


# -- many connections ------------------------------------------------------------------------


def many_case(size: int, settings: Settings, programs: Programs) -> Case:
    receivers = Receivers(programs, settings)
    for peers in settings.many_peers:
        # udpx's warm-up starts only once all N connections (and tasks) exist: allow for it.
        traffic = Traffic(size, peers=peers, burst=MANY_BURST, extra_time=peers / 2000)
        group = f"{peers:,}"
        for loop in ("asyncio", "uvloop"):
            receivers.add("udpx recv_many()", loop, "udpx-recv_many", traffic, udpx=True,
                          group=group)
        receivers.add("DatagramProtocol", "uvloop", "proto", traffic, group=group)
        receivers.add("C recvmmsg", "-", "c", traffic, group=group)
    return Case(
        case="many", title="Many connections (receive from N active peers)", size=size,
        metrics=RECEIVE_METRICS, configs=receivers.configs, group_label="peers",
        notes=[
            f"Sender: one C process with N sockets (N source ports), round-robin, "
            f"{MANY_BURST} datagrams per socket per turn (one GSO send).",
            "udpx: every peer is an accepted connection with its own task calling recv_many(); "
            "the warm-up starts once all N connections exist. DatagramProtocol and C receive "
            "on one socket with no per-peer state.",
        ])


# -- send ------------------------------------------------------------------------------------


def _send_once(label: str, sender_args: Callable[[int], list[str]], *, programs: Programs,
               settings: Settings, raw: list[dict[str, object]]) -> Metrics:
    warmup, window, _, deadline = _timing(settings)
    quiet = settings.quiet + 0.15
    sink = [str(programs["sink"]), f"{warmup}", f"{window}", f"{quiet}", f"{deadline + 5}"]
    with Proc(sink, name="C receiver") as receiver:
        port = receiver.event("ready", SLACK)["port"]
        with Proc(sender_args(port), name=label) as sender:
            sent = sender.event("result", deadline + SLACK)
            sender.finish(SLACK)
        got = receiver.event("result", deadline + SLACK)
        receiver.finish(SLACK)
    if sent["total"] <= 0:
        raise BenchError(f"{label}: sent nothing ({sent})")
    raw.append({"sender": sent, "receiver": got})
    return {"rate": sent["rate"], "cpu_us": sent["cpu_us_per_dgram"],
            "loss": max(0.0, 1 - got["total"] / sent["total"]), "received_rate": got["rate"]}


def _sender_config(name: str, loop: str, role: str, args: Callable[[int], list[str]], *,
                   programs: Programs, settings: Settings, skip: str | None = None) -> Config:
    config = Config(name=name, loop=loop, role="udpx" if role == "udpx" else "baseline",
                    run=lambda: {}, skip=skip)
    label = f"{name} ({loop})"
    config.run = lambda: _send_once(label, args, programs=programs, settings=settings,
                                    raw=config.raw)
    return config


def send_case(size: int, settings: Settings, programs: Programs) -> Case:
    warmup, window, _, deadline = _timing(settings)

    def python_sender(impl: str, loop: str, *flags: str) -> Callable[[int], list[str]]:
        def args(port: int) -> list[str]:
            return worker("send", impl, "--port", str(port), "--size", str(size), "--loop", loop,
                          "--warmup", f"{warmup}", "--window", f"{window}", "--deadline",
                          f"{deadline}", *flags)
        return args

    def c_sender(mode: str) -> Callable[[int], list[str]]:
        def args(port: int) -> list[str]:
            return [str(programs["blast"]), str(port), str(size), f"{window}", str(MAX_COUNT),
                    "1", "64", mode]
        return args

    configs: list[Config] = []
    common: dict[str, Any] = {"programs": programs, "settings": settings}
    for impl, name in (("udpx-send", "udpx send()"), ("udpx-send_many", "udpx send_many()")):
        for gso in (True, False):
            for loop in ("asyncio", "uvloop"):
                label = name + ("" if gso else " gso=False")
                flags = () if gso else ("--no-gso",)
                configs.append(_sender_config(label, loop, "udpx",
                                              python_sender(impl, loop, *flags), **common,
                                              skip=_loop_skip(loop)))
    configs.append(_sender_config("socket.send", "-", "baseline",
                                  python_sender("socket", "asyncio"), **common))
    for loop in ("asyncio", "uvloop"):
        configs.append(_sender_config("transport.sendto", loop, "baseline",
                                      python_sender("sendto", loop), **common,
                                      skip=_loop_skip(loop)))
    configs.append(_sender_config("C sendmmsg", "-", "baseline", c_sender("mmsg"), **common))
    configs.append(_sender_config("C GSO", "-", "baseline", c_sender("gso"), **common))
    return Case(
        case="send", title="Send (one peer, into a C recvmmsg receiver)", size=size,
        metrics=[Metric("rate", "sent datagrams/s", "rate", True, ratio=True),
                 Metric("cpu_us", "sender CPU µs/datagram", "us", False, ratio=True),
                 Metric("loss", "lost at receiver", "percent", False)],
        configs=configs,
        notes=[
            "Rate: datagrams the sender handed to the kernel per second in its window (udpx: "
            "stats.tx_packets). udpx: a dialed connection; send() in a loop, or send_many() of "
            "64 at a time; by default runs of equal-size datagrams go out as one UDP GSO send, "
            "gso=False uses sendmmsg. transport.sendto: 64 calls, then a yield to the loop.",
            "C sendmmsg / C GSO: 64 datagrams per call, the ceiling of each method. Loss: sent "
            "but not received by the C receiver (on loopback a send never blocks; a full "
            "receiver drops).",
        ])


# -- echo ------------------------------------------------------------------------------------


def _echo_once(label: str, server: list[str], *, programs: Programs, size: int,
               settings: Settings, raw: list[dict[str, object]]) -> Metrics:
    warmup, window, _, deadline = _timing(settings)
    with Proc(server, name=label, stdin=True) as proc:
        port = proc.event("ready", SLACK)["port"]
        client_args = [str(programs["echo"]), "client", str(port), str(size), str(ECHO_WINDOW),
                       f"{warmup}", f"{window}", f"{deadline}", str(proc.pid)]
        with Proc(client_args, name="C echo client") as client:
            got = client.event("result", deadline + SLACK)
            client.finish(SLACK)
        proc.close_stdin()
        served = proc.event("result", SLACK)
        proc.finish(SLACK)
    if got["window_count"] <= 0:
        raise BenchError(f"{label}: no round trip measured ({got})")
    raw.append({"client": got, "server": served})
    return {"rate": got["rate"], "cpu_us": got["server_cpu_us_per_rt"],
            "timeouts": float(got["timeouts"])}


def echo_case(size: int, settings: Settings, programs: Programs) -> Case:
    _, _, _, deadline = _timing(settings)
    server_deadline = f"{deadline + 2 * SLACK}"
    configs: list[Config] = []

    def add(name: str, loop: str, role: str, server: list[str], skip: str | None) -> None:
        config = Config(name=name, loop=loop, role="udpx" if role == "udpx" else "baseline",
                        run=lambda: {}, skip=skip)
        label = f"{name} ({loop})"
        config.run = lambda: _echo_once(label, server, programs=programs, size=size,
                                        settings=settings, raw=config.raw)
        configs.append(config)

    for impl, name in (("udpx-recv", "udpx recv()+send()"),
                       ("udpx-recv_many", "udpx recv_many()+send_many()")):
        for loop in ("asyncio", "uvloop"):
            add(name, loop, "udpx", worker("echo", impl, "--loop", loop, "--deadline",
                                           server_deadline), _loop_skip(loop))
    for loop in ("asyncio", "uvloop"):
        add("DatagramProtocol", loop, "baseline",
            worker("echo", "proto", "--loop", loop, "--deadline", server_deadline),
            _loop_skip(loop))
    add("C recvmmsg+sendmmsg", "-", "baseline", [str(programs["echo"]), "server"], None)
    return Case(
        case="echo", title=f"Echo (C client, {ECHO_WINDOW} round trips in flight)", size=size,
        metrics=[Metric("rate", "round trips/s", "rate", True, ratio=True),
                 Metric("cpu_us", "server CPU µs/round trip", "us", False, ratio=True),
                 Metric("timeouts", "client timeouts", "count", False)],
        configs=configs,
        notes=[
            "Client: C, one connected socket, recvmmsg/sendmmsg, a new request for every reply; "
            "50 ms without a reply counts as a timeout and the window is sent again.",
            "Server CPU: /proc/PID/schedstat of the server process over the client's window. "
            "udpx: accepted connection served by one task (the README's echo loop, or "
            "recv_many() + send_many()).",
        ])


# -- memory ----------------------------------------------------------------------------------


def _memory_once(label: str, impl: str, loop: str, *, n: int, size: int, programs: Programs,
                 raw: list[dict[str, object]]) -> Metrics:
    budget = 60.0 + n / 1000
    args = worker("memory", impl, "--loop", loop, "--n", str(n), "--size", str(size),
                  "--peers-bin", str(programs["peers"]), "--deadline", f"{budget}")
    with Proc(args, name=label) as proc:
        got = proc.event("result", budget + SLACK)
        proc.finish(SLACK)
    raw.append(got)
    if got["conns"] < 0.99 * n:
        raise BenchError(f"{label}: only {got['conns']} of {n} connections opened ({got})")
    return {"bytes_per_conn": got["bytes_per_conn"], "rss_before": float(got["rss_before"]),
            "rss_after": float(got["rss_after"]), "conns": float(got["conns"]),
            "open_rate": got["conns"] / got["fill_seconds"]}


def memory_case(size: int, settings: Settings, programs: Programs) -> Case:
    configs: list[Config] = []
    for n in settings.memory_peers:
        group = f"{n:,}"
        for impl, name, loop, role in (("udpx", "udpx listener", "asyncio", "udpx"),
                                       ("udpx", "udpx listener", "uvloop", "udpx"),
                                       ("table", "dict[addr] → deque", "asyncio", "baseline")):
            config = Config(name=name, loop=loop, role="udpx" if role == "udpx" else "baseline",
                            run=lambda: {}, group=group, skip=_loop_skip(loop))
            config.run = partial(_memory_once, f"{name} ({loop}, {n})", impl, loop, n=n,
                                 size=size, programs=programs, raw=config.raw)
            configs.append(config)
    return Case(
        case="memory", title="Memory per idle connection", size=size,
        metrics=[Metric("bytes_per_conn", "RSS bytes/connection", "bytes", False, ratio=True),
                 Metric("rss_before", "RSS empty (MiB)", "mib", False),
                 Metric("rss_after", "RSS full (MiB)", "mib", False),
                 Metric("open_rate", "connections opened/s", "rate", True)],
        configs=configs, group_label="connections",
        notes=[
            "Real datagrams: a C process sends one datagram from each of N source addresses "
            "(bind, send, close; ports 1024-65535 of 127.0.0.2, 127.0.0.3, ...: one address has "
            "too few ports for 100,000), 2,000 at a time so that none is lost.",
            "udpx: listen(max_conns, backlog > N, idle_timeout=None); every connection is "
            "accepted, its datagram read with recv_nowait() and the connection kept in a list "
            "(no task per connection): open, accepted, idle. Empty = the same listener after "
            "256 warm-up peers were accepted and closed. RSS from /proc/self/status after "
            "gc.collect().",
            "Baseline: an asyncio DatagramProtocol keeping a dict from peer address to a deque, "
            "the least state a hand-written demultiplexer holds per peer.",
        ])


CASES: dict[str, Callable[[int, Settings, Programs], Case]] = {
    "receive": receive_case,
    "send": send_case,
    "echo": echo_case,
    "many": many_case,
    "memory": memory_case,
}
