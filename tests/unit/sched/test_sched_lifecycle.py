"""Scheduler and task life: open, clone, fork, exec and exit, with the exact Pmu calls each one makes.

Calls are `(op, event, tid, flags)`; flags 1 = EF_START (add), 2 = EF_UPDATE (remove). hook_task calls
are `("hook_task", event, tid, reason)`.
"""

from __future__ import annotations

import pytest

from pmu.errors import EventSpecError, SymbolError
from pmu.events.event import Counts, EventState
from pmu.sched import Scheduler
from tests.unit.fakepmu import FakeClock, FakePmu, FakePrivate, FakeTask, make_attr

OFF, INACTIVE, ACTIVE = EventState.OFF, EventState.INACTIVE, EventState.ACTIVE
EXIT, ERROR = EventState.EXIT, EventState.ERROR

T = FakeTask(tid=100, pid=100, comm="pmu")  # the launched command, before exec
T_EXEC = FakeTask(tid=100, pid=100, comm="cmd")  # the same task after exec
THREAD = FakeTask(tid=101, pid=100, comm="cmd")
THREAD2 = FakeTask(tid=102, pid=100, comm="cmd")
CHILD = FakeTask(tid=200, pid=200, comm="cmd")  # a forked process
CHILD_EXEC = FakeTask(tid=200, pid=200, comm="child")


# ---------------------------------------------------------------- open


def test_open_enabled_counts_at_once(sched: Scheduler, fake: FakePmu, clock: FakeClock) -> None:
    e = sched.open(make_attr("f"), T)
    assert fake.take() == [("event_init", "f", 100), ("add", "f", 100, 1)]
    assert e.state is ACTIVE and e.task is T and e.parent is None
    assert e.pmu_private == FakePrivate("f")
    clock.advance(100)
    assert fake.hit(T, "f", 3)
    c = sched.read(e)
    assert (c.value, c.time_enabled, c.time_running) == (3, 100, 100)
    assert fake.take() == [("read", "f", 100)]


def test_open_disabled_stays_off(sched: Scheduler, fake: FakePmu, clock: FakeClock) -> None:
    e = sched.open(make_attr("f", disabled=True), T)
    assert fake.take() == [("event_init", "f", 100)]
    assert e.state is OFF
    clock.advance(100)
    assert not fake.hit(T, "f")
    c = sched.read(e)
    assert (c.value, c.time_enabled, c.time_running) == (0, 0, 0)
    assert fake.take() == []


def test_events_in_open_order(sched: Scheduler) -> None:
    a = sched.open(make_attr("a"), T)
    b = sched.open(make_attr("b", disabled=True), THREAD)
    c = sched.open(make_attr("c"), T)
    assert sched.events() == [a, b, c]
    ctx = sched.context(T)
    assert ctx is not None and ctx.events() == [a, c]


def test_open_failures_keep_nothing(sched: Scheduler, fake: FakePmu) -> None:
    with pytest.raises(EventSpecError, match="no PMU named 'nope'"):
        sched.open(make_attr("f", pmu="nope"), T)
    fake.fail_init["g"] = SymbolError("g: no such symbol")
    with pytest.raises(SymbolError):
        sched.open(make_attr("g"), T)
    assert sched.events() == [] and sched.context(T) is None


# ---------------------------------------------------------------- clone


def test_clone_inherits_every_event(sched: Scheduler, fake: FakePmu) -> None:
    a = sched.open(make_attr("a"), T)
    b = sched.open(make_attr("b", inherit=False), T)  # threads share counting whatever inherit says
    c = sched.open(make_attr("c", disabled=True), T)
    fake.take()
    got = sched.task_clone(T, THREAD)
    assert fake.take() == [
        ("hook_task", "a", 101, "clone"),
        ("hook_task", "b", 101, "clone"),
        ("hook_task", "c", 101, "clone"),
        ("add", "a", 101, 1),
        ("add", "b", 101, 1),
    ]
    ca, cb, cc = got.inherited
    assert got.skipped == () and not got.empty
    assert [x.parent for x in (ca, cb, cc)] == [a, b, c]
    assert [x.state for x in (ca, cb, cc)] == [ACTIVE, ACTIVE, OFF]
    assert all(x.task is THREAD for x in (ca, cb, cc))
    assert ca.attr is a.attr and ca.pmu_private is a.pmu_private
    assert a.children == [ca] and c.children == [cc]


