"""The benchmark harness: processes, repetitions, statistics, ratios, the table and the JSON.

Every measurement runs in child processes (a sender and a receiver, or a client and a server) on
127.0.0.1; the pytest process only starts them, reads their JSON lines and keeps the numbers.
A case is a list of configurations run round-robin: repetition 1 of every configuration, then
repetition 2 of every configuration (starting one further along the list each time), and so on,
so that the machine's drift is spread over all of them instead of landing on one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "_workers.py"
C_SOURCES = HERE / "c"
C_PROGRAMS = ("blast", "sink", "echo", "peers")
RESULTS = HERE / "results"

Role = Literal["udpx", "baseline"]

# Typography of the table, spelled out (ruff flags them as look-alikes in literals).
DASH = "\u2013"  # en dash: ranges
TIMES = "\u00d7"  # multiplication sign: ratios


class BenchError(Exception):
    """One run failed (a process exited badly, timed out or printed nonsense)."""


# -- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How long and how often: the full run, or the quick smoke run."""

    quick: bool
    reps: int
    #: Repetitions of the secondary configurations (the GSO-sender tables, batch_size=1, the
    #: many-peer echo): fewer, to keep the full run's time in bounds; --bench-reps sets both.
    secondary_reps: int
    warmup: float
    window: float
    quiet: float
    many_peers: tuple[int, ...]
    echo_peers: tuple[int, ...]
    memory_peers: tuple[int, ...]
    #: Peers of the workers cases (scale, scale_echo).
    scale_peers: int = 1000
    #: Peers of the connected-versus-shared table, and of the admission-cost table.
    connected_peers: tuple[int, ...] = (1, 100, 1000)
    admit_peers: tuple[int, ...] = (1000, 10000)

    @classmethod
    def make(cls, quick: bool, reps: int | None = None) -> Settings:
        if quick:
            return cls(quick=True, reps=reps or 1, secondary_reps=reps or 1, warmup=0.1,
                       window=0.25, quiet=0.1, many_peers=(1, 10000), echo_peers=(1, 1000),
                       memory_peers=(1000, 10000), connected_peers=(1000,),
                       admit_peers=(1000,))
        return cls(quick=False, reps=reps or 5, secondary_reps=reps or 3, warmup=0.2,
                   window=0.6, quiet=0.15, many_peers=(1, 100, 1000, 10000),
                   echo_peers=(1, 100, 1000, 10000), memory_peers=(10000, 100000))


# -- compiled C programs ---------------------------------------------------------------------


def find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def compile_programs(out_dir: Path) -> dict[str, Path]:
    """Compile benchmarks/c/*.c with the system compiler.

    Raises:
        BenchError: no compiler, or a program did not compile.
    """
    compiler = find_compiler()
    if compiler is None:
        raise BenchError("no C compiler (cc, gcc or clang) found")
    programs: dict[str, Path] = {}
    for name in C_PROGRAMS:
        binary = out_dir / name
        command = [compiler, "-O2", "-Wall", "-o", str(binary), str(C_SOURCES / f"{name}.c")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(command)} failed:\n{done.stderr}")
        programs[name] = binary
    return programs


# -- child processes -------------------------------------------------------------------------


