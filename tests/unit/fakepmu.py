"""FakePmu, FakeTask and FakeClock: a Pmu that arms nothing and records every call, for scheduler tests.

The fake checks the parts of the Pmu contract the scheduler must keep (no add beyond `slots` per task,
no remove without add, hook_task before add) and counts hits only when a test calls `hit()`: a hit
lands in "shared memory" (`pending`) and reaches event.count on read() or remove(EF_UPDATE), so a
test also sees whether the scheduler reads active events before summing.
"""

from __future__ import annotations

from dataclasses import dataclass

from pmu.core import EF_UPDATE, Task
from pmu.errors import PmuError
from pmu.events.attr import EventAttr
from pmu.events.event import Event, HookReason
from pmu.events.spec import ProbeKind, ProbeSpec

Call = tuple[object, ...]


@dataclass(frozen=True)
class FakeTask:
    """A traced thread as the scheduler sees it (satisfies pmu.core.Task)."""

    tid: int
    pid: int
    comm: str = "cmd"


@dataclass(frozen=True)
class FakePrivate:
    """What the fake's event_init leaves in event.pmu_private, so tests can see it is shared."""

    resolved: str


class FakeClock:
    """A clock that moves only when the test says so."""

    def __init__(self, start: int = 1_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, ns: int) -> int:
        self.now += ns
        return self.now


def make_attr(name: str, **fields: object) -> EventAttr:
    """An EventAttr for `uprobe:<name>` without parsing (symbol = name), with any field overridden."""
    probe = ProbeSpec(kind=ProbeKind.UPROBE, target=None, symbol=name, offset=0, address=None, text=name)
    return EventAttr(spec=probe, **fields)  # type: ignore[arg-type]


def tid_of(event: Event) -> int:
    assert event.task is not None
    return event.task.tid


class FakePmu:
    """Records `(op, event_name, tid, ...)` for every call; see the module docstring for the checks."""

    def __init__(self, name: str = "uprobe", slots: int | None = None) -> None:
        self.name = name
        self.slots: int | None = slots
        self.calls: list[Call] = []
        self.added: list[Event] = []
        """Events currently added, in add order."""
        self.pending: dict[Event, int] = {}
        """Hits not yet folded into event.count."""
        self.refuse: set[str] = set()
        """Event names add() answers False for (no room)."""
        self.fail_add: dict[str, PmuError] = {}
        self.fail_init: dict[str, PmuError] = {}
        self.fail_hook: dict[str, PmuError] = {}

    # ---- Pmu ops

    def event_init(self, event: Event) -> None:
        self.calls.append(("event_init", event.name, tid_of(event)))
        if event.name in self.fail_init:
            raise self.fail_init[event.name]
        event.pmu_private = FakePrivate(event.name)

    def add(self, event: Event, flags: int) -> bool:
        self.calls.append(("add", event.name, tid_of(event), flags))
        assert all(event is not e for e in self.added), f"{event.name} added twice"
        if event.name in self.fail_add:
            raise self.fail_add[event.name]
        if event.name in self.refuse:
            return False
        if self.slots is not None:
            used = sum(1 for e in self.added if tid_of(e) == tid_of(event))
            assert used < self.slots, f"scheduler put {used + 1} events on {self.slots} slots"
        self.added.append(event)
        return True

    def remove(self, event: Event, flags: int) -> None:
        self.calls.append(("remove", event.name, tid_of(event), flags))
        index = next((i for i, e in enumerate(self.added) if e is event), None)
        assert index is not None, f"remove of {event.name} that is not added"
        del self.added[index]
        if flags & EF_UPDATE:
            self._fold(event)

    def start(self, event: Event, flags: int) -> None:
        self.calls.append(("start", event.name, tid_of(event), flags))

    def stop(self, event: Event, flags: int) -> None:
        self.calls.append(("stop", event.name, tid_of(event), flags))
        if flags & EF_UPDATE:
            self._fold(event)

    def read(self, event: Event) -> None:
        self.calls.append(("read", event.name, tid_of(event)))
        self._fold(event)

    def hook_task(self, event: Event, task: Task, reason: HookReason) -> None:
        self.calls.append(("hook_task", event.name, task.tid, reason.value))
        assert all(event is not e for e in self.added), "hook_task on an added event"
        assert event.task is task
        if event.name in self.fail_hook:
            raise self.fail_hook[event.name]

    # ---- test helpers

    def hit(self, task: Task, name: str, n: int = 1) -> bool:
        """n hits of `name` in `task`: counted only if that task's event is added. True if counted."""
        for e in self.added:
            if tid_of(e) == task.tid and e.name == name:
                self.pending[e] = self.pending.get(e, 0) + n
                return True
        return False

    def take(self, *ops: str) -> list[Call]:
        """The calls so far (only those of the given ops, if any), and forget them all."""
        calls = [c for c in self.calls if not ops or c[0] in ops]
        self.calls.clear()
        return calls

    def active_names(self, task: Task) -> list[str]:
        return [e.name for e in self.added if tid_of(e) == task.tid]

    def _fold(self, event: Event) -> None:
        event.count += self.pending.pop(event, 0)
