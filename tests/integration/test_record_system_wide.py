"""`pmu record -a`: the kernel's uprobe PMU samples every process into mmap rings, and the file has the
same schema as the ptrace engine's plus a `cpu` column; `pmu report` shows where the hits ran."""

from __future__ import annotations

import re
from collections import Counter

import pandas as pd
import pytest

from pmu.output.parquet import read_metadata
from tests.conftest import run_pmu


def _printed(stdout: str) -> Counter[int]:
    """{tid: calls} as the mt target prints them."""
    return Counter({int(t): int(c) for t, c in re.findall(r"tid=(\d+) calls=(\d+)", stdout)})


@pytest.mark.parametrize("cpus", [(), ("-C", "0")])
def test_rows_per_thread_equal_the_workloads_own_calls(build, tmp_path, cpus) -> None:
    mt = build("mt")
    out = tmp_path / "sw.parquet"
    workload = f"{mt} 3 200 & {mt} 2 150; wait"
    pin = ["taskset", "-c", "0"] if cpus else []  # -C 0 sees only what runs on CPU 0
    r = run_pmu(
        "record", "-a", *cpus, "--args", "1", "-o", out, "-e", f"uprobe:{mt}:work", "--", *pin,
        "sh", "-c", workload,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    printed = _printed(r.stdout)
    assert sum(printed.values()) == 3 * 200 * 2 + 150 * 3  # (1+2+3)*200 + (1+2)*150
    df = pd.read_parquet(out)
    assert list(df.columns) == ["time_ns", "pid", "tid", "event", "ip", "arg0", "cpu"]
    assert Counter(df["tid"].tolist()) == printed
    assert df["pid"].nunique() == 2
    if cpus:
        assert set(df["cpu"]) == {0}
    # each thread's work(i) calls, i = 0..calls-1, in order
    # each CPU's ring is in time order; a thread that moved between CPUs has its rows in two rings
    for tid, rows in df.sort_values("time_ns", kind="stable").groupby("tid"):
        assert rows["arg0"].tolist() == list(range(printed[int(tid)]))
    for _, rows in df.groupby("cpu"):
        assert rows["time_ns"].is_monotonic_increasing
    meta = read_metadata(out)
    assert meta["pmu.lost"] == 0
    assert meta["pmu.hits_per_event"] == {f"uprobe:{mt}:work": len(df)}
    assert meta["pmu.command"][0] == ("taskset" if cpus else "sh")

    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"select tid, count(*) from read_parquet('{out}') group by tid").fetchall()
    assert Counter(dict(rows)) == printed
    assert duckdb.sql(f"select sum(cpu >= 0)::int from read_parquet('{out}')").fetchall() == [(len(df),)]

    rep = run_pmu("report", "-i", out)
    assert rep.returncode == 0, rep.stderr
    assert "CPU" in rep.stdout
    per_cpu = {
        int(cpu): int(n.replace(",", ""))
        for n, cpu in re.findall(r"^\s+([\d,]+)\s+[\d.]+%\s+(\d+)$", rep.stdout, re.M)
    }
    assert per_cpu == df["cpu"].value_counts().to_dict()


def test_record_counters_is_refused_with_one_line(tmp_path) -> None:
    r = run_pmu("record", "-a", "-o", tmp_path / "x.parquet", "-e", "task-clock", "--", "true")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "pmu stat" in r.stderr
    assert not (tmp_path / "x.parquet").exists()
