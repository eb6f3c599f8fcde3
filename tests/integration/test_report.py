"""`pmu report` as a user runs it (text, CSV, JSON, --plot, one-line errors), the analysis notebook
executed end to end on a synthetic recording, and a real `pmu record` read back by both."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pmu import analysis
from tests.conftest import ROOT, processes_running, run_pmu
from tests.unit.test_analysis import ENTRY, IDLE, PID, RET, scenario, times_of, write_recording

NOTEBOOK = ROOT / "analysis" / "hits.ipynb"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
C0 = (0x1F, 0x77, 0xB4)  # matplotlib's first colour: the first line or outline drawn


@pytest.fixture
def rec(tmp_path: Path) -> Path:
    s = scenario()
    return write_recording(
        tmp_path / "rec.parquet",
        s["time_ns"],
        s["tid"],
        s["event"],
        latency_ns=s["latency_ns"],
        retval=s["retval"],
        events=[ENTRY, RET, IDLE],
        metadata={"pmu.lost": "7", "pmu.lost_per_event": json.dumps({ENTRY: 7})},
    )


@pytest.fixture
def entry_only(tmp_path: Path) -> Path:
    t = [1_000_000 * k for k in range(50)]
    return write_recording(tmp_path / "entry.parquet", t, [11] * 50, [ENTRY] * 50)


def assert_one_line_error(r: subprocess.CompletedProcess[str], message: str) -> None:
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert r.stderr == f"pmu: {message}\n"


def pcts(values: np.ndarray[Any, Any]) -> list[float]:
    return [float(x) for x in np.percentile(values, [50, 90, 99])]


# --- the three formats -------------------------------------------------------------------------------


def test_text(rec: Path) -> None:
    r = run_pmu("report", "-i", rec)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    out = r.stdout
    assert out.startswith(f"# pmu report of {rec}\n# Command: ./mt 4 1000\n")
    assert "# Lost records: 7\n" in out
    for event in (ENTRY, RET, IDLE):
        assert f"# Event: {event}\n" in out
    assert f"# Samples: 1,500 of event '{ENTRY}'\n# Event count: 1,500\n" in out
    assert f"# Samples: 400 of event '{RET}'\n" in out
    assert f"# Samples: 0 of event '{IDLE}'\n" in out
    assert "# Inter-arrival: p50 1,000,000 ns" in out
    lat = np.array([v for v in scenario()["latency_ns"] if v is not None])
    p50, p90, p99 = pcts(lat)
    assert f"# Latency: p50 {p50:,.0f} ns  p90 {p90:,.0f} ns  p99 {p99:,.0f} ns (400 calls)\n" in out
    # per-thread table rows of the entry event: count, percent, rate, duration, pid, tid
    entry_block = out.split(f"# Event: {ENTRY}\n")[1].split("# Event:")[0]
    rows = [line.split() for line in entry_block.splitlines() if line and not line.startswith("#")]
    assert [(row[0], row[1], row[4], row[5]) for row in rows] == [
        ("1,000", "66.67%", str(PID), "101"),
        ("300", "20.00%", str(PID), "102"),
        ("200", "13.33%", str(PID), "103"),
    ]
    assert rows[0][2] == f"{1000 / 0.999:,.1f}"


def test_csv(rec: Path) -> None:
    r = run_pmu("report", "-i", rec, "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    events = {row["event"]: row for row in rows if row["tid"] == ""}
    assert list(events) == [ENTRY, RET, IDLE]
    assert int(events[ENTRY]["count"]) == 1500 and int(events[ENTRY]["lost"]) == 7
    gaps = np.concatenate([np.diff(times_of(ENTRY, tid)) for tid in (101, 102, 103)])
    got = [float(events[ENTRY][f"interarrival_p{p}_ns"]) for p in (50, 90, 99)]
    assert got == pytest.approx(pcts(gaps))
    lat = np.array([v for v in scenario()["latency_ns"] if v is not None])
    assert [float(events[RET][f"latency_p{p}_ns"]) for p in (50, 90, 99)] == pytest.approx(pcts(lat))
    assert events[ENTRY]["latency_p50_ns"] == "" and events[IDLE]["rate_hz"] == ""
    threads = {(row["event"], int(row["tid"])): row for row in rows if row["tid"]}
    assert {k: int(v["count"]) for k, v in threads.items()} == {
        (ENTRY, 101): 1000,
        (ENTRY, 102): 300,
        (ENTRY, 103): 200,
        (RET, 101): 400,
    }
    assert float(threads[(ENTRY, 102)]["rate_hz"]) == pytest.approx(300 / 0.598)
    assert all(int(v["pid"]) == PID for v in threads.values())


def test_json(rec: Path) -> None:
    r = run_pmu("report", "-i", rec, "--format", "json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["records"] == 1900 and result["lost"] == 7
    assert result["command"] == ["./mt", "4", "1000"]
    entry, ret, idle = result["events"]
    assert {t["tid"]: t["count"] for t in entry["threads"]} == {101: 1000, 102: 300, 103: 200}
    assert ret["return_probe"] is True and ret["latency_ns"]["count"] == 400
    assert idle["count"] == 0 and idle["rate_hz"] is None
    assert result == json.loads(json.dumps(analysis.summary(analysis.load(rec))))


# --- plots -------------------------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def assert_real_plot(path: Path) -> None:
    """A PNG that matplotlib drew something on: right size, many colours, ink, and the first line colour."""
    import matplotlib.image

    data = path.read_bytes()
    assert png_size(data) == (800, 450)
    pixels = (matplotlib.image.imread(path)[:, :, :3] * 255).round().astype(int)
    flat = pixels.reshape(-1, 3)
    assert len(np.unique(flat, axis=0)) > 20
    assert (flat < 250).any(axis=1).mean() > 0.01  # more than a blank canvas
    assert (np.abs(flat - np.array(C0)).max(axis=1) <= 8).sum() > 50  # the data, in the first colour


def test_plot_writes_pngs(rec: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots" / "sub"
    r = run_pmu("report", "-i", rec, "--plot", out, "--format", "json")
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["interarrival.png", "latency.png", "rates.png"]
    for name in ("rates.png", "interarrival.png", "latency.png"):
        assert_real_plot(out / name)


def test_plot_without_return_probes_has_no_latency(entry_only: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    r = run_pmu("report", "-i", entry_only, "--plot", out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["interarrival.png", "rates.png"]
    assert_real_plot(out / "rates.png")
    assert "# Latency" not in r.stdout


def test_plot_into_a_file_is_one_line_error(rec: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_pmu("report", "-i", rec, "--plot", blocker)
    assert_one_line_error(r, f"cannot create {blocker}: File exists")


# --- errors ------------------------------------------------------------------------------------------


def test_missing_default_file(tmp_path: Path) -> None:
    r = run_pmu("report", cwd=str(tmp_path))
    assert_one_line_error(r, "cannot read pmu.parquet: No such file or directory")


def test_not_a_parquet_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a recording\n")
    r = run_pmu("report", "-i", "notes.txt", cwd=str(tmp_path))
    assert_one_line_error(r, "cannot read notes.txt: not a Parquet file")


def test_parquet_that_is_not_a_recording(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1]}), tmp_path / "x.parquet")
    r = run_pmu("report", "-i", "x.parquet", cwd=str(tmp_path))
    assert_one_line_error(
        r, "cannot read x.parquet: not a pmu recording (no pmu.schema_version in its metadata)"
    )


def test_corrupt_metadata_is_a_one_line_error(tmp_path: Path) -> None:
    write_recording(tmp_path / "c.parquet", [1, 2], [1, 1], [ENTRY] * 2, metadata={"pmu.lost": "-3"})
    r = run_pmu("report", "-i", "c.parquet", cwd=str(tmp_path))
    assert_one_line_error(r, "cannot read c.parquet: corrupt metadata (pmu.lost is '-3')")


def test_wrong_column_types_are_a_one_line_error(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "time_ns": pa.array(["a", "b"]),
            "pid": pa.array([1, 1], pa.int32()),
            "tid": pa.array([1, 1], pa.int32()),
            "event": pa.array(["e", "e"]),
            "ip": pa.array([0, 0], pa.uint64()),
        }
    )
    with pq.ParquetWriter(tmp_path / "t.parquet", table.schema) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({"pmu.schema_version": "1"})
    for fmt in ("text", "csv", "json"):
        r = run_pmu("report", "-i", "t.parquet", "--format", fmt, cwd=str(tmp_path))
        assert_one_line_error(r, "cannot read t.parquet: column time_ns is string, not integers")


@pytest.mark.parametrize("fmt", ["text", "csv", "json"])
def test_reader_gone_ends_quietly(tmp_path: Path, fmt: str) -> None:
    """`pmu report | head`: the reader goes away; pmu report ends by SIGPIPE as cat does, no message.
    The pipe's read end is closed before pmu starts, so every write fails, whatever the machine's speed."""
    n = 5000  # a report far bigger than a pipe's buffer
    path = write_recording(tmp_path / "big.parquet", list(range(n)), list(range(n)), [ENTRY] * n)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "pmu", "report", "-i", str(path), "--format", fmt],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert r.stderr == ""
    assert r.returncode == -signal.SIGPIPE  # 141 in a shell, as `cat big | head` or `perf report | head`


def test_bad_format_is_a_usage_error(rec: Path) -> None:
    r = run_pmu("report", "-i", rec, "--format", "xml")
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and "invalid choice" in r.stderr


def test_report_module_imports_no_heavy_libraries() -> None:
    """Building the parser imports every command module: report's must not pull pandas or matplotlib."""
    code = (
        "import sys; import pmu.commands.report; "
        "print(sorted(m for m in ('pandas', 'matplotlib', 'pyarrow') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[]\n"


# --- the notebook ------------------------------------------------------------------------------------


def execute_notebook(recording: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    import nbclient
    import nbformat

    monkeypatch.setenv("PMU_RECORDING", str(recording))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    return nb


def outputs_of(nb: Any) -> tuple[str, int]:
    """All text the notebook printed or displayed, and how many images it showed."""
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", out
            if out["output_type"] == "stream":
                text.append(out["text"])
            data = out.get("data", {})
            text.append(data.get("text/plain", ""))
            images += "image/png" in data
    return "".join(text), images


def test_committed_notebook_has_no_outputs() -> None:
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_notebook_runs_on_a_recording(rec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute_notebook(rec, tmp_path, monkeypatch)
    text, images = outputs_of(nb)
    assert f"{rec}: 1,900 hits" in text
    assert "command: ./mt 4 1000" in text and "lost:    7" in text
    assert ENTRY in text and RET in text
    assert "no return probes" not in text
    assert images == 3  # rates, inter-arrival, latency


def test_notebook_without_return_probes(
    entry_only: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nb = execute_notebook(entry_only, tmp_path, monkeypatch)
    text, images = outputs_of(nb)
    assert "no return probes in this recording" in text
    assert images == 2


# --- a real recording --------------------------------------------------------------------------------


def test_record_then_report(build: Any, tmp_path: Path) -> None:
    mt = build("mt")
    out = tmp_path / "mt.parquet"
    r = run_pmu("record", "-o", out, "-e", f"uprobe:{mt}:work", "--", mt, "4", "1000")
    assert r.returncode == 0, r.stderr
    expected = {int(t): int(c) for t, c in re.findall(r"tid=(\d+) calls=(\d+)", r.stdout)}
    assert sorted(expected.values()) == [1000, 2000, 3000, 4000]
    assert processes_running(mt) == []

    df = analysis.load(out)
    assert df.attrs["pmu"]["events"] == [f"uprobe:{mt}:work"]
    assert df.attrs["pmu"]["lost"] == 0
    assert len(df) == 10_000 and df["pid"].nunique() == 1
    assert df.groupby("tid")["time_ns"].count().to_dict() == expected

    rep = run_pmu("report", "-i", out, "--format", "json", "--plot", tmp_path / "plots")
    assert rep.returncode == 0, rep.stderr
    result = json.loads(rep.stdout)
    (ev,) = result["events"]
    assert ev["event"] == f"uprobe:{mt}:work"
    assert ev["count"] == ev["hits"] == 10_000
    assert {t["tid"]: t["count"] for t in ev["threads"]} == expected
    assert ev["interarrival_ns"]["p50"] > 0
    assert_real_plot(tmp_path / "plots" / "rates.png")
    text = run_pmu("report", "-i", out)
    assert text.returncode == 0, text.stderr
    assert f"# Event: uprobe:{mt}:work\n# Samples: 10,000 of event" in text.stdout


def test_rates_count_hits_with_a_sample_period(build: Any, tmp_path: Path) -> None:
    """`record -c 10` keeps one row in 10: `pmu report` still gives hits per second, in text, CSV, JSON
    and the rate series of the plots. The truth comes from the target: each call of work() is stamped
    with CLOCK_MONOTONIC before and after, so the hits between the first and the last record are known."""
    recpath = build("recpath")
    out = tmp_path / "c10.parquet"
    n = 3000
    r = run_pmu("record", "-c", "10", "-o", out, "-e", f"uprobe:{recpath}:work", "--", recpath, "stamp", n)
    assert r.returncode == 0, r.stderr
    stamps = np.array([[int(x) for x in line.split()[2:]] for line in r.stdout.splitlines()])
    assert len(stamps) == n
    df = analysis.load(out)
    assert len(df) == n // 10
    first, last = int(df["time_ns"].min()), int(df["time_ns"].max())
    middle = stamps.mean(axis=1)
    true_rate = (np.count_nonzero((middle >= first) & (middle <= last)) - 1) / ((last - first) / 1e9)

    rep = run_pmu("report", "-i", out, "--format", "json")
    assert rep.returncode == 0, rep.stderr
    (ev,) = json.loads(rep.stdout)["events"]
    assert ev["count"] == n // 10 and ev["hits"] == n
    assert ev["rate_hz"] == pytest.approx(true_rate, rel=0.01)  # not a tenth of it
    (th,) = ev["threads"]
    assert th["rate_hz"] == pytest.approx(true_rate, rel=0.01)

    rows = list(csv.DictReader(io.StringIO(run_pmu("report", "-i", out, "--format", "csv").stdout)))
    assert [float(row["rate_hz"]) for row in rows] == [ev["rate_hz"], th["rate_hz"]]
    text = run_pmu("report", "-i", out).stdout
    assert f"s, {ev['rate_hz']:,.1f} hits/s" in text
    assert f"{th['rate_hz']:,.1f}" in text.split("# ....")[-1]

    series = analysis.rates(df, "1ms")
    assert series["hits"].sum() == n and series["records"].sum() == n // 10
    assert np.allclose(series["rate"], series["records"] * 10 / 1e-3)
