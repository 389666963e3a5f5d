"""The command line: ``python -m udpx perf`` and ``python -m udpx echo HOST PORT``.

Argument parsing and dispatch only; the commands live in ``udpx._perf``. Exit status: 0 on
success, 2 on bad arguments, 1 when the command fails at run time (130 when interrupted).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
from collections.abc import Callable, Sequence

from ._perf import (
    DEFAULT_PEERS,
    LOOPS,
    MODES,
    SENDERS,
    EchoConfig,
    PerfConfig,
    PerfError,
    default_loop,
    format_summary,
    run_echo,
    run_perf,
    uvloop_available,
)

__all__ = ["build_parser", "main"]

_MAX_PAYLOAD = {"127.0.0.1": 65507, "::1": 65527}


def _number(low: float, high: float, *, allow_low: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (
                value == low and not allow_low):
            bound = f"{'at least' if allow_low else 'more than'} {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound} and at most {high:g}, got {text}")
        return value

    return parse


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _loop_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loop", choices=LOOPS, default=None,
        help=f"event loop to run udpx on (default: uvloop if it is installed, else asyncio; "
             f"here: {default_loop()})")


def _workers_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--workers", type=_integer(1, 1024), default=1, metavar="N",
                        help=f"{text} (default: %(default)s)")


def _log_workers_to_stderr(level: int) -> None:
    # The CLI is an application: with several workers, what udpx.run logs (restarts above
    # all) is worth seeing. The library itself only logs.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("udpx")
    logger.addHandler(handler)
    logger.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m udpx``."""
    from . import __version__  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="python -m udpx",
        description="udpx: TCP-like asyncio connections over UDP. Tools to measure and try it.",
        epilog="Run 'python -m udpx COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"udpx {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    perf = commands.add_parser(
        "perf", help="measure loopback throughput of a udpx receiver",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure how many datagrams per second a udpx listener receives on loopback,\n"
            "and at what CPU cost.\n\n"
            "The receiver (udpx.listen, one recv_many() task per connection, or with --mode\n"
            "protocol a ConnProtocol per connection) runs in this process; the sender runs in\n"
            "one child process and sends as fast as it can for DURATION seconds. Then the\n"
            "receiver drains briefly and a summary is printed: rates sent and received, loss,\n"
            "CPU per datagram, and drops by reason. A live progress line goes to stderr while\n"
            "it runs.\n\n"
            "Without --sender there are two runs. First, what most peers send: 1,000 peers\n"
            "(CLIENTS) each sending one datagram at a time, no GSO ('--sender peers': with\n"
            "root or CAP_NET_RAW one raw socket sends them from 1,000 source ports of\n"
            "127.0.0.1; without, and over ::1, one socket per peer makes one send() per\n"
            "datagram, which sends fewer and less evenly). A Python sender sends these at\n"
            "about the rate a receiver takes them, so read this run's CPU per datagram.\n"
            "Second, beside it, the udpx-to-udpx best case: one udpx.dial() connection\n"
            "calling send_many() ('--sender udpx'), which udpx sends with UDP GSO (up to 64\n"
            "datagrams per sendmsg) and the receiving kernel hands over in whole runs (GRO).\n"
            "'--sender gso' sends those runs from plain sockets with UDP_SEGMENT, to take\n"
            "udpx's send path out of the picture.\n\n"
            "With --compare, the same sender is then run against a plain asyncio and a uvloop\n"
            "DatagramProtocol receiver, and a table compares them. Rates from one run only:\n"
            "repeat runs and compare ratios, not absolute numbers, on a shared machine.\n\n"
            "With --compare each receiver runs in a fresh process of its own: a receiver in\n"
            "a shared process inherits state from those before it (asyncio's DatagramProtocol,\n"
            "which calls recvfrom(256 KiB) per datagram, runs several times faster or slower\n"
            "depending on whether glibc's malloc already serves such buffers from the heap).\n"
            "--no-isolate runs them all in this process, one after the other."),
        epilog=("examples:\n"
                "  python -m udpx perf\n"
                "  python -m udpx perf --compare\n"
                "  python -m udpx perf --sender udpx --size 1200 --clients 4 --compare\n"
                "  python -m udpx perf --loop asyncio --duration 1 --json"))
    perf.add_argument("--duration", type=_number(0, 3600), default=3.0, metavar="SECONDS",
                      help="how long the sender sends (default: %(default)s)")
    perf.add_argument("--size", type=_integer(0, 65527), default=64, metavar="BYTES",
                      help="payload bytes per datagram (default: %(default)s; at most 65507 "
                           "for 127.0.0.1, 65527 for ::1)")
    perf.add_argument("--clients", type=_integer(1, 1024), default=None, metavar="N",
                      help="peers of the sender, i.e. connections on the listener (default: "
                           f"{DEFAULT_PEERS:,} for peers, 1 for udpx and gso, or one per "
                           "worker)")
    _loop_option(perf)
    perf.add_argument("--batch-size", type=_integer(1, 1024), default=64, metavar="N",
                      help="udpx batch_size: datagrams per recvmmsg/sendmmsg (default: "
                           "%(default)s)")
    perf.add_argument("--host", choices=("127.0.0.1", "::1"), default="127.0.0.1",
                      help="loopback address to use (default: %(default)s)")
    perf.add_argument("--compare", action="store_true",
                      help="also measure asyncio and uvloop DatagramProtocol receivers")
    perf.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                      help="run each receiver in a fresh process of its own (default: with "
                           "--compare)")
    perf.add_argument("--json", action="store_true",
                      help="print the summary as one JSON object on stdout (the text summary "
                           "then goes to stderr): 'runs' lists the runs; 'udpx', 'compare', "
                           "'ratios' and 'cpu_ratios' are the first run's")
    perf.add_argument("--sender", choices=SENDERS, default=None,
                      help="peers: each datagram sent alone, one per peer per turn; udpx: "
                           "udpx.dial() + send_many(); gso: plain sockets with UDP_SEGMENT "
                           "(default: a run of peers, then one of udpx)")
    perf.add_argument("--mode", choices=MODES, default="task",
                      help="how the udpx listener receives: task, a recv_many() task per "
                           "connection; protocol, protocol mode (a ConnProtocol per "
                           "connection, called from the reader: no task) (default: "
                           "%(default)s)")
    perf.add_argument("--burst", type=_integer(1, 65536), default=64, metavar="N",
                      help="udpx and gso senders: datagrams per send call, per send_many() "
                           "or GSO segments per send (capped at 64 and 65,000 bytes) (default: "
                           "%(default)s)")
    perf.add_argument("--rcvbuf", type=_integer(0, 2**31 - 1), default=4 * 1024 * 1024,
                      metavar="BYTES",
                      help="SO_RCVBUF requested for every receiver, 0 for the kernel's default "
                           "(default: %(default)s; Linux caps it at net.core.rmem_max and udpx "
                           "warns when it does)")
    perf.add_argument("--max-datagram", type=_integer(1, 65535), default=65535, metavar="BYTES",
                      help="udpx max_datagram (receive slot size) of the listener (default: "
                           "%(default)s)")
    perf.add_argument("--rx-queue-size", type=_integer(1, 2**31 - 1), default=1024,
                      metavar="N", help="udpx rx_queue_size per connection (default: "
                                        "%(default)s)")
    perf.add_argument("--rx-coalesce", type=_number(0, 1, allow_low=True), default=0.001,
                      metavar="SECONDS",
                      help="udpx rx_coalesce of the listener: the longest its reader waits "
                           "between reads of a busy socket, 0 for never (default: "
                           "%(default)s)")
    perf.add_argument("--quiet", "-q", action="store_true",
                      help="no live progress line on stderr")
    perf.add_argument("--describe", action="store_true",
                      help="at the end of each run, print the udpx listener's describe() "
                           "snapshot as one JSON line on stderr (SIGUSR1 prints one at any "
                           "time)")
    _workers_option(perf, "receive in N worker processes of udpx.run sharing the port "
                          "(SO_REUSEPORT: the kernel spreads the sender's CLIENTS sockets over "
                          "them, so use --clients >= N); reports each worker's rate and peers "
                          "and the total; no progress line, not with --compare")

    echo = commands.add_parser(
        "echo", help="run a udpx echo server",
        description=("Echo every datagram back to its sender, one udpx connection (and task) per "
                     "peer. Prints 'listening on HOST:PORT' to stdout once ready, and runs "
                     "until SIGINT or SIGTERM, then closes the listener gracefully and exits 0."),
        epilog="example: python -m udpx echo 127.0.0.1 9000   # then: echo hi | socat -t1 - "
               "UDP:127.0.0.1:9000")
    echo.add_argument("host", metavar="HOST",
                      help="address to bind: 127.0.0.1, ::1, 0.0.0.0, :: or a host name")
    echo.add_argument("port", metavar="PORT", type=_integer(0, 65535),
                      help="UDP port to bind (0: a free one, printed at startup)")
    _loop_option(echo)
    echo.add_argument("--batch-size", type=_integer(1, 1024), default=64, metavar="N",
                      help="udpx batch_size (default: %(default)s)")
    echo.add_argument("--idle-timeout", type=_number(0, 10**9, allow_low=True), default=60.0,
                      metavar="SECONDS",
                      help="udpx idle_timeout: close a connection after this long without "
                           "traffic (default: %(default)s; 0: never)")
    echo.add_argument("--stats-interval", type=_number(0, 10**9, allow_low=True), default=0.0,
                      metavar="SECONDS",
                      help="print connection and packet counts to stderr this often "
                           "(default: 0, never)")
    echo.add_argument("--describe", action="store_true",
                      help="at exit, print the listener's describe() snapshot (address, options, "
                           "socket buffers, every connection) as one JSON line on stdout; SIGUSR1 "
                           "prints one at any time (with --workers, each worker prints its "
                           "own: SIGUSR1 to the main pid reaches them all, or to one worker's "
                           "pid)")
    _workers_option(echo, "serve in N worker processes sharing the port (udpx.run: "
                          "SO_REUSEPORT; PORT must not be 0); each prints its 'listening on' "
                          "line with '(worker K)'; starts, restarts and stops are logged to "
                          "stderr")
    perf.set_defaults(command_parser=perf)
    echo.set_defaults(command_parser=echo)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    """A signal handler: the signal is taken as SIGINT (Ctrl-C), by whoever handles that now."""
    signal.raise_signal(signal.SIGINT)


