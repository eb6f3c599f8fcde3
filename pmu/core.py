"""The Pmu Protocol: the operations every probe backend offers the scheduler, with their contract.

This is `struct pmu` for pmu. The scheduler (pmu/sched/) is the only caller; a backend never changes
an Event's state itself, it only arms and disarms its hardware (breakpoints, trampolines) and counts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pmu.errors import EventSpecError
from pmu.events.attr import EventAttr
from pmu.events.event import Event, HookReason

if TYPE_CHECKING:
    from pmu.hits import Hits
    from pmu.ring import Ring

# Flags for Pmu.add, as PERF_EF_START.
EF_START = 1
"""add(): start counting immediately; without it the event is added stopped."""

# Flags for Pmu.stop, as PERF_EF_UPDATE.
EF_UPDATE = 2
"""stop(): bring event.count up to date before stopping."""

# Flag for Pmu.remove (pmu's own): the event is removed because its task is exiting.
EF_EXIT = 4
"""remove(): the task is exiting (a kernel counter keeps counting the rest of the exit until flush)."""


@runtime_checkable
class Task(Protocol):
    """What the scheduler and the PMUs know of a traced thread (the tracer's Task satisfies this)."""

    @property
    def tid(self) -> int:
        """Thread id."""
        ...

    @property
    def pid(self) -> int:
        """Thread-group id (the process)."""
        ...

    @property
    def comm(self) -> str:
        """Command name, as /proc/TID/comm."""
        ...


# Two more things a task may say about itself, read with getattr by the backends that care:
#   cpu: int           -- a CPU context of a system-wide run (pmu stat -a): tid is -1 - cpu, pid -1.
#   exec_pending: bool -- a launched command that has not reached its exec yet (the untraced launcher):
#                         a kernel counter opened on it starts at the exec, as perf's enable_on_exec.


@dataclass(frozen=True)
class Target:
    """What event_check resolves an event against, before anything runs."""

    exe: str | None = None
    """The launched command's executable (events without a TARGET name it), or an attached process's."""
    mapped: list[str] = field(default_factory=list)
    """Files an attached process maps (library short names resolve against them first)."""
    system_wide: bool = False
    """The events count on CPUs (pmu stat -a), not on tasks."""
    only_tids: dict[int, set[int]] = field(default_factory=dict)
    """With -t: {pid: the only threads of it that count} (a backend whose probes count every thread of
    a process, such as the uprobe PMU's trampolines, leaves the others' records out)."""


class Pmu(Protocol):
    """A backend's operations. Every call is made by the scheduler, from the tracer's thread."""

    name: str
    """Event type prefix this PMU serves (`uprobe`)."""

    slots: int | None
    """How many events one task context may have ACTIVE on this PMU at once (None: no limit).
    With fewer slots than events the scheduler multiplexes (rotates) them."""

    def event_init(self, event: Event) -> None:
        """Validate and resolve a newly opened event (files, symbols, instruction boundaries).

        Called once per user-opened event, before any add(); not called for inherited events, which
        share their parent's resolution (event.pmu_private is copied by the scheduler).
        Raises PmuError (one line) if the event cannot work; nothing is armed yet at this point.
        """
        ...

    def add(self, event: Event, flags: int) -> bool:
        """Put the event on its task: arm whatever it needs in the task's address space.

        Called when the event's context is scheduled in and the event is enabled. With EF_START the
        event counts at once; without it, it stays stopped until start(). Returns False if the PMU has
        no room (the scheduler then leaves the event INACTIVE and multiplexes); raises PmuError for a
        hard failure (the scheduler puts the event in ERROR). A probe whose file is not mapped yet is
        armed when it is mapped; add() still succeeds.
        """
        ...

    def remove(self, event: Event, flags: int) -> None:
        """Take the event off its task: stop it (updating its count) and disarm what only it used.

        Every add() is matched by one remove() before the event's task is forgotten. Breakpoints shared
        with other events stay until their last user is removed. Must not fail on a task that exited.
        At exec, remove() is called after the new image replaced the old one: the PMU must drop its
        bookkeeping for the old address space and write nothing into the new one.
        """
        ...

    def start(self, event: Event, flags: int) -> None:
        """Start counting an added event (hits from now on are counted)."""
        ...

    def stop(self, event: Event, flags: int) -> None:
        """Stop counting an added event; with EF_UPDATE bring event.count up to date first."""
        ...

    def read(self, event: Event) -> None:
        """Bring event.count up to date (backends that count in shared memory fold it in here)."""
        ...

    def hook_task(self, event: Event, task: Task, reason: HookReason) -> None:
        """A task came from, or replaced, the task of one of this PMU's events.

        CLONE/FORK: `event` is the new task's inherited child event, already in the child's context
        but not yet added; the PMU prepares the child (for FORK: the child holds a copy of every
        breakpoint byte of the parent's address space). EXEC: `event` is an event of the exec'ing
        task; the old image and its breakpoints are gone, and the PMU re-resolves the event's probe
        against the new image before the scheduler adds it again. Called before add().
        """
        ...

    # ---- what else a backend hears: lifecycle beyond hook_task, before and after the run ------------

    keeps_time: bool
    """The backend sets its events' time_enabled/time_running itself, with their counts (a kernel
    counter's times are the kernel's); otherwise the scheduler keeps them from the events' states."""

    needs_tracer: bool
    """Its events need their tasks traced by pmu's ptrace engine (breakpoints, stops). A run whose
    events all say False launches its command untraced, as perf stat does."""

    def event_check(self, attr: EventAttr, target: Target) -> None:
        """Check and resolve an event before anything runs (every bad event is reported before the
        command starts). Raises PmuError (one line)."""
        ...

    def task_vforked(self, parent: Task, child: Task) -> None:
        """`child` was vforked by `parent` and runs in its memory until it execs or exits (called
        before the scheduler's task_fork for it)."""
        ...

    def task_vfork_done(self, child: Task) -> None:
        """A vfork child left its parent's memory (exec or exit); no-op for any other task."""
        ...

    def task_exited(self, task: Task) -> None:
        """`task` exited, after the scheduler removed its events: drop what the backend kept for it."""
        ...

    def maps_changed(self, space: Any) -> None:
        """Files may have been mapped or unmapped in an address space (exec, dlopen, dlclose)."""
        ...

    def awaits_mappings(self, space: Any) -> bool:
        """Whether one of the backend's probes in that address space waits for its file to be mapped."""
        ...

    def set_ring(self, ring: Ring, index_of: dict[EventAttr, int]) -> None:
        """Sampling events write their records into `ring`; index_of gives each attr's event index."""
        ...

    def describe(self, event: Event) -> str:
        """How the event is served, for -v (one line)."""
        ...

    def samples(self, sink: Callable[[Hits], None], final: bool = False) -> None:
        """Give `sink` the sample records the backend's own rings took since the last call (the uprobe
        PMU's rings in traced processes, a kernel counter's mmap ring), in batches; nothing for a
        backend whose records all go to the ring of set_ring. A batch may be a view of a buffer the
        backend reuses: the sink takes what it needs before it returns. final: no producer is left,
        take everything. The evlist drains every backend with final before flush, and once more
        after it (for what a flush read last)."""
        ...

    def lost(self) -> dict[int, int]:
        """{event index: records its own rings lost} so far ({} for one that has no rings)."""
        ...

    def time_error_ns(self) -> int:
        """The stated error of its records' times (a TSC calibration's), 0 for exact ones."""
        ...

    def supported(self, event: Event) -> bool:
        """False when the machine cannot count this event at all (a hardware event without a hardware
        PMU): the output says `<not supported>`, as perf's, rather than failing the run."""
        ...

    def warnings(self) -> list[str]:
        """Lines to print after the run (without "pmu: "): what the user must know of an event that
        counted nothing for a reason the backend can name (a probe armed nowhere)."""
        ...

    def latency(self, attr: EventAttr) -> Latency | None:
        """The latencies of a return probe's calls with attr.latency (its inherited copies' included), or
        None when the backend keeps none."""
        ...

    def flush(self) -> None:
        """The run is over and every event removed: bring counts that the backend could still update
        (a kernel counter of a task that was exiting) to their final value, and release everything."""
        ...


@dataclass
class Latency:
    """A log2 histogram of call latencies: buckets[b] counts the calls of b-bit nanoseconds (2**(b-1) to
    2**b - 1; bucket 0 is 0 ns), kept per call without a record; plus their exact sum, for the mean."""

    buckets: list[int] = field(default_factory=lambda: [0] * 65)
    total_ns: int = 0

    def add(self, ns: int) -> None:
        ns = max(ns, 0)
        self.buckets[min(ns.bit_length(), 64)] += 1
        self.total_ns += ns

    @property
    def calls(self) -> int:
        return sum(self.buckets)

    def percentile(self, q: float) -> int:
        """An upper bound of the q-th percentile (0 < q <= 100): the top of the bucket it falls in."""
        rank = q / 100 * self.calls
        seen = 0
        for bits, n in enumerate(self.buckets):
            seen += n
            if n and seen >= rank:
                return (1 << bits) - 1
        return 0


class PmuBase:
    """Defaults for the optional operations, so that a backend writes only what it uses."""

    name = "base"
    slots: int | None = None
    needs_tracer = False
    keeps_time = False

    def event_check(self, attr: EventAttr, target: Target) -> None:
        return None

    def start(self, event: Event, flags: int) -> None:
        return None

    def stop(self, event: Event, flags: int) -> None:
        return None

    def read(self, event: Event) -> None:
        return None

    def hook_task(self, event: Event, task: Task, reason: HookReason) -> None:
        return None

    def task_vforked(self, parent: Task, child: Task) -> None:
        return None

    def task_vfork_done(self, child: Task) -> None:
        return None

    def task_exited(self, task: Task) -> None:
        return None

    def maps_changed(self, space: Any) -> None:
        return None

    def awaits_mappings(self, space: Any) -> bool:
        return False

    def set_ring(self, ring: Ring, index_of: dict[EventAttr, int]) -> None:
        return None

    def describe(self, event: Event) -> str:
        return self.name

    def samples(self, sink: Callable[[Hits], None], final: bool = False) -> None:
        return None

    def lost(self) -> dict[int, int]:
        return {}

    def time_error_ns(self) -> int:
        return 0

    def supported(self, event: Event) -> bool:
        return True

    def latency(self, attr: EventAttr) -> Latency | None:
        return None

    def warnings(self) -> list[str]:
        return []

    def flush(self) -> None:
        return None


# ---- the registry: perf_pmu_register for pmu ------------------------------------------------------


@dataclass
class PmuEnv:
    """What a backend's factory gets: the engine's shared parts and the user's switches."""

    tracer: Any = None
    """The ptrace engine (pmu.trace.tracer.Tracer), for backends with needs_tracer."""
    optimize: bool = True
    """Jump-optimized probes where safe (--no-optimize turns them off)."""


PmuFactory = Callable[[PmuEnv], Pmu]

REGISTRY: dict[str, str] = {
    "uprobe": "pmu.uprobe_pmu:factory",
    "kernel-uprobe": "pmu.kernel_pmu:uprobe_factory",
    "software": "pmu.kernel_pmu:software_factory",
    "hardware": "pmu.kernel_pmu:hardware_factory",
}
"""{PMU name: "module:factory"}: a backend is one module and one line here (or register())."""

NEEDS_TRACER: dict[str, bool] = {"uprobe": True}
"""PMUs whose events need the ptrace engine, known without building them (the evlist decides from it
whether to make a tracer); register() keeps it up to date."""


def register(name: str, factory: str | PmuFactory, needs_tracer: bool = False) -> None:
    """Add (or replace) a backend: `factory` is a callable or "module:callable"."""
    _factories.pop(name, None)
    if isinstance(factory, str):
        REGISTRY[name] = factory
    else:
        REGISTRY[name] = f"<callable {name}>"
        _factories[name] = factory
    NEEDS_TRACER[name] = needs_tracer


_factories: dict[str, PmuFactory] = {}


def make_pmu(name: str, env: PmuEnv) -> Pmu:
    """Build the backend registered under `name` (EventSpecError if there is none)."""
    factory = _factories.get(name)
    if factory is None:
        where = REGISTRY.get(name)
        if where is None:
            raise EventSpecError(f"no PMU named '{name}' (pmu has: {', '.join(sorted(REGISTRY))})")
        module, _, attr = where.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        _factories[name] = factory
    return factory(env)
