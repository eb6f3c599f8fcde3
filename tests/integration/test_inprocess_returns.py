"""Return probes served inside the process (pmu/trace/retprobe.py): a jump patch at the entry, a shadow
stack per thread, no stop per call. Counts equal the kernel's uretprobes through fork, vfork and exec
with frames live across them, with an entry probe on the same function (either added first), with
threads that share or move their FS base (the entries the blob cannot serve go to ptrace), and deeper
than the shadow stack."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from pmu.events.spec import parse_event
from pmu.events.symbols import resolve_probe
from tests.conftest import run_pmu, stat_counts

NO_OPTIMIZE = bool(os.environ.get("PMU_TEST_NO_OPTIMIZE"))


def _offset(event: str, exe: str) -> int:
    return resolve_probe(parse_event(event), exe).file_offset


@pytest.mark.skipif(NO_OPTIMIZE, reason="the in-process engine is the default one's")
def test_return_probes_are_served_in_the_process(build):
    hot = build("hot")
    r = run_pmu("stat", "-v", "-x,", "-e", "uretprobe:work", "--", hot, "20000")
    assert r.returncode == 0, r.stderr
    assert stat_counts(r.stderr) == {"uretprobe:work": 20_000}
    assert "uretprobe:work: optimized (jump patch, returns counted in the process)" in r.stderr


@pytest.mark.parametrize("first", ["uprobe", "uretprobe"])
def test_entry_and_return_probe_on_one_function(build, first):
    """Either added first, the entry probe is counted by the return probe's stub."""
    hot = build("hot")
    other = "uretprobe" if first == "uprobe" else "uprobe"
    r = run_pmu("stat", "-v", "-x,", "-e", f"{first}:work", "-e", f"{other}:work", "--", hot, "30000")
    assert r.returncode == 0, r.stderr
    assert stat_counts(r.stderr) == {"uprobe:work": 30_000, "uretprobe:work": 30_000}


@pytest.mark.parametrize("mode", ["fork", "vfork", "exec"])
def test_frames_live_across_fork_vfork_and_exec_equal_perf(build, kernel_uprobes, mode):
    """spawn() forks (vforks) inside itself: its frame returns in the parent and, after fork, in the
    child, whose shadow stack is a copy; exec leaves the child's frame behind with its image."""
    exe = str(build("retfork"))
    argv = [exe, "30", "40", mode]
    bare = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    names = {
        "uretprobe:spawn": kernel_uprobes.add("rf_spawn", exe, _offset("uprobe:spawn", exe), ret=True),
        "uretprobe:work": kernel_uprobes.add("rf_work_r", exe, _offset("uprobe:work", exe), ret=True),
        "uprobe:work": kernel_uprobes.add("rf_work", exe, _offset("uprobe:work", exe)),
    }
    perf = kernel_uprobes.stat(list(names.values()), argv)
    r = run_pmu("stat", "-x,", *[a for e in names for a in ("-e", e)], "--", *argv)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == sorted(bare.stdout.splitlines())
    assert stat_counts(r.stderr) == {e: perf[k] for e, k in names.items()}
    assert perf[names["uprobe:work"]] == 70


