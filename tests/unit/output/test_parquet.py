"""Tests of the `pmu record` Parquet writer: schema, row groups, metadata, .old/.tmp, and failures."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pmu import __version__
from pmu.errors import FileError
from pmu.output.parquet import (
    ROW_GROUP_ROWS,
    SCHEMA_VERSION,
    RecordWriter,
    decode_metadata,
    encode_metadata,
    read_metadata,
    schema,
)
from pmu.ring import FLAG_RETURN, RECORD_DTYPE, Ring

EVENTS = ["main", "libc:malloc", "libc:malloc%return"]


def records(n: int, start: int = 0) -> np.ndarray:
    """n records as `pmu record` hands them over: time in ns, thread a TID; every third one a return."""
    i = np.arange(start, start + n, dtype=np.uint64)
    r = np.zeros(n, RECORD_DTYPE)
    r["seq"] = i + 1
    r["time"] = 10**12 + i * 1000
    r["thread"] = 2000 + i % 3
    r["pid"] = 2000
    r["event"] = i % 3
    r["ip"] = 0x401000 + (i % 3) * 0x10
    r["args"][:, 0] = i
    r["args"][:, 1] = ~i
    r["args"][:, 2] = 7
    ret = i % 3 == 2
    r["flags"] = np.where(ret, FLAG_RETURN, 0)
    r["retval"] = np.where(ret, np.uint64(2**63) + i, 0)
    r["latency_ns"] = np.where(
        ret & (i % 6 != 5), i.astype(np.int64) * 10, -1
    )  # some returns without an entry
    return r


START = {
    "pmu.command": json.dumps(["./app", "--fast"]),
    "pmu.start_time": "2026-05-09T07:35:25.123456+00:00",
    "pmu.start_monotonic_ns": "123456789",
    "pmu.sample_period": "1",
}
FINAL = {
    "pmu.lost": "5",
    "pmu.lost_per_event": json.dumps({"main": 2, "libc:malloc": 3, "libc:malloc%return": 0}),
    "pmu.hits_per_event": json.dumps({"main": 40, "libc:malloc": 40, "libc:malloc%return": 40}),
}


def write_file(
    path: Path, n: int, *, nargs: int = 2, returns: bool = True, chunk: int = 1000, **kw: Any
) -> None:
    w = RecordWriter(path, EVENTS, nargs, returns, START, **kw)
    try:
        for s in range(0, n, chunk):
            w.write(records(min(chunk, n - s), s))
    finally:
        w.close(FINAL)


def test_schema_columns() -> None:
    s = schema(EVENTS, 3, True)
    assert s.names == ["time_ns", "pid", "tid", "event", "ip", "arg0", "arg1", "arg2", "retval", "latency_ns"]
    assert [str(t) for t in s.types] == [
        "int64",
        "int32",
        "int32",
        "dictionary<values=string, indices=int32, ordered=0>",
        "uint64",
        "uint64",
        "uint64",
        "uint64",
        "uint64",
        "int64",
    ]
    assert s.field("retval").nullable and s.field("latency_ns").nullable and not s.field("ip").nullable
    assert schema(EVENTS, 0, False).names == ["time_ns", "pid", "tid", "event", "ip"]


def test_round_trip_pyarrow(tmp_path: Path) -> None:
    path = tmp_path / "pmu.parquet"
    write_file(path, 3000, nargs=3)
    t = pq.read_table(path)
    assert t.schema.equals(schema(EVENTS, 3, True))
    assert t.num_rows == 3000
    r = records(3000)
    np.testing.assert_array_equal(t["time_ns"].to_numpy(), r["time"])
    np.testing.assert_array_equal(t["pid"].to_numpy(), r["pid"])
    np.testing.assert_array_equal(t["tid"].to_numpy(), r["thread"])
    np.testing.assert_array_equal(t["ip"].to_numpy(), r["ip"])
    for i in range(3):
        np.testing.assert_array_equal(t[f"arg{i}"].to_numpy(), r["args"][:, i])
    assert t["event"].to_pylist() == [EVENTS[e] for e in r["event"]]
    ret = (r["flags"] & FLAG_RETURN) != 0
    retval = t["retval"].to_pylist()
    latency = t["latency_ns"].to_pylist()
    for k in range(3000):
        assert retval[k] == (int(r["retval"][k]) if ret[k] else None)
        assert latency[k] == (int(r["latency_ns"][k]) if ret[k] and r["latency_ns"][k] >= 0 else None)
    assert retval[2] == 2**63 + 2  # exact beyond 2**53
    assert not (tmp_path / "pmu.parquet.tmp").exists()


def test_event_column_is_dictionary_encoded(tmp_path: Path) -> None:
    path = tmp_path / "pmu.parquet"
    write_file(path, 5000, row_group_rows=1000)
    t = pq.read_table(path)
    assert t.schema.field("event").type == pa.dictionary(pa.int32(), pa.string())
    col = pq.ParquetFile(path).metadata.row_group(0).column(3)
    assert col.path_in_schema == "event"
    assert any("DICTIONARY" in enc for enc in col.encodings)
    assert col.has_dictionary_page


def test_encodings_statistics_and_compression(tmp_path: Path) -> None:
    """Chosen for writing speed: dictionaries for event and ip, deltas elsewhere, time_ns statistics only."""
    path = tmp_path / "pmu.parquet"
    write_file(path, 5000, nargs=2)
    md = pq.ParquetFile(path).metadata
    assert md.num_row_groups == 1 and ROW_GROUP_ROWS == 2**18
    columns = [md.row_group(0).column(i) for i in range(md.num_columns)]
    dictionary = {c.path_in_schema for c in columns if c.has_dictionary_page}
    assert dictionary == {"event", "ip"}
    for c in columns:
        assert c.compression == "UNCOMPRESSED"
        if c.path_in_schema not in dictionary:
            assert "DELTA_BINARY_PACKED" in c.encodings, c.path_in_schema
    assert [c.path_in_schema for c in columns if c.is_stats_set] == ["time_ns"]
    stats = columns[0].statistics
    assert (stats.min, stats.max) == (10**12, 10**12 + 4999 * 1000)
    write_file(path, 5000, nargs=2, compression="zstd")
    md = pq.ParquetFile(path).metadata
    assert {md.row_group(0).column(i).compression for i in range(md.num_columns)} == {"ZSTD"}
    assert pq.read_table(path)["arg1"].to_pylist() == [2**64 - 1 - i for i in range(5000)]


def test_round_trip_pandas(tmp_path: Path) -> None:
    path = tmp_path / "pmu.parquet"
    write_file(path, 999)
    df = pd.read_parquet(path)
    assert len(df) == 999
    assert isinstance(df["event"].dtype, pd.CategoricalDtype)
    assert list(df["event"].cat.categories) == EVENTS
    assert df["time_ns"].dtype == np.int64 and df["ip"].dtype == np.uint64 and df["arg1"].dtype == np.uint64
    assert df["retval"].isna().sum() == 666
    exact = pd.read_parquet(path, dtype_backend="numpy_nullable")
    assert str(exact["retval"].dtype) == "UInt64"
    assert exact["retval"][2] == 2**63 + 2
    assert exact["latency_ns"].isna().sum() == 666 + 166  # non-returns, and returns i = 5 (mod 6)


def test_no_args_no_returns(tmp_path: Path) -> None:
    path = tmp_path / "pmu.parquet"
    write_file(path, 10, nargs=0, returns=False)
    assert pq.read_table(path).column_names == ["time_ns", "pid", "tid", "event", "ip"]


def test_row_groups_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "pmu.parquet"
    write_file(path, 25_000, chunk=3333, row_group_rows=4096)
    md = pq.ParquetFile(path).metadata
    sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    assert sizes == [4096] * 6 + [25_000 - 6 * 4096]
    t = pq.read_table(path)
    np.testing.assert_array_equal(t["time_ns"].to_numpy(), records(25_000)["time"])


def test_row_groups_are_written_as_they_fill(tmp_path: Path) -> None:
    path = tmp_path / "pmu.parquet"
    w = RecordWriter(path, EVENTS, 0, False, START, row_group_rows=100)
    w.write(records(250))
    size = os.path.getsize(w.tmp_path)
    assert size > 0 and not path.exists()
    assert w.rows_written == 250
    w.write(records(1000, 250))
    assert os.path.getsize(w.tmp_path) > size
    w.close()
    assert pq.ParquetFile(path).metadata.num_row_groups == 13


def test_metadata(tmp_path: Path) -> None:
    path = tmp_path / "pmu.parquet"
    write_file(path, 10)
    meta = read_metadata(path)
    assert meta == {
        "pmu.schema_version": SCHEMA_VERSION,
        "pmu.version": __version__,
        "pmu.command": ["./app", "--fast"],
        "pmu.events": EVENTS,
        "pmu.start_time": "2026-05-09T07:35:25.123456+00:00",
        "pmu.start_monotonic_ns": 123456789,
        "pmu.sample_period": 1,
        "pmu.lost": 5,
        "pmu.lost_per_event": {"main": 2, "libc:malloc": 3, "libc:malloc%return": 0},
        "pmu.hits_per_event": {"main": 40, "libc:malloc": 40, "libc:malloc%return": 40},
    }
    raw = pq.read_metadata(path).metadata
    assert all(isinstance(v, bytes) for v in raw.values())
    assert raw[b"pmu.schema_version"] == b"1"


def test_encode_decode_metadata() -> None:
    values = {
        "pmu.command": ["a", "b c"],
        "pmu.lost": 3,
        "pmu.lost_per_event": {"e": 1},
        "pmu.start_time": "t",
    }
    enc = encode_metadata(values)
    assert enc == {
        "pmu.command": '["a", "b c"]',
        "pmu.lost": "3",
        "pmu.lost_per_event": '{"e": 1}',
        "pmu.start_time": "t",
    }
    assert decode_metadata(enc) == values
    assert decode_metadata({"pmu.lost": "many", "other": "x"}) == {"pmu.lost": "many"}


def test_metadata_given_twice_is_refused(tmp_path: Path) -> None:
    w = RecordWriter(tmp_path / "x.parquet", EVENTS, 0, False, START)
    with pytest.raises(ValueError, match="pmu.command"):
        w.close({"pmu.command": "[]"})
    w.close(FINAL)
    assert read_metadata(tmp_path / "x.parquet")["pmu.lost"] == 5


def test_empty_run_is_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "pmu.parquet"
    with RecordWriter(path, EVENTS, 2, True, START) as w:
        w.write(np.zeros(0, RECORD_DTYPE))
    t = pq.read_table(path)
    assert t.num_rows == 0 and t.schema.equals(schema(EVENTS, 2, True))
    assert len(pd.read_parquet(path)) == 0
    assert read_metadata(path)["pmu.events"] == EVENTS


def test_existing_file_becomes_old(tmp_path: Path) -> None:
    path = tmp_path / "pmu.parquet"
    write_file(path, 10)
    first = path.read_bytes()
    (tmp_path / "pmu.parquet.old").write_text("older still")
    write_file(path, 20)
    assert (tmp_path / "pmu.parquet.old").read_bytes() == first
    assert pq.read_table(path).num_rows == 20


def test_old_file_is_linked_never_missing(tmp_path: Path) -> None:
    """The previous PATH becomes PATH.old by a hard link made before the rename: the same file, and
    PATH is there at every moment."""
    path = tmp_path / "pmu.parquet"
    write_file(path, 10)
    inode = os.stat(path).st_ino
    write_file(path, 20)
    assert os.stat(tmp_path / "pmu.parquet.old").st_ino == inode
    assert pq.read_table(path).num_rows == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pmu.parquet", "pmu.parquet.old"]


def test_nothing_is_touched_before_there_is_something_to_write(tmp_path: Path) -> None:
    """Making a writer only checks PATH; discard (a run that failed before any record) leaves the
    directory as it was; rows pending in memory are not on disk yet."""
    path = tmp_path / "pmu.parquet"
    path.write_text("precious")
    w = RecordWriter(path, EVENTS, 2, True, START, row_group_rows=1000)
    w.write(records(999))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pmu.parquet"] and w.tmp_path is None
    w.discard()
    w.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pmu.parquet"]
    assert path.read_text() == "precious"
    w.close(FINAL)  # after discard: nothing
    assert path.read_text() == "precious"


def test_discard_after_a_row_group_removes_the_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "pmu.parquet"
    path.write_text("precious")
    w = RecordWriter(path, EVENTS, 0, False, START, row_group_rows=100)
    w.write(records(250))
    assert w.tmp_path is not None and os.path.exists(w.tmp_path)
    w.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pmu.parquet"]
    assert path.read_text() == "precious"


def test_planted_links_are_never_followed(tmp_path: Path) -> None:
    """In a world-writable directory another user may plant links where pmu would write: the
    temporary file has an unpredictable name and is created with O_EXCL, so none is followed."""
    victim = tmp_path / "victim"
    victim.write_text("root's file")
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o1777)
    path = out / "out.parquet"
    planted = ["out.parquet.tmp", ".out.parquet.tmp", "out.parquet.old.tmp", ".out.parquet.XXXXXXXX.tmp"]
    for name in planted:
        (out / name).symlink_to(victim)
    write_file(path, 300, row_group_rows=100)
    assert victim.read_text() == "root's file"
    assert all((out / name).is_symlink() for name in planted)
    assert pq.read_table(path).num_rows == 300
    assert sorted(p.name for p in out.iterdir()) == sorted([*planted, "out.parquet"])


def test_temporary_files_are_exclusive_and_private_until_renamed(tmp_path: Path) -> None:
    path = tmp_path / "pmu.parquet"
    a = RecordWriter(path, EVENTS, 0, False, START, row_group_rows=10)
    b = RecordWriter(path, EVENTS, 0, False, START, row_group_rows=10)
    a.write(records(10))
    b.write(records(20))
    assert a.tmp_path is not None and b.tmp_path is not None and a.tmp_path != b.tmp_path
    for t in (a.tmp_path, b.tmp_path):
        assert os.path.dirname(t) == str(tmp_path)
        assert stat.S_IMODE(os.stat(t).st_mode) == 0o600
    a.close()
    b.close()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # as open(2) would have made it
    assert pq.read_table(path).num_rows == 20 and pq.read_table(str(path) + ".old").num_rows == 10


def test_a_replaced_temporary_file_is_not_renamed(tmp_path: Path) -> None:
    """Another user renaming pmu's temporary file away and putting their own under its name (in a
    directory without the sticky bit): PATH does not become their file."""
    path = tmp_path / "pmu.parquet"
    w = RecordWriter(path, EVENTS, 0, False, START, row_group_rows=10)
    w.write(records(10))
    assert w.tmp_path is not None
    w_tmp = w.tmp_path
    os.rename(w_tmp, tmp_path / "moved")
    Path(w_tmp).write_text("theirs")
    with pytest.raises(FileError, match="^cannot write .*pmu.parquet: File exists$"):
        w.close()
    assert not path.exists() and Path(w_tmp).read_text() == "theirs"  # and theirs is not removed


def test_close_twice_and_write_after_close(tmp_path: Path) -> None:
    path = tmp_path / "pmu.parquet"
    w = RecordWriter(path, EVENTS, 1, True, START)
    w.write(records(10))
    w.close(FINAL)
    before = path.read_bytes()
    w.close(FINAL)
    w.close()
    assert path.read_bytes() == before
    with pytest.raises(ValueError):
        w.write(records(1))


def test_close_from_finally_after_interrupt(tmp_path: Path) -> None:
    """Ctrl-C in the middle of a run: the finally's close still leaves a whole file with what was written."""
    path = tmp_path / "pmu.parquet"
    with pytest.raises(KeyboardInterrupt):
        w = RecordWriter(path, EVENTS, 0, True, START, row_group_rows=64)
        try:
            w.write(records(100))
            raise KeyboardInterrupt
        finally:
            w.close(FINAL)
    assert pq.read_table(path).num_rows == 100
    assert read_metadata(path)["pmu.lost"] == 5


