"""The Python processes of the benchmark suite: receivers, senders, echo servers, memory.

Run by path (``python benchmarks/_workers.py KIND ...``) by the harness, one process per role,
never inside the pytest process. Every worker prints JSON lines on stdout: ``{"event": "ready",
"port": P}`` once it listens (receivers and servers), then one ``{"event": "result", ...}`` line.
Each has its own deadline; the harness kills it too if it overstays.

Measurement, the same in every worker (and in the C programs): a counter of datagrams is sampled
every 10 ms; the window opens ``warmup`` seconds after the counter first moves and lasts
``window`` seconds; the rate is the counter's increase over the window divided by the window's
length, and CPU time is this process's user + system time (``getrusage``) over the window.
Counting costs the same in every Python receiver: one attribute increment per datagram (or per
batch for ``recv_many``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import hashlib
import ipaddress
import json
import os
import random
import resource
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import udpx

T = TypeVar("T")

#: Every receiver asks for the same buffer (the kernel doubles it, capped by rmem_max).
RCVBUF = 4 * 1024 * 1024
HOST = "127.0.0.1"
TICK = 0.01


def emit(event: str, **fields: Any) -> None:
    # One write of the whole line: the workers of a udpx.run share stdout, and print() writes
    # the text and its newline separately (two system calls when stdout is unbuffered, as
    # with PYTHONUNBUFFERED), which lets another worker's line in between. A line is far
    # below PIPE_BUF, so one write reaches the pipe whole.
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sleeps() -> int:
    """Voluntary context switches so far: how often this process waited for the kernel."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


#: SO_MEMINFO (Linux): the socket's memory counters; word 8 is the kernel's drop count.
SO_MEMINFO = 55
SK_MEMINFO_VARS = 9


def socket_drops(sock: Any) -> Callable[[], int]:
    """A reader of the kernel's drop count for ``sock`` (a socket, or the socket-like object
    a transport reports), or of 0 where the platform does not say."""
    def read() -> int:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * SK_MEMINFO_VARS)
        except OSError:
            return 0
        return int.from_bytes(raw[32:36], sys.byteorder) if len(raw) >= 36 else 0
    return read


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    """File descriptors this process has open (/proc/self/fd)."""
    return len(os.listdir("/proc/self/fd"))


