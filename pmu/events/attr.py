"""EventAttr: what the user asked for, frozen; the counterpart of the kernel's perf_event_attr."""

from __future__ import annotations

from dataclasses import dataclass

from pmu.events.counters import CounterSpec
from pmu.events.spec import EventSpec, ProbeSpec


@dataclass(frozen=True)
class ReadFormat:
    """Which extra values a read of the event returns (perf's read_format bits)."""

    total_time_enabled: bool = True
    """Report how long the event was enabled (perf's PERF_FORMAT_TOTAL_TIME_ENABLED)."""
    total_time_running: bool = True
    """Report how long the event was actually counting (PERF_FORMAT_TOTAL_TIME_RUNNING)."""


@dataclass(frozen=True)
class EventAttr:
    """The request for one event, as perf_event_attr is for perf_event_open."""

    spec: EventSpec
    """What the event counts: the parsed `-e` string (a probe, or a generic counter)."""
    pmu: str = "uprobe"
    """Registry name of the PMU that serves this event (pmu.core.REGISTRY)."""
    disabled: bool = False
    """Start the event off; it counts only once enabled (by enable_on_exec or an explicit enable)."""
    inherit: bool = True
    """Forked children get an inherited copy of the event whose count folds into this one at exit."""
    enable_on_exec: bool = False
    """Enable the event when its task calls exec (with disabled=True: count only the exec'd program)."""
    pinned: bool = False
    """Must always be on the PMU; if it cannot be scheduled it goes to ERROR instead of multiplexing."""
    sample_period: int = 0
    """0: count only. N>0: write a record for every N-th hit into the event's ring buffer."""
    sample_args: int = 0
    """Number of x86-64 SysV argument registers (0..6) to store in each sample record."""
    latency: bool = False
    """A return probe also keeps a log2 histogram of its calls' latencies (pmu stat --latency)."""
    read_format: ReadFormat = ReadFormat()
    """What a read returns besides the count."""

    @property
    def name(self) -> str:
        """The event's name in output: the event string as written."""
        return self.spec.text

    @property
    def probe(self) -> ProbeSpec:
        """The probe of a probe event (TypeError for a counter: only probe backends ask)."""
        if not isinstance(self.spec, ProbeSpec):
            raise TypeError(f"{self.spec.text} is not a probe")
        return self.spec

    @property
    def counter(self) -> CounterSpec | None:
        """The generic counter this event counts, or None for a probe."""
        return self.spec if isinstance(self.spec, CounterSpec) else None
