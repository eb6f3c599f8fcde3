"""`pmu record` with jump-optimized probes: trampolines append records to a ring inside the process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import NO_OPTIMIZE, run_pmu
from tests.integration.test_optimized import _wait_traced

ROOT = str(Path(__file__).resolve().parents[2])
pytestmark = pytest.mark.skipif(NO_OPTIMIZE, reason="optimized recording (the --no-optimize pass skips it)")


def _meta(path: Path) -> dict[str, str]:
    raw = pq.ParquetFile(path).metadata.metadata
    return {k.decode(): v.decode() for k, v in raw.items() if k.startswith(b"pmu.")}


def _record(tmp_path: Path, *args: str | os.PathLike[str]) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / "out.parquet"
    r = run_pmu("record", "-v", "-o", out, *args)
    assert r.returncode == 0, r.stderr
    assert "counted and recorded in the process" in r.stderr, r.stderr
    return r, out


def test_timestamps_fall_between_the_callers_clock_readings(build, tmp_path):
    """The TSC -> CLOCK_MONOTONIC calibration: each hit lies between the two clock_gettime calls around
    the call, give or take the error pmu states in the file."""
    r, out = _record(tmp_path, "-e", "uprobe:work", "--", build("recpath"), "stamp", "300")
    stamps = [tuple(map(int, m)) for m in re.findall(r"stamp (\d+) (\d+) (\d+)", r.stdout)]
    assert len(stamps) == 300
    df = pq.read_table(out).to_pandas()
    assert len(df) == 300
    error = int(_meta(out)["pmu.clock_error_ns"])
    assert 0 <= error < 5_000
    for (_, before, after), t in zip(stamps, df["time_ns"], strict=True):
        assert before - error - 1 <= t <= after + error + 1
    assert df["time_ns"].is_monotonic_increasing


def test_threads_that_reuse_a_tls_block_are_told_apart(build, tmp_path):
    """glibc gives a new thread the stack and TLS of a finished one: the same FS base names both."""
    r, out = _record(tmp_path, "--args", "1", "-e", "uprobe:work", "--", build("recpath"), "seq", "6", "2000")
    calls = {int(t): int(c) for t, c in re.findall(r"tid=(\d+) calls=(\d+)", r.stdout)}
    assert len(calls) == 6
    df = pq.read_table(out).to_pandas()
    assert df.groupby("tid").size().to_dict() == calls
    for _, rows in df.groupby("tid"):
        assert list(rows["arg0"]) == list(range(2000))
        assert rows["time_ns"].is_monotonic_increasing
    assert json.loads(_meta(out)["pmu.hits_per_event"]) == {"uprobe:work": 12000}


@pytest.mark.parametrize("mode", ["fork", "vfork"])
def test_children_records_carry_their_own_pid(build, tmp_path, mode):
    """A forked child shares its parent's ring; a vfork child also its memory and thread: both are named."""
    r, out = _record(tmp_path, "-e", "uprobe:work", "--", build("recpath"), mode, "300", "700")
    calls = {int(p): int(c) for p, c in re.findall(r"pid=(\d+) calls=(\d+)", r.stdout)}
    assert len(calls) == 2
    df = pq.read_table(out).to_pandas()
    assert df.groupby("pid").size().to_dict() == calls
    assert (df["pid"] == df["tid"]).all()  # single-threaded processes


def test_ring_full_counts_lost_and_the_program_goes_on(build, tmp_path):
    mt = build("mt")
    r, out = _record(tmp_path, "-m", "1", "-e", "uprobe:work", "--", mt, "2", "20000")
    assert "Lost" in r.stderr
    meta = _meta(out)
    hits = json.loads(meta["pmu.hits_per_event"])["uprobe:work"]
    assert hits == 60000  # every hit counted, recorded or not
    assert len(pq.read_table(out)) + int(meta["pmu.lost"]) == hits
    assert int(json.loads(meta["pmu.lost_per_event"])["uprobe:work"]) == int(meta["pmu.lost"])


def test_pmu_killed_while_recording_leaves_the_target_running(build, tmp_path):
    """The ring stays mapped when pmu dies: it fills, hits are counted lost, the program runs on."""
    spin = subprocess.Popen([build("spin"), "3", "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert spin.stdout.readline() == "ready\n"
        pmu = subprocess.Popen(
            [sys.executable, "-m", "pmu", "record", "-o", str(tmp_path / "o.parquet"), "-p", str(spin.pid)]
            + ["-e", "uprobe:work"],
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        _wait_traced(spin.pid)
        pmu.send_signal(signal.SIGKILL)
        pmu.wait(timeout=10)
        out, _ = spin.communicate(timeout=30)
        assert spin.returncode == 0, out
        assert int(re.match(r"total=(\d+) bad=0", out).group(1)) > 1000
    finally:
        if spin.poll() is None:
            spin.kill()


def test_period_records_every_nth_hit_of_each_thread(build, tmp_path):
    """-c 7 in the trampoline: each thread's 7th, 14th, ... call, as the int3 engine samples."""
    r, out = _record(
        tmp_path, "-c", "7", "--args", "1", "-e", "uprobe:work", "--", build("recpath"), "seq", "3", "2000"
    )
    calls = {int(t): int(c) for t, c in re.findall(r"tid=(\d+) calls=(\d+)", r.stdout)}
    df = pq.read_table(out).to_pandas()
    assert df.groupby("tid").size().to_dict() == {t: c // 7 for t, c in calls.items()}
    for _, rows in df.groupby("tid"):
        assert list(rows["arg0"]) == list(range(6, 2000, 7))  # work(i) for the 7th, 14th, ... call
    meta = _meta(out)
    assert json.loads(meta["pmu.hits_per_event"]) == {"uprobe:work": 6000}
    assert meta["pmu.lost"] == "0" and meta["pmu.sample_period"] == "7"


def test_exec_gives_the_new_image_a_ring_of_its_own(build, tmp_path):
    """The program calls work 100 times, then three children (fork, vfork, fork) exec it as a leaf that
    calls work 200 times: each image records into a ring of its own, every row has its process."""
    r, out = _record(tmp_path, "-e", "uprobe:work", "--", build("recpath"), "exec", "100", "200")
    assert r.stdout == "done\n"
    df = pq.read_table(out).to_pandas()
    assert sorted(df.groupby("pid").size().tolist()) == [100, 200, 200, 200]
    assert (df["pid"] == df["tid"]).all()
    assert json.loads(_meta(out)["pmu.hits_per_event"]) == {"uprobe:work": 700}


def test_rings_of_finished_processes_are_drained_and_closed(build):
    """A run that execs many programs must not keep a ring per program: a ring nobody maps any more is
    drained to the end and closed while the run goes on."""
    from pmu.events.attr import EventAttr
    from pmu.events.spec import parse_event
    from pmu.evlist import Evlist
    from pmu.ring import Ring

    recpath = str(build("recpath"))
    attr = EventAttr(
        spec=parse_event(f"uprobe:{recpath}:work"), disabled=True, enable_on_exec=True, sample_period=1
    )
    evlist = Evlist([attr])
    pids: list[int] = []
    def sink(hits) -> None:
        pids.extend(int(p) for p in hits.pid)

    ring = Ring.create(64, 1)
    evlist.record_into(ring, sink)
    result = evlist.run_command([recpath, "exec", "100", "200"])
    assert result.status == 0
    assert evlist.tracer.rings == [] and evlist.tracer.retired == []  # all four rings closed
    counts = sorted({p: pids.count(p) for p in set(pids)}.values())
    assert counts == [100, 200, 200, 200]
    assert evlist.lost_total == 0
    evlist.close_rings()
