"""Exact counts however threads come and go: a finished thread's TLS (and so its FS base, the key of
the jump patches' per-thread counter rows) given to the next thread, hundreds of threads at once, a
thread that shares its parent's FS base, one that moves its FS base. Both engines (make test runs the
integration suite again with --no-optimize)."""

from __future__ import annotations

import json
import subprocess

import pyarrow.parquet as pq
import pytest

from pmu.output.parquet import read_metadata
from tests.conftest import NO_OPTIMIZE, per_thread_counts, run_pmu, stat_counts
from tests.integration.test_vs_perf import _offset

EVENT = "uprobe:f"
CALLS = 20 if NO_OPTIMIZE else 1000
"""Calls per thread in the many-thread runs: an int3 hit costs tens of µs, a jump patch's nanoseconds."""


def _said(stdout: str) -> int:
    return int(stdout.split("f called ")[1].split()[0])


def test_thread_churn_counts_each_thread_once(build):
    exe = build("thread_ids")
    r = run_pmu("stat", "-x,", "-e", EVENT, "--", exe, "churn", "100", "100")
    assert r.returncode == 0, r.stderr
    assert _said(r.stdout) == 10_000
    assert stat_counts(r.stderr) == {EVENT: 10_000}


def test_thread_churn_per_thread_one_row_per_thread(build):
    exe = build("thread_ids")
    r = run_pmu("stat", "-x,", "--per-thread", "-e", EVENT, "--", exe, "churn", "60", "100")
    assert r.returncode == 0, r.stderr
    rows = per_thread_counts(r.stderr)
    workers = {tid: n for (_, tid), n in rows.items() if n}
    assert len(workers) == 60, rows
    assert set(workers.values()) == {100}


def test_thread_churn_record_metadata_equals_rows(build, tmp_path):
    exe = build("thread_ids")
    out = tmp_path / "churn.parquet"
    r = run_pmu("record", "-o", out, "-e", EVENT, "--", exe, "churn", "100", "100")
    assert r.returncode == 0, r.stderr
    table = pq.read_table(out)
    assert table.num_rows == 10_000
    assert json.loads(json.dumps(read_metadata(out)["pmu.hits_per_event"])) == {EVENT: 10_000}
    assert table.to_pandas().groupby("tid").size().nunique() == 1
    report = run_pmu("report", "-i", out)
    assert report.returncode == 0, report.stderr
    assert "10,000" in report.stdout + report.stderr


def test_thread_churn_equals_perf(build, kernel_uprobes):
    exe = str(build("thread_ids"))
    path, off = _offset(EVENT, exe)
    kname = kernel_uprobes.add("churn_f", path, off)
    argv = [exe, "churn", "50", "100"]
    perf = kernel_uprobes.stat([kname], argv)
    r = run_pmu("stat", "-x,", "-e", EVENT, "--", *argv)
    assert stat_counts(r.stderr) == {EVENT: perf[kname]} == {EVENT: 5000}


@pytest.mark.parametrize(("threads", "runs"), [(500, 20), (1000, 5)])
def test_many_threads_at_once_are_exact(build, threads, runs):
    """Every thread waits on one barrier, then all call f() together: more threads than the counter
    area once had rows for, each claiming a row at the same moment."""
    exe = build("thread_ids")
    for _ in range(runs if not NO_OPTIMIZE else 2):
        r = run_pmu("stat", "-x,", "-e", EVENT, "--", exe, "many", str(threads), str(CALLS), timeout=300)
        assert r.returncode == 0, r.stderr
        assert stat_counts(r.stderr) == {EVENT: threads * CALLS}


def test_many_threads_per_thread(build):
    exe = build("thread_ids")
    r = run_pmu("stat", "-x,", "--per-thread", "-e", EVENT, "--", exe, "many", "300", str(CALLS))
    assert r.returncode == 0, r.stderr
    workers = [n for n in per_thread_counts(r.stderr).values() if n]
    assert len(workers) == 300 and set(workers) == {CALLS}


def test_thread_without_a_tls_of_its_own(build):
    """A raw clone without CLONE_SETTLS: two live threads with one FS base, each hit counted once.
    They share a counter row, which pmu then increments with a lock: without it, the two threads'
    increments of the row race and hits are lost (537,080 of 600,000 seen) whenever they overlap."""
    exe = build("thread_ids")
    r = run_pmu("stat", "-x,", "-e", EVENT, "--", exe, "notls", "300000")
    assert r.returncode == 0, r.stderr
    assert _said(r.stdout) == 600_000
    assert stat_counts(r.stderr) == {EVENT: 600_000}


def test_thread_that_moves_its_fs_base(build):
    """arch_prctl(ARCH_SET_FS) in the middle of a thread's life: the hits under either key count."""
    exe = build("thread_ids")
    r = run_pmu("stat", "-x,", "-e", EVENT, "--", exe, "setfs", "2000")
    assert r.returncode == 0, r.stderr
    assert _said(r.stdout) == 6000
    assert stat_counts(r.stderr) == {EVENT: 6000}


def test_thread_whose_fs_base_is_not_a_tcb(build):
    """The fast path reads a thread's identity from its TCB (fs:[0]) while every thread pmu has seen has
    one; a thread that then moves its FS base, unseen, to a block that is not a TCB (first word 0, or
    another block's address) is counted through rdfsbase all the same, and runs as without pmu."""
    exe = build("thread_ids")
    bare = subprocess.run([exe, "foreign", "3000"], capture_output=True, text=True, timeout=60)
    r = run_pmu("stat", "-x,", "-e", EVENT, "--", exe, "foreign", "3000")
    assert r.returncode == bare.returncode == 0, r.stderr
    assert r.stdout == bare.stdout and _said(r.stdout) == 12_000
    assert stat_counts(r.stderr) == {EVENT: 12_000}
