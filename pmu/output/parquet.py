"""The Parquet writer of `pmu record`: drained ring records in, bounded row groups out, run metadata last.

A file of schema version 1 (`SCHEMA_VERSION`, owned with the metadata keys and their codec by
pmu.recording) has one row per probe hit, in the order the rings gave them:

    time_ns     int64                     CLOCK_MONOTONIC of the hit, in ns
    pid         int32                     process (thread group) id
    tid         int32                     thread id
    event       dictionary<int32, string> the event's name as given with -e
    ip          uint64                    the probed address in the process
    arg0..argN  uint64                    integer argument registers; only when recorded (`nargs` > 0)
    cpu         int32                     the CPU of the hit; only in system-wide recordings (`cpu`)
    retval      uint64, nullable          only with `returns`: rax at a return, null on other rows
    latency_ns  int64, nullable           only with `returns`: return minus entry time; null on other rows
                                          and where the entry was not seen

Row groups hold up to `ROW_GROUP_ROWS` (2**18) rows, written as they fill by a thread of the writer's own
(pyarrow lets go of the GIL while it encodes, so pmu converts the next records meanwhile). The encodings
are chosen for writing speed, as `pmu record` may take tens of millions of records per second on one
core: `event` and `ip` (few distinct values, far apart) are dictionary-encoded, every other column is
DELTA_BINARY_PACKED (increasing times, nearby TIDs and pointers, small integers take a few bits a row;
the worst case is about plain's size); pages are not compressed, and only `time_ns` has min/max
statistics, so that readers can skip row groups by time. The five base columns take about 1.1 bytes per
row (up to 3 when TIDs are far apart). pyarrow, pandas and DuckDB read these files; encodings are no part
of the schema version.

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

Nothing of the file system is touched before there is something to write: the writer checks at start
that PATH can be written (its directory exists and is writable, PATH is no directory), and creates its
temporary file only when the first row group is written, or at `close`. `discard` (a run that failed
before any record) leaves everything as it was. The temporary file is made by `tempfile.mkstemp` in
PATH's directory (`.NAME.XXXXXXXX.tmp`: an unpredictable name, O_CREAT|O_EXCL, mode 0600, so a link
planted in a world-writable directory is never followed nor written through) and `close` renames it
to PATH, so PATH is either the previous file or a whole, valid new one; an existing PATH is then kept
as PATH.old (a hard link made before the rename, so PATH never goes missing), as perf does with
perf.data. A PATH that is not a regular file, such as /dev/null or a pipe, is written in place instead.
`close` is idempotent and meant for a `finally:` block, so Ctrl-C or a crashed command still leave a
valid file. Parquet's footer is written at close: if pmu itself is killed (SIGKILL, OOM), the data
written so far is lost and the temporary file is left behind, as perf.data is left unusable. pyarrow
writes from C++, so a Ctrl-C (KeyboardInterrupt) is raised between row groups, never inside one; but
one that interrupts `close` itself leaves the temporary file, maybe incomplete.

pandas reads the nullable uint64 `retval` as float64 unless asked otherwise: use
`pandas.read_parquet(path, dtype_backend="numpy_nullable")` (or "pyarrow") to keep it exact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import re
import resource
import tempfile
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from pmu import __version__
from pmu.errors import FileError
from pmu.hits import Hits
from pmu.recording import (  # the format's owner; re-exported for the writer's users
    EVENTS_KEY,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    VERSION_KEY,
    decode_metadata,
)
from pmu.recording import encode_metadata as encode_metadata  # (re-exported)
from pmu.ring import FLAG_RETURN, MAX_ARGS, RECORD_DTYPE

ROW_GROUP_ROWS: Final = 1 << 18
"""Rows per row group of `RecordWriter` by default."""
_DICTIONARY_COLUMNS: Final = frozenset({"event", "ip"})
"""Dictionary-encoded columns (few distinct values); the others are DELTA_BINARY_PACKED."""
_STATISTICS_COLUMNS: Final = frozenset({"time_ns"})
"""Columns with min/max statistics per row group."""
WARMUP_HEADROOM: Final = 32 << 20
"""Address space `prepare` wants left under a limit before pyarrow first writes, buffers and thread
already taken (the first row group of the widest schema took less than 4 MiB more, with pyarrow's
system pool, on the 2-vCPU VM), so that pyarrow never meets the limit itself."""
GUARD_HEADROOM: Final = 8 << 20
"""Address space each later call into pyarrow wants left under a limit (after the warm-up they took
none more: pyarrow's allocator and the writer thread's malloc arena keep what the first one took)."""
_GATHER_ROWS: Final = 8192
"""Records (1 MiB) converted to columns at a time, so the passes over their fields find them in cache."""


def schema(events: Sequence[str], nargs: int, returns: bool, cpu: bool = False) -> pa.Schema:
    """The Arrow schema of a file with these options (the event names do not change it)."""
    fields = [
        pa.field("time_ns", pa.int64(), nullable=False),
        pa.field("pid", pa.int32(), nullable=False),
        pa.field("tid", pa.int32(), nullable=False),
        pa.field("event", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("ip", pa.uint64(), nullable=False),
    ]
    fields += [pa.field(f"arg{i}", pa.uint64(), nullable=False) for i in range(nargs)]
    if cpu:
        fields.append(pa.field("cpu", pa.int32(), nullable=False))
    if returns:
        fields += [pa.field("retval", pa.uint64()), pa.field("latency_ns", pa.int64())]
    return pa.schema(fields)


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


def address_space_left() -> int | None:
    """Bytes pmu may still map under RLIMIT_AS (`ulimit -v`), None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return soft - int(line.split()[1]) * 1024
    return None


