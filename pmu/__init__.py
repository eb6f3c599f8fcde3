"""pmu: perf for user-space probes. The public API: what a script needs to count and read probes.

Names are loaded on first use, so that `pmu` starts quickly and a ^C during start-up is handled by
the command line's own handler rather than surfacing as a traceback from an import.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PmuError": "pmu.errors",
    "EventAttr": "pmu.events.attr",
    "ReadFormat": "pmu.events.attr",
    "Counts": "pmu.events.event",
    "Event": "pmu.events.event",
    "EventState": "pmu.events.event",
    "HookReason": "pmu.events.event",
    "ProbeKind": "pmu.events.spec",
    "ProbeSpec": "pmu.events.spec",
    "parse_event": "pmu.events.spec",
    "parse_event_list": "pmu.events.spec",
    "Evlist": "pmu.evlist",
    "Evsel": "pmu.evlist",
    "RunResult": "pmu.evlist",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pmu' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
