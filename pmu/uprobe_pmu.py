"""The uprobe PMU: each event is an int3 probe at a (file, offset), run with out-of-line execution.

A probe is keyed by the file's (device, inode) and offset, as the kernel keys uprobes, so it covers
every executable mapping of that file in every traced address space; a file mapped later (dlopen,
exec) is armed when the tracer reports the mapping change. Several events on one address share one
breakpoint through the tracer's reference counting.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pmu.core import EF_START, Task
from pmu.errors import RelocationError
from pmu.events.attr import EventAttr
from pmu.events.event import Event, HookReason
from pmu.events.spec import ProbeKind, ProbeSpec
from pmu.events.symbols import ResolvedProbe, resolve_probe, resolve_target
from pmu.trace.maps import addresses_of, mapped_files
from pmu.trace.relocate import build_slot
from pmu.trace.tasks import AddressSpace, ReturnFrame
from pmu.trace.tasks import Task as TraceTask
from pmu.trace.tracer import Tracer

if TYPE_CHECKING:
    from pmu.ring import Ring

RECORD_RETURN = 1
"""Bit 0 of a ring record's flags: the record is a function return (see pmu/ring.py)."""


class _Entry:
    """One event counting on one thread at a site; `running` is what start/stop flip."""

    __slots__ = ("event", "running", "index", "period", "nargs")

    def __init__(self, event: Event, running: bool, index: int) -> None:
        self.event = event
        self.running = running
        self.index = index
        """The event's index in the ring's records (its evsel's position)."""
        self.period = event.attr.sample_period
        self.nargs = event.attr.sample_args


@dataclass(eq=False)
class _Site:
    """One probe (file, offset) in one address space: the breakpoint consumer for all its addresses."""

    mm: AddressSpace
    probe: ResolvedProbe
    returns: bool
    """A uretprobe: the entry hijacks the return, and the return is what counts."""
    by_tid: dict[int, list[_Entry]] = field(default_factory=dict)
    addrs: set[int] = field(default_factory=set)
    hooks: dict[int, Callable[[TraceTask], None]] = field(default_factory=dict)
    """The breakpoint consumer made for each address (the same object is given back on removal)."""

    def empty(self) -> bool:
        return not any(self.by_tid.values())


