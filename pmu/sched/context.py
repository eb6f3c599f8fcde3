"""EventContext: the events of one traced task, as perf_event_context: pinned and flexible lists, a clock.

A context holds lists and timestamps only. It never changes an event's state and never calls a PMU:
the Scheduler (scheduler.py) does both, and keeps one context per live task it has events on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from pmu.core import Task
from pmu.events.event import Event, EventState


@dataclass(eq=False)
class EventContext:
    """The events of one task, in scheduling order: every pinned event, then the flexible ones.

    The flexible list is what multiplexing rotates; its order is the order in which flexible events
    get the slots left over by the pinned ones.
    """

    task: Task
    """The task whose events these are (replaced by the scheduler when the task execs)."""
    timestamp: int
    """Clock value when `time` was last brought up to date (the creation time at first)."""
    time: int = 0
    """Nanoseconds this context has existed, as perf's ctx->time (a traced task is always 'on')."""
    pinned: list[Event] = field(default_factory=list)
    """Events with attr.pinned: always on their PMU, or in ERROR when they cannot be."""
    flexible: list[Event] = field(default_factory=list)
    """Every other event, in rotation order."""
    rotate_pmus: set[str] = field(default_factory=set)
    """PMUs on which a flexible event of this context waits for a slot: the next rotation turns them."""
    rotations: int = 0
    """How many times a rotation turned this context's flexible list."""

    def update_time(self, now: int) -> None:
        """Advance the context clock to `now`."""
        self.time += now - self.timestamp
        self.timestamp = now

    def add(self, event: Event) -> None:
        """Append an event to the pinned or flexible list, as its attr says."""
        (self.pinned if event.attr.pinned else self.flexible).append(event)

    def events(self) -> list[Event]:
        """Every event, in scheduling order (pinned first, then flexible in list order)."""
        return [*self.pinned, *self.flexible]

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events())

    def __len__(self) -> int:
        return len(self.pinned) + len(self.flexible)

    def __contains__(self, event: object) -> bool:
        return any(event is e for e in self.pinned) or any(event is e for e in self.flexible)

    def nr_active(self, pmu: str) -> int:
        """How many of this context's events are ACTIVE on the named PMU (its slots in use)."""
        return sum(1 for e in self.events() if e.attr.pmu == pmu and e.state is EventState.ACTIVE)

    def flexible_of(self, pmu: str) -> list[Event]:
        """The flexible events served by the named PMU, in list order."""
        return [e for e in self.flexible if e.attr.pmu == pmu]

    def rotation_head(self, pmu: str) -> Event | None:
        """The flexible event a rotation moves to the tail: the first ACTIVE one of the PMU, as perf's
        ctx_event_to_rotate, or else the first enabled (INACTIVE) one; None if the PMU has neither."""
        candidates = self.flexible_of(pmu)
        for state in (EventState.ACTIVE, EventState.INACTIVE):
            for event in candidates:
                if event.state is state:
                    return event
        return None

    def move_to_tail(self, event: Event) -> None:
        """Move a flexible event to the end of the flexible list (one step of a rotation)."""
        for i, e in enumerate(self.flexible):
            if e is event:
                del self.flexible[i]
                self.flexible.append(event)
                return
        raise ValueError(f"{event.name} is not a flexible event of this context")
