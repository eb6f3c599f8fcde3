"""Reading recordings: `load` a `pmu record` Parquet file into pandas, then rates, gaps, latencies and plots.

This is the one module that reads the recording format; `pmu report` and the notebooks in `analysis/` go
through `load`. A recording has one row per probe hit:

    time_ns     int64    CLOCK_MONOTONIC time of the hit, in ns
    pid, tid    int32    the process and thread that hit
    event       category the event name as the user wrote it (`uprobe:./mt:work`)
    ip          uint64   the instruction pointer of the probe
    arg0..      uint64   optional: the first arguments, when recorded
    retval      UInt64   optional: a return probe's return value (<NA> on entry-probe rows)
    latency_ns  Int64    optional: a return probe's time since the function's entry (<NA> elsewhere)

and the run's metadata (`pmu.schema_version`, `pmu.command`, `pmu.lost`...) in the file's key-value
metadata, decoded by `load` into `df.attrs["pmu"]` without the `pmu.` prefix.

Every function takes the DataFrame `load` returns (or any frame with its columns). matplotlib is
imported inside the plot functions only, so importing this module does not pay for it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pmu.errors import FileError
from pmu.recording import (
    DEFAULT_PATH,
    INTEGER_COLUMNS,
    PREFIX,
    REQUIRED_COLUMNS,
    SCHEMA_VERSION,
    decode_metadata,
)

if TYPE_CHECKING:
    from types import ModuleType

    from matplotlib.axes import Axes

PERCENTILES = (50, 90, 99)
"""The percentiles `summary` reports, as p50, p90, p99 (numpy's default linear interpolation)."""

_NULLABLE = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(),
    pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(),
    pa.uint64(): pd.UInt64Dtype(),
}
_ALWAYS_NULLABLE = frozenset({"retval", "latency_ns"})
_THREAD_KEYS = ["event", "pid", "tid"]
_LINESTYLES = ("-", "--", ":", "-.")


class Percentiles(TypedDict):
    """p50/p90/p99 of a set of durations, in ns."""

    p50: float
    p90: float
    p99: float


class LatencySummary(Percentiles):
    """A return probe's latency percentiles, in ns, and how many rows carried a latency."""

    count: int


class ThreadSummary(TypedDict):
    """One thread's hits of one event."""

    pid: int
    tid: int
    count: int
    """Records of the event in this thread."""
    duration_s: float
    """From the thread's first hit of the event to its last."""
    rate_hz: float | None
    """Hits per second: count times the sample period, over duration_s; None when the duration is 0
    (a single record)."""
    latency_ns: LatencySummary | None
    """The thread's latency percentiles, for a return probe with latencies; None otherwise."""


class EventSummary(TypedDict):
    """One event over the whole recording."""

    event: str
    count: int
    """Records of the event (rows of the file)."""
    hits: int
    """Hits counted by the recorder (`pmu.hits_per_event`); count times the sample period when the file
    does not say."""
    lost: int
    """Records of this event lost by the recorder (`pmu.lost_per_event`)."""
    duration_s: float
    """From the event's first hit to its last, in any thread."""
    rate_hz: float | None
    """Hits per second: `hits` over duration_s; None when the duration is 0."""
    interarrival_ns: Percentiles | None
    """Percentiles of the gaps between consecutive hits of one thread, pooled over threads."""
    return_probe: bool
    """A uretprobe (by its name, or because its rows carry a latency)."""
    latency_ns: LatencySummary | None
    """Latency percentiles of a return probe with latencies; None otherwise."""
    threads: list[ThreadSummary]
    """Threads that hit, most hits first."""
    cpus: dict[int, int] | None
    """Records per CPU, for a system-wide recording (a file with a cpu column); None otherwise."""


class Summary(TypedDict):
    """What `pmu report` prints: the run, then each event with its threads."""

    path: str | None
    command: list[str] | None
    start_time: str | None
    records: int
    duration_s: float
    """From the first hit of the recording to its last."""
    lost: int
    """Records lost by the recorder (`pmu.lost`)."""
    sample_period: int | None
    events: list[EventSummary]


# --- reading -----------------------------------------------------------------------------------------


