"""pmu: perf for user-space probes. The public API: what a script needs to count and read probes."""

from pmu.errors import PmuError
from pmu.events.attr import EventAttr, ReadFormat
from pmu.events.event import Counts, Event, EventState, HookReason
from pmu.events.spec import ProbeKind, ProbeSpec, parse_event, parse_event_list
from pmu.evlist import Evlist, RunResult

__version__ = "0.1.0"

__all__ = [
    "Counts",
    "Event",
    "EventAttr",
    "EventState",
    "Evlist",
    "HookReason",
    "PmuError",
    "ProbeKind",
    "ProbeSpec",
    "ReadFormat",
    "RunResult",
    "parse_event",
    "parse_event_list",
    "__version__",
]
