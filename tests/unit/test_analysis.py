"""pmu.analysis on synthetic recordings with known answers: loading, rates, gaps, latencies, summary, plots.

`write_recording` writes a file in exactly the schema `pmu record` writes (also used by the integration
tests of `pmu report` and of the notebook); the expected numbers are computed here with numpy alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pmu import analysis
from pmu.errors import FileError

ENTRY = "uprobe:./mt:work"
RET = "uretprobe:./mt:work"
IDLE = "uprobe:./mt:never_called"
T0 = 5_000_000_000_000  # CLOCK_MONOTONIC ns of the first hit
PID = 4000
MS = 1_000_000


def write_recording(
    path: Path,
    time_ns: Sequence[int],
    tid: Sequence[int],
    event: Sequence[str],
    *,
    pid: int | Sequence[int] = PID,
    latency_ns: Sequence[int | None] | None = None,
    retval: Sequence[int | None] | None = None,
    nargs: int = 0,
    events: Sequence[str] | None = None,
    metadata: dict[str, str] | None = None,
    drop: Sequence[str] = (),
) -> Path:
    """Write a recording in pmu record's schema (columns, types, key-value metadata) and return its path.

    `events` is the metadata's event list (default: the events of the rows, in order of appearance);
    `metadata` overrides or adds `pmu.*` keys; `drop` removes metadata keys or columns.
    """
    n = len(time_ns)
    pids = [pid] * n if isinstance(pid, int) else list(pid)
    names = list(events) if events is not None else list(dict.fromkeys(event))
    for e in event:
        if e not in names:
            names.append(e)
    codes = pa.array([names.index(e) for e in event], pa.int32())
    columns: dict[str, pa.Array] = {
        "time_ns": pa.array(time_ns, pa.int64()),
        "pid": pa.array(pids, pa.int32()),
        "tid": pa.array(tid, pa.int32()),
        "event": pa.DictionaryArray.from_arrays(codes, pa.array(names, pa.string())),
        "ip": pa.array([0x401126 + (e == RET) for e in event], pa.uint64()),
    }
    for i in range(nargs):
        columns[f"arg{i}"] = pa.array([(k * (i + 1)) % 2**64 for k in range(n)], pa.uint64())
    if retval is not None:
        columns["retval"] = pa.array(retval, pa.uint64())
    if latency_ns is not None:
        columns["latency_ns"] = pa.array(latency_ns, pa.int64())
    hits = {e: list(event).count(e) for e in names}
    meta = {
        "pmu.schema_version": "1",
        "pmu.version": "0.1.0",
        "pmu.command": json.dumps(["./mt", "4", "1000"]),
        "pmu.events": json.dumps(names),
        "pmu.start_time": "2025-01-02T03:04:05.678901+00:00",
        "pmu.start_monotonic_ns": str(T0 - 1000),
        "pmu.lost": "0",
        "pmu.lost_per_event": json.dumps({}),
        "pmu.hits_per_event": json.dumps(hits),
        "pmu.sample_period": "1",
        **(metadata or {}),
    }
    for key in drop:
        meta.pop(key, None)
        columns.pop(key, None)
    # as pmu record's writer does: the Arrow schema first, the run's metadata in the footer at close
    table = pa.table(columns)
    with pq.ParquetWriter(path, table.schema) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata(meta)
    return path


def scenario(seed: int = 1) -> dict[str, Any]:
    """Rows of a known run, shuffled: three threads hit ENTRY, thread 101 also RET (with latencies).

    tid 101: every 1 ms, 1000 hits from T0.   tid 102: every 2 ms, 300 hits from T0 + 50 ms.
    tid 103: 200 hits with random gaps.       RET: thread 101, 400 returns with random latencies.
    """
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, int, str, int | None, int | None]] = []
    rows += [(T0 + k * MS, 101, ENTRY, None, None) for k in range(1000)]
    rows += [(T0 + 50 * MS + k * 2 * MS, 102, ENTRY, None, None) for k in range(300)]
    t103 = T0 + 3 * MS + np.cumsum(rng.integers(1_000, 4 * MS, size=200))
    rows += [(int(t), 103, ENTRY, None, None) for t in t103]
    lat = rng.integers(100, 1_000_000, size=400)
    rows += [(T0 + k * MS + int(lat[k]), 101, RET, int(lat[k]), 2**64 - 1 - k) for k in range(400)]
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    return {
        "time_ns": [r[0] for r in rows],
        "tid": [r[1] for r in rows],
        "event": [r[2] for r in rows],
        "latency_ns": [r[3] for r in rows],
        "retval": [r[4] for r in rows],
    }


@pytest.fixture
def rec(tmp_path: Path) -> Path:
    s = scenario()
    return write_recording(
        tmp_path / "pmu.parquet",
        s["time_ns"],
        s["tid"],
        s["event"],
        latency_ns=s["latency_ns"],
        retval=s["retval"],
        nargs=2,
        events=[ENTRY, RET, IDLE],
        metadata={"pmu.lost": "7", "pmu.lost_per_event": json.dumps({ENTRY: 7})},
    )


def times_of(event: str, tid: int) -> np.ndarray[Any, Any]:
    s = scenario()
    t = [t for t, d, e in zip(s["time_ns"], s["tid"], s["event"], strict=True) if d == tid and e == event]
    return np.sort(np.array(t, dtype=np.int64))


# --- load --------------------------------------------------------------------------------------------


def test_load_columns_types_and_order(rec: Path) -> None:
    df = analysis.load(rec)
    assert list(df.columns) == [
        "time_ns",
        "pid",
        "tid",
        "event",
        "ip",
        "arg0",
        "arg1",
        "retval",
        "latency_ns",
    ]
    assert len(df) == 1000 + 300 + 200 + 400
    assert df["time_ns"].dtype == np.int64
    assert df["pid"].dtype == np.int32 and df["tid"].dtype == np.int32
    assert df["ip"].dtype == np.uint64 and df["arg0"].dtype == np.uint64
    assert isinstance(df["event"].dtype, pd.CategoricalDtype)
    assert list(df["event"].cat.categories) == [ENTRY, RET, IDLE]
    assert df["retval"].dtype == pd.UInt64Dtype()
    assert df["latency_ns"].dtype == pd.Int64Dtype()
    assert df["time_ns"].is_monotonic_increasing
    rets = df[df["event"] == RET]
    assert rets["latency_ns"].notna().all() and df.loc[df["event"] == ENTRY, "latency_ns"].isna().all()
    assert int(rets["retval"].max()) == 2**64 - 1  # no float round trip


def test_load_decodes_metadata(rec: Path) -> None:
    meta = analysis.load(rec).attrs["pmu"]
    assert meta["schema_version"] == 1
    assert meta["version"] == "0.1.0"
    assert meta["command"] == ["./mt", "4", "1000"]
    assert meta["events"] == [ENTRY, RET, IDLE]
    assert meta["lost"] == 7
    assert meta["lost_per_event"] == {ENTRY: 7}
    assert meta["hits_per_event"] == {ENTRY: 1500, RET: 400, IDLE: 0}
    assert meta["start_monotonic_ns"] == T0 - 1000
    assert meta["sample_period"] == 1
    assert meta["start_time"].startswith("2025-01-02T03:04:05")


def test_load_metadata_in_the_schema_and_plain_string_events(tmp_path: Path) -> None:
    table = pa.table(
        {
            "time_ns": pa.array([2, 1], pa.int64()),
            "pid": pa.array([1, 1], pa.int32()),
            "tid": pa.array([1, 1], pa.int32()),
            "event": pa.array(["a", "a"]),
            "ip": pa.array([0, 0], pa.uint64()),
        }
    ).replace_schema_metadata({"pmu.schema_version": "1"})
    pq.write_table(table, tmp_path / "f.parquet")
    df = analysis.load(tmp_path / "f.parquet")
    assert df.attrs["pmu"] == {"schema_version": 1}
    assert isinstance(df["event"].dtype, pd.CategoricalDtype)
    assert list(df["time_ns"]) == [1, 2]


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nothing.parquet"
    with pytest.raises(FileError) as e:
        analysis.load(path)
    assert e.value.message == f"cannot read {path}: No such file or directory"
    assert e.value.exit_status == 2


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(FileError, match=f"^cannot read {tmp_path}: Is a directory$"):
        analysis.load(tmp_path)


@pytest.mark.parametrize("content", [b"", b"time_ns,tid\n1,2\n", b"PAR1" + b"\0" * 100])
def test_load_not_parquet(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "f.parquet"
    path.write_bytes(content)
    with pytest.raises(FileError) as e:
        analysis.load(path)
    assert e.value.message.startswith(f"cannot read {path}: ")
    assert "Parquet" in e.value.message and "\n" not in e.value.message


def test_load_parquet_that_is_not_a_recording(tmp_path: Path) -> None:
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), path)
    with pytest.raises(FileError) as e:
        analysis.load(path)
    assert (
        e.value.message == f"cannot read {path}: not a pmu recording (no pmu.schema_version in its metadata)"
    )


def test_load_other_schema_version(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "f.parquet", [1], [1], [ENTRY], metadata={"pmu.schema_version": "2"})
    with pytest.raises(FileError) as e:
        analysis.load(path)
    assert e.value.message == f"cannot read {path}: recording schema version 2, this pmu reads version 1"


def test_load_missing_column(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "f.parquet", [1], [1], [ENTRY], drop=["tid"])
    with pytest.raises(FileError, match="not a pmu recording \\(no column tid\\)$"):
        analysis.load(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pmu.hits_per_event", "{broken"),
        ("pmu.hits_per_event", json.dumps({ENTRY: -1})),
        ("pmu.hits_per_event", json.dumps([1, 2])),
        ("pmu.lost_per_event", json.dumps({ENTRY: "many"})),
        ("pmu.sample_period", "ten"),
        ("pmu.sample_period", "0"),
        ("pmu.lost", "-3"),
        ("pmu.events", json.dumps({"a": 1})),
        ("pmu.command", "not json"),
        ("pmu.start_monotonic_ns", "12:00"),
    ],
)
def test_load_corrupt_metadata(tmp_path: Path, key: str, value: str) -> None:
    path = write_recording(tmp_path / "f.parquet", [1, 2], [1, 1], [ENTRY, ENTRY], metadata={key: value})
    with pytest.raises(FileError) as e:
        analysis.load(path)
    assert e.value.message == f"cannot read {path}: corrupt metadata ({key} is {value!r})"


def test_load_metadata_not_utf8(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "f.parquet", [1], [1], [ENTRY])
    table = pq.read_table(path)
    bad = {b"pmu.schema_version": b"1", b"pmu.command": b'["\xff"]', b"pmu.start_time": b"\xff\xfe"}
    with pq.ParquetWriter(path, table.schema) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata(bad)
    with pytest.raises(FileError, match="corrupt metadata \\(pmu.start_time is "):
        analysis.load(path)


def _table_with(column: str, values: pa.Array) -> pa.Table:
    columns = {
        "time_ns": pa.array([1, 2], pa.int64()),
        "pid": pa.array([1, 1], pa.int32()),
        "tid": pa.array([1, 1], pa.int32()),
        "event": pa.array(["e", "e"]),
        "ip": pa.array([0, 0], pa.uint64()),
    }
    columns[column] = values
    return pa.table(columns).replace_schema_metadata({"pmu.schema_version": "1"})


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("time_ns", pa.array(["a", "b"]), "column time_ns is string, not integers"),
        ("pid", pa.array([1.5, 2.0]), "column pid is double, not integers"),
        ("ip", pa.array([True, False]), "column ip is bool, not integers"),
        ("event", pa.array([1, 2]), "column event is int64, not event names"),
        ("arg0", pa.array(["x", "y"]), "column arg0 is string, not integers"),
        ("latency_ns", pa.array([0.5, None]), "column latency_ns is double, not integers"),
        ("tid", pa.array([1, None], pa.int32()), "column tid has empty values"),
    ],
)
def test_load_wrong_column_types(tmp_path: Path, column: str, values: pa.Array, message: str) -> None:
    path = tmp_path / "f.parquet"
    pq.write_table(_table_with(column, values), path)
    with pytest.raises(FileError) as e:
        analysis.load(path)
    assert e.value.message == f"cannot read {path}: {message}"


def test_load_accepts_other_integer_widths_and_plain_strings(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    pq.write_table(_table_with("pid", pa.array([1, 1], pa.int64())), path)
    assert list(analysis.load(path)["pid"]) == [1, 1]


# --- rates, gaps, latency ----------------------------------------------------------------------------


def test_rates_match_numpy_histograms(rec: Path) -> None:
    df = analysis.load(rec)
    r = analysis.rates(df, "100ms")
    step = 100 * MS
    first = int(min(scenario()["time_ns"]))
    last = int(max(scenario()["time_ns"]))
    nbins = (last - first) // step + 1
    assert set(r.columns) == {"event", "pid", "tid", "time_s", "records", "hits", "rate"}
    groups = r.groupby(["event", "tid"], observed=True)
    assert sorted(groups.groups) == [(ENTRY, 101), (ENTRY, 102), (ENTRY, 103), (RET, 101)]
    edges = first + step * np.arange(nbins + 1)
    for (event, tid), rows in groups:
        expected, _ = np.histogram(times_of(event, tid), bins=edges)
        assert list(rows["hits"]) == list(rows["records"]) == list(expected)
        assert np.allclose(rows["rate"], expected / 0.1)
        assert np.allclose(rows["time_s"], np.arange(nbins) * 0.1)
        assert (rows["pid"] == PID).all()
    # thread 101 hits every ms: 100 hits in each full 100 ms bin, 1000 hits/s
    t101 = r[(r["event"] == ENTRY) & (r["tid"] == 101)]
    assert list(t101["hits"][:10]) == [100] * 10
    assert list(t101["rate"][:10]) == [1000.0] * 10


@pytest.mark.parametrize(("interval", "ns"), [("1s", 10**9), ("250us", 250_000), (1_000, 1_000)])
def test_rate_intervals(rec: Path, interval: str | int, ns: int) -> None:
    assert analysis.interval_ns(interval) == ns
    r = analysis.rates(analysis.load(rec), interval)
    assert r.groupby(["event", "tid"], observed=True)["hits"].sum().to_dict() == {
        (ENTRY, 101): 1000,
        (ENTRY, 102): 300,
        (ENTRY, 103): 200,
        (RET, 101): 400,
    }


def test_rates_are_hits_per_second_with_a_sample_period(tmp_path: Path) -> None:
    """With -c 10 a row stands for 10 hits: every rate (per bin, per thread, per event) counts hits."""
    # one thread, a record every 1 ms for 1 s (1001 rows): 10 hits per ms, 10,000 hits/s
    t = [T0 + k * MS for k in range(1001)]
    path = write_recording(
        tmp_path / "f.parquet",
        t,
        [7] * len(t),
        [ENTRY] * len(t),
        metadata={"pmu.sample_period": "10", "pmu.hits_per_event": json.dumps({ENTRY: 10_010})},
    )
    df = analysis.load(path)
    assert analysis.sample_period(df) == 10
    r = analysis.rates(df, "100ms")
    assert list(r["records"][:10]) == [100] * 10
    assert list(r["hits"][:10]) == [1000] * 10
    assert list(r["rate"][:10]) == [10_000.0] * 10
    (ev,) = analysis.summary(df)["events"]
    assert ev["count"] == 1001 and ev["hits"] == 10_010
    assert ev["rate_hz"] == pytest.approx(10_010 / 1.0)  # the exact count over the span of the records
    (th,) = ev["threads"]
    assert th["rate_hz"] == pytest.approx(10_010 / 1.0)  # rows times the period over the thread's span


def test_event_rate_without_hit_counts_uses_the_period(tmp_path: Path) -> None:
    path = write_recording(
        tmp_path / "f.parquet",
        [T0, T0 + 500 * MS],
        [1, 1],
        [ENTRY, ENTRY],
        metadata={"pmu.sample_period": "100"},
        drop=["pmu.hits_per_event"],
    )
    (ev,) = analysis.summary(analysis.load(path))["events"]
    assert ev["hits"] == 200 and ev["rate_hz"] == pytest.approx(400.0)


def test_a_frame_built_by_hand_has_period_one() -> None:
    df = pd.DataFrame({"time_ns": [0, 10**9], "pid": [1, 1], "tid": [1, 1], "event": ["e", "e"]})
    assert analysis.sample_period(df) == 1
    assert analysis.summary(df)["events"][0]["rate_hz"] == pytest.approx(2.0)


def test_rate_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        analysis.interval_ns("0s")


def test_interarrival_per_thread(rec: Path) -> None:
    gaps = analysis.interarrival(analysis.load(rec))
    assert list(gaps.columns) == ["event", "pid", "tid", "time_ns", "gap_ns"]
    assert gaps["gap_ns"].dtype == np.int64
    for (event, tid), rows in gaps.groupby(["event", "tid"], observed=True):
        t = times_of(event, tid)
        assert list(rows["gap_ns"]) == list(np.diff(t))
        assert list(rows["time_ns"]) == list(t[1:])
    assert len(gaps) == (1000 - 1) + (300 - 1) + (200 - 1) + (400 - 1)
    assert set(gaps.loc[(gaps["event"] == ENTRY) & (gaps["tid"] == 101), "gap_ns"]) == {MS}
    assert set(gaps.loc[(gaps["event"] == ENTRY) & (gaps["tid"] == 102), "gap_ns"]) == {2 * MS}


def test_latency_rows(rec: Path) -> None:
    lat = analysis.latency(analysis.load(rec))
    assert list(lat.columns) == ["event", "pid", "tid", "time_ns", "latency_ns"]
    assert len(lat) == 400 and set(lat["event"]) == {RET} and set(lat["tid"]) == {101}
    s = scenario()
    expected = sorted(v for v in s["latency_ns"] if v is not None)
    assert sorted(lat["latency_ns"]) == expected
    assert lat["latency_ns"].dtype == np.int64


def test_latency_without_the_column(tmp_path: Path) -> None:
    df = analysis.load(write_recording(tmp_path / "f.parquet", [1, 2], [1, 1], [ENTRY, ENTRY]))
    lat = analysis.latency(df)
    assert lat.empty and "latency_ns" in lat.columns


# --- summary -----------------------------------------------------------------------------------------


def pcts(values: np.ndarray[Any, Any]) -> dict[str, float]:
    p = np.percentile(values, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def test_summary_known_answers(rec: Path) -> None:
    result = analysis.summary(analysis.load(rec))
    json.dumps(result)  # serializable as is
    all_t = np.array(scenario()["time_ns"])
    assert result["path"] == str(rec)
    assert result["command"] == ["./mt", "4", "1000"]
    assert result["records"] == 1900
    assert result["duration_s"] == pytest.approx((all_t.max() - all_t.min()) / 1e9)
    assert result["lost"] == 7
    assert result["sample_period"] == 1
    entry, ret, idle = result["events"]
    assert [entry["event"], ret["event"], idle["event"]] == [ENTRY, RET, IDLE]

    t = np.sort(np.concatenate([times_of(ENTRY, tid) for tid in (101, 102, 103)]))
    assert entry["count"] == entry["hits"] == 1500
    assert entry["lost"] == 7
    assert entry["duration_s"] == pytest.approx((t[-1] - t[0]) / 1e9)
    assert entry["rate_hz"] == pytest.approx(1500 / ((t[-1] - t[0]) / 1e9))
    gaps = np.concatenate([np.diff(times_of(ENTRY, tid)) for tid in (101, 102, 103)])
    assert entry["interarrival_ns"] == pytest.approx(pcts(gaps))
    assert entry["return_probe"] is False and entry["latency_ns"] is None
    threads = [(th["tid"], th["pid"], th["count"]) for th in entry["threads"]]
    assert threads == [(101, PID, 1000), (102, PID, 300), (103, PID, 200)]
    t101, t102, _ = entry["threads"]
    assert t101["duration_s"] == pytest.approx(0.999)
    assert t101["rate_hz"] == pytest.approx(1000 / 0.999)
    assert t102["duration_s"] == pytest.approx(0.598)
    assert t102["rate_hz"] == pytest.approx(300 / 0.598)

    lat = np.array([v for v in scenario()["latency_ns"] if v is not None])
    assert ret["count"] == 400 and ret["lost"] == 0
    assert ret["return_probe"] is True
    assert ret["latency_ns"] == pytest.approx({"count": 400, **pcts(lat)})
    assert ret["interarrival_ns"] == pytest.approx(pcts(np.diff(times_of(RET, 101))))

    assert idle["count"] == 0 and idle["threads"] == [] and idle["rate_hz"] is None
    assert idle["interarrival_ns"] is None and idle["duration_s"] == 0.0


def test_summary_single_hit_has_no_rate(tmp_path: Path) -> None:
    result = analysis.summary(analysis.load(write_recording(tmp_path / "f.parquet", [10], [1], [ENTRY])))
    (ev,) = result["events"]
    assert ev["count"] == 1 and ev["rate_hz"] is None and ev["interarrival_ns"] is None
    assert ev["threads"] == [
        {"pid": PID, "tid": 1, "count": 1, "duration_s": 0.0, "rate_hz": None, "latency_ns": None}
    ]


def test_summary_lost_from_per_event_counts(tmp_path: Path) -> None:
    path = write_recording(
        tmp_path / "f.parquet",
        [1, 2],
        [1, 1],
        [ENTRY, ENTRY],
        metadata={"pmu.lost_per_event": json.dumps({ENTRY: 3})},
        drop=["pmu.lost"],
    )
    assert analysis.summary(analysis.load(path))["lost"] == 3


def test_summary_of_a_frame_built_by_hand() -> None:
    df = pd.DataFrame(
        {"time_ns": [0, 10, 30, 5], "pid": [1, 1, 1, 1], "tid": [1, 1, 1, 2], "event": ["e", "e", "e", "e"]}
    )
    (ev,) = analysis.summary(df)["events"]
    assert ev["count"] == 4
    assert ev["interarrival_ns"] == pytest.approx(pcts(np.array([10, 20])))
    assert [t["count"] for t in ev["threads"]] == [3, 1]


def test_empty_recording(tmp_path: Path) -> None:
    df = analysis.load(write_recording(tmp_path / "f.parquet", [], [], [], events=[ENTRY]))
    assert df.empty
    result = analysis.summary(df)
    assert result["records"] == 0 and result["events"][0]["count"] == 0
    assert analysis.rates(df).empty and analysis.interarrival(df).empty and analysis.latency(df).empty


# --- plots -------------------------------------------------------------------------------------------


def test_plots_on_given_axes(rec: Path) -> None:
    from matplotlib.figure import Figure

    df = analysis.load(rec)
    fig = Figure()
    ax = analysis.plot_rates(df, fig.add_subplot())
    assert len(ax.get_lines()) == 4  # (ENTRY, 101..103) and (RET, 101)
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {
        f"{ENTRY} tid 101",
        f"{ENTRY} tid 102",
        f"{ENTRY} tid 103",
        f"{RET} tid 101",
    }
    colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
    assert colours[f"{ENTRY} tid 101"] == colours[f"{RET} tid 101"] != colours[f"{ENTRY} tid 102"]
    fig = Figure()
    ax = analysis.plot_distribution(df, fig.add_subplot())
    assert ax.get_xscale() == "log"
    assert len(ax.patches) == 2  # one step outline per event
    fig = Figure()
    ax = analysis.plot_latency(df, fig.add_subplot())
    assert ax.get_xscale() == "log" and len(ax.patches) == 1


def test_plots_make_their_own_axes(rec: Path) -> None:
    import matplotlib.pyplot as plt

    df = analysis.load(rec)
    try:
        for plot in (analysis.plot_rates, analysis.plot_distribution, analysis.plot_latency):
            ax = plot(df)
            assert ax.figure is not None
    finally:
        plt.close("all")


def test_write_plots(rec: Path, tmp_path: Path) -> None:
    df = analysis.load(rec)
    written = analysis.write_plots(df, tmp_path / "plots")
    assert [p.name for p in written] == ["rates.png", "interarrival.png", "latency.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_ret = analysis.load(write_recording(tmp_path / "f.parquet", [1, 2], [1, 1], [ENTRY, ENTRY]))
    assert [p.name for p in analysis.write_plots(no_ret, tmp_path / "p2")] == [
        "rates.png",
        "interarrival.png",
    ]


@pytest.mark.parametrize(
    ("span_ns", "step_ns"),
    [
        (0, 1_000),
        (99_000, 1_000),
        (100_000, 2_000),
        (49 * MS, 500_000),
        (999 * MS, 10 * MS),
        (10**10, 200 * MS),
    ],
)
def test_auto_interval_is_round_and_gives_at_most_100_bins(span_ns: int, step_ns: int) -> None:
    step = analysis.auto_interval(pd.DataFrame({"time_ns": [T0, T0 + span_ns]}))
    assert step == pd.Timedelta(step_ns, unit="ns")
    assert span_ns // step_ns + 1 <= 100


def test_latency_per_thread_and_log2_histograms(tmp_path: Path) -> None:
    """Two threads of one return probe: each thread's percentiles are its own, and the log2 histogram
    (pmu stat --latency's buckets: b bits of ns) counts every call once, per event or per thread."""
    lat = {1: [5, 5, 5, 100], 2: [1000, 1000, 0]}
    rows = [(tid, ns) for tid, values in lat.items() for ns in values]
    path = write_recording(
        tmp_path / "r.parquet",
        [T0 + k * MS for k in range(len(rows))],
        [tid for tid, _ in rows],
        [RET] * len(rows),
        latency_ns=[ns for _, ns in rows],
        retval=[0] * len(rows),
    )
    df = analysis.load(path)
    ev = analysis.summary(df)["events"][0]
    by_tid = {t["tid"]: t["latency_ns"] for t in ev["threads"]}
    assert by_tid[1] is not None and by_tid[1]["p50"] == 5 and by_tid[1]["count"] == 4
    assert by_tid[2] is not None and by_tid[2]["p50"] == 1000 and by_tid[2]["count"] == 3
    hist = analysis.latency_histogram(df)
    assert dict(zip(hist["bucket"], hist["calls"], strict=True)) == {0: 1, 3: 3, 7: 1, 10: 2}
    assert list(hist["low_ns"]) == [0, 4, 64, 512] and list(hist["high_ns"]) == [0, 7, 127, 1023]
    per = analysis.latency_histogram(df, by_thread=True)
    assert per.groupby("tid")["calls"].sum().to_dict() == {1: 4, 2: 3}
