"""The backends the contract suite (test_contract.py) runs its checks against, each behind one adapter.

An adapter knows how to build an attr for "an event that counts calls of f() in tests/targets/contract.c"
(or, for a kernel counter, the fresh pages each call of f() is paired with), how to run it and what count
to expect. The checks themselves are in test_contract.py and are the same for every backend:

- fake: tests/unit/fakepmu.py's FakePmu registered as a plug-in backend, driven through a Scheduler with a
  FakeClock and FakeTasks; the simulated workload "calls f()" with FakePmu.hit();
- uprobe: pmu's ptrace engine (jump patches, or int3 with PMU_TEST_NO_OPTIMIZE=1), through the Evlist;
- kernel-uprobe: the kernel's uprobes over perf_event_open (`--engine kernel`), through the Evlist;
- software: the kernel's page-faults counter. A process cannot count its own page faults from its exec on
  (the dynamic linker's come before its main), so the exact reference is an independent counter (the
  "witness", opened with a perf_event_open of our own) on the same launched command, opened the way perf
  stat opens its own (disabled, enable_on_exec, inherit as asked); the workload's fresh pages are a lower
  bound;
- hardware: the CPU's instructions counter. Where the machine has no hardware PMU (a VM) the checks are
  that the event is <not supported> and the run goes on.

Stop/start (point 7) on the probe backends happens inside a real run: the "switch", a plug-in backend of
its own, turns the event off and on from the tracer's thread as the workload's children exit. On the
kernel counters the test process's own thread is counted while it touches fresh pages.

Every plug-in this file registers (the fake, the witness, the switch) is taken out of the registry again
after each test.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pmu import core
from pmu.commands.parser import build_parser
from pmu.commands.stat import build_attrs
from pmu.core import EF_UPDATE, Pmu, PmuBase, PmuEnv, Target
from pmu.errors import SymbolError
from pmu.events.attr import EventAttr
from pmu.events.counters import TYPE_HARDWARE, counter
from pmu.events.event import Counts, Event, HookReason
from pmu.events.spec import parse_event
from pmu.evlist import Evlist
from pmu.sched import Scheduler
from pmu.trace.maps import Mapping, read_maps, status_field
from tests.conftest import NO_OPTIMIZE, processes_running, run_pmu
from tests.unit.fakepmu import FakeClock, FakePmu, FakeTask

PAGE = mmap.PAGESIZE
FAKE = "contract-fake"
WITNESS = "contract-witness"
SWITCH = "contract-switch"
TIMEOUT = 120
"""Seconds after which a FIFO exchange with a target counts as hung (a failure, never a wait)."""

# The workloads (steps of `contract script`, see tests/targets/contract.c).
COUNT_STEPS = ["1000"]
"""Point 2 and 4: f() called 1000 times by the launched command."""
FORK_STEPS = ["10", "fork:2000", "fork:2000"]
"""Point 3: the children's work (4000 calls, 4000 fresh pages) dwarfs the parent's own."""
PHASES = ["100", "fork:0", "50", "fork:0", "25"]
"""Point 7: the exit of the first child turns the event off, the second's on again: 100 + 25 count."""
SERVED = 200
"""Point 5: f() calls the attached target makes while pmu is attached."""


# ---- what the workload says it did ------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    """One process of a workload, as it reported itself: "parent|child CALLS PAGES BAD"."""

    role: str
    calls: int
    pages: int
    bad: int


def read_procs(path: Path) -> list[Proc]:
    if not path.exists():
        return []
    procs = []
    for line in path.read_text().splitlines():
        role, calls, pages, bad = line.split()
        procs.append(Proc(role, int(calls), int(pages), int(bad)))
    return procs


def own(procs: list[Proc], unit: str, *roles: str) -> int:
    """The workload's own count of `unit` ("calls" or "pages") over the processes of the given roles."""
    return sum(getattr(p, unit) for p in procs if p.role in roles)