def test_clone_of_a_clone_points_at_the_user_event(sched: Scheduler, fake: FakePmu) -> None:
    a = sched.open(make_attr("a"), T)
    (ca,) = sched.task_clone(T, THREAD).inherited
    fake.take()
    (cca,) = sched.task_clone(THREAD, THREAD2).inherited
    assert fake.take() == [("hook_task", "a", 102, "clone"), ("add", "a", 102, 1)]
    assert cca.parent is a and a.children == [ca, cca] and ca.children == []


def test_clone_of_an_unknown_task_gives_nothing(sched: Scheduler, fake: FakePmu) -> None:
    got = sched.task_clone(T, THREAD)
    assert got.empty and fake.take() == [] and sched.context(THREAD) is None


# ---------------------------------------------------------------- fork


def test_fork_inherits_only_inherit_events(sched: Scheduler, fake: FakePmu) -> None:
    a = sched.open(make_attr("a", inherit=True), T)
    b = sched.open(make_attr("b", inherit=False), T)
    fake.take()
    got = sched.task_fork(T, CHILD)
    assert fake.take() == [("hook_task", "a", 200, "fork"), ("add", "a", 200, 1)]
    (ca,) = got.inherited
    assert got.skipped == (b,) and not got.empty
    assert ca.parent is a and ca.state is ACTIVE and b.children == []


def test_fork_without_inherit_leaves_the_child_empty(sched: Scheduler, fake: FakePmu) -> None:
    b = sched.open(make_attr("b", inherit=False), T)
    fake.take()
    got = sched.task_fork(T, CHILD)
    assert got.empty and got.skipped == (b,)
    assert fake.take() == []
    assert sched.context(CHILD) is None


def test_fork_of_a_disabled_event_is_off(sched: Scheduler, fake: FakePmu) -> None:
    sched.open(make_attr("a", disabled=True), T)
    fake.take()
    (ca,) = sched.task_fork(T, CHILD).inherited
    assert ca.state is OFF
    assert fake.take() == [("hook_task", "a", 200, "fork")]


def test_hook_task_failure_puts_the_child_event_in_error(sched: Scheduler, fake: FakePmu) -> None:
    sched.open(make_attr("a"), T)
    fake.fail_hook["a"] = SymbolError("a: gone")
    (ca,) = sched.task_fork(T, CHILD).inherited
    assert ca.state is ERROR and sched.error(ca) is fake.fail_hook["a"]
    assert [c[0] for c in fake.take()] == ["event_init", "add", "hook_task"]


# ---------------------------------------------------------------- exec: every inherit x enable_on_exec

# `perf stat [-i] -- cmd`: the event is opened on the launched task before its exec, disabled when
# enable_on_exec is asked for; the task execs, forks a child that execs too, both exit.
# Hits: 5 before the exec, 7 after it in the parent, 11 + 13 in the child (before/after its exec).
MATRIX = {
    # (inherit, enable_on_exec): (calls, expected total)
    (True, True): (
        [
            ("event_init", "f", 100),
            # exec of the command: nothing to remove (OFF), re-resolve, enabled by enable_on_exec
            ("hook_task", "f", 100, "exec"),
            ("add", "f", 100, 1),
            # fork: inherited
            ("hook_task", "f", 200, "fork"),
            ("add", "f", 200, 1),
            # the child's exec
            ("remove", "f", 200, 2),
            ("hook_task", "f", 200, "exec"),
            ("add", "f", 200, 1),
            # exits (EF_UPDATE | EF_EXIT)
            ("remove", "f", 200, 6),
            ("remove", "f", 100, 6),
        ],
        7 + 11 + 13,
    ),
    (True, False): (
        [
            ("event_init", "f", 100),
            ("add", "f", 100, 1),
            ("remove", "f", 100, 2),
            ("hook_task", "f", 100, "exec"),
            ("add", "f", 100, 1),
            ("hook_task", "f", 200, "fork"),
            ("add", "f", 200, 1),
            ("remove", "f", 200, 2),
            ("hook_task", "f", 200, "exec"),
            ("add", "f", 200, 1),
            ("remove", "f", 200, 6),
            ("remove", "f", 100, 6),
        ],
        5 + 7 + 11 + 13,
    ),
    (False, True): (
        [
            ("event_init", "f", 100),
            ("hook_task", "f", 100, "exec"),
            ("add", "f", 100, 1),
            # fork: not inherited, the child has nothing; its exec and exit make no calls
            ("remove", "f", 100, 6),
        ],
        7,
    ),
    (False, False): (
        [
            ("event_init", "f", 100),
            ("add", "f", 100, 1),
            ("remove", "f", 100, 2),
            ("hook_task", "f", 100, "exec"),
            ("add", "f", 100, 1),
            ("remove", "f", 100, 6),
        ],
        5 + 7,
    ),
}