def load(path: str | os.PathLike[str] = DEFAULT_PATH) -> pd.DataFrame:
    """Read a recording: one row per hit, in time order; the file's metadata in `df.attrs["pmu"]`.

    Columns are as stored, with `event` categorical (its categories are every event of the file) and
    `retval`/`latency_ns` as pandas nullable integers. `df.attrs["path"]` is the path read.
    Raises FileError (one line, "cannot read PATH: ...") for a missing or unreadable file, a file that
    is not Parquet, a Parquet file that is not a pmu recording, or one of another schema version.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            try:
                parquet = pq.ParquetFile(f)
                # pmu record writes its metadata into the Parquet footer at close, after the Arrow
                # schema was stored: read the footer's key-value pairs, not only the schema's.
                raw = {**(parquet.schema_arrow.metadata or {}), **(parquet.metadata.metadata or {})}
                meta = _decode_metadata(name, raw)
                _check(name, meta, parquet.schema_arrow)
                table = parquet.read()
                _check_nulls(name, table)
            except pa.ArrowException as err:
                text = str(err)
                if "magic bytes" in text or "size is 0" in text:
                    raise FileError(f"cannot read {name}: not a Parquet file") from None
                raise FileError(
                    f"cannot read {name}: corrupt Parquet file ({text.splitlines()[0]})"
                ) from None
    except OSError as err:
        raise FileError(f"cannot read {name}: {err.strerror or err}") from None
    columns: dict[str, Any] = {}
    for column in table.column_names:
        chunked = table.column(column)
        if column in _ALWAYS_NULLABLE or chunked.null_count:
            columns[column] = chunked.to_pandas(types_mapper=_NULLABLE.get)
        else:
            columns[column] = chunked.to_pandas()
    df = pd.DataFrame(columns)
    if not isinstance(df["event"].dtype, pd.CategoricalDtype):
        df["event"] = df["event"].astype("category")
    df = df.sort_values("time_ns", kind="stable", ignore_index=True)
    df.attrs["pmu"] = meta
    df.attrs["path"] = name
    return df


def _decode_metadata(name: str, raw: dict[bytes, bytes]) -> dict[str, Any]:
    """`pmu.*` keys without the prefix, decoded by the format's owner (pmu.recording), strictly."""
    return {k[len(PREFIX) :]: v for k, v in decode_metadata(raw, strict=name).items()}


