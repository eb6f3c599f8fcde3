"""Kernel PMUs over perf_event_open(2): the kernel's uprobe PMU, software counters, hardware counters.

Each is a plug-in of the registry (pmu.core.REGISTRY) and is driven only through the Pmu operations.
The kernel counts; pmu adds nothing per hit. An event's counter is one file descriptor:

- on a task (pid = tid, cpu = -1) or on a CPU of a system-wide run (pid = -1, cpu = N: the scheduler's
  CPU contexts, whose tasks carry `cpu`);
- a user-opened event on a task inherits in the kernel (attr.inherit), as perf's do: forked and cloned
  children count into the same descriptor, so the scheduler's inherited copies of it have nothing of
  their own (their add() opens nothing). Without attr.inherit, each thread pmu follows gets its own;
- a task that has not reached its exec yet (`exec_pending`, the untraced launcher's command) gets its
  counter opened disabled with enable_on_exec, so the kernel starts it at the exec, as perf stat;
- remove() reads the count. At an exit (EF_EXIT) the descriptor stays open and counting, as the
  kernel keeps counting the rest of the exit and the children that inherited it, until flush() reads it
  for the last time and closes it; any other remove (exec, rotation, disable) also disables it, and a
  later add() enables the same descriptor again.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pmu import perf_event as pe
from pmu.core import EF_EXIT, EF_START, EF_UPDATE, PmuBase, PmuEnv, Target
from pmu.errors import EventSpecError, PmuError, TracePermissionError
from pmu.events.attr import EventAttr
from pmu.events.counters import TYPE_HARDWARE, TYPE_SOFTWARE
from pmu.events.event import Event
from pmu.events.spec import ProbeKind
from pmu.events.symbols import resolve_probe, resolve_target
from pmu.hits import Hits
from pmu.ring import RECORDS_PER_PAGE

if TYPE_CHECKING:
    from pmu.ring import Ring


class KernelEventError(PmuError):
    """perf_event_open refused an event for a reason other than 'not supported'."""

    kind = "kernel"


@dataclass
class _Config:
    """What perf_event_open gets for one attr (shared by every descriptor of it)."""

    type: int
    config: int
    config1: int = 0
    config2: int = 0
    keep: ctypes.Array[ctypes.c_char] | None = None
    """The path string config1 points to (kept alive for as long as the attr may be opened)."""
    how: str = ""


@dataclass
class _Counter:
    fd: int
    exiting: bool = False
    ring: pe.SampleRing | None = None
    """The mmap ring of a sampling event."""
    index: int = 0
    """The event's index in records."""
    more: list[_Counter] = field(default_factory=list)
    """A recorded task event that inherits is one descriptor per CPU (the kernel maps no ring of an
    inheriting per-task descriptor, as perf record knows): the others, read and closed with it."""

    def all(self) -> list[_Counter]:
        return [self, *self.more]


