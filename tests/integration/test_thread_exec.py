"""A thread that is not the leader execs: it takes the leader's tid, and its events follow it into the
new image (perf stat 6.1 stops counting there, at 20 in this test: its inherited event does not follow;
pmu counts every call the command makes)."""

from __future__ import annotations

from tests.conftest import run_pmu, stat_counts


def test_non_leader_exec_keeps_counting(build):
    exe = build("life_thread_exec")
    r = run_pmu("stat", "-x,", "-e", "uprobe:work", "--", exe, "10", "7")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "leaf done\n"
    assert stat_counts(r.stderr) == {"uprobe:work": 10 + 10 + 7}
    r = run_pmu("stat", "-x,", "--per-thread", "-e", "uprobe:work", "--", exe, "10", "7")
    counts = sorted(int(line.split(",")[1]) for line in r.stderr.splitlines() if ",uprobe:work," in line)
    assert counts == [10, 17]  # main; the thread that exec'd (10 before, 7 after)
