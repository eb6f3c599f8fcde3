"""Kernel PMUs over perf_event_open: perf's default set, software counters mixed with uprobes, system-wide
counting (-a, -C, -A) and the kernel's uprobe PMU (--engine kernel), each against `perf stat` where perf
counts the same thing, and the bad inputs of these options (one line, status 2, nothing left behind).

The workloads are tests/targets/kcalls.c: `kcalls N [PAGES]` calls f() exactly N times, so a probe on f
counts exactly what the processes of the run did, on whatever CPU they ran (no other process on the
machine runs this binary), and touches PAGES fresh pages (as many page faults more)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pmu.perf_event import online_cpus
from tests.conftest import NO_OPTIMIZE, ROOT, have_kernel_uprobes, processes_running, run_pmu
from tests.integration.test_bad_input import _one_line_error

DEFAULT_NAMES = [
    "task-clock",
    "context-switches",
    "cpu-migrations",
    "page-faults",
    "cycles",
    "instructions",
    "branches",
    "branch-misses",
]
"""perf 6.1's default set for `perf stat -- CMD`, in its order."""

UPROBE_EVENTS = Path("/sys/kernel/tracing/uprobe_events")
PARANOID = Path("/proc/sys/kernel/perf_event_paranoid")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@dataclass(frozen=True)
class Kcalls:
    exe: str
    probe: str
    """pmu's event for f in the binary: uprobe:PATH:f."""


@pytest.fixture(scope="module")
def kcalls(build) -> Kcalls:
    exe = str(build("kcalls"))
    return Kcalls(exe, f"uprobe:{exe}:f")


@dataclass(frozen=True)
class PerfProbe:
    event: str
    """perf's name of the kernel uprobe on f (GROUP:f)."""
    path: str
    offset: int
    """The file offset `perf probe` placed it at."""


@pytest.fixture(scope="module")
def perf_f(kcalls: Kcalls) -> Iterator[PerfProbe]:
    """A kernel uprobe on kcalls' f placed by `perf probe` itself (its own symbol lookup), in a group of
    this test process's own, so that a test suite running beside this one never shares or deletes it."""
    reason = have_kernel_uprobes()
    if reason:
        pytest.skip(reason)
    # perf probe wants event names unique across groups too: both are this process's own.
    group, name = f"pmukp{os.getpid()}", f"f{os.getpid()}"
    add = subprocess.run(
        ["perf", "probe", "-x", kcalls.exe, "--add", f"{group}:{name}=f"], capture_output=True, text=True
    )
    try:
        assert add.returncode == 0, add.stderr
        placed = [
            line for line in UPROBE_EVENTS.read_text().splitlines() if line.startswith(f"p:{group}/{name} ")
        ]
        assert len(placed) == 1, placed
        path, _, offset = placed[0].split()[1].rpartition(":")
        yield PerfProbe(f"{group}:{name}", path, int(offset, 16))
    finally:
        subprocess.run(["perf", "probe", "-q", "-d", f"{group}:*"], capture_output=True)


def _csv(stderr: str) -> list[list[str]]:
    """The counter lines of `pmu stat -x,` or `perf stat -x,` output, split into fields."""
    return [
        line.split(",")
        for line in stderr.splitlines()
        if not line.startswith("pmu: ") and line.count(",") >= 5
    ]


def _counts(stderr: str, per_cpu: bool = False) -> dict[str, int]:
    """{event: count} of CSV output (per_cpu: {"CPUn event": count} of -A output)."""
    out: dict[str, int] = {}
    for fields in _csv(stderr):
        if per_cpu:
            cpu, fields = fields[0], fields[1:]
        if fields[0].isdigit():
            out[f"{cpu} {fields[2]}" if per_cpu else fields[2]] = int(fields[0])
    return out


def _perf_stat(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["perf", "stat", "-x,", *args], capture_output=True, text=True, timeout=120)