def run_on(loop_name: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` on a fresh loop of the named kind."""
    if loop_name == "uvloop":
        import uvloop  # noqa: PLC0415 - only when asked for

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    with asyncio.Runner() as runner:
        return runner.run(main())


class Counter:
    """The one counter a worker's hot path increments."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class Window:
    """Samples ``count()`` every 10 ms and measures rate and CPU over the window."""

    def __init__(self, count: Callable[[], int], *, warmup: float, window: float, quiet: float,
                 deadline: float, linger: bool = True,
                 ready: Callable[[], bool] | None = None) -> None:
        self.count = count
        self.linger = linger
        #: The warm-up starts once traffic flows and this says yes (all connections exist).
        self.ready = ready
        self.ready_after = 0.0
        self.warmup = warmup
        self.window = window
        self.quiet = quiet
        self.deadline = deadline
        self.closed = asyncio.Event()  # set when the window has closed
        #: The receiving socket's kernel drop count (buffer full), sampled as the window opens
        #: and closes: the loss of the window alone, apart from the connection opening.
        self.drops: Callable[[], int] | None = None

    async def run(self) -> dict[str, Any]:
        """Return once the window closed and the counter stood still for ``quiet`` seconds
        (or at the deadline)."""
        start = time.perf_counter()
        first = t0 = t1 = -1.0
        c0 = c1 = 0
        cpu0 = cpu1 = 0.0
        sleeps0 = sleeps1 = 0
        drops0 = drops1 = 0
        drops = self.drops if self.drops is not None else (lambda: 0)
        last_value = 0
        last_change = last_tick = start
        while True:
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            value = self.count()
            # A tick that came ``quiet`` late is a stalled loop, not quiet traffic: what it
            # read may not be counted yet (the consumers run after this callback).
            if value != last_value or now - last_tick >= self.quiet:
                last_value = value
                last_change = now
            last_tick = now
            if first < 0 and value > 0 and (self.ready is None or self.ready()):
                first = now
                self.ready_after = now - start
            if first >= 0 and t0 < 0 and now >= first + self.warmup:
                t0, c0, cpu0, sleeps0, drops0 = now, value, cpu_seconds(), sleeps(), drops()
            if t0 >= 0 and t1 < 0 and now >= t0 + self.window:
                t1, c1, cpu1, sleeps1, drops1 = now, value, cpu_seconds(), sleeps(), drops()
                self.closed.set()
                if not self.linger:
                    break
                emit("window_closed")  # the harness stops the sender now
            if now - start >= self.deadline:
                break
            if first >= 0 and now - last_change >= self.quiet and (
                    t1 >= 0 or now - first > self.warmup + self.window):
                break
        complete = t1 >= 0
        if t0 >= 0 and t1 < 0:  # the traffic stopped early: close the window at its end
            t1, c1, cpu1, sleeps1 = last_change, last_value, cpu_seconds(), sleeps()
            drops1 = drops()
        self.closed.set()
        seconds = t1 - t0 if t0 >= 0 else 0.0
        count = c1 - c0
        cpu = cpu1 - cpu0
        return {"total": last_value, "window_count": count, "window_seconds": seconds,
                "cpu_seconds": cpu, "rate": count / seconds if seconds > 0 else 0.0,
                "cpu_us_per_dgram": cpu * 1e6 / count if count > 0 else 0.0,
                "sleeps_per_dgram": (sleeps1 - sleeps0) / count if count > 0 else 0.0,
                "window_complete": complete,
                **({"window_kernel_drops": drops1 - drops0} if self.drops is not None else {})}


def receiving_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    return sock


def coalescing(args: argparse.Namespace) -> dict[str, Any]:
    """``--rx-coalesce`` as a udpx option (none: udpx's default)."""
    value = getattr(args, "rx_coalesce", None)
    return {} if value is None else {"rx_coalesce": value}


def pauses(described: dict[str, Any]) -> dict[str, Any]:
    """A udpx socket's read-coalescing counters, from its ``describe()["socket"]``."""
    return {key: described[key] for key in ("rx_pauses", "rx_pauses_failed") if key in described}


def dropin_loop(impl: str, args: argparse.Namespace) -> asyncio.AbstractEventLoop:
    """The running loop; for "udpx-dropin" patched first (``udpx.patch_loop``), so that the
    stock code's ``loop.create_datagram_endpoint`` opens udpx's drop-in endpoint."""
    loop = asyncio.get_running_loop()
    if impl == "udpx-dropin":
        udpx.patch_loop(loop, **coalescing(args))
    return loop


def endpoint_extra(impl: str, transport: asyncio.BaseTransport) -> dict[str, Any]:
    """Which transport served, and a drop-in endpoint's counters.

    Raises:
        SystemExit: the transport is not the one ``impl`` asks for (udpx's, or the loop's).
    """
    if isinstance(transport, udpx.EndpointTransport) != (impl == "udpx-dropin"):
        raise SystemExit(f"{impl}: served by {type(transport).__name__}")
    extra: dict[str, Any] = {"transport": type(transport).__name__}
    if isinstance(transport, udpx.EndpointTransport):
        stats = transport.stats
        extra.update(drops=dict(stats.drops), rx_packets=stats.rx_packets,
                     tx_packets=stats.tx_packets, **pauses(transport.describe()["socket"]))
    return extra


# -- receivers -------------------------------------------------------------------------------


class CountingProtocol(asyncio.DatagramProtocol):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.counter.n += 1


class CountingConnProtocol(udpx.ConnProtocol):
    """udpx's protocol mode: one call per connection per received batch."""

    def __init__(self, counter: Counter, conns: Counter) -> None:
        self.counter = counter
        self.conns = conns

    def connection_made(self, conn: udpx.UDPConn) -> None:
        self.conns.n += 1

    def datagrams_received(self, datagrams: list[bytes]) -> None:
        self.counter.n += len(datagrams)


async def consume_recv(conn: udpx.UDPConn, counter: Counter) -> None:
    recv = conn.recv
    with contextlib.suppress(udpx.ConnectionClosed):
        while True:
            await recv()
            counter.n += 1


async def consume_recv_many(conn: udpx.UDPConn, counter: Counter) -> None:
    recv_many = conn.recv_many
    with contextlib.suppress(udpx.ConnectionClosed):
        while True:
            batch = await recv_many()
            counter.n += len(batch)


def handed_over(ln: udpx.Listener) -> bool:
    """Whether every connection reads its own socket (always, but in connected mode until its
    handover is done): the window's steady state starts there."""
    return not ln.describe(max_conns=0)["handover_pending"]


async def _measure_listener(ln: udpx.Listener,
                            window: Window) -> tuple[dict[str, Any], dict[str, Any]]:
    """Announce the listener's port, run the measurement window, then close the listener:
    the window's result and the listener's counters."""
    emit("ready", port=ln.local_addr[1])
    window.drops = lambda: int(ln.stats.drops["kernel"])
    result = await window.run()
    stats = ln.stats
    extra = {"conns": stats.conns, "drops": dict(stats.drops), "ready_after": window.ready_after,
             "fds": open_fds(), "rss": rss_bytes(), **pauses(ln.describe()["socket"])}
    await ln.aclose()
    return result, extra


async def receive(args: argparse.Namespace) -> dict[str, Any]:
    counter = Counter()
    window = Window(lambda: counter.n, warmup=args.warmup, window=args.window, quiet=args.quiet,
                    deadline=args.deadline)
    extra: dict[str, Any] = {}
    peers = args.peers
    # Room for every peer (the flood's first datagrams open the connections).
    options: dict[str, Any] = {"rcvbuf": RCVBUF, "max_conns": max(65536, 2 * peers),
                               "backlog": max(1024, 2 * peers), "batch_size": args.batch_size,
                               "connected": args.connected, **coalescing(args)}
    if args.impl in ("udpx-recv", "udpx-recv_many"):
        consume = consume_recv if args.impl == "udpx-recv" else consume_recv_many
        ln = await udpx.listen(args.listen_host, 0, **options)
        tasks: set[asyncio.Task[None]] = set()
        window.ready = lambda: len(tasks) >= peers and (not args.connected or handed_over(ln))

        async def accept_all() -> None:
            async for conn in ln:
                task = asyncio.create_task(consume(conn, counter))
                tasks.add(task)

        acceptor = asyncio.create_task(accept_all())
        result, extra = await _measure_listener(ln, window)
        acceptor.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
    elif args.impl == "udpx-proto":
        conns = Counter()
        ln = await udpx.listen(args.listen_host, 0, protocol_factory=lambda: CountingConnProtocol(
            counter, conns), **options)
        window.ready = lambda: conns.n >= peers and (not args.connected or handed_over(ln))
        result, extra = await _measure_listener(ln, window)
    elif args.impl in ("proto", "udpx-dropin"):
        # The same protocol and call; "udpx-dropin" on a loop patched by udpx.patch_loop, so
        # that loop.create_datagram_endpoint is udpx's drop-in endpoint.
        loop = dropin_loop(args.impl, args)
        sock = receiving_socket()
        transport, _ = await loop.create_datagram_endpoint(lambda: CountingProtocol(counter),
                                                           sock=sock)
        emit("ready", port=sock.getsockname()[1])
        window.drops = socket_drops(transport.get_extra_info("socket"))
        result = await window.run()
        extra = endpoint_extra(args.impl, transport)
        transport.close()
    elif args.impl == "asyncio-dgram":
        import asyncio_dgram  # noqa: PLC0415 - an optional baseline

        dgram_sock = receiving_socket()
        stream = await asyncio_dgram.from_socket(dgram_sock)
        emit("ready", port=stream.sockname[1])
        window.drops = socket_drops(dgram_sock)

        async def drain() -> None:
            recv = stream.recv
            while True:
                await recv()
                counter.n += 1

        drainer = asyncio.create_task(drain())
        result = await window.run()
        drainer.cancel()
        await asyncio.gather(drainer, return_exceptions=True)
        stream.close()
    else:
        raise SystemExit(f"unknown receiver {args.impl}")
    return {**result, **extra}


# -- senders ---------------------------------------------------------------------------------


class FlowProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.resumed = asyncio.Event()
        self.resumed.set()

    def pause_writing(self) -> None:
        self.resumed.clear()

    def resume_writing(self) -> None:
        self.resumed.set()


async def send_async(args: argparse.Namespace) -> dict[str, Any]:
    payload = b"s" * args.size
    counter = Counter()
    stop = False
    window = Window(lambda: counter.n, warmup=args.warmup, window=args.window,
                    quiet=args.deadline, deadline=args.deadline, linger=False)

    async def stop_after_window() -> None:
        nonlocal stop
        await window.closed.wait()
        stop = True

    extra: dict[str, Any] = {}
    if args.impl in ("udpx-send", "udpx-send_many"):
        conn = await udpx.dial(HOST, args.port, gso=not args.no_gso)
        window.count = lambda: conn.stats.tx_packets

        async def send_loop() -> None:
            send = conn.send
            if args.impl == "udpx-send":
                while not stop:
                    await send(payload)
            else:
                batch = [payload] * 64
                send_many = conn.send_many
                while not stop:
                    await send_many(batch)

        sender = asyncio.create_task(send_loop())
        watcher = asyncio.create_task(stop_after_window())
        result = await window.run()
        await sender
        await watcher
        await conn.aclose()
        result["total"] = conn.stats.tx_packets
        extra = {"drops": dict(conn.stats.drops)}
    elif args.impl == "sendto":
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            FlowProtocol, remote_addr=(HOST, args.port))

        async def sendto_loop() -> None:
            sendto = transport.sendto
            resumed = protocol.resumed
            while not stop:
                for _ in range(64):
                    sendto(payload)
                counter.n += 64
                if resumed.is_set():
                    await asyncio.sleep(0)
                else:
                    await resumed.wait()

        sender = asyncio.create_task(sendto_loop())
        watcher = asyncio.create_task(stop_after_window())
        result = await window.run()
        await sender
        await watcher
        extra = {"unsent_bytes": cast(Any, transport).get_write_buffer_size()}
        transport.close()
        await asyncio.sleep(0)
    else:
        raise SystemExit(f"unknown sender {args.impl}")
    return {**result, **extra}


async def flood(args: argparse.Namespace) -> dict[str, Any]:
    """A udpx sender that saturates a receiver, as the C ``blast`` does: a dialed connection
    (default options: runs of equal-size datagrams go out as one GSO send) calling
    ``send_many()`` of 64 in a loop until SIGTERM, ``--duration`` seconds or ``--max-count``."""
    payload = b"s" * args.size
    batch = [payload] * 64
    conn = await udpx.dial(HOST, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    end = start + args.duration

    async def send_loop() -> None:
        send_many = conn.send_many
        clock = time.perf_counter
        queued = 0
        while not stop.is_set() and queued < args.max_count and clock() < end:
            await send_many(batch)
            queued += 64
            if queued % 4096 == 0:
                await asyncio.sleep(0)  # let the signal handler run even if never blocked

    # The receiver gone (ICMP port unreachable) ends the flood, as it ends blast.
    with contextlib.suppress(ConnectionRefusedError, udpx.ConnectionClosed):
        await send_loop()
    await conn.aclose()
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds() - cpu0
    sent = conn.stats.tx_packets
    loop.remove_signal_handler(signal.SIGTERM)
    return {"total": sent, "seconds": elapsed, "rate": sent / elapsed, "cpu_seconds": cpu,
            "cpu_us_per_dgram": cpu * 1e6 / sent if sent else 0.0, "mode": "udpx",
            "drops": dict(conn.stats.drops)}


def send_socket(args: argparse.Namespace) -> dict[str, Any]:
    """Plain blocking ``socket.send`` in a loop (no event loop), checking the clock every 64."""
    payload = b"s" * args.size
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((HOST, args.port))
    send = sock.send
    sent = 0
    start = time.perf_counter()
    t0 = start + args.warmup
    t1 = t0 + args.window
    c0 = c1 = 0
    cpu0 = cpu1 = 0.0
    opened = False
    while True:
        for _ in range(64):
            send(payload)
        sent += 64
        now = time.perf_counter()
        if not opened and now >= t0:
            opened, t0, c0, cpu0 = True, now, sent, cpu_seconds()
        elif opened and now >= t1:
            t1, c1, cpu1 = now, sent, cpu_seconds()
            break
    sock.close()
    count = c1 - c0
    cpu = cpu1 - cpu0
    return {"total": sent, "window_count": count, "window_seconds": t1 - t0, "cpu_seconds": cpu,
            "rate": count / (t1 - t0), "cpu_us_per_dgram": cpu * 1e6 / count,
            "window_complete": True}


# -- echo servers ----------------------------------------------------------------------------


class EchoProtocol(asyncio.DatagramProtocol):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (asyncio's own datagram transport does not subclass DatagramTransport on 3.11)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)
        self.counter.n += 1


async def echo_recv(conn: udpx.UDPConn, counter: Counter) -> None:
    # The README's echo loop: one await per datagram each way.
    with contextlib.suppress(udpx.ConnectionClosed):
        async for datagram in conn:
            await conn.send(datagram)
            counter.n += 1


async def echo_recv_many(conn: udpx.UDPConn, counter: Counter) -> None:
    recv_many = conn.recv_many
    send_many = conn.send_many
    with contextlib.suppress(udpx.ConnectionClosed):
        while True:
            batch = await recv_many()
            await send_many(batch)
            counter.n += len(batch)


class EchoConnProtocol(udpx.ConnProtocol):
    """udpx's protocol mode: each received batch is queued back at once."""

    def __init__(self, counter: Counter, full: Counter) -> None:
        self.counter = counter
        self.full = full
        self.conn: udpx.UDPConn | None = None

    def connection_made(self, conn: udpx.UDPConn) -> None:
        self.conn = conn

    def datagrams_received(self, datagrams: list[bytes]) -> None:
        assert self.conn is not None
        try:
            self.conn.send_many_nowait(datagrams)
        except udpx.QueueFull:
            self.full.n += 1  # the transmit queue is full: none of these is answered
        else:
            self.counter.n += len(datagrams)


async def stdin_closed() -> None:
    """Wait until the harness closes our stdin (its way of saying stop)."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def readable() -> None:
        if not os.read(0, 4096):
            done.set()

    loop.add_reader(0, readable)
    try:
        await done.wait()
    finally:
        loop.remove_reader(0)


async def echo(args: argparse.Namespace) -> dict[str, Any]:
    counter = Counter()
    extra: dict[str, Any] = {}
    options: dict[str, Any] = {"rcvbuf": RCVBUF, "max_conns": max(65536, 2 * args.peers),
                               "backlog": max(1024, 2 * args.peers), **coalescing(args)}
    if args.impl in ("udpx-recv", "udpx-recv_many"):
        serve = echo_recv if args.impl == "udpx-recv" else echo_recv_many
        ln = await udpx.listen(args.listen_host, 0, **options)
        tasks: set[asyncio.Task[None]] = set()

        async def accept_all() -> None:
            async for conn in ln:
                tasks.add(asyncio.create_task(serve(conn, counter)))

        acceptor = asyncio.create_task(accept_all())
        emit("ready", port=ln.local_addr[1])
        await asyncio.wait_for(stdin_closed(), args.deadline)
        stats = ln.stats
        extra = {"drops": dict(stats.drops), "conns": stats.conns,
                 **pauses(ln.describe()["socket"])}
        await ln.aclose()
        acceptor.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
    elif args.impl == "udpx-proto":
        full = Counter()
        ln = await udpx.listen(args.listen_host, 0,
                               protocol_factory=lambda: EchoConnProtocol(counter, full),
                               **options)
        emit("ready", port=ln.local_addr[1])
        await asyncio.wait_for(stdin_closed(), args.deadline)
        stats = ln.stats
        extra = {"drops": dict(stats.drops), "conns": stats.conns, "queue_full": full.n,
                 **pauses(ln.describe()["socket"])}
        await ln.aclose()
    elif args.impl in ("proto", "udpx-dropin"):
        loop = dropin_loop(args.impl, args)
        sock = receiving_socket()
        transport, _ = await loop.create_datagram_endpoint(lambda: EchoProtocol(counter),
                                                           sock=sock)
        emit("ready", port=sock.getsockname()[1])
        await asyncio.wait_for(stdin_closed(), args.deadline)
        extra = endpoint_extra(args.impl, transport)
        transport.close()
    else:
        raise SystemExit(f"unknown echo server {args.impl}")
    return {"echoed": counter.n, "cpu_seconds": cpu_seconds(), **extra}


# -- several workers: udpx.run -----------------------------------------------------------------


class Settled:
    """Says yes once ``count()`` is above zero and has not changed for ``hold`` seconds: a
    worker of a multi-worker run does not know how many of the N peers the kernel's hash will
    send it, so its warm-up starts once its set of connections stopped growing."""

    def __init__(self, count: Callable[[], int], hold: float = 0.05) -> None:
        self.count = count
        self.hold = hold
        self.value = -1
        self.since = 0.0

    def __call__(self) -> bool:
        now = time.perf_counter()
        value = self.count()
        if value != self.value:
            self.value, self.since = value, now
            return False
        return value > 0 and now - self.since >= self.hold


def scale(args: argparse.Namespace) -> None:
    """``udpx.run(main, workers=N)`` on one port, as the README's server does: every worker
    listens with ``listen()``'s default ``reuse_port`` (True with several workers) and prints
    its own JSON lines (each carries its ``worker`` id and ``pid``). "receive": each worker
    counts what its connections receive over its own window and returns; "echo": each worker
    echoes until SIGTERM (udpx.run cancels main in every worker) and then reports."""
    # A free port every worker can bind: port 0 cannot be shared (a probe, as perf --workers).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((HOST, 0))
        port = int(probe.getsockname()[1])
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if args.loop == "uvloop":
        import uvloop  # noqa: PLC0415 - only when asked for

        loop_factory = uvloop.new_event_loop
    job = scale_receive if args.mode == "receive" else scale_echo

    async def main() -> None:
        await job(args, port)

    udpx.run(main, workers=args.workers, loop_factory=loop_factory)


def _scale_options(args: argparse.Namespace) -> dict[str, Any]:
    # Room for every peer; reuse_port is left to listen()'s default (True in a worker of a
    # multi-worker run, False with one worker).
    return {"rcvbuf": RCVBUF, "max_conns": max(65536, 2 * args.peers),
            "backlog": max(1024, 2 * args.peers)}


def _whoami() -> dict[str, Any]:
    return {"worker": udpx.worker_id(), "pid": os.getpid()}


async def scale_receive(args: argparse.Namespace, port: int) -> None:
    counter = Counter()
    conns = Counter()
    window = Window(lambda: counter.n, warmup=args.warmup, window=args.window, quiet=args.quiet,
                    deadline=args.deadline, ready=Settled(lambda: conns.n))
    tasks: set[asyncio.Task[None]] = set()
    acceptor: asyncio.Task[None] | None = None
    if args.impl == "udpx-recv_many":
        ln = await udpx.listen(HOST, port, **_scale_options(args))

        async def accept_all() -> None:
            async for conn in ln:
                tasks.add(asyncio.create_task(consume_recv_many(conn, counter)))
                conns.n += 1

        acceptor = asyncio.create_task(accept_all())
    elif args.impl == "udpx-proto":
        ln = await udpx.listen(HOST, port, protocol_factory=lambda: CountingConnProtocol(
            counter, conns), **_scale_options(args))
    else:
        raise SystemExit(f"unknown scale receiver {args.impl}")
    emit("ready", port=ln.local_addr[1], reuse_port=ln.options.reuse_port, **_whoami())
    result = await window.run()
    stats = ln.stats
    extra = {"conns": stats.conns, "drops": dict(stats.drops),
             "ready_after": window.ready_after, "fds": open_fds()}
    await ln.aclose()
    if acceptor is not None:
        acceptor.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*([acceptor] if acceptor else []), *tasks, return_exceptions=True)
    emit("result", **result, **extra, **_whoami())


async def scale_echo(args: argparse.Namespace, port: int) -> None:
    counter = Counter()
    full = Counter()
    tasks: set[asyncio.Task[None]] = set()
    acceptor: asyncio.Task[None] | None = None
    if args.impl == "udpx-recv":
        ln = await udpx.listen(HOST, port, **_scale_options(args))

        async def accept_all() -> None:
            async for conn in ln:
                tasks.add(asyncio.create_task(echo_recv(conn, counter)))

        acceptor = asyncio.create_task(accept_all())
    elif args.impl == "udpx-proto":
        ln = await udpx.listen(HOST, port,
                               protocol_factory=lambda: EchoConnProtocol(counter, full),
                               **_scale_options(args))
    else:
        raise SystemExit(f"unknown scale echo server {args.impl}")
    emit("ready", port=ln.local_addr[1], reuse_port=ln.options.reuse_port, **_whoami())
    try:
        # Until the harness's SIGTERM (udpx.run cancels main in every worker), or the
        # deadline (main returns: a worker whose main returned is not restarted).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), args.deadline)
    finally:
        stats = ln.stats
        emit("result", echoed=counter.n, cpu_seconds=cpu_seconds(), conns=stats.conns,
             drops=dict(stats.drops), queue_full=full.n, fds=open_fds(), **_whoami())
        await ln.aclose()
        if acceptor is not None:
            acceptor.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*([acceptor] if acceptor else []), *tasks,
                             return_exceptions=True)


# -- QUIC bulk download (aioquic) ------------------------------------------------------------

#: The body is this block (pseudo-random, the same in both processes) repeated and cut to size.
QUIC_BLOCK = 1 << 20
QUIC_ALPN = ["udpx-bench"]


def quic_block() -> bytes:
    return random.Random(0x51554943).randbytes(QUIC_BLOCK)


def quic_digest(block: bytes, size: int) -> str:
    """SHA-256 of the body of ``size`` bytes."""
    digest = hashlib.sha256()
    full, rest = divmod(size, len(block))
    for _ in range(full):
        digest.update(block)
    digest.update(block[:rest])
    return digest.hexdigest()


def self_signed() -> tuple[Any, Any, str]:
    """A certificate for localhost / 127.0.0.1 made now (EC P-256, valid for a day): the
    certificate, its key, and the certificate in PEM (for the client's verification)."""
    from cryptography import x509  # noqa: PLC0415 - only the QUIC case needs it
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key, cert.public_bytes(serialization.Encoding.PEM).decode()


def count_quic_losses() -> Counter:
    """Count the packets aioquic's loss recovery declares lost in this process (wraps
    QuicPacketRecovery._on_packets_lost, called only on losses)."""
    from aioquic.quic.recovery import QuicPacketRecovery  # noqa: PLC0415

    lost = Counter()
    original = QuicPacketRecovery._on_packets_lost

    def on_packets_lost(self: Any, *args: Any, **kwargs: Any) -> Any:
        lost.n += len(kwargs.get("packets", args[0] if args else ()))
        return original(self, *args, **kwargs)

    QuicPacketRecovery._on_packets_lost = on_packets_lost  # type: ignore[method-assign]
    return lost


def kernel_drops(port: int) -> int:
    """The receive-buffer overflows of this machine's UDP socket(s) bound to ``port``
    (/proc/net/udp and udp6, last column)."""
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    total += int(fields[-1])
    return total


def schedstat_ns(pid: int) -> int:
    """On-CPU time of process ``pid``'s main thread (/proc/PID/schedstat), in ns."""
    with open(f"/proc/{pid}/schedstat") as stat:
        return int(stat.read().split()[0])


def check_quic_transport(patched: bool, transport: object) -> str:
    if isinstance(transport, udpx.EndpointTransport) != patched:
        raise SystemExit(f"quic: {'patched' if patched else 'stock'} loop, but the endpoint "
                         f"is a {type(transport).__name__}")
    return type(transport).__name__


def endpoint_stats(transport: object) -> dict[str, Any]:
    if isinstance(transport, udpx.EndpointTransport):
        return {"udpx": transport.stats.as_dict()}
    return {}


async def quic_server(args: argparse.Namespace) -> dict[str, Any]:
    """An aioquic server (``aioquic.asyncio.serve``): on every stream, reads the request (a
    byte count, up to the end of the stream), writes that many bytes of the body and ends the
    stream. Runs until stdin closes."""
    from aioquic.asyncio.server import serve  # noqa: PLC0415 - an optional dependency
    from aioquic.quic.configuration import QuicConfiguration  # noqa: PLC0415

    if args.patched:
        udpx.install()
    lost = count_quic_losses()
    cert, key, pem = self_signed()
    configuration = QuicConfiguration(is_client=False, alpn_protocols=QUIC_ALPN)
    configuration.certificate = cert
    configuration.private_key = key
    block = quic_block()
    served = Counter()
    streams: set[asyncio.Task[None]] = set()

    async def serve_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int(await reader.read())
        full, rest = divmod(size, len(block))
        # aioquic's stream writer buffers without bound (drain() never waits): the whole
        # body is queued at once, and leaves as flow and congestion control allow.
        for _ in range(full):
            writer.write(block)
        writer.write(block[:rest])
        writer.write_eof()
        served.n += size

    def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(serve_stream(reader, writer))
        streams.add(task)
        task.add_done_callback(streams.discard)

    server = await serve(HOST, 0, configuration=configuration, stream_handler=on_stream)
    transport = server._transport
    assert transport is not None
    kind = check_quic_transport(args.patched, transport)
    port = transport.get_extra_info("sockname")[1]
    emit("ready", port=port, cert=pem, transport=kind)
    await asyncio.wait_for(stdin_closed(), args.deadline)
    drops = kernel_drops(port)
    stats = endpoint_stats(transport)
    server.close()
    if args.patched:
        udpx.uninstall()
    return {"served_bytes": served.n, "transport": kind, "lost_packets": lost.n,
            "kernel_drops": drops, "cpu_seconds": cpu_seconds(), **stats}


async def quic_client(args: argparse.Namespace) -> dict[str, Any]:
    """An aioquic client (``aioquic.asyncio.connect``, verifying the server's certificate):
    once connected, asks for ``--bytes`` on one stream and reads to its end. The window is
    the request's sending to the body's last byte: rate, this process's CPU (getrusage) and
    the server's (/proc/PID/schedstat) over it. The body's length and SHA-256 are checked
    after the window."""
    from aioquic.asyncio.client import connect  # noqa: PLC0415 - an optional dependency
    from aioquic.quic.configuration import QuicConfiguration  # noqa: PLC0415

    if args.patched:
        udpx.install()
    lost = count_quic_losses()
    configuration = QuicConfiguration(is_client=True, alpn_protocols=QUIC_ALPN,
                                      server_name="localhost")
    configuration.load_verify_locations(cadata=args.cert.encode())
    size = args.bytes
    chunks: list[bytes] = []
    async with asyncio.timeout(args.deadline), connect(
            HOST, args.port, configuration=configuration) as protocol:
        transport = protocol._transport
        assert transport is not None
        kind = check_quic_transport(args.patched, transport)
        reader, writer = await protocol.create_stream()
        t0 = time.perf_counter()
        cpu0 = cpu_seconds()
        server0 = schedstat_ns(args.server_pid)
        writer.write(str(size).encode())
        writer.write_eof()
        read = reader.read
        while chunk := await read(QUIC_BLOCK):
            chunks.append(chunk)
        t1 = time.perf_counter()
        cpu1 = cpu_seconds()
        server1 = schedstat_ns(args.server_pid)
        drops = kernel_drops(transport.get_extra_info("sockname")[1])
        stats = endpoint_stats(transport)
    received = sum(map(len, chunks))
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    chunks.clear()
    if received != size or digest != quic_digest(quic_block(), size):
        raise SystemExit(f"quic: received {received} of {size} bytes, SHA-256 "
                         f"{'differs' if received == size else 'not checked'}")
    seconds = t1 - t0
    megabytes = size / 1e6
    if args.patched:
        udpx.uninstall()
    return {"bytes": received, "sha256": digest, "seconds": seconds,
            "rate_mb_s": megabytes / seconds,
            "client_cpu_seconds": cpu1 - cpu0, "server_cpu_seconds": (server1 - server0) / 1e9,
            "client_cpu_ms_per_mb": (cpu1 - cpu0) * 1e3 / megabytes,
            "server_cpu_ms_per_mb": (server1 - server0) / 1e6 / megabytes,
            "transport": kind, "lost_packets": lost.n, "kernel_drops": drops, **stats}


# -- memory ----------------------------------------------------------------------------------


class TableProtocol(asyncio.DatagramProtocol):
    """The smallest hand-written demultiplexer: a dict from peer address to a deque."""

    def __init__(self) -> None:
        self.table: dict[tuple[str | Any, int], deque[bytes]] = {}

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if addr not in self.table:
            self.table[addr] = deque()  # the datagram itself is consumed: idle peers


class KeepingConnProtocol(udpx.ConnProtocol):
    """Protocol mode, idle: keeps its connection (in ``conns``) and reads nothing from it
    (its datagram is delivered and let go)."""

    def __init__(self, conns: list[udpx.UDPConn]) -> None:
        self.conns = conns

    def connection_made(self, conn: udpx.UDPConn) -> None:
        self.conns.append(conn)


async def memory(args: argparse.Namespace) -> dict[str, Any]:
    """Resident memory per idle connection: ``peers`` (C) sends one datagram from each of N
    new source addresses, in chunks small enough for the receive buffer; every connection is
    accepted and its datagram read, so the connections are open, accepted and idle."""
    n = args.n
    chunk = 2000
    warm = 256
    conns: list[udpx.UDPConn] = []
    closers: list[Callable[[], Coroutine[Any, Any, None]]] = []
    if args.impl in ("udpx", "udpx-proto"):
        options: dict[str, Any] = {"rcvbuf": RCVBUF, "max_conns": n + 2 * warm,
                                   "idle_timeout": None, "connected": args.connected}
        acceptor: asyncio.Task[None] | None = None
        if args.impl == "udpx-proto":
            ln = await udpx.listen(HOST, 0, protocol_factory=lambda: KeepingConnProtocol(conns),
                                   **options)
        else:
            ln = await udpx.listen(HOST, 0, backlog=n + 2 * warm, **options)

            async def accept_all() -> None:
                async for conn in ln:
                    with contextlib.suppress(udpx.WouldBlock):
                        conn.recv_nowait()
                    conns.append(conn)

            acceptor = asyncio.create_task(accept_all())
        port = ln.local_addr[1]

        def opened() -> int:
            return len(conns)

        async def close_udpx() -> None:
            await ln.aclose()
            if acceptor is not None:
                acceptor.cancel()
                await asyncio.gather(acceptor, return_exceptions=True)

        closers.append(close_udpx)
    elif args.impl == "table":
        loop = asyncio.get_running_loop()
        sock = receiving_socket()
        protocol = TableProtocol()
        transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        port = sock.getsockname()[1]

        def opened() -> int:
            return len(protocol.table)

        async def close_table() -> None:
            transport.close()

        closers.append(close_table)
    else:
        raise SystemExit(f"unknown memory impl {args.impl}")

    peers = await asyncio.create_subprocess_exec(
        args.peers_bin, str(port), str(args.size), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    assert peers.stdin is not None and peers.stdout is not None
    stalls = 0

    async def add_peers(count: int, target: int) -> None:
        nonlocal stalls
        assert peers.stdin is not None and peers.stdout is not None
        peers.stdin.write(f"{count}\n".encode())
        await peers.stdin.drain()
        json.loads(await peers.stdout.readline())
        last, since = opened(), time.perf_counter()
        while opened() < target:
            await asyncio.sleep(0.002)
            if opened() != last:
                last, since = opened(), time.perf_counter()
            elif time.perf_counter() - since > 0.5:
                stalls += 1  # datagrams lost (kernel drops): go on with fewer connections
                break

    # Warm up the listener with a few peers (touches the receive arena's pages, grows the
    # tables once), then close them: "empty" means a listener that has received traffic.
    await add_peers(warm, warm)
    if args.impl != "table":
        for conn in conns:
            await conn.aclose()
        conns.clear()
    else:
        protocol.table.clear()
    gc.collect()
    await asyncio.sleep(0.05)
    rss_before = rss_bytes()
    fds_before = open_fds()
    started = time.perf_counter()
    cpu_started = cpu_seconds()
    while opened() < n:
        await add_peers(min(chunk, n - opened()), min(n, opened() + chunk))
        if time.perf_counter() - started > args.deadline:
            break
    fill_seconds = time.perf_counter() - started
    fill_cpu = cpu_seconds() - cpu_started
    fds_after = open_fds()
    gc.collect()
    await asyncio.sleep(0.05)
    rss_after = rss_bytes()
    count = opened()
    extra: dict[str, Any] = {}
    if args.impl != "table":
        stats = ln.stats
        extra = {"listener_conns": stats.conns, "accepted": stats.accepted,
                 "drops": dict(stats.drops)}
    peers.stdin.close()
    await peers.wait()
    for close in closers:
        await close()
    return {"conns": count, "rss_before": rss_before, "rss_after": rss_after,
            "bytes_per_conn": (rss_after - rss_before) / count if count else 0.0,
            "fill_seconds": fill_seconds, "fill_cpu_seconds": fill_cpu,
            "cpu_us_per_conn": fill_cpu * 1e6 / count if count else 0.0,
            "fds_before": fds_before, "fds_after": fds_after, "stalls": stalls, **extra}


# -- an endpoint per query --------------------------------------------------------------------


class ReplyProtocol(asyncio.DatagramProtocol):
    """Resolves ``reply`` with the first datagram the endpoint receives."""

    def __init__(self, reply: asyncio.Future[bytes]) -> None:
        self.reply = reply

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.reply.done():
            self.reply.set_result(data)


async def query_once(impl: str, loop: asyncio.AbstractEventLoop, server: tuple[str, int],
                     request: bytes) -> bool:
    """One query as a DNS client makes it: a new endpoint (or dialed connection), one request,
    its reply, closed; False when no reply came within a second."""
    if impl == "udpx-dial":
        async with udpx.dial(*server) as conn:
            await conn.send(request)
            try:
                async with asyncio.timeout(1.0):
                    reply = await conn.recv()
            except TimeoutError:
                return False
            return reply == request
    future: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(lambda: ReplyProtocol(future),
                                                       remote_addr=server)
    try:
        if isinstance(transport, udpx.EndpointTransport) != (impl == "udpx-dropin"):
            raise SystemExit(f"{impl}: served by {type(transport).__name__}")
        transport.sendto(request)
        try:
            async with asyncio.timeout(1.0):
                return await future == request
        except TimeoutError:
            return False
    finally:
        transport.close()


async def queries(args: argparse.Namespace) -> dict[str, Any]:
    """``count`` queries one after another to the echo server at ``port``, each on an
    endpoint (or dialed connection) of its own; CPU and wall time per query, after a warm-up
    of a tenth of them."""
    loop = dropin_loop(args.impl, args)
    server = (HOST, args.port)
    request = b"q" * args.size
    warm = max(1, args.count // 10)
    for _ in range(warm):
        await query_once(args.impl, loop, server, request)
    await settled()
    fds_before = open_fds()
    failed = 0
    started, cpu_started = time.perf_counter(), cpu_seconds()
    for _ in range(args.count):
        if not await query_once(args.impl, loop, server, request):
            failed += 1
        if time.perf_counter() - started > args.deadline:
            raise SystemExit(f"queries: {args.count} queries took over {args.deadline} s")
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    await settled()
    return {"queries": args.count, "failed": failed, "wall_us": wall / args.count * 1e6,
            "cpu_us": cpu / args.count * 1e6, "fds_before": fds_before,
            "fds_after": open_fds()}


async def settled() -> None:
    """A few loop iterations: the last endpoint closed finishes closing (asyncio's closes
    its socket one iteration after close())."""
    for _ in range(3):
        await asyncio.sleep(0)


# -- command line ----------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="_workers.py")
    kinds = parser.add_subparsers(dest="kind", required=True)
    recv = kinds.add_parser("recv")
    recv.add_argument("impl", choices=["udpx-recv", "udpx-recv_many", "udpx-proto", "proto",
                                       "udpx-dropin", "asyncio-dgram"])
    recv.add_argument("--batch-size", type=int, default=64, help="udpx listener's batch_size")
    recv.add_argument("--connected", action="store_true",
                      help="listen(connected=True): a socket per peer")
    send = kinds.add_parser("send")
    send.add_argument("impl", choices=["udpx-send", "udpx-send_many", "sendto", "socket"])
    send.add_argument("--port", type=int, required=True)
    send.add_argument("--size", type=int, required=True)
    send.add_argument("--no-gso", action="store_true")
    flood_sender = kinds.add_parser("flood")
    flood_sender.add_argument("--port", type=int, required=True)
    flood_sender.add_argument("--size", type=int, required=True)
    flood_sender.add_argument("--duration", type=float, required=True)
    flood_sender.add_argument("--max-count", type=int, required=True)
    echo_server = kinds.add_parser("echo")
    echo_server.add_argument("impl", choices=["udpx-recv", "udpx-recv_many", "udpx-proto",
                                              "proto", "udpx-dropin"])
    for sub in (recv, echo_server):
        sub.add_argument("--listen-host", default=HOST,
                         help="udpx listener's address (0.0.0.0: wildcard, with packet info)")
        sub.add_argument("--rx-coalesce", type=float, default=None,
                         help="udpx's rx_coalesce (default: udpx's own default)")
    scaled = kinds.add_parser("scale", help="udpx.run(main, workers=N): receive or echo")
    scaled.add_argument("impl", choices=["udpx-recv", "udpx-recv_many", "udpx-proto"])
    scaled.add_argument("--mode", choices=["receive", "echo"], required=True)
    scaled.add_argument("--workers", type=int, default=1)
    quic_srv = kinds.add_parser("quic-server")
    quic_cli = kinds.add_parser("quic-client")
    quic_cli.add_argument("--port", type=int, required=True)
    quic_cli.add_argument("--bytes", type=int, required=True, help="the body's size")
    quic_cli.add_argument("--cert", required=True, help="the server's certificate (PEM)")
    quic_cli.add_argument("--server-pid", type=int, required=True)
    for sub in (quic_srv, quic_cli):
        sub.add_argument("--patched", action="store_true",
                         help="udpx.install(): aioquic's endpoint is udpx's drop-in")
    mem = kinds.add_parser("memory")
    mem.add_argument("impl", choices=["udpx", "udpx-proto", "table"])
    mem.add_argument("--n", type=int, required=True)
    mem.add_argument("--size", type=int, required=True)
    mem.add_argument("--peers-bin", required=True)
    mem.add_argument("--connected", action="store_true",
                     help="listen(connected=True): a socket per peer")
    query = kinds.add_parser("queries", help="an endpoint per query (a DNS client's way)")
    query.add_argument("impl", choices=["udpx-dropin", "udpx-dial", "stock"])
    query.add_argument("--port", type=int, required=True, help="the echo server's")
    query.add_argument("--count", type=int, required=True)
    query.add_argument("--size", type=int, required=True)
    for sub in (recv, send, flood_sender, echo_server, scaled, quic_srv, quic_cli, mem, query):
        sub.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
        sub.add_argument("--warmup", type=float, default=0.2)
        sub.add_argument("--window", type=float, default=1.0)
        sub.add_argument("--quiet", type=float, default=0.2)
        sub.add_argument("--deadline", type=float, default=30.0)
        sub.add_argument("--peers", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse(argv)
    result: dict[str, Any]
    if args.kind == "scale":
        scale(args)  # every worker prints its own lines
        return
    if args.kind == "send" and args.impl == "socket":
        result = send_socket(args)
    else:
        job = {"recv": receive, "send": send_async, "flood": flood, "echo": echo,
               "quic-server": quic_server, "quic-client": quic_client,
               "memory": memory, "queries": queries}[args.kind]
        result = run_on(args.loop, lambda: job(args))
    emit("result", **result)


if __name__ == "__main__":
    main(sys.argv[1:])
