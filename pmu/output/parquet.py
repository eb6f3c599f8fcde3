"""The Parquet writer of `pmu record`: drained ring records in, bounded row groups out, run metadata last.

A file of schema version 1 (`SCHEMA_VERSION`) has one row per probe hit, in the order the rings gave them:

    time_ns     int64                     CLOCK_MONOTONIC of the hit, in ns
    pid         int32                     process (thread group) id
    tid         int32                     thread id
    event       dictionary<int32, string> the event's name as given with -e
    ip          uint64                    the probed address in the process
    arg0..argN  uint64                    integer argument registers; only when recorded (`nargs` > 0)
    retval      uint64, nullable          only with `returns`: rax at a return, null on other rows
    latency_ns  int64, nullable           only with `returns`: return minus entry time; null on other rows
                                          and where the entry was not seen

The run's metadata is in the file's key-value metadata (Parquet's footer), all values strings, JSON where
structured; `read_metadata` decodes it. pyarrow's `read_table(...).schema.metadata` does not show it:
use `read_metadata`, `pyarrow.parquet.read_metadata(path).metadata` or DuckDB's `parquet_kv_metadata`.

    pmu.schema_version      "1"
    pmu.version             pmu's version
    pmu.command             JSON list: the command line recorded
    pmu.events              JSON list: the event names, in event-index order
    pmu.start_time          ISO 8601 wall clock at the start of the run
    pmu.start_monotonic_ns  CLOCK_MONOTONIC at that moment, to relate time_ns to the wall clock
    pmu.lost                records lost (rings full), in all
    pmu.lost_per_event      JSON {event name: records lost}
    pmu.hits_per_event      JSON {event name: exact number of hits, lost records included}
    pmu.sample_period       record one hit in this many

The file is written as PATH.tmp and renamed to PATH by `close`, so PATH is either absent or a whole,
valid file; an existing PATH is first renamed to PATH.old, as perf does with perf.data. `close` is
idempotent and meant for a `finally:` block, so Ctrl-C or a crashed command still leave a valid file.
Parquet's footer is written at close: if pmu itself is killed (SIGKILL, OOM), the data written so far is
lost and PATH.tmp is left behind, as perf.data is left unusable. pyarrow writes from C++, so a Ctrl-C
(KeyboardInterrupt) is raised between row groups, never inside one; but one that interrupts `close`
itself leaves PATH.tmp, maybe incomplete (block SIGINT around `close` to rule that out).

pandas reads the nullable uint64 `retval` as float64 unless asked otherwise: use
`pandas.read_parquet(path, dtype_backend="numpy_nullable")` (or "pyarrow") to keep it exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from pmu import __version__
from pmu.errors import FileError
from pmu.ring import FLAG_RETURN, MAX_ARGS, RECORD_DTYPE

SCHEMA_VERSION: Final = 1
"""Version of the columns and metadata above; bumped by any change a reader must know of."""

JSON_KEYS: Final = frozenset({"pmu.command", "pmu.events", "pmu.lost_per_event", "pmu.hits_per_event"})
"""Metadata values that are JSON."""
INT_KEYS: Final = frozenset({"pmu.schema_version", "pmu.start_monotonic_ns", "pmu.lost", "pmu.sample_period"})
"""Metadata values that are decimal integers."""


def schema(events: Sequence[str], nargs: int, returns: bool) -> pa.Schema:
    """The Arrow schema of a file with these options (the event names do not change it)."""
    fields = [
        pa.field("time_ns", pa.int64(), nullable=False),
        pa.field("pid", pa.int32(), nullable=False),
        pa.field("tid", pa.int32(), nullable=False),
        pa.field("event", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("ip", pa.uint64(), nullable=False),
    ]
    fields += [pa.field(f"arg{i}", pa.uint64(), nullable=False) for i in range(nargs)]
    if returns:
        fields += [pa.field("retval", pa.uint64()), pa.field("latency_ns", pa.int64())]
    return pa.schema(fields)


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


def decode_metadata(raw: Mapping[bytes, bytes] | Mapping[str, str]) -> dict[str, Any]:
    """The pmu.* keys of a file's key-value metadata, decoded (JSON_KEYS parsed, INT_KEYS as int)."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else k
        text = v.decode() if isinstance(v, bytes) else v
        if not key.startswith("pmu."):
            continue
        value: Any = text
        try:
            if key in JSON_KEYS:
                value = json.loads(text)
            elif key in INT_KEYS:
                value = int(text)
        except ValueError:
            pass  # a value we cannot decode is shown as it is stored
        out[key] = value
    return out


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The run metadata of a pmu Parquet file, decoded; FileError if it cannot be read as Parquet."""
    try:
        raw = pq.read_metadata(path).metadata or {}
    except OSError as e:
        raise FileError(_message("cannot read", path, e)) from None
    except pa.ArrowException as e:
        raise FileError(f"cannot read {os.fspath(path)}: not a Parquet file ({_first_line(e)})") from None
    return decode_metadata(raw)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


_ERRNO_RE: Final = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)


def _message(what: str, path: str | os.PathLike[str], e: BaseException) -> str:
    """`cannot write PATH: No space left on device`: one line, from an OSError of Python or of pyarrow."""
    errno = getattr(e, "errno", None)
    if not isinstance(errno, int):
        m = _ERRNO_RE.search(str(e))
        errno = int(m.group(1)) if m else None
    reason = os.strerror(errno) if errno else _first_line(e)
    return f"{what} {os.fspath(path)}: {reason}"


class RecordWriter:
    """Streams RECORD_DTYPE arrays into a Parquet file in row groups of `row_group_rows`, then closes it.

    `events` are the names of event indexes 0..len-1; `nargs` how many args columns; `returns` whether
    there are `retval`/`latency_ns` columns; `metadata` the run's known-at-start keys (strings, see
    `encode_metadata`); `pmu.schema_version`, `pmu.events` and a default `pmu.version` are added. Memory
    stays below about two row groups whatever the length of the run. FileError on any write failure.
    `compression`: zstd makes files about 40% smaller than snappy for about 100 ns more per row.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        events: Sequence[str],
        nargs: int,
        returns: bool,
        metadata: Mapping[str, str],
        row_group_rows: int = 65536,
        *,
        compression: str = "zstd",
    ) -> None:
        if not 0 <= nargs <= MAX_ARGS:
            raise ValueError(f"nargs must be 0..{MAX_ARGS}, not {nargs}")
        if row_group_rows < 1:
            raise ValueError(f"row_group_rows must be positive, not {row_group_rows}")
        if not events:
            raise ValueError("no events")
        self.path = os.fspath(path)
        self.tmp_path = self.path + ".tmp"
        self.events = tuple(events)
        self.nargs = nargs
        self.returns = returns
        self.row_group_rows = row_group_rows
        self.rows_written = 0
        """Rows handed to `write` so far."""
        self.schema = schema(self.events, nargs, returns)
        self._metadata = {"pmu.version": __version__, **metadata}
        self._metadata.update(
            {"pmu.schema_version": str(SCHEMA_VERSION), "pmu.events": json.dumps(self.events)}
        )
        self._dictionary = pa.array(self.events, pa.string())
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._closed = False
        self._file: Any = None
        self._writer: Any = None
        try:
            if os.path.isdir(self.path) or os.path.isdir(self.tmp_path):
                raise IsADirectoryError(21, os.strerror(21))
            self._file = pa.OSFile(self.tmp_path, "wb")
            self._writer = pq.ParquetWriter(self._file, self.schema, compression=compression)
            if os.path.lexists(self.path):
                os.replace(self.path, self.path + ".old")
        except OSError as e:
            self._abort()
            raise FileError(_message("cannot write", self.path, e)) from None

    def write(self, records: npt.NDArray[Any]) -> None:
        """Append `records` (RECORD_DTYPE, `time` already in CLOCK_MONOTONIC ns and `thread` a TID).

        ValueError for another dtype or an event index without a name; FileError if writing fails.
        """
        if self._closed:
            raise ValueError(f"write to closed {self.path}")
        if records.dtype != RECORD_DTYPE:
            raise ValueError(f"records must be of RECORD_DTYPE, not {records.dtype}")
        if len(records) == 0:
            return
        table = self._table(records)
        self.rows_written += len(records)
        self._pending.append(table)
        self._pending_rows += len(records)
        if self._pending_rows >= self.row_group_rows:
            self._flush(final=False)

    def _table(self, records: npt.NDArray[Any]) -> pa.Table:
        event = records["event"]
        if int(event.max()) >= len(self.events):
            raise ValueError(f"event index {int(event.max())} has no name ({len(self.events)} events)")
        columns: list[pa.Array] = [
            pa.array(np.ascontiguousarray(records["time"])),
            pa.array(np.ascontiguousarray(records["pid"])),
            pa.array(records["thread"].astype(np.int32)),
            pa.DictionaryArray.from_arrays(pa.array(event.astype(np.int32)), self._dictionary),
            pa.array(np.ascontiguousarray(records["ip"])),
        ]
        args = records["args"]
        columns += [pa.array(np.ascontiguousarray(args[:, i])) for i in range(self.nargs)]
        if self.returns:
            not_return = (records["flags"] & FLAG_RETURN) == 0
            latency = records["latency_ns"]
            columns.append(pa.array(np.ascontiguousarray(records["retval"]), mask=not_return))
            columns.append(pa.array(np.ascontiguousarray(latency), mask=not_return | (latency < 0)))
        return pa.Table.from_arrays(columns, schema=self.schema)

    def _flush(self, final: bool) -> None:
        """Write every whole row group pending (and, if final, the rest)."""
        table = pa.concat_tables(self._pending)
        whole = len(table) if final else len(table) - len(table) % self.row_group_rows
        try:
            for start in range(0, whole, self.row_group_rows):
                self._writer.write_table(
                    table.slice(start, self.row_group_rows), row_group_size=self.row_group_rows
                )
        except OSError as e:
            self._abort()
            raise FileError(_message("cannot write", self.path, e)) from None
        rest = table.slice(whole)
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)

    def close(self, final_metadata: Mapping[str, str] | None = None) -> None:
        """Write what is pending and the metadata, and rename PATH.tmp to PATH. Idempotent.

        `final_metadata` holds the keys known only at the end (pmu.lost, pmu.lost_per_event,
        pmu.hits_per_event); a key already given at start is a ValueError. After a FileError from
        `write`, close only removes PATH.tmp. FileError if finishing the file fails.
        """
        if self._closed:
            return
        final = dict(final_metadata or {})
        again = sorted(set(final) & set(self._metadata) - {"pmu.version"})
        if again:
            raise ValueError(f"metadata given twice: {', '.join(again)}")
        self._closed = True
        try:
            if self._pending_rows:
                self._flush(final=True)
            self._writer.add_key_value_metadata({**self._metadata, **final})
            self._writer.close()
            self._file.close()
            os.replace(self.tmp_path, self.path)
        except OSError as e:
            self._abort()
            raise FileError(_message("cannot write", self.path, e)) from None
        self._writer = self._file = None

    def _abort(self) -> None:
        """Give up: close what is open, remove PATH.tmp; later writes raise, closes do nothing."""
        self._closed = True
        self._pending = []
        self._pending_rows = 0
        for thing in (self._writer, self._file):
            if thing is not None:
                with contextlib.suppress(Exception):  # already failing: the first error is the one reported
                    thing.close()
        self._writer = self._file = None
        with contextlib.suppress(OSError):
            os.unlink(self.tmp_path)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