def _ok(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr


def _pmu_offset(stderr: str, exe: str) -> int:
    """The file offset pmu -v says its kernel uprobe is at."""
    found = re.findall(rf"{re.escape(exe)}:(0x[0-9a-f]+)\)", stderr)
    assert len(found) == 1, stderr
    return int(found[0], 16)


def _three(exe: str) -> list[str]:
    """sh -c running three kcalls at once (1000, 2000, 3000 calls): 6000 calls in three processes."""
    return ["sh", "-c", f"{exe} 1000 & {exe} 2000 & {exe} 3000; wait"]


THREE_OUT = ["f called 1000 times", "f called 2000 times", "f called 3000 times"]


# ---- 1. -a: every process started during the run, counted by the kernel's uprobe PMU ------------------


def test_system_wide_counts_every_process_of_the_run_as_perf(kcalls: Kcalls, perf_f: PerfProbe) -> None:
    r = run_pmu("stat", "-a", "-v", "-x,", "-e", kcalls.probe, "--", *_three(kcalls.exe))
    _ok(r)
    assert sorted(r.stdout.splitlines()) == THREE_OUT
    assert _counts(r.stderr) == {kcalls.probe: 6000}
    # The same probe as perf's: same file, same offset, found by each tool's own symbol lookup.
    assert os.path.realpath(perf_f.path) == os.path.realpath(kcalls.exe)
    assert _pmu_offset(r.stderr, kcalls.exe) == perf_f.offset

    perf = _perf_stat("-a", "-e", perf_f.event, "--", *_three(kcalls.exe))
    _ok(perf)
    assert _counts(perf.stderr) == {perf_f.event: 6000}

    text = run_pmu("stat", "-a", "-e", kcalls.probe, "--", *_three(kcalls.exe))
    _ok(text)
    assert "Performance counter stats for 'system wide':" in text.stderr
    assert re.search(rf"^\s+6,?000\s+{re.escape(kcalls.probe)}\s*$", text.stderr, re.M), text.stderr


# ---- 2. -A: one line per CPU; -C: those CPUs only -----------------------------------------------------


def test_per_cpu_lines_sum_to_the_system_wide_total(kcalls: Kcalls) -> None:
    cpus = online_cpus()
    r = run_pmu("stat", "-a", "-A", "-x,", "-e", f"{kcalls.probe},task-clock", "--", *_three(kcalls.exe))
    _ok(r)
    assert sorted(r.stdout.splitlines()) == THREE_OUT
    lines = _csv(r.stderr)
    # event by event, each with a line per online CPU in CPU order (perf's -A order)
    assert [(f[0], f[3]) for f in lines] == [
        (f"CPU{cpu}", event) for event in (kcalls.probe, "task-clock") for cpu in cpus
    ]
    per_cpu = [int(f[1]) for f in lines if f[3] == kcalls.probe]
    assert all(n >= 0 for n in per_cpu)
    for f in lines:
        if f[3] == "task-clock":
            assert f[2] == "msec" and re.fullmatch(r"\d+\.\d\d", f[1]), f

    total = run_pmu("stat", "-a", "-x,", "-e", kcalls.probe, "--", *_three(kcalls.exe))
    _ok(total)
    assert sum(per_cpu) == _counts(total.stderr)[kcalls.probe] == 6000

    text = run_pmu("stat", "-a", "-A", "-e", kcalls.probe, "--", *_three(kcalls.exe))
    _ok(text)
    starts = [line.split()[0] for line in text.stderr.splitlines() if line.startswith("CPU")]
    assert starts == [f"CPU{cpu}" for cpu in cpus]


def test_cpu_list_counts_on_those_cpus_only(kcalls: Kcalls, perf_f: PerfProbe) -> None:
    """A workload pinned to CPU 0 (taskset) is counted in full by -C 0; its lines are CPU0's only, laid
    out as perf's (600 calls: no thousands separator to differ by locale)."""
    pinned = [
        "taskset",
        "-c",
        "0",
        "sh",
        "-c",
        f"{kcalls.exe} 100 & {kcalls.exe} 200 & {kcalls.exe} 300; wait",
    ]
    r = run_pmu("stat", "-C", "0", "-A", "-x,", "-e", f"{kcalls.probe},page-faults", "--", *pinned)
    _ok(r)
    assert [(f[0], f[3]) for f in _csv(r.stderr)] == [("CPU0", kcalls.probe), ("CPU0", "page-faults")]
    assert _counts(r.stderr, per_cpu=True)[f"CPU0 {kcalls.probe}"] == 600

    r = run_pmu("stat", "-C", "0", "-x,", "-e", kcalls.probe, "--", *pinned)
    _ok(r)
    assert _csv(r.stderr)[0][0] == "600" and _counts(r.stderr) == {kcalls.probe: 600}

    if len(online_cpus()) > 1:
        r = run_pmu("stat", "-C", "1", "-A", "-x,", "-e", kcalls.probe, "--", *pinned)
        _ok(r)
        assert _counts(r.stderr, per_cpu=True) == {f"CPU1 {kcalls.probe}": 0}

    # Text: the header and the CPU line as perf prints them for the same options.
    ours = run_pmu("stat", "-C", "0", "-A", "-e", kcalls.probe, "--", *pinned)
    _ok(ours)
    perf = subprocess.run(
        ["perf", "stat", "-C", "0", "-A", "-e", perf_f.event, "--", *pinned],
        capture_output=True,
        text=True,
        timeout=120,
    )
    _ok(perf)

    def header_and_cpu_line(stderr: str, event: str) -> tuple[str, str]:
        header = next(line for line in stderr.splitlines() if "Performance counter stats" in line)
        cpu_line = next(line for line in stderr.splitlines() if line.startswith("CPU"))
        return header, cpu_line[: cpu_line.index(event)]

    perf_view = header_and_cpu_line(perf.stderr, perf_f.event)
    assert perf_view[1].split() == ["CPU0", "600"]
    assert header_and_cpu_line(ours.stderr, kcalls.probe) == perf_view


# ---- 3. no -e: perf's default set ---------------------------------------------------------------------

PAGES = 2000
"""Fresh pages the default-set workload touches: its page faults are about PAGES plus its start-up's."""


def test_default_set_is_perfs(kcalls: Kcalls) -> None:
    argv = [kcalls.exe, "10", str(PAGES)]
    perf_runs = [_perf_stat("--", *argv) for _ in range(3)]
    for p in perf_runs:
        _ok(p)
    perf_lines = _csv(perf_runs[0].stderr)

    r = run_pmu("stat", "-x,", "--", *argv)
    _ok(r)
    assert r.stdout == "f called 10 times\n"
    lines = _csv(r.stderr)
    assert [f[2] for f in lines] == [f[2] for f in perf_lines] == DEFAULT_NAMES
    assert all(len(f) == 7 for f in lines), lines
    ours = {f[2]: f for f in lines}
    for theirs in perf_lines:
        name = theirs[2]
        if theirs[0] == "<not supported>":
            assert ours[name] == theirs  # `<not supported>,,cycles,0,100.00,,` byte for byte
        else:
            assert ours[name][0] != "<not supported>", ours[name]

    clock = ours["task-clock"]
    assert clock[1] == "msec" and re.fullmatch(r"\d+\.\d\d", clock[0]) and float(clock[0]) > 0, clock
    assert clock[6] == "CPUs utilized"
    for name in ("context-switches", "cpu-migrations", "page-faults"):
        assert ours[name][1] == "" and ours[name][0].isdigit(), ours[name]
        assert ours[name][6].endswith("/sec"), ours[name]

    faults = [_counts(p.stderr)["page-faults"] for p in perf_runs]
    assert min(faults) > PAGES
    spread = max(faults) - min(faults)
    assert min(faults) - spread - 5 <= int(ours["page-faults"][0]) <= max(faults) + spread + 5, (
        ours["page-faults"],
        faults,
    )


def test_system_wide_default_set_is_perfs(kcalls: Kcalls) -> None:
    """`-a` without -e: perf 6.1 counts cpu-clock in place of task-clock system-wide (a CPU has no
    task to clock), then the same seven."""
    argv = [kcalls.exe, "10"]
    perf = _perf_stat("-a", "--", *argv)
    _ok(perf)
    r = run_pmu("stat", "-a", "-x,", "--", *argv)
    _ok(r)
    assert r.stdout == "f called 10 times\n"
    theirs, ours = _csv(perf.stderr), _csv(r.stderr)
    assert [f[2] for f in ours] == [f[2] for f in theirs]
    assert [f[1] for f in ours] == [f[1] for f in theirs]  # units: msec for the clock
    assert [f for f in ours if f[0] == "<not supported>"] == [f for f in theirs if f[0] == "<not supported>"]


# ---- 4. software counters and uprobes in one run ------------------------------------------------------


@pytest.mark.parametrize("engine", [[], ["--engine", "kernel"]], ids=["ptrace", "kernel"])
def test_counters_mix_with_uprobes(kcalls: Kcalls, engine: list[str]) -> None:
    r = run_pmu("stat", *engine, "-x,", "-e", f"task-clock,{kcalls.probe}", "--", kcalls.exe, "500")
    _ok(r)
    assert r.stdout == "f called 500 times\n"
    clock, probe = _csv(r.stderr)
    assert clock[1:3] == ["msec", "task-clock"] and float(clock[0]) > 0 and clock[6] == "CPUs utilized"
    assert probe[:3] == ["500", "", kcalls.probe]
    assert probe[6].endswith("/sec") and float(probe[5]) > 0, probe  # its rate per task-clock second


# ---- 5. --engine kernel on a launched command -----------------------------------------------------------


@pytest.mark.parametrize(
    ("inherit", "script", "printed", "expected"),
    [
        ([], None, [1234], 1234),
        ([], "{k} 10; {k} 20", [10, 20], 30),  # the shell's forked children, inherited in the kernel
        (["-i"], "{k} 10; {k} 20; exit 0", [10, 20], 0),  # -i: children not counted, only the shell
        (["-i"], "{k} 10; exec {k} 20", [10, 20], 20),  # ... which counts once it has become kcalls
    ],
    ids=["command", "children", "no-inherit", "no-inherit-exec"],
)
def test_kernel_engine_on_a_command_equals_perf(
    kcalls: Kcalls,
    perf_f: PerfProbe,
    inherit: list[str],
    script: str | None,
    printed: list[int],
    expected: int,
) -> None:
    argv = [kcalls.exe, "1234"] if script is None else ["sh", "-c", script.format(k=kcalls.exe)]
    out = [f"f called {n} times" for n in printed]
    r = run_pmu("stat", "--engine", "kernel", *inherit, "-x,", "-e", kcalls.probe, "--", *argv)
    _ok(r)
    assert (r.stdout.splitlines(), _counts(r.stderr)) == (out, {kcalls.probe: expected}), r.stderr

    perf = _perf_stat(*inherit, "-e", perf_f.event, "--", *argv)
    _ok(perf)
    assert (perf.stdout.splitlines(), _counts(perf.stderr)) == (out, {perf_f.event: expected})


# ---- 6. bad input: one line, status 2, nothing left behind -------------------------------------------


def _uprobe_events() -> list[str]:
    try:
        return UPROBE_EVENTS.read_text().splitlines()
    except OSError:
        return []


def _nothing_left(before: list[str], exe: str) -> None:
    """No kernel uprobe is left on the command's binary, tracefs' uprobes are as they were, and no
    process of the command runs.

    A test suite running beside this one may add and remove its own tracefs uprobes meanwhile (the
    groups pmutest of tests/conftest.py and pmukpPID of this file, on its own binaries, and pmu_PID of
    a pmu that is still running): those are the only changes allowed, and none may be about this test's
    binary. A pmu_PID group of a pmu that has ended is one left behind."""

    def ours(line: str) -> bool:
        group = line.split()[0].partition(":")[2].partition("/")[0]
        pid = group.removeprefix("pmu_")
        live_pmu = group.startswith("pmu_") and pid.isdigit() and os.path.exists(f"/proc/{pid}")
        return exe in line or not (group.startswith(("pmutest", "pmukp")) or live_pmu)

    changed = set(before) ^ set(_uprobe_events())
    assert [line for line in changed if ours(line)] == []
    assert processes_running(exe) == []


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["-C", "99", "-e", "{probe}", "--", "{exe}", "5"], ["-C", "99"]),
        (["-C", "x", "-e", "{probe}", "--", "{exe}", "5"], ["-C", "'x'"]),
        (["-C", "1-0", "--", "{exe}", "5"], ["-C", "1-0"]),
        (["-A", "-e", "{probe}", "--", "{exe}", "5"], ["-A", "-a"]),
        (["-A", "--", "{exe}", "5"], ["-A", "-a"]),
        (["-a", "--engine", "ptrace", "-e", "{probe}", "--", "{exe}", "5"], ["ptrace"]),
        (["-a", "-p", "1", "-e", "{probe}"], ["-p"]),
        (["-C", "0", "-p", "1"], ["-p"]),
        (["-a", "-e", "uprobe:libc:no_such_symbol_xyz", "--", "{exe}", "5"], ["no_such_symbol_xyz"]),
        (["-a", "-e", "task-clock,uprobe:{exe}:no_such_f", "--", "{exe}", "5"], ["no_such_f"]),
    ],
    ids=[
        "C99",
        "Cx",
        "C1-0",
        "A",
        "A-default-set",
        "a-ptrace",
        "a-p",
        "C-p",
        "a-libc-symbol",
        "a-mixed-symbol",
    ],
)
def test_bad_system_wide_input(kcalls: Kcalls, argv: list[str], needles: list[str]) -> None:
    before = _uprobe_events()
    r = run_pmu("stat", *[a.format(probe=kcalls.probe, exe=kcalls.exe) for a in argv])
    _one_line_error(r, *needles)
    assert r.stdout == ""  # the command never ran
    _nothing_left(before, kcalls.exe)


