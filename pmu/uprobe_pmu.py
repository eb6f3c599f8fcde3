"""The uprobe PMU: each event is an int3 probe at a (file, offset), run with out-of-line execution.

A probe is keyed by the file's (device, inode) and offset, as the kernel keys uprobes, so it covers
every executable mapping of that file in every traced address space; a file mapped later (dlopen,
exec) is armed when the tracer reports the mapping change. Several events on one address share one
breakpoint through the tracer's reference counting.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pmu.core import EF_START, EF_UPDATE, Latency, PmuBase, PmuEnv, Target, Task
from pmu.errors import RelocationError, TraceError
from pmu.events.attr import EventAttr
from pmu.events.event import Event, HookReason
from pmu.events.spec import ProbeKind, ProbeSpec
from pmu.events.symbols import ResolvedProbe, function_extent, resolve_probe, resolve_target
from pmu.events.usdt import UsdtArg
from pmu.trace import ptrace_ops as pt
from pmu.trace.guard import NFRAMES
from pmu.trace.maps import addresses_of, mapped_files
from pmu.trace.patches import ReturnSpec
from pmu.trace.patchsafety import PatchPlan, PatchRefused, Refusal, check_jump_patch
from pmu.trace.relocate import build_slot
from pmu.trace.tasks import AddressSpace, JumpPatch, ReturnArea, ReturnFrame, TaskState
from pmu.trace.tasks import Task as TraceTask
from pmu.trace.tracer import Tracer
from pmu.uprobe_records import TrampolineRecords

if TYPE_CHECKING:
    from pmu.hits import Hits
    from pmu.ring import Ring

RECORD_RETURN = 1
"""Bit 0 of a ring record's flags: the record is a function return (see pmu/ring.py)."""


class _Entry:
    """One event counting on one thread at a site; `running` is what start/stop flip."""

    __slots__ = ("event", "running", "index", "period", "nargs", "key", "seen")

    def __init__(self, event: Event, running: bool, index: int) -> None:
        self.event = event
        self.running = running
        self.index = index
        """The event's index in the ring's records (its evsel's position)."""
        self.period = event.attr.sample_period
        self.nargs = event.attr.sample_args
        self.key = 0
        """For a jump-optimized site: the FS base whose counter rows `seen` refers to (0: none yet)."""
        self.seen = 0
        """For a jump-optimized site: the thread's counter value already added to the event."""


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
    optimize: bool = False
    """Try jump patches; addresses that refuse fall back to int3."""
    record: tuple[int, int, int] | None = None
    """(event index, args, period) when the site's trampolines also record hits into the process's ring."""
    plain: str | None = None
    """Why the site was not even tried with a jump patch although optimization is on."""
    jumps: dict[int, JumpPatch] = field(default_factory=dict)
    """Addresses served by a jump patch, counting in the address space's counter area."""
    reason: str | None = None
    """Why (the last address of) this site uses int3 although optimization was asked for."""
    attributed: int = 0
    """Hits of the jump patches already given to entries."""
    columns: set[int] = field(default_factory=set)
    """Counter columns of every jump patch the site has had (an unmapped library's keep their counts)."""
    latency: bool = False
    """A return site served in the process keeps a latency histogram there (--latency)."""
    vaddrs: dict[int, int] = field(default_factory=dict)
    """The file's vaddr of each address (a USDT probe has several sites)."""
    semaphores: set[int] = field(default_factory=set)
    """Addresses of the USDT semaphores this site holds incremented in its address space."""

    def empty(self) -> bool:
        return not any(self.by_tid.values())


