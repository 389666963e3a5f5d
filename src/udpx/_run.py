"""``udpx.run()``: one asyncio program in several worker processes that share their ports.

The parent process runs no event loop: it starts the workers, waits on their exit sentinels
and on a signal wake-up socket, restarts the ones that die, and stops them all on SIGINT or
SIGTERM. Each worker runs ``main()`` in its own event loop (``asyncio.Runner``), and
``listen()`` there sets SO_REUSEPORT by default, so every worker has its own socket on the
same port and the kernel spreads peers over them by a hash of the addresses.

    parent (supervisor)                         worker k (a forked process)
    start workers 0..n-1 ─────────────────────▶ worker_id() == k; run main() on a new loop
    SIGINT/SIGTERM ── the same signal ────────▶ cancel main (async with blocks close and flush)
                   ◀── exit status ────────────  0: main returned, 1: main raised (and the
                                                 exception, pickled, on a pipe), 128 + signal:
                                                 stopped by that signal
    a worker died: log, restart it (same k), with a back-off after quick deaths
    a second signal while stopping: SIGKILL every worker
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import inspect
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, NoReturn

from ._errors import UDPXError

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

__all__ = ["die_with_parent", "in_multi_worker_run", "run", "worker_id"]

logger = logging.getLogger("udpx")

#: The signals that stop a run: Ctrl-C and what service managers send.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
#: Signals the supervisor of several workers passes on to every worker (their default action
#: would end the supervisor alone; the command line's workers print describe() on SIGUSR1).
PASSED_SIGNALS: Final = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2")
                              if hasattr(signal, name))

#: A worker that dies within this many seconds of starting died "quickly": it is restarted
#: after a growing delay, and after MAX_QUICK_DEATHS quick deaths in a row run() gives up.
QUICK_DEATH: Final = 1.0
MAX_QUICK_DEATHS: Final = 5
#: The delay before restarting a worker after its first quick death; doubled at each further
#: one (0.1, 0.2, 0.4, 0.8 s), capped at BACKOFF_MAX. A worker that lived longer is restarted
#: at once.
BACKOFF_FIRST: Final = 0.1
BACKOFF_MAX: Final = 2.0

#: Exit statuses of a worker process (a worker stopped by a signal exits with 128 + signal,
#: the shell's convention, although it ended gracefully).
EXIT_RETURNED: Final = 0
EXIT_RAISED: Final = 1
#: A pickled exception larger than this is replaced by its text: the worker writes it to a
#: pipe before exiting and the parent reads it only after the exit, so it must fit the
#: pipe's buffer (64 KiB on Linux) or the worker would block forever.
MAX_EXCEPTION_BYTES: Final = 32 * 1024

PR_SET_PDEATHSIG: Final = 1

MainFunction = Callable[[], Coroutine[Any, Any, object]]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]

# This process's place in a run: None/0 outside one; in a worker, its id and how many there are.
_worker_id: int | None = None
_worker_count = 0


def worker_id() -> int | None:
    """The id of this worker of ``udpx.run()``: 0 to ``workers - 1``, the same after a
    restart; None outside a run (and in the parent process of a multi-worker run)."""
    return _worker_id


def in_multi_worker_run() -> bool:
    """Whether this is a worker of a ``udpx.run()`` with more than one worker: there
    ``listen()`` defaults to ``reuse_port=True``."""
    return _worker_id is not None and _worker_count > 1


def run(main: MainFunction, *, workers: int = 1,
        loop_factory: LoopFactory | None = None) -> None:
    """Run ``main()`` in ``workers`` processes, each in an event loop of its own, until every
    worker's ``main()`` has returned or SIGINT/SIGTERM stops them. Call it from synchronous
    code, as ``asyncio.run``; ``udpx.worker_id()`` tells each worker which it is (0 to
    ``workers - 1``).

    ``main`` is a coroutine function (``async def``, or a ``functools.partial`` of one), called
    with no arguments in each worker. It need not be picklable: workers are forked (a closure
    works, and so does logging configured before the call).
    ``loop_factory`` makes each worker's event loop, e.g. ``uvloop.new_event_loop`` (None:
    asyncio's default), as for ``asyncio.Runner``.

    **One worker** (the default) runs in this process, as ``asyncio.run`` would: no fork, no
    supervision, ``worker_id()`` is 0 inside, exceptions from ``main`` propagate. Unlike
    ``asyncio.run``, ``run`` returns None (whatever the number of workers: a worker's result
    stays in its process), and a stop signal ends it normally, not with ``KeyboardInterrupt``:
    a server stopped on purpose has not failed.

    **Several workers** are forked from this process, which then only supervises them. Inside
    them ``listen()`` defaults to ``reuse_port=True``: every worker binds its own socket to the
    same port, and the kernel's SO_REUSEPORT hash of the peer's address sends each peer to
    one worker, always the same one while the set of sockets does not change. A port of 0 (a
    free port) cannot work then (each worker would get a different one), so ``listen(host, 0)``
    in such a worker raises ``ValueError`` unless ``reuse_port`` is given explicitly.
    Forking needs ``os.fork`` (Linux and other Unixes; Linux is where it is tested and where
    SO_REUSEPORT balances UDP). Fork-safety: ``run`` refuses to start from a running event
    loop, and the parent runs no loop and no thread of its own; threads the application
    started before the call do not exist in the workers (start them in ``main``).

    Stopping: SIGINT or SIGTERM (to this process; Ctrl-C reaches the workers too) cancels
    ``main`` in every worker, as ``asyncio.run`` does on Ctrl-C: ``async with`` listeners and
    connections close, flushing what was queued to send; then ``run`` returns None. A second
    signal while they stop kills the workers (SIGKILL) and raises ``KeyboardInterrupt``
    (SIGINT) or ``SystemExit(128 + signal)`` (SIGTERM). With one worker the same holds in
    this process. Signals are handled only when ``run`` is called from the main thread.
    With several workers, SIGUSR1 and SIGUSR2 sent to this process are passed on to every
    worker, except while the workers stop (a worker's ``main`` handles them, e.g. with
    ``loop.add_signal_handler``; one that does not dies of it and is restarted, as if it had
    been sent the signal itself). A worker starts with the handler this process had before
    ``run``: set them to ``signal.SIG_IGN`` first for workers to ignore them until ``main``
    handles them.

    Outcomes, with several workers:

    - ``main`` returns in a worker: that worker is done and not restarted (its return value
      stays in its process: ``run`` returns None). ``run`` returns when all are done.
    - ``main`` raises, or a worker dies (killed, crashed) or is stopped by a signal sent to
      it alone: logged on the ``udpx`` logger (the worker logs the traceback) and the worker
      is restarted with the same ``worker_id()``. A worker that dies within 1 s of starting is
      restarted after 0.1 s, then 0.2, 0.4, 0.8 s; after 5 such deaths in a row ``run`` stops
      the others and raises the last exception that worker's ``main`` raised (with a note
      saying so and the worker's traceback), or ``UDPXError`` if it died without one.
    - ``main`` raises while the workers stop: ``run`` raises that exception once all have
      stopped, as ``asyncio.run`` raises what ``main`` raises when cancelled.

    A restart changes the set of sockets on the port, so the kernel's hash then sends some
    peers to other workers, which see them as new peers; no restarts, no such moves. Steering
    by CPU instead (SO_ATTACH_REUSEPORT_CBPF, as msquic does: a classic BPF program returns
    the receiving CPU's number as the socket index, with one worker pinned per CPU) is not
    implemented: it pays off with a NIC whose RSS spreads flows over CPUs, which loopback on
    a 2-CPU machine cannot show.

    Raises:
        TypeError: ``main`` is not a coroutine function (a coroutine object, ``main()``,
            is refused with a hint), ``workers`` is not an int, or ``loop_factory`` is not
            callable; raised before anything starts.
        ValueError: ``workers`` is less than 1.
        RuntimeError: called from a running event loop or inside a worker of a run, or
            ``workers > 1`` where ``os.fork`` does not exist.
        BaseException: what ``main`` raises (one worker), or as described above. What
            ``loop_factory`` raises, ``TypeError`` when it returns something else than an
            event loop, and ``RuntimeError`` when it returns a closed or running one, are
            raised as ``main``'s would be (with several workers, once the worker failed 5
            times; the log and the note say ``loop_factory``).
    """
    _check_arguments(main, workers, loop_factory)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("udpx.run() cannot be called from a running event loop")
    if _worker_id is not None:
        raise RuntimeError(f"udpx.run() cannot be nested: this is already worker {_worker_id} "
                           f"of a run")
    if workers == 1:
        _run_in_process(main, loop_factory)
        return
    if not hasattr(os, "fork"):
        raise RuntimeError("udpx.run() with workers > 1 needs os.fork, which this platform "
                           "lacks")
    _Supervisor(main, workers, loop_factory).run()


def _check_arguments(main: object, workers: object, loop_factory: object) -> None:
    if inspect.iscoroutine(main):
        main.close()  # no "never awaited" warning on top of the error
        raise TypeError("main must be a coroutine function, called in each worker; got a "
                        "coroutine object: pass main, not main()")
    if not inspect.iscoroutinefunction(main):
        raise TypeError(f"main must be a coroutine function (async def, or a "
                        f"functools.partial of one), got {main!r}")
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"workers must be an int, got {workers!r}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if loop_factory is not None and not callable(loop_factory):
        raise TypeError(f"loop_factory must be callable or None, got {loop_factory!r}")


# -- running main until a stop signal -----------------------------------------------------


@dataclasses.dataclass
class _Stop:
    """Whether (and by which signal) this process was asked to stop, and how to tell the
    running ``main``. Signal handlers only record and wake the loop; the loop cancels."""

    #: In-process run: a second signal forces exit. A worker ignores repeats: Ctrl-C reaches
    #: it from the terminal and again from the parent, and forcing is the parent's job.
    force_on_repeat: bool
    signum: int | None = None
    loop: asyncio.AbstractEventLoop | None = None
    task: asyncio.Task[Any] | None = None

    finished: bool = False  # main is over: a signal now has nothing left to stop

    def on_signal(self, signum: int, frame: object) -> None:
        if self.finished:
            # Nothing graceful is left to do: in this process the loop is being torn down
            # (a signal forces, as Ctrl-C does without a handler); a worker is exiting.
            if self.force_on_repeat:
                _force_exit(signum)
            return
        if self.signum is None:
            self.signum = signum
            if self.loop is not None and not self.loop.is_closed():
                # Plain signal handlers rather than loop.add_signal_handler: they are installed
                # before the loop exists (a worker may be signalled at once), and the loops do
                # not reset them when they close. The handler runs in the loop's thread
                # between bytecodes; call_soon_threadsafe also wakes a loop blocked in epoll.
                self.loop.call_soon_threadsafe(self._cancel)
        elif self.force_on_repeat:
            _force_exit(signum)

    def _cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()


def _force_exit(signum: int) -> NoReturn:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _set_handlers(handlers: Mapping[int, Any]) -> None:
    """Install these signal handlers back (None, a handler not set from Python: the
    default)."""
    for signum, handler in handlers.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _stop_signals_to(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``handler`` (main thread only), restoring afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {signum: signal.signal(signum, handler)
                                for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        _set_handlers(previous)


async def _until_stopped(main: MainFunction, stop: _Stop) -> None:
    """Run ``main()``; a stop signal cancels it, and then this returns normally."""
    stop.loop = asyncio.get_running_loop()
    stop.task = asyncio.current_task()
    if stop.signum is not None:
        stop.finished = True
        return  # signalled before the loop ran: main is not started at all
    try:
        await main()
    except asyncio.CancelledError:
        if stop.signum is None:
            raise
        assert stop.task is not None
        stop.task.uncancel()  # the stop asked for this cancellation: a graceful end
    finally:
        stop.finished = True


def _checked(loop_factory: LoopFactory | None) -> LoopFactory | None:
    """``loop_factory``, refusing what is not an event loop before asyncio's runner keeps it
    (its close() would then fail on it and hide why).

    Raises (when called):
        TypeError: ``loop_factory`` returned something else than an event loop.
        RuntimeError: it returned a closed loop, or one already running.
    """
    if loop_factory is None:
        return None
    factory = loop_factory

    def make() -> asyncio.AbstractEventLoop:
        loop = factory()
        if not isinstance(loop, asyncio.AbstractEventLoop):
            raise TypeError(f"loop_factory {factory!r} returned {loop!r}, not an event loop")
        if loop.is_closed() or loop.is_running():
            raise RuntimeError(f"loop_factory {factory!r} returned a "
                               f"{'closed' if loop.is_closed() else 'running'} loop, {loop!r}; "
                               f"it must make a new one")
        return loop

    return make


def _run_in_process(main: MainFunction, loop_factory: LoopFactory | None) -> None:
    global _worker_id, _worker_count  # this process's place in a run
    stop = _Stop(force_on_repeat=True)
    _worker_id, _worker_count = 0, 1
    try:
        with _stop_signals_to(stop.on_signal), \
                asyncio.Runner(loop_factory=_checked(loop_factory)) as runner:
            runner.get_loop()  # first: a factory that fails leaves no coroutine unawaited
            runner.run(_until_stopped(main, stop))
    finally:
        _worker_id, _worker_count = None, 0
    if stop.signum is not None:
        logger.info("udpx: run stopped by %s", signal.Signals(stop.signum).name)


# -- the parent: starting, watching and stopping workers ------------------------------------


@dataclasses.dataclass
class _Slot:
    """One worker id and the process that currently serves it."""

    index: int
    process: BaseProcess | None = None
    #: The parent's end of the worker's pipe, on which a failing main's exception arrives.
    status: Connection | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None
    done: bool = False  # main returned: never restarted


class _Supervisor:
    """The parent process of a multi-worker run."""

    def __init__(self, main: MainFunction, workers: int,
                 loop_factory: LoopFactory | None) -> None:
        self._main = main
        self._workers = workers
        self._loop_factory = loop_factory
        # Why fork, not spawn or forkserver: these pickle ``main`` and re-import the main
        # module in every worker, so a closure, a lambda's state or an object built before
        # the call could not be run, a script without an ``if __name__ == "__main__"`` guard
        # would run itself again, and each start (and restart) would pay an interpreter's
        # start-up and imports. Forking is unsafe in a process with a running event loop or
        # with other threads holding locks; run() refuses a running loop, and this parent
        # runs no loop and starts no thread: it waits in select on sentinels and a signal
        # wake-up socket. Each worker creates its event loop after the fork.
        self._context = multiprocessing.get_context("fork")
        self._slots = [_Slot(index) for index in range(workers)]
        self._signals: list[int] = []  # stop signals received, in order
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._failure: BaseException | None = None  # why run() gave up
        self._stop_errors: list[BaseException] = []  # raised by main while stopping
        self._parent_pid = os.getpid()
        self._stopping = False  # _stop() has begun: nothing is passed on any more
        #: The handlers of PASSED_SIGNALS before run(): a worker gets them back.
        self._passed_before: dict[int, Any] = {}
        #: The signal mask before the last fork blocked the stop and passed signals.
        self._mask: set[int | signal.Signals] = set()

    # -- signals ------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _pass_on(self, signum: int, frame: object) -> None:
        # Runs between any two bytecodes of the supervisor: a slot's process may be closed
        # (ValueError) before the slot lets go of it. A process whose exit status is not yet
        # collected still holds its pid, so the signal cannot reach another process.
        if self._signals or self._stopping:
            # Stopping (a signal, or run giving up): the workers are closing their listeners,
            # and one whose main already took its handler away would die of the signal in
            # the middle of its flush.
            return
        for slot in self._slots:
            process = slot.process
            with contextlib.suppress(ValueError, ProcessLookupError):
                if process is not None and process.pid is not None and process.exitcode is None:
                    os.kill(process.pid, signum)

    @contextlib.contextmanager
    def _handling_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        # A signal interrupts select (EINTR), Python runs the handler and retries the select;
        # the byte the C-level handler writes to this socket is what makes it return.
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._passed_before = {signum: signal.signal(signum, self._pass_on)
                               for signum in PASSED_SIGNALS}
        try:
            with _stop_signals_to(self._on_signal):
                yield
        finally:
            _set_handlers(self._passed_before)
            signal.set_wakeup_fd(old_fd)
            self._wakeup = None
            reader.close()
            writer.close()

    def _wait(self, timeout: float | None) -> None:
        """Until a worker exits, a signal arrives or ``timeout`` passes."""
        waitables: list[Any] = [slot.process.sentinel for slot in self._slots
                                if slot.process is not None]
        if self._wakeup is not None:
            waitables.append(self._wakeup[0])
        multiprocessing.connection.wait(waitables, timeout)
        if self._wakeup is not None:
            with contextlib.suppress(BlockingIOError):
                while self._wakeup[0].recv(4096):
                    pass

    # -- the run ------------------------------------------------------------------------

    def run(self) -> None:
        with self._handling_signals():
            try:
                self._supervise()
            finally:
                # Normally nothing is left; after an error in the supervisor itself, no
                # worker may outlive run().
                self._kill_all()
        if self._failure is not None:
            raise self._failure
        if self._stop_errors:
            raise self._stop_errors[0]

    def _supervise(self) -> None:
        for slot in self._slots:
            self._start(slot)
        while not self._signals and self._failure is None:
            self._reap(stopping=False)
            if self._failure is not None:
                break
            if all(slot.done for slot in self._slots):
                logger.info("udpx: every worker's main returned")
                return
            now = time.monotonic()
            for slot in self._slots:
                if slot.restart_at is not None and slot.restart_at <= now:
                    self._start(slot)
            restarts = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
            if self._signals:
                break
            self._wait(max(0.0, min(restarts) - now) if restarts else None)
        self._stop()

    def _start(self, slot: _Slot) -> None:
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(target=self._worker, args=(slot.index, writer),
                                        name=f"udpx-worker-{slot.index}")
        # Blocked across the fork, so that the child cannot take a stop or passed signal with
        # the parent's handler (which would act on the child's copy of this object) before it
        # installs its own; it then sets back the mask the application had.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS + PASSED_SIGNALS)
        self._mask = old_mask  # what the child sets back (signals the application blocked)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            # Closed before the next fork, so that no other worker holds this write end.
            writer.close()
        slot.process, slot.status = process, reader
        slot.started, slot.restart_at = time.monotonic(), None
        logger.info("udpx: worker %d started (pid %s)", slot.index, process.pid)

    def _reap(self, *, stopping: bool) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.exitcode is not None:
                self._ended(slot, stopping=stopping)

    def _ended(self, slot: _Slot, *, stopping: bool) -> None:
        process, status = slot.process, slot.status
        assert process is not None and status is not None
        code = process.exitcode
        assert code is not None
        pid = process.pid
        lived = time.monotonic() - slot.started
        raised = _read_exception(status) if code == EXIT_RAISED else None
        status.close()
        process.close()
        slot.process = slot.status = None
        how = _describe_exit(code, raised)
        if code == EXIT_RETURNED:
            logger.info("udpx: worker %d (pid %s): main returned", slot.index, pid)
            slot.done = True
            return
        if stopping:
            if raised is not None:
                self._stop_errors.append(raised)
            if code - 128 in STOP_SIGNALS:
                logger.info("udpx: worker %d (pid %s) stopped", slot.index, pid)
            else:
                logger.warning("udpx: worker %d (pid %s) %s while stopping", slot.index, pid,
                               how)
            slot.done = True
            return
        slot.quick_deaths = slot.quick_deaths + 1 if lived < QUICK_DEATH else 0
        if slot.quick_deaths >= MAX_QUICK_DEATHS:
            slot.done = True
            message = (f"udpx.run gave up: worker {slot.index} {how} {slot.quick_deaths} times "
                       f"in a row, each within {QUICK_DEATH:g} s of starting")
            logger.error("udpx: %s; stopping the other workers",
                         message.removeprefix("udpx."))
            if raised is not None:
                raised.add_note(message)
                self._failure = raised
            else:
                self._failure = UDPXError(message)
            return
        delay = 0.0 if slot.quick_deaths == 0 else min(
            BACKOFF_FIRST * 2 ** (slot.quick_deaths - 1), BACKOFF_MAX)
        logger.warning("udpx: worker %d (pid %s) %s after %.1f s; restarting it%s", slot.index,
                       pid, how, lived, f" in {delay:.1f} s" if delay else "")
        slot.restart_at = time.monotonic() + delay

    def _stop_signal(self) -> int:
        return self._signals[0] if self._signals else signal.SIGTERM

    def _stop(self) -> None:
        """Stop every worker gracefully; a further signal meanwhile kills them."""
        self._stopping = True
        signum = self._stop_signal()
        # The first signal stops; any further one, however soon, forces (two quick Ctrl-C).
        signals_seen = min(len(self._signals), 1)
        if self._signals:
            logger.info("udpx: %s: stopping %d worker(s)", signal.Signals(signum).name,
                        sum(slot.process is not None for slot in self._slots))
        for slot in self._slots:
            slot.restart_at = None
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signum)
        while True:
            self._reap(stopping=True)
            if all(slot.process is None for slot in self._slots):
                return
            if len(self._signals) > signals_seen:
                forced = self._signals[-1]
                logger.warning("udpx: %s again: killing the workers",
                               signal.Signals(forced).name)
                self._kill_all()
                _force_exit(forced)
            self._wait(None)

    def _kill_all(self) -> None:
        for slot in self._slots:
            process = slot.process
            if process is None:
                continue
            if process.exitcode is None:
                process.kill()
                process.join()
            if slot.status is not None:
                slot.status.close()
            process.close()
            slot.process = slot.status = None

    # -- the worker side (runs in the forked child) ---------------------------------------

    def _worker(self, index: int, status: Connection) -> None:
        global _worker_id, _worker_count  # this process's place in a run
        _worker_id, _worker_count = index, self._workers
        stop = _Stop(force_on_repeat=False)
        # The stop signals are blocked (see _start): the parent's handler, wake-up socket and
        # pipes are replaced or closed before they are let through.
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for sock in self._wakeup:
                sock.close()
        for slot in self._slots:
            if slot.status is not None:
                slot.status.close()
        for signum in STOP_SIGNALS:
            signal.signal(signum, stop.on_signal)
        # (What main installs, e.g. loop.add_signal_handler, replaces these.)
        _set_handlers(self._passed_before)
        die_with_parent(self._parent_pid)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        code = self._run_worker(index, status, stop)
        status.close()
        # multiprocessing turns this into the process's exit status (after flushing stdout).
        raise SystemExit(code)

    def _run_worker(self, index: int, status: Connection, stop: _Stop) -> int:
        runner = asyncio.Runner(loop_factory=_checked(self._loop_factory))
        try:
            # The loop first, on its own: a factory that fails is reported as such, and leaves
            # no coroutine unawaited.
            runner.get_loop()
        except BaseException as exc:
            logger.exception("udpx: worker %d (pid %d): loop_factory raised", index,
                             os.getpid())
            exc.add_note(f"{_FACTORY_NOTE} in udpx worker {index}, pid {os.getpid()}; main "
                         f"did not run)")
            _send_exception(status, exc)
            return EXIT_RAISED
        try:
            with runner:
                try:
                    runner.run(_until_stopped(self._main, stop))
                finally:
                    # main is over: closing the loop gives the passed-on signals their default
                    # action back (the end of the process), and one passed on now would kill
                    # this worker as it exits (a returned main then looked like a crash).
                    signal.pthread_sigmask(signal.SIG_BLOCK, PASSED_SIGNALS)
        except SystemExit as exc:  # sys.exit() in main: its status, as for a process
            if exc.code is None:
                return EXIT_RETURNED
            if isinstance(exc.code, int):
                return exc.code
            # sys.exit("message"): the message is what the parent reports (and raises, if it
            # gives up), as run() with one worker would raise it.
            _send_exception(status, exc)
            return EXIT_RAISED
        except BaseException as exc:
            logger.exception("udpx: worker %d (pid %d): main raised", index, os.getpid())
            exc.add_note(f"(raised by main in udpx worker {index}, pid {os.getpid()}:)\n"
                         + "".join(traceback.format_exception(exc)).rstrip())
            _send_exception(status, exc)
            return EXIT_RAISED
        if stop.signum is not None:
            logger.debug("udpx: worker %d (pid %d) stopped by %s", index, os.getpid(),
                        signal.Signals(stop.signum).name)
            return 128 + stop.signum
        return EXIT_RETURNED


def die_with_parent(parent_pid: int) -> None:
    """Have Linux send this worker SIGTERM if the parent dies (even by SIGKILL), so that no
    orphaned worker keeps serving the port."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGTERM),
                   ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        return
    if os.getppid() != parent_pid:  # the parent died before prctl: stop now
        os.kill(os.getpid(), signal.SIGTERM)