class UprobePmu:
    """int3 uprobes with out-of-line execution of the displaced instruction: one stop per hit."""

    name = "uprobe"
    slots: int | None = None

    def __init__(self, tracer: Tracer, exe: str | None = None) -> None:
        self.tracer = tracer
        self.exe = exe
        self._resolved: dict[ProbeSpec, ResolvedProbe] = {}
        self._sites: dict[tuple[AddressSpace, ResolvedProbe, bool], _Site] = {}
        self._placed: dict[Event, tuple[_Site, _Entry]] = {}
        self.ring: Ring | None = None
        """Where sample records go (pmu record); None when only counting."""
        self.index_of: dict[EventAttr, int] = {}
        """Each attr's index in ring records, set by the evlist."""

    # ---- resolution -----------------------------------------------------------------------------

    def resolve(self, spec: ProbeSpec, mapped: list[str] | None = None) -> ResolvedProbe:
        """Resolve an event string to a (file, offset) once; raises PmuError with a one-line message."""
        found = self._resolved.get(spec)
        if found is None:
            path = resolve_target(spec.target, self.exe, mapped or [])
            found = resolve_probe(spec, path)
            _check_relocatable(found)
            self._resolved[spec] = found
        return found

    # ---- the Pmu operations ---------------------------------------------------------------------

    def event_init(self, event: Event) -> None:
        mapped: list[str] = []
        task = event.task
        if isinstance(task, TraceTask) and not task.mm.dead:
            with contextlib.suppress(OSError):
                mapped = mapped_files(task.mm.maps())
        event.pmu_private = self.resolve(event.attr.probe, mapped)

    def add(self, event: Event, flags: int) -> bool:
        task = event.task
        assert isinstance(task, TraceTask)
        probe: ResolvedProbe = event.pmu_private
        mm = task.mm
        returns = event.attr.probe.kind is ProbeKind.URETPROBE
        site = self._sites.get((mm, probe, returns))
        if site is None:
            site = self._sites[(mm, probe, returns)] = _Site(mm, probe, returns)
        entry = _Entry(event, bool(flags & EF_START), self.index_of.get(event.attr, 0))
        site.by_tid.setdefault(task.tid, []).append(entry)
        self._placed[event] = (site, entry)
        if not site.addrs:
            self._arm(site)
        return True

    def remove(self, event: Event, flags: int) -> None:
        placed = self._placed.pop(event, None)
        if placed is None:
            return
        site, entry = placed
        for tid, entries in list(site.by_tid.items()):
            if entry in entries:
                entries.remove(entry)
                if not entries:
                    del site.by_tid[tid]
        if site.empty():
            self._disarm(site)

    def start(self, event: Event, flags: int) -> None:
        placed = self._placed.get(event)
        if placed is not None:
            placed[1].running = True

    def stop(self, event: Event, flags: int) -> None:
        placed = self._placed.get(event)
        if placed is not None:
            placed[1].running = False

    def read(self, event: Event) -> None:
        """Counts are added at each hit; nothing to fold in."""

    def hook_task(self, event: Event, task: Task, reason: HookReason) -> None:
        """Nothing to prepare: a thread shares its parent's breakpoints, a forked child holds copies
        that add() re-owns (the tracer restores the rest), and an exec'd image is armed by add()."""

    # ---- mappings -------------------------------------------------------------------------------

    def maps_changed(self, mm: AddressSpace) -> None:
        """Arm probes whose files were just mapped in mm; forget addresses that were unmapped."""
        for (site_mm, _, _), site in list(self._sites.items()):
            if site_mm is mm:
                self._arm(site)

    def _arm(self, site: _Site) -> None:
        mm = site.mm
        if mm.dead:
            return
        try:
            maps = mm.maps()
        except OSError:
            return
        probe = site.probe
        now = set(addresses_of(maps, probe.key.dev, probe.key.ino, probe.file_offset))
        for addr in site.addrs - now:
            self.tracer.forget_mapping(mm, addr)
            site.hooks.pop(addr, None)
        for addr in sorted(now - site.addrs):
            if site.returns:
                self.tracer.return_trampoline(mm, addr)
                hook = functools.partial(self._entered, site, addr)
            else:
                hook = functools.partial(self._hit, site, addr)
            site.hooks[addr] = hook
            self.tracer.insert(mm, addr, hook)
        site.addrs = now

    def _disarm(self, site: _Site) -> None:
        for addr in site.addrs:
            hook = site.hooks.pop(addr, None)
            if hook is not None:
                self.tracer.remove(site.mm, addr, hook)
        site.addrs = set()
        self._sites.pop((site.mm, site.probe, site.returns), None)

    # ---- hits (the hot path) --------------------------------------------------------------------

    def _hit(self, site: _Site, addr: int, task: TraceTask) -> None:
        entries = site.by_tid.get(task.tid)
        if entries:
            for entry in entries:
                if entry.running:
                    event = entry.event
                    event.count += 1
                    if entry.period and event.count % entry.period == 0:
                        self._sample(entry, task, addr)

    def _entered(self, site: _Site, addr: int, task: TraceTask) -> None:
        """Entry of a function with return probes: hijack its return if anything counts it."""
        entries = site.by_tid.get(task.tid)
        if entries and any(e.running for e in entries):
            self.tracer.hijack_return(task, functools.partial(self._returned, site, addr))

    def _returned(self, site: _Site, addr: int, task: TraceTask, frame: ReturnFrame, retval: int) -> None:
        entries = site.by_tid.get(task.tid)
        if entries:
            latency = -1
            for entry in entries:
                if entry.running:
                    event = entry.event
                    event.count += 1
                    if entry.period and event.count % entry.period == 0:
                        if latency < 0:
                            latency = time.monotonic_ns() - frame.entry_ns
                        self._sample(entry, task, addr, retval, latency, RECORD_RETURN)

    def _sample(
        self,
        entry: _Entry,
        task: TraceTask,
        ip: int,
        retval: int = 0,
        latency_ns: int = -1,
        flags: int = 0,
    ) -> None:
        ring = self.ring
        if ring is None:
            return
        args = self.tracer.arguments(task, entry.nargs) if entry.nargs else ()
        ring.write(entry.index, time.monotonic_ns(), task.tid, task.pid, ip, args, retval, latency_ns, flags)


def _check_relocatable(probe: ResolvedProbe) -> None:
    """Refuse, before anything runs, a probe whose instruction cannot be executed out of line."""
    with open(probe.path, "rb") as f:
        f.seek(probe.file_offset)
        code = f.read(16)
    try:
        build_slot(code, probe.vaddr, probe.vaddr + 0x10000)
    except RelocationError as err:
        raise RelocationError(f"cannot probe {probe.description}: {err}") from None