def _check(name: str, meta: dict[str, Any], schema: pa.Schema) -> None:
    version = meta.get("schema_version")
    if version is None:
        raise FileError(f"cannot read {name}: not a pmu recording (no pmu.schema_version in its metadata)")
    if version != SCHEMA_VERSION:
        raise FileError(
            f"cannot read {name}: recording schema version {version}, this pmu reads version {SCHEMA_VERSION}"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise FileError(f"cannot read {name}: not a pmu recording (no column {', '.join(missing)})")
    for field in schema:
        arg = field.name.startswith("arg") and field.name[3:].isdigit()
        integer = field.name in INTEGER_COLUMNS or arg
        if integer and not pa.types.is_integer(field.type):
            raise FileError(f"cannot read {name}: column {field.name} is {field.type}, not integers")
        if field.name == "event" and not _is_text(field.type):
            raise FileError(f"cannot read {name}: column event is {field.type}, not event names")


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _check_nulls(name: str, table: pa.Table) -> None:
    """Every row of a recording has a time, a process, a thread, an event and an address."""
    for column in REQUIRED_COLUMNS:
        if table.column(column).null_count:
            raise FileError(f"cannot read {name}: column {column} has empty values")


# --- computing ---------------------------------------------------------------------------------------


def _events(df: pd.DataFrame) -> pd.DataFrame:
    """df with `event` categorical (frames built by hand may hold plain strings)."""
    if isinstance(df["event"].dtype, pd.CategoricalDtype):
        return df
    return df.assign(event=df["event"].astype("category"))


def interval_ns(interval: str | int | pd.Timedelta) -> int:
    """An interval as ns: "100ms", "1s", "250us", a Timedelta, or an int of ns. Must be positive."""
    ns = int(pd.Timedelta(interval).value)
    if ns <= 0:
        raise ValueError(f"interval must be positive, not {interval!r}")
    return ns


def sample_period(df: pd.DataFrame) -> int:
    """One row of the recording stands for this many hits (`pmu record -c PERIOD`); 1 when the file
    does not say (a frame built by hand)."""
    period = df.attrs.get("pmu", {}).get("sample_period")
    return period if isinstance(period, int) and not isinstance(period, bool) and period >= 1 else 1


def rates(df: pd.DataFrame, interval: str | int | pd.Timedelta = "100ms") -> pd.DataFrame:
    """Hits per second of each thread, per time bin: columns event, pid, tid, time_s, records, hits, rate.

    Bins are `interval` wide and start at the recording's first hit (time_s is a bin's start, in s
    since that hit); every thread that hit an event has a row for every bin up to the last hit, zeros
    included, so a thread's series plots as is. `records` are the rows in the bin, `hits` the hits they
    stand for (records times the sample period, see `sample_period`), rate = hits / interval (the last
    bin may be partial).
    """
    step = interval_ns(interval)
    period = sample_period(df)
    df = _events(df)
    columns = ["event", "pid", "tid", "time_s", "records", "hits", "rate"]
    if df.empty:
        return pd.DataFrame(
            {c: pd.Series(dtype=df["event"].dtype if c == "event" else "int64") for c in columns}
        )
    t0 = int(df["time_ns"].min())
    bins = (df["time_ns"].to_numpy(np.int64) - t0) // step
    nbins = int(bins.max()) + 1
    frames = []
    for key, index in df.groupby(_THREAD_KEYS, observed=True, sort=True).indices.items():
        event, pid, tid = cast(tuple[Any, Any, Any], key)
        records = np.bincount(bins[index], minlength=nbins).astype(np.int64)
        hits = records * period
        frames.append(
            pd.DataFrame(
                {
                    "event": event,
                    "pid": np.full(nbins, pid, dtype=np.int64),
                    "tid": np.full(nbins, tid, dtype=np.int64),
                    "time_s": np.arange(nbins, dtype=np.int64) * step / 1e9,
                    "records": records,
                    "hits": hits,
                    "rate": hits / (step / 1e9),
                }
            )
        )
    out = pd.concat(frames, ignore_index=True)
    out["event"] = pd.Categorical(out["event"], categories=df["event"].cat.categories)
    return out


def interarrival(df: pd.DataFrame) -> pd.DataFrame:
    """Gaps between consecutive hits of one event in one thread: columns event, pid, tid, time_ns, gap_ns.

    One row per hit but each thread's first (time_ns is the later hit's time); gap_ns is int64.
    """
    df = _events(df)
    s = df.sort_values([*_THREAD_KEYS, "time_ns"], kind="stable")
    t = s["time_ns"].to_numpy(np.int64)
    codes = s["event"].cat.codes.to_numpy()
    pid = s["pid"].to_numpy()
    tid = s["tid"].to_numpy()
    same = (codes[1:] == codes[:-1]) & (pid[1:] == pid[:-1]) & (tid[1:] == tid[:-1])
    out: pd.DataFrame = s[["event", "pid", "tid", "time_ns"]].iloc[1:][same].reset_index(drop=True)
    out["gap_ns"] = (t[1:] - t[:-1])[same]
    return out


def latency(df: pd.DataFrame) -> pd.DataFrame:
    """Return-probe rows that carry a latency: columns event, pid, tid, time_ns, latency_ns (int64 ns)."""
    df = _events(df)
    columns = ["event", "pid", "tid", "time_ns"]
    if "latency_ns" not in df.columns:
        out = df[columns].iloc[:0].reset_index(drop=True)
        out["latency_ns"] = pd.Series(dtype="int64")
        return out
    rows = df[df["latency_ns"].notna()]
    out = rows[columns].reset_index(drop=True)
    out["latency_ns"] = rows["latency_ns"].to_numpy(dtype=np.int64)
    return out


def latency_histogram(df: pd.DataFrame, by_thread: bool = False) -> pd.DataFrame:
    """Log2 histograms of return-probe latencies, as `pmu stat --latency` keeps them: one row per event
    (and pid, tid with `by_thread`) and bucket, `bucket` b counting the calls of b-bit nanoseconds
    (2**(b-1) to 2**b - 1 ns; 0 is 0 ns), `low_ns`/`high_ns` its bounds; empty buckets left out."""
    lat = latency(df)
    keys = _THREAD_KEYS if by_thread else ["event"]
    ns = lat["latency_ns"].to_numpy(np.int64).clip(min=0)
    bits = np.zeros(len(ns), dtype=np.int64)
    nonzero = ns > 0
    bits[nonzero] = np.floor(np.log2(ns[nonzero].astype(np.float64))).astype(np.int64) + 1
    lat = lat.assign(bucket=bits)
    out = lat.groupby([*keys, "bucket"], observed=True).size().reset_index(name="calls")
    b = out["bucket"].to_numpy(np.int64)
    out["low_ns"] = np.where(b > 0, np.left_shift(1, np.maximum(b - 1, 0)), 0)
    out["high_ns"] = np.left_shift(1, b) - 1
    return out


def _percentiles(values: np.ndarray[Any, Any]) -> Percentiles | None:
    if len(values) == 0:
        return None
    p50, p90, p99 = (float(x) for x in np.percentile(values, PERCENTILES))
    return Percentiles(p50=p50, p90=p90, p99=p99)


def _rate(count: int, duration_s: float) -> float | None:
    return count / duration_s if duration_s > 0 else None


def _event_names(df: pd.DataFrame, meta: dict[str, Any]) -> list[str]:
    """The recording's events: those the metadata lists, in its order, then any others of the file."""
    names: list[str] = []
    listed = meta.get("events")
    if isinstance(listed, list):
        names += [str(e) for e in listed]
    names += [str(e) for e in df["event"].cat.categories if str(e) not in names]
    return names


def is_return_probe(event: str) -> bool:
    """True for an event name of a return probe (`uretprobe:...`)."""
    return event.split(":", 1)[0].strip().lower() == "uretprobe"


def _per_cpu(df: pd.DataFrame, name: str) -> dict[int, int] | None:
    """{cpu: records} of one event, CPUs in order; None when the file has no cpu column."""
    if "cpu" not in df.columns:
        return None
    counts = df.loc[df["event"] == name, "cpu"].value_counts().sort_index()
    cpus, ns = counts.index.to_numpy(np.int64), counts.to_numpy(np.int64)
    return {int(cpu): int(n) for cpu, n in zip(cpus, ns, strict=True)}


def summary(df: pd.DataFrame) -> Summary:
    """Per event: count, duration, hits/s, inter-arrival p50/p90/p99, latency percentiles of return
    probes, lost records, and per thread: count, duration, hits/s. JSON-serializable as is.

    Rates are hits per second, whatever the sample period: an event's is its exact hit count over the
    time its records span; a thread's, its records times the sample period over its own span (records
    lost to a full ring are not in a thread's rate: the file does not say whose they were)."""
    df = _events(df)
    meta: dict[str, Any] = dict(df.attrs.get("pmu", {}))
    hits_meta = meta.get("hits_per_event") if isinstance(meta.get("hits_per_event"), dict) else {}
    lost_meta = meta.get("lost_per_event") if isinstance(meta.get("lost_per_event"), dict) else {}
    assert isinstance(hits_meta, dict) and isinstance(lost_meta, dict)
    gaps = interarrival(df)
    lat = latency(df)
    by_thread: dict[tuple[str, int, int], np.ndarray[Any, Any]] = {}
    for key, rows in lat.groupby(_THREAD_KEYS, observed=True):
        e, p, t = key
        by_thread[(str(e), int(p), int(t))] = rows["latency_ns"].to_numpy(np.int64)  # type: ignore[call-overload]
    period = sample_period(df)
    threads = df.groupby(_THREAD_KEYS, observed=True)["time_ns"].agg(["count", "min", "max"]).reset_index()
    events: list[EventSummary] = []
    for name in _event_names(df, meta):
        times = df.loc[df["event"] == name, "time_ns"].to_numpy(np.int64)
        count = len(times)
        duration = float(times.max() - times.min()) / 1e9 if count else 0.0
        own_lat = lat.loc[lat["event"] == name, "latency_ns"].to_numpy(np.int64)
        latency_pct = _percentiles(own_lat)
        per_thread: list[ThreadSummary] = []
        mine = threads[threads["event"] == name]
        for pid, tid, n, first, last in zip(
            mine["pid"].to_numpy(np.int64),
            mine["tid"].to_numpy(np.int64),
            mine["count"].to_numpy(np.int64),
            mine["min"].to_numpy(np.int64),
            mine["max"].to_numpy(np.int64),
            strict=True,
        ):
            t_duration = float(last - first) / 1e9
            mine_lat = by_thread.get((name, int(pid), int(tid)), np.empty(0, np.int64))
            pct = _percentiles(mine_lat)
            per_thread.append(
                ThreadSummary(
                    pid=int(pid),
                    tid=int(tid),
                    count=int(n),
                    duration_s=t_duration,
                    rate_hz=_rate(int(n) * period, t_duration),
                    latency_ns=None if pct is None else LatencySummary(count=len(mine_lat), **pct),
                )
            )
        per_thread.sort(key=lambda t: (-t["count"], t["pid"], t["tid"]))
        hits = int(hits_meta.get(name, count * period))
        events.append(
            EventSummary(
                event=name,
                count=count,
                hits=hits,
                lost=int(lost_meta.get(name, 0)),
                duration_s=duration,
                rate_hz=_rate(hits, duration),
                interarrival_ns=_percentiles(gaps.loc[gaps["event"] == name, "gap_ns"].to_numpy(np.int64)),
                return_probe=is_return_probe(name) or len(own_lat) > 0,
                latency_ns=None if latency_pct is None else LatencySummary(count=len(own_lat), **latency_pct),
                threads=per_thread,
                cpus=_per_cpu(df, name),
            )
        )
    lost = meta.get("lost")
    if not isinstance(lost, int):
        lost = sum(int(v) for v in lost_meta.values())
    stated_period = meta.get("sample_period")
    command = meta.get("command")
    start = meta.get("start_time")
    path = df.attrs.get("path")
    return Summary(
        path=str(path) if path is not None else None,
        command=[str(c) for c in command] if isinstance(command, list) else None,
        start_time=str(start) if start is not None else None,
        records=len(df),
        duration_s=float(df["time_ns"].max() - df["time_ns"].min()) / 1e9 if len(df) else 0.0,
        lost=lost,
        sample_period=stated_period if isinstance(stated_period, int) else None,
        events=events,
    )


# --- plotting ----------------------------------------------------------------------------------------


def _pyplot() -> ModuleType:
    """matplotlib.pyplot, on the Agg backend when nothing chose a backend and there is no display."""
    import matplotlib

    headless = not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if headless and "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    _, new = _pyplot().subplots(figsize=(8, 4.5))
    axes: Axes = new
    return axes


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes)


