"""The cases of the suite: which processes each configuration runs, and what is kept of them."""

from __future__ import annotations

import importlib.util
import socket
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
#: In the many-connections case with a GSO sender every peer sends this many per turn (one GSO
#: send), round-robin, so that a receive batch holds datagrams of many peers.
MANY_BURST = 8
#: Round trips in flight in the echo case.
ECHO_WINDOW = 64
#: An upper bound on what any sender is allowed to send in one run.
MAX_COUNT = 50_000_000
#: The many-peer echo client sends a request again when it had no reply for this long
#: (``TIMEOUT`` in c/echo.c).
ECHO_MANY_TIMEOUT = 0.2
#: The many-peer echo's warm-up and window in the full run. The usual 0.2 s warm-up is one
#: client timeout: the requests lost while a server opened its 10,000 connections came back as
#: resends inside the window, and the 0.6 s window then measured how a server recovers from its
#: start (10,000-peer medians of the same code swung from 0.92x to 1.34x the baseline between
#: runs). Five timeouts of warm-up let that wave pass; a longer window averages over the
#: bursts of timeouts that follow each overflow of the server's buffer.
ECHO_MANY_WARMUP = 5 * ECHO_MANY_TIMEOUT
ECHO_MANY_WINDOW = 2.0

Programs = dict[str, Path]


def _has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def _has_asyncio_dgram() -> bool:
    return importlib.util.find_spec("asyncio_dgram") is not None


def _loop_skip(loop: str) -> str | None:
    if loop == "uvloop" and not _has_uvloop():
        return "uvloop is not installed"
    return None


def _timing(settings: Settings, extra: float = 0.0, *, warmup: float | None = None,
            window: float | None = None) -> tuple[float, float, float, float]:
    """Warm-up, window, quiet period and deadline of a run; ``extra``: seconds the receiver may
    need before its warm-up starts (opening connections); ``warmup``, ``window``: a case's own
    (default: the settings')."""
    warmup = settings.warmup if warmup is None else warmup
    window = settings.window if window is None else window
    deadline = warmup + extra + window + 10.0
    return warmup, window, settings.quiet, deadline


# -- receive ---------------------------------------------------------------------------------


