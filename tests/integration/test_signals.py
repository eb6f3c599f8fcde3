"""SIGINT, SIGTERM and SIGHUP at any moment of a run: never a traceback, never lost, the documented status,
the target untouched or restored, the output complete or absent (README, "Signals").

The sweep sends each signal from 0 to 2 s after pmu has taken its signals over, with SIGINT at its default
and ignored (a script's background job), to `stat` and `record`, attached (-p) and launching a command,
in both engines. Where the signal lands (start-up, resolving, attaching, running, detaching) depends on
the machine's speed; the assertions hold for every phase: a stop before the run starts ends pmu by that
signal with no output and nothing left behind, one during the run ends it with the counts printed.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pmu.output.parquet import read_metadata
from tests.conftest import NO_OPTIMIZE, processes_running, stat_counts
from tests.integration.test_attach import Spin

HITS = {False: 2_000_000, True: 20_000}
"""work() calls of the launched command (tests/targets/hot.c) per engine (--no-optimize: one stop a hit),
some milliseconds to a second of running; exact when it runs to its end."""
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
AFTER_START = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05, 1.2, 1.4, 1.6, 1.8, 2.0)
"""Seconds from pmu's taking its signals over to the signal (start-up, parsing, resolving, attaching).
0.0 with SIGTERM and SIGHUP is sent as soon as pmu's process exists, before Python runs pmu's code (their
default disposition ends it then)."""
AFTER_TARGET = (0.0, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2)
"""Seconds from the target's being traced (-p: its TracerPid is pmu; a command: its process exists) to
the signal: arming, the run, detaching, whatever time the start-up took."""
WORKERS = 3
"""pmu runs at a time, each worker with a target process of its own to attach to."""


@dataclass(frozen=True)
class Case:
    signum: int
    sigint_ignored: bool
    command: str
    attach: bool
    no_optimize: bool
    after_target: bool
    """The delay counts from the target's being traced rather than from pmu's start."""
    delay: float

    def __str__(self) -> str:
        return (
            f"{signal.Signals(self.signum).name} {'ignored-INT' if self.sigint_ignored else 'job-control'} "
            f"{self.command} {'-p' if self.attach else 'command'} "
            f"{'--no-optimize' if self.no_optimize else 'optimized'} "
            f"{self.delay}s after {'the target is traced' if self.after_target else 'start'}"
        )


def cases() -> list[Case]:
    """Every combination twice: timed from pmu's start (AFTER_START[i % 16]) and from the target's being
    traced (AFTER_TARGET[(i + 8) % 16]); each delay of each list with three combinations."""
    combos = list(itertools.product(SIGNALS, (False, True), ("stat", "record"), (True, False), (False, True)))
    return [
        Case(*combo, after_target=after, delay=delays[(i + 8 * after) % len(delays)])
        for after, delays in ((False, AFTER_START), (True, AFTER_TARGET))
        for i, combo in enumerate(combos)
    ]


def _caught(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


_OURS = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGHUP - 1))


def _wait_until_taken_over(proc: subprocess.Popen[str]) -> None:
    """Until /proc shows pmu catching all three (Python alone catches SIGINT only): a state, not a time."""
    while _caught(proc.pid) & _OURS != _OURS:
        assert proc.poll() is None, "pmu ended before any signal was sent"
        time.sleep(0.001)


def _traced(case: Case, spin: Spin, hot: Path) -> bool:
    return spin.tracer() != 0 if case.attach else bool(processes_running(hot))


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_case(case: Case, spin: Spin, hot: Path, out: Path) -> str:
    argv = [sys.executable, "-m", "pmu", case.command, "-x,"] if case.command == "stat" else []
    if case.command == "record":
        argv = [sys.executable, "-m", "pmu", "record", "-o", str(out)]
    if case.no_optimize:
        argv.append("--no-optimize")
    hits = HITS[case.no_optimize]
    if case.attach:
        argv += ["-p", str(spin.pid), "-e", "uprobe:work"]
    else:
        argv += ["-e", "uprobe:work", "--", str(hot), str(hits)]
    code, maps = (spin.code(), spin.maps()) if case.attach else ({}, [])
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint if case.sigint_ignored else None,
    )
    try:
        if case.delay or case.signum == signal.SIGINT or case.after_target:
            _wait_until_taken_over(proc)
        while case.after_target and not _traced(case, spin, hot) and proc.poll() is None:
            time.sleep(0.001)  # (a short command may come and go between two looks: then pmu ends)
        time.sleep(case.delay)
        proc.send_signal(case.signum)
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{case}: the signal was lost, pmu runs on") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    outcome = check_outcome(case, hits, proc.returncode, stdout, stderr, out)
    if case.attach:
        assert spin.tracer() == 0, case
        assert spin.code() == code, case
        assert spin.maps() == maps, case
        assert spin.states() <= {"S", "R"}, case
    else:
        assert processes_running(hot) == [], case
    return outcome


def check_outcome(case: Case, hits: int, status: int, stdout: str, stderr: str, out: Path) -> str:
    """Assert the outcome is one the README documents; returns which ("before the run" or "run")."""
    where = f"{case}: status {status}, stderr {stderr!r}"
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, where
    assert not Path(f"{out}.tmp").exists(), where
    if out.exists():  # complete or absent
        rows = pq.ParquetFile(out).metadata.num_rows
        meta = read_metadata(out)
        assert meta["pmu.hits_per_event"]["uprobe:work"] >= rows, where
    if status == -case.signum:  # stopped before the run started: nothing printed, nothing ran
        assert stderr == "" and stdout == "", where
        return "stopped before the run"
    if case.attach:
        assert status == 0, where  # attached: the stop ends the run, counts printed
    elif case.signum == signal.SIGINT:
        assert status == 0, where  # pmu leaves ^C to the command; sent to pmu alone, the run goes on
    else:
        assert status in (0, 128 + case.signum), where  # passed on to the command, which dies of it
    completed = not case.attach and status == 0
    if completed:
        assert re.fullmatch(r"sum=-?\d+\n", stdout), where
    if case.command == "stat":
        counts = stat_counts(stderr)
        assert "uprobe:work" in counts, where
        if completed:
            assert counts["uprobe:work"] == hits, where
        elif not case.attach:
            assert counts["uprobe:work"] <= hits, where
    else:
        m = re.search(r"\[ pmu record: Captured and wrote [0-9.]+ MB \S+ \((\d+) samples\) \]", stderr)
        assert m is not None and out.exists(), where
        rows = pq.ParquetFile(out).metadata.num_rows
        assert int(m.group(1)) == rows, where
        meta = read_metadata(out)
        if completed:  # every hit counted; recorded unless the ring was full, and then counted as lost
            assert meta["pmu.hits_per_event"]["uprobe:work"] == hits == rows + meta["pmu.lost"], where
    return "ran to its end" if completed else "stopped during the run"


def test_signal_sweep(build, tmp_path):
    if NO_OPTIMIZE:
        pytest.skip("the sweep runs both engines itself (in the first pass of make test)")
    exe = build("spin")
    todo = cases()
    assert len({(c.signum, c.sigint_ignored, c.command, c.attach, c.no_optimize) for c in todo}) == 48
    assert len(todo) == 96

    outcomes: Counter[str] = Counter()

    def worker(k: int) -> None:
        hot = build("hot", f"-DWORKER={k}", suffix=f"-{k}")  # a file of its own: processes_running(hot)
        spin = Spin(exe, seconds=600, threads=3)
        try:
            for n, case in enumerate(todo[k::WORKERS]):
                outcomes[run_case(case, spin, hot, tmp_path / f"w{k}-{n}.parquet")] += 1
            assert re.fullmatch(r"total=\d+ bad=0\n", spin.finish()), "the target computed wrong"
        finally:
            spin.kill()

    with ThreadPoolExecutor(WORKERS) as pool:
        for future in [pool.submit(worker, k) for k in range(WORKERS)]:
            future.result()
    print(f"signal sweep, {len(todo)} runs: {dict(outcomes)}")  # where signals landed, on this machine


def _command_sees_ignored(
    signame: str, prefix: tuple[str, ...] = (), **kw
) -> subprocess.CompletedProcess[str]:
    """Run `pmu stat -- python -c ...` (after `prefix`, such as nohup); the command prints whether it
    found `signame` ignored."""
    probe = f"import signal,sys; sys.stdout.write(str(signal.getsignal(signal.{signame}) == signal.SIG_IGN))"
    argv = [*prefix, sys.executable, "-m", "pmu", "stat", "-e", f"uprobe:{sys.executable}:main", "--"]
    return subprocess.run(
        [*argv, sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, **kw
    )


def test_nohup_keeps_sighup_ignored():
    """Started with SIGHUP ignored (nohup), pmu and the command it runs keep it ignored."""
    r = _command_sees_ignored("SIGHUP", ("nohup",))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "True", r.stdout


def test_the_command_starts_with_sigint_as_pmu_found_it():
    """The shell's SIG_IGN for a background job reaches the command; a default SIGINT stays default."""
    for ignored in (False, True):
        r = _command_sees_ignored("SIGINT", preexec_fn=_ignore_sigint if ignored else None)
        assert r.returncode == 0, r.stderr
        assert r.stdout == str(ignored)