def _need_address_space(need: int, what: str) -> None:
    """MemoryError unless `need` bytes can still be mapped: pyarrow's C++ code aborts the process
    (std::bad_alloc thrown where nothing catches it: arrow::stl::allocator, `new` of an encoder) when an
    allocation fails inside a write, so under a limit pmu makes sure there is room before calling it."""
    left = address_space_left()
    if left is not None and left < need:
        raise MemoryError(
            f"out of memory: {what} needs {need >> 20} MiB more address space than "
            f"the limit (ulimit -v) leaves ({max(left, 0) >> 20} MiB)"
        )


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _writer_options(schema: pa.Schema) -> dict[str, Any]:
    """ParquetWriter's options for the columns of `schema`, but compression."""
    options: dict[str, Any] = {
        "use_dictionary": [n for n in schema.names if n in _DICTIONARY_COLUMNS],
        "column_encoding": {n: "DELTA_BINARY_PACKED" for n in schema.names if n not in _DICTIONARY_COLUMNS},
        "write_statistics": [n for n in schema.names if n in _STATISTICS_COLUMNS],
    }
    return options


def _plain(kind: pa.DataType, values: npt.NDArray[Any]) -> pa.Array:
    """A contiguous numpy column as an Arrow array, zero-copy. (pa.array would do, but its first call
    imports pandas to ask whether its argument is a pandas object: 0.15 s of every pmu record.)"""
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


def _strings(texts: Sequence[str]) -> pa.Array:
    """A string array built from its buffers (see `_plain` for why not pa.array)."""
    data = [t.encode() for t in texts]
    offsets = np.cumsum([0, *(len(d) for d in data)], dtype=np.int32)
    return pa.StringArray.from_buffers(len(data), pa.py_buffer(offsets), pa.py_buffer(b"".join(data)))


def _nullable(kind: pa.DataType, values: npt.NDArray[Any], valid: npt.NDArray[np.bool_]) -> pa.Array:
    """`values` as an Arrow array, null where not `valid` (bitmap packed by numpy: 4x faster than mask=)."""
    nulls = len(valid) - int(np.count_nonzero(valid))
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    return pa.Array.from_buffers(kind, len(values), [bitmap, pa.py_buffer(values)], null_count=nulls)


class _Sequential:
    """A device or a pipe as pyarrow's sink, written in order: Parquet asks where it is in the file,
    and lseek cannot tell on a pipe, so the position is the count of bytes written."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        self._position = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view)
            self._position += n
            view = view[n:]
        return len(data)

    def tell(self) -> int:
        return self._position

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        """Nothing is buffered here."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)