def _raw_refused() -> str | None:
    """Why the C sender cannot use a raw socket here (None: it can). Opening one and closing it
    again sends nothing."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except OSError as exc:
        return f"raw sockets refused: {exc.strerror or exc}"
    return None


@dataclass(frozen=True)
class Traffic:
    """What the saturating sender of a receive run does."""

    size: int
    peers: int = 1
    burst: int = RECEIVE_BURST
    #: How the sender sends: a mode of the C ``blast`` ("gso": one UDP GSO send per burst,
    #: "mmsg": one sendmmsg per burst, "raw": hand-built packets from ``peers`` source ports,
    #: sendmmsg of 64), or "udpx": a dialed udpx connection in a worker, send_many() of 64.
    mode: str = "gso"
    #: Seconds the receiver may need before its warm-up (opening connections).
    extra_time: float = 0.0


def _sender_command(traffic: Traffic, port: int, duration: float, loop: str,
                    programs: Programs) -> tuple[list[str], str]:
    if traffic.mode == "udpx":
        return worker("flood", "--port", str(port), "--size", str(traffic.size), "--loop",
                      "asyncio" if loop == "-" else loop, "--duration", f"{duration:.3f}",
                      "--max-count", str(MAX_COUNT), "--deadline", f"{duration + SLACK}"
                      ), "udpx sender"
    return [str(programs["blast"]), str(port), str(traffic.size), f"{duration:.3f}",
            str(MAX_COUNT), str(traffic.peers), str(traffic.burst), traffic.mode
            ], f"C {traffic.mode} sender"


def _receive_once(receiver: list[str], label: str, traffic: Traffic, loop: str, *,
                  programs: Programs, settings: Settings,
                  raw: list[dict[str, object]]) -> Metrics:
    warmup, window, _, deadline = _timing(settings, traffic.extra_time)
    with Proc(receiver, name=label) as proc:
        port = proc.event("ready", SLACK)["port"]
        # The sender runs until the receiver's window closed (at most ``duration``).
        duration = warmup + traffic.extra_time + window + 2.0
        command, sender_name = _sender_command(traffic, port, duration, loop, programs)
        with Proc(command, name=sender_name) as sender:
            proc.event("window_closed", deadline + SLACK)
            sender.terminate()
            sent = sender.event("result", SLACK)
            sender.finish(SLACK)
        got = proc.event("result", deadline + SLACK)
        proc.finish(SLACK)
    if got["window_count"] <= 0 or sent["total"] <= 0:
        raise BenchError(f"{label}: nothing measured ({got}, sender {sent})")
    raw.append({"receiver": got, "sender": sent})
    metrics = {"rate": got["rate"], "loss": max(0.0, 1 - got["total"] / sent["total"]),
               "cpu_us": got["cpu_us_per_dgram"], "sender_rate": sent["rate"]}
    # udpx listeners: file descriptors open at the end of the window, and how long opening
    # every connection took.
    for key in ("fds", "ready_after", "rss"):
        if key in got:
            metrics[key] = float(got[key])
    if "window_kernel_drops" in got:
        # The window's own loss (kernel drops while it was open), apart from what the opening
        # of connections before it cost: kept in the samples, beside the run's loss.
        dropped = got["window_kernel_drops"]
        metrics["window_loss"] = dropped / max(1, dropped + got["window_count"])
    return metrics


RECEIVE_METRICS = [
    Metric("rate", "datagrams/s", "rate", True, ratio=True),
    Metric("loss", "loss", "percent", False),
    Metric("cpu_us", "CPU µs/datagram", "us", False, ratio=True),
]

#: The udpx receivers: worker implementation and row name.
UDPX_RECEIVERS = (("udpx-recv", "udpx recv()"), ("udpx-recv_many", "udpx recv_many()"),
                  ("udpx-proto", "udpx ConnProtocol"))
#: The drop-in endpoint's row: the DatagramProtocol baseline's protocol and call, on a loop
#: patched by udpx.patch_loop (loop.create_datagram_endpoint is udpx's).
DROPIN = "udpx drop-in DatagramProtocol"


class Receivers:
    """Builds the receiver configurations of one case (receive, or many connections)."""

    def __init__(self, programs: Programs, settings: Settings) -> None:
        self.programs = programs
        self.settings = settings
        self.configs: list[Config] = []

    def add(self, name: str, loop: str, impl: str, traffic: Traffic, *, udpx: bool = False,
            group: str = "", skip: str | None = None, batch_size: int = 64,
            reps: int | None = None, listen_host: str = "127.0.0.1",
            connected: bool = False) -> None:
        """``impl``: a receiver of _workers.py, or "c" for the C recvmmsg receiver."""
        warmup, window, quiet, deadline = _timing(self.settings, traffic.extra_time)
        if impl == "c":
            command = [str(self.programs["sink"]), f"{warmup}", f"{window}", f"{quiet}",
                       f"{deadline}"]
        else:
            command = worker("recv", impl, "--loop", loop, "--warmup", f"{warmup}",
                             "--window", f"{window}", "--quiet", f"{quiet}", "--deadline",
                             f"{deadline}", "--peers", str(traffic.peers), "--batch-size",
                             str(batch_size), "--listen-host", listen_host,
                             *(["--connected"] if connected else []))
        config = Config(name=name, loop=loop, role="udpx" if udpx else "baseline",
                        run=lambda: {}, group=group, skip=skip or _loop_skip(loop), reps=reps)
        config.run = partial(_receive_once, command, f"{name} ({loop}, {group or '-'})",
                             traffic, loop, programs=self.programs, settings=self.settings,
                             raw=config.raw)
        self.configs.append(config)

    def baselines(self, traffic: Traffic, *, group: str = "", reps: int | None = None,
                  loops: tuple[str, ...] = ("asyncio", "uvloop"), dgram: bool = True) -> None:
        for loop in loops:
            self.add("DatagramProtocol", loop, "proto", traffic, group=group, reps=reps)
        if dgram:
            self.add("asyncio-dgram", "asyncio", "asyncio-dgram", traffic, group=group,
                     reps=reps, skip=None if _has_asyncio_dgram() else
                     "asyncio-dgram is not installed (pip install asyncio-dgram)")
        self.add("C recvmmsg", "-", "c", traffic, group=group, reps=reps)

    def dropin(self, traffic: Traffic, *, group: str = "", reps: int | None = None) -> None:
        for loop in ("asyncio", "uvloop"):
            self.add(DROPIN, loop, "udpx-dropin", traffic, udpx=True, group=group, reps=reps)


DROPIN_NOTE = (
    f"{DROPIN}: the DatagramProtocol baseline's protocol (datagram_received counting one "
    "datagram) and call (loop.create_datagram_endpoint(..., sock=sock)), on a loop patched "
    "by udpx.patch_loop: udpx's drop-in endpoint (batched reads, one datagram_received call "
    "per datagram, peer address tuples cached).")

RECEIVE_NOTES = [
    "Receivers ask for a 4 MiB receive buffer. Loss: datagrams sent but never received (the "
    "receiver could not keep up). CPU: receiver process, user + system.",
    "udpx: one accepted connection, one task; recv() takes one datagram per await, "
    "recv_many() all that are queued; ConnProtocol: listen(protocol_factory=...), no task, "
    "datagrams_received() called once per received batch. udpx's other options are its "
    "defaults, read coalescing included (rx_coalesce=0.001: a reader that keeps up with a "
    "steady stream pauses up to 1 ms between reads).",
]


def receive_case(size: int, settings: Settings, programs: Programs) -> Case:
    receivers = Receivers(programs, settings)
    traffic = Traffic(size, mode="mmsg")
    for impl, name in UDPX_RECEIVERS:
        for loop in ("asyncio", "uvloop"):
            receivers.add(name, loop, impl, traffic, udpx=True)
    for impl, name in UDPX_RECEIVERS[1:]:
        for loop in ("asyncio", "uvloop"):
            receivers.add(f"{name} batch_size=1", loop, impl, traffic, udpx=True, batch_size=1,
                          reps=settings.secondary_reps)
    for loop in ("asyncio", "uvloop"):
        receivers.add(f"{UDPX_RECEIVERS[-1][1]}, listener on 0.0.0.0", loop, "udpx-proto",
                      traffic, udpx=True, reps=settings.secondary_reps, listen_host="0.0.0.0")
    receivers.dropin(traffic)
    receivers.baselines(traffic)
    return Case(
        case="receive", title="Receive (one peer, C sender without GSO)", size=size,
        metrics=RECEIVE_METRICS, configs=receivers.configs,
        notes=[
            f"Sender: C, one socket, sendmmsg of {RECEIVE_BURST} plain datagrams per call, as "
            "fast as it can: what a peer sending one datagram at a time delivers (every "
            "datagram its own skb, no GRO run). On 2 CPUs it does not saturate the C "
            "receiver: the kernel charges the loopback delivery of every datagram (IP, UDP "
            "lookup, queueing, the receiver's wake-up) to the sender, so the rate is mostly "
            "the sender's; compare receivers on CPU µs/datagram.",
            *RECEIVE_NOTES,
            "batch_size=1: the listener receives one datagram per system call (recvmsg_into, "
            "also the path where recvmmsg is missing); fewer repetitions "
            f"({settings.secondary_reps}).",
            "listener on 0.0.0.0: the wildcard listener, which reads each datagram's local "
            "address (IP_PKTINFO) and sends from it; the sender targets 127.0.0.1. Fewer "
            f"repetitions ({settings.secondary_reps}).",
            DROPIN_NOTE,
        ])


def receive_gso_case(size: int, settings: Settings, programs: Programs) -> Case:
    receivers = Receivers(programs, settings)
    traffic = Traffic(size)
    reps = settings.secondary_reps
    for impl, name in UDPX_RECEIVERS:
        for loop in ("asyncio", "uvloop"):
            receivers.add(name, loop, impl, traffic, udpx=True, reps=reps)
    for loop in ("asyncio", "uvloop"):
        receivers.add("udpx recv_many() ← udpx sender", loop, "udpx-recv_many",
                      Traffic(size, mode="udpx"), udpx=True, reps=reps)
    receivers.dropin(traffic, reps=reps)
    receivers.baselines(traffic, reps=reps)
    return Case(
        case="receive_gso", title="Receive, GSO sender: the udpx-to-udpx best case (one peer)",
        size=size, metrics=RECEIVE_METRICS, configs=receivers.configs,
        notes=[
            f"Sender: C, one socket, UDP GSO, {RECEIVE_BURST} segments per send (fewer for "
            "1,200 B: at most 65,507 bytes per send), as fast as it can: what a udpx sender "
            "or another GSO peer delivers. With GRO (on by default) the kernel hands udpx "
            "whole runs, which the C recvmmsg receiver (no GRO) gets one datagram at a time. "
            "Not what peers sending one datagram at a time get: see the receive table above.",
            "udpx recv_many() ← udpx sender: the sender is a dialed udpx connection in its "
            "own process (same loop) calling send_many() of 64 in a loop with the default "
            "GSO; ratios compare it with the baselines fed by the C GSO sender.",
            "On 2 CPUs the sender and the kernel's loopback delivery (softirq) share one CPU: "
            "the C receiver's rate is the most this machine delivers, not recvmmsg's limit; "
            "compare receivers on CPU µs/datagram.",
            *RECEIVE_NOTES,
            DROPIN_NOTE + " With GRO (on by default) it too gets whole runs from the kernel.",
            f"Fewer repetitions ({reps}) than the headline tables.",
        ])


# -- many connections ------------------------------------------------------------------------


def _many_receivers(receivers: Receivers, traffic: Traffic, group: str,
                    reps: int | None, *, wildcard: bool = False) -> None:
    for impl, name in UDPX_RECEIVERS[1:]:
        for loop in ("asyncio", "uvloop"):
            receivers.add(name, loop, impl, traffic, udpx=True, group=group, reps=reps)
    if wildcard:
        receivers.add(f"{UDPX_RECEIVERS[-1][1]}, listener on 0.0.0.0", "uvloop", "udpx-proto",
                      traffic, udpx=True, group=group, reps=reps, listen_host="0.0.0.0")
    receivers.dropin(traffic, group=group, reps=reps)
    receivers.baselines(traffic, group=group, reps=reps, loops=("uvloop",), dgram=False)


MANY_NOTES = [
    "udpx recv_many(): every peer is an accepted connection with its own task calling "
    "recv_many(); ConnProtocol: every peer a connection with its own protocol object, no "
    "task. udpx's warm-up starts once all N connections exist. DatagramProtocol and C "
    "receive on one socket with no per-peer state.",
    f"{DROPIN}: the uvloop DatagramProtocol baseline's protocol and call on a loop patched "
    "by udpx.patch_loop (udpx's drop-in endpoint): one socket, no connections, one "
    "datagram_received call per datagram with the peer's address tuple (cached per peer).",
]


def many_case(size: int, settings: Settings, programs: Programs) -> Case:
    receivers = Receivers(programs, settings)
    refused = _raw_refused()
    for peers in settings.many_peers:
        if peers == 1:
            traffic = Traffic(size, mode="mmsg")
        else:
            # udpx's warm-up starts only once all N connections exist: allow for it.
            traffic = Traffic(size, peers=peers, burst=1, mode="mmsg" if refused else "raw",
                              extra_time=peers / 2000)
        _many_receivers(receivers, traffic, f"{peers:,}", None, wildcard=True)
    sender = (
        f"{refused}, so N UDP sockets (N source ports), round-robin, one sendmmsg of 1 "
        "datagram per socket per turn" if refused else
        "one raw socket (IPPROTO_RAW) sending hand-built 127.0.0.1 packets whose source port "
        "cycles over N ports, sendmmsg of 64 per call (faster than a socket per peer, which "
        "needs a system call per datagram)")
    return Case(
        case="many", title="Many connections (N active peers, one datagram per peer per turn, "
                           "no GSO)", size=size,
        metrics=RECEIVE_METRICS, configs=receivers.configs, group_label="peers",
        notes=[
            f"Sender: C, no GSO. 1 peer: one socket, sendmmsg of {RECEIVE_BURST}. N peers: "
            f"one datagram per peer per turn, round-robin: {sender}. Every receive batch holds "
            "datagrams of many peers. The sender cannot saturate the C receiver or a uvloop "
            "DatagramProtocol here (the kernel charges every datagram's loopback delivery to "
            "it): their rate is the sender's; compare on CPU µs/datagram.",
            *MANY_NOTES,
            "listener on 0.0.0.0: protocol mode on the wildcard listener (each datagram's "
            "local address read with IP_PKTINFO, connections keyed by peer and local address), "
            "uvloop only; compare it with the ConnProtocol row of the same peers.",
        ])


def many_gso_case(size: int, settings: Settings, programs: Programs) -> Case:
    receivers = Receivers(programs, settings)
    for peers in settings.many_peers:
        traffic = Traffic(size, peers=peers, burst=MANY_BURST, extra_time=peers / 2000)
        _many_receivers(receivers, traffic, f"{peers:,}", settings.secondary_reps)
    return Case(
        case="many_gso", title="Many connections, GSO sender (N active peers, runs of "
                               f"{MANY_BURST})", size=size,
        metrics=RECEIVE_METRICS, configs=receivers.configs, group_label="peers",
        notes=[
            f"Sender: one C process with N sockets (N source ports), round-robin, {MANY_BURST} "
            "datagrams per socket per turn in one UDP GSO send: what udpx or other GSO peers "
            "deliver (udpx gets each run as one GRO batch), not what peers sending one "
            "datagram at a time get (the table above).",
            *MANY_NOTES,
            f"Fewer repetitions ({settings.secondary_reps}) than the headline tables.",
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

ECHO_METRICS = [Metric("rate", "round trips/s", "rate", True, ratio=True),
                Metric("cpu_us", "server CPU µs/round trip", "us", False, ratio=True),
                Metric("timeouts", "client timeouts", "count", False)]


def _echo_once(label: str, server: list[str], client: Callable[[int, int], list[str]],
               deadline: float, raw: list[dict[str, object]]) -> Metrics:
    """One echo run: ``server`` (stopped by closing its stdin), and the C client made by
    ``client(port, server_pid)``."""
    with Proc(server, name=label, stdin=True) as proc:
        port = proc.event("ready", SLACK)["port"]
        with Proc(client(port, proc.pid), name="C echo client") as client_proc:
            got = client_proc.event("result", deadline + SLACK)
            client_proc.finish(SLACK)
        proc.close_stdin()
        served = proc.event("result", SLACK)
        proc.finish(SLACK)
    if got["window_count"] <= 0:
        raise BenchError(f"{label}: no round trip measured ({got})")
    raw.append({"client": got, "server": served})
    return {"rate": got["rate"], "cpu_us": got["server_cpu_us_per_rt"],
            "timeouts": float(got["timeouts"])}


class EchoServers:
    """Builds the echo server configurations of one case."""

    def __init__(self, programs: Programs, server_deadline: float) -> None:
        self.programs = programs
        self.server_deadline = server_deadline
        self.configs: list[Config] = []

    def add(self, name: str, loop: str, impl: str, client: Callable[[int, int], list[str]],
            deadline: float, *, peers: int = 1, group: str = "",
            reps: int | None = None, listen_host: str = "127.0.0.1") -> None:
        """``impl``: an echo server of _workers.py, or "c" for the C echo server."""
        if impl == "c":
            server = [str(self.programs["echo"]), "server"]
        else:
            server = worker("echo", impl, "--loop", loop, "--peers", str(peers), "--deadline",
                            f"{self.server_deadline}", "--listen-host", listen_host)
        config = Config(name=name, loop=loop, role="udpx" if impl.startswith("udpx") else
                        "baseline", run=lambda: {}, group=group, skip=_loop_skip(loop),
                        reps=reps)
        config.run = partial(_echo_once, f"{name} ({loop}, {group or '-'})", server, client,
                             deadline, config.raw)
        self.configs.append(config)


def echo_case(size: int, settings: Settings, programs: Programs) -> Case:
    warmup, window, _, deadline = _timing(settings)
    servers = EchoServers(programs, deadline + 2 * SLACK)

    def client(port: int, pid: int) -> list[str]:
        return [str(programs["echo"]), "client", str(port), str(size), str(ECHO_WINDOW),
                f"{warmup}", f"{window}", f"{deadline}", str(pid)]

    for impl, name in (("udpx-recv", "udpx recv()+send()"),
                       ("udpx-recv_many", "udpx recv_many()+send_many()"),
                       ("udpx-proto", "udpx ConnProtocol+send_many_nowait()")):
        for loop in ("asyncio", "uvloop"):
            servers.add(name, loop, impl, client, deadline)
    for loop in ("asyncio", "uvloop"):
        servers.add("udpx ConnProtocol+send_many_nowait(), listener on 0.0.0.0", loop,
                    "udpx-proto", client, deadline, reps=settings.secondary_reps,
                    listen_host="0.0.0.0")
    for loop in ("asyncio", "uvloop"):
        servers.add(DROPIN, loop, "udpx-dropin", client, deadline)
    for loop in ("asyncio", "uvloop"):
        servers.add("DatagramProtocol", loop, "proto", client, deadline)
    servers.add("C recvmmsg+sendmmsg", "-", "c", client, deadline)
    return Case(
        case="echo", title=f"Echo (C client, {ECHO_WINDOW} round trips in flight)", size=size,
        metrics=ECHO_METRICS, configs=servers.configs,
        notes=[
            "Client: C, one connected socket, recvmmsg/sendmmsg, a new request for every reply; "
            "50 ms without a reply counts as a timeout and the window is sent again.",
            "Server CPU: /proc/PID/schedstat of the server process over the client's window. "
            "udpx: accepted connection served by one task (the README's echo loop, or "
            "recv_many() + send_many()), or protocol mode (datagrams_received() queues the "
            "batch back with send_many_nowait()).",
            f"{DROPIN}: the DatagramProtocol baseline (sendto(data, addr) in "
            "datagram_received()) on a loop patched by udpx.patch_loop: udpx's drop-in "
            "endpoint, whose sendto() queues and sends once per loop iteration (sendmmsg, or "
            "one GSO send per run to one peer).",
        ])


def _clients_args(port: int, pid: int, *, echo: Path, size: int, peers: int, warmup: float,
                  window: float, deadline: float) -> list[str]:
    return [str(echo), "clients", str(port), str(size), str(peers), f"{warmup}", f"{window}",
            f"{deadline}", str(pid)]


def echo_many_case(size: int, settings: Settings, programs: Programs) -> Case:
    configs: list[Config] = []
    for peers in settings.echo_peers:
        # The largest group carries a target (10,000 peers, protocol mode against
        # DatagramProtocol) and its repetitions swing the most: it runs the full count.
        reps = settings.reps if peers == max(settings.echo_peers) else settings.secondary_reps
        # The client opens the window once every socket had a reply: allow for the start.
        warmup, window, _, deadline = _timing(
            settings, peers / 2000, warmup=None if settings.quick else ECHO_MANY_WARMUP,
            window=None if settings.quick else ECHO_MANY_WINDOW)
        servers = EchoServers(programs, deadline + 2 * SLACK)
        group = f"{peers:,}"

        client = partial(_clients_args, echo=programs["echo"], size=size, peers=peers,
                         warmup=warmup, window=window, deadline=deadline)
        for impl, name in (("udpx-recv", "udpx task: async for + send()"),
                           ("udpx-proto", "udpx ConnProtocol+send_many_nowait()")):
            for loop in ("asyncio", "uvloop"):
                servers.add(name, loop, impl, client, deadline, peers=peers, group=group,
                            reps=reps)
        servers.add("udpx ConnProtocol+send_many_nowait(), listener on 0.0.0.0", "uvloop",
                    "udpx-proto", client, deadline, peers=peers, group=group, reps=reps,
                    listen_host="0.0.0.0")
        for loop in ("asyncio", "uvloop"):
            servers.add(DROPIN, loop, "udpx-dropin", client, deadline, group=group, reps=reps)
        for loop in ("asyncio", "uvloop"):
            servers.add("DatagramProtocol", loop, "proto", client, deadline, group=group,
                        reps=reps)
        servers.add("C recvmmsg+sendmmsg", "-", "c", client, deadline, group=group, reps=reps)
        configs += servers.configs
    return Case(
        case="echo_many", title="Echo, many peers (C client, N sockets, one request in flight "
                                "on each)", size=size,
        metrics=ECHO_METRICS, configs=configs, group_label="peers",
        notes=[
            "Client: one C process with N connected sockets (N peers of the server), each "
            "with exactly one request in flight, like DNS or a game tick: send one datagram, "
            "wait for its reply, send the next; epoll over the sockets. A request not answered "
            "within 200 ms counts as a timeout and is sent again unchanged (the first reply to "
            "either copy answers it; timeouts: the whole run, warm-up included). The sockets "
            "start 256 at a time; the warm-up opens once every socket had a reply"
            + ("." if settings.quick else
               f" and lasts {ECHO_MANY_WARMUP:g} s, five timeouts, so that the resends of "
               "requests lost while the server opened its connections are over before the "
               f"window opens; the window lasts {ECHO_MANY_WINDOW:g} s (the other cases: "
               f"{settings.warmup:g} s and {settings.window:g} s)."),
            "10,000 requests in flight: a server answering fewer than 50,000 a second cannot "
            "answer them within 200 ms, and one that falls behind overflows its receive buffer "
            "(8 MiB: about 10,000 datagrams of 64 B, 3,600 of 1,200 B); every lost or late "
            "request is a timeout and its resend adds load.",
            "Server CPU: /proc/PID/schedstat over the client's window. udpx task: the "
            "README's server, an accept loop and one task per connection running "
            "`async for d in conn: await conn.send(d)`; ConnProtocol: datagrams_received() "
            "queues the batch back with send_many_nowait(). DatagramProtocol: sendto() back "
            "in datagram_received(). C: recvmmsg + sendmmsg, 64 per call. "
            f"{DROPIN}: that DatagramProtocol on a loop patched by udpx.patch_loop.",
            "One peer is a ping-pong bound by wake-up latency. With many peers the client "
            "pays two system calls and an epoll event per round trip (about as much CPU as "
            "the C server): the C server's rate is the client's ceiling, not the server's; "
            "compare servers on CPU µs/round trip. "
            f"Fewer repetitions ({settings.secondary_reps}) than the headline tables, but for "
            f"the largest group ({settings.reps}).",
        ])


# -- QUIC bulk download (aioquic) ------------------------------------------------------------

#: The body one run downloads (quick: ``QUIC_QUICK_BYTES``).
QUIC_BYTES = 50_000_000
QUIC_QUICK_BYTES = 5_000_000
#: aioquic's datagram size (QuicConfiguration.max_datagram_size, its default).
QUIC_DATAGRAM = 1200


def _has_aioquic() -> bool:
    return importlib.util.find_spec("aioquic") is not None


def _quic_once(label: str, loop: str, *, patched: bool, size: int, deadline: float,
               raw: list[dict[str, object]]) -> Metrics:
    """One download: the server (stopped by closing its stdin), then the client, which
    measures and checks the body."""
    flags = ["--patched"] if patched else []
    server = worker("quic-server", "--loop", loop, *flags, "--deadline", f"{deadline + SLACK}")
    with Proc(server, name=f"{label} server", stdin=True) as proc:
        ready = proc.event("ready", SLACK)
        client = worker("quic-client", "--loop", loop, *flags, "--port", str(ready["port"]),
                        "--bytes", str(size), "--cert", ready["cert"], "--server-pid",
                        str(proc.pid), "--deadline", f"{deadline}")
        with Proc(client, name=f"{label} client") as client_proc:
            got = client_proc.event("result", deadline + SLACK)
            client_proc.finish(SLACK)
        proc.close_stdin()
        served = proc.event("result", SLACK)
        proc.finish(SLACK)
    if got["bytes"] != size or served["served_bytes"] != size:
        raise BenchError(f"{label}: {got['bytes']} of {size} bytes ({served})")
    raw.append({"client": got, "server": served})
    return {"rate": got["rate_mb_s"], "server_cpu": got["server_cpu_ms_per_mb"],
            "client_cpu": got["client_cpu_ms_per_mb"],
            "lost": float(got["lost_packets"] + served["lost_packets"])}


def quic_case(size: int, settings: Settings, programs: Programs) -> Case:
    """``size``: the datagram size of the title (aioquic's own); the body is QUIC_BYTES."""
    body = QUIC_QUICK_BYTES if settings.quick else QUIC_BYTES
    deadline = 30.0 + body / 1e6
    configs: list[Config] = []
    missing = None if _has_aioquic() else "aioquic is not installed (pip install aioquic)"
    for patched, name, role in ((True, "aioquic, udpx.install()", "udpx"),
                                (False, "aioquic, stock loop", "baseline")):
        for loop in ("asyncio", "uvloop"):
            config = Config(name=name, loop=loop, role="udpx" if role == "udpx" else "baseline",
                            run=lambda: {}, skip=missing or _loop_skip(loop))
            config.run = partial(_quic_once, f"{name} ({loop})", loop, patched=patched,
                                 size=body, deadline=deadline, raw=config.raw)
            configs.append(config)
    return Case(
        case="quic", title=f"QUIC bulk download (aioquic, one connection, one stream of "
                           f"{body / 1e6:g} MB)", size=size,
        metrics=[Metric("rate", "MB/s", "rate", True, ratio=True),
                 Metric("server_cpu", "server CPU ms/MB", "us", False, ratio=True),
                 Metric("client_cpu", "client CPU ms/MB", "us", False, ratio=True),
                 Metric("lost", "packets lost", "count", False)],
        configs=configs,
        notes=[
            "aioquic's asyncio API, server and client each in its own process on 127.0.0.1, "
            "on the same loop: the server (aioquic.asyncio.serve, a self-signed EC "
            "certificate made at start) answers a stream carrying a byte count by writing "
            f"that many bytes and ending the stream; the client (aioquic.asyncio.connect, "
            "verifying the certificate) asks once connected and reads to the end. aioquic's "
            f"defaults: {QUIC_DATAGRAM}-byte datagrams, Reno, 1 MB flow-control windows.",
            "udpx.install(): in both processes, before the loop starts, so that aioquic's "
            "loop.create_datagram_endpoint calls open udpx's drop-in endpoint (checked: the "
            "run fails otherwise); stock loop: the loop's own endpoint.",
            "Window: from the request's sending to the body's last byte (the handshake "
            "excluded). MB: 10^6 bytes of body. Server CPU: /proc/PID/schedstat of the server "
            "process over the window (read by the client); client CPU: its own getrusage. "
            "The body's length and SHA-256 are checked after the window. Packets lost: "
            "declared lost by aioquic's recovery, server and client together (the kernel's "
            "receive-buffer drops are in the JSON).",
        ])


# -- an endpoint per query -------------------------------------------------------------------

#: Queries per run (quick: ``QUERIES_QUICK``), after a tenth as many of warm-up.
QUERIES = 2000
QUERIES_QUICK = 300


def _queries_once(label: str, args: list[str], *, count: int, programs: Programs,
                  raw: list[dict[str, object]]) -> Metrics:
    """One run: the C echo server (stopped by closing its stdin), and the worker making
    ``count`` queries to it, one endpoint each."""
    budget = 30.0 + count / 100
    with Proc([str(programs["echo"]), "server"], name="C echo server", stdin=True) as server:
        port = server.event("ready", SLACK)["port"]
        with Proc([*args, "--port", str(port), "--deadline", f"{budget}"], name=label) as proc:
            got = proc.event("result", budget + SLACK)
            proc.finish(SLACK)
        server.close_stdin()
        server.finish(SLACK)
    raw.append(got)
    if got["fds_after"] != got["fds_before"]:
        raise BenchError(f"{label}: {got['fds_after'] - got['fds_before']} file descriptors "
                         f"left open ({got})")
    return {"wall_us": got["wall_us"], "cpu_us": got["cpu_us"], "failed": float(got["failed"])}


def queries_case(size: int, settings: Settings, programs: Programs) -> Case:
    count = QUERIES_QUICK if settings.quick else QUERIES
    configs: list[Config] = []
    for loop in ("asyncio", "uvloop"):
        for impl, name, role in (("udpx-dropin", "udpx drop-in endpoint", "udpx"),
                                 ("udpx-dial", "udpx.dial() per query", "udpx"),
                                 ("stock", "the loop's own endpoint", "baseline")):
            config = Config(name=name, loop=loop, role="udpx" if role == "udpx" else "baseline",
                            run=lambda: {}, group=loop, skip=_loop_skip(loop))
            args = worker("queries", impl, "--loop", loop, "--count", str(count), "--size",
                          str(size))
            config.run = partial(_queries_once, f"{name} ({loop})", args, count=count,
                                 programs=programs, raw=config.raw)
            configs.append(config)
    return Case(
        case="queries", title="An endpoint per query (open, one request and its reply, close)",
        size=size,
        metrics=[Metric("wall_us", "µs/query", "us", False, ratio=True),
                 Metric("cpu_us", "client CPU µs/query", "us", False, ratio=True),
                 Metric("failed", "no reply in 1 s", "count", False)],
        configs=configs,
        notes=[
            f"As a DNS client makes its queries: {count:,} of them one after another (after "
            f"{max(1, count // 10):,} of warm-up), each on a new connected endpoint "
            "(loop.create_datagram_endpoint(remote_addr=...)) or a new udpx.dial(): one "
            "request, its reply, closed. Server: the C echo server, its own process. CPU: "
            "the client process's (user + system) ÷ queries; µs/query: wall time ÷ queries. "
            "The worker checks that no file descriptor is left open.",
            "udpx drop-in endpoint: the stock code on a loop patched by udpx.patch_loop. "
            "Ratios: udpx ÷ "
            "the loop's own endpoint, on the same loop.",
        ])


# -- memory ----------------------------------------------------------------------------------


def _memory_once(label: str, impl: str, loop: str, *, n: int, size: int, programs: Programs,
                 raw: list[dict[str, object]], connected: bool = False) -> Metrics:
    budget = 60.0 + n / 1000
    args = worker("memory", impl, "--loop", loop, "--n", str(n), "--size", str(size),
                  "--peers-bin", str(programs["peers"]), "--deadline", f"{budget}",
                  *(["--connected"] if connected else []))
    with Proc(args, name=label) as proc:
        got = proc.event("result", budget + SLACK)
        proc.finish(SLACK)
    raw.append(got)
    if got["conns"] < 0.99 * n:
        raise BenchError(f"{label}: only {got['conns']} of {n} connections opened ({got})")
    return {"bytes_per_conn": got["bytes_per_conn"], "rss_before": float(got["rss_before"]),
            "rss_after": float(got["rss_after"]), "conns": float(got["conns"]),
            "open_rate": got["conns"] / got["fill_seconds"],
            "cpu_us_per_conn": got["cpu_us_per_conn"], "fds": float(got["fds_after"])}


def memory_case(size: int, settings: Settings, programs: Programs) -> Case:
    configs: list[Config] = []
    for n in settings.memory_peers:
        group = f"{n:,}"
        for impl, name, loop, role in (("udpx", "udpx listener", "asyncio", "udpx"),
                                       ("udpx", "udpx listener", "uvloop", "udpx"),
                                       ("udpx-proto", "udpx listener, protocol mode", "uvloop",
                                        "udpx"),
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
            "gc.collect(). Protocol mode: listen(protocol_factory=...), each connection "
            "kept by its protocol's connection_made(), its datagram delivered and let go.",
            "Baseline: an asyncio DatagramProtocol keeping a dict from peer address to a deque, "
            "the least state a hand-written demultiplexer holds per peer.",
        ])


