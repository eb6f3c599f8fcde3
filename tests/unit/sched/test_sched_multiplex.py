"""Scheduler and PMU slots: multiplexing by rotation, pinned events, add() refusing or failing."""

from __future__ import annotations

import pytest

from pmu.errors import PmuError, RelocationError
from pmu.events.event import EventState
from pmu.sched import PinnedError, Scheduler
from tests.unit.fakepmu import FakeClock, FakePmu, FakeTask, make_attr

OFF, INACTIVE, ACTIVE, ERROR = EventState.OFF, EventState.INACTIVE, EventState.ACTIVE, EventState.ERROR
T = FakeTask(tid=100, pid=100)
THREAD = FakeTask(tid=101, pid=100)


def test_three_events_on_one_slot_share_it(sched: Scheduler, fake: FakePmu, clock: FakeClock) -> None:
    fake.slots = 1
    a, b, c = (sched.open(make_attr(n), T) for n in "abc")
    assert [x.state for x in (a, b, c)] == [ACTIVE, INACTIVE, INACTIVE]
    assert fake.take("add") == [("add", "a", 100, 1)]  # b and c are not even tried
    ctx = sched.context(T)
    assert ctx is not None and ctx.rotate_pmus == {"uprobe"}

    rates = {"a": 1, "b": 2, "c": 3}  # true hits per 10 ns tick
    for _ in range(30):
        for name, n in rates.items():
            fake.hit(T, name, n)  # counted only for the event that holds the slot
        clock.advance(10)
        sched.rotate()

    for x in (a, b, c):
        counts = sched.read(x)
        assert counts.time_enabled == 300
        assert counts.time_running == 100
        assert counts.value == 10 * rates[x.name]
        assert counts.scaled == pytest.approx(30 * rates[x.name])
        assert counts.percent_running == pytest.approx(100 / 3)
    assert ctx.rotations == 30


def test_one_rotation_step(sched: Scheduler, fake: FakePmu) -> None:
    fake.slots = 1
    for n in "abc":
        sched.open(make_attr(n), T)
    fake.take()
    sched.rotate()
    assert fake.take() == [("remove", "a", 100, 2), ("add", "b", 100, 1)]
    ctx = sched.context(T)
    assert ctx is not None and [e.name for e in ctx.flexible] == ["b", "c", "a"]
    sched.rotate()
    sched.rotate()
    assert fake.take("add") == [("add", "c", 100, 1), ("add", "a", 100, 1)]


def test_two_slots_three_events_each_runs_two_thirds(
    sched: Scheduler, fake: FakePmu, clock: FakeClock
) -> None:
    fake.slots = 2
    events = [sched.open(make_attr(n), T) for n in "abc"]
    for _ in range(3):
        clock.advance(10)
        sched.rotate()
    assert [(sched.read(e).time_enabled, sched.read(e).time_running) for e in events] == [(30, 20)] * 3


def test_no_rotation_when_everything_fits(sched: Scheduler, fake: FakePmu) -> None:
    fake.slots = 3
    for n in "abc":
        sched.open(make_attr(n), T)
    fake.take()
    sched.rotate()
    assert fake.take() == []


def test_slots_are_per_task_context(sched: Scheduler, fake: FakePmu) -> None:
    fake.slots = 1
    for n in "ab":
        sched.open(make_attr(n), T)
    sched.task_clone(T, THREAD)
    assert fake.active_names(T) == ["a"] and fake.active_names(THREAD) == ["a"]
    sched.rotate()
    assert fake.active_names(T) == ["b"] and fake.active_names(THREAD) == ["b"]


def test_rotation_only_turns_the_crowded_pmu(fake: FakePmu, clock: FakeClock) -> None:
    fake.slots = 1
    roomy = FakePmu(name="roomy")
    sched = Scheduler({"uprobe": fake, "roomy": roomy}, clock=clock)
    sched.open(make_attr("a"), T)
    x = sched.open(make_attr("x", pmu="roomy"), T)
    sched.open(make_attr("b"), T)
    y = sched.open(make_attr("y", pmu="roomy"), T)
    roomy.take()
    fake.take()
    sched.rotate()
    assert roomy.take() == []
    assert fake.take() == [("remove", "a", 100, 2), ("add", "b", 100, 1)]
    assert x.state is ACTIVE and y.state is ACTIVE


def test_disabled_events_take_no_slot_and_disable_frees_one(sched: Scheduler, fake: FakePmu) -> None:
    fake.slots = 1
    off = sched.open(make_attr("off", disabled=True), T)
    a = sched.open(make_attr("a"), T)
    b = sched.open(make_attr("b"), T)
    assert (off.state, a.state, b.state) == (OFF, ACTIVE, INACTIVE)
    fake.take()
    sched.disable(a)
    assert fake.take() == [("remove", "a", 100, 2), ("add", "b", 100, 1)]
    assert (a.state, b.state) == (OFF, ACTIVE)
    ctx = sched.context(T)
    assert ctx is not None and ctx.rotate_pmus == set()


# ---------------------------------------------------------------- pinned


def test_pinned_keeps_its_slot_and_flexible_ones_wait(sched: Scheduler, fake: FakePmu) -> None:
    fake.slots = 2
    f1 = sched.open(make_attr("f1"), T)
    f2 = sched.open(make_attr("f2"), T)
    fake.take()
    p = sched.open(make_attr("p", pinned=True), T)
    # a newly enabled pinned event reschedules the flexible ones around it (perf's ctx_resched)
    assert fake.take() == [
        ("event_init", "p", 100),
        ("remove", "f1", 100, 2),
        ("remove", "f2", 100, 2),
        ("add", "p", 100, 1),
        ("add", "f1", 100, 1),
    ]
    assert (p.state, f1.state, f2.state) == (ACTIVE, ACTIVE, INACTIVE)
    for _ in range(4):
        sched.rotate()
        assert p.state is ACTIVE
        assert [f1.state, f2.state].count(ACTIVE) == 1
    assert all(c[1] != "p" for c in fake.take())