class UprobePmu(PmuBase):
    """int3 uprobes with out-of-line execution of the displaced instruction: one stop per hit."""

    name = "uprobe"
    slots: int | None = None
    needs_tracer = True

    def __init__(self, tracer: Tracer, exe: str | None = None, optimize: bool = True) -> None:
        self.tracer = tracer
        self.exe = exe
        self.optimize = optimize and _has_fsgsbase()
        """Count with jump patches where safe (needs rdfsbase to tell threads apart)."""
        self._vforks: dict[int, tuple[AddressSpace, int, int, np.ndarray]] = {}
        """vfork children still in their parent's memory: (mm, parent tid, FS base, row at vfork)."""
        self._how: dict[tuple[ResolvedProbe, ProbeKind], str] = {}
        """How each probe was served (for -v), kept after the run."""
        self._latency: dict[EventAttr, Latency] = {}
        """The latencies of each return probe with --latency, by attr (its inherited copies in one)."""
        self._armed: set[ResolvedProbe] = set()
        """Probes armed at some address of some traced process during the run."""
        self._mapped: set[str] = set()
        """Files mapped executable by processes where a probe found no address (for `warnings`)."""
        self._probes: dict[EventAttr, ResolvedProbe] = {}
        self._lost: dict[ResolvedProbe, int] = {}
        """Frames of each return probe left without returning (longjmp, an exception), for -v."""
        tracer.on_frame_lost = self._frame_lost
        tracer.on_skipped_entry = self._skipped
        self._ret_sites: dict[tuple[AddressSpace, int], tuple[_Site, int]] = {}
        """Return sites served in a process, by (address space, index): (site, address)."""
        self._resolved: dict[ProbeSpec, ResolvedProbe] = {}
        self._checked: list[EventAttr] = []
        self._inproc: dict[tuple[int, int], tuple[ResolvedProbe, ReturnArea, int]] = {}
        """Return sites served in a process: (id of its return area, index) -> (probe, area, index)."""
        self._sites: dict[tuple[AddressSpace, ResolvedProbe, bool], _Site] = {}
        self._placed: dict[Event, tuple[_Site, _Entry]] = {}
        self.ring: Ring | None = None
        self.records: TrampolineRecords | None = None
        """The tracee rings of a recording run (set_ring)."""
        self._only_tids: dict[int, set[int]] = {}
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

    def event_check(self, attr: EventAttr, target: Target) -> None:
        """Resolve the probe before anything runs (against the launched or attached program)."""
        if target.exe and not self.exe:
            self.exe = target.exe
        self._only_tids.update(target.only_tids)
        self.resolve(attr.probe, target.mapped)
        self._checked.append(attr)

    def set_ring(self, ring: Ring, index_of: dict[EventAttr, int]) -> None:
        """int3 hits are recorded into `ring`; jump patches record into rings in the traced processes,
        which `records` drains."""
        self.ring = ring
        self.index_of = dict(index_of)
        nargs = max((a.sample_args for a in index_of), default=0)
        self.records = TrampolineRecords(self.tracer, ring, nargs)
        self.records.only_tids = self._only_tids

    def samples(self, sink: Callable[[Hits], None], final: bool = False) -> None:
        if self.records is not None:
            self.records.take(sink, final)

    def lost(self) -> dict[int, int]:
        return self.records.lost_per_event() if self.records is not None else {}

    def time_error_ns(self) -> int:
        return self.records.clock_error_ns() if self.records is not None else 0

    def flush(self) -> None:
        """The run is over (its records drained): the tracee rings are closed."""
        if self.records is not None:
            self.records.close()

    def event_init(self, event: Event) -> None:
        mapped: list[str] = []
        task = event.task
        if isinstance(task, TraceTask) and not task.mm.dead:
            with contextlib.suppress(OSError):
                mapped = mapped_files(task.mm.maps())
        event.pmu_private = self.resolve(event.attr.probe, mapped)
        self._probes.setdefault(event.attr, event.pmu_private)

    def add(self, event: Event, flags: int) -> bool:
        task = event.task
        assert isinstance(task, TraceTask)
        probe: ResolvedProbe = event.pmu_private
        mm = task.mm
        returns = event.attr.probe.kind is ProbeKind.URETPROBE
        site = self._sites.get((mm, probe, returns))
        if site is None:
            site = self._sites[(mm, probe, returns)] = self._new_site(mm, probe, returns, event)
        entry = _Entry(event, bool(flags & EF_START), self.index_of.get(event.attr, 0))
        site.by_tid.setdefault(task.tid, []).append(entry)
        self._placed[event] = (site, entry)
        if not site.addrs:
            self._arm(site)
        return True

    def _new_site(self, mm: AddressSpace, probe: ResolvedProbe, returns: bool, event: Event) -> _Site:
        """A site, optimized if it can be: counting, or recording every hit of one event."""
        site = _Site(mm, probe, returns)
        period = event.attr.sample_period
        if not self.optimize:
            return site
        if period and self.ring is None:
            site.plain = "sampling without a ring"
        elif period >= 1 << 32:
            site.plain = "a period of 2**32 or more uses int3"
        elif period and self._events_on(probe) > 1:
            site.plain = "several events record this probe"
        elif period and probe.usdt_args and event.attr.sample_args:
            site.plain = "USDT arguments are read at a stop"
        elif returns and event.attr.sample_args > 6:
            site.plain = "more than 6 arguments"
        else:
            site.optimize = True
            if period:
                site.record = (self.index_of.get(event.attr, 0), event.attr.sample_args, period)
                if returns and self.records is not None:
                    self.records.returns = True  # its records carry retval, latency and flags
            if returns:
                site.latency = any(a.latency for a in self._checked if self._resolved.get(a.probe) == probe)
        return site

    def _events_on(self, probe: ResolvedProbe) -> int:
        return sum(1 for attr in self.index_of if self._resolved.get(attr.probe) == probe)

    def remove(self, event: Event, flags: int) -> None:
        placed = self._placed.pop(event, None)
        if placed is None:
            return
        site, entry = placed
        if site.columns:
            self._harvest(site, entry)
        for tid, entries in list(site.by_tid.items()):
            if entry in entries:
                entries.remove(entry)
                if not entries:
                    del site.by_tid[tid]
        if site.empty():
            if site.columns:
                leftover = self._unattributed(site)
                if leftover > 0:  # hits of threads we could not name go to the last event standing
                    entry.event.count += leftover
                    site.attributed += leftover
            self._disarm(site)

    def start(self, event: Event, flags: int) -> None:
        placed = self._placed.get(event)
        if placed is not None:
            placed[1].running = True
            self._set_enabled(placed[0])

    def stop(self, event: Event, flags: int) -> None:
        placed = self._placed.get(event)
        if placed is not None:
            if placed[0].columns and flags & EF_UPDATE:
                self._harvest(placed[0], placed[1])
            placed[1].running = False
            self._set_enabled(placed[0])

    def read(self, event: Event) -> None:
        """int3 hits are added as they happen; a jump patch's are folded in from the counter area."""
        placed = self._placed.get(event)
        if placed is not None and placed[0].columns:
            self._harvest(placed[0], placed[1])

    def hook_task(self, event: Event, task: Task, reason: HookReason) -> None:
        """Nothing to prepare: a thread shares its parent's breakpoints, a forked child holds copies
        that add() re-owns (the tracer restores the rest), and an exec'd image is armed by add()."""

    # ---- mappings -------------------------------------------------------------------------------

    def awaits_mappings(self, mm: AddressSpace) -> bool:
        """Some probe of mm has no mapping of its file yet (a library to be dlopen'd)."""
        return any(site_mm is mm and not site.addrs for (site_mm, _, _), site in self._sites.items())

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
        now: set[int] = set()
        for offset, vaddr in probe.offsets():
            for addr in addresses_of(maps, probe.key.dev, probe.key.ino, offset):
                now.add(addr)
                site.vaddrs[addr] = vaddr
        if now:
            self._armed.add(probe)
        if probe.semaphore:
            self._hold_semaphores(site, now)
        else:
            self._mapped.update(m.path for m in maps if m.executable and m.path.startswith("/"))
        for addr in site.addrs - now:
            self.tracer.forget_mapping(mm, addr)
            site.hooks.pop(addr, None)
        for addr in site.addrs - now:
            site.jumps.pop(addr, None)
        for addr in sorted(now - site.addrs):
            if site.optimize:
                try:
                    site.jumps[addr] = self._jump_patch(site, addr)
                    site.columns.add(site.jumps[addr].column)
                    self._note_inprocess(site, site.jumps[addr])
                    self._set_enabled(site)
                    continue
                except (RelocationError, TraceError) as err:
                    site.reason = err.message  # e.g. no room for a counter area: int3 serves instead
            if site.returns:
                self.tracer.return_trampoline(mm, addr)
                hook = functools.partial(self._entered, site, addr)
            else:
                hook = functools.partial(self._hit, site, addr)
            site.hooks[addr] = hook
            self.tracer.insert(mm, addr, hook)
        site.addrs = now
        if now:
            self._note_how(site)

    def _hold_semaphores(self, site: _Site, now: set[int]) -> None:
        """A USDT probe's semaphore is held incremented wherever its file is mapped (the program then
        computes the probe's arguments and reaches its sites), and given back when it is not."""
        want = {addr - site.vaddrs[addr] + site.probe.semaphore for addr in now}
        for sem in want - site.semaphores:
            self.tracer.semaphore_hold(site.mm, sem)
        for sem in site.semaphores - want:
            self.tracer.semaphore_release(site.mm, sem)
        site.semaphores = want

    def _disarm(self, site: _Site) -> None:
        for sem in site.semaphores:
            self.tracer.semaphore_release(site.mm, sem)
        site.semaphores = set()
        for addr in list(site.jumps):
            self.tracer.unpatch(site.mm, addr, site.returns)
        site.jumps.clear()
        for addr in site.addrs:
            hook = site.hooks.pop(addr, None)
            if hook is not None:
                self.tracer.remove(site.mm, addr, hook)
        site.addrs = set()
        self._sites.pop((site.mm, site.probe, site.returns), None)

    # ---- jump-optimized sites --------------------------------------------------------------------

    def _jump_patch(self, site: _Site, addr: int) -> JumpPatch:
        plan = jump_plan(site.probe, addr, site.vaddrs.get(addr))
        on = any(e.running for entries in site.by_tid.values() for e in entries)
        returns = ReturnSpec(site.latency) if site.returns else None
        return self.tracer.jump_patch(site.mm, addr, plan, site.record, on, returns)

    def _note_inprocess(self, site: _Site, patch: JumpPatch) -> None:
        """Remember where a return site served in the process keeps its lost and skipped counts and its
        latencies (the return area stays readable after the process is gone)."""
        rp = site.mm.returns
        if patch.ret >= 0 and rp is not None:
            self._inproc[(id(rp.area), patch.ret)] = (site.probe, rp.area, patch.ret)
            self._ret_sites[(site.mm, patch.ret)] = (site, patch.addr)

    def _inprocess(self, probe: ResolvedProbe) -> list[tuple[ReturnArea, int]]:
        return [(area, ret) for p, area, ret in self._inproc.values() if p == probe]

    def _set_enabled(self, site: _Site) -> None:
        area = site.mm.counters
        if area is None or not site.jumps:
            return
        on = any(e.running for entries in site.by_tid.values() for e in entries)
        for patch in site.jumps.values():
            area.set_enabled(patch.column, on)

    def _unattributed(self, site: _Site) -> int:
        """Hits of the site's jump patches by threads pmu cannot name: rows whose FS base belongs to no
        traced thread (a thread killed before we saw its TLS), and misses (no TLS yet, table full).
        Rows of known threads that count nothing (another thread's -t) are left out on purpose."""
        area = site.mm.counters
        if area is None:
            return 0
        known = {t.fs_base for t in site.mm.tasks if t.fs_base} | {0}
        return area.unowned(known, site.columns)

    def _harvest(self, site: _Site, entry: _Entry) -> None:
        """Fold the hits counted for the entry's thread since the last harvest into its event.

        A thread's hits are in the rows keyed by its FS base (several rows if it claimed a free row
        before reaching its own, after pmu freed one on the way). A key two live threads share (a
        thread cloned without a TLS of its own) is read by the one with the lowest tid only, so every
        hit is counted once. A thread whose FS base changed (arch_prctl) first gets what its old key
        gained, then counts from its new key's rows."""
        area = site.mm.counters
        task = entry.event.task
        if area is None or not isinstance(task, TraceTask) or task.tid in self._vforks:
            return  # a vfork child's hits are in its parent's row: vfork_done gives them
        fs = self.tracer.fs_base(task)
        if not fs or _owner_of(task, fs) is not task:
            return
        if entry.key != fs:
            if entry.key and _owner_of(task, entry.key) is task:
                self._add(site, entry, int(sum(area.row(entry.key)[c] for c in site.columns)))
            entry.key, entry.seen = fs, 0
        self._add(site, entry, int(sum(area.row(fs)[c] for c in site.columns)))

    @staticmethod
    def _add(site: _Site, entry: _Entry, value: int) -> None:
        delta = value - entry.seen
        if delta > 0:
            entry.event.count += delta
            site.attributed += delta
        entry.seen = value

    def task_vforked(self, parent: Task, child: Task) -> None:
        """A vfork child runs in its parent's memory, with the parent's TLS, until it execs or exits: its
        jump-patch hits land in the parent thread's row. Remember the row as it is now."""
        assert isinstance(parent, TraceTask)
        if self.records is not None:
            self.records.vforked(parent, child)
        area = parent.mm.counters
        if area is None:
            return
        fs = self.tracer.fs_base(parent)
        self._vforks[child.tid] = (parent.mm, parent.tid, fs, area.row(fs))

    def task_vfork_done(self, child: Task) -> None:
        """The vfork child leaves its parent's memory: what the parent's row gained meanwhile is the
        child's (the parent was suspended), so it goes to the child's events, not the parent's."""
        if self.records is not None:
            self.records.vfork_done(child)
        found = self._vforks.pop(child.tid, None)
        if found is None:
            return
        mm, parent_tid, fs, before = found
        if mm.counters is None:
            return
        now = mm.counters.row(fs)
        before = np.pad(before, (0, len(now) - len(before)))  # a bank made meanwhile started at zero
        gained = now - before
        for (site_mm, _, _), site in self._sites.items():
            if site_mm is not mm or not site.columns:
                continue
            hits = int(sum(gained[c] for c in site.columns))
            for entry in site.by_tid.get(parent_tid, ()):
                if entry.key != fs:
                    entry.key, entry.seen = fs, 0
                entry.seen += hits
            for entry in site.by_tid.get(child.tid, ()):
                entry.event.count += hits
                entry.key = fs
                entry.seen = int(sum(now[c] for c in site.columns))  # the row is not its own
                site.attributed += hits

    def task_exited(self, task: Task) -> None:
        """A thread is gone (its events already harvested): give its counter rows back for reuse, so a
        thread that gets the same FS base later (glibc reuses a finished thread's TLS) starts from zero.
        Not a vfork child's (the rows are its parent's), nor a key another live thread owns."""
        assert isinstance(task, TraceTask)
        area = task.mm.counters
        fs = task.fs_base
        if area is None or not fs or task.pid != task.mm.pid:
            return
        if _owner_of(task, fs) is not task:
            return
        area.free_rows(fs)

    def describe(self, event: Event) -> str:
        """How the event's probe is served, for -v: a jump patch, or int3 and why not a jump; for a
        return probe, how many entries never returned (their frames left by longjmp or an exception:
        the entries are the returns counted plus these)."""
        kind = event.attr.probe.kind
        kind = ProbeKind.UPROBE if kind is ProbeKind.USDT else kind
        how = self._how.get((event.pmu_private, kind), "not armed")
        lost = 0
        if event.attr.probe.kind is ProbeKind.URETPROBE:
            lost = self._lost.get(event.pmu_private, 0)
            lost += sum(area.lost(ret) for area, ret in self._inprocess(event.pmu_private))
            served = sum(area.skipped(ret) for area, ret in self._inprocess(event.pmu_private))
            if served:
                how += (
                    f"; {served:,} call{'s' if served > 1 else ''} served by ptrace (no room in the process:"
                    " deeper than its shadow stack, a thread with no TLS or no free row, a shared FS base)"
                )
        if lost:
            how += f"; {lost:,} frame{'s' if lost > 1 else ''} left without returning (longjmp, an exception)"
        return how

    def warnings(self) -> list[str]:
        """A probe armed nowhere in the whole run (perf prints a silent 0 there): one line each, naming
        what the processes mapped instead under the file's name (a pyenv build's own libpython, say)."""
        out = []
        for attr, probe in self._probes.items():
            if probe in self._armed:
                continue
            stem = os.path.basename(probe.path).split(".so")[0]
            alike = sorted(
                p for p in self._mapped if os.path.basename(p).startswith(stem) and p != probe.path
            )
            instead = f"; they mapped {', '.join(alike)} instead" if alike else ""
            out.append(f"{attr.name}: never armed: no traced process mapped {probe.path}{instead}")
        for attr, probe in self._probes.items():
            if probe.resolver:
                out.append(
                    f"{attr.name}: an IFUNC: counted at the implementation its resolver picks on this CPU"
                    f" ({probe.description}), as the program calls it; its resolver is at {probe.resolver:#x}"
                )
            elif probe.ifunc and not probe.sym_offset:
                out.append(
                    f"{attr.name}: an IFUNC: this probes its resolver, which runs once when the symbol is"
                    " bound (pmu could not tell which implementation it picks: probe that by address)"
                )
        skipped = self.tracer.unguarded_returns
        if skipped:
            out.append(
                f"{skipped:,} return{'s' if skipped > 1 else ''} not probed: more frames were live at once"
                f" than the trap guard can restore should pmu die ({NFRAMES:,} a process)"
            )
        return out

    def latency(self, attr: EventAttr) -> Latency | None:
        """The Python side's latencies (int3 returns) and the histograms kept in the processes."""
        if not attr.latency:
            return None
        mine = self._latency.get(attr, Latency())
        out = Latency(list(mine.buckets), mine.total_ns)
        probe = self._probes.get(attr)
        if probe is not None:
            for area, ret in self._inprocess(probe):
                buckets, total = area.histogram(ret)
                for bits, n in enumerate(buckets):
                    out.buckets[bits] += int(n)
                out.total_ns += total
        return out

    def _frame_lost(self, frame: ReturnFrame) -> None:
        handler = frame.handler
        if isinstance(handler, functools.partial) and handler.func == self._returned:
            probe = handler.args[0].probe
            self._lost[probe] = self._lost.get(probe, 0) + 1

    def _note_how(self, site: _Site) -> None:
        if site.jumps and not (site.addrs - set(site.jumps)):
            what = "counted and recorded" if site.record else "counted"
            if site.returns:
                what = "returns " + what + (", latency" if site.latency else "")
            how = f"optimized (jump patch, {what} in the process)"
        elif not self.optimize:
            how = "int3"
        elif site.plain:
            how = f"int3 ({site.plain})"
        elif site.reason:
            how = f"int3 (not optimized: {site.reason})"
        else:
            how = "int3"
        kind = ProbeKind.URETPROBE if site.returns else ProbeKind.UPROBE
        self._how[(site.probe, kind)] = how

    # ---- hits (the hot path) --------------------------------------------------------------------

    def _hit(self, site: _Site, addr: int, task: TraceTask) -> None:
        entries = site.by_tid.get(task.tid)
        if entries:
            for entry in entries:
                if entry.running:
                    event = entry.event
                    event.count += 1
                    if entry.period and event.count % entry.period == 0:
                        self._sample(entry, task, addr, site=site)

    def _entered(
        self,
        site: _Site,
        addr: int,
        task: TraceTask,
        slot: int | None = None,
        registers: tuple[int, ...] | None = None,
    ) -> None:
        """Entry of a function with return probes: hijack its return if anything counts it. At the
        entry's int3 its slot is RSP and its arguments the registers; at the return blob's skip trap
        (`_skipped`) both are where the blob keeps them."""
        entries = site.by_tid.get(task.tid)
        if entries and any(e.running for e in entries):
            # --args of a return probe: the function's arguments, as they are at its entry
            nargs = max((e.nargs for e in entries if e.running and e.period), default=0)
            if registers is not None:
                args = registers[:nargs]
            else:
                args = self.tracer.arguments(task, nargs) if nargs else ()
            handler = functools.partial(self._returned, site, addr, args)
            self.tracer.hijack_return(task, handler, rsp=slot)

    def _usdt_args(self, site: _Site, addr: int, task: TraceTask, n: int) -> tuple[int, ...]:
        """The first n arguments of a USDT probe at its site, from the thread's registers and memory."""
        regs = pt.get_regs(task.tid)
        bias = addr - site.vaddrs.get(addr, site.probe.vaddr)
        return tuple(_usdt_value(a, regs, site.mm, bias) for a in site.probe.usdt_args[:n])

    def _skipped(self, task: TraceTask, ret: int, slot: int, args: tuple[int, ...]) -> None:
        """An entry the return blob left to ptrace (no shadow row, too deep, a shared FS base): the
        return is hijacked by the int3 path, as `_entered` does."""
        found = self._ret_sites.get((task.mm, ret))
        if found is None:
            return
        site, addr = found
        self._entered(site, addr, task, slot, args)

    def _returned(
        self,
        site: _Site,
        addr: int,
        args: tuple[int, ...],
        task: TraceTask,
        frame: ReturnFrame,
        retval: int,
    ) -> None:
        if task.mm is not site.mm:  # a frame hijacked before a fork, returning in the child
            site = self._sites.get((task.mm, site.probe, True), site)
        entries = site.by_tid.get(task.tid)
        if entries:
            latency = -1
            for entry in entries:
                if entry.running:
                    event = entry.event
                    event.count += 1
                    if event.attr.latency:
                        if latency < 0:
                            latency = time.monotonic_ns() - frame.entry_ns
                        self._latency.setdefault(event.attr, Latency()).add(latency)
                    if entry.period and event.count % entry.period == 0:
                        if latency < 0:
                            latency = time.monotonic_ns() - frame.entry_ns
                        self._sample(entry, task, addr, retval, latency, RECORD_RETURN, args)

    def _sample(
        self,
        entry: _Entry,
        task: TraceTask,
        ip: int,
        retval: int = 0,
        latency_ns: int = -1,
        flags: int = 0,
        at_entry: tuple[int, ...] | None = None,
        site: _Site | None = None,
    ) -> None:
        """Record a hit; its arguments are the registers now, a USDT probe's operands (`site`), or
        `at_entry` (a return probe's)."""
        ring = self.ring
        if ring is None:
            return
        if at_entry is not None:
            args = at_entry[: entry.nargs]
        elif entry.nargs and site is not None and site.probe.usdt_args:
            args = self._usdt_args(site, ip, task, entry.nargs)
        else:
            args = self.tracer.arguments(task, entry.nargs) if entry.nargs else ()
        ring.write(entry.index, time.monotonic_ns(), task.tid, task.pid, ip, args, retval, latency_ns, flags)