def auto_interval(df: pd.DataFrame, bins: int = 100) -> pd.Timedelta:
    """A round bin width (1, 2 or 5 times a power of ten, at least 1 us) giving at most `bins` bins."""
    span = int(df["time_ns"].max() - df["time_ns"].min()) if len(df) else 0
    power = 1_000
    while True:
        for step in (power, 2 * power, 5 * power):
            if span // step + 1 <= bins:
                return pd.Timedelta(step, unit="ns")
        power *= 10


def plot_rates(
    df: pd.DataFrame, ax: Axes | None = None, interval: str | int | pd.Timedelta | None = None
) -> Axes:
    """Each thread's hit rate over time, one line per (event, thread), from `rates(df, interval)`.

    interval None picks a round bin width giving about 100 bins (`auto_interval`). Each line is drawn
    as steps over its bins, the last one included; a thread keeps one colour, each event its line style.
    """
    ax = _axes(ax)
    if interval is None:
        interval = auto_interval(df)
    step_s = interval_ns(interval) / 1e9
    r = rates(df, interval)
    events = list(dict.fromkeys(str(e) for e in r["event"]))
    threads = list(dict.fromkeys(zip(r["pid"], r["tid"], strict=True)))
    lines = 0
    for (event, pid, tid), rows in r.groupby(_THREAD_KEYS, observed=True, sort=True):
        label = f"{event} tid {tid}" if len(events) > 1 else f"tid {tid}"
        t = rows["time_s"].to_numpy(np.float64)
        y = rows["rate"].to_numpy(np.float64)
        ax.plot(
            np.append(t, t[-1] + step_s),
            np.append(y, y[-1]),
            drawstyle="steps-post",
            label=label,
            color=f"C{threads.index((pid, tid)) % 10}",  # a thread keeps its colour across events
            linestyle=_LINESTYLES[events.index(str(event)) % len(_LINESTYLES)],
        )
        lines += 1
    ax.set_xlabel("time since the first hit (s)")
    ax.set_ylabel("hits/s")
    ax.set_title(f"Hit rate per thread ({_duration_text(interval_ns(interval))} bins)")
    if lines == 0:
        _no_data(ax, "no hits")
    elif lines <= 20:
        ax.legend(fontsize="small")
    return ax


