"""EventContext: list order, the rotation head and the context clock."""

from __future__ import annotations

import pytest

from pmu.events.event import Event, EventState
from pmu.sched import EventContext
from tests.unit.fakepmu import FakeTask, make_attr

T = FakeTask(tid=10, pid=10)


def ev(name: str, state: EventState = EventState.INACTIVE, **fields: object) -> Event:
    return Event(attr=make_attr(name, **fields), task=T, state=state)


def test_pinned_before_flexible_in_order() -> None:
    ctx = EventContext(task=T, timestamp=0)
    a, p, b = ev("a"), ev("p", pinned=True), ev("b")
    for e in (a, p, b):
        ctx.add(e)
    assert ctx.pinned == [p]
    assert ctx.flexible == [a, b]
    assert ctx.events() == [p, a, b]
    assert len(ctx) == 3 and p in ctx and ev("x") not in ctx


def test_rotation_head_prefers_first_active_then_first_enabled() -> None:
    ctx = EventContext(task=T, timestamp=0)
    off, waiting, active = ev("off", EventState.OFF), ev("w"), ev("act", EventState.ACTIVE)
    other = ev("other", EventState.ACTIVE, pmu="other")
    for e in (off, other, waiting, active):
        ctx.add(e)
    assert ctx.rotation_head("uprobe") is active
    active.state = EventState.INACTIVE
    assert ctx.rotation_head("uprobe") is waiting
    assert ctx.rotation_head("nothing") is None
    assert ctx.nr_active("other") == 1 and ctx.nr_active("uprobe") == 0


def test_move_to_tail() -> None:
    ctx = EventContext(task=T, timestamp=0)
    a, b, c = ev("a"), ev("b"), ev("c")
    for e in (a, b, c):
        ctx.add(e)
    ctx.move_to_tail(a)
    assert ctx.flexible == [b, c, a]
    with pytest.raises(ValueError):
        ctx.move_to_tail(ev("stranger"))


def test_clock() -> None:
    ctx = EventContext(task=T, timestamp=100)
    ctx.update_time(150)
    ctx.update_time(400)
    assert (ctx.time, ctx.timestamp) == (300, 400)