# -- several workers (udpx.run) -----------------------------------------------------------

#: The udpx configurations of the workers cases: worker implementation, row name, loops.
SCALE_RECEIVERS = (("udpx-recv_many", "udpx recv_many()", ("asyncio", "uvloop")),
                   ("udpx-proto", "udpx ConnProtocol", ("uvloop",)))
SCALE_ECHO_SERVERS = (("udpx-recv", "udpx task: async for + send()", ("asyncio", "uvloop")),
                      ("udpx-proto", "udpx ConnProtocol+send_many_nowait()", ("uvloop",)))
SCALE_WORKERS = (1, 2)

SCALE_METRICS = [
    Metric("rate", "datagrams/s (all workers)", "rate", True, ratio=True),
    Metric("loss", "loss", "percent", False),
    Metric("cpu_us", "CPU µs/datagram", "us", False, ratio=True),
    Metric("busy", "busiest worker's CPU", "percent", False),
    Metric("peers_min", "fewest peers/worker", "count", None),
    Metric("peers_max", "most peers/worker", "count", None),
    Metric("sender_rate", "sent datagrams/s", "rate", None),
]
SCALE_ECHO_METRICS = [
    Metric("rate", "round trips/s (all workers)", "rate", True, ratio=True),
    Metric("cpu_us", "server CPU µs/round trip", "us", False, ratio=True),
    Metric("busy", "busiest worker's CPU", "percent", False),
    Metric("timeouts", "client timeouts", "count", False),
    Metric("peers_min", "fewest peers/worker", "count", None),
    Metric("peers_max", "most peers/worker", "count", None),
]


