"""`pmu stat --engine kernel -p PID`: counted with the kernel's counters, never stopped or traced by pmu,
so a process a debugger already traces (gdb, here) is counted exactly, and the ptrace engine's refusal
of it stays one line."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from pmu.trace.maps import status_field
from tests.conftest import run_pmu
from tests.integration.test_record_files import fixed_hits  # noqa: F401  (the fixture)


def _tracer_of(pid: int) -> int:
    return int(status_field(pid, "TracerPid") or 0)


@pytest.fixture
def under_gdb(fixed_hits):  # noqa: F811
    if shutil.which("gdb") is None:
        pytest.skip("no gdb")
    target = fixed_hits(3, 4000)
    gdb = subprocess.Popen(
        ["gdb", "-q", "-nx", "-batch", "-p", str(target.pid), "-ex", "continue"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # gdb's attach is over when the target's TracerPid names it and gdb has let it run again.
    deadline = time.monotonic() + 60
    while _tracer_of(target.pid) != gdb.pid or _state(target.pid) in "tT":
        assert time.monotonic() < deadline, "gdb did not attach"
        assert gdb.poll() is None, "gdb ended"
        time.sleep(0.01)
    yield target
    target.kill()
    gdb.kill()
    gdb.wait()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_process_a_debugger_traces_is_counted_by_the_kernel_engine(under_gdb) -> None:
    target = under_gdb
    r = run_pmu(
        "stat", "-x,", "-v", "--engine", "kernel", "-p", str(target.pid),
        "-e", f"uprobe:{target.exe}:work", "--", *target.go_command(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    count = r.stderr.splitlines()[0].split(",")
    assert count[:3] == [str(target.per_round), "", f"uprobe:{target.exe}:work"]
    assert "the kernel's uprobe PMU" in r.stderr
    assert _tracer_of(target.pid) != 0  # still gdb's
    target.go()  # and it goes on as before, every result right


def test_the_ptrace_engine_refuses_it_in_one_line(under_gdb) -> None:
    target = under_gdb
    r = run_pmu("stat", "-p", str(target.pid), "-e", f"uprobe:{target.exe}:work", "--", "true")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "already traced" in lines[0] and "Traceback" not in r.stderr
    target.go()
