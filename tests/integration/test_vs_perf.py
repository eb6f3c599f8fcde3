"""pmu's counts equal perf stat's with kernel uprobes at the same file offsets (root and perf needed)."""

from __future__ import annotations

import shutil

import pytest

from pmu.events.spec import parse_event
from pmu.events.symbols import resolve_probe, resolve_target
from tests.conftest import run_pmu, stat_counts

SQL = (
    "create table t(x); "
    + " ".join(f"insert into t values ({i});" for i in range(50))
    + " select count(*), sum(x) from t; select * from t where x > 40;"
)


def _offset(event: str, exe: str | None = None) -> tuple[str, int]:
    spec = parse_event(event)
    path = resolve_target(spec.target, exe)
    probe = resolve_probe(spec, path)
    return probe.path, probe.file_offset


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="sqlite3 is not installed")
def test_sqlite3_step_equals_perf(kernel_uprobes):
    event = "uprobe:libsqlite3:sqlite3_step"
    path, off = _offset(event)
    kname = kernel_uprobes.add("sqlite3_step", path, off)
    argv = ["sqlite3", ":memory:", SQL]
    perf = kernel_uprobes.stat([kname], argv)
    r = run_pmu("stat", "-x,", "-e", event, "--", *argv)
    assert r.returncode == 0, r.stderr
    ours = stat_counts(r.stderr)
    assert perf[kname] > 50
    assert ours == {event: perf[kname]}


def test_threads_equal_perf(build, kernel_uprobes):
    mt = str(build("mt"))
    path, off = _offset("uprobe:work", mt)
    kname = kernel_uprobes.add("mt_work", path, off)
    perf = kernel_uprobes.stat([kname], [mt, "4", "500"])
    r = run_pmu("stat", "-x,", "-e", "uprobe:work", "--", mt, "4", "500")
    assert stat_counts(r.stderr) == {"uprobe:work": perf[kname]} == {"uprobe:work": 5000}