# ---- what a test process can see of perf events, tracefs and a target ----------------------------


def perf_fds() -> int:
    """perf_event file descriptors open in this (pmu's) process."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[perf_event]":
                n += 1
    return n


def uprobe_events(exe: Path) -> list[str] | None:
    """The lines of tracefs's uprobe_events that this process could have made: probes on `exe`, or in a
    group named after this process (pmu's are pmu_PID). Other processes' probes are not ours to judge.
    None if tracefs is not mounted."""
    mine = (str(exe), f"_{os.getpid()}/")
    for path in ("/sys/kernel/tracing/uprobe_events", "/sys/kernel/debug/tracing/uprobe_events"):
        with contextlib.suppress(OSError):
            return [line for line in Path(path).read_text().splitlines() if any(m in line for m in mine)]
    return None


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def tracer_pid(pid: int) -> int:
    value = status_field(pid, "TracerPid")
    assert value is not None, "no TracerPid line"
    return int(value)


def read_mem(pid: int, addr: int, n: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, n, addr)
    finally:
        os.close(fd)


def file_bytes_at(pid: int, addr: int, n: int) -> bytes:
    """What the file mapped at `addr` in process pid holds there (the code as it is on disk)."""
    for m in read_maps(pid):
        if m.start <= addr < m.end:
            with open(m.path, "rb") as f:
                f.seek(addr - m.start + m.offset)
                return f.read(n)
    raise AssertionError(f"nothing mapped at {addr:#x} in {pid}")


# ---- an independent perf_event_open (not pmu's): the witness and the hardware probe ----------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_DISABLED, _INHERIT, _ENABLE_ON_EXEC = 1 << 0, 1 << 1, 1 << 12


def perf_open(type_: int, config: int, pid: int, flags: int) -> int:
    """perf_event_open of a counting event with TOTAL_TIME_ENABLED|RUNNING, on pid (any CPU), CLOEXEC."""
    raw = struct.pack("<IIQQQQQ", type_, 128, config, 0, 0, 3, flags).ljust(128, b"\0")
    buf = ctypes.create_string_buffer(raw, 128)
    fd = _libc.syscall(
        ctypes.c_long(298), buf, ctypes.c_int(pid), ctypes.c_int(-1), ctypes.c_int(-1), ctypes.c_ulong(8)
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def perf_read(fd: int) -> Counts:
    value, enabled, running = struct.unpack("<QQQ", os.read(fd, 24))
    return Counts(value, enabled, running)


def machine_counts_hardware() -> bool:
    """The CPU has a hardware PMU the kernel lets us open (asked without pmu)."""
    try:
        fd = perf_open(TYPE_HARDWARE, 1, 0, _DISABLED)
    except OSError:
        return False
    os.close(fd)
    return True


# ---- the plug-ins registered for the tests --------------------------------------------------------


class ContractFake(FakePmu, PmuBase):
    """FakePmu's ops and checks, PmuBase's defaults for the rest of the protocol; refuses one name."""

    BAD = "no_such_function"

    def __init__(self) -> None:
        FakePmu.__init__(self, name=FAKE)
        self.fail_init[self.BAD] = SymbolError(f"no symbol '{self.BAD}' in the fake's target")


class Witness(PmuBase):
    """An independent kernel counter on the launched command, opened as perf stat opens its own (disabled,
    enable_on_exec, inherit as its attr says) at the same time as the backend's, read after the run."""

    name = WITNESS
    needs_tracer = False

    def __init__(self) -> None:
        self.fd = -1
        self.reading: Counts | None = None

    def event_init(self, event: Event) -> None:
        spec = event.attr.counter
        assert spec is not None and event.task is not None
        assert getattr(event.task, "exec_pending", False), "the witness counts an untraced launched command"
        flags = _DISABLED | _ENABLE_ON_EXEC | (_INHERIT if event.attr.inherit else 0)
        self.fd = perf_open(spec.type, spec.config, event.task.tid, flags)

    def add(self, event: Event, flags: int) -> bool:
        return True

    def remove(self, event: Event, flags: int) -> None:
        return None

    def flush(self) -> None:
        if self.fd >= 0:
            self.reading = perf_read(self.fd)
            os.close(self.fd)
            self.fd = -1


class Switch(PmuBase):
    """A plug-in whose only work is to turn the event under test off and on from inside a run: the first
    exit of a task it hears of turns it off, the second on again (sched.disable/enable, or the backend's
    own stop/start). It runs from the tracer's thread, between two stops, as every Pmu call does."""

    name = SWITCH
    needs_tracer = True

    def __init__(self) -> None:
        self.evlist: Evlist | None = None
        self.via = "sched"
        self.exits = 0
        self.toggles = 0

    def event_init(self, event: Event) -> None:
        return None

    def add(self, event: Event, flags: int) -> bool:
        return True

    def remove(self, event: Event, flags: int) -> None:
        return None

    def task_exited(self, task: Any) -> None:
        self.exits += 1
        if self.exits > 2 or self.evlist is None:
            return
        off = self.exits == 1
        event = self.evlist.evsels[0].events[0]  # the event under test, opened on the launched command
        if self.via == "sched":
            (self.evlist.sched.disable if off else self.evlist.sched.enable)(event)
        else:
            pmu = self.evlist.pmus[event.attr.pmu]
            if off:
                pmu.stop(event, EF_UPDATE)
            else:
                pmu.start(event, 0)
        self.toggles += 1


@contextlib.contextmanager
def registered(name: str, factory: Callable[[PmuEnv], Pmu], needs_tracer: bool) -> Iterator[list[Any]]:
    """`name` in the real registry (pmu.core.register) for the duration; yields every instance made."""
    assert name not in core.REGISTRY
    made: list[Any] = []

    def make(env: PmuEnv) -> Pmu:
        pmu = factory(env)
        made.append(pmu)
        return pmu

    core.register(name, make, needs_tracer=needs_tracer)
    try:
        yield made
    finally:
        core.REGISTRY.pop(name, None)
        core.NEEDS_TRACER.pop(name, None)
        core._factories.pop(name, None)


def stat_attrs(*args: str) -> list[EventAttr]:
    """The attrs `pmu stat ARGS` would count (pmu.commands.stat.build_attrs on the real parser)."""
    return build_attrs(build_parser().parse_args(["stat", *args]))


# ---- what the adapters report ---------------------------------------------------------------------


@dataclass
class Refusal:
    """A bad event refused at one stage: the error, and what was kept or started anyway."""

    how: str
    error: BaseException | None
    kept_events: int = 0
    """Events the scheduler kept (sched.events() and live contexts) after event_init failed."""
    ran: bool = False
    """The launched command ran (its report exists) although its event was refused."""


@dataclass
class Run:
    """One counted run of a workload."""

    status: int
    counts: Counts | None
    procs: list[Proc]
    supported: bool
    describe: str
    """Evlist.describe (the fake: the Pmu's describe)."""
    pmu_describe: str
    """Pmu.describe(event) called directly on the backend."""
    keeps_time: bool
    witness: Counts | None = None
    """Kernel counters: the independent counter's final reading."""
    fork_hooks: int | None = None
    """The fake: hook_task(FORK) calls it received."""
    elapsed: int | None = None
    """The fake: clock time from the exec to the exit (what time_enabled must be)."""
    left_added: list[str] = field(default_factory=list)
    """The fake: events still added after the run."""
    unmatched: int = 0
    """The fake: add() calls not matched by a remove()."""


@dataclass
class Attached:
    """An attach run on `contract serve`, and the target after it."""

    counts: Counts | None
    supported: bool
    served: str
    """The target's own reply for the round made while attached ("done 200 0")."""
    code_file: bytes
    code_before: bytes
    code_after: bytes
    state: str
    tracer: int
    new_maps: list[Mapping]
    """Mappings new since the attach other than the target's own read-write memory."""
    fds_before: int
    fds_after: int
    tracefs_before: list[str] | None
    tracefs_after: list[str] | None
    """tracefs's uprobe_events before the attach and after the run."""
    after_round: str
    """The reply to a round made after the run ("done 10 0")."""
    status: int
    """The target's exit status after "quit"."""


@dataclass
class StopStart:
    """A live event turned off and on again while the workload works."""

    counted: int
    enabled_work: int
    disabled_work: int
    exact: bool
    toggles: int
    phases: list[tuple[bool, int, int]] = field(default_factory=list)
    """(on, work, counted in that phase), where the adapter can read the event phase by phase."""


# ---- the adapters ---------------------------------------------------------------------------------


class Backend:
    """One backend as the contract tests drive it (see the module docstring)."""

    id: ClassVar[str]
    pmu: ClassVar[str]
    unit: ClassVar[str] = "calls"
    """What the event counts of the workload: "calls" of f(), or "pages" touched for the first time."""
    exact: ClassVar[bool] = True
    """The count must equal the workload's own count of `unit`; False: equal the witness, at least `unit`."""
    kernel_times: ClassVar[bool] = False
    """The kernel keeps the event's times (Pmu.keeps_time)."""
    stop_vias: ClassVar[tuple[str, ...]] = ("sched", "pmu")
    kernel_maps: ClassVar[frozenset[str]] = frozenset()
    """Mappings the kernel itself leaves in a process the backend counted on."""

    def __init__(self, exe: Path, tmp: Path) -> None:
        self.exe = exe
        self.tmp = tmp
        self._n = 0

    @classmethod
    def unavailable(cls) -> str | None:
        return None

    @classmethod
    @contextlib.contextmanager
    def plugins(cls) -> Iterator[None]:
        yield

    def machine_counts(self) -> bool:
        """Whether this machine can count the backend's event at all (supported() must say so)."""
        return True

    def out(self, what: str) -> Path:
        self._n += 1
        return self.tmp / f"{what}-{self._n}.txt"

    def armed(self) -> tuple[object, ...]:
        """What a backend may arm, as seen from outside: perf fds here, tracefs, the target's bytes."""
        return (perf_fds(), uprobe_events(self.exe), self.exe.read_bytes(), processes_running(self.exe))

    def refuse(self) -> list[Refusal]:
        raise NotImplementedError

    def run(self, steps: list[str], inherit: bool = True) -> Run:
        raise NotImplementedError

    def attach(self) -> Attached:
        raise NotImplementedError

    def stop_start(self, via: str) -> StopStart:
        raise NotImplementedError


def _raised(action: Callable[..., object], *args: object) -> BaseException | None:
    """What action(*args) raised (None if it returned)."""
    try:
        action(*args)
    except Exception as err:  # the test checks it is a PmuError
        return err
    return None


class FakeBackend(Backend):
    id = "fake"
    pmu = FAKE
    stop_vias = ("sched",)
    """FakePmu does not model start/stop (its hit() counts on every added event): only the scheduler's
    disable/enable (remove/add) is checked on it."""

    @classmethod
    @contextlib.contextmanager
    def plugins(cls) -> Iterator[None]:
        with registered(FAKE, lambda env: ContractFake(), needs_tracer=False):
            yield

    def armed(self) -> tuple[object, ...]:
        return ()

    def attr(self, name: str = "f", inherit: bool = True, launched: bool = True) -> EventAttr:
        """As build_attrs makes them: disabled and enable_on_exec for a launched command."""
        return EventAttr(
            spec=parse_event(name), pmu=FAKE, disabled=launched, enable_on_exec=launched, inherit=inherit
        )

    def make(self) -> ContractFake:
        pmu = core.make_pmu(FAKE, PmuEnv())
        assert isinstance(pmu, ContractFake)
        return pmu

    def refuse(self) -> list[Refusal]:
        pmu = self.make()
        sched = Scheduler({FAKE: pmu}, clock=FakeClock())
        err = _raised(sched.open, self.attr(ContractFake.BAD), FakeTask(tid=1000, pid=1000))
        kept = len(sched.events()) + len(sched.contexts()) + len(pmu.added)
        return [Refusal("event_init (Scheduler.open)", err, kept_events=kept)]

    def run(self, steps: list[str], inherit: bool = True) -> Run:
        """The launched command simulated: opened disabled, its exec, its calls and forks, its exit."""
        pmu = self.make()
        clock = FakeClock()
        sched = Scheduler({FAKE: pmu}, clock=clock)
        root = FakeTask(tid=1000, pid=1000, comm="contract")
        event = sched.open(self.attr(inherit=inherit), root)
        clock.advance(7)  # the launcher, before the exec: neither counted nor enabled
        sched.task_exec(root)
        start = clock.now
        procs: list[Proc] = []
        parent = 0
        for i, step in enumerate(steps):
            if step.startswith("fork:"):
                m = int(step[5:])
                child = FakeTask(tid=2000 + i, pid=2000 + i, comm="contract")
                sched.task_fork(root, child)
                for _ in range(m):
                    pmu.hit(child, "f")
                    clock.advance(3)
                sched.task_exit(child)
                procs.append(Proc("child", m, m, 0))
            else:
                n = int(step)
                for _ in range(n):
                    pmu.hit(root, "f")
                    clock.advance(3)
                parent += n
        procs.append(Proc("parent", parent, parent, 0))
        sched.task_exit(root)
        elapsed = clock.now - start
        clock.advance(11)  # after the exit: nothing more
        sched.close()
        pmu.flush()
        calls = pmu.calls
        adds = sum(1 for c in calls if c[0] == "add")
        removes = sum(1 for c in calls if c[0] == "remove")
        return Run(
            status=0,
            counts=sched.read(event),
            procs=procs,
            supported=pmu.supported(event),
            describe=pmu.describe(event),
            pmu_describe=pmu.describe(event),
            keeps_time=bool(getattr(pmu, "keeps_time", False)),
            fork_hooks=sum(1 for c in calls if c[0] == "hook_task" and c[3] == HookReason.FORK.value),
            elapsed=elapsed,
            left_added=[e.name for e in pmu.added],
            unmatched=adds - removes,
        )

    def stop_start(self, via: str) -> StopStart:
        pmu = self.make()
        clock = FakeClock()
        sched = Scheduler({FAKE: pmu}, clock=clock)
        task = FakeTask(tid=1000, pid=1000)
        event = sched.open(self.attr(launched=False), task)
        phases = []
        for on, action in ((True, None), (False, sched.disable), (True, sched.enable)):
            if action is not None:
                action(event)
            before = sched.read(event).value
            for _ in range(100):
                pmu.hit(task, "f")
                clock.advance(1)
            phases.append((on, 100, sched.read(event).value - before))
        counted = sched.read(event).value
        sched.close()
        return StopStart(counted, 200, 100, exact=True, toggles=2, phases=phases)


class EvlistBackend(Backend):
    """A real backend, run by the Evlist on real processes."""

    engine: ClassVar[tuple[str, ...]] = ()

    def event(self) -> str:
        raise NotImplementedError

    def bad_attrs(self) -> list[EventAttr]:
        raise NotImplementedError

    def attrs(self, argv: list[str], inherit: bool = True, pid: int | None = None) -> list[EventAttr]:
        args = [*self.engine, "-e", self.event()]
        if not inherit:
            args.append("-i")
        if pid is not None:
            args += ["-p", str(pid)]
        attrs = stat_attrs(*args, "--", *argv)
        assert [a.pmu for a in attrs] == [self.pmu]
        return attrs

    def evlist(self, attrs: list[EventAttr]) -> Evlist:
        return Evlist(attrs, optimize=not NO_OPTIMIZE)

    def witness_attr(self, attr: EventAttr) -> EventAttr | None:
        """An independent counter of the same event on the same command (kernel counters only)."""
        return None

    def refuse(self) -> list[Refusal]:
        found = []
        for attr in self.bad_attrs():
            evlist = self.evlist([attr])
            pmu = evlist.pmus[self.pmu]
            err = _raised(pmu.event_check, attr, Target(exe=str(self.exe)))
            found.append(Refusal(f"event_check of {attr.name}", err))
            evlist = self.evlist([attr])
            sched = Scheduler(evlist.pmus)
            me = FakeTask(tid=threading.get_native_id(), pid=os.getpid(), comm="pytest")
            err = _raised(sched.open, attr, me)
            kept = len(sched.events()) + len(sched.contexts())
            found.append(Refusal(f"event_init of {attr.name} (Scheduler.open)", err, kept_events=kept))
            out = self.out("refused")
            evlist = self.evlist([attr])
            err = _raised(evlist.run_command, [str(self.exe), "script", str(out), "1"])
            found.append(Refusal(f"Evlist.run_command of {attr.name}", err, ran=out.exists()))
        # A good event checked (and resolved, or defined in tracefs) before a bad one is refused: the run
        # never starts, and what the good one made is released all the same.
        out = self.out("refused")
        argv = [str(self.exe), "script", str(out), "1"]
        evlist = self.evlist([*self.attrs(argv), self.bad_attrs()[0]])
        err = _raised(evlist.run_command, argv)
        found.append(Refusal("Evlist.run_command of a good event then a bad one", err, ran=out.exists()))
        return found

    def run(self, steps: list[str], inherit: bool = True) -> Run:
        out = self.out("run")
        argv = [str(self.exe), "script", str(out), *steps]
        attrs = self.attrs(argv, inherit)
        witness_attr = self.witness_attr(attrs[0])
        evlist = self.evlist(attrs + ([witness_attr] if witness_attr else []))
        result = evlist.run_command(argv)
        evsel = evlist.evsels[0]
        witness = evlist.pmus.get(WITNESS)
        return Run(
            status=result.status,
            counts=evlist.read(evsel),
            procs=read_procs(out),
            supported=evlist.supported(evsel),
            describe=evlist.describe(evsel),
            pmu_describe=evlist.pmus[self.pmu].describe(evsel.events[0]),
            keeps_time=evlist.pmus[self.pmu].keeps_time,
            witness=witness.reading if isinstance(witness, Witness) else None,
        )

    def attach(self) -> Attached:
        ctl, done, served = self.tmp / "ctl", self.tmp / "done", self.out("served")
        os.mkfifo(ctl)
        os.mkfifo(done)
        target = subprocess.Popen(
            [str(self.exe), "serve", str(ctl), str(done)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert target.stdout is not None
            ready = target.stdout.readline().split()
            assert ready and ready[0] == "ready", ready
            addr = int(ready[1], 16)
            pid = target.pid
            code_file = file_bytes_at(pid, addr, 16)
            code_before = read_mem(pid, addr, 16)
            maps_before = set(read_maps(pid))
            # (timeout: should the target die, the command ends rather than wait on its FIFO for ever)
            argv = ["timeout", str(TIMEOUT), "sh", "-c", f"echo {SERVED} > {ctl} && cat {done} > {served}"]
            evlist = self.evlist(self.attrs(argv, pid=pid))
            fds_before, tracefs_before = perf_fds(), uprobe_events(self.exe)
            evlist.run_attached([pid], argv=argv)
            fds_after, tracefs_after = perf_fds(), uprobe_events(self.exe)
            evsel = evlist.evsels[0]
            code_after = read_mem(pid, addr, 16)
            state, tracer = proc_state(pid), tracer_pid(pid)
            new_maps = [
                m
                for m in read_maps(pid)
                if m not in maps_before
                and not (m.perms == "rw-p" and m.path in ("", "[heap]", "[stack]"))
                and m.path not in self.kernel_maps
            ]
            after = subprocess.run(
                ["sh", "-c", f"echo 10 > {ctl} && cat {done}"],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            subprocess.run(["sh", "-c", f"echo quit > {ctl}"], timeout=TIMEOUT, check=True)
            status = target.wait(timeout=TIMEOUT)
            return Attached(
                counts=evlist.read(evsel),
                supported=evlist.supported(evsel),
                served=served.read_text().strip(),
                code_file=code_file,
                code_before=code_before,
                code_after=code_after,
                state=state,
                tracer=tracer,
                new_maps=new_maps,
                fds_before=fds_before,
                fds_after=fds_after,
                tracefs_before=tracefs_before,
                tracefs_after=tracefs_after,
                after_round=after.stdout.strip(),
                status=status,
            )
        finally:
            if target.poll() is None:
                target.kill()
                target.wait()


class ProbeBackend(EvlistBackend):
    """uprobe / kernel-uprobe: an event on f() of the contract target, whose own count is exact."""

    @classmethod
    @contextlib.contextmanager
    def plugins(cls) -> Iterator[None]:
        with registered(SWITCH, lambda env: Switch(), needs_tracer=True):
            yield

    def event(self) -> str:
        return f"{self.exe}:f"

    def bad_attrs(self) -> list[EventAttr]:
        texts = [f"{self.exe}:no_such_function", "/nonexistent/contract:f", f"{self.exe}:f+1"]
        return [stat_attrs(*self.engine, "-e", t, "--", str(self.exe))[0] for t in texts]

    def stop_start(self, via: str) -> StopStart:
        """A traced run (the switch needs the tracer) of PHASES: off at the first child's exit, on at the
        second's; the count is the calls made while on."""
        out = self.out("phases")
        argv = [str(self.exe), "script", str(out), *PHASES]
        attrs = self.attrs(argv)
        switch_attr = EventAttr(spec=parse_event("switch"), pmu=SWITCH, disabled=True, enable_on_exec=True)
        evlist = self.evlist([*attrs, switch_attr])
        switch = evlist.pmus[SWITCH]
        assert isinstance(switch, Switch)
        switch.evlist, switch.via = evlist, via
        result = evlist.run_command(argv)
        assert result.status == 0, read_procs(out)
        counts = evlist.read(evlist.evsels[0])
        procs = read_procs(out)
        assert own(procs, "calls", "parent") == 175, procs
        return StopStart(
            counted=counts.value if counts else 0,
            enabled_work=100 + 25,
            disabled_work=50,
            exact=True,
            toggles=switch.toggles,
        )


class UprobeBackend(ProbeBackend):
    id = "uprobe"
    pmu = "uprobe"


class KernelUprobeBackend(ProbeBackend):
    id = "kernel-uprobe"
    pmu = "kernel-uprobe"
    engine = ("--engine", "kernel")
    kernel_times = True
    kernel_maps = frozenset({"[uprobes]"})
    """The kernel maps its out-of-line area into a process on a uprobe's first hit and never takes it back."""

    @classmethod
    def unavailable(cls) -> str | None:
        if not os.path.exists("/sys/bus/event_source/devices/uprobe/type"):
            return "this kernel has no uprobe PMU (/sys/bus/event_source/devices/uprobe)"
        return None


class CounterBackend(EvlistBackend):
    """software / hardware: a kernel counter; exact against the witness, the workload's pages a bound."""

    unit = "pages"
    exact = False
    kernel_times = True
    counter_name: ClassVar[str]
    wrong_name: ClassVar[str]
    """A counter of the other kind: a bad event for this backend."""

    @classmethod
    @contextlib.contextmanager
    def plugins(cls) -> Iterator[None]:
        with registered(WITNESS, lambda env: Witness(), needs_tracer=False):
            yield

    def event(self) -> str:
        return self.counter_name

    def bad_attrs(self) -> list[EventAttr]:
        wrong = counter(self.wrong_name)
        assert wrong is not None
        return [
            EventAttr(spec=wrong, pmu=self.pmu, disabled=True, enable_on_exec=True),
            EventAttr(spec=parse_event(f"{self.exe}:f"), pmu=self.pmu, disabled=True, enable_on_exec=True),
        ]

    def witness_attr(self, attr: EventAttr) -> EventAttr | None:
        if not self.machine_counts():
            return None
        return EventAttr(
            spec=attr.spec, pmu=WITNESS, disabled=True, enable_on_exec=True, inherit=attr.inherit
        )

    def stop_start(self, via: str) -> StopStart:
        """The test process's own thread counted (a Task is tid/pid/comm): it touches fresh pages while
        the event is on, off, on; a disabled counter moves by nothing at all."""
        pmu = core.make_pmu(self.pmu, PmuEnv())
        sched = Scheduler({self.pmu: pmu})
        spec = counter(self.counter_name)
        assert spec is not None
        me = FakeTask(tid=threading.get_native_id(), pid=os.getpid(), comm="pytest")
        event = sched.open(EventAttr(spec=spec, pmu=self.pmu, inherit=False), me)
        n = 500
        phases = []
        try:
            for on in (True, False, True):
                if via == "sched" and len(phases) == 1:
                    sched.disable(event)
                elif via == "sched" and len(phases) == 2:
                    sched.enable(event)
                elif len(phases) == 1:
                    pmu.stop(event, EF_UPDATE)
                elif len(phases) == 2:
                    pmu.start(event, 0)
                before = sched.read(event).value
                touch_fresh_pages(n)
                phases.append((on, n, sched.read(event).value - before))
            counted = sched.read(event).value
        finally:
            sched.close()
            pmu.flush()
        return StopStart(counted, 2 * n, n, exact=False, toggles=2, phases=phases)


def touch_fresh_pages(n: int) -> None:
    with mmap.mmap(-1, n * PAGE) as m:
        m.madvise(mmap.MADV_NOHUGEPAGE)
        for i in range(n):
            m[i * PAGE] = 1


class SoftwareBackend(CounterBackend):
    id = "software"
    pmu = "software"
    counter_name = "page-faults"
    wrong_name = "cycles"


class HardwareBackend(CounterBackend):
    id = "hardware"
    pmu = "hardware"
    counter_name = "instructions"
    wrong_name = "page-faults"
    unit = "calls"

    def machine_counts(self) -> bool:
        return machine_counts_hardware()

    def witness_attr(self, attr: EventAttr) -> EventAttr | None:
        """None: a second hardware counter is another register, started a few instructions apart, so it
        is no exact reference (the checks use the workload's calls as a lower bound instead)."""
        return None

    def not_supported_line(self) -> str:
        """`pmu stat -x,` of the event on the launched workload: its line (a <not supported> one here)."""
        out = self.out("cli")
        r = run_pmu("stat", "-x,", "-e", self.counter_name, "--", self.exe, "script", out, "10")
        assert r.returncode == 0, r.stderr
        lines = [line for line in r.stderr.splitlines() if self.counter_name in line]
        assert len(lines) == 1, r.stderr
        return lines[0]


ADAPTERS: dict[str, type[Backend]] = {
    cls.id: cls for cls in (FakeBackend, UprobeBackend, KernelUprobeBackend, SoftwareBackend, HardwareBackend)
}


@pytest.fixture(params=list(ADAPTERS))
def backend(request: pytest.FixtureRequest, build: Callable[..., Path], tmp_path: Path) -> Iterator[Backend]:
    cls = ADAPTERS[request.param]
    reason = cls.unavailable()
    if reason:
        pytest.skip(reason)
    exe = build("contract")
    before = set(core.REGISTRY)
    with cls.plugins():
        yield cls(exe, tmp_path)
    assert set(core.REGISTRY) == before, "a plug-in was left in the registry"
