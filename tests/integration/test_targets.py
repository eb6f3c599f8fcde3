"""-p and -t targets pmu cannot or should not attach to, each with its own one-line message, and the ones it
can: two threads of one process. Every refused target is left as it was (never traced, never touched)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import per_thread_counts, run_pmu
from tests.integration.test_attach import Spin


def _one_line_error(r, expected: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr == f"pmu: {expected}\n", r.stderr


@pytest.fixture
def spin(build):
    s = Spin(build("spin"))
    yield s
    s.kill()


def test_a_target_given_twice(spin):
    """Not 'already traced by' pmu's own pid: the target is named as given twice, and never attached."""
    code = spin.code()
    worker = spin.threads()[1]
    cases = [
        (("-p", f"{spin.pid},{spin.pid}"), f"process {spin.pid} is given twice"),
        (("-t", f"{worker},{worker}"), f"thread {worker} is given twice"),
        (
            ("-p", spin.pid, "-t", spin.pid),
            f"thread {spin.pid} is given twice: it is process {spin.pid}, which -p attaches to already",
        ),
        (
            ("-p", spin.pid, "-t", worker),
            f"thread {worker} is given twice: it is a thread of process {spin.pid}, "
            "which -p attaches to already",
        ),
    ]
    for command in ("stat", "record"):
        for args, message in cases:
            r = run_pmu(command, "-o", os.devnull, *args, "-e", "uprobe:work", "--", "sleep", "0.1")
            _one_line_error(r, message)
    assert spin.tracer() == 0 and spin.code() == code
    spin.finish()


def test_two_threads_of_one_process(spin):
    """-t T1,T2 of one process: one attach, and exactly those two threads counted."""
    workers = [t for t in spin.threads() if t != spin.pid]
    r = run_pmu(
        "stat",
        "-x,",
        "--per-thread",
        "-t",
        f"{workers[0]},{workers[1]}",
        "-e",
        "uprobe:work",
        "--",
        "sleep",
        "0.3",
    )
    assert r.returncode == 0, r.stderr
    assert {tid for (_, tid) in per_thread_counts(r.stderr)} == {workers[0], workers[1]}
    assert spin.tracer() == 0
    spin.finish()


def test_pmu_itself():
    """`-p $$` from a shell that execs pmu: pmu's own pid, which the kernel refuses with a bare EPERM."""
    pmu = f"exec {sys.executable} -m pmu stat"
    for option in ("-p", "-t"):
        r = subprocess.run(
            ["sh", "-c", f"{pmu} {option} $$ -e uprobe:/bin/true:main -- true"],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2, r.stderr
        what = "process" if option == "-p" else "thread"
        assert r.stderr.startswith(f"pmu: cannot trace {what} ") and r.stderr.endswith(
            ": it is pmu itself (a tracer cannot trace itself)\n"
        ), r.stderr
        assert len(r.stderr.splitlines()) == 1


def _state(pid: int, tid: int | None = None) -> str:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_zombie():
    """A child that exited and was not reaped yet: it has exited, which is what the message says."""
    child = subprocess.Popen(["true"])
    try:
        while _state(child.pid) != "Z":  # exits at once; not reaped until wait()
            os.sched_yield()
        for option, what in (("-p", "process"), ("-t", "thread")):
            r = run_pmu("stat", option, child.pid, "-e", "uprobe:/bin/true:main", "--", "true")
            expected = "a zombie its parent has not reaped" if option == "-p" else "a zombie"
            _one_line_error(r, f"cannot trace {what} {child.pid}: it has exited ({expected})")
    finally:
        child.wait()


def test_a_process_whose_main_thread_exited(build):
    """The leader is a zombie, another thread runs on: the kernel refuses to trace the zombie leader."""
    target = subprocess.Popen(
        [str(build("zombie_leader"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert target.stdout is not None and target.stdout.readline() == "ready\n"
        while _state(target.pid) != "Z":  # main calls pthread_exit right after starting the thread
            os.sched_yield()
        r = run_pmu("stat", "-p", target.pid, "-e", "uprobe:work", "--", "true")
        _one_line_error(
            r,
            f"cannot trace process {target.pid}: its main thread has exited "
            "(the kernel traces no zombie thread; 1 other thread still run)",
        )
    finally:
        target.kill()
        target.wait()


def _kernel_thread() -> int | None:
    """A kernel thread, known as kthreadd (pid 2) or one of its children, with no executable."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            exe = os.path.exists(f"/proc/{entry}/exe") and os.readlink(f"/proc/{entry}/exe")
        except OSError:
            exe = None
            fields = []
        if fields and (entry == "2" or fields[1] == "2") and not exe:
            return int(entry)
    return None


def test_a_kernel_thread():
    pid = _kernel_thread()
    if pid is None:
        pytest.skip("no kernel thread visible (a pid namespace?)")
    for option, what in (("-p", "process"), ("-t", "thread")):
        r = run_pmu("stat", option, pid, "-e", "uprobe:/bin/true:main", "--", "true")
        _one_line_error(r, f"cannot trace {what} {pid}: it is a kernel thread (no user-space code)")
