"""udpx.run() and udpx.worker_id(): one worker in this process, several forked workers.

Several workers are forked from the test process where no signal is involved (main returns or
raises); the signal tests run tests/workers_echo.py as a child process and talk to it over
loopback. Every wait is bounded, and the tests synchronise on the children's output lines and
on replies, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import re
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

import udpx
from udpx import _run

from .conftest import free_udp_port

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is in the test extra
    uvloop = None  # type: ignore[assignment]

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

SCRIPT = Path(__file__).with_name("workers_echo.py")
#: Bounds a child's start, a reply, a line of output.
WAIT = 15.0
#: SIGTERM to exit, as the issue asks.
STOP_WITHIN = 5.0
PEERS = 64
ROUNDS = 10


@pytest.fixture
def loop_factory(loop_kind: str) -> LoopFactory:
    """The loop factory handed to udpx.run for the loop kind under test."""
    return uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop


# -- arguments --------------------------------------------------------------------------------


async def serve() -> None:
    pass


def sync_main() -> None:
    pass


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"workers": 0}, ValueError, "at least 1"),
    ({"workers": -2}, ValueError, "at least 1"),
    ({"workers": True}, TypeError, "workers must be an int"),
    ({"workers": 2.0}, TypeError, "workers must be an int"),
    ({"workers": "2"}, TypeError, "workers must be an int"),
    ({"workers": 2, "loop_factory": 3}, TypeError, "loop_factory must be callable"),
    ({"loop_factory": "uvloop"}, TypeError, "loop_factory must be callable"),
])
def test_bad_arguments_raise_before_anything_starts(kwargs: dict[str, Any],
                                                    error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        udpx.run(serve, **kwargs)


def returns_a_coroutine() -> Any:
    return serve()


@pytest.mark.parametrize("main", [sync_main, returns_a_coroutine, print, None],
                         ids=["sync-function", "returns-a-coroutine", "builtin", "none"])
def test_main_must_be_a_coroutine_function(main: Any) -> None:
    with pytest.raises(TypeError, match="coroutine function"):
        udpx.run(main, workers=2)


def test_a_coroutine_object_is_refused_with_a_hint() -> None:
    coroutine = serve()
    with pytest.raises(TypeError, match=r"pass main, not main\(\)"):
        udpx.run(coroutine)  # type: ignore[arg-type]
    # Closed by run(), so no "never awaited" warning (warnings are errors here).
    assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED


def test_run_refuses_a_running_loop(loop_factory: LoopFactory) -> None:
    async def outer() -> None:
        with pytest.raises(RuntimeError, match="running event loop"):
            udpx.run(serve)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(outer())


def test_worker_id_is_none_outside_a_run() -> None:
    assert udpx.worker_id() is None
    assert "run" in udpx.__all__ and "worker_id" in udpx.__all__


# -- one worker: in this process ----------------------------------------------------------


def test_one_worker_runs_in_this_process(loop_factory: LoopFactory, loop_kind: str) -> None:
    seen: dict[str, Any] = {}

    async def main() -> None:
        seen["worker_id"] = udpx.worker_id()
        seen["pid"] = os.getpid()
        seen["loop"] = type(asyncio.get_running_loop())
        async with udpx.listen("127.0.0.1", 0) as ln:  # port 0 is fine with one worker
            seen["reuse_port"] = ln.options.reuse_port

    assert udpx.run(main, loop_factory=loop_factory) is None  # type: ignore[func-returns-value]
    assert seen["worker_id"] == 0 and seen["pid"] == os.getpid()
    assert seen["reuse_port"] is False
    assert (seen["loop"] is uvloop.Loop) == (loop_kind == "uvloop")
    assert udpx.worker_id() is None


def test_one_worker_propagates_what_main_raises(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        raise LookupError("from main")

    with pytest.raises(LookupError, match="from main"):
        udpx.run(main, loop_factory=loop_factory)
    assert udpx.worker_id() is None


def _raising_factory() -> asyncio.AbstractEventLoop:
    raise LookupError("no loop here")


def _not_a_loop() -> asyncio.AbstractEventLoop:
    return 42  # type: ignore[return-value]


def _closed_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.close()
    return loop


@pytest.mark.parametrize(("factory", "error", "match"), [
    (_raising_factory, LookupError, "no loop here"),
    (_not_a_loop, TypeError, "returned 42, not an event loop"),
    (_closed_loop, RuntimeError, "returned a closed loop")])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_loop_factory_raises_and_leaves_nothing_unawaited(  # noqa: PLR0917
        factory: LoopFactory, error: type[Exception], match: str, workers: int,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The loop is made before udpx's own coroutine: a factory that raises, or returns no
    loop, left that coroutine never awaited (a RuntimeWarning, an error under -W error; in
    this process, where it can be seen), and a non-loop was only found by asyncio's runner
    failing to close it. Workers report it as loop_factory's failure, not main's."""
    monkeypatch.setattr(_run, "BACKOFF_FIRST", 0.01)

    async def main() -> None:
        raise AssertionError("main ran without a loop")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            udpx.run(main, workers=workers, loop_factory=factory)
        except error as exc:
            assert re.search(match, str(exc)), exc
            notes = "\n".join(getattr(exc, "__notes__", []))
        else:
            raise AssertionError("udpx.run returned")
        gc.collect()  # an unawaited coroutine warns as it is collected (its traceback gone)
    assert [str(warning.message) for warning in caught] == []
    if workers > 1:
        assert "raised by loop_factory in udpx worker" in notes
        assert "failed (loop_factory raised" in caplog.text