def test_killed_writer_leaves_no_file(tmp_path: Path) -> None:
    """SIGKILL before close: PATH is never a half-written file (only the temporary file is left)."""
    path = tmp_path / "pmu.parquet"
    code = (
        "import os, signal\n"
        "from pmu.output.parquet import RecordWriter\n"
        "from tests.unit.output.test_parquet import records, EVENTS\n"
        f"w = RecordWriter({str(path)!r}, EVENTS, 0, False, {{}}, row_group_rows=100)\n"
        "w.write(records(1000))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    root = Path(__file__).resolve().parents[3]
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True)
    assert p.returncode == -9, p.stderr
    assert not path.exists() and len(list(tmp_path.glob(".pmu.parquet.*.tmp"))) == 1


def test_bad_input(tmp_path: Path) -> None:
    w = RecordWriter(tmp_path / "x.parquet", EVENTS, 0, False, START)
    with pytest.raises(ValueError, match="RECORD_DTYPE"):
        w.write(np.zeros(3, np.int64))
    bad = records(3)
    bad["event"][1] = 3
    with pytest.raises(ValueError, match="event index 3"):
        w.write(bad)
    w.close()
    with pytest.raises(ValueError):
        RecordWriter(tmp_path / "y.parquet", EVENTS, 7, False, START)
    with pytest.raises(ValueError):
        RecordWriter(tmp_path / "y.parquet", [], 0, False, START)