@pytest.mark.parametrize(
    ("args", "calls"),
    [(["churn", "60", "100"], 6000), (["many", "200", "300"], 60_000), (["notls", "20000"], 40_000)],
    ids=["churn", "many", "notls"],
)
def test_threads_reusing_or_sharing_a_tls(build, args, calls):
    """Threads that take a finished one's TLS (its shadow row freed at its exit), many at once, and two
    live threads with one FS base (no new in-process frames: ptrace takes their entries)."""
    exe = build("thread_ids")
    r = run_pmu("stat", "-x,", "-e", "uretprobe:f", "-e", "uprobe:f", "--", exe, *args, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"f called {calls} times" in r.stdout
    assert stat_counts(r.stderr) == {"uretprobe:f": calls, "uprobe:f": calls}


def test_deeper_than_the_shadow_stack_every_return_counts(build):
    """Past the shadow stack's depth the entries go to ptrace (the blob's skip trap): exact all the same,
    and the program's result right."""
    from pmu.trace.retprobe import MAXDEPTH

    exe = build("deep")
    depth = MAXDEPTH + 500
    r = run_pmu("stat", "-x,", "-e", "uretprobe:down", "--", exe, str(depth))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"depth {depth}\n"
    assert stat_counts(r.stderr) == {"uretprobe:down": depth + 1}


def test_recorded_returns_carry_retval_latency_and_the_entry_arguments(build, tmp_path):
    """pmu record of a return probe: a row per return, the function's return value, its latency and its
    arguments as they were at its entry (hot's work(x) returns 3x + 1)."""
    import pyarrow.parquet as pq

    hot = build("hot")
    out = tmp_path / "ret.parquet"
    r = run_pmu("record", "-v", "--args", "2", "-o", out, "-e", "uretprobe:work", "--", hot, "5000")
    assert r.returncode == 0, r.stderr
    if not NO_OPTIMIZE:
        assert "returns counted and recorded in the process" in r.stderr, r.stderr
    df = pq.read_table(out).to_pandas()
    assert len(df) == 5000
    x = df["arg0"].to_numpy().astype("uint64") & 0xFFFFFFFF
    assert sorted(x.tolist()) == list(range(5000))
    assert ((df["retval"].to_numpy().astype("uint64") & 0xFFFFFFFF) == 3 * x + 1).all()
    lat = df["latency_ns"].astype("int64")
    assert (lat >= 0).all() and (lat < 10**9).all()


def _same_as_bare(argv: list[str], events: list[str], *options: str) -> tuple[dict[str, int], str]:
    """pmu stat of argv: its stdout equal to a run without pmu; (counts, the program's stderr)."""
    bare = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    args = [a for e in events for a in ("-e", e)]
    r = run_pmu("stat", "-x,", *options, *args, "--", *argv, timeout=300)
    assert r.returncode == bare.returncode == 0, r.stderr[-2000:]
    assert r.stdout == bare.stdout
    return stat_counts(r.stderr), r.stderr


def test_signal_handler_calling_a_probed_function(build):
    """A timer's handler calls probed h() while the main loop's probed calls are anywhere in their entry
    routine or return trampoline (a frame is reserved before it is filled): the program's result and
    every count are right (the handler's calls: the program counts them)."""
    exe = str(build("ret_signal"))
    n = 100 if NO_OPTIMIZE else 1_000_000  # a stop per call with int3, and a signal every 100 µs
    counts, err = _same_as_bare([exe, str(n), "1"], ["uretprobe:f", "uretprobe:g", "uretprobe:h"])
    hret = int(re.search(r"hret=(\d+)", err).group(1))
    assert counts == {"uretprobe:f": 2 * n, "uretprobe:g": n, "uretprobe:h": hret}


def test_handler_on_an_alternate_stack_above_the_thread_stack(build):
    """The altstack is mapped before the thread, so above its stack: the handler's probed call must not
    take the 20 probed frames below for dead."""
    exe = str(build("ret_altstack"))
    counts, _ = _same_as_bare([exe, "40"], ["uretprobe:g", "uretprobe:f"])
    assert counts == {"uretprobe:g": 41, "uretprobe:f": 1}


def test_a_function_that_returns_with_another_fs_base(build):
    """sw() moves its thread's FS base (arch_prctl) and returns: its frame is in the row of the old FS
    base, where the return trampoline finds it."""
    exe = str(build("ret_fsbase"))
    counts, _ = _same_as_bare([exe, "2", "5000"], ["uretprobe:sw", "uretprobe:g"])
    assert counts == {"uretprobe:sw": 5000, "uretprobe:g": 15_000}


def test_coroutines_on_one_stack_return_to_their_own_callers(build):
    """A coroutine's frame left in the graveyard and another's with the same slot: the return takes the
    most recently buried, the right caller's (a stale entry sent it to the other caller's)."""
    exe = str(build("ret_coro"))
    _same_as_bare([exe], ["uretprobe:f"])


def test_thousands_of_threads_over_time_stay_in_the_process(build):
    """3,000 threads, four at a time, each with its own stack and FS base: a thread's shadow row is
    given back at its exit, so none has to go to ptrace (before, after 1,024 threads every call did:
    minutes instead of a second). -v says how many calls went to ptrace: none."""
    exe = str(build("ret_threads"))
    counts, err = _same_as_bare([exe, "3000", "200", "4"], ["uretprobe:f", "uretprobe:g"], "-v")
    assert counts == {"uretprobe:f": 600_000, "uretprobe:g": 600_000}
    if not NO_OPTIMIZE:
        assert "served by ptrace" not in err, err
