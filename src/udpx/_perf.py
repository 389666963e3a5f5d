"""The ``perf`` and ``echo`` commands of ``python -m udpx``.

``perf`` measures loopback throughput: the receiver under test runs in this process, the sender
in one child process (``spawn``, so that it inherits neither this event loop nor its sockets),
and the two talk over a ``multiprocessing`` pipe:

    parent: open the receiver → start the child            child: open its sockets
            ← ("ready", None) ───────────────────────────── (or ("error", message))
            ── "go" ──────────────────────────────────────▶ send for ``duration`` seconds,
            ← ("result", SenderReport) ──────────────────── flush, report what the kernel took
            drain until quiet, report

With ``--compare`` the same sender (same kind, burst and duration, a fresh child) is pointed at
plain asyncio and uvloop ``DatagramProtocol`` receivers, each in a fresh event loop.

By default ``perf`` makes two runs. The first sends what most peers send: ``peers`` sends each
datagram alone (no GSO) from 1,000 source ports, one datagram per peer per turn, the way
clients that are not udpx send. With CAP_NET_RAW one raw IPv4 socket sends them (hand-built
packets from 127.0.0.1 ports 1024 and up, one ``sendmmsg`` per turn of all peers); without it,
or over IPv6, one connected socket per peer makes one ``send()`` per datagram. Either way the
kernel's per-datagram cost of sending (about 2.5 us here, the receiving side's work included)
bounds the sender below what udpx can receive, so this run reports what receiving costs (CPU
per datagram) at the rate a Python sender reaches, more than a maximum rate. The second run is
the udpx-to-udpx best case: ``udpx`` (``udpx.dial`` + ``send_many``, which udpx sends with UDP
GSO, up to 64 equal segments per ``send``) arrives at the receiver in runs the kernel hands
over whole (GRO), so it outruns every receiver. ``gso`` is the same traffic from plain sockets
with UDP_SEGMENT; where the kernel refuses GSO it falls back to ``udpx``.

``echo`` is a udpx echo server that runs until SIGINT/SIGTERM.

The CLI prints (this module's functions take the streams to print to); the library logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import json
import multiprocessing
import os
import platform
import resource
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final, Literal, Protocol, TextIO, TypeVar

from ._cmsg import SOL_UDP, UDP_SEGMENT
from ._conn import UDPConn
from ._errors import ConnectionClosed
from ._listener import Listener, listen
from ._mmsg import HAVE_MMSG, SendBatch
from ._options import DEFAULTS
from ._protocol import ConnProtocol
from ._run import die_with_parent, run, worker_id
from ._sockets import Address, kernel_drops

__all__ = [
    "DEFAULT_PEERS",
    "DEFAULT_SENDERS",
    "LOOPS",
    "MODES",
    "SENDERS",
    "EchoConfig",
    "PerfConfig",
    "PerfError",
    "SenderReport",
    "default_loop",
    "format_address",
    "format_summary",
    "run_echo",
    "run_perf",
    "uvloop_available",
]

T = TypeVar("T")

LoopName = Literal["asyncio", "uvloop"]

#: Event loops the commands can run on.
LOOPS: Final = ("asyncio", "uvloop")
#: Sender kinds of ``perf``: each datagram sent alone from many peers, udpx's own sender (GSO),
#: plain sockets with UDP_SEGMENT.
SENDERS: Final = ("peers", "udpx", "gso")
#: How the udpx receiver of ``perf`` takes its datagrams: a task per connection, or protocol
#: mode.
MODES: Final = ("task", "protocol")
#: The runs of a ``perf`` without ``--sender``: what most peers send first, the udpx-to-udpx
#: best case beside it.
DEFAULT_SENDERS: Final = ("peers", "udpx")
#: Peers of the ``peers`` sender when ``--clients`` is not given.
DEFAULT_PEERS: Final = 1000
#: The first source port of the raw ``peers`` sender (the ports from it up are the peers').
_FIRST_RAW_PORT: Final = 1024
#: IPv4 and UDP headers of a raw packet.
_RAW_HEADERS: Final = 28
#: File descriptors a sender process keeps free beside its sockets (pipes, imports).
_SPARE_FDS: Final = 32

# Linux constants the socket module of Python 3.11 lacks.
#: The kernel takes at most 128 segments and 65,507 (IPv4) bytes in one GSO send; stay under.
_GSO_MAX_SEGMENTS: Final = 64
_GSO_MAX_BYTES: Final = 65000

#: How long the child may take to start (spawn + imports) and open its sockets.
_READY_TIMEOUT: Final = 30.0
#: How long the child waits for "go" before giving up.
_GO_TIMEOUT: Final = 60.0
#: How long the child may take to flush its queues after the sending time is over.
_FLUSH_TIMEOUT: Final = 2.0
#: Slack on top of the sending time before the parent gives up on the child's result.
_RESULT_MARGIN: Final = _FLUSH_TIMEOUT + 5.0
#: How long the parent waits for the child to exit after its result, before killing it.
_EXIT_TIMEOUT: Final = 5.0

#: The receiver's counters are sampled this often (for the progress line and for when data
#: stopped coming); the hot loops never read the clock.
_TICK: Final = 0.02
_PROGRESS_INTERVAL: Final = 0.5
#: After the sender is done: drain until this long without new data, at most _GRACE_LIMIT.
_GRACE_QUIET: Final = 0.2
_GRACE_LIMIT: Final = 2.0


class PerfError(Exception):
    """A measurement could not be made (the message says why); the CLI exits with status 1."""


# -- event loops ----------------------------------------------------------------------------


def uvloop_available() -> bool:
    """Whether uvloop can be imported."""
    try:
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def default_loop() -> LoopName:
    """uvloop when it is installed, else asyncio's default loop."""
    return "uvloop" if uvloop_available() else "asyncio"


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop  # noqa: PLC0415

        return uvloop.new_event_loop
    if name != "asyncio":
        raise ValueError(f"unknown event loop {name!r}")
    return asyncio.new_event_loop


