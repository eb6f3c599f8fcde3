"""The uprobe PMU: each event is an int3 probe at a (file, offset), run with out-of-line execution.

A probe is keyed by the file's (device, inode) and offset, as the kernel keys uprobes, so it covers
every executable mapping of that file in every traced address space; a file mapped later (dlopen,
exec) is armed when the tracer reports the mapping change. Several events on one address share one
breakpoint through the tracer's reference counting.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from pmu.core import EF_START, Task
from pmu.errors import EventSpecError, RelocationError
from pmu.events.event import Event, HookReason
from pmu.events.spec import ProbeKind, ProbeSpec
from pmu.events.symbols import ResolvedProbe, resolve_probe, resolve_target
from pmu.trace.maps import addresses_of, mapped_files
from pmu.trace.relocate import build_slot
from pmu.trace.tasks import AddressSpace
from pmu.trace.tasks import Task as TraceTask
from pmu.trace.tracer import Tracer


class _Entry:
    """One event counting on one thread at a site; `running` is what start/stop flip."""

    __slots__ = ("event", "running")

    def __init__(self, event: Event, running: bool) -> None:
        self.event = event
        self.running = running


@dataclass(eq=False)
class _Site:
    """One probe (file, offset) in one address space: the breakpoint consumer for all its addresses."""

    mm: AddressSpace
    probe: ResolvedProbe
    by_tid: dict[int, list[_Entry]] = field(default_factory=dict)
    addrs: set[int] = field(default_factory=set)

    def hit(self, task: TraceTask) -> None:
        entries = self.by_tid.get(task.tid)
        if entries:
            for entry in entries:
                if entry.running:
                    entry.event.count += 1

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
        self._sites: dict[tuple[AddressSpace, ResolvedProbe], _Site] = {}
        self._placed: dict[Event, tuple[_Site, _Entry]] = {}

    # ---- resolution -----------------------------------------------------------------------------

    def resolve(self, spec: ProbeSpec, mapped: list[str] | None = None) -> ResolvedProbe:
        """Resolve an event string to a (file, offset) once; raises PmuError with a one-line message."""
        found = self._resolved.get(spec)
        if found is None:
            if spec.kind is ProbeKind.URETPROBE:
                raise EventSpecError(f"'{spec.text}': uretprobe events are not supported yet")
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
        site = self._sites.get((mm, probe))
        if site is None:
            site = self._sites[(mm, probe)] = _Site(mm, probe)
        entry = _Entry(event, bool(flags & EF_START))
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
        for (site_mm, _), site in list(self._sites.items()):
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
        for addr in sorted(now - site.addrs):
            self.tracer.insert(mm, addr, site.hit)
        site.addrs = now

    def _disarm(self, site: _Site) -> None:
        for addr in site.addrs:
            self.tracer.remove(site.mm, addr, site.hit)
        site.addrs = set()
        self._sites.pop((site.mm, site.probe), None)


def _check_relocatable(probe: ResolvedProbe) -> None:
    """Refuse, before anything runs, a probe whose instruction cannot be executed out of line."""
    with open(probe.path, "rb") as f:
        f.seek(probe.file_offset)
        code = f.read(16)
    try:
        build_slot(code, probe.vaddr, probe.vaddr + 0x10000)
    except RelocationError as err:
        raise RelocationError(f"cannot probe {probe.description}: {err}") from None
