"""Return probes: entries, returns and recursion pair up; longjmp and tail calls leave behaviour as it was."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pmu.events.spec import parse_event
from pmu.events.symbols import resolve_probe
from tests.conftest import TARGETS, run_pmu, stat_counts

FUNCS = ["fib", "jumper", "deep", "tail", "leaf"]


def _expected(n: int, rounds: int) -> dict[str, int]:
    fib_calls = [1, 1]  # calls made by fib(i), itself included
    for _ in range(2, n + 1):
        fib_calls.append(fib_calls[-1] + fib_calls[-2] + 1)
    jumped = rounds // 2  # odd rounds longjmp out of deep (and jumper)
    counts = {
        "uprobe:fib": fib_calls[n],
        "uretprobe:fib": fib_calls[n],
        "uprobe:jumper": rounds,
        "uretprobe:jumper": rounds - jumped,
        "uprobe:deep": 4 * rounds,
        "uretprobe:deep": 4 * (rounds - jumped),
        "uprobe:tail": rounds,
        "uretprobe:tail": rounds,
        "uprobe:leaf": rounds,
        "uretprobe:leaf": rounds,
    }
    return counts


def test_entries_returns_longjmp_and_tail_calls(build):
    ret = build("ret")
    plain = subprocess.run([ret, "12", "6"], capture_output=True, text=True)
    events = [a for f in FUNCS for a in ("-e", f"uretprobe:{f}", "-e", f"uprobe:{f}")]
    r = run_pmu("stat", "-v", "-x,", *events, "--", ret, "12", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout == plain.stdout  # longjmp over a probed frame and tail calls behave as without pmu
    counts = stat_counts(r.stderr)
    assert counts == _expected(12, 6)
    # -v reports the frames longjmp left: entries = returns + those
    for f in ("jumper", "deep"):
        lost = re.search(rf"^pmu: uretprobe:{f}: .*; (\d+) frames? left without returning", r.stderr, re.M)
        assert lost is not None, r.stderr
        assert counts[f"uretprobe:{f}"] + int(lost.group(1)) == counts[f"uprobe:{f}"]
    assert not re.search(r"^pmu: uretprobe:(fib|tail|leaf): .*left without returning", r.stderr, re.M)


def test_equal_to_kernel_uretprobes(build, kernel_uprobes):
    ret = str(build("ret"))
    names = {}
    for f in FUNCS:
        probe = resolve_probe(parse_event(f"uprobe:{ret}:{f}"), ret)
        names[f"uretprobe:{f}"] = kernel_uprobes.add(f"r_{f}", ret, probe.file_offset, ret=True)
    perf = kernel_uprobes.stat(list(names.values()), [ret, "12", "6"])
    r = run_pmu("stat", "-x,", *[a for e in names for a in ("-e", e)], "--", ret, "12", "6")
    ours = stat_counts(r.stderr)
    assert ours == {e: perf[k] for e, k in names.items()}


def test_threads_and_return_values(build):
    slowret = build("slowret")
    r = run_pmu("stat", "-x,", "-e", "uretprobe:slow", "-e", "uprobe:slow", "--", slowret, "0.3", "3")
    assert r.returncode == 0, r.stderr + r.stdout
    calls = int(re.search(r"calls=(\d+) bad=0", r.stdout).group(1))
    assert stat_counts(r.stderr) == {"uretprobe:slow": calls, "uprobe:slow": calls}


@pytest.mark.parametrize("seconds", ["0.3", "0.7"])
def test_detach_with_hijacked_returns(build, seconds):
    """Detaching while threads sit inside probed functions puts their return addresses back."""
    slowret = build("slowret")
    proc = subprocess.Popen([slowret, "3", "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.1)
        r = run_pmu("stat", "-x,", "-p", proc.pid, "-e", "uretprobe:slow", "--", "sleep", seconds)
        assert r.returncode == 0, r.stderr
        assert stat_counts(r.stderr)["uretprobe:slow"] > 100
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert re.match(r"calls=\d+ bad=0", out)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def thrower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/targets/throw.cc, built with g++."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    exe = tmp_path_factory.mktemp("cxx") / "throw"
    subprocess.run(["g++", "-O1", "-g", "-o", exe, TARGETS / "throw.cc"], check=True)
    return exe


def test_cxx_exception_through_probed_frames(thrower: Path) -> None:
    """An exception thrown through three frames with return probes: the program runs as without pmu
    (kernel uretprobes make it abort: "terminate called after throwing an instance of ..."), because
    pmu puts the real return addresses back when the unwinder starts and hijacks again, when the handler
    begins, the frames it left alive. Returns count as the functions really return: inner returns when
    it does not throw, middle and outer also when middle caught the exception."""
    rounds = 10
    bare = subprocess.run([thrower, str(rounds)], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0 and bare.stdout == "caught 5 sum 305\n"
    names = {"inner": "_Z5innerl", "middle": "_Z6middlelb", "outer": "_Z5outerlb"}
    events = [f"{kind}:{sym}" for sym in names.values() for kind in ("uprobe", "uretprobe")]
    r = run_pmu("stat", "-v", "-x,", *[a for e in events for a in ("-e", e)], "--", thrower, str(rounds))
    assert r.returncode == 0, r.stderr
    assert r.stdout == bare.stdout
    counts = stat_counts(r.stderr)
    for sym in names.values():
        assert counts[f"uprobe:{sym}"] == 2 * rounds
        # -v: entries = returns + frames left without returning, reported
        lost = re.search(
            rf"^pmu: uretprobe:{sym}: .*; ([\d,]+) frames? left without returning", r.stderr, re.M
        )
        assert lost is not None, r.stderr
        assert counts[f"uretprobe:{sym}"] + int(lost.group(1).replace(",", "")) == 2 * rounds
    assert counts["uretprobe:_Z5innerl"] == rounds  # the odd ones: no throw
    assert counts["uretprobe:_Z6middlelb"] == rounds + rounds // 2  # every catching call, odd others
    assert counts["uretprobe:_Z5outerlb"] == rounds + rounds // 2


def test_recursion_ten_thousand_deep(build):
    """10,001 nested frames of one function, every return hijacked at once: each return counted, the
    result right (the trap guard's table holds them all, should pmu die meanwhile)."""
    exe = build("deep")
    r = run_pmu("stat", "-x,", "-e", "uprobe:down", "-e", "uretprobe:down", "--", exe, "10000")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "depth 10000\n"
    assert stat_counts(r.stderr) == {"uprobe:down": 10_001, "uretprobe:down": 10_001}


@pytest.mark.parametrize("stack", ["main", "alt"])
def test_signal_handlers_calling_probed_functions(build, stack):
    """A probed function called from a signal handler that interrupts another probed frame, on the same
    stack or on a sigaltstack: output as without pmu, every entry's return counted."""
    exe = build("sig_ret")
    argv = [exe, *(["alt"] if stack == "alt" else [])]
    bare = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0 and bare.stdout == "s 60 handled 165\n"
    events = ["uprobe:f", "uretprobe:f", "uprobe:outer", "uretprobe:outer"]
    r = run_pmu("stat", "-x,", *[a for e in events for a in ("-e", e)], "--", *argv)
    assert r.returncode == 0, r.stderr
    assert r.stdout == bare.stdout
    assert stat_counts(r.stderr) == {
        "uprobe:f": 30,
        "uretprobe:f": 30,
        "uprobe:outer": 5,
        "uretprobe:outer": 5,
    }


def test_latency_of_a_return_probe(build):
    """pmu stat --latency: calls, mean and percentiles (tops of log2 buckets) of a return probe's calls,
    each within what the caller's own clock readings around the call allow: no less than the 1 ms the
    function sleeps, a mean no more than the caller's."""
    exe = build("timed")
    r = run_pmu("stat", "--latency", "-x,", "-e", "uretprobe:nap", "--", exe, "20", "1000")
    assert r.returncode == 0, r.stderr
    said = dict(zip(*[iter(r.stdout.split())] * 2, strict=True))
    line = next(x for x in r.stderr.splitlines() if x.startswith("uretprobe:nap,latency,"))
    calls, mean, p50, p90, p99 = map(int, line.split(",")[2:])
    assert calls == 20 == int(said["calls"])
    assert 1_000_000 <= mean <= int(said["mean_ns"])
    assert 1_000_000 <= p50 <= p90 <= p99
    assert p99 < 2 * int(said["max_ns"])  # the top of the bucket of the longest call at most


def test_latency_needs_a_return_probe_and_the_ptrace_engine(build):
    exe = build("timed")
    r = run_pmu("stat", "--latency", "-e", "uprobe:nap", "--", exe, "1", "1")
    assert r.returncode == 2 and r.stderr.startswith("pmu: --latency measures return probes"), r.stderr
    r = run_pmu("stat", "--engine", "kernel", "--latency", "-e", "uretprobe:nap", "--", exe, "1", "1")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "--engine ptrace" in r.stderr