def test_bad_event_writes_nothing_of_the_batch(tmp_path: Path) -> None:
    """Whether the bad batch fits the row group being filled or spans row groups, none of it is written."""
    path = tmp_path / "x.parquet"
    w = RecordWriter(path, EVENTS, 1, True, START, row_group_rows=100)
    w.write(records(150))
    for n in (30, 500):  # fits the 50 rows left; spans 5 row groups
        bad = records(n, 150)
        bad["event"][-1] = 9
        with pytest.raises(ValueError, match="event index 9 has no name"):
            w.write(bad)
        assert w.rows_written == 150
    w.write(records(10, 150))
    w.close()
    t = pq.read_table(path)
    np.testing.assert_array_equal(t["time_ns"].to_numpy(), records(160)["time"])


def test_large_and_strided_batches(tmp_path: Path) -> None:
    """A batch of several row groups, and records that are a strided view, as any numpy array may be."""
    path = tmp_path / "x.parquet"
    r = records(10_000)
    parts = [r[:7000], r[7000::2], r[7001::2][::-1]]
    with RecordWriter(path, EVENTS, 3, True, START, row_group_rows=1000) as w:
        for part in parts:
            w.write(part)
    expected = np.concatenate(parts)
    t = pq.read_table(path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 10
    np.testing.assert_array_equal(t["time_ns"].to_numpy(), expected["time"])
    np.testing.assert_array_equal(t["tid"].to_numpy(), expected["thread"])
    np.testing.assert_array_equal(t["arg1"].to_numpy(), expected["args"][:, 1])
    is_return = (expected["flags"] & FLAG_RETURN) != 0
    retval = [int(v) if k else None for v, k in zip(expected["retval"], is_return, strict=True)]
    assert t["retval"].to_pylist() == retval


def test_unwritable_paths_are_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(FileError, match="^cannot write .*/nope/pmu.parquet: No such file or directory$"):
        RecordWriter(tmp_path / "nope" / "pmu.parquet", EVENTS, 0, False, START)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileError, match="^cannot write .*/file/pmu.parquet: Not a directory$"):
        RecordWriter(tmp_path / "file" / "pmu.parquet", EVENTS, 0, False, START)
    with pytest.raises(FileError, match=f"^cannot write {tmp_path}: Is a directory$"):
        RecordWriter(tmp_path, EVENTS, 0, False, START)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_read_only_directory_is_refused_at_start(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        ro = Path("/proc/sys")  # read-only for root too
        with pytest.raises(FileError, match="^cannot write /proc/sys/pmu.parquet: "):
            RecordWriter(ro / "pmu.parquet", EVENTS, 0, False, START)
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(FileError, match="Permission denied$"):
            RecordWriter(tmp_path / "ro" / "pmu.parquet", EVENTS, 0, False, START)


def test_read_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(FileError, match="^cannot read .*missing.parquet: No such file or directory$"):
        read_metadata(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet at all")
    with pytest.raises(FileError, match="^cannot read .*junk.parquet: not a Parquet file"):
        read_metadata(tmp_path / "junk.parquet")


@pytest.fixture
def full_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (needs root and mount), to run out of space for real."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)  # -l: even if a test left a file open


def test_no_space_left(full_fs: Path) -> None:
    path = full_fs / "pmu.parquet"
    w = RecordWriter(path, EVENTS, 3, True, START, row_group_rows=10_000, compression="none")
    with pytest.raises(FileError) as e:
        try:
            for s in range(0, 200_000, 10_000):
                w.write(records(10_000, s))
        finally:
            w.close(FINAL)  # as `pmu record` calls it: must not hide the first error
    assert str(e.value) == f"cannot write {path}: No space left on device"
    assert list(full_fs.iterdir()) == []  # the temporary file removed, space given back
    w.close()
    with pytest.raises(FileError, match="No space left on device$"):  # the failure again, not "closed"
        w.write(records(10))
    assert w.failed


def test_old_file_is_intact_when_the_new_one_fails(full_fs: Path) -> None:
    path = full_fs / "pmu.parquet"
    path.write_text("precious")
    w = RecordWriter(path, EVENTS, 3, True, START, row_group_rows=10_000, compression="none")
    with pytest.raises(FileError, match="No space left on device$"):
        for s in range(0, 200_000, 10_000):
            w.write(records(10_000, s))
    w.close(FINAL)
    assert sorted(p.name for p in full_fs.iterdir()) == ["pmu.parquet"]
    assert path.read_text() == "precious"


def test_no_space_left_at_close(full_fs: Path) -> None:
    path = full_fs / "pmu.parquet"
    w = RecordWriter(path, EVENTS, 3, True, START, row_group_rows=1_000_000, compression="none")
    w.write(records(200_000))  # all pending: the failure comes at close
    with pytest.raises(FileError, match="No space left on device$"):
        w.close(FINAL)
    assert list(full_fs.iterdir()) == []


def test_duckdb_reads_it(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    path = tmp_path / "pmu.parquet"
    write_file(path, 3000, row_group_rows=1000)
    con = duckdb.connect()
    rows = con.execute(
        "select event, count(*), count(retval), max(retval), count(latency_ns) from read_parquet(?) "
        "group by event order by event",
        [str(path)],
    ).fetchall()
    assert rows == [
        ("libc:malloc", 1000, 0, None, 0),
        ("libc:malloc%return", 1000, 1000, 2**63 + 2999, 500),
        ("main", 1000, 0, None, 0),
    ]
    r = records(3000)  # every value exact, u64 above 2**63 included: the delta encoding wraps around
    got = con.execute("select time_ns, tid, arg0, arg1 from read_parquet(?)", [str(path)]).fetchnumpy()
    np.testing.assert_array_equal(got["time_ns"], r["time"])
    np.testing.assert_array_equal(got["tid"], r["thread"])
    np.testing.assert_array_equal(got["arg0"], r["args"][:, 0])
    np.testing.assert_array_equal(got["arg1"], r["args"][:, 1])
    kv = dict(con.execute("select key, value from parquet_kv_metadata(?)", [str(path)]).fetchall())
    assert decode_metadata(kv)["pmu.hits_per_event"]["main"] == 40


def test_from_ring_to_file(tmp_path: Path) -> None:
    """The path `pmu record` takes: ring writes, bulk drains, conversion left to the caller, the file."""
    path = tmp_path / "pmu.parquet"
    with (
        Ring.create(1, 2) as ring,
        RecordWriter(path, ["f", "f%return"], 2, True, START, row_group_rows=50) as w,
    ):
        for k in range(300):
            if k % 2 == 0:
                ring.write(0, 1000 + k, 77, 76, 0x401000, (k, k + 1))
            else:
                ring.write(
                    1, 1000 + k, 77, 76, 0x401010, (k, k + 1), retval=k, latency_ns=5, flags=FLAG_RETURN
                )
            if k % 20 == 19:
                w.write(ring.drain())
        w.write(ring.drain())
    t = pq.read_table(path).to_pydict()
    assert t["time_ns"] == list(range(1000, 1300))
    assert t["event"] == ["f", "f%return"] * 150
    assert t["retval"] == [None if k % 2 == 0 else k for k in range(300)]
    assert t["latency_ns"] == [None, 5] * 150


def test_a_device_is_written_in_place_never_renamed(tmp_path: Path) -> None:
    """-o /dev/null: written as it is (renaming PATH.tmp over a device node, as root, would replace it)."""
    null = tmp_path / "null"
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        null.write_bytes(b"x")
    except OSError as err:
        pytest.skip(f"cannot make and use a device node here: {err}")
    w = RecordWriter(null, ["a", "b", "c"], 0, False, {})
    w.write(records(5))
    w.close()
    assert stat.S_ISCHR(os.stat(null).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]  # no null.old, no null.tmp
