"""The kernel's generic counters by the names perf gives them (`perf list sw`, `perf list hw`): pure data.

A name maps to its perf_event_attr `type` and `config` (include/uapi/linux/perf_event.h), its unit in
`perf stat` output and whether its count is a time in nanoseconds (printed in msec, as perf does).
"""

from __future__ import annotations

from dataclasses import dataclass

TYPE_HARDWARE = 0
TYPE_SOFTWARE = 1


@dataclass(frozen=True)
class CounterSpec:
    """One generic counter event as the user wrote it (`task-clock`, `cs`, `cycles`)."""

    text: str
    """The event as written (its name in output)."""
    name: str
    """perf's canonical name (`context-switches` for `cs`)."""
    type: int
    """TYPE_HARDWARE or TYPE_SOFTWARE."""
    config: int
    """The PERF_COUNT_HW_* / PERF_COUNT_SW_* number."""

    @property
    def pmu(self) -> str:
        """The registry name of the backend that serves it."""
        return "hardware" if self.type == TYPE_HARDWARE else "software"

    @property
    def is_time(self) -> bool:
        """The count is nanoseconds (task-clock, cpu-clock): perf prints it in msec."""
        return self.type == TYPE_SOFTWARE and self.config in (0, 1)

    @property
    def unit(self) -> str:
        return "msec" if self.is_time else ""


# (canonical name, aliases, type, config)
_TABLE: tuple[tuple[str, tuple[str, ...], int, int], ...] = (
    ("cpu-cycles", ("cycles",), TYPE_HARDWARE, 0),
    ("instructions", (), TYPE_HARDWARE, 1),
    ("cache-references", (), TYPE_HARDWARE, 2),
    ("cache-misses", (), TYPE_HARDWARE, 3),
    ("branch-instructions", ("branches",), TYPE_HARDWARE, 4),
    ("branch-misses", (), TYPE_HARDWARE, 5),
    ("bus-cycles", (), TYPE_HARDWARE, 6),
    ("stalled-cycles-frontend", ("idle-cycles-frontend",), TYPE_HARDWARE, 7),
    ("stalled-cycles-backend", ("idle-cycles-backend",), TYPE_HARDWARE, 8),
    ("ref-cycles", (), TYPE_HARDWARE, 9),
    ("cpu-clock", (), TYPE_SOFTWARE, 0),
    ("task-clock", (), TYPE_SOFTWARE, 1),
    ("page-faults", ("faults",), TYPE_SOFTWARE, 2),
    ("context-switches", ("cs",), TYPE_SOFTWARE, 3),
    ("cpu-migrations", ("migrations",), TYPE_SOFTWARE, 4),
    ("minor-faults", (), TYPE_SOFTWARE, 5),
    ("major-faults", (), TYPE_SOFTWARE, 6),
    ("alignment-faults", (), TYPE_SOFTWARE, 7),
    ("emulation-faults", (), TYPE_SOFTWARE, 8),
    ("dummy", (), TYPE_SOFTWARE, 9),
)

NAMES: dict[str, tuple[str, int, int]] = {
    alias: (name, type_, config) for name, aliases, type_, config in _TABLE for alias in (name, *aliases)
}
"""{every accepted name and alias: (canonical name, type, config)}."""

DEFAULT_SET: tuple[str, ...] = (
    "task-clock",
    "context-switches",
    "cpu-migrations",
    "page-faults",
    "cycles",
    "instructions",
    "branches",
    "branch-misses",
)
"""What `perf stat -- CMD` counts when no -e is given (perf 6.1's default_attrs0 and default_attrs1)."""


def counter(text: str) -> CounterSpec | None:
    """The counter named `text` (perf's names and aliases), or None if it is not one."""
    found = NAMES.get(text.strip())
    if found is None:
        return None
    name, type_, config = found
    return CounterSpec(text=text.strip(), name=name, type=type_, config=config)


def names(kind: int) -> list[str]:
    """Canonical names of one type, in perf list's order."""
    return [name for name, _, type_, _ in _TABLE if type_ == kind]
