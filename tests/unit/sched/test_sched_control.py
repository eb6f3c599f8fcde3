"""Scheduler control from the user side: enable/disable with children, read and per_task, close."""

from __future__ import annotations

from pmu.core import EF_START
from pmu.events.event import Counts, EventState
from pmu.sched import Scheduler
from tests.unit.fakepmu import FakeClock, FakePmu, FakeTask, make_attr

OFF, INACTIVE, ACTIVE = EventState.OFF, EventState.INACTIVE, EventState.ACTIVE
EXIT, DEAD = EventState.EXIT, EventState.DEAD
T = FakeTask(tid=100, pid=100)
THREAD = FakeTask(tid=101, pid=100)
CHILD = FakeTask(tid=200, pid=200)


def test_enable_and_disable_reach_every_child(sched: Scheduler, fake: FakePmu, clock: FakeClock) -> None:
    e = sched.open(make_attr("f", disabled=True), T)
    (t,) = sched.task_clone(T, THREAD).inherited
    (c,) = sched.task_fork(T, CHILD).inherited
    assert (e.state, t.state, c.state) == (OFF, OFF, OFF)
    fake.take()
    clock.advance(10)

    sched.enable(e)
    assert fake.take() == [
        ("add", "f", 100, EF_START),
        ("add", "f", 101, EF_START),
        ("add", "f", 200, EF_START),
    ]
    assert (e.state, t.state, c.state) == (ACTIVE, ACTIVE, ACTIVE)
    for task in (T, THREAD, CHILD):
        fake.hit(task, "f", 2)
    clock.advance(10)

    sched.disable(e)
    assert fake.take() == [("remove", "f", 100, 2), ("remove", "f", 101, 2), ("remove", "f", 200, 2)]
    assert (e.state, t.state, c.state) == (OFF, OFF, OFF)
    clock.advance(10)
    assert not fake.hit(T, "f")
    counts = sched.read(e)
    assert (counts.value, counts.time_enabled, counts.time_running) == (6, 30, 30)


def test_enable_twice_and_disable_twice_are_no_ops(sched: Scheduler, fake: FakePmu) -> None:
    e = sched.open(make_attr("f"), T)
    fake.take()
    sched.enable(e)
    assert fake.take() == []
    sched.disable(e)
    sched.disable(e)
    assert fake.take() == [("remove", "f", 100, 2)]


def test_enable_skips_exited_children(sched: Scheduler, fake: FakePmu) -> None:
    e = sched.open(make_attr("f", disabled=True), T)
    (t,) = sched.task_clone(T, THREAD).inherited
    sched.task_exit(THREAD)
    fake.take()
    sched.enable(e)
    assert fake.take() == [("add", "f", 100, 1)]
    assert t.state is EXIT


def test_times_follow_the_state(sched: Scheduler, clock: FakeClock) -> None:
    """time_enabled advances while INACTIVE or ACTIVE, time_running only while ACTIVE."""
    e = sched.open(make_attr("f", disabled=True), T)
    clock.advance(7)  # OFF
    sched.enable(e)
    clock.advance(11)  # ACTIVE
    sched.disable(e)
    clock.advance(13)  # OFF
    sched.enable(e)
    clock.advance(17)  # ACTIVE
    c = sched.read(e)
    assert (c.time_enabled, c.time_running) == (28, 28)


def test_read_reads_active_events_from_the_pmu(sched: Scheduler, fake: FakePmu) -> None:
    e = sched.open(make_attr("f"), T)
    sched.task_clone(T, THREAD)
    fake.hit(T, "f", 1)
    fake.hit(THREAD, "f", 2)
    fake.take()
    assert sched.read(e) == Counts(3, 0, 0)
    assert fake.take() == [("read", "f", 100), ("read", "f", 101)]
    assert e.count == 1  # the user event keeps its own count; children are summed, not folded, while live


def test_per_task_lists_the_event_and_every_descendant(
    sched: Scheduler, fake: FakePmu, clock: FakeClock
) -> None:
    e = sched.open(make_attr("f"), T)
    sched.task_clone(T, THREAD)
    sched.task_fork(T, CHILD)
    for n, task in enumerate((T, THREAD, CHILD), start=1):
        fake.hit(task, "f", n)
    clock.advance(5)
    sched.task_exit(CHILD)
    clock.advance(5)
    per = sched.per_task(e)
    assert per == [(T, Counts(1, 10, 10)), (THREAD, Counts(2, 10, 10)), (CHILD, Counts(3, 5, 5))]
    total = sched.read(e)
    assert total.value == sum(c.value for _, c in per)
    assert total.time_enabled == sum(c.time_enabled for _, c in per)


def test_close_removes_everything_once(sched: Scheduler, fake: FakePmu, clock: FakeClock) -> None:
    fake.slots = 1
    a = sched.open(make_attr("a"), T)
    sched.open(make_attr("b"), T)
    sched.open(make_attr("off", disabled=True), T)
    sched.task_clone(T, THREAD)
    sched.task_fork(T, CHILD)
    sched.task_exit(CHILD)
    fake.hit(T, "a", 4)
    clock.advance(10)
    fake.take()

    sched.close()
    assert sorted(fake.take()) == sorted([("remove", "a", 100, 2), ("remove", "a", 101, 2)])
    assert fake.added == []
    assert all(x.state is DEAD for e in sched.events() for x in (e, *e.children))
    assert sched.contexts() == [] and sched.closed

    sched.close()
    sched.task_exit(T)
    sched.task_clone(T, THREAD)
    sched.rotate()
    assert fake.take() == []
    clock.advance(100)
    counts = sched.read(a)  # still readable, frozen at close
    assert counts.value == 4 and counts.time_enabled == 10 + 10  # T, THREAD; CHILD lived 0 ns
