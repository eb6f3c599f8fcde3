"""SIGKILL of pmu at any moment never kills its target: traps pmu leaves behind (int3 sites, hijacked
returns) are handled by the trap guard pmu installs in the process (pmu/trace/guard.py).

Each round starts the 8-thread target, attaches pmu, kills it (half the rounds at a random moment from
pmu's start, attach included; half at a random moment after the target is seen traced), waits until
the kernel has detached the target, makes every thread call the probed functions 1000 more times, and
checks the target computed right and exits 0. PMU_TEST_KILL_ROUNDS sets the rounds (default 12)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest

from tests.conftest import NO_OPTIMIZE, ROOT

ROUNDS = int(os.environ.get("PMU_TEST_KILL_ROUNDS", "12"))


def _tracer(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    raise AssertionError("no TracerPid")


@pytest.mark.parametrize(
    "events",
    [
        ("uretprobe:work",),
        ("uprobe:tiny",),
        ("uprobe:one",),
        ("uprobe:work", "uprobe:tiny", "uprobe:one", "uretprobe:work"),
    ],
    ids=["uretprobe", "int3-only", "one-byte", "mixed"],
)
def test_sigkill_of_pmu_never_kills_the_target(build, events):
    exe = str(build("kill_target"))
    rng = random.Random(f"{events}")
    failures = []
    for n in range(ROUNDS):
        target = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert target.stdin is not None and target.stdout is not None
        try:
            assert target.stdout.readline() == "ready\n"
            cmd = [sys.executable, "-m", "pmu", "stat", "-p", str(target.pid)]
            if NO_OPTIMIZE:
                cmd.append("--no-optimize")
            for e in events:
                cmd += ["-e", e.replace(":", f":{exe}:", 1)]
            pmu = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
            traced_first = n % 2 == 0
            if traced_first:
                while _tracer(target.pid) == 0 and pmu.poll() is None:
                    time.sleep(0.001)
            time.sleep(rng.uniform(0, 1.0 if traced_first else 3.0))
            pmu.kill()
            pmu.wait()
            while _tracer(target.pid) != 0:  # the kernel detaches the tracees of a dead tracer
                time.sleep(0.001)
            target.stdin.write("mark\n")
            target.stdin.flush()
            progressed = target.stdout.readline()
            target.stdin.write("stop\n")
            target.stdin.flush()
            out = target.stdout.read()
            status = target.wait(timeout=60)
            if status != 0 or progressed != "progressed\n" or out != "ok\n":
                failures.append((n, status, progressed, out))
        except (BrokenPipeError, OSError):
            failures.append((n, target.wait(timeout=60), "", ""))
        finally:
            if target.poll() is None:
                target.kill()
                target.wait()
    assert not failures, failures


def test_sigkill_of_pmu_while_threads_sit_deep_in_probed_recursion(build, tmp_path):
    """4 threads 500 calls deep in a function with a return probe (every frame's return hijacked) when
    `pmu stat -p` is SIGKILLed: each return goes back where it should without pmu (the trap guard has
    every frame), and every thread's result is right."""
    exe = str(build("deep_threads"))
    ctl, ready, hold = tmp_path / "ctl", tmp_path / "ready", tmp_path / "hold"
    for fifo in (ctl, ready, hold):
        os.mkfifo(fifo)
    target = subprocess.Popen([exe, str(ctl), str(ready), "4", "500"], stdout=subprocess.PIPE, text=True)
    assert target.stdout is not None
    try:
        assert target.stdout.readline() == "started\n"
        cmd = [sys.executable, "-m", "pmu", "stat", "-p", str(target.pid), "-e", f"uretprobe:{exe}:rec"]
        # pmu's command starts the threads once pmu has attached, then holds pmu there until released
        command = f"echo go > {ctl}; cat {hold} > /dev/null"
        cmd += [*(["--no-optimize"] if NO_OPTIMIZE else []), "--", "sh", "-c", command]
        pmu = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            assert ready.read_text() == "bottom\n"  # every thread is 500 hijacked frames deep
            assert _tracer(target.pid) == pmu.pid
        finally:
            pmu.kill()
            pmu.wait()
            os.close(os.open(hold, os.O_RDWR))  # the command's cat gets its end of file
        while _tracer(target.pid) != 0 and target.poll() is None:  # the kernel detaches a dead tracer's
            time.sleep(0.001)
        assert target.poll() is None, "the target died with pmu"
        ctl.write_text("release\n")  # it reads CTL until "release" (deep_threads.c): a reader is there
        out, _ = target.communicate(timeout=60)
        assert (target.returncode, out) == (0, "ok 4\n")
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()