def _nobody_python() -> tuple[list[str], dict[str, str]]:
    """An interpreter user nobody can run pmu with, and its environment: this one if nobody may run it,
    else the system's python of the same version (this one may live in root's home), with pmu and this
    environment's packages on PYTHONPATH (both readable by everyone)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]]))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, shutil.which(f"python{version}"), f"/usr/bin/python{version}"):
        if python is None or shutil.which("setpriv") is None:
            continue
        check = [*NOBODY, python, "-c", "import pmu.kernel_pmu, pmu.commands.stat"]
        if subprocess.run(check, capture_output=True, env=env, cwd="/", timeout=60).returncode == 0:
            return [python, "-m", "pmu"], env
    pytest.skip(f"no python {version} user nobody can run pmu with (or no setpriv)")


@pytest.mark.parametrize(
    "events", [[], ["-e", "task-clock"], ["-e", "uprobe:{exe}:f"]], ids=["default", "software", "uprobe"]
)
def test_system_wide_without_the_rights(kcalls: Kcalls, events: list[str]) -> None:
    """-a as user nobody under perf_event_paranoid 2: one line naming the reason, as perf refuses too."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run pmu as user nobody and to set perf_event_paranoid")
    python, env = _nobody_python()
    shared = Path(tempfile.mkdtemp(prefix="pmu-kp-"))  # under /tmp: nobody reaches it (not pytest's)
    saved = PARANOID.read_text()
    try:
        shared.chmod(0o755)
        exe = shared / "kcalls"
        shutil.copy(kcalls.exe, exe)
        exe.chmod(0o755)
        events = [e.format(exe=exe) for e in events]
        PARANOID.write_text("2\n")
        before = _uprobe_events()
        stat = ["stat", "--no-optimize"] if NO_OPTIMIZE else ["stat"]
        r = subprocess.run(
            [*NOBODY, *python, *stat, "-a", *events, "--", str(exe), "5"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd="/",
        )
        _one_line_error(r, "no permission", "system-wide", "perf_event_paranoid is 2")
        assert r.stdout == ""
        _nothing_left(before, str(exe))

        perf_events = ["-e", "task-clock"] if events and events[1] == "task-clock" else []
        perf = subprocess.run(
            [*NOBODY, "perf", "stat", "-a", *perf_events, "--", str(exe), "5"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd="/",
        )
        assert perf.returncode != 0, perf.stderr
        assert processes_running(exe) == []
    finally:
        PARANOID.write_text(saved)
        shutil.rmtree(shared, ignore_errors=True)


# ---- 7. a hardware event without a hardware PMU ---------------------------------------------------------


def test_hardware_event_not_supported_as_perf() -> None:
    perf = _perf_stat("-e", "cycles", "--", "true")
    _ok(perf)
    r = run_pmu("stat", "-x,", "-e", "cycles", "--", "true")
    _ok(r)
    (theirs,) = _csv(perf.stderr)
    (ours,) = _csv(r.stderr)
    if theirs[0] == "<not supported>":
        assert ours == theirs == ["<not supported>", "", "cycles", "0", "100.00", "", ""]
        assert r.stderr == perf.stderr
    else:  # a machine with a hardware PMU: both count
        assert ours[0].isdigit() and int(ours[0]) > 0 and ours[2] == "cycles"