def _pmu(*args: str, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pmu", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_are_passed_on_to_a_launched_command(build, signum):
    """The command dies of it as it would without pmu; pmu prints the counts and returns its status."""
    exe = build("spin")
    pmu = _pmu("stat", "-x,", "-e", "uprobe:work", "--", str(exe), "600", "2")
    assert pmu.stdout is not None and pmu.stdout.readline() == "ready\n"  # the command runs
    pmu.send_signal(signum)
    out, err = pmu.communicate(timeout=60)
    assert pmu.returncode == 128 + signum, err
    assert stat_counts(err)["uprobe:work"] > 0
    assert "Traceback" not in err and out == ""  # killed before it printed its total
    assert processes_running(exe) == []


def test_sigint_to_pmu_alone_leaves_a_launched_command_running(build):
    """^C from the terminal reaches the command too; sent to pmu alone it changes nothing (as perf stat)."""
    exe = build("spin")
    pmu = _pmu("stat", "-x,", "-e", "uprobe:work", "--", str(exe), "600", "2")
    assert pmu.stdout is not None and pmu.stdout.readline() == "ready\n"
    pmu.send_signal(signal.SIGINT)
    pmu.send_signal(signal.SIGINT)
    (command,) = processes_running(exe)
    os.kill(command, signal.SIGUSR1)  # spin's own way to finish
    out, err = pmu.communicate(timeout=60)
    assert pmu.returncode == 0, err
    assert re.fullmatch(r"total=(\d+) bad=0\n", out)
    assert stat_counts(err)["uprobe:work"] == int(out.split("=")[1].split()[0])


def test_the_command_after_p_gets_sigterm(spin_copy):
    """`pmu stat -p PID -- CMD` stopped by a signal: counts printed, exit 0, CMD sent SIGTERM (as perf)."""
    spin, sleep = spin_copy
    pmu = _pmu("stat", "-x,", "-p", str(spin.pid), "-e", "uprobe:work", "--", str(sleep), "600")
    while not processes_running(sleep):  # the command starts once every probe is armed
        assert pmu.poll() is None, pmu.communicate()
        time.sleep(0.01)
    pmu.send_signal(signal.SIGINT)
    _, err = pmu.communicate(timeout=60)
    assert pmu.returncode == 0, err
    assert "uprobe:work" in stat_counts(err)
    deadline = time.monotonic() + 60  # only a bound against hanging: it is gone long before
    while processes_running(sleep):  # not waited for by pmu: gone once SIGTERM is delivered
        assert time.monotonic() < deadline, "the command was left running"
        time.sleep(0.01)
    assert spin.tracer() == 0
    spin.finish()


@pytest.fixture
def spin_copy(build, tmp_path):
    import shutil

    s = Spin(build("spin"))
    sleep = tmp_path / "sleep"
    shutil.copy(shutil.which("sleep"), sleep)
    yield s, sleep
    s.kill()