def _workers_name(name: str, workers: int) -> str:
    return f"{name}, {workers} worker{'s' if workers != 1 else ''}"


def _scale_command(impl: str, mode: str, loop: str, *, workers: int, peers: int,
                   settings: Settings, deadline: float) -> list[str]:
    warmup, window, quiet, _ = _timing(settings)
    return worker("scale", impl, "--mode", mode, "--workers", str(workers), "--loop", loop,
                  "--warmup", f"{warmup}", "--window", f"{window}", "--quiet", f"{quiet}",
                  "--deadline", f"{deadline}", "--peers", str(peers))


def _scale_receive_once(label: str, command: list[str], workers: int, traffic: Traffic, *,
                        programs: Programs, settings: Settings,
                        raw: list[dict[str, object]]) -> Metrics:
    """One run of a udpx.run receiver: every worker prints its own ready, window_closed and
    result lines; the sender stops once every worker's window has closed."""
    warmup, window, _, deadline = _timing(settings, traffic.extra_time)
    with Proc(command, name=label) as proc:
        readies = [proc.event("ready", SLACK) for _ in range(workers)]
        port = readies[0]["port"]
        if any(ready["port"] != port for ready in readies):
            raise BenchError(f"{label}: the workers listen on different ports ({readies})")
        duration = warmup + traffic.extra_time + window + 2.0
        sender_args, sender_name = _sender_command(traffic, port, duration, "-", programs)
        with Proc(sender_args, name=sender_name) as sender:
            for _ in range(workers):
                proc.event("window_closed", deadline + SLACK)
            sender.terminate()
            sent = sender.event("result", SLACK)
            sender.finish(SLACK)
        results = [proc.event("result", deadline + SLACK) for _ in range(workers)]
        proc.finish(SLACK)
    count = sum(got["window_count"] for got in results)
    if count <= 0 or sent["total"] <= 0 or any(got["window_count"] <= 0 for got in results):
        raise BenchError(f"{label}: nothing measured in a worker ({results}, sender {sent})")
    raw.append({"workers": results, "sender": sent})
    peers = [got["conns"] for got in results]
    return {"rate": sum(got["rate"] for got in results),
            "loss": max(0.0, 1 - sum(got["total"] for got in results) / sent["total"]),
            "cpu_us": sum(got["cpu_seconds"] for got in results) * 1e6 / count,
            "busy": max(got["cpu_seconds"] / got["window_seconds"] for got in results),
            "peers_min": float(min(peers)), "peers_max": float(max(peers)),
            "sender_rate": sent["rate"]}