class RecordWriter:
    """Streams RECORD_DTYPE arrays into a Parquet file in row groups of `row_group_rows`, then closes it.

    `events` are the names of event indexes 0..len-1; `nargs` how many args columns; `returns` whether
    there are `retval`/`latency_ns` columns; `metadata` the run's known-at-start keys (strings, see
    `encode_metadata`); `pmu.schema_version`, `pmu.events` and a default `pmu.version` are added. FileError
    on any write failure.

    Records are copied into the columns of one row group, allocated at the first write (28 bytes a row,
    8 more per arg, 20 more with returns: 7 MiB to 24 MiB at 2**18 rows), handed to the background
    thread when full while a second set of columns fills: memory stays at two row groups whatever the
    length of the run. `background=False` writes in the caller's thread.
    Cost, on a 2-vCPU AMD EPYC VM with pyarrow 26, for 5M records of 4 threads handed over in batches of
    10k to 1M: about 20-25 ns a row and 1.1 bytes (no args, no returns), 70-80 ns and 9.5 bytes with 2 args
    (one a heap pointer) and returns, 95-100 ns and 14 bytes with 6 args and returns; the nullable
    `retval`/`latency_ns` cost most. Batches of 1M rows no longer fit in the cache, hence the upper
    figures. `compression` ("lz4", "snappy", "zstd") saves little after these encodings: zstd makes
    files 2-11% smaller for 3-20 ns more a row; lz4 and snappy, 0.5-5% for up to 8 ns.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        events: Sequence[str],
        nargs: int,
        returns: bool,
        metadata: Mapping[str, str],
        row_group_rows: int = ROW_GROUP_ROWS,
        *,
        compression: str = "none",
        background: bool = True,
        cpu: bool = False,
    ) -> None:
        if not 0 <= nargs <= MAX_ARGS:
            raise ValueError(f"nargs must be 0..{MAX_ARGS}, not {nargs}")
        if row_group_rows < 1:
            raise ValueError(f"row_group_rows must be positive, not {row_group_rows}")
        if not events:
            raise ValueError("no events")
        self.path = os.fspath(path)
        # A device or a pipe (-o /dev/null, -o /dev/stdout) is written as it is: never renamed over.
        self.special = (
            os.path.exists(self.path) and not os.path.isfile(self.path) and not os.path.isdir(self.path)
        )
        self.tmp_path: str | None = None
        """The file being written (PATH itself when `special`); None until the first write to disk."""
        self.events = tuple(events)
        self.nargs = nargs
        self.returns = returns
        self.row_group_rows = row_group_rows
        self.rows_written = 0
        """Rows handed to `write` so far."""
        self.cpu = cpu
        """The file has a cpu column (system-wide recordings)."""
        self.schema = schema(self.events, nargs, returns, cpu)
        self._metadata = {VERSION_KEY: __version__, **metadata}
        self._metadata.update({SCHEMA_VERSION_KEY: str(SCHEMA_VERSION), EVENTS_KEY: json.dumps(self.events)})
        self._dictionary = _strings(self.events)
        self._dtypes = [np.int64, np.int32, np.int32, np.int32, np.uint64] + [np.uint64] * nargs
        if cpu:
            self._dtypes.append(np.int32)
        if returns:
            self._dtypes += [np.uint64, np.int64, np.uint32]  # retval, latency_ns, flags
        self._buffers: list[npt.NDArray[Any]] = []
        """One row group's columns, in schema order (then flags), allocated at the first write."""
        self._rows = 0
        """Rows in `_buffers`, not yet written."""
        self.background = background
        """Row groups are written by a thread of their own while the caller fills the next."""
        self._sets = 0
        self._queue: queue.Queue[tuple[pa.Table, list[npt.NDArray[Any]]] | None] = queue.Queue()
        self._free: queue.Queue[list[npt.NDArray[Any]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._error: Exception | None = None
        """The failure that closed the writer (FileError, MemoryError), raised again by later writes."""
        self._file: Any = None
        self._writer: Any = None
        self._fd: int | None = None
        """The temporary file, kept open to check that its name still names it before the rename."""
        self._compression = compression
        self._check_writable()

    @property
    def failed(self) -> bool:
        """A write or close failed: the file is gone and later writes raise that failure again."""
        return self._error is not None

    def _check_writable(self) -> None:
        """FileError now, before anything runs, if PATH cannot be written; touches nothing."""
        if os.path.isdir(self.path):
            code = errno.EISDIR
        elif self.special:
            code = 0 if os.access(self.path, os.W_OK) else errno.EACCES
        else:
            directory = os.path.dirname(self.path) or "."
            if not os.path.isdir(directory):
                code = errno.ENOENT if not os.path.exists(directory) else errno.ENOTDIR
            elif os.access(directory, os.W_OK | os.X_OK):
                code = 0
            else:
                readonly = os.statvfs(directory).f_flag & os.ST_RDONLY
                code = errno.EROFS if readonly else errno.EACCES
        if code:
            raise FileError(f"cannot write {self.path}: {os.strerror(code)}")

    def _open(self) -> None:
        """Create the file to write (see the module's docstring) and its Parquet writer."""
        self._guard("opening the Parquet writer")
        try:
            if self.special:
                self.tmp_path = self.path
                self._file = pa.PythonFile(_Sequential(self.path), mode="w")
            else:
                directory, name = os.path.split(self.path)
                self._fd, self.tmp_path = tempfile.mkstemp(
                    suffix=".tmp", prefix=f".{name}.", dir=directory or "."
                )
                # pyarrow opens by name: /proc/self/fd names the very file made, whatever is done
                # meanwhile to its name in the directory.
                self._file = pa.OSFile(f"/proc/self/fd/{self._fd}", "wb")
            self._writer = pq.ParquetWriter(
                self._file, self.schema, compression=self._compression, **_writer_options(self.schema)
            )
        except OSError as e:
            raise self._fail(e) from None

    def write(self, records: npt.NDArray[Any]) -> None:
        """Append `records` (RECORD_DTYPE, `time` already in CLOCK_MONOTONIC ns and `thread` a TID).

        ValueError for another dtype or an event index without a name (and then none of `records` is
        written); FileError if writing fails.
        """
        self._check_open()
        if records.dtype != RECORD_DTYPE:
            raise ValueError(f"records must be of RECORD_DTYPE, not {records.dtype}")
        self.write_hits(Hits.of_records(records, self.nargs))

    def write_hits(self, hits: Hits) -> None:
        """Append a batch of hits given as columns (for instance views of a ring's records, converted where
        they are); as `write` otherwise."""
        self._check_open()
        n = len(hits.time)
        if n == 0:
            return
        if len(hits.args) < self.nargs:
            raise ValueError(f"{len(hits.args)} args columns for a file of {self.nargs}")
        fields = [hits.time, hits.pid, hits.tid, hits.event, hits.ip, *hits.args[: self.nargs]]
        if self.cpu:
            fields.append(hits.cpu if hits.cpu is not None else np.broadcast_to(np.int32(-1), n))
        if self.returns:
            if hits.retval is not None and hits.latency_ns is not None and hits.flags is not None:
                fields += [hits.retval, hits.latency_ns, hits.flags]
            else:
                fields += [np.broadcast_to(np.uint64(0), n), np.broadcast_to(np.int64(-1), n)]
                fields.append(np.broadcast_to(np.uint32(0), n))
        self._append(fields, hits.event)

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise ValueError(f"write to closed {self.path}")

    def _append(self, fields: list[npt.NDArray[Any]], event: npt.NDArray[Any]) -> None:
        self._raise_failure()
        n = len(fields[0])
        if not self._buffers:
            self._buffers = self._next_buffers()
        checked = n > self.row_group_rows - self._rows  # a row group is written before the last record
        if checked:
            self._check_events(event)
        done = 0
        while done < n:
            count = min(n - done, self.row_group_rows - self._rows)
            self._gather(fields, done, count)
            if not checked:
                self._check_events(self._buffers[3][self._rows : self._rows + count].view(np.uint32))
            self._rows += count
            self.rows_written += count
            done += count
            if self._rows == self.row_group_rows:
                self._flush()

    def _gather(self, fields: list[npt.NDArray[Any]], start: int, count: int) -> None:
        """Copy `fields[start:start+count]` into the buffers after the rows they hold.

        One column at a time over `_GATHER_ROWS` records (128 KiB of each field): the 128-byte records
        are read from memory once and the other columns find them in the cache.
        """
        at = self._rows - start
        for lo in range(start, start + count, _GATHER_ROWS):
            hi = min(lo + _GATHER_ROWS, start + count)
            for buffer, field in zip(self._buffers, fields, strict=True):
                buffer[at + lo : at + hi] = field[lo:hi]

    def _check_events(self, event: npt.NDArray[np.uint32]) -> None:
        top = int(event.max())
        if top >= len(self.events):
            raise ValueError(f"event index {top} has no name ({len(self.events)} events)")

    def _guard(self, what: str) -> None:
        """`_need_address_space(GUARD_HEADROOM)` before a call into pyarrow; the writer gives up when
        there is no room (the MemoryError is raised again by later writes)."""
        try:
            _need_address_space(GUARD_HEADROOM, what)
        except MemoryError as e:
            self._abort()
            self._error = e
            raise

    def _flush(self) -> None:
        """Write the rows in the buffers as one row group."""
        self._guard("writing a row group")
        b = [buffer[: self._rows] for buffer in self._buffers]
        columns: list[pa.Array] = [
            _plain(pa.int64(), b[0]),
            _plain(pa.int32(), b[1]),
            _plain(pa.int32(), b[2]),
            pa.DictionaryArray.from_arrays(_plain(pa.int32(), b[3]), self._dictionary, safe=False),
            _plain(pa.uint64(), b[4]),
        ]
        columns += [_plain(pa.uint64(), a) for a in b[5 : 5 + self.nargs]]
        after = 5 + self.nargs
        if self.cpu:
            columns.append(_plain(pa.int32(), b[after]))
            after += 1
        if self.returns:
            retval, latency, flags = b[after:]
            is_return = (flags & FLAG_RETURN) != 0
            columns.append(_nullable(pa.uint64(), retval, is_return))
            columns.append(_nullable(pa.int64(), latency, is_return & (latency >= 0)))
        table = pa.Table.from_arrays(columns, schema=self.schema)  # zero-copy: views of the buffers
        self._rows = 0
        if self._writer is None:
            self._open()
        if not self.background:
            self._write_table(table)
            return
        self._start_thread()
        self._queue.put((table, self._buffers))
        self._buffers = self._next_buffers()
        self._raise_failure()

    def _write_table(self, table: pa.Table) -> None:
        try:
            self._writer.write_table(table, row_group_size=len(table))
        except OSError as e:
            raise self._fail(e) from None
        except Exception as e:
            self._abort()
            self._error = e
            raise

    def _start_thread(self) -> None:
        if self._thread is None:
            thread = threading.Thread(target=self._work, name="pmu-parquet", daemon=True)
            try:
                thread.start()
            except RuntimeError as e:  # "can't start new thread": no room for its stack
                raise MemoryError(f"out of memory: cannot start the Parquet writer's thread ({e})") from None
            self._thread = thread

    def prepare(self) -> None:
        """Take now, before the run, what writing will take: both sets of row-group buffers and the
        background thread; under an address-space limit (`ulimit -v`), also write one row group of
        the worst case (every value far from the last) to nowhere, so that the allocators of pyarrow
        and of the thread hold what later row groups need. MemoryError if any of that cannot be had,
        while nothing is traced yet; never a failure inside pyarrow, which would abort the process."""
        if self._closed or self._sets:
            return
        try:
            self._prepare()
        except BaseException:
            self._abort()
            raise

    def _prepare(self) -> None:
        self._buffers = self._next_buffers()
        self._free.put(self._next_buffers())
        if self.background:
            self._start_thread()
        if address_space_left() is None:
            return
        _need_address_space(WARMUP_HEADROOM, "the Parquet writer")
        n = self.row_group_rows
        spread = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        for k, buffer in enumerate(self._buffers):
            if k == 3:
                buffer[:] = 0  # event indexes must name an event
            else:
                buffer[:] = spread.view(np.int64) if buffer.dtype.kind == "i" else spread.astype(buffer.dtype)
        self._rows = n
        real = self._writer
        self._writer = pq.ParquetWriter(
            pa.MockOutputStream(), self.schema, compression=self._compression, **_writer_options(self.schema)
        )
        try:
            self._flush()  # through the thread that will write the real row groups
            self._queue.join()
            self._raise_failure()
            self._writer.close()
        finally:
            self._writer = real

    def _next_buffers(self) -> list[npt.NDArray[Any]]:
        """A free set of row-group buffers: a new one while fewer than two exist, else the one the
        background thread gives back once it has written it."""
        if self._sets < 2:
            self._sets += 1
            return [np.empty(self.row_group_rows, t) for t in self._dtypes]
        return self._free.get()

    def _work(self) -> None:
        """The background thread: writes each row group handed over (pyarrow lets go of the GIL while
        it encodes), then gives its buffers back. After a failure it only gives buffers back."""
        while (item := self._queue.get()) is not None:
            table, buffers = item
            if self._failure is None:
                try:
                    _need_address_space(GUARD_HEADROOM, "writing a row group")
                    self._writer.write_table(table, row_group_size=len(table))
                except BaseException as e:  # reported by the caller's next write or close
                    self._failure = e
            del table, item
            self._free.put(buffers)
            self._queue.task_done()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _raise_failure(self) -> None:
        e = self._failure
        if e is not None:
            if isinstance(e, OSError):
                raise self._fail(e) from None
            self._abort()
            if isinstance(e, Exception):
                self._error = e
            raise e

    def _fail(self, e: OSError) -> FileError:
        """Give up after `e` (see `_abort`); the FileError to raise, raised again by later writes."""
        self._abort()
        error = FileError(_message("cannot write", self.path, e))
        self._error = error
        return error

    def close(self, final_metadata: Mapping[str, str] | None = None) -> None:
        """Write what is pending and the metadata, and rename the temporary file to PATH. Idempotent.

        `final_metadata` holds the keys known only at the end (pmu.lost, pmu.lost_per_event,
        pmu.hits_per_event); a key already given at start is a ValueError. After a FileError from
        `write`, close does nothing (the temporary file is already gone). FileError if finishing the
        file fails; on any failure the temporary file is removed and PATH left as it was.
        """
        if self._closed:
            return
        final = dict(final_metadata or {})
        again = sorted(set(final) & set(self._metadata) - {"pmu.version"})
        if again:
            raise ValueError(f"metadata given twice: {', '.join(again)}")
        try:
            if self._rows:
                self._flush()
            self._closed = True
            self._stop_thread()
            self._raise_failure()
            if self._writer is None:
                self._open()  # a run without a record: still a valid file, as perf writes one
            self._guard("writing the file's footer")
            self._writer.add_key_value_metadata({**self._metadata, **final})
            self._writer.close()
            self._file.close()
            if not self.special:
                self._rename()
        except OSError as e:
            raise self._fail(e) from None
        except BaseException as e:
            self._abort()
            if isinstance(e, Exception):
                self._error = e
            raise
        self._writer = self._file = None
        self._buffers = []

    def _rename(self) -> None:
        """The finished temporary file becomes PATH; a PATH that was there stays as PATH.old."""
        assert self.tmp_path is not None and self._fd is not None
        if not self._names_ours():
            raise FileExistsError(errno.EEXIST, f"{self.tmp_path} was replaced while pmu wrote it")
        os.fchmod(self._fd, 0o666 & ~_umask())  # private until now; then as open(2) would make PATH
        if os.path.lexists(self.path):
            old = self.path + ".old"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)
            try:
                os.link(self.path, old, follow_symlinks=False)
            except OSError:  # no hard links here (vfat...): PATH goes missing for a moment
                os.replace(self.path, old)
        os.replace(self.tmp_path, self.path)
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Give up without writing: remove the temporary file if one was made, leave PATH (and PATH.old)
        as they were. For a run that failed before it recorded anything. Idempotent."""
        self._abort()

    def _abort(self) -> None:
        """Give up: close what is open, remove the temporary file; later writes raise, closes do
        nothing."""
        self._closed = True
        self._stop_thread()
        self._buffers = []
        self._rows = 0
        for thing in (self._writer, self._file):
            if thing is not None:
                with contextlib.suppress(Exception):  # already failing: the first error is the one reported
                    thing.close()
        self._writer = self._file = None
        if self.tmp_path is not None and not self.special:
            with contextlib.suppress(OSError):
                if self._names_ours():  # never remove a file someone else put under that name
                    os.unlink(self.tmp_path)
            self.tmp_path = None
        self._close_fd()

    def _names_ours(self) -> bool:
        """Whether `tmp_path` still names the temporary file pmu made."""
        assert self.tmp_path is not None
        if self._fd is None:
            return False
        ours, named = os.fstat(self._fd), os.lstat(self.tmp_path)
        return (ours.st_dev, ours.st_ino) == (named.st_dev, named.st_ino)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