def _duration_text(ns: int) -> str:
    for unit, size in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if ns >= size and ns % size == 0:
            return f"{ns // size} {unit}"
    return f"{ns} ns"


def _log_hist(ax: Axes, groups: Iterable[tuple[str, np.ndarray[Any, Any]]], bins: int) -> int:
    """Histograms of positive durations on log-spaced bins shared by all groups; returns how many drawn."""
    data = [(label, np.maximum(values.astype(np.float64), 1.0)) for label, values in groups if len(values)]
    if not data:
        return 0
    lo = min(float(v.min()) for _, v in data)
    hi = max(float(v.max()) for _, v in data)
    if hi <= lo:
        lo, hi = lo / 2, hi * 2
    edges = np.logspace(np.log10(lo), np.log10(hi), bins + 1)
    for label, values in data:
        ax.hist(values, bins=edges.tolist(), histtype="step", label=label)
    ax.set_xscale("log")
    return len(data)


def plot_distribution(df: pd.DataFrame, ax: Axes | None = None, bins: int = 50) -> Axes:
    """Histogram of inter-arrival times (log-spaced bins, log x axis), one outline per event."""
    gaps = interarrival(df)
    return _hist_panel(
        _axes(ax),
        ((str(e), rows["gap_ns"].to_numpy(np.int64)) for e, rows in gaps.groupby("event", observed=True)),
        bins,
        ("time between consecutive hits of a thread (ns)", "gaps", "Inter-arrival times"),
        "fewer than two hits in every thread",
    )