def scale_case(size: int, settings: Settings, programs: Programs) -> Case:
    peers = settings.scale_peers
    refused = _raw_refused()
    traffic = Traffic(size, peers=peers, burst=1, mode="mmsg" if refused else "raw",
                      extra_time=peers / 2000)
    reps = settings.secondary_reps
    _, _, _, deadline = _timing(settings, traffic.extra_time)
    configs: list[Config] = []
    for workers in SCALE_WORKERS:
        for impl, name, loops in SCALE_RECEIVERS:
            for loop in loops:
                row = _workers_name(name, workers)
                # One worker is the baseline of the ratios: 2 workers ÷ 1 worker.
                config = Config(name=row, loop=loop, role="udpx" if workers > 1 else
                                "baseline", run=lambda: {}, skip=_loop_skip(loop), reps=reps)
                config.run = partial(
                    _scale_receive_once, f"{row} ({loop})",
                    _scale_command(impl, "receive", loop, workers=workers, peers=peers,
                                   settings=settings, deadline=deadline),
                    workers, traffic, programs=programs, settings=settings, raw=config.raw)
                configs.append(config)
    sink = Receivers(programs, settings)
    sink.add("C recvmmsg (one process)", "-", "c", traffic, reps=reps)
    configs += sink.configs
    sender = (f"{refused}, so {peers:,} UDP sockets, one sendmmsg of 1 per socket per turn"
              if refused else f"one raw socket, hand-built packets from {peers:,} source "
                              "ports, round-robin, sendmmsg of 64 per call")
    return Case(
        case="scale", title=f"Workers: udpx.run(main, workers=N) receiving from {peers:,} "
                            "peers (no GSO)", size=size,
        metrics=SCALE_METRICS, configs=configs,
        notes=[
            f"Sender: C, no GSO, {sender} (as in the many-connections table). udpx: "
            "udpx.run(main, workers=N) on one port; each worker's listen() defaults to "
            "reuse_port=True when N > 1, so the kernel's SO_REUSEPORT hash of the source "
            "address gives each worker its share of the peers (fewest/most peers per worker). "
            "recv_many(): an accepted connection and a task per peer; ConnProtocol: protocol "
            "mode, no task. 1 worker: the same main in one process (reuse_port off).",
            "Each worker measures its own window (opened once its set of connections stopped "
            "growing for 50 ms, then the warm-up): rate = the sum of the workers' rates; CPU "
            "µs/datagram = the workers' CPU (user + system) summed over their windows ÷ the "
            "datagrams they received in them, i.e. the CPU a datagram costs whichever worker "
            "gets it; busiest worker's CPU = its CPU time ÷ its window (100% = one CPU).",
            "This machine has 2 CPUs: the sender, the kernel's loopback delivery (softirq, "
            "charged to the sender) and the workers all share them, so with 2 workers three "
            "busy processes compete for two CPUs and the aggregate rate cannot "
            "double here; compare CPU µs/datagram (what a datagram costs a worker) "
            "and the busiest worker's CPU (how close a worker is to a CPU of its own).",
            "Ratios: N workers ÷ 1 worker (the 1-worker rows are the baselines), and ÷ the C "
            "recvmmsg receiver (one process, no per-peer state). Fewer repetitions "
            f"({reps}) than the headline tables.",
        ])