def _send_exception(status: Connection, exc: BaseException) -> None:
    try:
        data = pickle.dumps(exc)
    except Exception:
        data = b""
    if not data or len(data) > MAX_EXCEPTION_BYTES:
        data = pickle.dumps(UDPXError(f"{type(exc).__name__}: {exc}"[:1000]))
    with contextlib.suppress(OSError):
        status.send_bytes(data)


def _read_exception(status: Connection) -> BaseException | None:
    try:
        if not status.poll():
            return None
        exc = pickle.loads(status.recv_bytes())
    except EOFError:  # nothing was sent: sys.exit(1), not an exception
        return None
    except Exception as error:  # an exception class that cannot be rebuilt here
        return UDPXError(f"main raised an exception that could not be passed on: {error}")
    return exc if isinstance(exc, BaseException) else None


#: How a worker's note on an exception says that its loop_factory raised it.
_FACTORY_NOTE: Final = "(raised by loop_factory"


def _describe_exit(code: int, raised: BaseException | None) -> str:
    if code == EXIT_RAISED and raised is not None:
        culprit = ("loop_factory" if any(note.startswith(_FACTORY_NOTE) for note in
                                         getattr(raised, "__notes__", ())) else "main")
        return f"failed ({culprit} raised {type(raised).__name__}: {raised})"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    if code > 128:
        with contextlib.suppress(ValueError):
            return f"was stopped by {signal.Signals(code - 128).name}"
    return f"exited with status {code}"