def _perf(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    limit = _MAX_PAYLOAD[args.host]
    if args.size > limit:
        parser.error(f"argument --size: at most {limit} bytes over {args.host}, got {args.size}")
    if args.workers > 1 and args.compare:
        parser.error("argument --workers: not with --compare (the baselines run in one "
                     "process)")
    if args.workers > 1:
        _log_workers_to_stderr(logging.WARNING)
    config = PerfConfig(duration=args.duration, size=args.size, clients=args.clients,
                        loop=args.loop, batch_size=args.batch_size, host=args.host,
                        compare=args.compare, sender=args.sender, mode=args.mode,
                        burst=args.burst,
                        rcvbuf=args.rcvbuf or None, max_datagram=args.max_datagram,
                        rx_queue_size=args.rx_queue_size, rx_coalesce=args.rx_coalesce,
                        isolate=args.compare if args.isolate is None else args.isolate,
                        describe=args.describe, workers=args.workers)
    # SIGTERM stops a measurement as Ctrl-C does: the children it started are stopped and
    # the command reports "interrupted" (its default action ended this process alone, and
    # left its workers to find their pipes closed). Not where SIGINT is ignored (a shell
    # script's background job): SIGTERM then keeps its default action.
    previous = (signal.signal(signal.SIGTERM, _interrupt)
                if callable(signal.getsignal(signal.SIGINT)) else None)
    try:
        summary = run_perf(config, progress=None if args.quiet else sys.stderr)
    except PerfError as exc:
        print(f"udpx perf: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    text = format_summary(summary)
    if args.json:
        print(text, file=sys.stderr, flush=True)
        print(json.dumps(summary), flush=True)
    else:
        print(text, flush=True)
    return 0


def _echo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.workers > 1 and args.port == 0:
        parser.error("argument --workers: several workers need a PORT other than 0 (each would "
                     "get a different free port)")
    if args.workers > 1:
        _log_workers_to_stderr(logging.INFO)
    config = EchoConfig(host=args.host, port=args.port, loop=args.loop,
                        batch_size=args.batch_size, idle_timeout=args.idle_timeout or None,
                        stats_interval=args.stats_interval or None, describe=args.describe,
                        workers=args.workers)
    try:
        run_echo(config, out=sys.stdout, err=sys.stderr)
    except PerfError as exc:
        print(f"udpx echo: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit
    status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.loop is None:
        args.loop = default_loop()
    elif args.loop == "uvloop" and not uvloop_available():
        parser.error("argument --loop: uvloop is not installed (pip install uvloop)")
    try:
        # Errors in a command's own arguments show its usage, not the top level's.
        if args.command == "perf":
            return _perf(args.command_parser, args)
        return _echo(args.command_parser, args)
    except KeyboardInterrupt:
        print(f"udpx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # SIGUSR1 asks perf and echo for describe(). Until a receiver has installed its handler
    # (and after it took it away, while closing), the signal's default action would end the
    # process, or a worker that udpx.run starts, which inherits this; ignored meanwhile.
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sys.exit(main())
