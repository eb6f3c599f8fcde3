"""Scheduler: the only code that changes an Event's state, as perf's ctx_sched_in/out and perf_rotate_context.

The tracer tells it about tasks (clone, fork, exec, exit), the Evlist opens, enables, reads and closes
events through it, and it calls the Pmu ops (core.py) to put events on and off their tasks. It decides
`inherit` and `enable_on_exec` once for every PMU, multiplexes a PMU's slots by rotating the flexible
list, and keeps time_enabled (state >= INACTIVE) and time_running (state ACTIVE) with perf's semantics.
It never touches ptrace.

Inherited events follow perf's inherit_event: a child event's `parent` is always the user-opened event,
never another child, so a grandchild folds into the event the user reads even if its own parent thread
has exited already; every descendant is in the user-opened event's `children`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from pmu.core import EF_EXIT, EF_START, EF_UPDATE, Pmu, Task
from pmu.errors import EventSpecError, PmuError
from pmu.events.attr import EventAttr
from pmu.events.event import Counts, Event, EventState, HookReason
from pmu.sched.context import EventContext

OFF = EventState.OFF
INACTIVE = EventState.INACTIVE
ACTIVE = EventState.ACTIVE


class PinnedError(PmuError):
    """A pinned event that found no room on its PMU (perf puts it in ERROR rather than multiplexing it)."""

    kind = "pinned"


@dataclass(frozen=True)
class Inheritance:
    """What a clone or fork gave the new task."""

    child: Task
    reason: HookReason
    """CLONE or FORK."""
    inherited: tuple[Event, ...]
    """The child's new events, in the order they were hooked and scheduled."""
    skipped: tuple[Event, ...]
    """Events of the parent's context that the child did not inherit (attr.inherit=False on a fork)."""

    @property
    def empty(self) -> bool:
        """The child has nothing to count: the caller need not keep it traced for the events' sake."""
        return not self.inherited


