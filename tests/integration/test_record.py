"""`pmu record`: one row per hit, per-thread order, return probes with latency, lost accounting."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import run_pmu


def _meta(path) -> dict[str, str]:
    raw = pq.ParquetFile(path).metadata.metadata
    return {k.decode(): v.decode() for k, v in raw.items() if k.startswith(b"pmu.")}


def test_four_threads_one_row_per_call(build, tmp_path):
    mt = build("mt")
    out = tmp_path / "mt.parquet"
    before = time.monotonic_ns()
    r = run_pmu("record", "-o", out, "--args", "1", "-e", "uprobe:work", "--", mt, "4", "500")
    after = time.monotonic_ns()
    assert r.returncode == 0, r.stderr
    assert "Lost" not in r.stderr
    calls = {int(t): int(c) for t, c in re.findall(r"tid=(\d+) calls=(\d+)", r.stdout)}
    table = pq.read_table(out)
    df = table.to_pandas()
    assert len(df) == sum(calls.values()) == 500 * (1 + 2 + 3 + 4)
    assert df.groupby("tid").size().to_dict() == calls
    assert df["time_ns"].between(before, after).all()
    for _, rows in df.groupby("tid"):
        assert rows["time_ns"].is_monotonic_increasing
        assert sorted(rows["arg0"]) == list(range(len(rows)))  # work(i) for i in 0..calls-1
    assert set(df["event"]) == {"uprobe:work"}
    assert str(table.schema.field("event").type).startswith("dictionary")
    meta = _meta(out)
    assert meta["pmu.schema_version"] == "1"
    assert json.loads(meta["pmu.hits_per_event"]) == {"uprobe:work": 5000}
    assert meta["pmu.lost"] == "0"
    assert json.loads(meta["pmu.command"]) == [str(mt), "4", "500"]
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"select tid, count(*) from read_parquet('{out}') group by tid").fetchall()
    assert dict(rows) == calls


def test_return_probes_recursion_and_longjmp(build, tmp_path):
    ret = build("ret")
    plain = subprocess.run([ret, "10", "6"], capture_output=True, text=True)
    out = tmp_path / "ret.parquet"
    r = run_pmu(
        "record",
        "-o",
        out,
        "--args",
        "1",
        "-e",
        "uprobe:fib",
        "-e",
        "uretprobe:fib",
        "-e",
        "uretprobe:jumper",
        "--",
        ret,
        "10",
        "6",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == plain.stdout  # longjmp over a probed function: output unchanged
    df = pq.read_table(out).to_pandas()
    entries = df[df.event == "uprobe:fib"]
    returns = df[df.event == "uretprobe:fib"]
    assert len(entries) == len(returns) == 177  # fib(10) makes 177 calls
    assert (returns["latency_ns"] >= 0).all()
    fib = [0, 1]
    for _ in range(2, 11):
        fib.append(fib[-1] + fib[-2])
    # Each return's value is fib(n) for some n <= 10; the distribution matches the call tree.
    calls_with = {n: 0 for n in range(11)}

    def walk(n: int) -> None:
        calls_with[n] += 1
        if n >= 2:
            walk(n - 1)
            walk(n - 2)

    walk(10)
    assert sorted(entries["arg0"]) == sorted(n for n, k in calls_with.items() for _ in range(k))
    expected_retvals = sorted(fib[n] for n, k in calls_with.items() for _ in range(k))
    assert sorted(int(v) for v in returns["retval"]) == expected_retvals
    assert len(df[df.event == "uretprobe:jumper"]) == 3  # half the rounds longjmp out of jumper


def test_args_of_a_return_probe_are_those_of_its_entry(build, tmp_path):
    """--args on a uretprobe records the function's arguments as they were at its entry, beside the
    value it returned: every fib return has retval == fib(arg0), though rdi has changed by then."""
    ret = build("ret")
    out = tmp_path / "ret.parquet"
    r = run_pmu("record", "--args", "2", "-o", out, "-e", "uretprobe:fib", "--", ret, "12", "2")
    assert r.returncode == 0, r.stderr
    df = pq.read_table(out).to_pandas()
    fib = [0, 1]
    for _ in range(2, 13):
        fib.append(fib[-1] + fib[-2])
    assert len(df) == 465  # fib(12) makes 465 calls
    assert set(df["arg0"]) == set(range(13))
    assert all(int(v) == fib[int(n)] for n, v in zip(df["arg0"], df["retval"], strict=True))


def test_args_of_a_return_probe_are_refused_by_the_kernel_engine(build, tmp_path):
    """The kernel's uretprobe has only the registers at the return: one line, exit 2, nothing written."""
    ret = build("ret")
    out = tmp_path / "ret.parquet"
    argv = ["record", "--engine", "kernel", "--args", "1", "-o", out, "-e", "uretprobe:fib", "--", ret, "5"]
    r = run_pmu(*argv)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "arguments at its entry" in r.stderr and "--engine ptrace" in r.stderr
    assert not out.exists()


