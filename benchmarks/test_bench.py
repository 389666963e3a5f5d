"""The benchmark cases, each at 64 and 1,200 bytes. Run with ``pytest benchmarks``.

Quick mode (``--quick`` or UDPX_BENCH_QUICK=1) only checks that every configuration produced
numbers; the full run asserts no speeds either (the machine drifts too much for thresholds):
the figures are the product, written to benchmarks/results/.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ._cases import CASES, QUIC_DATAGRAM
from ._harness import REPORT, Case, Settings, run_case

SIZES = [64, 1200]

pytestmark = pytest.mark.benchmark


def check(case: Case) -> None:
    """Every configuration that was not skipped produced finite numbers at least once."""
    problems: list[str] = []
    for config in case.configs:
        if config.skip:
            continue
        good = [sample for sample in config.samples
                if sample and all(math.isfinite(value) for value in sample.values())]
        if not good:
            problems.append(f"{config.name} ({config.loop}, {config.group or '-'}): "
                            + ("; ".join(config.errors) or "no samples"))
        elif not all(sample.get("rate", 1.0) > 0 for sample in good):
            problems.append(f"{config.name} ({config.loop}): a rate of zero")
    assert not problems, "\n".join(problems)


def run(name: str, size: int, settings: Settings, programs: dict[str, Path]) -> None:
    case = CASES[name](size, settings, programs)
    REPORT.add(run_case(case, settings.reps))
    check(case)


@pytest.mark.parametrize("size", SIZES)
def test_receive(size: int, settings: Settings, programs: dict[str, Path]) -> None:
    run("receive", size, settings, programs)


@pytest.mark.parametrize("size", SIZES)
def test_receive_gso(size: int, settings: Settings, programs: dict[str, Path]) -> None:
    run("receive_gso", size, settings, programs)


@pytest.mark.parametrize("size", SIZES)
def test_send(size: int, settings: Settings, programs: dict[str, Path]) -> None:
    run("send", size, settings, programs)


@pytest.mark.parametrize("size", SIZES)
def test_echo(size: int, settings: Settings, programs: dict[str, Path]) -> None:
    run("echo", size, settings, programs)


@pytest.mark.parametrize("size", SIZES)
def test_echo_many(size: int, settings: Settings, programs: dict[str, Path]) -> None:
    run("echo_many", size, settings, programs)


@pytest.mark.parametrize("size", SIZES)
def test_many_connections(size: int, settings: Settings, programs: dict[str, Path]) -> None:
    run("many", size, settings, programs)


@pytest.mark.parametrize("size", SIZES)
def test_many_connections_gso(size: int, settings: Settings, programs: dict[str, Path]) -> None:
    run("many_gso", size, settings, programs)


def test_quic(settings: Settings) -> None:
    # At aioquic's own datagram size; no C program involved.
    run("quic", QUIC_DATAGRAM, settings, {})


def test_queries(settings: Settings, programs: dict[str, Path]) -> None:
    # A query's size (a DNS question): the cost is the endpoint's, not the bytes'.
    run("queries", SIZES[0], settings, programs)


@pytest.mark.parametrize("size", SIZES)
def test_memory(size: int, settings: Settings, programs: dict[str, Path]) -> None:
    run("memory", size, settings, programs)


def quick_at_one_size(size: int, settings: Settings) -> None:
    """The workers and connected-mode cases run at 64 bytes only in quick mode (the same code
    paths; it keeps the smoke run short)."""
    if settings.quick and size != SIZES[0]:
        pytest.skip(f"quick mode: {SIZES[0]}-byte datagrams only")


@pytest.mark.parametrize("size", SIZES)
def test_scale(size: int, settings: Settings, programs: dict[str, Path]) -> None:
    quick_at_one_size(size, settings)
    run("scale", size, settings, programs)


@pytest.mark.parametrize("size", SIZES)
def test_scale_echo(size: int, settings: Settings, programs: dict[str, Path]) -> None:
    quick_at_one_size(size, settings)
    run("scale_echo", size, settings, programs)


@pytest.mark.parametrize("size", SIZES)
def test_connected(size: int, settings: Settings, programs: dict[str, Path]) -> None:
    quick_at_one_size(size, settings)
    run("connected", size, settings, programs)


@pytest.mark.parametrize("size", SIZES)
def test_connected_admit(size: int, settings: Settings, programs: dict[str, Path]) -> None:
    quick_at_one_size(size, settings)
    run("connected_admit", size, settings, programs)
