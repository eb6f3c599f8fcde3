"""The Pmu Protocol: the operations every probe backend offers the scheduler, with their contract.

This is `struct pmu` for pmu. The scheduler (pmu/sched/) is the only caller; a backend never changes
an Event's state itself, it only arms and disarms its hardware (breakpoints, trampolines) and counts.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pmu.events.event import Event, HookReason

# Flags for Pmu.add, as PERF_EF_START.
EF_START = 1
"""add(): start counting immediately; without it the event is added stopped."""

# Flags for Pmu.stop, as PERF_EF_UPDATE.
EF_UPDATE = 2
"""stop(): bring event.count up to date before stopping."""


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
