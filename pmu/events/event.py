"""Event: one EventAttr live on one task context, with its state, count and enabled/running times."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any

from pmu.events.attr import EventAttr

if TYPE_CHECKING:
    from pmu.core import Task


class EventState(IntEnum):
    """Life of an event, as `enum perf_event_state`; only the scheduler moves an event between states."""

    DEAD = -4
    """Freed: closed and gone from every context."""
    EXIT = -3
    """Its task exited; the count is final (and folded into the parent event if inherited)."""
    ERROR = -2
    """Could not be scheduled (a pinned event that did not fit, or the PMU failed to add it)."""
    OFF = -1
    """Disabled: not counting, time_enabled not advancing."""
    INACTIVE = 0
    """Enabled but not on the PMU right now (waiting for its task or a multiplexing slot)."""
    ACTIVE = 1
    """On the PMU and counting."""


class HookReason(Enum):
    """Why the scheduler calls Pmu.hook_task."""

    CLONE = "clone"
    """A new thread in the same address space."""
    FORK = "fork"
    """A new process with a copy of the parent's address space (fork or vfork)."""
    EXEC = "exec"
    """The task replaced its program image; the old address space is gone."""


@dataclass(frozen=True)
class Counts:
    """The result of reading an event, with perf's scaling inputs."""

    value: int
    """Hits counted while the event was ACTIVE (children folded in)."""
    time_enabled: int
    """Nanoseconds the event was enabled (INACTIVE or ACTIVE)."""
    time_running: int
    """Nanoseconds the event was ACTIVE."""

    @property
    def scaled(self) -> float:
        """value scaled to the whole enabled time, as perf does when multiplexing."""
        if self.time_running == 0:
            return 0.0
        return self.value * self.time_enabled / self.time_running

    @property
    def percent_running(self) -> float:
        """time_running as a percentage of time_enabled (100.0 when never enabled)."""
        if self.time_enabled == 0:
            return 100.0
        return 100.0 * self.time_running / self.time_enabled


@dataclass(eq=False)
class Event:
    """One attr on one task's context. Inherited events point at their parent and fold into it at exit."""

    attr: EventAttr
    task: Task | None
    """The task whose context holds the event (None until a launched command exists)."""
    parent: Event | None = None
    """The event this one was inherited from (None for an event the user opened)."""
    state: EventState = EventState.OFF
    count: int = 0
    """Hits counted on this task; a backend's hit path adds to it directly or via Pmu.read."""
    child_count: int = 0
    """Counts folded in from inherited children that have exited."""
    child_time_enabled: int = 0
    child_time_running: int = 0
    time_enabled: int = 0
    time_running: int = 0
    tstamp: int = 0
    """Clock value when the times were last brought up to date."""
    children: list[Event] = field(default_factory=list)
    lost: int = 0
    """Sample records that did not fit in the ring buffer."""
    pmu_private: Any = None
    """Backend-owned state (the uprobe PMU keeps the probe resolution here)."""

    @property
    def name(self) -> str:
        return self.attr.name

    @property
    def is_active(self) -> bool:
        return self.state is EventState.ACTIVE