@pytest.mark.parametrize(("inherit", "enable_on_exec"), list(MATRIX))
def test_exec_matrix(
    sched: Scheduler, fake: FakePmu, clock: FakeClock, inherit: bool, enable_on_exec: bool
) -> None:
    calls, total = MATRIX[(inherit, enable_on_exec)]
    e = sched.open(make_attr("f", inherit=inherit, enable_on_exec=enable_on_exec, disabled=enable_on_exec), T)
    assert e.state is (OFF if enable_on_exec else ACTIVE)
    fake.hit(T, "f", 5)
    clock.advance(10)

    sched.task_exec(T_EXEC)
    assert e.state is ACTIVE and e.task is T_EXEC
    fake.hit(T_EXEC, "f", 7)
    clock.advance(10)

    got = sched.task_fork(T_EXEC, CHILD)
    assert got.empty is not inherit
    assert got.skipped == (() if inherit else (e,))
    fake.hit(CHILD, "f", 11)
    clock.advance(10)
    sched.task_exec(CHILD_EXEC)
    fake.hit(CHILD_EXEC, "f", 13)
    clock.advance(10)
    if inherit:
        (child,) = e.children
        assert child.state is ACTIVE and child.task is CHILD_EXEC

    sched.task_exit(CHILD_EXEC)
    sched.task_exit(T_EXEC)
    assert fake.take() == calls
    assert e.state is EXIT
    c = sched.read(e)
    assert c.value == total
    # enabled from open (40 ns) or from the exec (30 ns); the child adds its 20 ns
    own = 30 if enable_on_exec else 40
    assert (c.time_enabled, c.time_running) == ((own + 20, own + 20) if inherit else (own, own))
    assert fake.added == []


def test_enable_on_exec_without_disabled_changes_nothing(sched: Scheduler, fake: FakePmu) -> None:
    e = sched.open(make_attr("f", enable_on_exec=True), T)
    fake.hit(T, "f", 5)
    sched.task_exec(T_EXEC)
    fake.hit(T_EXEC, "f", 7)
    assert e.state is ACTIVE and sched.read(e).value == 12


def test_disabled_without_enable_on_exec_stays_off_across_exec(sched: Scheduler, fake: FakePmu) -> None:
    e = sched.open(make_attr("f", disabled=True), T)
    fake.take()
    sched.task_exec(T_EXEC)
    assert fake.take() == [("hook_task", "f", 100, "exec")]
    assert e.state is OFF and not fake.hit(T_EXEC, "f")


def test_enable_on_exec_is_used_up_by_the_first_exec(sched: Scheduler, fake: FakePmu) -> None:
    e = sched.open(make_attr("f", disabled=True, enable_on_exec=True), T)
    sched.task_exec(T_EXEC)
    assert e.state is ACTIVE
    sched.disable(e)
    fake.take()
    sched.task_exec(T)
    assert fake.take() == [("hook_task", "f", 100, "exec")]
    assert e.state is OFF


def test_child_forked_before_exec_is_enabled_by_its_own_exec(sched: Scheduler, fake: FakePmu) -> None:
    e = sched.open(make_attr("f", disabled=True, enable_on_exec=True), T)
    (child,) = sched.task_fork(T, CHILD).inherited
    assert child.state is OFF
    fake.take()
    sched.task_exec(CHILD_EXEC)
    assert fake.take() == [("hook_task", "f", 200, "exec"), ("add", "f", 200, 1)]
    assert child.state is ACTIVE and e.state is OFF


def test_exec_hook_failure_is_an_error(sched: Scheduler, fake: FakePmu) -> None:
    e = sched.open(make_attr("f", disabled=True, enable_on_exec=True), T)
    fake.fail_hook["f"] = SymbolError("f: not in the new image")
    sched.task_exec(T_EXEC)
    assert e.state is ERROR and str(sched.error(e)) == "f: not in the new image"
    assert fake.added == []