class Proc:
    """A child process whose stdout is JSON lines, read by a thread; killed if it overstays."""

    def __init__(self, args: Sequence[str], *, name: str, stdin: bool = False) -> None:
        self.name = name
        self.args = list(args)
        self.popen = subprocess.Popen(
            self.args, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self.popen.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self._stderr.append(line)

    def _fail(self, why: str) -> BenchError:
        tail = "".join(self._stderr[-20:]).strip()
        return BenchError(f"{self.name}: {why}" + (f"\n{tail}" if tail else ""))

    def event(self, event: str, timeout: float) -> dict[str, Any]:
        """The next JSON line whose "event" is ``event``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(f"no {event!r} line within {timeout:.1f} s")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.popen.wait(timeout=5)
                raise self._fail(f"exited with {self.popen.returncode} before {event!r}")
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                self._stderr.append(line)
                continue
            if isinstance(data, dict) and data.get("event") == event:
                return data

    def terminate(self) -> None:
        """SIGTERM (the C sender stops sending and reports)."""
        if self.popen.poll() is None:
            self.popen.terminate()

    def close_stdin(self) -> None:
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            self.popen.stdin.close()

    def finish(self, timeout: float) -> None:
        """Wait for a clean exit; kill and fail after ``timeout``."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self._fail(f"still running after {timeout:.1f} s (killed)") from None
        if code != 0:
            raise self._fail(f"exited with {code}")

    def cleanup(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self.close_stdin()
        for thread in self._threads:
            thread.join(timeout=5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def worker(*args: str) -> list[str]:
    return [sys.executable, str(WORKERS), *args]


# -- configurations and results --------------------------------------------------------------


Metrics = dict[str, float]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    kind: Literal["rate", "us", "percent", "count", "bytes", "mib"]
    higher_is_better: bool | None
    ratio: bool = False  # udpx ÷ baseline ratios are given for this metric


@dataclass
class Config:
    """One thing measured in a case: a udpx configuration or a baseline."""

    name: str
    loop: str  # "asyncio", "uvloop", or "-" where no event loop is involved
    role: Role
    run: Callable[[], Metrics]
    group: str = ""  # rows are compared only within a group (the peer count)
    skip: str | None = None  # why this configuration is not measured here
    reps: int | None = None  # at most this many repetitions (None: the run's)
    samples: list[Metrics] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.group}|{self.name}|{self.loop}"


@dataclass
class Case:
    case: str
    title: str
    size: int
    metrics: list[Metric]
    configs: list[Config]
    notes: list[str] = field(default_factory=list)
    group_label: str = ""
    seconds: float = 0.0


def run_case(case: Case, reps: int) -> Case:
    """Run every configuration ``reps`` times (or its own ``reps``, if fewer), round-robin,
    rotating the starting point."""
    started = time.monotonic()
    for rep in range(reps):
        active = [config for config in case.configs
                  if config.skip is None and (config.reps is None or rep < config.reps)]
        shift = rep % len(active) if active else 0
        for config in active[shift:] + active[:shift]:
            try:
                metrics = config.run()
            except BenchError as exc:
                config.errors.append(f"repetition {rep + 1}: {exc}")
                config.samples.append({})
                continue
            config.samples.append(metrics)
    case.seconds = time.monotonic() - started
    return case


def summary(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def metric_values(config: Config, key: str) -> list[float]:
    return [sample[key] for sample in config.samples if key in sample]


def ratios(case: Case) -> list[dict[str, Any]]:
    """udpx ÷ baseline for every ratio metric, within each group: the per-repetition ratios
    (repetition i of both ran seconds apart) summarised, and the ratio of the medians."""
    out: list[dict[str, Any]] = []
    for metric in case.metrics:
        if not metric.ratio:
            continue
        for mine in case.configs:
            if mine.role != "udpx" or mine.skip:
                continue
            for base in case.configs:
                if base.role != "baseline" or base.skip or base.group != mine.group:
                    continue
                pairs = [a[metric.key] / b[metric.key]
                         for a, b in zip(mine.samples, base.samples)
                         if metric.key in a and metric.key in b and b[metric.key] > 0]
                mine_median = summary(metric_values(mine, metric.key))
                base_median = summary(metric_values(base, metric.key))
                of_medians = (mine_median["median"] / base_median["median"]
                              if mine_median and base_median and base_median["median"] > 0
                              else None)
                out.append({"metric": metric.key, "group": mine.group, "udpx": mine.key,
                            "baseline": base.key, "paired": summary(pairs),
                            "of_medians": of_medians})
    return out


# -- formatting ------------------------------------------------------------------------------


def _sig(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt(value: float, kind: str) -> str:
    if kind == "rate":
        if abs(value) >= 1e6:
            return f"{_sig(value / 1e6)}M"
        if abs(value) >= 1e3:
            return f"{_sig(value / 1e3)}k"
        return _sig(value)
    if kind == "percent":
        return f"{value * 100:.1f}%"
    if kind == "bytes":
        return f"{value:,.0f}"
    if kind == "mib":
        return f"{value / 2**20:.1f}"
    if kind == "count":
        return f"{value:,.0f}"
    return _sig(value)


def fmt_summary(stats: dict[str, float] | None, kind: str) -> str:
    if stats is None:
        return "—"
    median = fmt(stats["median"], kind)
    if stats["n"] < 2:
        return median
    return f"{median} ({fmt(stats['min'], kind)}{DASH}{fmt(stats['max'], kind)})"


def fmt_ratio(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "—"
    median = f"{_sig(stats['median'])}{TIMES}"
    if stats["n"] < 2:
        return median
    return f"{median} ({_sig(stats['min'])}{DASH}{_sig(stats['max'])})"


def markdown(case: Case) -> str:
    lines = [f"### {case.title} — {case.size}-byte datagrams", ""]
    group_col = [case.group_label] if case.group_label else []
    head = [*group_col, "configuration", "loop", *[m.label for m in case.metrics]]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for config in case.configs:
        group = [config.group] if case.group_label else []
        if config.skip:
            cells = [*group, config.name, config.loop, f"skipped: {config.skip}"]
            cells += [""] * (len(head) - len(cells))
        else:
            cells = [*group, config.name, config.loop]
            for metric in case.metrics:
                cells.append(fmt_summary(summary(metric_values(config, metric.key)), metric.kind))
        lines.append("| " + " | ".join(cells) + " |")
    ratio_metrics = [m for m in case.metrics if m.ratio]
    bases = [c for c in case.configs if c.role == "baseline" and not c.skip]
    if ratio_metrics and bases:
        table = ratios(case)
        base_names = list(dict.fromkeys(f"{b.name} ({b.loop})" if b.loop != "-" else b.name
                                        for b in bases))
        metric_names = " / ".join(m.label for m in ratio_metrics)
        lines += ["", f"udpx ÷ baseline, {metric_names} (median of per-repetition ratios, "
                      f"min{DASH}max):", ""]
        head = [*group_col, "udpx", "loop", *[f"vs {name}" for name in base_names]]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for mine in case.configs:
            if mine.role != "udpx" or mine.skip:
                continue
            cells = [*([mine.group] if case.group_label else []), mine.name, mine.loop]
            for base_name in base_names:
                base = next((b for b in bases if b.group == mine.group and (
                    f"{b.name} ({b.loop})" if b.loop != "-" else b.name) == base_name), None)
                if base is None:
                    cells.append("—")
                    continue
                parts = []
                for metric in ratio_metrics:
                    row = next(r for r in table if r["metric"] == metric.key
                               and r["udpx"] == mine.key and r["baseline"] == base.key)
                    parts.append(fmt_ratio(row["paired"]))
                cells.append(" / ".join(parts))
            lines.append("| " + " | ".join(cells) + " |")
    errors = [(c, e) for c in case.configs for e in c.errors]
    notes = list(case.notes)
    for config, error in errors:
        first = error.splitlines()[0]
        notes.append(f"error in {config.name} ({config.loop}, {config.group or '-'}): {first}")
    if notes:
        lines.append("")
        lines += [f"- {note}" for note in notes]
    lines.append("")
    return "\n".join(lines)


def case_json(case: Case) -> dict[str, Any]:
    return {
        "case": case.case, "title": case.title, "size": case.size,
        "seconds": round(case.seconds, 2),
        "metrics": [{"key": m.key, "label": m.label, "kind": m.kind,
                     "higher_is_better": m.higher_is_better, "ratio": m.ratio}
                    for m in case.metrics],
        "rows": [{"key": c.key, "name": c.name, "loop": c.loop, "role": c.role,
                  "group": c.group, "skipped": c.skip, "samples": c.samples, "raw": c.raw,
                  "errors": c.errors,
                  "summary": {m.key: summary(metric_values(c, m.key)) for m in case.metrics}}
                 for c in case.configs],
        "ratios": ratios(case),
        "notes": case.notes,
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "implementation": platform.python_implementation(),
        "kernel": platform.release(), "machine": platform.machine(), "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in cpuinfo
                                if line.startswith("model name")), None)
    except OSError:
        pass
    for package in ("udpx", "uvloop", "asyncio_dgram"):
        try:
            from importlib.metadata import version  # noqa: PLC0415

            info[package] = version(package.replace("_", "-"))
        except Exception:  # not installed
            info[package] = None
    try:
        head = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "src"],
                               capture_output=True, text=True, timeout=10, check=False)
        info["git"] = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        info["git"] = None
    for name in ("rmem_max", "wmem_max", "rmem_default"):
        with contextlib.suppress(OSError):
            info[f"net.core.{name}"] = int(Path(f"/proc/sys/net/core/{name}").read_text())
    return info


class Report:
    """Every case of the session, written out at the end."""

    def __init__(self) -> None:
        self.cases: list[Case] = []
        self.started = time.time()
        self.settings: Settings | None = None

    def add(self, case: Case) -> None:
        self.cases.append(case)

    def markdown(self) -> str:
        settings = self.settings
        mode = "quick" if settings and settings.quick else "full"
        info = machine()
        parts = [
            f"## udpx benchmarks ({mode} run, {len(self.cases)} cases, "
            f"{time.time() - self.started:.0f} s)",
            "",
            f"Machine: {info.get('cpu')}, {info.get('cpus')} CPUs, Linux {info.get('kernel')}, "
            f"Python {info.get('python')}, uvloop {info.get('uvloop')}, udpx {info.get('udpx')} "
            f"({info.get('git')}).",
        ]
        if settings:
            secondary = ""
            if settings.secondary_reps != settings.reps:
                secondary = (f" ({settings.secondary_reps} for the GSO-sender tables, the "
                             "batch_size=1 rows, the many-peer echo below its largest group, "
                             "and the workers and connected-mode tables)")
            parts.append(
                f"Each figure: median (min{DASH}max) of {settings.reps} repetition"
                f"{'s' if settings.reps != 1 else ''}{secondary}, "
                f"{settings.window:g} s measurement window after {settings.warmup:g} s of "
                "warm-up, configurations interleaved.")
        parts.append("")
        parts += [markdown(case) for case in self.cases]
        return "\n".join(parts)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        settings = self.settings
        data = {
            "suite": "udpx benchmarks",
            "mode": "quick" if settings and settings.quick else "full",
            "started": _dt.datetime.fromtimestamp(self.started, _dt.UTC).isoformat(),
            "seconds": round(time.time() - self.started, 1),
            "machine": machine(),
            "settings": settings.__dict__ if settings else None,
            "cases": [case_json(case) for case in self.cases],
        }
        json_path = directory / f"{stem}.json"
        json_path.write_text(json.dumps(data, indent=1) + "\n")
        md_path = directory / f"{stem}.md"
        md_path.write_text(self.markdown())
        return json_path, md_path


REPORT = Report()