def _run_on(loop_name: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` in a fresh event loop of the named kind."""
    with asyncio.Runner(loop_factory=_loop_factory(loop_name)) as runner:
        return runner.run(main())


def format_address(address: Address) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# -- the sender (child process) ---------------------------------------------------------------


@dataclass(frozen=True)
class SenderParams:
    """What the child needs to know; pickled to it."""

    host: str
    port: int
    size: int
    clients: int
    duration: float
    sender: str
    burst: int
    batch_size: int
    loop: str
    #: The pid of the process that starts the sender: the sender stops if it dies (0: not).
    parent: int = 0


@dataclass(frozen=True)
class SenderReport:
    """What the child did: ``queued`` datagrams offered, ``sent`` of them handed to the kernel
    (``conn.stats.tx_packets`` for the udpx sender), ``errors`` refused, in ``elapsed`` seconds
    from "go" to the end of the flush."""

    kind: str
    note: str
    queued: int
    queued_bytes: int
    sent: int
    sent_bytes: int
    errors: int
    elapsed: float


def sender_main(pipe: Connection, params: SenderParams) -> None:
    """The child process's entry point. Always exits: a watchdog ends the process if anything
    hangs past the time it was given."""
    # Ctrl-C in a terminal reaches the whole process group: the parent decides when this ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if params.parent:
        # Killed with its parent (SIGTERM where SIGINT is ignored, SIGKILL): do not go on
        # flooding loopback for the rest of the duration.
        die_with_parent(params.parent)
    limit = _READY_TIMEOUT + _GO_TIMEOUT + params.duration + _FLUSH_TIMEOUT + 5.0
    watchdog = threading.Timer(limit, os._exit, args=(3,))
    watchdog.daemon = True
    watchdog.start()
    try:
        report = _run_sender(pipe, params)
        pipe.send(("result", report))
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("error", str(exc) if isinstance(exc, PerfError)
                       else f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    finally:
        pipe.close()


def _wait_for_go(pipe: Connection) -> float:
    pipe.send(("ready", None))
    if not pipe.poll(_GO_TIMEOUT):
        raise TimeoutError("no 'go' from the parent")
    message = pipe.recv()
    if message != "go":
        raise RuntimeError(f"unexpected message from the parent: {message!r}")
    return time.monotonic()


def _run_sender(pipe: Connection, params: SenderParams) -> SenderReport:
    note = ""
    if params.sender != "peers":
        _allow_sockets(params.clients)
    if params.sender == "peers":
        raw, note = _open_raw_socket(params)
        if raw is not None:
            with raw:
                return _send_raw(pipe, params, raw, note)
        return _send_plain(pipe, params, note)
    if params.sender == "gso":
        sockets, note = _open_gso_sockets(params)
        if sockets is not None:
            try:
                return _send_gso(pipe, params, sockets)
            finally:
                for sock in sockets:
                    sock.close()
    return _run_on(params.loop, lambda: _send_udpx(pipe, params, note))


def _allow_sockets(count: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE, as far as the hard limit allows, so that it can
    open ``count`` sockets more than it has now (the usual soft limit, 1,024, is too few for
    1,024 peers); if it cannot, say so instead of failing with EMFILE halfway."""
    needed = count + len(os.listdir("/proc/self/fd")) + _SPARE_FDS if os.path.isdir(
        "/proc/self/fd") else count + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise PerfError(f"{count} sender sockets need about {needed} file descriptors, and the "
                        f"limit is {hard} (ulimit -n); raise it or use fewer --clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _gso_segments(params: SenderParams) -> int:
    return min(params.burst, _GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // max(params.size, 1))


def _open_gso_sockets(params: SenderParams) -> tuple[list[socket.socket] | None, str]:
    """Connected sockets with UDP_SEGMENT set, or None and why GSO cannot be used."""
    if params.size == 0:
        return None, "GSO needs datagrams of at least 1 byte"
    if _gso_segments(params) < 2:
        return None, "datagrams too large (or burst too small) for GSO to help"
    family = _family_of(params.host)
    # Probe on a throwaway pair first: a kernel or route without GSO fails here (ENOPROTOOPT,
    # EIO, EINVAL), before anything reaches the receiver under test.
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sink, \
                socket.socket(family, socket.SOCK_DGRAM) as probe:
            sink.bind((params.host, 0))
            probe.connect(sink.getsockname())
            probe.setsockopt(SOL_UDP, UDP_SEGMENT, params.size)
            probe.send(b"\0" * params.size * 2)
    except OSError as exc:
        return None, f"GSO unavailable ({exc})"
    return _connected_sockets(params, segment=params.size), ""


def _connected_sockets(params: SenderParams, *, segment: int = 0) -> list[socket.socket]:
    """``params.clients`` sockets connected to the receiver, each with UDP_SEGMENT set to
    ``segment`` unless it is 0; none is left open when one fails."""
    family = _family_of(params.host)
    sockets: list[socket.socket] = []
    try:
        for _ in range(params.clients):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sockets.append(sock)
            sock.connect((params.host, params.port))
            if segment:
                sock.setsockopt(SOL_UDP, UDP_SEGMENT, segment)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _send_gso(pipe: Connection, params: SenderParams,
              sockets: list[socket.socket]) -> SenderReport:
    segments = _gso_segments(params)
    return _send_rounds(pipe, params, sockets, b"x" * params.size * segments, segments,
                        kind="gso", note="")


def _send_rounds(pipe: Connection, params: SenderParams, sockets: list[socket.socket],
                 buffer: bytes, datagrams: int, *, kind: str, note: str) -> SenderReport:
    """Send ``buffer`` (``datagrams`` datagrams: GSO segments, or one) on each socket in
    turn until the duration is over."""
    sends = [sock.send for sock in sockets]
    sent = errors = 0
    start = _wait_for_go(pipe)
    deadline = start + params.duration
    # Hot loop: one send per socket per round (blocking sockets: loopback never blocks a UDP
    # send, a full receiver just drops), the clock read once per round.
    while True:
        for send in sends:
            try:
                send(buffer)
            except OSError as exc:
                # ECONNREFUSED (the receiver went away), ENOBUFS: count and go on.
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOBUFS, errno.EAGAIN):
                    raise
                errors += datagrams
            else:
                sent += datagrams
        if time.monotonic() >= deadline:
            break
    elapsed = time.monotonic() - start
    queued = sent + errors
    return SenderReport(kind=kind, note=note, queued=queued, queued_bytes=queued * params.size,
                        sent=sent, sent_bytes=sent * params.size, errors=errors,
                        elapsed=elapsed)


def _open_raw_socket(params: SenderParams) -> tuple[socket.socket | None, str]:
    """The ``peers`` sender's raw IPv4 socket (IP_HDRINCL, connected to the loopback address),
    or None and why the sender uses a socket per peer instead."""
    if _family_of(params.host) != socket.AF_INET:
        return None, (f"one send() per datagram over {params.clients:,} sockets (the raw "
                      f"sender is IPv4 only)")
    if not HAVE_MMSG:
        return None, (f"one send() per datagram over {params.clients:,} sockets (no "
                      f"sendmmsg here)")
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError as exc:
        return None, (f"one send() per datagram over {params.clients:,} sockets (no raw "
                      f"socket: {exc.strerror or exc}; needs root or CAP_NET_RAW)")
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        sock.connect((params.host, 0))
    except BaseException:
        sock.close()
        raise
    return sock, (f"raw socket, {_count(params.clients, 'source port')}, one sendmmsg per turn "
                  f"of all peers")


def raw_packets(host: str, port: int, size: int, peers: int) -> list[bytes]:
    """One IPv4/UDP packet of ``size`` payload bytes from each of ``peers`` source ports of
    ``host`` (from _FIRST_RAW_PORT up, skipping ``port``) to ``host:port``. The UDP checksum
    is 0 (none, valid over IPv4); the kernel fills in the IP checksum, length and id."""
    address = socket.inet_aton(host)
    ports = [source for source in range(_FIRST_RAW_PORT, _FIRST_RAW_PORT + peers + 1)
             if source != port][:peers]
    if not ports or len(ports) < peers or ports[-1] > 65535:
        raise ValueError(f"{peers} peers do not fit in the source ports from "
                         f"{_FIRST_RAW_PORT} (at least 1)")
    ip_header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, _RAW_HEADERS + size, 0, 0, 64,
                            socket.IPPROTO_UDP, 0, address, address)
    payload = b"x" * size
    return [ip_header + struct.pack("!HHHH", source, port, 8 + size, 0) + payload
            for source in ports]


def _send_raw(pipe: Connection, params: SenderParams, sock: socket.socket,
              note: str) -> SenderReport:
    packets = raw_packets(params.host, params.port, params.size, params.clients)
    batch = SendBatch(len(packets), _RAW_HEADERS + params.size, False, 0)
    try:
        batch.fill(packets, None)
        send = batch.send
        fd = sock.fileno()
        count = len(packets)
        sent = errors = start = 0
        begin = _wait_for_go(pipe)
        deadline = begin + params.duration
        # Hot loop: one sendmmsg per turn of all peers (the kernel takes at most 1,024
        # messages per call: a turn of more peers takes several), the clock read per call.
        while time.monotonic() < deadline:
            try:
                taken = send(fd, start)
            except OSError as exc:
                if exc.errno not in (errno.ENOBUFS, errno.EAGAIN, errno.ECONNREFUSED):
                    raise
                taken = 1
                errors += 1
            else:
                sent += taken
            start += taken
            if start >= count:
                start = 0
        elapsed = time.monotonic() - begin
    finally:
        batch.close()
    return SenderReport(kind="peers", note=note, queued=sent + errors,
                        queued_bytes=(sent + errors) * params.size, sent=sent,
                        sent_bytes=sent * params.size, errors=errors, elapsed=elapsed)


def _send_plain(pipe: Connection, params: SenderParams, note: str) -> SenderReport:
    """The ``peers`` sender without a raw socket: a connected socket per peer, one send() per
    datagram."""
    _allow_sockets(params.clients)  # (the raw sender has one socket for all its peers)
    sockets = _connected_sockets(params)
    try:
        return _send_rounds(pipe, params, sockets, b"x" * params.size, 1, kind="peers",
                            note=note)
    finally:
        for sock in sockets:
            sock.close()


async def _send_udpx(pipe: Connection, params: SenderParams, note: str) -> SenderReport:
    from ._dial import dial  # noqa: PLC0415

    conns: list[UDPConn] = []
    try:
        for _ in range(params.clients):
            conns.append(await dial(params.host, params.port, batch_size=params.batch_size,
                                    max_datagram=max(params.size, 1)))
        payload = b"x" * params.size
        burst = [payload] * params.burst
        queued = refused = 0
        # Nothing else runs on this loop: blocking on the pipe for "go" costs nobody anything.
        start = _wait_for_go(pipe)
        deadline = start + params.duration
        # Hot loop: send_many() only suspends when a socket's transmit queue is full, which is
        # what lets the writers run.
        while time.monotonic() < deadline:
            for conn in conns:
                try:
                    await conn.send_many(burst)
                except ConnectionRefusedError:  # the receiver went away: reported once
                    refused += len(burst)
                else:
                    queued += len(burst)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FLUSH_TIMEOUT):
                await asyncio.gather(*(conn.aclose() for conn in conns))
        elapsed = time.monotonic() - start
        sent = sum(conn.stats.tx_packets for conn in conns)
        sent_bytes = sum(conn.stats.tx_bytes for conn in conns)
        errors = refused + sum(conn.stats.drops["send_error"] for conn in conns)
    finally:
        for conn in conns:
            conn.close()
    return SenderReport(kind="udpx", note=note, queued=queued + refused,
                        queued_bytes=(queued + refused) * params.size, sent=sent,
                        sent_bytes=sent_bytes, errors=errors, elapsed=elapsed)


# -- talking to the child ---------------------------------------------------------------------


async def _wait_readable(fd: int, timeout: float) -> bool:
    """Wait until ``fd`` is readable; False on timeout."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_reader(fd, readable)
    try:
        async with asyncio.timeout(timeout):
            await future
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    return True


async def _receive_message(pipe: Connection, process: multiprocessing.process.BaseProcess,
                           timeout: float, waiting_for: str,
                           who: str = "the sender process") -> tuple[str, Any]:
    if not pipe.poll() and not await _wait_readable(pipe.fileno(), timeout):
        raise PerfError(f"{who} sent no {waiting_for} within {timeout:.0f} s")
    try:
        message = pipe.recv()
    except EOFError:
        process.join(1.0)
        raise PerfError(f"{who} exited unexpectedly (exit code {process.exitcode}) while "
                        f"{waiting_for} was awaited") from None
    kind, payload = message
    if kind == "error":
        raise PerfError(f"{who} failed: {payload}")
    return str(kind), payload


async def _reap(process: multiprocessing.process.BaseProcess, graceful: bool) -> None:
    """Wait (bounded, unless not ``graceful``) for the child to exit; terminate, then kill it
    if it does not."""
    if process.pid is None:
        return  # never started
    if graceful and process.is_alive():
        await _wait_readable(process.sentinel, _EXIT_TIMEOUT)
    if process.is_alive():
        process.terminate()
        await _wait_readable(process.sentinel, 1.0)
    if process.is_alive():
        process.kill()
        await _wait_readable(process.sentinel, 1.0)
    process.join(0.1)
    if not process.is_alive():
        process.close()


# -- receivers --------------------------------------------------------------------------------


class _Receiver(Protocol):
    """A receiver under test: counts what its application level got."""

    name: str
    loop_name: str

    @property
    def packets(self) -> int:
        """Datagrams the application received so far."""
        ...

    @property
    def bytes(self) -> int:
        """Their bytes."""
        ...

    async def open(self, host: str) -> int:
        """Start receiving on ``host``, a free port; return the port."""
        ...

    def drops(self) -> dict[str, int]:
        """Drops by reason, as far as this receiver knows them."""
        ...

    def connections(self) -> int | None: ...

    async def close(self) -> None: ...


def _describe_on_sigusr1(listener: Listener | None, stream: TextIO) -> None:
    """Print ``listener.describe()`` as one JSON line on SIGUSR1 (None: stop doing so).

    Only where the platform has SIGUSR1 and this is the main thread (signal handlers can be
    installed nowhere else)."""
    signum = _sigusr1_here()
    if signum is None:
        return
    if listener is None:
        _remove_handler(signum)
        return

    def describe() -> None:
        _write_line(stream, json.dumps(listener.describe()))

    _add_handler(signum, describe)


def _sigusr1_here() -> int | None:
    """SIGUSR1, where the platform has it and this is the main thread (signal handlers can be
    installed nowhere else); else None."""
    signum = getattr(signal, "SIGUSR1", None)
    if signum is None or threading.current_thread() is not threading.main_thread():
        return None
    return int(signum)


#: The handlers the loop's signal handlers replaced (the command line ignores SIGUSR1 until a
#: receiver handles it), put back when they are removed: asyncio and uvloop set the default
#: action back, which for SIGUSR1 ends the process.
_replaced: dict[int, Any] = {}


def _add_handler(signum: int, callback: Callable[[], None]) -> None:
    _replaced.setdefault(signum, signal.getsignal(signum))
    asyncio.get_running_loop().add_signal_handler(signum, callback)


def _remove_handler(signum: int) -> None:
    asyncio.get_running_loop().remove_signal_handler(signum)
    previous = _replaced.pop(signum, None)
    if previous is not None:
        signal.signal(signum, previous)


class _UdpxReceiver:
    """udpx.listen(), one task per accepted connection draining it with recv_many(); or
    (``protocol``) in protocol mode, a ConnProtocol per connection counting what it is given."""

    def __init__(self, loop_name: str, *, batch_size: int, max_datagram: int,
                 rx_queue_size: int, rcvbuf: int | None, clients: int,
                 rx_coalesce: float = DEFAULTS.rx_coalesce, describe: bool = False,
                 protocol: bool = False) -> None:
        self.name = "udpx protocol mode" if protocol else "udpx"
        self._protocol = protocol
        self._describe_at_exit = describe
        self.loop_name = loop_name
        self.packets = 0
        self.bytes = 0
        self._options: dict[str, Any] = {
            "batch_size": batch_size, "max_datagram": max_datagram,
            "rx_queue_size": rx_queue_size, "rcvbuf": rcvbuf, "rx_coalesce": rx_coalesce,
            "backlog": max(clients, 1024), "idle_timeout": None}
        self._listener: Listener | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self, host: str, port: int = 0) -> int:
        if self._protocol:
            self._listener = listener = await listen(
                host, port, protocol_factory=lambda: _CountingConnProtocol(self),
                **self._options)
        else:
            self._listener = listener = await listen(host, port, **self._options)
            self._tasks.add(asyncio.create_task(self._accept(listener)))
        _describe_on_sigusr1(listener, sys.stderr)
        return int(listener.local_addr[1])

    async def _accept(self, listener: Listener) -> None:
        async for conn in listener:
            task = asyncio.create_task(self._drain(conn))
            self._tasks.add(task)

    async def _drain(self, conn: UDPConn) -> None:
        # Hot loop: per batch, not per datagram: one len() and one sum(map(len, ...)).
        recv_many = conn.recv_many
        with contextlib.suppress(ConnectionClosed):
            while True:
                batch = await recv_many()
                self.packets += len(batch)
                self.bytes += sum(map(len, batch))

    def drops(self) -> dict[str, int]:
        assert self._listener is not None
        return dict(self._listener.stats.drops)

    def connections(self) -> int | None:
        assert self._listener is not None
        return self._listener.stats.accepted

    async def close(self) -> None:
        listener = self._listener
        if listener is None:
            return
        _describe_on_sigusr1(None, sys.stderr)
        if self._describe_at_exit:
            _write_line(sys.stderr, json.dumps(listener.describe()))
        listener.close()
        # Closing ends the accept loop and, once their queues are drained, the drain tasks.
        tasks = set(self._tasks)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EXIT_TIMEOUT):
                await listener.wait_closed()
                await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _CountingConnProtocol(ConnProtocol):
    """Protocol mode's receiver: counts each batch into its receiver's totals."""

    def __init__(self, receiver: _UdpxReceiver) -> None:
        self._receiver = receiver

    def datagrams_received(self, datagrams: list[bytes]) -> None:
        # Per connection per batch, not per datagram: one len() and one sum(map(len, ...)).
        receiver = self._receiver
        receiver.packets += len(datagrams)
        receiver.bytes += sum(map(len, datagrams))


class _CountingProtocol(asyncio.DatagramProtocol):
    """The baseline's whole application: count datagrams and bytes."""

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.packets += 1
        self.bytes += len(data)


class _ProtocolReceiver:
    """A plain ``loop.create_datagram_endpoint`` receiver (asyncio's or uvloop's transport)."""

    def __init__(self, loop_name: str, *, rcvbuf: int | None) -> None:
        self.name = f"{loop_name} DatagramProtocol"
        self.loop_name = loop_name
        self._rcvbuf = rcvbuf
        self._protocol = _CountingProtocol()
        self._sock: socket.socket | None = None
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def packets(self) -> int:
        return self._protocol.packets

    @property
    def bytes(self) -> int:
        return self._protocol.bytes

    async def open(self, host: str) -> int:
        sock = socket.socket(_family_of(host), socket.SOCK_DGRAM)
        try:
            if self._rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
            sock.bind((host, 0))
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            protocol = self._protocol
            self._transport, _ = await loop.create_datagram_endpoint(lambda: protocol,
                                                                     sock=sock)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return int(sock.getsockname()[1])

    def drops(self) -> dict[str, int]:
        assert self._sock is not None
        return {"kernel": kernel_drops(self._sock)}

    def connections(self) -> int | None:
        return None

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            await asyncio.sleep(0)  # let the transport's close callbacks run


# -- measuring --------------------------------------------------------------------------------


class _Progress:
    """The live line on stderr: rewritten in place on a terminal, plain lines elsewhere."""

    def __init__(self, stream: TextIO | None, label: str) -> None:
        self._stream = stream
        self._label = label
        self._tty = bool(stream is not None and stream.isatty())
        self._shown = False

    def update(self, elapsed: float, rate: float, total: int) -> None:
        if self._stream is None:
            return
        line = f"{self._label}: {elapsed:5.1f} s  {rate:>12,.0f} datagrams/s  {total:>13,} received"
        if self._tty:
            self._stream.write(f"\r{line}\x1b[K")
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self._stream is not None and self._tty and self._shown:
            self._stream.write("\n")
            self._stream.flush()


class _Monitor:
    """Samples a receiver's counter every tick: remembers when it last moved and reports the
    rate every half second."""

    def __init__(self, receiver: _Receiver, progress: _Progress) -> None:
        self._receiver = receiver
        self._progress = progress
        self.start = time.monotonic()
        self.last_change = self.start
        self._task: asyncio.Task[None] | None = None

    def run(self, start: float) -> None:
        self.start = self.last_change = start
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        receiver = self._receiver
        last_packets = receiver.packets
        report_at = self.start + _PROGRESS_INTERVAL
        report_packets = last_packets
        report_time = self.start
        while True:
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            packets = receiver.packets
            if packets != last_packets:
                last_packets = packets
                self.last_change = now
            if now >= report_at:
                rate = (packets - report_packets) / (now - report_time)
                self._progress.update(now - self.start, rate, packets)
                report_packets, report_time = packets, now
                report_at = now + _PROGRESS_INTERVAL

    async def wait_quiet(self) -> None:
        """Return once no datagram arrived for _GRACE_QUIET seconds (at most _GRACE_LIMIT)."""
        limit = time.monotonic() + _GRACE_LIMIT
        while True:
            now = time.monotonic()
            if now - self.last_change >= _GRACE_QUIET or now >= limit:
                return
            await asyncio.sleep(_TICK)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._progress.finish()


@dataclass(frozen=True)
class Measurement:
    """One receiver's run against one sender child."""

    receiver: str
    loop: str
    sender: SenderReport
    received: int
    received_bytes: int
    received_elapsed: float
    #: CPU time of the receiving thread from "go" to the end of the drain, and that span.
    cpu_seconds: float
    cpu_span: float
    drops: dict[str, int]
    connections: int | None
    #: ``--workers``: what each worker received (empty with one receiver process).
    workers: tuple[WorkerReport, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        sender = self.sender
        loss = sender.sent - self.received
        return {
            "receiver": self.receiver,
            "loop": self.loop,
            "sender": {
                **asdict(sender),
                "datagrams_per_s": _rate(sender.sent, sender.elapsed),
                "mbit_per_s": _mbit(sender.sent_bytes, sender.elapsed),
            },
            "received": {
                "datagrams": self.received,
                "bytes": self.received_bytes,
                "elapsed": self.received_elapsed,
                "datagrams_per_s": _rate(self.received, self.received_elapsed),
                "mbit_per_s": _mbit(self.received_bytes, self.received_elapsed),
                "cpu_seconds": self.cpu_seconds,
                "cpu_percent": 100.0 * _rate(self.cpu_seconds, self.cpu_span),
                "cpu_us_per_datagram": (1e6 * self.cpu_seconds / self.received
                                        if self.received else None),
            },
            "loss": {"datagrams": loss,
                     "percent": 100.0 * loss / sender.sent if sender.sent else 0.0},
            "drops": dict(self.drops),
            "connections": self.connections,
            "workers": [worker.as_dict(self.received_elapsed) for worker in self.workers],
        }


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def _mbit(nbytes: int, seconds: float) -> float:
    return nbytes * 8 / 1e6 / seconds if seconds > 0 else 0.0


async def _measure(receiver: _Receiver, params: SenderParams,
                   progress: _Progress) -> Measurement:
    """Open ``receiver``, run one sender child against it, drain, and close."""
    port = await receiver.open(params.host)
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe()
    child_params = dataclasses.replace(params, port=port, parent=os.getpid())
    process = context.Process(target=sender_main, args=(child_end, child_params),
                              name="udpx-perf-sender", daemon=True)
    monitor = _Monitor(receiver, progress)
    completed = False
    try:
        process.start()
        child_end.close()
        await _receive_message(parent_end, process, _READY_TIMEOUT, "'ready'")
        start = time.monotonic()
        cpu_start = time.thread_time()
        parent_end.send("go")
        monitor.run(start)
        _, report = await _receive_message(parent_end, process,
                                           params.duration + _RESULT_MARGIN, "result")
        if not isinstance(report, SenderReport):
            raise PerfError(f"unexpected result from the sender process: {report!r}")
        await monitor.wait_quiet()
        received, received_bytes = receiver.packets, receiver.bytes
        received_elapsed = monitor.last_change - start
        cpu_seconds = time.thread_time() - cpu_start
        cpu_span = time.monotonic() - start
        drops = receiver.drops()
        connections = receiver.connections()
        completed = True
    finally:
        await monitor.stop()
        parent_end.close()
        child_end.close()
        # After a failure or Ctrl-C, do not wait for the child to finish sending.
        await _reap(process, graceful=completed)
        await receiver.close()
    return Measurement(receiver=receiver.name, loop=receiver.loop_name, sender=report,
                       received=received, received_bytes=received_bytes,
                       received_elapsed=received_elapsed, cpu_seconds=cpu_seconds,
                       cpu_span=cpu_span, drops=drops,
                       connections=connections)


# -- perf -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerfConfig:
    """The options of ``python -m udpx perf`` (see its ``--help``)."""

    duration: float = 3.0
    size: int = 64
    #: Sender sockets or peers; None: DEFAULT_PEERS for ``peers``, else one (one per worker).
    clients: int | None = None
    loop: str = field(default_factory=default_loop)
    batch_size: int = 64
    host: str = "127.0.0.1"
    compare: bool = False
    #: One of SENDERS; None: a run of each of DEFAULT_SENDERS.
    sender: str | None = None
    #: How udpx receives: "task" (a recv_many() task per connection) or "protocol".
    mode: str = "task"
    burst: int = 64
    rcvbuf: int | None = None
    max_datagram: int = 65535
    rx_queue_size: int = 1024
    rx_coalesce: float = DEFAULTS.rx_coalesce
    isolate: bool = False
    describe: bool = False
    workers: int = 1


def _udpx_receiver(loop_name: str, config: PerfConfig) -> _UdpxReceiver:
    return _UdpxReceiver(loop_name, batch_size=config.batch_size,
                         max_datagram=config.max_datagram, rx_queue_size=config.rx_queue_size,
                         rcvbuf=config.rcvbuf, clients=config.clients or 1,
                         rx_coalesce=config.rx_coalesce, describe=config.describe,
                         protocol=config.mode == "protocol")


def _make_receiver(kind: str, loop_name: str, config: PerfConfig) -> _Receiver:
    if kind == "udpx":
        return _udpx_receiver(loop_name, config)
    return _ProtocolReceiver(loop_name, rcvbuf=config.rcvbuf)


def _measure_here(kind: str, loop_name: str, config: PerfConfig, params: SenderParams,
                  progress: TextIO | None) -> Measurement:
    """One measurement with the receiver in this process, in a fresh event loop."""
    receiver = _make_receiver(kind, loop_name, config)
    label = f"{receiver.name} ({receiver.loop_name}, {params.sender} sender)"

    async def measure() -> Measurement:
        try:
            return await _measure(receiver, params, _Progress(progress, label))
        except OSError as exc:
            raise PerfError(f"{label}: {exc}") from exc

    return _run_on(loop_name, measure)


@dataclass(frozen=True)
class ReceiverJob:
    """What a receiver process (``--isolate``) measures; pickled to it."""

    kind: str
    loop_name: str
    config: PerfConfig
    params: SenderParams
    progress: bool
    #: The pid of perf's process: this one stops if it dies (0: not).
    parent: int = 0


def receiver_main(pipe: Connection, job: ReceiverJob) -> None:
    """The entry point of a receiver process (``--isolate``): one measurement, sent back."""
    if job.parent:
        # Killed with perf (SIGTERM at its default action, SIGKILL): so is the sender it
        # starts, which dies with it.
        die_with_parent(job.parent)
    try:
        measurement = _measure_here(job.kind, job.loop_name, job.config, job.params,
                                    sys.stderr if job.progress else None)
        pipe.send(("result", measurement))
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("interrupted", None))
        raise SystemExit(130) from None
    except BaseException as exc:
        message = str(exc) if isinstance(exc, PerfError) else f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError, ValueError):
            pipe.send(("error", message))
        raise SystemExit(1) from None
    finally:
        pipe.close()


def _measure_isolated(kind: str, loop_name: str, config: PerfConfig, params: SenderParams,
                      progress: bool) -> Measurement:
    """One measurement with the receiver in a fresh process of its own (which starts its own
    sender child), so that no receiver inherits the state an earlier one left behind."""
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe(duplex=False)
    process = context.Process(target=receiver_main,
                              args=(child_end, ReceiverJob(kind, loop_name, config, params,
                                                           progress, os.getpid())),
                              # Not a daemon: daemons may not start children (the sender).
                              name="udpx-perf-receiver", daemon=False)
    limit = _READY_TIMEOUT + params.duration + _RESULT_MARGIN + _GRACE_LIMIT \
        + 3 * _EXIT_TIMEOUT + 10.0
    try:
        process.start()
        child_end.close()
        if not parent_end.poll(limit):
            raise PerfError(f"the receiver process sent no result within {limit:.0f} s")
        try:
            status, payload = parent_end.recv()
        except EOFError:
            process.join(_EXIT_TIMEOUT)
            raise PerfError(f"the receiver process exited unexpectedly (exit code "
                            f"{process.exitcode})") from None
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reaches the receiver process too; a kill -INT of this process
        # does not: pass it on, so that it stops its sender and cleans up.
        if process.pid is not None and process.is_alive():
            with contextlib.suppress(OSError):
                os.kill(process.pid, signal.SIGINT)
        _stop_process(process)
        raise
    except BaseException:
        _stop_process(process, graceful=False)
        raise
    finally:
        parent_end.close()
        child_end.close()
    _stop_process(process)
    if status == "interrupted":
        raise KeyboardInterrupt
    if status != "result" or not isinstance(payload, Measurement):
        raise PerfError(str(payload))
    return payload


def _stop_process(process: multiprocessing.process.BaseProcess, graceful: bool = True) -> None:
    """Join ``process`` (bounded); terminate, then kill it if it does not exit."""
    if process.pid is None:
        return  # never started
    if graceful:
        process.join(_EXIT_TIMEOUT)
    if process.is_alive():
        process.terminate()
        process.join(1.0)
    if process.is_alive():
        process.kill()
        process.join(1.0)


# -- perf --workers ----------------------------------------------------------------------------
#
#   parent (this process, an asyncio loop)      receiver process (spawn): udpx.run(workers=N)
#   start the receiver process ───────────────▶ worker k: listen(host, port), reuse_port
#   ◀── ("ready", pid) from every worker ───────
#   start the sender child, "go" to it and ("go", start) to every worker
#   ◀── the sender's result
#   ("stop", None) to every worker ───────────▶ drain until quiet
#   ◀── ("result", WorkerReport) ───────────────  return: run() ends when all have
#
# One pipe per worker id (created here, inherited by the forked workers): the workers do not
# share a stream. The receiver process is spawned, not forked from this one, so that the
# coordinating loop here never forks; udpx.run() forks the workers from that clean process.


@dataclass(frozen=True)
class WorkerReport:
    """What one receiving worker of ``perf --workers`` got, from "go" until quiet."""

    worker: int
    pid: int
    received: int
    received_bytes: int
    #: time.monotonic() of the last change of its counters (system-wide on Linux).
    last_change: float
    cpu_seconds: float
    cpu_span: float
    drops: dict[str, int]
    connections: int

    def as_dict(self, elapsed: float) -> dict[str, Any]:
        """Rates over the whole measurement's ``elapsed``, so that the workers' rates add
        up to the total."""
        return {
            "worker": self.worker,
            "pid": self.pid,
            "datagrams": self.received,
            "bytes": self.received_bytes,
            "datagrams_per_s": _rate(self.received, elapsed),
            "mbit_per_s": _mbit(self.received_bytes, elapsed),
            "cpu_seconds": self.cpu_seconds,
            "cpu_percent": 100.0 * _rate(self.cpu_seconds, self.cpu_span),
            "peers": self.connections,
            "drops": dict(self.drops),
        }


@dataclass(frozen=True)
class WorkersJob:
    """What the receiver process of ``perf --workers`` runs; pickled to it."""

    config: PerfConfig
    port: int
    pipes: tuple[Connection, ...]


def workers_main(job: WorkersJob) -> None:
    """The receiver process's entry point: ``job.config.workers`` workers until each has
    reported (or SIGTERM)."""
    # Ctrl-C reaches the whole process group; the parent decides when this ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(os.getppid())  # SIGTERM, i.e. a graceful stop, if the parent dies
    run(functools.partial(_receive_as_worker, job), workers=job.config.workers,
        loop_factory=_loop_factory(job.config.loop))


class _ParentGone(Exception):
    """The parent closed its end of a worker's pipe: it stopped, and waits for nothing."""


async def _next_message(pipe: Connection, timeout: float, expected: str) -> Any:
    if not pipe.poll() and not await _wait_readable(pipe.fileno(), timeout):
        raise PerfError(f"no {expected!r} from the parent within {timeout:.0f} s")
    try:
        kind, payload = pipe.recv()
    except EOFError:
        raise _ParentGone from None
    if kind != expected:
        raise PerfError(f"expected {expected!r} from the parent, got {kind!r}")
    return payload


async def _receive_as_worker(job: WorkersJob) -> None:
    index = worker_id()
    assert index is not None
    pipe = job.pipes[index]
    config = job.config
    receiver = _udpx_receiver(config.loop, config)
    try:
        await receiver.open(config.host, job.port)
        try:
            pipe.send(("ready", os.getpid()))
            report = await _measure_as_worker(pipe, receiver, config, index)
            pipe.send(("result", report))
        except (_ParentGone, BrokenPipeError):
            return  # the parent stopped (Ctrl-C, SIGTERM): nobody waits for a report
    finally:
        await receiver.close()


async def _measure_as_worker(pipe: Connection, receiver: _UdpxReceiver, config: PerfConfig,
                             index: int) -> WorkerReport:
    """A worker's measurement, from the parent's "go" to its "stop"."""
    start = await _next_message(pipe, _READY_TIMEOUT + _GO_TIMEOUT, "go")
    cpu_start = time.thread_time()
    monitor = _Monitor(receiver, _Progress(None, ""))
    monitor.run(start)
    try:
        await _next_message(pipe, config.duration + _RESULT_MARGIN + _READY_TIMEOUT, "stop")
        await monitor.wait_quiet()
        report = WorkerReport(worker=index, pid=os.getpid(), received=receiver.packets,
                              received_bytes=receiver.bytes, last_change=monitor.last_change,
                              cpu_seconds=time.thread_time() - cpu_start,
                              cpu_span=time.monotonic() - start, drops=receiver.drops(),
                              connections=receiver.connections() or 0)
    finally:
        await monitor.stop()
    return report


class _PassSigusr1:
    """SIGUSR1 to this process (the pid the user knows) goes to the receivers' process, whose
    udpx.run passes it on to every worker, each printing its describe(), but only while
    ``on``: before its workers' receivers are open, one would die of it, and after "stop"
    they are closing. Meanwhile it is ignored here (its default action would end this
    process). Main thread only."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process
        self.on = False
        self.signum = _sigusr1_here()
        if self.signum is not None:
            _add_handler(self.signum, self._pass_on)

    def _pass_on(self) -> None:
        process = self.process
        # (ValueError: the process object was closed meanwhile.)
        with contextlib.suppress(ValueError, ProcessLookupError):
            if self.on and process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signal.SIGUSR1)

    def remove(self) -> None:
        if self.signum is not None:
            _remove_handler(self.signum)
            self.signum = None


def _measure_workers(config: PerfConfig, params: SenderParams) -> Measurement:
    """One measurement of udpx receiving in ``config.workers`` workers of ``udpx.run()``."""
    # A free port, found as the tests find one: several sockets must bind it, so it cannot be
    # port 0. (Nothing else takes it in the moment between, on a machine running a benchmark.)
    with socket.socket(_family_of(config.host), socket.SOCK_DGRAM) as probe:
        probe.bind((config.host, 0))
        port = int(probe.getsockname()[1])
    return _run_on("asyncio", lambda: _coordinate_workers(config, dataclasses.replace(
        params, port=port)))


async def _coordinate_workers(config: PerfConfig, params: SenderParams) -> Measurement:
    context = multiprocessing.get_context("spawn")
    ends = [context.Pipe() for _ in range(config.workers)]
    pipes = [parent_end for parent_end, _ in ends]
    receivers = context.Process(
        target=workers_main,
        args=(WorkersJob(config, params.port, tuple(child_end for _, child_end in ends)),),
        # Not a daemon: its workers are its children.
        name="udpx-perf-workers", daemon=False)
    sender_end, sender_child_end = context.Pipe()
    sender = context.Process(target=sender_main, args=(
        sender_child_end, dataclasses.replace(params, parent=os.getpid())),
                             name="udpx-perf-sender", daemon=True)
    who = "a receiving worker"
    completed = False
    passing = _PassSigusr1(receivers)
    try:
        receivers.start()
        for _, child_end in ends:
            child_end.close()
        pids = [(await _receive_message(pipe, receivers, _READY_TIMEOUT, "'ready'", who))[1]
                for pipe in pipes]
        passing.on = True
        sender.start()
        sender_child_end.close()
        await _receive_message(sender_end, sender, _READY_TIMEOUT, "'ready'")
        start = time.monotonic()
        for pipe in pipes:
            pipe.send(("go", start))
        sender_end.send("go")
        _, report = await _receive_message(sender_end, sender,
                                           params.duration + _RESULT_MARGIN, "result")
        if not isinstance(report, SenderReport):
            raise PerfError(f"unexpected result from the sender process: {report!r}")
        passing.on = False
        for pipe in pipes:
            pipe.send(("stop", None))
        reports: list[WorkerReport] = []
        for pipe, pid in zip(pipes, pids):
            _, worker = await _receive_message(pipe, receivers, _GRACE_LIMIT + _EXIT_TIMEOUT,
                                               "result", who)
            if not isinstance(worker, WorkerReport) or worker.pid != pid:
                raise PerfError(f"unexpected result from a receiving worker: {worker!r} "
                                f"(was it restarted?)")
            reports.append(worker)
        completed = True
    finally:
        for pipe in pipes:
            pipe.close()
        sender_end.close()
        sender_child_end.close()
        for _, child_end in ends:
            child_end.close()
        await _reap(sender, graceful=completed)
        if not completed and receivers.pid is not None and receivers.is_alive():
            receivers.terminate()  # SIGTERM: udpx.run stops its workers gracefully
        await _reap(receivers, graceful=True)
        passing.remove()
    drops: dict[str, int] = {}
    for worker in reports:
        for reason, count in worker.drops.items():
            drops[reason] = drops.get(reason, 0) + count
    return Measurement(receiver="udpx", loop=config.loop, sender=report,
                       received=sum(worker.received for worker in reports),
                       received_bytes=sum(worker.received_bytes for worker in reports),
                       received_elapsed=max(worker.last_change for worker in reports) - start,
                       cpu_seconds=sum(worker.cpu_seconds for worker in reports),
                       cpu_span=max(worker.cpu_span for worker in reports), drops=drops,
                       connections=sum(worker.connections for worker in reports),
                       workers=tuple(reports))


def run_perf(config: PerfConfig, *, progress: TextIO | None = None) -> dict[str, Any]:
    """Run the measurement(s) of ``config``; return the summary (what ``--json`` prints).

    Each receiver runs in a fresh event loop of its kind against a fresh sender child: in this
    process, or with ``config.isolate`` in a fresh process of its own. ``progress``: where
    the live progress lines go (None: nowhere; with ``isolate``, anything else means stderr).

    With ``config.workers`` above 1 the udpx receiver runs in that many workers of
    ``udpx.run()`` (in a process of their own), each with its own socket on one port, and
    the result lists each worker's share (no progress lines then).

    Without ``config.sender`` there is a run of each of DEFAULT_SENDERS, one after the other:
    the summary's ``runs`` lists them, and its ``udpx``, ``compare`` and ``ratios`` are the
    first run's (each datagram sent alone, from many peers).

    Raises:
        PerfError: a receiver could not be opened, or the sender failed or did not answer.
        ValueError: ``workers`` above 1 with ``compare``.
    """
    if config.workers > 1 and config.compare:
        raise ValueError("workers > 1 cannot be combined with compare")
    runs = [_run_of(run_config, progress) for run_config in perf_runs(config)]
    from . import __version__  # noqa: PLC0415

    return {
        "udpx_version": __version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "config": asdict(config),
        "udpx": runs[0]["udpx"],
        "compare": runs[0]["compare"],
        "ratios": runs[0]["ratios"],
        "cpu_ratios": runs[0]["cpu_ratios"],
        "runs": runs,
    }


def perf_runs(config: PerfConfig) -> list[PerfConfig]:
    """The runs ``config`` asks for, each with its sender and its number of clients."""
    senders = DEFAULT_SENDERS if config.sender is None else (config.sender,)
    if config.sender is not None and config.sender not in SENDERS:
        raise ValueError(f"sender must be one of {', '.join(SENDERS)}, got {config.sender!r}")
    if config.clients is not None and config.clients < 1:
        raise ValueError(f"clients must be at least 1 (None: the default), got {config.clients}")
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    return [dataclasses.replace(config, sender=sender, clients=config.clients or (
        DEFAULT_PEERS if sender == "peers" else max(1, config.workers))) for sender in senders]


def _run_of(config: PerfConfig, progress: TextIO | None) -> dict[str, Any]:
    """One sender's run: udpx, and with ``compare`` the baselines, against it."""
    assert config.sender is not None and config.clients is not None
    params = SenderParams(host=config.host, port=0, size=config.size, clients=config.clients,
                          duration=config.duration, sender=config.sender, burst=config.burst,
                          batch_size=config.batch_size, loop=config.loop)
    runs = [("udpx", config.loop)]
    if config.compare:
        runs += [("protocol", "asyncio")] + (
            [("protocol", "uvloop")] if uvloop_available() else [])
    measurements: list[Measurement] = []
    for kind, loop_name in runs:
        # udpx always runs here, first, so that SIGUSR1 and --describe reach its listener;
        # --isolate gives each baseline a fresh process of its own.
        if config.isolate and kind != "udpx":
            measurements.append(_measure_isolated(kind, loop_name, config, params,
                                                  progress is not None))
        elif kind == "udpx" and config.workers > 1:
            measurements.append(_measure_workers(config, params))
        else:
            measurements.append(_measure_here(kind, loop_name, config, params, progress))
    results = [measurement.as_dict() for measurement in measurements]
    udpx_rate = results[0]["received"]["datagrams_per_s"]
    udpx_cpu = results[0]["received"]["cpu_us_per_datagram"]
    return {
        "sender": config.sender,
        "clients": config.clients,
        "udpx": results[0],
        "compare": results[1:],
        # udpx's received/s over each baseline's (above 1: udpx received more).
        "ratios": {result["receiver"]: (udpx_rate / result["received"]["datagrams_per_s"]
                                        if result["received"]["datagrams_per_s"] else None)
                   for result in results[1:]},
        # udpx's CPU per datagram received over each baseline's (below 1: udpx costs less).
        "cpu_ratios": {result["receiver"]: (
            udpx_cpu / result["received"]["cpu_us_per_datagram"]
            if udpx_cpu is not None and result["received"]["cpu_us_per_datagram"] else None)
            for result in results[1:]},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable report of a ``run_perf()`` summary."""
    config = summary["config"]
    lines = [
        f"udpx perf: {config['size']}-byte datagrams to {config['host']}, "
        f"{config['duration']:g} s per run, batch {config['batch_size']}, "
        f"{summary['cpu_count']} CPUs, Python {summary['python']}",
    ]
    for each in summary["runs"]:
        lines += ["", _run_title(each["sender"], each["clients"])]
        lines += _format_run(each, isolate=bool(config.get("isolate")))
    return "\n".join(lines)


def _run_title(sender: str, clients: int) -> str:
    if sender == "peers":
        return (f"{_count(clients, 'peer')}, each sending one datagram at a time (no GSO), as "
                f"most clients do:")
    if sender == "udpx":
        return (f"{_count(clients, 'udpx peer')} sending with send_many(), which udpx sends with "
                f"GSO where it can: the udpx-to-udpx best case (the kernel hands the receiver "
                f"whole runs):")
    return (f"{_count(clients, 'plain socket')} sending with GSO (UDP_SEGMENT): a GSO sender's "
            f"best case (the kernel hands the receiver whole runs):")


def _count(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _format_run(run: dict[str, Any], *, isolate: bool) -> list[str]:
    udpx_result = run["udpx"]
    lines = _format_measurement(udpx_result)
    if not run["compare"]:
        return lines
    lines.append("")
    where = "a fresh process" if isolate else "a fresh loop in this process"
    lines.append(f"  comparison (same sender and duration, each receiver in {where}; udpx ÷ "
                 f"this: received/s, and CPU per datagram)")
    header = (f"    {'receiver':<26} {'loop':<8} {'sent/s':>11} {'received/s':>11} "
              f"{'loss %':>7} {'CPU %':>6} {'CPU µs':>7} {'rate ratio':>10} {'CPU ratio':>9}")
    lines.append(header)
    results = (udpx_result, *run["compare"])
    for result in results:
        udpx_row = result is udpx_result
        ratio = 1.0 if udpx_row else run["ratios"].get(result["receiver"])
        cpu_ratio = 1.0 if udpx_row else run["cpu_ratios"].get(result["receiver"])
        cpu_us = result["received"]["cpu_us_per_datagram"]
        lines.append(
            f"    {result['receiver']:<26} {result['loop']:<8} "
            f"{result['sender']['datagrams_per_s']:>11,.0f} "
            f"{result['received']['datagrams_per_s']:>11,.0f} "
            f"{result['loss']['percent']:>7.1f} {result['received']['cpu_percent']:>6.0f} "
            f"{_maybe(cpu_us, '.2f'):>7} {_maybe(ratio, '.2f'):>10} "
            f"{_maybe(cpu_ratio, '.2f'):>9}")
    if not udpx_result["loss"]["datagrams"]:
        lines.append("    (udpx lost nothing: its rate is the sender's; where a receiver kept "
                     "up, compare CPU per datagram)")
    return lines


def _maybe(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _format_measurement(result: dict[str, Any]) -> list[str]:
    sender = result["sender"]
    received = result["received"]
    loss = result["loss"]
    kind = sender["kind"] + (f"; {sender['note']}" if sender["note"] else "")
    drops = ", ".join(f"{reason} {count:,}" for reason, count in result["drops"].items())
    lines = [
        f"  sender   ({kind}, child process): {sender['sent']:,} datagrams in "
        f"{sender['elapsed']:.2f} s = {sender['datagrams_per_s']:,.0f} datagrams/s, "
        f"{sender['mbit_per_s']:,.1f} Mbit/s"
        + (f", {sender['errors']:,} refused" if sender["errors"] else ""),
        f"  receiver ({result['receiver']} on {result['loop']}"
        + (f", {len(result['workers'])} workers" if result.get("workers") else "")
        + f"): {received['datagrams']:,} "
        f"datagrams in {received['elapsed']:.2f} s = {received['datagrams_per_s']:,.0f} "
        f"datagrams/s, {received['mbit_per_s']:,.1f} Mbit/s, "
        f"{received['cpu_percent']:.0f} % of a CPU"
        + (f" = {received['cpu_us_per_datagram']:.2f} µs per datagram"
           if received["cpu_us_per_datagram"] is not None else ""),
        f"  loss     {loss['datagrams']:,} datagrams ({loss['percent']:.2f} %)",
        f"  drops    {drops or 'none reported'}",
    ]
    if result["connections"] is not None:
        lines.append(f"  accepted {result['connections']:,} connection(s)")
    for worker in result.get("workers", []):
        lines.append(
            f"  worker {worker['worker']} (pid {worker['pid']}): {worker['datagrams']:,} "
            f"datagrams = {worker['datagrams_per_s']:,.0f} datagrams/s, "
            f"{worker['peers']:,} peer(s), {worker['cpu_percent']:.0f} % of a CPU")
    if any(worker["peers"] == 0 for worker in result.get("workers", [])):
        lines.append("  (a worker without peers got nothing: the kernel spreads peers over the "
                     "workers, not datagrams; use more --clients)")
    return lines


# -- echo -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EchoConfig:
    """The options of ``python -m udpx echo`` (see its ``--help``)."""

    host: str
    port: int
    loop: str = field(default_factory=default_loop)
    batch_size: int = 64
    idle_timeout: float | None = 60.0
    stats_interval: float | None = None
    describe: bool = False
    workers: int = 1


def run_echo(config: EchoConfig, *, out: TextIO, err: TextIO) -> None:
    """Serve until SIGINT or SIGTERM, then close the listener gracefully, in
    ``config.workers`` processes of ``udpx.run()`` (one: in this process).

    Prints ``listening on HOST:PORT`` to ``out`` (flushed) once datagrams can arrive; with
    several workers each worker prints it, followed by `` (worker N)``.

    Raises:
        PerfError: the listener could not be opened (with several workers: found out once,
            before any worker starts).
    """
    if config.workers > 1:
        # Each worker would fail alike, be restarted and log its traceback until udpx.run()
        # gave up: try the address once here, as the workers will take it (SO_REUSEPORT).
        asyncio.run(_try_listen(config))
    run(functools.partial(_echo, config, out, err), workers=config.workers,
        loop_factory=_loop_factory(config.loop))


async def _try_listen(config: EchoConfig) -> None:
    try:
        listener = await listen(config.host, config.port, reuse_port=True)
    except OSError as exc:
        raise PerfError(f"cannot listen on {config.host}:{config.port}: {exc}") from exc
    await listener.aclose()


def _write_line(stream: TextIO, line: str) -> None:
    # One write per line: the workers of a run share the stream, and print() may write the
    # text and the newline separately (two describe() lines came out as one). A pipe keeps a
    # write whole only up to 4 KiB.
    stream.write(line + "\n")
    stream.flush()


async def _echo_conn(conn: UDPConn, err: TextIO) -> None:
    # Whole batches in, whole batches out. The listener reaps the connection after
    # idle_timeout without traffic; recv_many() then raises ConnectionClosed.
    recv_many = conn.recv_many
    send_many = conn.send_many
    try:
        while True:
            await send_many(await recv_many())
    except ConnectionClosed:
        pass
    except Exception as exc:
        _write_line(err, f"udpx echo: connection from {format_address(conn.remote_addr)} "
                         f"failed: {type(exc).__name__}: {exc}")
    finally:
        conn.close()


async def _echo(config: EchoConfig, out: TextIO, err: TextIO) -> None:
    # Runs until udpx.run() cancels it (SIGINT/SIGTERM), then closes gracefully.
    worker = f" (worker {worker_id()})" if config.workers > 1 else ""
    try:
        listener = await listen(config.host, config.port, batch_size=config.batch_size,
                                idle_timeout=config.idle_timeout)
    except OSError as exc:
        raise PerfError(f"cannot listen on {config.host}:{config.port}: {exc}") from exc
    _write_line(out, f"listening on {format_address(listener.local_addr)}{worker}")
    _describe_on_sigusr1(listener, out)
    tasks: set[asyncio.Task[None]] = set()

    async def accept() -> None:
        async for conn in listener:
            task = asyncio.create_task(_echo_conn(conn, err))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def report() -> None:
        assert config.stats_interval is not None
        while True:
            await asyncio.sleep(config.stats_interval)
            stats = listener.stats
            drops = ", ".join(f"{reason} {count}" for reason, count in stats.drops.items()
                              if count)
            _write_line(err, f"udpx echo{worker}: {stats.conns} connection(s), {stats.accepted} "
                             f"accepted, rx {stats.rx_packets:,}, tx {stats.tx_packets:,}, "
                             f"drops: {drops or 'none'}")

    helpers: list[asyncio.Task[Any]] = [asyncio.create_task(accept())]
    if config.stats_interval:
        helpers.append(asyncio.create_task(report()))
    try:
        # Returns only if a helper died; a stop signal cancels this wait.
        await asyncio.wait(helpers, return_when=asyncio.FIRST_COMPLETED)
    finally:
        _describe_on_sigusr1(None, out)
        if config.describe:
            _write_line(out, json.dumps(listener.describe()))
        listener.close()
        # Graceful: what the connections queued is flushed; their tasks end on
        # ConnectionClosed. Bounded, so that a stuck writer cannot keep us from exiting.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EXIT_TIMEOUT):
                await listener.wait_closed()
                await asyncio.gather(*tasks, return_exceptions=True)
        for task in (*helpers, *tasks):
            task.cancel()
        await asyncio.gather(*helpers, *tasks, return_exceptions=True)
        _write_line(err, f"udpx echo{worker}: closed")
    for task in helpers:
        if task.done() and not task.cancelled():
            task.result()  # an accept loop that died: raise its error