def _usdt_value(arg: UsdtArg, regs: object, mm: AddressSpace, bias: int) -> int:
    def read(addr: int, size: int) -> bytes | None:
        try:
            return mm.read(addr, size)
        except OSError:
            return None  # never a fault in the program: an unreadable operand reads as 0

    return arg.value(regs, read, bias)


def jump_plan(probe: ResolvedProbe, addr: int | None = None, vaddr: int | None = None) -> PatchPlan:
    """Whether the probe's site at file address `vaddr` (default: its first), mapped at `addr` (default:
    the file's own address), takes a jump patch: its plan, or PatchRefused / RelocationError saying
    why not (`pmu list -v` asks the same)."""
    vaddr = probe.vaddr if vaddr is None else vaddr
    extent = function_extent(probe.path, vaddr)
    if extent is None:
        raise RelocationError("the probe is not inside a function symbol")
    addr = vaddr if addr is None else addr
    start = addr - (vaddr - extent.start)
    shift = start - extent.start  # from the file's addresses to the mapped ones
    plan = check_jump_patch(
        extent.code,
        start,
        extent.size,
        addr,
        known_entries=[e + shift for e in extent.entries],
        read=lambda at, n: extent.read(at - shift, n),
        pointed=lambda lo, hi: extent.pointed(lo - shift, hi - shift),
    )
    foreign = extent.foreign(vaddr, vaddr + plan.length)
    if foreign is not None:
        source, target = foreign
        raise PatchRefused(
            addr,
            Refusal.BRANCH_INTO_PATCH,
            f"a branch at {source:#x}, outside the function, lands at {target:#x}, inside the patched bytes",
        )
    return plan