def test_ring_too_small_counts_lost(build, tmp_path):
    hot = build("hot")
    out = tmp_path / "hot.parquet"
    r = run_pmu("record", "-o", out, "-m", "1", "-e", "uprobe:work", "--", hot, "20000")
    assert r.returncode == 0, r.stderr
    meta = _meta(out)
    rows = pq.ParquetFile(out).metadata.num_rows
    lost = int(meta["pmu.lost"])
    assert lost > 0, "a one-page ring should overflow on a burst of 20000 hits"
    assert rows + lost == 20000
    assert json.loads(meta["pmu.lost_per_event"]) == {"uprobe:work": lost}
    assert json.loads(meta["pmu.hits_per_event"]) == {"uprobe:work": 20000}
    assert re.search(rf"^Lost {lost} samples", r.stderr, re.M)


def test_period_and_old_file(build, tmp_path):
    hot = build("hot")
    out = tmp_path / "p.parquet"
    out.write_text("previous run")
    r = run_pmu("record", "-o", out, "-c", "10", "-e", "uprobe:work", "--", hot, "1000")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.parquet.old").read_text() == "previous run"
    assert pq.ParquetFile(out).metadata.num_rows == 100
    assert json.loads(_meta(out)["pmu.hits_per_event"]) == {"uprobe:work": 1000}


def test_record_bad_input(tmp_path):
    r = run_pmu("record", "-o", tmp_path / "x.parquet", "-c", "0", "-e", "uprobe:work", "--", "true")
    assert r.returncode == 2 and r.stderr.startswith("pmu: bad -c period")
    r = run_pmu("record", "--args", "9", "-e", "uprobe:work", "--", "true")
    assert r.returncode == 2 and "at most 6" in r.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_file_valid_when_the_command_crashes(build, tmp_path):
    die = build("life_die")
    out = tmp_path / "die.parquet"
    r = run_pmu("record", "-o", out, "-e", "uprobe:work", "--", die, "123", "segv")
    assert r.returncode == 139, r.stderr
    assert pq.ParquetFile(out).metadata.num_rows == 123
    assert json.loads(_meta(out)["pmu.hits_per_event"]) == {"uprobe:work": 123}


def test_attach_record_until_ctrl_c(build, tmp_path):
    import os
    import signal

    spin = subprocess.Popen([build("spin"), "30", "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert spin.stdout.readline() == "ready\n"
        out = tmp_path / "spin.parquet"
        pmu = subprocess.Popen(
            [
                os.sys.executable,
                "-m",
                "pmu",
                "record",
                "-o",
                str(out),
                "-p",
                str(spin.pid),
                "-e",
                "uprobe:work",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)
        pmu.send_signal(signal.SIGINT)
        _, err = pmu.communicate(timeout=30)
        assert pmu.returncode == 0, err
        df = pq.read_table(out).to_pandas()
        hits = json.loads(_meta(out)["pmu.hits_per_event"])["uprobe:work"]
        assert hits > 0 and len(df) + int(_meta(out)["pmu.lost"]) == hits
        assert set(df["pid"]) == {spin.pid}
        spin.send_signal(signal.SIGUSR1)
        stdout, _ = spin.communicate(timeout=30)
        assert spin.returncode == 0 and stdout.startswith("total=")
    finally:
        if spin.poll() is None:
            spin.kill()
