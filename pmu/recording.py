"""The recording format's one owner: schema version, columns, metadata keys and their codec.

`pmu record` (through pmu.output.parquet, which writes), `pmu report` and `pmu.analysis` (which read)
all take these from here; nothing here imports pyarrow, so reading the format costs nothing.

Metadata lives in the Parquet footer's key-value pairs, every value a string: JSON for JSON_KEYS,
decimal for INT_KEYS, text otherwise (the keys are listed in pmu/output/parquet.py's docstring).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from pmu.errors import FileError

SCHEMA_VERSION: Final = 1
"""Version of the columns and metadata; bumped by any change a reader must know of (optional columns
that old readers ignore, such as `cpu`, are not one)."""
DEFAULT_PATH: Final = "pmu.parquet"
"""Where `pmu record` writes, and `pmu report` reads, when no file is named."""
REQUIRED_COLUMNS: Final = ("time_ns", "pid", "tid", "event", "ip")
"""Columns every recording has; the others (argN, cpu, retval, latency_ns) are optional."""
INTEGER_COLUMNS: Final = ("time_ns", "pid", "tid", "ip", "cpu", "retval", "latency_ns")
"""Columns that must hold integers (so must every argN)."""

PREFIX: Final = "pmu."
SCHEMA_VERSION_KEY: Final = "pmu.schema_version"
VERSION_KEY: Final = "pmu.version"
COMMAND_KEY: Final = "pmu.command"
EVENTS_KEY: Final = "pmu.events"
START_TIME_KEY: Final = "pmu.start_time"
START_MONOTONIC_KEY: Final = "pmu.start_monotonic_ns"
SAMPLE_PERIOD_KEY: Final = "pmu.sample_period"
LOST_KEY: Final = "pmu.lost"
LOST_PER_EVENT_KEY: Final = "pmu.lost_per_event"
HITS_PER_EVENT_KEY: Final = "pmu.hits_per_event"
CLOCK_ERROR_KEY: Final = "pmu.clock_error_ns"

JSON_KEYS: Final = frozenset({COMMAND_KEY, EVENTS_KEY, LOST_PER_EVENT_KEY, HITS_PER_EVENT_KEY})
"""Metadata values that are JSON."""
INT_KEYS: Final = frozenset(
    {SCHEMA_VERSION_KEY, START_MONOTONIC_KEY, LOST_KEY, SAMPLE_PERIOD_KEY, CLOCK_ERROR_KEY}
)
"""Metadata values that are decimal integers."""
_COUNT_KEYS: Final = frozenset({LOST_KEY, CLOCK_ERROR_KEY})
"""Integer keys that are never negative (sample_period is at least 1)."""


def start_metadata(
    command: Sequence[str], events: Sequence[str], sample_period: int, start_time: str, start_ns: int
) -> dict[str, str]:
    """What a recording says about itself from its start."""
    return {
        SCHEMA_VERSION_KEY: str(SCHEMA_VERSION),
        COMMAND_KEY: json.dumps(list(command)),
        EVENTS_KEY: json.dumps(list(events)),
        START_TIME_KEY: start_time,
        START_MONOTONIC_KEY: str(start_ns),
        SAMPLE_PERIOD_KEY: str(sample_period),
    }


def final_metadata(
    lost: int, lost_per_event: Mapping[str, int], hits_per_event: Mapping[str, int], clock_error_ns: int
) -> dict[str, str]:
    """What a recording says about itself at its end."""
    return {
        LOST_KEY: str(lost),
        LOST_PER_EVENT_KEY: json.dumps({k: n for k, n in lost_per_event.items() if n}),
        HITS_PER_EVENT_KEY: json.dumps(dict(hits_per_event)),
        CLOCK_ERROR_KEY: str(clock_error_ns),
    }


def encode_metadata(values: Mapping[str, Any]) -> dict[str, str]:
    """Metadata values as the file stores them: strings as they are, lists and dicts as JSON, ints as text."""
    out = {}
    for key, value in values.items():
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, list | tuple | dict):
            out[key] = json.dumps(value)
        else:
            out[key] = str(value)
    return out


def decode_metadata(
    raw: Mapping[bytes, bytes] | Mapping[str, str], strict: str | None = None
) -> dict[str, Any]:
    """The pmu.* keys of a file's key-value metadata (keys as stored), JSON_KEYS parsed, INT_KEYS as
    ints. A value that does not decode is kept as stored; with `strict` (the file's name), it is a
    FileError instead, as is a value of a shape pmu record never writes: a report made of it would be
    wrong."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode("utf-8", "replace") if isinstance(k, bytes) else k
        if not key.startswith(PREFIX):
            continue
        try:
            text = v.decode("utf-8") if isinstance(v, bytes) else v
            value: Any = text
            if key in JSON_KEYS:
                value = json.loads(text)
            elif key in INT_KEYS:
                value = int(text)
        except ValueError:
            if strict is not None:
                raise _corrupt(strict, key, v) from None
            value = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
        if strict is not None and not _well_formed(key, value):
            raise _corrupt(strict, key, v)
        out[key] = value
    return out


def _corrupt(name: str, key: str, raw: bytes | str) -> FileError:
    data = raw.encode() if isinstance(raw, str) else raw
    shown = data[:40].decode("utf-8", "replace") + ("..." if len(data) > 40 else "")
    return FileError(f"cannot read {name}: corrupt metadata ({key} is {shown!r})")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _well_formed(key: str, value: Any) -> bool:
    """Whether a decoded metadata value has the shape pmu record writes."""
    if key in (COMMAND_KEY, EVENTS_KEY):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if key in (LOST_PER_EVENT_KEY, HITS_PER_EVENT_KEY):
        return isinstance(value, dict) and all(_is_count(v) for v in value.values())
    if key == SAMPLE_PERIOD_KEY:
        return _is_count(value) and value >= 1
    if key in _COUNT_KEYS:
        return _is_count(value)
    return True