def _scale_echo_once(label: str, command: list[str], workers: int, *, size: int, peers: int,
                     settings: Settings, programs: Programs,
                     raw: list[dict[str, object]]) -> Metrics:
    """One run of a udpx.run echo server (or the C one: ``workers`` 0) against the C
    many-socket client, which reads every worker's CPU from /proc/PID/schedstat; SIGTERM
    stops the server (udpx.run cancels main in each worker, which then reports)."""
    warmup, window, _, deadline = _timing(settings, peers / 2000)
    with Proc(command, name=label, stdin=workers == 0) as proc:
        readies = [proc.event("ready", SLACK) for _ in range(max(1, workers))]
        port = readies[0]["port"]
        pids = ",".join(str(ready.get("pid", proc.pid)) for ready in readies)
        client = [str(programs["echo"]), "clients", str(port), str(size), str(peers),
                  f"{warmup}", f"{window}", f"{deadline}", pids]
        with Proc(client, name="C echo clients") as client_proc:
            got = client_proc.event("result", deadline + SLACK)
            client_proc.finish(SLACK)
        if workers == 0:
            proc.close_stdin()
            results = [proc.event("result", SLACK)]
        else:
            proc.terminate()
            results = [proc.event("result", SLACK) for _ in range(workers)]
        proc.finish(SLACK)
    if got["window_count"] <= 0 or got["server_cpu_seconds"] < 0:
        raise BenchError(f"{label}: no round trip measured ({got})")
    raw.append({"client": got, "server": results})
    seconds = got["window_seconds"]
    metrics = {"rate": got["rate"], "cpu_us": got["server_cpu_us_per_rt"],
               "timeouts": float(got["timeouts"]),
               "busy": max(each / seconds for each in got["server_cpu_each"])}
    if workers:
        peers_each = [served["conns"] for served in results]
        metrics.update(peers_min=float(min(peers_each)), peers_max=float(max(peers_each)))
    return metrics