@dataclass
class KernelPmu(PmuBase):
    """The part every kernel backend shares: one descriptor per event, read/enable/disable on it.

    Times are the kernel's (keeps_time): a counter the kernel multiplexed (hardware counters with
    fewer registers than events) reads time_running < time_enabled and is scaled and marked as perf."""

    name: str = "kernel"
    slots: int | None = None
    needs_tracer: bool = False
    keeps_time: bool = True
    _configs: dict[EventAttr, _Config] = field(default_factory=dict)
    _counters: dict[Event, _Counter] = field(default_factory=dict)
    _unsupported: set[EventAttr] = field(default_factory=set)
    _checked: dict[EventAttr, tuple[int, int]] = field(default_factory=dict)
    """The descriptor event_check opened for a system-wide counting event, and its CPU: the one that
    CPU's event takes over (closing a uprobe event costs tens of ms: one close less)."""
    index_of: dict[EventAttr, int] = field(default_factory=dict)
    """Each attr's event index in records (set_ring)."""
    pages: int = 64
    """Data pages of each sampling counter's ring (rounded up to a power of two)."""
    recording: bool = False
    _lost: dict[int, int] = field(default_factory=dict)
    _pending: list[Hits] = field(default_factory=list)

    # ---- what each backend says --------------------------------------------------------------------

    def _config(self, attr: EventAttr, target: Target) -> _Config:
        raise NotImplementedError

    # ---- Pmu operations ---------------------------------------------------------------------------

    def event_check(self, attr: EventAttr, target: Target) -> None:
        config = self._configs.get(attr)
        if config is None:
            config = self._configs[attr] = self._config(attr, target)
        # Try the event once, disabled, where it will count: 'not supported' is known before the run
        # (perf prints <not supported> and goes on); no rights for -a is an error.
        cpu = pe.online_cpus()[0] if target.system_wide else -1
        try:
            fd = self._open(attr, config, pid=-1 if target.system_wide else 0, cpu=cpu, flags=pe.DISABLED)
        except OSError as err:
            if err.errno in pe.NOT_SUPPORTED_ERRNOS:
                self._unsupported.add(attr)
                return
            raise self._error(attr, err, target.system_wide) from None
        if target.system_wide and not (attr.sample_period and self.recording):
            self._checked[attr] = (fd, cpu)  # it is the descriptor event_init opens on that CPU
        else:
            os.close(fd)

    def event_init(self, event: Event) -> None:
        """Open the event's descriptor, disabled (add() enables it): opening every event first and
        enabling them after, as perf does, keeps the first one from counting while the others open."""
        attr = event.attr
        if attr not in self._configs:
            self.event_check(attr, Target(system_wide=getattr(event.task, "cpu", None) is not None))
        event.pmu_private = self._configs[attr]
        self._open_for(event, pe.DISABLED)

    def add(self, event: Event, flags: int) -> bool:
        counter = self._counters.get(event)
        if counter is None:
            if event.parent is None or event.attr.inherit:
                return True  # not supported, gone, or counted in the user-opened event's descriptor
            self._open_for(event, 0 if flags & EF_START else pe.DISABLED)  # a thread of its own
        elif flags & EF_START and not getattr(event.task, "exec_pending", False):
            self._ioctl(counter, pe.IOC_ENABLE)  # (before its exec the kernel enables it at the exec)
        return True

    def _open_for(self, event: Event, bits: int) -> None:
        attr = event.attr
        if attr in self._unsupported:
            return
        task = event.task
        assert task is not None
        cpu = getattr(task, "cpu", None)
        if cpu is None and attr.inherit:
            bits |= pe.INHERIT
        if getattr(task, "exec_pending", False) and attr.enable_on_exec:
            bits |= pe.DISABLED | pe.ENABLE_ON_EXEC
        sampled = bool(attr.sample_period and self.recording)
        cpus = [-1] if cpu is not None or not (sampled and attr.inherit) else pe.online_cpus()
        opened: list[_Counter] = []
        try:
            for on in cpus:
                checked = self._checked.get(attr)
                if cpu is not None and bits == pe.DISABLED and checked is not None and checked[1] == cpu:
                    fd = self._checked.pop(attr)[0]
                else:
                    fd = self._open(
                        attr,
                        event.pmu_private,
                        pid=-1 if cpu is not None else task.tid,
                        cpu=cpu if cpu is not None else on,
                        flags=bits,
                    )
                opened.append(_Counter(fd, index=self.index_of.get(attr, 0)))
                if sampled:
                    opened[-1].ring = pe.SampleRing(fd, self.pages)
        except OSError as err:
            for c in opened:
                if c.ring is not None:
                    c.ring.close()
                os.close(c.fd)
            if err.errno == errno.ESRCH:
                return  # the task is gone already: it counts nothing
            if err.errno in pe.NOT_SUPPORTED_ERRNOS:
                self._unsupported.add(attr)
                return
            raise self._error(attr, err, cpu is not None) from None
        counter = opened[0]
        counter.more = opened[1:]
        self._counters[event] = counter

    def remove(self, event: Event, flags: int) -> None:
        counter = self._counters.get(event)
        if counter is None:
            return
        self._update(event, counter)
        if flags & EF_EXIT:
            counter.exiting = True
        else:
            self._ioctl(counter, pe.IOC_DISABLE)

    def start(self, event: Event, flags: int) -> None:
        counter = self._counters.get(event)
        if counter is not None:
            self._ioctl(counter, pe.IOC_ENABLE)

    def stop(self, event: Event, flags: int) -> None:
        counter = self._counters.get(event)
        if counter is not None:
            self._ioctl(counter, pe.IOC_DISABLE)
            if flags & EF_UPDATE:
                self._update(event, counter)

    def read(self, event: Event) -> None:
        counter = self._counters.get(event)
        if counter is not None:
            self._update(event, counter)

    def set_ring(self, ring: Ring, index_of: dict[EventAttr, int]) -> None:
        """Recording: sampling events get an mmap ring of their own, the size of pmu's (-m)."""
        self.index_of = dict(index_of)
        self.pages = max(1, ring.capacity // RECORDS_PER_PAGE)
        self.recording = True

    def samples(self, sink: Callable[[Hits], None], final: bool = False) -> None:
        pending, self._pending = self._pending, []
        for batch in pending:
            sink(batch)
        for first in self._counters.values():
            for counter in first.all():
                if counter.ring is not None:
                    hits = self._decode(counter, counter.ring.take())
                    if hits is not None:
                        sink(hits)

    def lost(self) -> dict[int, int]:
        return dict(self._lost)

    def _decode(self, counter: _Counter, data: bytes) -> Hits | None:
        """PERF_RECORD_SAMPLE records (IP, TID, TIME, CPU, then the argument registers) as hits;
        PERF_RECORD_LOST ones counted in lost()."""
        if not data:
            return None
        nregs = self._nargs
        size = 40 + (8 + 8 * nregs if nregs else 0)
        buf = np.frombuffer(data, dtype=np.uint8)
        if len(data) % size == 0:
            words = buf.view("<u8").reshape(-1, size // 8)
            header = words[:, 0]
            if np.all((header & 0xFFFFFFFF) == pe.RECORD_SAMPLE) and np.all((header >> 48) == size):
                return self._hits(counter, words)
        # Mixed records (a LOST among the samples): walk the headers.
        rows: list[np.ndarray] = []
        at = 0
        while at + 8 <= len(data):
            kind, _, rsize = struct.unpack_from("<IHH", data, at)
            if rsize == 0:
                break
            if kind == pe.RECORD_SAMPLE and rsize == size:
                rows.append(buf[at : at + size].view("<u8"))
            elif kind == pe.RECORD_LOST:
                lost = struct.unpack_from("<Q", data, at + 16)[0]
                self._lost[counter.index] = self._lost.get(counter.index, 0) + lost
            at += rsize
        if not rows:
            return None
        return self._hits(counter, np.stack(rows))

    def _hits(self, counter: _Counter, words: np.ndarray) -> Hits:
        n = len(words)
        halves = words.view("<u4")
        # word 1 ip, word 2 pid|tid, word 3 time, word 4 cpu|res, word 5 abi, then registers
        order = sorted(pe.REG_ARGS[: self._nargs])
        args = tuple(words[:, 6 + order.index(reg)] for reg in pe.REG_ARGS[: self._nargs])
        return Hits(
            time=words[:, 3].view(np.int64),
            pid=halves[:, 4].view(np.int32),
            tid=halves[:, 5].view(np.int32),
            event=np.full(n, counter.index, np.int32),
            ip=words[:, 1],
            args=args,
            cpu=halves[:, 8].view(np.int32),
        )

    @property
    def _nargs(self) -> int:
        return max((a.sample_args for a in self.index_of if a.sample_period), default=0)

    def supported(self, event: Event) -> bool:
        return event.attr not in self._unsupported

    def describe(self, event: Event) -> str:
        if event.attr in self._unsupported:
            return f"{self.name}: not supported on this machine"
        config = self._configs.get(event.attr)
        where = f", {config.how}" if config and config.how else ""
        return f"the kernel's {self.name.removeprefix('kernel-')} PMU (perf_event_open{where})"

    def flush(self) -> None:
        fds = [fd for fd, _ in self._checked.values()]
        self._checked.clear()
        for event, first in list(self._counters.items()):
            if first.exiting:
                self._update(event, first)
            for counter in first.all():
                if counter.ring is not None:
                    hits = self._decode(counter, counter.ring.take())
                    if hits is not None:
                        self._pending.append(hits)  # the last records, for the final drain
                    counter.ring.close()
                fds.append(counter.fd)
        self._counters.clear()
        pe.close_all(fds)

    # ---- internals --------------------------------------------------------------------------------

    def _update(self, event: Event, counter: _Counter) -> None:
        try:
            readings = [pe.read_counter(c.fd) for c in counter.all()]
        except OSError:
            return
        event.count = sum(r.value for r in readings)  # the output scales it by the times, as perf does
        event.time_enabled = max(r.enabled for r in readings)
        event.time_running = max(r.running for r in readings)

    @staticmethod
    def _ioctl(counter: _Counter, request: int) -> None:
        for c in counter.all():
            pe.ioctl(c.fd, request)

    def _open(self, attr: EventAttr, config: _Config, pid: int, cpu: int, flags: int) -> int:
        a = pe.Attr()
        a.type = config.type
        a.config = config.config
        a.config1 = config.config1
        a.config2 = config.config2
        a.read_format = pe.FORMAT_TOTAL_TIME_ENABLED | pe.FORMAT_TOTAL_TIME_RUNNING
        a.flags = flags | pe.EXCLUDE_HV
        if attr.sample_period and self.recording:
            a.sample_period = attr.sample_period
            a.sample_type = pe.SAMPLE_IP | pe.SAMPLE_TID | pe.SAMPLE_TIME | pe.SAMPLE_CPU
            nargs = self._nargs
            if nargs:
                a.sample_type |= pe.SAMPLE_REGS_USER
                a.sample_regs_user = sum(1 << reg for reg in pe.REG_ARGS[:nargs])
            a.flags |= pe.USE_CLOCKID
            a.clockid = pe.CLOCK_MONOTONIC  # the times of pmu's own records
            a.wakeup_events = 0
        return pe.open_event(a, pid, cpu)

    def _error(self, attr: EventAttr, err: OSError, system_wide: bool) -> PmuError:
        if err.errno in (errno.EACCES, errno.EPERM):
            where = "system-wide (-a)" if system_wide else "on this task"
            return TracePermissionError(
                f"{attr.name}: no permission to count {where}: perf_event_paranoid is {pe.paranoid()}"
                " (run as root, with CAP_PERFMON, or lower kernel.perf_event_paranoid)"
            )
        if err.errno == errno.EMFILE:
            return KernelEventError(f"{attr.name}: too many open files (raise ulimit -n)")
        return KernelEventError(f"{attr.name}: perf_event_open failed: {err.strerror}")


@dataclass
class CounterPmu(KernelPmu):
    """The kernel's generic counters of one type: software (task-clock, context-switches, page-faults,
    ...) or hardware (cycles, instructions, ..., where the machine has a hardware PMU)."""

    name: str = "software"
    type: int = TYPE_SOFTWARE

    def _config(self, attr: EventAttr, target: Target) -> _Config:
        spec = attr.counter
        if spec is None or spec.type != self.type:
            raise EventSpecError(f"{attr.name}: not a {self.name} counter")
        return _Config(type=self.type, config=spec.config)


@dataclass
class KernelUprobePmu(KernelPmu):
    """The kernel's dynamic `uprobe` PMU: config1 = path, config2 = file offset, retprobe bit."""

    name: str = "kernel-uprobe"
    exe: str | None = None
    traced: pe.TraceUprobes = field(default_factory=pe.TraceUprobes)

    def flush(self) -> None:
        """Descriptors closed first, then the tracefs probes deleted (the kernel refuses while in use)."""
        super().flush()
        self.traced.remove()

    def _config(self, attr: EventAttr, target: Target) -> _Config:
        spec = attr.probe
        kind = pe.pmu_type("uprobe")
        if kind is None:
            raise KernelEventError(f"{attr.name}: this kernel has no uprobe PMU")
        exe = target.exe or self.exe
        path = resolve_target(spec.target, exe, target.mapped)
        if spec.kind is ProbeKind.USDT:
            raise KernelEventError(
                f"{attr.name}: USDT probes are served by the ptrace engine (--engine ptrace), which holds"
                " their semaphores and reads their arguments"
            )
        probe = resolve_probe(spec, path)
        ret = spec.kind is ProbeKind.URETPROBE
        if ret and attr.latency:
            raise KernelEventError(
                f"{attr.name}: --latency needs each call's entry time, which the kernel's uretprobe does not"
                " keep: count it with the ptrace engine (--engine ptrace)"
            )
        if ret and attr.sample_args and self.recording:
            raise KernelEventError(
                f"{attr.name}: --args of a return probe are the function's arguments at its entry, which"
                " the kernel's uretprobe does not keep (its registers are those at the return): record it"
                " with the ptrace engine (--engine ptrace)"
            )
        if attr.inherit and not target.system_wide:
            # Inherited to children: a tracefs probe (see pe.TraceUprobes), as perf probe makes.
            if not pe.TraceUprobes.available():
                raise KernelEventError(
                    f"{attr.name}: the kernel engine follows children through tracefs, which is not"
                    f" mounted at {pe.TRACEFS} (mount -t tracefs nodev {pe.TRACEFS}, or use -i)"
                )
            try:
                point = self.traced.add(probe.path, probe.file_offset, ret)
            except OSError as err:
                raise KernelEventError(
                    f"{attr.name}: cannot define the probe in tracefs: {err.strerror}"
                ) from None
            return _Config(
                type=pe.TYPE_TRACEPOINT,
                config=point,
                how=f"{probe.path}:{probe.file_offset:#x}, tracefs {self.traced.group}",
            )
        config = 0
        if ret:
            bit = pe.format_bit("uprobe", "retprobe")
            if bit is None:
                raise KernelEventError(f"{attr.name}: this kernel's uprobe PMU has no retprobe")
            config = 1 << bit
        keep = ctypes.create_string_buffer(probe.path.encode())
        return _Config(
            type=kind,
            config=config,
            config1=ctypes.addressof(keep),
            config2=probe.file_offset,
            keep=keep,
            how=f"{probe.path}:{probe.file_offset:#x}",
        )


def software_factory(env: PmuEnv) -> CounterPmu:
    return CounterPmu(name="software", type=TYPE_SOFTWARE)


def hardware_factory(env: PmuEnv) -> CounterPmu:
    return CounterPmu(name="hardware", type=TYPE_HARDWARE)


def uprobe_factory(env: PmuEnv) -> KernelUprobePmu:
    return KernelUprobePmu()