def test_exec_with_multiple_events_removes_all_then_hooks_then_adds(sched: Scheduler, fake: FakePmu) -> None:
    sched.open(make_attr("a"), T)
    sched.open(make_attr("p", pinned=True), T)
    sched.open(make_attr("b", disabled=True, enable_on_exec=True), T)
    fake.take()
    sched.task_exec(T_EXEC)
    assert fake.take() == [
        ("remove", "p", 100, 2),
        ("remove", "a", 100, 2),
        ("hook_task", "p", 100, "exec"),
        ("hook_task", "a", 100, "exec"),
        ("hook_task", "b", 100, "exec"),
        ("add", "p", 100, 1),
        ("add", "a", 100, 1),
        ("add", "b", 100, 1),
    ]


# ---------------------------------------------------------------- exit


def test_thread_exit_folds_into_the_parent(sched: Scheduler, fake: FakePmu, clock: FakeClock) -> None:
    e = sched.open(make_attr("f"), T)
    (t1,) = sched.task_clone(T, THREAD).inherited
    (t2,) = sched.task_clone(T, THREAD2).inherited
    clock.advance(100)
    fake.hit(T, "f", 1)
    fake.hit(THREAD, "f", 20)
    fake.hit(THREAD2, "f", 300)
    fake.take()

    sched.task_exit(THREAD)
    assert fake.take() == [("remove", "f", 101, 6)]  # no hook_task at exit
    assert t1.state is EXIT and t1.count == 20
    assert (e.child_count, e.child_time_enabled, e.child_time_running) == (20, 100, 100)
    assert e.children == [t1, t2] and sched.context(THREAD) is None

    clock.advance(50)
    c = sched.read(e)
    assert (c.value, c.time_enabled, c.time_running) == (321, 150 + 100 + 150, 150 + 100 + 150)
    assert sched.per_task(e) == [
        (T, Counts(1, 150, 150)),
        (THREAD, Counts(20, 100, 100)),
        (THREAD2, Counts(300, 150, 150)),
    ]
    assert sum(counts.value for _, counts in sched.per_task(e)) == c.value


def test_exit_of_a_disabled_child_folds_zero(sched: Scheduler, clock: FakeClock) -> None:
    e = sched.open(make_attr("f", disabled=True), T)
    sched.task_fork(T, CHILD)
    clock.advance(100)
    sched.task_exit(CHILD)
    assert (e.child_count, e.child_time_enabled, e.child_time_running) == (0, 0, 0)


def test_grandchild_folds_into_the_user_event_after_its_parent_exited(
    sched: Scheduler, fake: FakePmu, clock: FakeClock
) -> None:
    e = sched.open(make_attr("f"), T)
    (c,) = sched.task_fork(T, CHILD).inherited
    grandchild = FakeTask(tid=300, pid=300)
    (g,) = sched.task_fork(CHILD, grandchild).inherited
    fake.hit(CHILD, "f", 2)
    clock.advance(10)
    sched.task_exit(CHILD)
    fake.hit(grandchild, "f", 3)
    clock.advance(10)
    sched.task_exit(grandchild)
    assert g.parent is e and e.child_count == 5
    assert (e.child_time_enabled, e.child_time_running) == (10 + 20, 10 + 20)
    assert [(t.tid, x.value) for t, x in sched.per_task(e)] == [(100, 0), (200, 2), (300, 3)]
    assert sched.read(e).value == 5


def test_user_event_task_exits_first_children_keep_counting(
    sched: Scheduler, fake: FakePmu, clock: FakeClock
) -> None:
    e = sched.open(make_attr("f"), T)
    sched.task_clone(T, THREAD)
    fake.hit(T, "f", 1)
    sched.task_exit(T)
    assert e.state is EXIT and e.count == 1
    clock.advance(10)
    assert fake.hit(THREAD, "f", 4)
    c = sched.read(e)
    assert (c.value, c.time_enabled, c.time_running) == (5, 10, 10)
    sched.task_exit(THREAD)
    assert sched.read(e).value == 5
    assert fake.added == []


def test_exit_of_an_unknown_task_is_ignored(sched: Scheduler, fake: FakePmu) -> None:
    sched.task_exit(T)
    sched.task_exec(T)
    assert fake.take() == []