def plot_latency(df: pd.DataFrame, ax: Axes | None = None, bins: int = 50) -> Axes:
    """Histogram of return-probe latencies (log-spaced bins, log x axis), one outline per event."""
    lat = latency(df)
    return _hist_panel(
        _axes(ax),
        ((str(e), rows["latency_ns"].to_numpy(np.int64)) for e, rows in lat.groupby("event", observed=True)),
        bins,
        ("latency, entry to return (ns)", "calls", "Return-probe latency"),
        "no return-probe latencies",
    )


def _hist_panel(
    ax: Axes,
    data: Iterable[tuple[str, np.ndarray[Any, Any]]],
    bins: int,
    labels: tuple[str, str, str],
    empty: str,
) -> Axes:
    """`_log_hist` of data on ax with (x label, y label, title); `empty` is said when nothing was drawn."""
    drawn = _log_hist(ax, data, bins)
    xlabel, ylabel, title = labels
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if drawn == 0:
        _no_data(ax, empty)
    else:
        ax.legend(fontsize="small")
    return ax


def write_plots(df: pd.DataFrame, directory: str | os.PathLike[str]) -> list[Path]:
    """Write rates.png, interarrival.png and (with return-probe latencies) latency.png into directory.

    Uses matplotlib's object API (no pyplot, no GUI backend). Returns the files written; raises
    FileError when the directory cannot be made or a file cannot be written.
    """
    from matplotlib.figure import Figure

    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FileError(f"cannot create {out}: {err.strerror or err}") from None
    plots = [("rates.png", plot_rates), ("interarrival.png", plot_distribution)]
    if len(latency(df)):
        plots.append(("latency.png", plot_latency))
    written = []
    for filename, plot in plots:
        fig = Figure(figsize=(8, 4.5), dpi=100, layout="tight")
        plot(df, fig.add_subplot())
        path = out / filename
        try:
            fig.savefig(path)
        except OSError as err:
            raise FileError(f"cannot write {path}: {err.strerror or err}") from None
        written.append(path)
    return written