def _owner_of(task: TraceTask, fs: int) -> TraceTask:
    """The live thread of task's process whose counts the rows keyed by FS base fs are: the lowest tid
    among those with that FS base (task itself if it has it alone)."""
    owner = task
    for t in task.mm.tasks:
        if (
            t.fs_base == fs
            and t.pid == task.pid
            and t.tid < owner.tid
            and t.state not in (TaskState.EXITING, TaskState.EXITED)
        ):
            owner = t
    return owner


def _check_relocatable(probe: ResolvedProbe) -> None:
    """Refuse, before anything runs, a probe whose instruction cannot be executed out of line."""
    with open(probe.path, "rb") as f:
        f.seek(probe.file_offset)
        code = f.read(16)
    try:
        build_slot(code, probe.vaddr, probe.vaddr + 0x10000)
    except RelocationError as err:
        raise RelocationError(f"cannot probe {probe.description}: {err}") from None


def _has_fsgsbase() -> bool:
    """rdfsbase works in user space (Linux 5.9+ on a CPU with FSGSBASE): AT_HWCAP2 bit 1."""
    import struct

    try:
        with open("/proc/self/auxv", "rb") as f:
            data = f.read()
    except OSError:
        return False
    for key, value in struct.iter_unpack("<QQ", data):
        if key == 26:  # AT_HWCAP2
            return bool(value & 2)
    return False


def factory(env: PmuEnv) -> UprobePmu:
    """The registry's constructor (pmu.core.REGISTRY["uprobe"])."""
    if env.tracer is None:
        raise TraceError("the uprobe PMU needs the ptrace engine")
    assert isinstance(env.tracer, Tracer)
    return UprobePmu(env.tracer, optimize=env.optimize)