def scale_echo_case(size: int, settings: Settings, programs: Programs) -> Case:
    peers = settings.scale_peers
    reps = settings.secondary_reps
    _, _, _, deadline = _timing(settings, peers / 2000)
    configs: list[Config] = []
    for workers in SCALE_WORKERS:
        for impl, name, loops in SCALE_ECHO_SERVERS:
            for loop in loops:
                row = _workers_name(name, workers)
                config = Config(name=row, loop=loop, role="udpx" if workers > 1 else
                                "baseline", run=lambda: {}, skip=_loop_skip(loop), reps=reps)
                config.run = partial(
                    _scale_echo_once, f"{row} ({loop})",
                    _scale_command(impl, "echo", loop, workers=workers, peers=peers,
                                   settings=settings, deadline=deadline + 2 * SLACK),
                    workers, size=size, peers=peers, settings=settings, programs=programs,
                    raw=config.raw)
                configs.append(config)
    c_server = Config(name="C recvmmsg+sendmmsg (one process)", loop="-", role="baseline",
                      run=lambda: {}, reps=reps)
    c_server.run = partial(_scale_echo_once, "C echo server", [str(programs["echo"]), "server"],
                           0, size=size, peers=peers, settings=settings, programs=programs,
                           raw=c_server.raw)
    configs.append(c_server)
    return Case(
        case="scale_echo", title=f"Workers: udpx.run(main, workers=N) echoing to {peers:,} "
                                 "peers (C client, one request in flight on each)", size=size,
        metrics=SCALE_ECHO_METRICS, configs=configs,
        notes=[
            f"Client: the many-peer echo client ({peers:,} connected sockets in one C process, "
            "one request in flight on each, 200 ms timeout and resend; no GSO). Server: "
            "udpx.run(main, workers=N) on one port, listen()'s default reuse_port (True when "
            "N > 1); the README's task-per-connection echo, or protocol mode. SIGTERM to the "
            "run stops it (udpx.run cancels main in every worker, which then reports).",
            "Server CPU: the client reads every worker's /proc/PID/schedstat at both ends of "
            "its window; CPU µs/round trip = their sum ÷ round trips (what a round trip costs "
            "whichever worker serves it); busiest worker's CPU = its CPU time ÷ the window.",
            "This machine has 2 CPUs: the client (two system calls and an epoll event per "
            "round trip, about what the C server spends) and the workers share them, so the "
            "C server's rate is the client's ceiling and 2 workers cannot double the rate "
            "here; compare CPU µs/round trip and the busiest worker's CPU.",
            "Ratios: N workers ÷ 1 worker (the 1-worker rows are the baselines), and ÷ the C "
            f"server (one process). Fewer repetitions ({reps}) than the headline tables.",
        ])


