"""The Pmu contract (pmu/core.py), checked the same way against every backend (conftest.py's adapters):
the fake PMU, pmu's ptrace uprobe engine, the kernel's uprobe PMU, the software counters and the hardware
counters (on a machine without a hardware PMU: <not supported>, and the run goes on).

Each test is one point of the contract. Runs are real processes under real ptrace or perf_event_open
(tests/targets/contract.c); every expected count is the workload's own (for a kernel counter: that of an
independent counter on the same command, the workload's own a lower bound), never a rate or a time.
"""

from __future__ import annotations

import pytest

from pmu.errors import PmuError
from tests.contract.conftest import (
    COUNT_STEPS,
    FORK_STEPS,
    SERVED,
    Backend,
    CounterBackend,
    FakeBackend,
    HardwareBackend,
    own,
)

ALL = ("parent", "child")


def _no_hardware(backend: Backend) -> bool:
    return isinstance(backend, HardwareBackend) and not backend.machine_counts()


NO_HARDWARE = "this machine has no hardware PMU: the event is <not supported> and never counts"


def test_1_a_bad_event_is_refused_in_one_line_and_nothing_is_armed(backend: Backend) -> None:
    before = backend.armed()
    refusals = backend.refuse()
    assert refusals
    for r in refusals:
        assert isinstance(r.error, PmuError), f"{r.how}: {r.error!r}"
        message = str(r.error)
        assert message and "\n" not in message, f"{r.how}: {message!r}"
        assert r.kept_events == 0, f"{r.how}: the scheduler kept {r.kept_events} events or contexts"
        assert not r.ran, f"{r.how}: the command ran although its event was refused"
    assert backend.armed() == before, "something stayed armed (perf fds, tracefs, target bytes, processes)"


def test_2_a_launched_command_is_counted_exactly(backend: Backend) -> None:
    run = backend.run(COUNT_STEPS)
    assert run.status == 0, run.procs
    (parent,) = run.procs
    assert parent.calls == 1000 and parent.bad == 0
    expected = own(run.procs, backend.unit, *ALL)
    if _no_hardware(backend):
        assert not run.supported
        assert run.counts is None  # never counted: no value, no times
        assert backend.not_supported_line().startswith("<not supported>,")  # type: ignore[attr-defined]
        return
    assert run.supported
    assert run.counts is not None
    if backend.exact:
        assert run.counts.value == expected
    elif isinstance(backend, HardwareBackend):
        assert run.counts.value >= expected  # no exact reference exists for a hardware counter
    else:
        assert run.witness is not None
        assert run.counts.value == run.witness.value  # what the kernel counted on the command
        assert run.counts.value >= expected  # and at least the workload's fresh pages


def test_3_inherit_counts_forked_children_and_only_then(backend: Backend) -> None:
    if _no_hardware(backend):
        pytest.skip(NO_HARDWARE + ": nothing to see inherited")
    on = backend.run(FORK_STEPS, inherit=True)
    off = backend.run(FORK_STEPS, inherit=False)
    for run in (on, off):
        assert run.status == 0, run.procs
        assert [p.role for p in run.procs] == ["child", "child", "parent"], run.procs
        assert all(p.bad == 0 for p in run.procs)
        assert run.counts is not None
    parent = own(on.procs, backend.unit, "parent")
    children = own(on.procs, backend.unit, "child")
    assert on.counts is not None and off.counts is not None
    if on.fork_hooks is not None:
        assert on.fork_hooks == 2  # hook_task(FORK) for each child, and only with inherit
        assert off.fork_hooks == 0
    if backend.exact:
        assert on.counts.value == parent + children
        assert off.counts.value == parent
    elif isinstance(backend, HardwareBackend):
        assert on.counts.value > off.counts.value
    else:
        assert on.witness is not None and off.witness is not None
        assert on.counts.value == on.witness.value
        assert off.counts.value == off.witness.value
        assert on.counts.value >= parent + children
        assert off.counts.value < children  # the children's 4000 fresh pages are not in it


def test_4_counts_carry_enabled_and_running_times(backend: Backend) -> None:
    if _no_hardware(backend):
        pytest.skip(NO_HARDWARE + ": it never ran, so it has no times (Evlist.read gives None)")
    run = backend.run(COUNT_STEPS)
    c = run.counts
    assert c is not None
    assert c.time_enabled >= c.time_running > 0
    assert c.time_running == c.time_enabled  # one event, nothing multiplexed
    assert run.keeps_time is backend.kernel_times
    if run.elapsed is not None:
        assert c.time_enabled == run.elapsed  # the fake: exactly the clock from exec to exit
    if run.witness is not None:  # the kernel's times: the same as its independent counter's
        assert (c.time_enabled, c.time_running) == (run.witness.time_enabled, run.witness.time_running)


def test_5_nothing_of_the_backend_is_left_after_the_run(backend: Backend) -> None:
    if isinstance(backend, FakeBackend):
        run = backend.run(FORK_STEPS)
        assert run.left_added == []
        assert run.unmatched == 0  # every add() matched by one remove()
        return
    before = backend.armed()  # a launched command that forks: nothing stays once it has run
    run = backend.run(FORK_STEPS)
    assert run.status == 0, run.procs
    assert backend.armed() == before, "something stayed armed (perf fds, tracefs, target bytes, processes)"
    a = backend.attach()
    assert a.fds_after == a.fds_before, "perf_event fds left open in pmu's process"
    assert a.tracefs_after == a.tracefs_before, "tracefs uprobe_events left behind"
    assert a.code_before == a.code_file
    assert a.code_after == a.code_file, "the target's code at f() is not what the file holds"
    assert a.new_maps == [], "mappings left in the target"
    assert a.state not in ("t", "T"), f"the target was left stopped ({a.state})"
    assert a.tracer == 0, "the target is still traced"
    assert a.served == f"done {SERVED} 0"
    assert a.after_round == "done 10 0"  # it still runs, and f() still gives the right results
    assert a.status == 0
    if _no_hardware(backend):
        assert not a.supported and a.counts is None
    else:
        assert a.counts is not None
        if backend.exact:
            assert a.counts.value == SERVED
        else:
            assert a.counts.value >= SERVED


def test_6_describe_is_one_line_and_supported_says_what_the_machine_counts(backend: Backend) -> None:
    run = backend.run(["10"])
    for text in (run.describe, run.pmu_describe):
        assert text.strip() and "\n" not in text, repr(text)
    assert run.supported is backend.machine_counts()
    if not run.supported:
        assert "not supported" in run.describe


def test_7_hits_while_the_event_is_stopped_are_not_counted(backend: Backend) -> None:
    if _no_hardware(backend):
        pytest.skip(NO_HARDWARE + ": there is no counter to stop and start")
    for via in backend.stop_vias:
        r = backend.stop_start(via)
        assert r.toggles == 2, via
        if r.exact:
            assert r.counted == r.enabled_work, via  # none of the disabled_work calls
        else:
            assert r.counted >= r.enabled_work, via
        for on, work, counted in r.phases:
            if not on:
                assert counted == 0, (via, r.phases)
            elif r.exact:
                assert counted == work, (via, r.phases)
            else:
                assert counted >= work, (via, r.phases)
        if isinstance(backend, CounterBackend):
            assert [on for on, _, _ in r.phases] == [True, False, True]
