"""The scheduler: per-task event contexts and the code that turns events on and off (perf's core.c part)."""

from pmu.sched.context import EventContext
from pmu.sched.scheduler import Inheritance, PinnedError, Scheduler

__all__ = ["EventContext", "Inheritance", "PinnedError", "Scheduler"]