# -- connected mode against the shared socket ------------------------------------------------

CONNECTED_METRICS = [
    *RECEIVE_METRICS,
    Metric("fds", "fds open", "count", False, ratio=True),
    Metric("rss", "RSS (MiB)", "mib", False),
    Metric("ready_after", "s until N connections", "us", False),
]


def connected_case(size: int, settings: Settings, programs: Programs) -> Case:
    receivers = Receivers(programs, settings)
    refused = _raw_refused()
    reps = settings.secondary_reps
    for peers in settings.connected_peers:
        if peers == 1:
            traffic = Traffic(size, mode="mmsg")
        else:
            traffic = Traffic(size, peers=peers, burst=1, mode="mmsg" if refused else "raw",
                              extra_time=peers / 2000)
        for impl, name in UDPX_RECEIVERS[1:]:
            for loop in ("asyncio", "uvloop"):
                # The shared socket is the baseline of the ratios: connected ÷ shared.
                receivers.add(f"{name}, shared socket", loop, impl, traffic,
                              group=f"{peers:,}", reps=reps)
                receivers.add(f"{name}, connected=True", loop, impl, traffic, udpx=True,
                              group=f"{peers:,}", reps=reps, connected=True)
    sender = (f"{refused}, so N UDP sockets, one sendmmsg of 1 per socket per turn" if refused
              else "one raw socket, hand-built packets from N source ports, round-robin, "
                   "sendmmsg of 64 per call")
    return Case(
        case="connected", title="Connected mode (a socket per peer) against the shared socket "
                                "(N active peers, no GSO)", size=size,
        metrics=CONNECTED_METRICS, configs=receivers.configs, group_label="peers",
        notes=[
            f"Sender: C, no GSO. 1 peer: one socket, sendmmsg of {RECEIVE_BURST}. N peers: "
            f"{sender} (as in the many-connections table).",
            "udpx: listen(..., connected=False) (shared socket: one socket, one reader, the "
            "demultiplexer routes by source address) or connected=True (every new peer gets a "
            "socket of its own, bound to the listener's address and connect()ed to the peer, "
            "with its own reader and writer). recv_many(): an accepted connection and a task "
            "per peer; ConnProtocol: protocol mode, no task.",
            "fds open: /proc/PID/fd of the receiver process counted at the end of the window "
            "(all N connections open): the interpreter's own, the listener's socket and, in "
            "connected mode, one socket per peer; RSS: the receiver's resident memory then "
            "(the peer sockets share their batch arrays, receive arena and send arrays). s "
            "until N connections: from the receiver's ready to all N connections existing, "
            "under the flood, so not the admission cost itself: see the next table.",
            "Ratios: connected ÷ shared (the shared-socket rows are the baselines). Fewer "
            f"repetitions ({reps}) than the headline tables.",
        ])


def connected_admit_case(size: int, settings: Settings, programs: Programs) -> Case:
    configs: list[Config] = []
    reps = settings.secondary_reps
    for n in settings.admit_peers:
        group = f"{n:,}"
        for connected in (False, True):
            for loop in ("asyncio", "uvloop"):
                name = "udpx listener, " + ("connected=True" if connected else "shared socket")
                config = Config(name=name, loop=loop, role="udpx" if connected else "baseline",
                                run=lambda: {}, group=group, skip=_loop_skip(loop), reps=reps)
                config.run = partial(_memory_once, f"{name} ({loop}, {n})", "udpx", loop, n=n,
                                     size=size, programs=programs, raw=config.raw,
                                     connected=connected)
                configs.append(config)
    return Case(
        case="connected_admit", title="Connected mode: admitting N new peers (one datagram "
                                      "each)", size=size,
        metrics=[Metric("cpu_us_per_conn", "CPU µs/new peer", "us", False, ratio=True),
                 Metric("open_rate", "connections opened/s", "rate", True, ratio=True),
                 Metric("bytes_per_conn", "RSS bytes/connection", "bytes", False),
                 Metric("fds", "fds open", "count", False)],
        configs=configs, group_label="peers",
        notes=[
            "The memory case's procedure: a C process sends one datagram from each of N new "
            "source addresses (bind, send, close), 2,000 at a time so that none is lost; the "
            "listener accepts every connection, reads its datagram and keeps it (no task); "
            "idle_timeout=None. CPU µs/new peer: the listener process's CPU (user + system) "
            "while the N connections open ÷ N (includes the 2 ms polling of the fill loop, "
            "the same in both modes); connections opened/s: N ÷ the fill's wall time (paced by "
            "the C sender too). RSS: the process's, so it excludes the kernel's socket memory "
            "(about 1 KiB per socket plus its queued buffers). fds: /proc/PID/fd after the "
            "fill.",
            "Ratios: connected ÷ shared. Fewer repetitions "
            f"({reps}) than the headline tables.",
        ])


CASES: dict[str, Callable[[int, Settings, Programs], Case]] = {
    "receive": receive_case,
    "receive_gso": receive_gso_case,
    "send": send_case,
    "echo": echo_case,
    "echo_many": echo_many_case,
    "many": many_case,
    "many_gso": many_gso_case,
    "quic": quic_case,
    "queries": queries_case,
    "memory": memory_case,
    "scale": scale_case,
    "scale_echo": scale_echo_case,
    "connected": connected_case,
    "connected_admit": connected_admit_case,
}