def test_pinned_that_does_not_fit_goes_to_error(sched: Scheduler, fake: FakePmu, clock: FakeClock) -> None:
    fake.slots = 1
    p1 = sched.open(make_attr("p1", pinned=True), T)
    p2 = sched.open(make_attr("p2", pinned=True), T)
    assert (p1.state, p2.state) == (ACTIVE, ERROR)
    assert isinstance(sched.error(p2), PinnedError)
    assert fake.take("add") == [("add", "p1", 100, 1)]
    clock.advance(100)
    sched.rotate()
    assert sched.read(p2).time_enabled == 0
    assert p2.state is ERROR

    sched.disable(p1)  # an ERROR event may be enabled again: it gets the freed slot
    sched.enable(p2)
    assert (p1.state, p2.state) == (OFF, ACTIVE) and sched.error(p2) is None


def test_pinned_refused_by_the_pmu_goes_to_error(sched: Scheduler, fake: FakePmu) -> None:
    fake.refuse.add("p")
    p = sched.open(make_attr("p", pinned=True), T)
    assert p.state is ERROR and isinstance(sched.error(p), PinnedError)


def test_flexible_refused_by_the_pmu_waits_for_rotation(sched: Scheduler, fake: FakePmu) -> None:
    fake.refuse.add("a")
    a = sched.open(make_attr("a"), T)
    b = sched.open(make_attr("b"), T)
    # each sched-in tries a again; once a finds no room, b (same PMU, later in the list) is not tried
    assert (a.state, b.state) == (INACTIVE, INACTIVE)
    assert fake.take("add") == [("add", "a", 100, 1), ("add", "a", 100, 1)]
    sched.rotate()  # a goes to the tail: b gets its chance, a is refused again
    assert fake.take("add") == [("add", "b", 100, 1), ("add", "a", 100, 1)]
    assert (a.state, b.state) == (INACTIVE, ACTIVE)
    ctx = sched.context(T)
    assert ctx is not None and ctx.rotate_pmus == {"uprobe"}


# ---------------------------------------------------------------- add() raising


def test_add_raising_puts_the_event_in_error_and_keeps_the_error(
    sched: Scheduler, fake: FakePmu, clock: FakeClock
) -> None:
    fake.slots = 1
    err = RelocationError("a: cannot relocate 'jmp rel8' at 0x1139")
    fake.fail_add["a"] = err
    a = sched.open(make_attr("a"), T)
    b = sched.open(make_attr("b"), T)
    assert a.state is ERROR and sched.error(a) is err
    assert b.state is ACTIVE  # the failed add used no slot
    clock.advance(10)
    assert sched.read(a).time_enabled == 0

    del fake.fail_add["a"]
    sched.disable(b)
    sched.enable(a)
    assert a.state is ACTIVE and sched.error(a) is None


def test_add_raising_on_a_child_errors_only_the_child(sched: Scheduler, fake: FakePmu) -> None:
    e = sched.open(make_attr("a"), T)
    fake.fail_add["a"] = PmuError("no room for an out-of-line slot")
    (c,) = sched.task_clone(T, THREAD).inherited
    assert (e.state, c.state) == (ACTIVE, ERROR)
    assert sched.error(c) is fake.fail_add["a"] and sched.error(e) is None


def test_two_slots_five_events_scaled_counts_and_perf_percentages(
    sched: Scheduler, fake: FakePmu, clock: FakeClock
) -> None:
    """Acceptance of issue 10: the rotation over 2 slots and 5 events, read as `pmu stat` prints it."""
    from pmu.output.stat import C_NUMBERS, StatLine, StatReport, format_csv, format_text

    fake.slots = 2
    names = "abcde"
    events = [sched.open(make_attr(n), T) for n in names]
    rates = {n: i + 1 for i, n in enumerate(names)}  # true hits per 4 ms tick
    seen: list[list[str]] = []
    for _ in range(50):  # 50 ticks of perf's 4 ms: every event holds a slot 2 ticks in 5
        seen.append(fake.active_names(T))
        for name, n in rates.items():
            fake.hit(T, name, n)
        clock.advance(4_000_000)
        sched.rotate()
    assert seen[:6] == [["a", "b"], ["b", "c"], ["c", "d"], ["d", "e"], ["e", "a"], ["a", "b"]]
    lines = []
    for e in events:
        counts = sched.read(e)
        assert counts.time_enabled == 200_000_000
        assert counts.time_running == 80_000_000
        assert counts.value == 20 * rates[e.name]
        assert counts.scaled == 50 * rates[e.name]  # the true total
        assert counts.percent_running == 40.0
        lines.append(StatLine(e.name, counts))
    report = StatReport(command=["cmd"], lines=lines, elapsed_s=0.2, user_s=0.0, sys_s=0.0)
    text = format_text(report, C_NUMBERS).splitlines()
    assert text[3].startswith("                50      a ") and text[3].endswith("  (40.00%)")
    assert text[7].startswith("               250      e ") and text[7].endswith("  (40.00%)")
    assert format_csv(report, ",").splitlines()[1] == "100,,b,80000000,40.00,,"
