"""Evlist: what a command opens, runs, reads and closes; the glue between scheduler, PMUs and tracer.

It is the TraceListener: the tracer's lifecycle reports (clone, fork, exec, exit, mapping changes) go
to the scheduler, which alone decides what the PMUs arm; commands only build an Evlist, run it (on a
command it launches, or on processes it attaches to) and read its counts per Evsel.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING

from pmu import environ, stopping
from pmu.core import NEEDS_TRACER, Latency, Pmu, PmuEnv, Target, make_pmu
from pmu.core import Task as AnyTask
from pmu.errors import FileError, ProcessError, UsageError
from pmu.events.attr import EventAttr
from pmu.events.event import Counts, Event
from pmu.hits import Hits
from pmu.ring import MAX_ARGS
from pmu.sched.scheduler import Scheduler
from pmu.trace.launch import CpuTask, PlainTask, Untraced
from pmu.trace.maps import mapped_files, read_maps, tgid_of, threads_of
from pmu.trace.tasks import AddressSpace, Task
from pmu.trace.tracer import Tracer

if TYPE_CHECKING:
    from pmu.ring import Ring

MUX_INTERVAL = 0.004
"""Seconds between multiplexing rotations (perf's default perf_event_mux_interval_ms is 4)."""


@dataclass(frozen=True)
class RunResult:
    """How the measured run ended, and how long it took."""

    status: int
    """Exit status as a shell shows it: the command's own, or 128+signal; 0 for an attach run."""
    elapsed_s: float
    user_s: float
    sys_s: float
    interrupted: bool = False
    """Stopped by SIGINT, SIGTERM or SIGHUP rather than by the end of the command."""


@dataclass(eq=False)
class Evsel:
    """One attr as the user asked for it, and the events it opened (one per attached thread)."""

    attr: EventAttr
    events: list[Event] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.attr.name


def resolve_command(argv: Sequence[str]) -> str:
    """The executable a command line runs (as execvp would find it); ProcessError if there is none."""
    if not argv:
        raise ProcessError("no command given")
    name = argv[0]
    path = name if "/" in name else shutil.which(name)
    if path is None or not os.path.exists(path):
        raise ProcessError(f"cannot run '{name}': command not found")
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise ProcessError(f"cannot run '{name}': permission denied")
    return os.path.realpath(path)


class Evlist:
    """The events of one measurement and the tasks they count on."""

    def __init__(self, attrs: Sequence[EventAttr], optimize: bool = True) -> None:
        self.evsels = [Evsel(attr) for attr in attrs]
        self.tracer = Tracer(self)
        env = PmuEnv(tracer=self.tracer, optimize=optimize)
        self.pmus: dict[str, Pmu] = {}
        """The backends the events name, built from the registry (pmu.core.REGISTRY)."""
        for attr in attrs:
            if attr.pmu not in self.pmus:
                self.pmus[attr.pmu] = make_pmu(attr.pmu, env)
        self.traced = any(NEEDS_TRACER.get(name, False) for name in self.pmus)
        """Some event needs the ptrace engine: commands are launched and processes attached under it."""
        self.sched = Scheduler(self.pmus)
        self.multiplexing = any(pmu.slots is not None for pmu in self.pmus.values())
        """Some backend has fewer slots than it may have events: the event loop's tick rotates them."""
        self.index_of = {attr: i for i, attr in enumerate(attrs)}
        self.cpus: list[int] = []
        """The CPUs of a system-wide run."""
        self.ring: Ring | None = None
        self._sink: Callable[[Hits], None] | None = None
        self.drain_interval = 0.05
        self._rotated = 0.0

    def record_into(
        self, ring: Ring, sink: Callable[[Hits], None], interval: float = 0.01, nargs: int = 0
    ) -> None:
        """Sample into `ring` (events with a sample_period); `sink` gets the drained records, in bulk,
        every `interval` seconds while tracing and once more at the end."""
        self.ring = ring
        for pmu in self.pmus.values():
            pmu.set_ring(ring, self.index_of)
        self._sink = sink
        self.drain_interval = interval

    def drain(self, final: bool = False) -> None:
        """Move what the rings hold to the sink (final: no producer is left, take everything): the
        evlist's own ring (the one set_ring gave the backends) whole, then what each backend's own rings
        hold (Pmu.samples: the uprobe PMU's tracee rings, the kernel counters' mmap rings)."""
        if self._sink is None:
            return
        if self.ring is not None:
            records = self.ring.drain(final=final)
            if len(records):
                self._sink(Hits.of_records(records, MAX_ARGS))
        for pmu in self.pmus.values():
            pmu.samples(self._sink, final)

    def lost_per_event(self) -> dict[int, int]:
        """{event index: records lost because a ring was full}, over every ring (closed ones too)."""
        out = self.ring.lost_per_event() if self.ring is not None else {}
        for pmu in self.pmus.values():
            for e, n in pmu.lost().items():
                out[e] = out.get(e, 0) + n
        return out

    @property
    def lost_total(self) -> int:
        own = self.ring.lost_total if self.ring is not None else 0
        return own + sum(n for pmu in self.pmus.values() for n in pmu.lost().values())

    def clock_error_ns(self) -> int:
        """The stated error of time_ns: the largest a backend states (the uprobe PMU's TSC calibration,
        if trampolines recorded; 0 for times read from CLOCK_MONOTONIC itself)."""
        return max((pmu.time_error_ns() for pmu in self.pmus.values()), default=0)

    def close_rings(self) -> None:
        """Unmap the evlist's ring (after the final drain; the backends closed theirs at flush)."""
        if self.ring is not None:
            self.ring.close()

    @contextlib.contextmanager
    def _ticking(self) -> Iterator[None]:
        """While recording, a timer signal makes the tracer's loop drain the ring regularly."""
        # Everything made so far (modules, pyarrow) lives as long as pmu: keep the collector from walking
        # it again and again while millions of records go by (it took a tenth of pmu record's time).
        gc.freeze()
        multiplexing = self.multiplexing
        if self.ring is None and not multiplexing:
            yield
            return
        interval = min(self.drain_interval, MUX_INTERVAL) if multiplexing else self.drain_interval
        self.tracer.tick = self._on_tick
        self._rotated = time.monotonic()

        def on_alarm(signum: int, frame: FrameType | None) -> None:
            self.tracer.tick_due = True

        with _signals(on_alarm, (signal.SIGALRM,)):
            signal.setitimer(signal.ITIMER_REAL, interval, interval)
            try:
                yield
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                if self.ring is not None:
                    self.drain(final=True)

    @contextlib.contextmanager
    def _draining(self) -> Iterator[None]:
        """Without the tracer's loop (system-wide runs): SIGALRM (every drain interval when recording)
        and SIGCHLD wake the waiting loop."""

        def wake(signum: int, frame: FrameType | None) -> None:
            """Only there to end a signal.pause()."""

        # The timer also bounds the wait should SIGCHLD or a stop come between a check and the pause.
        interval = self.drain_interval if self._sink is not None else 0.1
        with _signals(wake, (signal.SIGALRM, signal.SIGCHLD)):
            signal.setitimer(signal.ITIMER_REAL, interval, interval)
            yield

    def _on_tick(self) -> None:
        """The event loop's timer: drain the rings, and rotate multiplexed events every MUX_INTERVAL
        (the scheduler touches only contexts where some PMU has fewer slots than enabled events)."""
        if self._sink is not None:
            self.drain()
        now = time.monotonic()
        if now - self._rotated >= MUX_INTERVAL and self.multiplexing:
            self._rotated = now
            self.sched.rotate()

    # ---- TraceListener --------------------------------------------------------------------------

    def task_new(self, task: Task, parent: Task, fork: bool) -> None:
        if fork:
            if task.mm is parent.mm:  # vfork: the child borrows the parent's memory until exec
                for pmu in self.pmus.values():
                    pmu.task_vforked(parent, task)
            self.sched.task_fork(parent, task)
        else:
            self.sched.task_clone(parent, task)

    def _vfork_done(self, task: Task) -> None:
        for pmu in self.pmus.values():
            pmu.task_vfork_done(task)

    def task_exec(self, task: Task, former_tid: int) -> None:
        self._vfork_done(task)
        if former_tid != task.tid:
            self.sched.task_renamed(former_tid, task)
        self.sched.task_exec(task)

    def task_exit(self, task: Task) -> None:
        self._vfork_done(task)
        self.sched.task_exit(task)
        for pmu in self.pmus.values():
            pmu.task_exited(task)

    def maps_changed(self, mm: AddressSpace) -> None:
        for pmu in self.pmus.values():
            pmu.maps_changed(mm)

    def awaits_mappings(self, mm: AddressSpace) -> bool:
        return any(pmu.awaits_mappings(mm) for pmu in self.pmus.values())

    def wants(self, task: Task) -> bool:
        """Whether any event counts on `task` (a forked child nobody counts is let go)."""
        ctx = self.sched.context(task)
        return ctx is not None and len(ctx) > 0

    # ---- running --------------------------------------------------------------------------------

    def _run_command(self, argv: Sequence[str]) -> RunResult:
        """Launch argv with every event disabled and enable_on_exec, count until it exits."""
        stopping.check()
        exe = resolve_command(argv)
        _check_exe(exe)
        self._check(Target(exe=exe))
        start = time.monotonic()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        # The command starts with the dispositions pmu found (SIGINT ignored in a script's background job,
        # SIGHUP under nohup), and Python's SIGPIPE and SIGXFSZ back to the default, as a shell gives them.
        child_signals = _child_signals()
        running = False
        if not self.traced:
            return self._run_untraced(argv, exe, child_signals, start, before)

        def on_stop(signum: int) -> None:
            # Once the command runs, it gets the terminal's ^C itself (and dies of it or not, as without
            # pmu), as under perf stat: pmu counts until it exits. SIGTERM and SIGHUP are passed on to it.
            if running and signum != signal.SIGINT and self.tracer.root_status is None:
                with contextlib.suppress(OSError):
                    os.kill(task.pid, signum)

        with stopping.listen(on_stop), self._ticking():
            task = self.tracer.launch(argv, exe, child_signals, environ.for_commands())
            try:
                for evsel in self.evsels:
                    evsel.events.append(self.sched.open(evsel.attr, task))
                self.sched.task_exec(task)
                if stopping.requested():  # before the command ran any of its code: it never will
                    self.tracer.kill_all()
                    stopping.check()
                running = True
                self.tracer.start(task)
                self.tracer.run_until_root_exits()
            finally:
                self.close()
        elapsed = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return RunResult(
            status=_shell_status(self.tracer.root_status),
            elapsed_s=elapsed,
            user_s=after.ru_utime - before.ru_utime,
            sys_s=after.ru_stime - before.ru_stime,
        )

    def _run_attached(
        self, pids: Sequence[int], tids: Sequence[int] = (), argv: Sequence[str] = ()
    ) -> RunResult:
        """Count on running processes (every thread) or single threads, for as long as `argv` runs,
        or until SIGINT/SIGTERM/SIGHUP or the processes exit; then leave them exactly as they were."""
        stopping.check()
        if argv:
            resolve_command(argv)
        # One attach per process: -t threads of one process share it (and -p takes every thread).
        targets: dict[int, set[int] | None] = dict.fromkeys(pids)
        for tid in tids:
            pid = _tgid_of(tid)
            only = targets.setdefault(pid, set())
            if only is not None:
                only.add(tid)
        only_tids = {pid: only for pid, only in targets.items() if only is not None}
        if not targets:
            raise UsageError("nothing to attach to")
        if not self.traced:
            return self._attach_untraced(targets, argv)
        start = time.monotonic()
        interrupted = False

        done = False
        child: subprocess.Popen[bytes] | None = None
        waiting: subprocess.Popen[bytes] | None = None

        def on_stop(signum: int) -> None:
            nonlocal interrupted
            if done:
                return  # the run is over: what comes now is the end it would have anyway
            interrupted = True
            self.tracer.request_stop()
            if waiting is not None:  # the processes are gone, the command runs on: end it
                _terminate(waiting)
            # Should the signal have come just before the loop blocked, a second one wakes it.
            signal.setitimer(signal.ITIMER_REAL, 0.05)

        with _alarm_wakes(), stopping.listen(on_stop), self._ticking():
            try:
                for pid, only in targets.items():
                    tasks = self.tracer.attach(pid)
                    if only is not None and (missing := only - {t.tid for t in tasks}):
                        raise ProcessError(f"no thread {min(missing)} in process {pid}")
                    stopping.check()
                    self._open_on([t for t in tasks if only is None or t.tid in only], only_tids)
                stopping.check()  # the run starts: from now on a stop ends it, counts printed
                for pid in targets:
                    self.tracer.start(self.tracer.tasks[pid])
                if argv and not interrupted:
                    child = subprocess.Popen(list(argv), env=environ.for_commands())
                    self.tracer.watch(child.pid)
                self.tracer.run()
                if child is not None and self.tracer.watched_status is None:
                    waiting = child
                    if interrupted:  # as perf stat does with its command: SIGTERM, not waited for
                        _terminate(child)
                    else:
                        child.wait()
                    waiting = None
            finally:
                done = True
                signal.setitimer(signal.ITIMER_REAL, 0)
                self.close()
        return RunResult(
            status=0, elapsed_s=time.monotonic() - start, user_s=0.0, sys_s=0.0, interrupted=interrupted
        )

    def _attach_untraced(self, targets: dict[int, set[int] | None], argv: Sequence[str]) -> RunResult:
        """No event needs ptrace (the kernel engine, counters): count on the processes' threads with
        the kernel's counters, which inherit to later threads and children, without ever stopping
        them (a process a debugger traces can be counted so). Ends as the traced attach does."""
        tasks: list[PlainTask] = []
        for pid, only in targets.items():
            threads = threads_of(pid)
            if not threads:
                raise ProcessError(f"no process with pid {pid}")
            if only is not None and (missing := only - set(threads)):
                raise ProcessError(f"no thread {min(missing)} in process {pid}")
            tasks += [
                PlainTask(tid, pid, exec_pending=False) for tid in threads if only is None or tid in only
            ]
        self._check(_attached(tasks[0].pid))
        interrupted = False
        child: subprocess.Popen[bytes] | None = None

        def on_stop(signum: int) -> None:
            nonlocal interrupted
            interrupted = True
            if child is not None and child.returncode is None:
                _terminate(child)

        pidfds: list[int] = []
        start = time.monotonic()
        with stopping.listen(on_stop):
            try:
                for evsel in self.evsels:
                    for task in tasks:
                        evsel.events.append(self.sched.open(evsel.attr, task))
                stopping.check()
                for pid in targets:
                    with contextlib.suppress(OSError):
                        pidfds.append(os.pidfd_open(pid))
                start = time.monotonic()
                if argv:
                    child = subprocess.Popen(list(argv), env=environ.for_commands())
                with self._draining():
                    live = list(pidfds)
                    while not interrupted and live:
                        if child is not None and child.poll() is not None:
                            break
                        self.drain()
                        with contextlib.suppress(InterruptedError):
                            ready, _, _ = select.select(live, [], [], self.drain_interval)
                            live = [fd for fd in live if fd not in ready]
                if child is not None and child.returncode is None and not interrupted:
                    child.wait()  # the processes are gone, the command runs on: as the traced attach
                end = time.monotonic()
            finally:
                for fd in pidfds:
                    os.close(fd)
                self.close()
                self.drain(final=True)
        return RunResult(status=0, elapsed_s=end - start, user_s=0.0, sys_s=0.0, interrupted=interrupted)

    def run_command(self, argv: Sequence[str]) -> RunResult:
        """Launch argv with every event disabled and enable_on_exec, count until it exits."""
        with self._released():
            return self._run_command(argv)

    def run_attached(
        self, pids: Sequence[int], tids: Sequence[int] = (), argv: Sequence[str] = ()
    ) -> RunResult:
        """Count on running processes (every thread) or single threads, for as long as `argv` runs,
        or until SIGINT/SIGTERM/SIGHUP or the processes exit; then leave them exactly as they were."""
        with self._released():
            return self._run_attached(pids, tids, argv)

    def run_system_wide(self, cpus: Sequence[int], argv: Sequence[str] = ()) -> RunResult:
        """Count on every CPU in `cpus` (pmu stat -a / -C), for as long as `argv` runs (untraced), or
        until SIGINT/SIGTERM/SIGHUP when there is no command."""
        with self._released():
            return self._run_system_wide(cpus, argv)

    @contextlib.contextmanager
    def _released(self) -> Iterator[None]:
        """A run that fails anywhere (a bad event, a command that cannot start) still has every backend
        let go of what it made (a tracefs probe, descriptors); flush is safe to call twice."""
        try:
            yield
        except BaseException:
            for pmu in self.pmus.values():
                with contextlib.suppress(Exception):
                    pmu.flush()
            raise

    def _check(self, target: Target) -> None:
        """Every event checked by its backend before anything runs (each bad event reported first)."""
        for evsel in self.evsels:
            self.pmus[evsel.attr.pmu].event_check(evsel.attr, target)
            stopping.check()

    def _open_on(self, tasks: Sequence[Task], only_tids: dict[int, set[int]]) -> None:
        self._check(_attached(tasks[0].pid, only_tids))
        for evsel in self.evsels:
            for task in tasks:
                evsel.events.append(self.sched.open(evsel.attr, task))

    def _run_untraced(
        self,
        argv: Sequence[str],
        exe: str,
        child_signals: dict[int, signal.Handlers],
        start: float,
        before: resource.struct_rusage,
    ) -> RunResult:
        """No event needs ptrace: the command runs untraced, as under perf stat. It is held before its
        exec while its counters open (they start at the exec), then waited for; its end ends the run."""
        running = False

        def on_stop(signum: int) -> None:
            if running and signum != signal.SIGINT and cmd.status is None:
                with contextlib.suppress(OSError):
                    os.kill(cmd.pid, signum)

        with stopping.listen(on_stop):
            cmd = Untraced(argv, exe, child_signals, environ.for_commands())
            try:
                try:
                    for evsel in self.evsels:
                        evsel.events.append(self.sched.open(evsel.attr, cmd.task))
                    self.sched.task_exec(cmd.task)
                    stopping.check()
                except BaseException:
                    cmd.abandon()
                    raise
                running = True
                start = time.monotonic()  # perf stat's elapsed time starts as the command is let go
                cmd.release()
                if self._sink is None:
                    status = cmd.wait()
                else:  # recording: the kernel's rings are drained while the command runs
                    with self._draining():
                        while (done := cmd.poll()) is None:
                            self.drain()
                            signal.pause()  # woken by the drain timer or SIGCHLD
                    status = done
                end = time.monotonic()
                self.sched.task_exit(cmd.task)
            finally:
                self.close()
                self.drain(final=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return RunResult(
            status=_shell_status(status),
            elapsed_s=end - start,
            user_s=after.ru_utime - before.ru_utime,
            sys_s=after.ru_stime - before.ru_stime,
        )

    def _run_system_wide(self, cpus: Sequence[int], argv: Sequence[str] = ()) -> RunResult:
        """Count on every CPU in `cpus` (pmu stat -a / -C), for as long as `argv` runs (untraced), or
        until SIGINT/SIGTERM/SIGHUP when there is no command."""
        stopping.check()
        if self.traced:
            raise UsageError("-a counts with the kernel's PMUs only (the ptrace engine follows tasks)")
        exe = resolve_command(argv) if argv else None
        self._check(Target(exe=exe, system_wide=True))
        self.cpus = list(cpus)
        tasks = [CpuTask(cpu) for cpu in cpus]
        start = time.monotonic()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        interrupted = False
        cmd: Untraced | None = None

        def on_stop(signum: int) -> None:
            nonlocal interrupted
            interrupted = True
            if cmd is not None and cmd.status is None and signum != signal.SIGINT:
                with contextlib.suppress(OSError):
                    os.kill(cmd.pid, signum)

        status = 0
        end = 0.0
        with stopping.listen(on_stop):
            try:
                if exe is not None:  # forked first, let go once counting: as perf stat -a -- CMD
                    cmd = Untraced(argv, exe, _child_signals(), environ.for_commands())
                try:
                    for evsel in self.evsels:
                        for task in tasks:
                            evsel.events.append(self.sched.open(evsel.attr, task))
                    stopping.check()
                    for evsel in self.evsels:  # opened disabled, enabled together: as perf stat -a
                        for event in evsel.events:
                            self.sched.enable(event)
                except BaseException:
                    if cmd is not None:
                        cmd.abandon()
                    raise
                start = time.monotonic()
                with self._draining():
                    if cmd is not None:
                        cmd.release()
                    while not interrupted:
                        if cmd is not None and (done := cmd.poll()) is not None:
                            status = _shell_status(done)
                            break
                        self.drain()
                        signal.pause()  # woken by the drain timer, SIGCHLD or a stop signal
                end = time.monotonic()
            finally:
                self.close()
                self.drain(final=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return RunResult(
            status=status,
            elapsed_s=(end or time.monotonic()) - start,
            user_s=after.ru_utime - before.ru_utime,
            sys_s=after.ru_stime - before.ru_stime,
            interrupted=interrupted,
        )

    def close(self) -> None:
        """Take every event off (restoring every byte), let go of every task still traced, and have
        every backend take its last readings."""
        try:
            self.tracer.quiesce()  # no hit in flight in a trampoline: final counts match the records
            self.sched.close()
        finally:
            try:
                self.tracer.detach_all()
                self.drain(final=True)  # every record, before the backends close their rings
            finally:
                for pmu in self.pmus.values():
                    pmu.flush()

    # ---- reading --------------------------------------------------------------------------------

    def describe(self, evsel: Evsel) -> str:
        """How the evsel's probe was served (optimized jump patch, or int3 and why), for -v."""
        if not evsel.events:
            return "not opened"
        return self.pmus[evsel.attr.pmu].describe(evsel.events[0])

    def latency(self, evsel: Evsel) -> Latency | None:
        """The latencies of the evsel's calls (a return probe counted with --latency), else None."""
        return self.pmus[evsel.attr.pmu].latency(evsel.attr)

    def supported(self, evsel: Evsel) -> bool:
        """False when the machine cannot count the evsel's event (perf's `<not supported>`)."""
        return not evsel.events or self.pmus[evsel.attr.pmu].supported(evsel.events[0])

    def errors(self) -> list[str]:
        """One line per evsel whose events failed to be scheduled (the reason the scheduler kept), then
        the backends' warnings (a probe armed nowhere)."""
        out = []
        for evsel in self.evsels:
            for e in evsel.events:
                err = self.sched.error(e)
                if err is not None:
                    out.append(f"{evsel.name}: {err.message}")
                    break
        for pmu in self.pmus.values():
            out += pmu.warnings()
        return out

    def read(self, evsel: Evsel) -> Counts | None:
        """The evsel's total over its events; None if it was never enabled."""
        total = [self.sched.read(e) for e in evsel.events]
        if not total or not any(c.time_enabled for c in total):
            return None
        return Counts(
            value=sum(c.value for c in total),
            time_enabled=sum(c.time_enabled for c in total),
            time_running=sum(c.time_running for c in total),
        )

    def per_task(self, evsel: Evsel) -> list[tuple[AnyTask, Counts]]:
        """Each thread (or CPU, system-wide) the evsel counted on, with its own counts."""
        return [(t, c) for e in evsel.events for t, c in self.sched.per_task(e)]

    def per_process(self, evsel: Evsel) -> list[tuple[AnyTask, Counts]]:
        """Counts summed per process, keyed by the process's first task seen."""
        by_pid: dict[int, tuple[AnyTask, Counts]] = {}
        for task, c in self.per_task(evsel):
            if task.pid in by_pid:
                first, prev = by_pid[task.pid]
                c = Counts(
                    prev.value + c.value,
                    prev.time_enabled + c.time_enabled,
                    prev.time_running + c.time_running,
                )
                task = first
            by_pid[task.pid] = (task, c)
        return list(by_pid.values())


@contextlib.contextmanager
def _signals(handler: signal.Handlers | object, signums: Sequence[int]) -> Iterator[None]:
    old = {s: signal.signal(s, handler) for s in signums}  # type: ignore[arg-type]
    try:
        yield
    finally:
        if signal.SIGALRM in old:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _alarm_wakes() -> Iterator[None]:
    """Make sure a SIGALRM handler is there (it only interrupts a blocking wait) unless one is."""
    if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        yield
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        """Only there to interrupt a blocking wait."""

    with _signals(on_alarm, (signal.SIGALRM,)):
        yield


def _child_signals() -> dict[int, signal.Handlers]:
    """The dispositions a command starts with: those pmu found (SIGINT ignored in a script's background
    job, SIGHUP under nohup), and SIGPIPE and SIGXFSZ (which Python ignores) back to the default."""
    return {
        signal.SIGPIPE: signal.SIG_DFL,
        signal.SIGXFSZ: signal.SIG_DFL,
        **{s: stopping.original(s) for s in stopping.STOP_SIGNALS},
    }


def _terminate(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM to a command pmu started and has not reaped (safe in a signal handler)."""
    with contextlib.suppress(OSError):
        os.kill(child.pid, signal.SIGTERM)


def _check_exe(exe: str) -> None:
    with open(exe, "rb") as f:
        head = f.read(4)
    if head != b"\x7fELF" and not head.startswith(b"#!"):
        raise FileError(f"not an ELF file: {exe}")


def _attached(pid: int, only_tids: dict[int, set[int]] | None = None) -> Target:
    """What an attached process's events are resolved against: its executable and the files it maps."""
    exe: str | None = None
    mapped: list[str] = []
    with contextlib.suppress(OSError):
        exe = os.path.realpath(f"/proc/{pid}/exe")
    with contextlib.suppress(OSError):
        mapped = mapped_files(read_maps(pid))
    return Target(exe=exe, mapped=mapped, only_tids=only_tids or {})


def _tgid_of(tid: int) -> int:
    pid = tgid_of(tid)
    if pid < 0:
        raise ProcessError(f"no thread with tid {tid}")
    return pid


def _shell_status(status: int | None) -> int:
    if status is None:
        return 0
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 0