class Scheduler:
    """Puts events on and off their tasks' PMUs and keeps their states, counts and times."""

    def __init__(self, pmus: Mapping[str, Pmu], clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._pmus: dict[str, Pmu] = dict(pmus)
        self._clock = clock
        self._contexts: dict[int, EventContext] = {}
        """Live contexts by tid."""
        self._events: list[Event] = []
        """User-opened events, in open order."""
        self._added: set[Event] = set()
        """Events add()ed to their PMU and not yet remove()d."""
        self._errors: dict[Event, PmuError] = {}
        """Why an event is in ERROR (or why a remove() failed)."""
        self._folded: set[Event] = set()
        """Inherited events whose count and times were folded into their parent at exit."""
        self._exec_enabled: set[Event] = set()
        """Events whose enable_on_exec was used up (perf clears attr.enable_on_exec after the first exec)."""
        self._closed = False

    # ---------------------------------------------------------------- queries

    def events(self) -> list[Event]:
        """User-opened events, in open order."""
        return list(self._events)

    def context(self, task: Task) -> EventContext | None:
        """The live context of a task (None if it has no events, has exited, or after close)."""
        return self._contexts.get(task.tid)

    def contexts(self) -> list[EventContext]:
        """Every live context, in creation order."""
        return list(self._contexts.values())

    def error(self, event: Event) -> PmuError | None:
        """Why the event went to ERROR (kept after close), or None."""
        return self._errors.get(event)

    @property
    def closed(self) -> bool:
        return self._closed

    # ---------------------------------------------------------------- user side

    def open(self, attr: EventAttr, task: Task) -> Event:
        """Open an event on a task: event_init, then enabled (scheduled in) unless attr.disabled.

        A PmuError from event_init propagates and nothing is kept.
        """
        if self._closed:
            raise RuntimeError("scheduler is closed")
        pmu = self._pmu_named(attr)
        now = self._clock()
        event = Event(attr=attr, task=task, tstamp=now)
        pmu.event_init(event)
        ctx = self._context_for(task, now)
        ctx.add(event)
        self._events.append(event)
        if not attr.disabled:
            self._set_state(event, INACTIVE, now)
            self._sched_in_after_enable(ctx, [event], now)
        return event

    def enable(self, event: Event) -> None:
        """perf's ioctl ENABLE: the event and its inherited children go from OFF or ERROR to enabled."""
        now = self._clock()
        touched: dict[int, tuple[EventContext, list[Event]]] = {}
        for e in self._family(event):
            if e.state not in (OFF, EventState.ERROR):
                continue
            ctx = self._live_context(e)
            if ctx is None:
                continue
            self._errors.pop(e, None)
            self._set_state(e, INACTIVE, now)
            touched.setdefault(id(ctx), (ctx, []))[1].append(e)
        for ctx, enabled in touched.values():
            ctx.update_time(now)
            self._sched_in_after_enable(ctx, enabled, now)

    def disable(self, event: Event) -> None:
        """perf's ioctl DISABLE: the event and its inherited children stop counting (state OFF).

        An event in ERROR stays in ERROR, as in perf. Slots freed are given to waiting flexible events.
        """
        now = self._clock()
        touched: dict[int, EventContext] = {}
        for e in self._family(event):
            if e.state < INACTIVE:
                continue
            ctx = self._live_context(e)
            if ctx is None:
                continue
            self._sched_out(ctx, [e], now)
            self._set_state(e, OFF, now)
            touched[id(ctx)] = ctx
        for ctx in touched.values():
            ctx.update_time(now)
            self._sched_in(ctx, now)

    def read(self, event: Event) -> Counts:
        """The event's total: its own count, what exited children folded in, and live children's counts.

        Active events are read from their PMU first; times are brought up to now.
        """
        now = self._clock()
        self._refresh(event, now)
        value = event.count + event.child_count
        enabled = event.time_enabled + event.child_time_enabled
        running = event.time_running + event.child_time_running
        for child in event.children:
            if child in self._folded:
                continue
            self._refresh(child, now)
            value += child.count + child.child_count
            enabled += child.time_enabled + child.child_time_enabled
            running += child.time_running + child.child_time_running
        return Counts(value=value, time_enabled=enabled, time_running=running)

    def per_task(self, event: Event) -> list[tuple[Task, Counts]]:
        """The event and each inherited descendant (live or exited), each with its own counts only.

        The values add up to read(event).value.
        """
        now = self._clock()
        out: list[tuple[Task, Counts]] = []
        for e in self._family(event):
            self._refresh(e, now)
            if e.task is None:
                continue
            own = Counts(value=e.count, time_enabled=e.time_enabled, time_running=e.time_running)
            out.append((e.task, own))
        return out

    def rotate(self) -> None:
        """Multiplexing tick (perf_rotate_context).

        In every context where a flexible event waits for a slot of some PMU: sched out that PMU's flexible
        events, move the first one that was active to the tail of the flexible list, sched in again as
        many as fit. Contexts where everything fits are not touched.
        """
        now = self._clock()
        for ctx in list(self._contexts.values()):
            ctx.update_time(now)
            for name in sorted(ctx.rotate_pmus):
                head = ctx.rotation_head(name)
                self._sched_out(ctx, ctx.flexible_of(name), now)
                if head is not None:
                    ctx.move_to_tail(head)
                ctx.rotations += 1
                self._sched_in(ctx, now, only=name)

    def close(self) -> None:
        """Remove every still-added event from every context and mark every event DEAD.

        Counts and times stay readable (read, per_task) and frozen at the close time. Safe to call twice;
        task notifications after close are ignored.
        """
        now = self._clock()
        for ctx in self._contexts.values():
            ctx.update_time(now)
            self._sched_out(ctx, ctx.events(), now)
        for event in self._events:
            for e in self._family(event):
                if e.state > EventState.DEAD:
                    self._set_state(e, EventState.DEAD, now)
        self._contexts.clear()
        self._closed = True

    # ---------------------------------------------------------------- tracer side

    def task_clone(self, parent: Task, child: Task) -> Inheritance:
        """A new thread: every event of the parent's context is inherited (hook_task CLONE, then sched in)."""
        return self._inherit(parent, child, HookReason.CLONE)

    def task_fork(self, parent: Task, child: Task) -> Inheritance:
        """A new process (fork or vfork): only events with attr.inherit are inherited (hook_task FORK).

        The result's `skipped` lists the parent's events the child did not get; `empty` says the child
        has nothing to count.
        """
        return self._inherit(parent, child, HookReason.FORK)

    def task_renamed(self, old_tid: int, task: Task) -> None:
        """A thread that was `old_tid` is now known as task.tid (a non-leader thread exec'd and took its
        leader's tid): its context follows it."""
        ctx = self._contexts.pop(old_tid, None)
        if ctx is not None:
            self._contexts[task.tid] = ctx

    def task_exec(self, task: Task) -> None:
        """The task exec'd: sched out its context, hook_task(EXEC) each event, apply enable_on_exec, sched in.

        enable_on_exec is used up by the first exec that sees it (perf clears the attr bit): an event the
        user disabled afterwards is not enabled again by a later exec. An inherited event shares its
        user-opened parent's use of the bit.
        """
        ctx = self._contexts.get(task.tid)
        if ctx is None:
            return
        now = self._clock()
        ctx.update_time(now)
        ctx.task = task
        events = ctx.events()
        for e in events:
            e.task = task
        self._sched_out(ctx, events, now)
        for e in events:
            pmu = self._pmus[e.attr.pmu]
            try:
                pmu.hook_task(e, task, HookReason.EXEC)
            except PmuError as err:
                self._fail(e, err, now)
                continue
            if e.attr.enable_on_exec and e not in self._exec_enabled:
                self._exec_enabled.add(e)
                if e.state < INACTIVE:
                    self._errors.pop(e, None)
                    self._set_state(e, INACTIVE, now)
        self._sched_in(ctx, now)

    def task_exit(self, task: Task) -> None:
        """The task exited: sched out its events, state EXIT; inherited ones fold into their parent.

        Folding is perf's sync_child_event: parent.child_count += count, child_time_enabled/running +=
        the child's times. The child Event stays in parent.children with its own count (per_task).
        """
        ctx = self._contexts.pop(task.tid, None)
        if ctx is None:
            return
        now = self._clock()
        ctx.update_time(now)
        events = ctx.events()
        self._sched_out(ctx, events, now, EF_UPDATE | EF_EXIT)
        for e in events:
            self._set_state(e, EventState.EXIT, now)
            parent = e.parent
            if parent is not None and e not in self._folded:
                parent.child_count += e.count + e.child_count
                parent.child_time_enabled += e.time_enabled + e.child_time_enabled
                parent.child_time_running += e.time_running + e.child_time_running
                self._folded.add(e)

    # ---------------------------------------------------------------- internals

    def _pmu_named(self, attr: EventAttr) -> Pmu:
        pmu = self._pmus.get(attr.pmu)
        if pmu is None:
            raise EventSpecError(f"{attr.name}: no PMU named '{attr.pmu}'")
        return pmu

    def _context_for(self, task: Task, now: int) -> EventContext:
        ctx = self._contexts.get(task.tid)
        if ctx is None:
            ctx = EventContext(task=task, timestamp=now)
            self._contexts[task.tid] = ctx
        return ctx

    def _live_context(self, event: Event) -> EventContext | None:
        if event.task is None:
            return None
        ctx = self._contexts.get(event.task.tid)
        return ctx if ctx is not None and event in ctx else None

    @staticmethod
    def _family(event: Event) -> list[Event]:
        return [event, *event.children]

    def _update_time(self, event: Event, now: int) -> None:
        """perf_event_update_time: enabled advances while state >= INACTIVE, running while ACTIVE.

        Not for the events of a PMU that keeps their times itself (a kernel counter's come with its
        count, from the kernel)."""
        if getattr(self._pmus.get(event.attr.pmu), "keeps_time", False):
            event.tstamp = now
            return
        delta = now - event.tstamp
        if event.state >= INACTIVE:
            event.time_enabled += delta
        if event.state is ACTIVE:
            event.time_running += delta
        event.tstamp = now

    def _set_state(self, event: Event, state: EventState, now: int) -> None:
        self._update_time(event, now)
        event.state = state

    def _fail(self, event: Event, err: PmuError, now: int) -> None:
        self._errors[event] = err
        self._set_state(event, EventState.ERROR, now)

    def _refresh(self, event: Event, now: int) -> None:
        if event.state is ACTIVE and event in self._added:
            self._pmus[event.attr.pmu].read(event)
        self._update_time(event, now)

    def _inherit(self, parent: Task, child: Task, reason: HookReason) -> Inheritance:
        pctx = self._contexts.get(parent.tid)
        if pctx is None:
            return Inheritance(child=child, reason=reason, inherited=(), skipped=())
        now = self._clock()
        pctx.update_time(now)
        inherited: list[Event] = []
        skipped: list[Event] = []
        cctx: EventContext | None = None
        for src in pctx.events():
            if reason is HookReason.FORK and not src.attr.inherit:
                skipped.append(src)
                continue
            root = src.parent if src.parent is not None else src
            ev = Event(
                attr=src.attr,
                task=child,
                parent=root,
                state=INACTIVE if src.state >= INACTIVE else OFF,
                tstamp=now,
                pmu_private=src.pmu_private,
            )
            root.children.append(ev)
            if root in self._exec_enabled:
                self._exec_enabled.add(ev)
            if cctx is None:
                cctx = self._context_for(child, now)
            cctx.add(ev)
            inherited.append(ev)
        for ev in inherited:
            try:
                self._pmus[ev.attr.pmu].hook_task(ev, child, reason)
            except PmuError as err:
                self._fail(ev, err, now)
        if cctx is not None:
            self._sched_in(cctx, now)
        return Inheritance(child=child, reason=reason, inherited=tuple(inherited), skipped=tuple(skipped))

    def _sched_in_after_enable(self, ctx: EventContext, enabled: Iterable[Event], now: int) -> None:
        """Newly enabled events: a pinned one takes precedence over flexible ones (perf's ctx_resched)."""
        for name in sorted({e.attr.pmu for e in enabled if e.attr.pinned}):
            self._sched_out(ctx, ctx.flexible_of(name), now)
        self._sched_in(ctx, now)

    def _sched_out(
        self, ctx: EventContext, events: Iterable[Event], now: int, flags: int = EF_UPDATE
    ) -> None:
        """Take added events off their PMU (remove with EF_UPDATE, and EF_EXIT when the task exits);
        ACTIVE ones become INACTIVE."""
        for e in events:
            if e not in self._added:
                continue
            self._added.discard(e)
            try:
                self._pmus[e.attr.pmu].remove(e, flags)
            except PmuError as err:
                self._errors[e] = err
            if e.state is ACTIVE:
                self._set_state(e, INACTIVE, now)

    def _sched_in(self, ctx: EventContext, now: int, only: str | None = None) -> None:
        """ctx_sched_in: pinned events first, then flexible in list order, as many as each PMU's slots allow.

        A pinned event that does not fit goes to ERROR. Once a flexible event of a PMU does not fit, the
        later flexible events of that PMU are not tried (perf's can_add_hw) and the PMU is marked for
        rotation. A PmuError from add puts that event in ERROR, and the others go on.
        """
        if only is None:
            ctx.rotate_pmus.clear()
        else:
            ctx.rotate_pmus.discard(only)
        in_use: dict[str, int] = {}
        full: set[str] = set()
        for e in ctx.events():
            name = e.attr.pmu
            if (only is not None and name != only) or e.state is not INACTIVE or e in self._added:
                continue
            pmu = self._pmus[name]
            if name not in in_use:
                in_use[name] = ctx.nr_active(name)
            fits = name not in full and (pmu.slots is None or in_use[name] < pmu.slots)
            if fits:
                try:
                    fits = pmu.add(e, EF_START)
                except PmuError as err:
                    self._fail(e, err, now)
                    continue
                if fits:
                    self._added.add(e)
                    self._set_state(e, ACTIVE, now)
                    in_use[name] += 1
                    continue
            if e.attr.pinned:
                self._fail(e, PinnedError(f"{e.name}: pinned event does not fit on PMU '{name}'"), now)
            else:
                full.add(name)
                ctx.rotate_pmus.add(name)
