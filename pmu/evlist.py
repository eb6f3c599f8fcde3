"""Evlist: what a command opens, runs, reads and closes; the glue between scheduler, PMUs and tracer.

It is the TraceListener: the tracer's lifecycle reports (clone, fork, exec, exit, mapping changes) go
to the scheduler, which alone decides what the PMUs arm; commands only build an Evlist, run it and
read its counts.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pmu.errors import FileError, ProcessError
from pmu.events.attr import EventAttr
from pmu.events.event import Counts, Event
from pmu.sched.scheduler import Scheduler
from pmu.trace.tasks import AddressSpace, Task
from pmu.trace.tracer import Tracer
from pmu.uprobe_pmu import UprobePmu


@dataclass(frozen=True)
class RunResult:
    """How the measured command ended, and how long it took."""

    status: int
    """Exit status as a shell shows it: the command's own, or 128+signal."""
    elapsed_s: float
    user_s: float
    sys_s: float


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
    """The events of one measurement, opened on a launched command's task tree."""

    def __init__(self, attrs: Sequence[EventAttr]) -> None:
        self.attrs = list(attrs)
        self.tracer = Tracer(self)
        self.uprobe = UprobePmu(self.tracer)
        self.sched = Scheduler({"uprobe": self.uprobe})
        self.events: list[Event] = []

    # ---- TraceListener --------------------------------------------------------------------------

    def task_new(self, task: Task, parent: Task, fork: bool) -> None:
        if fork:
            self.sched.task_fork(parent, task)
        else:
            self.sched.task_clone(parent, task)

    def task_exec(self, task: Task) -> None:
        self.sched.task_exec(task)

    def task_exit(self, task: Task) -> None:
        self.sched.task_exit(task)

    def maps_changed(self, mm: AddressSpace) -> None:
        self.uprobe.maps_changed(mm)

    def wants(self, task: Task) -> bool:
        """Whether any event counts on `task` (a forked child nobody counts is let go)."""
        ctx = self.sched.context(task)
        return ctx is not None and len(ctx) > 0

    # ---- running --------------------------------------------------------------------------------

    def run_command(self, argv: Sequence[str]) -> RunResult:
        """Launch argv with every event disabled and enable_on_exec, count until it exits."""
        exe = resolve_command(argv)
        self.uprobe.exe = exe
        self._check_exe(exe)
        for attr in self.attrs:  # every bad event is reported before anything runs
            self.uprobe.resolve(attr.probe)
        start = time.monotonic()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command gets the terminal's ^C
        try:
            task = self.tracer.launch(argv, exe)
            try:
                for attr in self.attrs:
                    self.events.append(self.sched.open(attr, task))
                self.sched.task_exec(task)
                self.tracer.start(task)
                self.tracer.run_until_root_exits()
            finally:
                self.close()
        finally:
            signal.signal(signal.SIGINT, old_int)
        elapsed = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return RunResult(
            status=_shell_status(self.tracer.root_status),
            elapsed_s=elapsed,
            user_s=after.ru_utime - before.ru_utime,
            sys_s=after.ru_stime - before.ru_stime,
        )

    def _check_exe(self, exe: str) -> None:
        with open(exe, "rb") as f:
            head = f.read(4)
        if head != b"\x7fELF" and not head.startswith(b"#!"):
            raise FileError(f"not an ELF file: {exe}")

    def close(self) -> None:
        """Take every event off (restoring every byte) and let go of every task still traced."""
        try:
            self.sched.close()
        finally:
            self.tracer.detach_all()

    # ---- reading --------------------------------------------------------------------------------

    def read(self, event: Event) -> Counts:
        return self.sched.read(event)

    def per_task(self, event: Event) -> list[tuple[Task, Counts]]:
        return [(t, c) for t, c in self.sched.per_task(event) if isinstance(t, Task)]


def _shell_status(status: int | None) -> int:
    if status is None:
        return 0
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 0
