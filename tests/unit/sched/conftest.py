"""Fixtures for the scheduler tests: a fake clock, a recording fake PMU and a scheduler over them."""

from __future__ import annotations

import pytest

from pmu.sched import Scheduler
from tests.unit.fakepmu import FakeClock, FakePmu


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake() -> FakePmu:
    return FakePmu()


@pytest.fixture
def sched(fake: FakePmu, clock: FakeClock) -> Scheduler:
    return Scheduler({"uprobe": fake}, clock=clock)
