"""pytest configuration of the benchmark suite: --quick, the compiled C programs, the report."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ._harness import REPORT, RESULTS, BenchError, Settings, compile_programs


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("udpx benchmarks")
    group.addoption("--quick", action="store_true", default=False,
                    help="short smoke run: fewer, shorter repetitions; asserts no speeds "
                         "(also UDPX_BENCH_QUICK=1)")
    group.addoption("--bench-reps", type=int, default=None,
                    help="repetitions per configuration (default 5; quick 1)")


def _quick(config: pytest.Config) -> bool:
    return bool(config.getoption("--quick")) or os.environ.get("UDPX_BENCH_QUICK", "") not in (
        "", "0")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "benchmark: a udpx benchmark case (child processes on "
                                       "loopback; run with pytest benchmarks)")
    REPORT.settings = Settings.make(_quick(config), config.getoption("--bench-reps"))


@pytest.fixture(scope="session")
def settings() -> Settings:
    assert REPORT.settings is not None
    return REPORT.settings


@pytest.fixture(scope="session")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The C programs of benchmarks/c, compiled for this run (the cases skip without them)."""
    try:
        return compile_programs(tmp_path_factory.mktemp("udpx-bench-c"))
    except BenchError as exc:
        pytest.skip(f"C programs unavailable: {exc}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    if not REPORT.cases:
        return
    stem = "quick" if REPORT.settings is not None and REPORT.settings.quick else "latest"
    json_path, md_path = REPORT.write(RESULTS, stem)
    terminalreporter.write_sep("=", "udpx benchmark results")
    terminalreporter.write_line(REPORT.markdown())
    terminalreporter.write_line(f"written: {json_path}, {md_path}")
