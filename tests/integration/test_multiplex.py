"""Multiplexing driven for real: the event loop's 4 ms tick rotates a PMU's events when it has fewer slots
than enabled events, during a traced run of a real command.

The backend is the fake PMU (tests/unit/fakepmu.py) registered as a plug-in that needs the ptrace engine,
with 2 slots and 5 events. The command waits on a pipe that the backend writes to once every event has
held a slot: it ends because the rotation went all the way round, however fast or slow the machine is.
"""

from __future__ import annotations

import os
import sys

import pytest

from pmu import core
from pmu.core import PmuBase, PmuEnv
from pmu.events.event import Event
from pmu.evlist import Evlist
from tests.unit.fakepmu import FakePmu, make_attr

NAMES = "abcde"


class MuxPmu(FakePmu, PmuBase):  # FakePmu's ops, PmuBase's defaults for the rest of the protocol
    needs_tracer = True

    def __init__(self, wake: int) -> None:
        FakePmu.__init__(self, name="fakemux", slots=2)
        self.wake = wake
        self.seen: set[str] = set()

    def add(self, event: Event, flags: int) -> bool:
        fits = FakePmu.add(self, event, flags)
        if fits:
            self.seen.add(event.name)
            if self.seen == set(NAMES) and self.wake >= 0:
                os.write(self.wake, b"x")  # every event has had a slot: let the command end
                os.close(self.wake)
                self.wake = -1
        return fits


@pytest.fixture
def mux_pipe():
    r, w = os.pipe()
    os.set_inheritable(r, True)
    made: list[MuxPmu] = []

    def factory(env: PmuEnv) -> MuxPmu:
        pmu = MuxPmu(w)
        made.append(pmu)
        return pmu

    core.register("fakemux", factory, needs_tracer=True)
    try:
        yield r, made
    finally:
        del core.REGISTRY["fakemux"]
        core.NEEDS_TRACER.pop("fakemux", None)
        core._factories.pop("fakemux", None)
        os.close(r)
        if made and made[0].wake >= 0:
            os.close(made[0].wake)


def test_the_event_loop_tick_rotates_two_slots_among_five_events(mux_pipe) -> None:
    r, made = mux_pipe
    attrs = [make_attr(n, pmu="fakemux", disabled=True, enable_on_exec=True) for n in NAMES]
    evlist = Evlist(attrs)
    result = evlist.run_command([sys.executable, "-c", f"import os; os.read({r}, 1)"])
    assert result.status == 0
    pmu = made[0]
    assert pmu.seen == set(NAMES)
    counts = [evlist.read(evsel) for evsel in evlist.evsels]
    assert all(c is not None for c in counts)
    enabled = {c.time_enabled for c in counts if c is not None}
    running = [c.time_running for c in counts if c is not None]
    assert len(enabled) == 1  # all enabled at the same exec, all ended at the same exit
    # Two slots were always in use: the running times add up to exactly twice the enabled time, and
    # every event ran for part of it only (perf's percentage below 100).
    assert sum(running) == 2 * enabled.pop()
    assert all(0 < c.time_running < c.time_enabled for c in counts if c is not None)
    assert len(pmu.take("add")) >= len(NAMES)
