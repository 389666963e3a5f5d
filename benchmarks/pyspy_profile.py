"""Profile udpx's receive or send path under load with py-spy, and summarise where time goes.

    pip install py-spy
    python -m benchmarks.pyspy_profile recv udpx-recv_many --loop uvloop --size 64
    python -m benchmarks.pyspy_profile recv udpx-recv_many --peers 10000 --burst 8
    python -m benchmarks.pyspy_profile recv udpx-proto --peers 10000 --burst 1 --sender raw
    python -m benchmarks.pyspy_profile recv udpx-proto --peers 10000 --burst 1 --sender raw \
        --listen-host 0.0.0.0
    python -m benchmarks.pyspy_profile send udpx-send --loop uvloop --size 64 [--no-gso]
    python -m benchmarks.pyspy_profile echo udpx-proto --peers 10000
    python -m benchmarks.pyspy_profile recv udpx-proto --peers 1000 --burst 1 --sender raw \
        --connected

The process under test is the suite's own worker (``_workers.py``): a udpx receiver fed by the
saturating C sender, a udpx sender draining into the C receiver, or an echo server answering
the C client's N sockets with one request in flight on each (the many-peer echo case). py-spy
samples it (``--nonblocking``, so the process is never paused) for a few seconds in the middle
of the run; the summary gives each function's and each line's share of the samples in which the
process was running (time it spent waiting in epoll is not sampled). A ctypes or socket call's
share is the time spent in that system call.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._harness import compile_programs, worker

_LINE = re.compile(r":\d+\)$")


def summarise(raw: Path, top: int) -> str:
    """Self time by function and by line, and inclusive time by function, from py-spy's raw
    (collapsed stacks) output."""
    by_function: collections.Counter[str] = collections.Counter()
    by_line: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if "(" in frame]
        if not frames:
            continue
        total += count
        by_line[frames[-1]] += count
        by_function[_LINE.sub(")", frames[-1])] += count
        for name in {_LINE.sub(")", frame) for frame in frames}:
            inclusive[name] += count
    out = [f"{total} samples"]
    for title, counter in (("self time by function", by_function),
                           ("self time by line", by_line),
                           ("inclusive time by function", inclusive)):
        out.append(f"-- {title}")
        out += [f"{100 * n / total:5.1f}%  {name}" for name, n in counter.most_common(top)]
    return "\n".join(out)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pyspy_profile")
    parser.add_argument("path", choices=["recv", "send", "echo"])
    parser.add_argument("impl", help="a worker of _workers.py, e.g. udpx-recv_many, udpx-send")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--peers", type=int, default=1)
    parser.add_argument("--burst", type=int, default=64)
    parser.add_argument("--no-gso", action="store_true")
    parser.add_argument("--sender", choices=["gso", "mmsg", "raw"], default="gso",
                        help="recv: the C sender's mode (blast.c; raw needs CAP_NET_RAW)")
    parser.add_argument("--batch-size", type=int, default=64, help="recv: the listener's")
    parser.add_argument("--listen-host", default="127.0.0.1",
                        help="recv: the listener's address (0.0.0.0: wildcard, packet info)")
    parser.add_argument("--connected", action="store_true",
                        help="recv: listen(connected=True), a socket per peer")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        raise SystemExit("py-spy not found: pip install py-spy")
    seconds = args.seconds
    # Sample from ``start`` on, well inside the target's measurement window (which opens once all
    # peers have connections) and well before it closes everything.
    start = 1.0 + args.peers / 2000
    window = start + seconds + 2.0
    with tempfile.TemporaryDirectory() as tmp:
        programs = compile_programs(Path(tmp))
        raw = Path(tmp) / "profile.txt"
        if args.path == "recv":
            target = subprocess.Popen(
                worker("recv", args.impl, "--loop", args.loop, "--warmup", "0.3", "--window",
                       f"{window}", "--peers", str(args.peers), "--batch-size",
                       str(args.batch_size), "--deadline", f"{window + 30}",
                       "--listen-host", args.listen_host,
                       *(["--connected"] if args.connected else [])),
                stdout=subprocess.PIPE, text=True)
            assert target.stdout is not None
            port = json.loads(target.stdout.readline())["port"]
            other = subprocess.Popen(
                [str(programs["blast"]), str(port), str(args.size), f"{window + 1}",
                 "1000000000", str(args.peers), str(args.burst), args.sender],
                stdout=subprocess.PIPE, text=True)
        elif args.path == "echo":
            target = subprocess.Popen(
                worker("echo", args.impl, "--loop", args.loop, "--peers", str(args.peers),
                       "--deadline", f"{window + 30}", "--listen-host", args.listen_host),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert target.stdout is not None and target.stdin is not None
            port = json.loads(target.stdout.readline())["port"]
            other = subprocess.Popen(
                [str(programs["echo"]), "clients", str(port), str(args.size), str(args.peers),
                 "0.3", f"{window}", f"{window + 30}", str(target.pid)],
                stdout=subprocess.PIPE, text=True)
        else:
            other = subprocess.Popen([str(programs["sink"]), "0.2", f"{window}", "0.5",
                                      f"{window + 30}"], stdout=subprocess.PIPE, text=True)
            assert other.stdout is not None
            port = json.loads(other.stdout.readline())["port"]
            target = subprocess.Popen(
                worker("send", args.impl, "--port", str(port), "--size", str(args.size),
                       "--loop", args.loop, "--warmup", "0.3", "--window", f"{window}",
                       "--deadline", f"{window + 30}", *(["--no-gso"] if args.no_gso else [])),
                stdout=subprocess.PIPE, text=True)
        time.sleep(start)
        subprocess.run([pyspy, "record", "--pid", str(target.pid), "--duration",
                        f"{int(seconds)}", "--rate", str(args.rate), "--format", "raw",
                        "--nonblocking", "-o", str(raw)], check=True, capture_output=True)
        if args.path == "echo":  # the client ends by itself; the server when its stdin closes
            other_out = other.communicate(timeout=window + 60)[0]
            target_out = target.communicate(timeout=window + 60)[0]
        else:
            target_out = target.communicate(timeout=window + 60)[0]
            other_out = other.communicate(timeout=window + 60)[0]
        for text in (target_out, other_out):
            for line in text.splitlines():
                if '"result"' in line:
                    print(line)
        print(summarise(raw, args.top))


if __name__ == "__main__":
    main(sys.argv[1:])