def test_nested_run_is_refused(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        udpx.run(serve)

    with pytest.raises(RuntimeError):
        udpx.run(main, loop_factory=loop_factory)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_one_worker_stops_gracefully_on_a_signal(loop_factory: LoopFactory,
                                                 signum: int) -> None:
    """The signal cancels main; ``async with`` closes the connection, which flushes what was
    queued; run() returns None and the previous signal handlers are back."""
    before = {number: signal.getsignal(number) for number in _run.STOP_SIGNALS}
    events: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        sink.settimeout(WAIT)

        async def main() -> None:
            async with udpx.dial("127.0.0.1", sink.getsockname()[1]) as conn:
                for index in range(100):
                    conn.send_nowait(b"%d" % index)
                os.kill(os.getpid(), signum)
                try:
                    await asyncio.sleep(WAIT)
                except asyncio.CancelledError:
                    events.append("cancelled")
                    raise

        udpx.run(main, loop_factory=loop_factory)
        assert events == ["cancelled"]
        assert [sink.recv(100) for _ in range(100)] == [b"%d" % index for index in range(100)]
    assert {number: signal.getsignal(number) for number in _run.STOP_SIGNALS} == before


def test_one_worker_second_signal_forces_exit(loop_factory: LoopFactory) -> None:
    async def main() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        try:
            await asyncio.sleep(WAIT)
        finally:
            # A graceful stop that hangs: the second Ctrl-C ends it.
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(WAIT)

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        udpx.run(main, loop_factory=loop_factory)
    assert time.monotonic() - started < WAIT


# -- several workers, forked from this process (no signals) -----------------------------------


@contextlib.contextmanager
def pipe_reader() -> Iterator[tuple[int, Callable[[], list[str]]]]:
    """A pipe the workers write lines to (inherited across the fork); the reader returns
    every line once run() has returned (the workers have exited: the write end is ours)."""
    read_end, write_end = os.pipe()
    try:
        def lines() -> list[str]:
            os.close(write_end)
            data = b""
            while chunk := os.read(read_end, 65536):
                data += chunk
            return data.decode().splitlines()

        yield write_end, lines
    finally:
        os.close(read_end)
        with contextlib.suppress(OSError):
            os.close(write_end)


def test_workers_run_a_closure_each_with_its_id(loop_factory: LoopFactory) -> None:
    port = free_udp_port()
    with pipe_reader() as (out, lines):
        async def main() -> None:
            # A closure over ``out`` and ``port``: workers are forked, nothing is pickled.
            async with udpx.listen("127.0.0.1", port) as ln:
                try:
                    udpx.listen("127.0.0.1", 0)
                    zero = "accepted"
                except ValueError as exc:
                    zero = "refused" if "port=0" in str(exc) else str(exc)
                async with udpx.listen("127.0.0.1", 0, reuse_port=False) as own:
                    own_port = own.local_addr[1]
                os.write(out, f"{udpx.worker_id()} {os.getpid()} {ln.options.reuse_port} "
                              f"{zero} {own_port != port}\n".encode())

        udpx.run(main, workers=2, loop_factory=loop_factory)
        reports = sorted(line.split() for line in lines())
    assert [report[0] for report in reports] == ["0", "1"]
    assert len({report[1] for report in reports} | {str(os.getpid())}) == 3
    assert all(report[2:] == ["True", "refused", "True"] for report in reports), reports
    assert udpx.worker_id() is None


def test_a_failing_worker_is_restarted_with_its_id(loop_factory: LoopFactory,
                                                   tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "failed-once"
    with pipe_reader() as (out, lines):
        async def main() -> None:
            os.write(out, f"start {udpx.worker_id()} {os.getpid()}\n".encode())
            if udpx.worker_id() == 1 and not marker.exists():
                marker.touch()
                raise ConnectionError("first start fails")

        with caplog.at_level(logging.INFO, logger="udpx"):
            udpx.run(main, workers=2, loop_factory=loop_factory)
        starts = [line.split()[1:] for line in lines()]
    assert sorted(worker for worker, _ in starts) == ["0", "1", "1"]
    assert len({pid for _, pid in starts}) == 3  # worker 1 again, in a new process
    assert "worker 1" in caplog.text and "ConnectionError: first start fails" in caplog.text
    assert "restarting it" in caplog.text


def test_run_gives_up_after_quick_deaths_and_raises_mains_error(
        loop_factory: LoopFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_run, "BACKOFF_FIRST", 0.01)
    with pipe_reader() as (out, lines):
        async def main() -> None:
            if udpx.worker_id() == 1:
                raise OSError(98, "Address already in use")
            try:
                await asyncio.sleep(WAIT)  # worker 0 serves until run() stops it
            except asyncio.CancelledError:
                os.write(out, b"worker 0 stopped\n")
                raise

        started = time.monotonic()
        with pytest.raises(OSError, match="Address already in use") as raised:
            udpx.run(main, workers=2, loop_factory=loop_factory)
        assert time.monotonic() - started < WAIT
        assert lines() == ["worker 0 stopped"]
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "worker 1 failed" in notes and f"{_run.MAX_QUICK_DEATHS} times in a row" in notes
    assert "Traceback" in notes  # the worker's own traceback comes along


@pytest.mark.parametrize("code", ["config missing", 1])
def test_a_worker_calling_sys_exit_is_reported_as_it_exited(
        code: str | int, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """sys.exit("message") in main is reported with its message, and raised when run gives up
    (as run with one worker raises it); sys.exit(1) is an exit status. Both were reported as
    "main raised an exception that could not be passed on" (black-box pass 3)."""
    monkeypatch.setattr(_run, "BACKOFF_FIRST", 0.01)

    async def main() -> None:
        sys.exit(code)

    if isinstance(code, str):
        with pytest.raises(SystemExit) as raised:
            udpx.run(main, workers=2)
        assert raised.value.code == code
        assert "main raised SystemExit: config missing" in caplog.text
    else:
        with pytest.raises(udpx.UDPXError, match="exited with status 1 5 times in a row"):
            udpx.run(main, workers=2)
    assert "could not be passed on" not in caplog.text


def test_run_gives_up_on_a_worker_that_keeps_dying_without_an_exception(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_run, "BACKOFF_FIRST", 0.01)

    async def main() -> None:
        os._exit(7)

    with pytest.raises(udpx.UDPXError, match="exited with status 7 5 times in a row"):
        udpx.run(main, workers=2)


def test_a_stop_signal_stops_forked_workers_and_run_raises_what_main_raised_meanwhile(
        loop_factory: LoopFactory) -> None:
    before = {number: signal.getsignal(number) for number in _run.STOP_SIGNALS}
    started_read, started_write = os.pipe()
    with pipe_reader() as (out, lines):
        async def main() -> None:
            os.write(started_write, b"x")
            if udpx.worker_id() == 0:
                # Once both mains run (a worker signalled before its main starts does not
                # start it), stop the run: SIGTERM to the parent, this test's process.
                received = b""
                while len(received) < 2:
                    assert select.select([started_read], [], [], WAIT)[0]
                    received += os.read(started_read, 2 - len(received))
                os.kill(os.getppid(), signal.SIGTERM)
            try:
                await asyncio.sleep(WAIT)
            except asyncio.CancelledError:
                os.write(out, f"{udpx.worker_id()} cancelled\n".encode())
                if udpx.worker_id() == 1:
                    raise LookupError("failed while stopping") from None
                raise

        try:
            with pytest.raises(LookupError, match="failed while stopping"):
                udpx.run(main, workers=2, loop_factory=loop_factory)
        finally:
            os.close(started_read)
            os.close(started_write)
        assert sorted(lines()) == ["0 cancelled", "1 cancelled"]
    assert {number: signal.getsignal(number) for number in _run.STOP_SIGNALS} == before


# -- several workers in a child process: affinity, signals, restarts ---------------------


class Lines:
    """Lines of a child's stdout, read as they come, each wait bounded."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        self._fd = stream.fileno()
        self._buffer = b""
        self.seen: list[str] = []

    def next(self, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self._fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise TimeoutError(f"no line within {timeout} s; so far {self.seen}")
                chunk = os.read(self._fd, 4096)
                if not chunk:
                    raise EOFError(f"the child closed stdout; so far {self.seen}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        self.seen.append(line.decode())
        return self.seen[-1]

    def ready(self, count: int) -> dict[int, int]:
        """Wait for ``count`` ``ready WORKER PID`` lines: {worker: pid}."""
        pids: dict[int, int] = {}
        while len(pids) < count:
            line = self.next()
            word, worker, pid = line.split() if line.count(" ") == 2 else (line, "", "")
            assert word == "ready", self.seen
            pids[int(worker)] = int(pid)
        return pids


class WorkersEcho:
    """tests/workers_echo.py with two workers, as a child process."""

    def __init__(self, loop_kind: str, workers: int = 2) -> None:
        self.port = free_udp_port()
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), loop_kind, str(self.port), str(workers)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines = Lines(self.process.stdout)
        self.pids: dict[int, int] = {}
        try:
            self.pids = self.lines.ready(workers)
        except BaseException:
            self.kill()
            raise

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str, str]:
        """Signal the parent; the exit status, the rest of stdout and stderr (bounded)."""
        self.process.send_signal(signum)
        stdout, stderr = self.process.communicate(timeout=STOP_WITHIN)
        return self.process.returncode, stdout.decode(), stderr.decode()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # its workers get SIGTERM from the kernel (parent death)
        for pid in self.pids.values():  # unless a test froze them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.communicate(timeout=WAIT)


@pytest.fixture
def workers_echo(loop_kind: str) -> Iterator[WorkersEcho]:
    server = WorkersEcho(loop_kind)
    try:
        yield server
    finally:
        server.kill()


def open_peers(count: int) -> list[socket.socket]:
    peers = []
    for _ in range(count):
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(WAIT)
        peers.append(peer)
    return peers


def exchange(peers: list[socket.socket], port: int, round_number: int) -> list[tuple[int, int]]:
    """One datagram from every peer; (worker, pid) that answered each."""
    for index, peer in enumerate(peers):
        peer.sendto(b"peer %d round %d" % (index, round_number), ("127.0.0.1", port))
    answers = []
    for index, peer in enumerate(peers):
        worker, pid, rest = peer.recv(200).split(b" ", 2)
        assert rest == b"peer %d round %d" % (index, round_number)
        answers.append((int(worker), int(pid)))
    return answers


def test_each_peer_stays_on_one_worker_and_sigterm_flushes(workers_echo: WorkersEcho) -> None:
    peers = open_peers(PEERS)
    try:
        rounds = [exchange(peers, workers_echo.port, number) for number in range(ROUNDS)]
        per_peer = [{answers[index] for answers in rounds} for index in range(PEERS)]
        assert all(len(answered) == 1 for answered in per_peer), per_peer
        owners = [answered.pop() for answered in per_peer]
        assert {worker for worker, _ in owners} == {0, 1}  # both workers answer someone
        assert {pid for _, pid in owners} == set(workers_echo.pids.values())
        started = time.monotonic()
        status, stdout, stderr = workers_echo.stop(signal.SIGTERM)
        assert time.monotonic() - started < STOP_WITHIN
        assert status == 0, stderr
        assert stdout.splitlines()[-1] == "run returned"
        assert "Traceback" not in stderr
        # What each worker queued as it stopped was flushed before its socket closed.
        for peer, (worker, pid) in zip(peers, owners):
            assert peer.recv(200) == b"bye %d %d" % (worker, pid)
    finally:
        for peer in peers:
            peer.close()


def test_a_killed_worker_is_restarted_and_serves_new_peers(workers_echo: WorkersEcho) -> None:
    old_pid = workers_echo.pids[1]
    os.kill(old_pid, signal.SIGKILL)
    restarted = workers_echo.lines.ready(1)
    assert list(restarted) == [1] and restarted[1] != old_pid
    workers_echo.pids[1] = restarted[1]
    peers = open_peers(PEERS)
    try:
        answers = exchange(peers, workers_echo.port, 0)
        pids = workers_echo.pids
        assert all(pids[worker] == pid for worker, pid in answers), answers
        assert {worker for worker, _ in answers} == {0, 1}  # the new worker 1 serves too
        assert answers == exchange(peers, workers_echo.port, 1)  # and keeps its peers
    finally:
        for peer in peers:
            peer.close()
    status, _, stderr = workers_echo.stop(signal.SIGINT)
    assert status == 0, stderr
    assert f"worker 1 (pid {old_pid}) was killed by SIGKILL" in stderr
    assert "restarting it" in stderr


def test_a_second_signal_kills_the_workers(loop_kind: str) -> None:
    server = WorkersEcho(loop_kind)
    try:
        # Frozen workers (SIGSTOP) cannot finish a graceful stop: the first SIGTERM leaves
        # the parent waiting, the second kills them and run() raises SystemExit(128 + 15).
        for pid in server.pids.values():
            os.kill(pid, signal.SIGSTOP)
        server.process.send_signal(signal.SIGTERM)
        # The second signal only once the parent has taken the first (it logs it).
        stderr = Lines(server.process.stderr)
        while "stopping 2 worker(s)" not in stderr.next():
            pass
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=STOP_WITHIN)
        assert server.process.returncode == 128 + signal.SIGTERM
        for pid in server.pids.values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        server.kill()


_PASS_ON_PROGRAM = r"""
import asyncio, os, signal, sys
import udpx

def say(*words):
    # One write per line: the two workers share the pipe (print writes the newline apart).
    os.write(1, (" ".join(map(str, words)) + "\n").encode())

async def main():
    got = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, got.set)
    say("ready", udpx.worker_id(), os.getpid())
    await asyncio.wait_for(got.wait(), 30)
    say("usr1", udpx.worker_id())

udpx.run(main, workers=2)
print("handler after run:", signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL, flush=True)
"""


def test_sigusr1_to_the_supervisor_is_passed_on_to_every_worker() -> None:
    """SIGUSR1 to the process that runs several workers (the pid a service manager knows) ends
    it by its default action, and the workers with it (black-box pass 3: the command line's
    echo server went down on the signal its help says prints describe()). It is passed on to
    every worker instead, and the handler is restored after run()."""
    child = subprocess.Popen([sys.executable, "-c", _PASS_ON_PROGRAM], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        lines = Lines(child.stdout)
        assert sorted(lines.ready(2)) == [0, 1]
        child.send_signal(signal.SIGUSR1)
        assert sorted(lines.next() for _ in range(2)) == ["usr1 0", "usr1 1"]
        assert lines.next() == "handler after run: True"
        assert child.wait(WAIT) == 0
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
