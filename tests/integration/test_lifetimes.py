"""Process and mapping lifetimes: fork, exec, vfork, dlopen/dlclose, death by a signal, exit statuses.

Each test checks pmu's counts against the numbers the target makes known, then against `perf stat`
with a kernel uprobe at the same file offset. Without kernel uprobes the exact checks still run and the
test is skipped (with the fixture's reason) only when it reaches the perf comparison.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pmu.events.spec import parse_event
from pmu.events.symbols import resolve_probe, resolve_target
from tests.conftest import (
    KPROBE_GROUP,
    TARGETS,
    KernelUprobes,
    _tracefs_write,
    have_kernel_uprobes,
    per_thread_counts,
    processes_running,
    run_pmu,
    stat_counts,
)

BASH = "/bin/bash"
LOOP = "for i in 1 2 3 4 5; do /bin/true; done"
HANG = 6  # seconds: every run here takes well under one; more than this is a hang


def _offset(event: str, exe: str | None = None) -> tuple[str, int]:
    spec = parse_event(event)
    path = resolve_target(spec.target, exe)
    probe = resolve_probe(spec, path)
    return probe.path, probe.file_offset


class Perf:
    """perf stat with kernel uprobes, or the reason there is none (the test is skipped when it asks)."""

    def __init__(self) -> None:
        self.reason = have_kernel_uprobes()
        self.kernel = KernelUprobes()

    def stat(
        self, probes: dict[str, tuple[str, int]], argv: list[str], *extra: str
    ) -> tuple[dict[str, int], subprocess.CompletedProcess[str]]:
        """Run `perf stat -x, [EXTRA] -- ARGV` with a kernel uprobe per (path, offset) named NAME.

        Returns ({name: count}, perf's completed process, whose stdout is the command's)."""
        if self.reason:
            pytest.skip(self.reason)
        args = ["perf", "stat", "-x,", *extra]
        events = {}
        for name, (path, off) in probes.items():
            kname = f"life_{name}"
            if kname not in self.kernel.names:
                with contextlib.suppress(OSError):  # left over by a run that was killed
                    _tracefs_write(f"-:{KPROBE_GROUP}/{kname}\n")
                self.kernel.add(kname, path, off)
            events[name] = f"{KPROBE_GROUP}:{kname}"
            args += ["-e", events[name]]
        r = subprocess.run([*args, "--", *argv], capture_output=True, text=True, timeout=HANG)
        counts = stat_counts(r.stderr)
        return {name: counts.get(kname, -1) for name, kname in events.items()}, r


@pytest.fixture
def perf() -> Iterator[Perf]:
    p = Perf()
    try:
        yield p
    finally:
        if not p.reason:
            p.kernel.clear()


def traced_stopped(path: Path | str) -> list[int]:
    """TIDs in tracing stop ('t') running `path` (by each thread's own exe: a zombie leader has none)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            tids = os.listdir(f"/proc/{entry}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                exe = os.readlink(f"/proc/{entry}/task/{tid}/exe")
                with open(f"/proc/{entry}/task/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state == "t" and exe == str(path):
                found.append(int(tid))
    return found


def assert_nothing_left(exe: Path | str) -> None:
    assert processes_running(exe) == []
    assert traced_stopped(exe) == []


def per_process(stderr: str) -> list[tuple[str, int, int]]:
    """[(comm, pid, count)] from `pmu stat --per-process -x,` output, in printed order."""
    rows = []
    for line in stderr.splitlines():
        fields = line.split(",")
        if len(fields) >= 4 and fields[1].isdigit():
            comm, pid = fields[0].rsplit("-", 1)
            rows.append((comm, int(pid), int(fields[1])))
    return rows


# ---- 1. fork, exec and vfork+exec children ----------------------------------------------------------

FORK_N, FORK_K, FORK_M = 40, 3, 250


@pytest.mark.parametrize("mode", ["fork", "exec", "vfork"])
@pytest.mark.parametrize("inherit", [True, False], ids=["inherit", "no-inherit"])
def test_forker_equals_perf(build, perf, mode, inherit):
    forker = str(build("forker"))
    argv = [forker, str(FORK_N), str(FORK_K), str(FORK_M), mode]
    flags = [] if inherit else ["--no-inherit"]
    r = run_pmu("stat", "-x,", *flags, "-e", "uprobe:work", "--", *argv, timeout=HANG)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "done\n"
    expected = FORK_N + FORK_K * FORK_M if inherit else FORK_N
    assert stat_counts(r.stderr) == {"uprobe:work": expected}
    assert_nothing_left(forker)
    theirs, _ = perf.stat({"forker_work": _offset("uprobe:work", forker)}, argv, *([] if inherit else ["-i"]))
    assert theirs == {"forker_work": expected}


@pytest.mark.parametrize("mode", ["fork", "exec", "vfork"])
def test_forker_per_process(build, mode):
    forker = str(build("forker"))
    argv = [forker, str(FORK_N), str(FORK_K), str(FORK_M), mode]
    r = run_pmu("stat", "-x,", "--per-process", "-e", "uprobe:work", "--", *argv, timeout=HANG)
    assert r.returncode == 0, r.stderr
    rows = per_process(r.stderr)
    assert len(rows) == FORK_K + 1, r.stderr
    assert len({pid for _, pid, _ in rows}) == FORK_K + 1  # one line per process
    parent = [row for row in rows if row[2] == FORK_N]
    children = [row for row in rows if row[2] == FORK_M]
    assert len(parent) == 1 and len(children) == FORK_K, r.stderr
    assert parent[0][0] == "forker"
    # An exec'd child is named after the file it exec'd: /proc/self/exe.
    assert {comm for comm, _, _ in children} == {"forker" if mode == "fork" else "exe"}
    assert per_thread_counts(r.stderr) == {("uprobe:work", pid): n for _, pid, n in rows}

    r = run_pmu("stat", "-x,", "--per-process", "-i", "-e", "uprobe:work", "--", *argv, timeout=HANG)
    assert r.returncode == 0, r.stderr
    rows = per_process(r.stderr)
    assert [(comm, n) for comm, _, n in rows] == [("forker", FORK_N)], r.stderr
    assert_nothing_left(forker)


@pytest.mark.parametrize("how", ["exec", "exit"])
@pytest.mark.parametrize("inherit", [True, False], ids=["inherit", "no-inherit"])
def test_vfork_child_running_probed_code_equals_perf(build, perf, how, inherit):
    """A vfork child hits the breakpoints of the memory it shares with its parent: its hits are its own
    (counted with inherit only), and the parent's breakpoints survive its exec or _exit."""
    exe = str(build("life_vfork"))
    n, m = 60, 25
    argv = [exe, str(n), str(m), how]
    flags = [] if inherit else ["--no-inherit"]
    r = run_pmu("stat", "-x,", *flags, "-e", "uprobe:work", "--", *argv, timeout=HANG)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "done\n"
    expected = 2 * n + (m if inherit else 0)
    assert stat_counts(r.stderr) == {"uprobe:work": expected}
    assert_nothing_left(exe)
    theirs, _ = perf.stat({"vfork_work": _offset("uprobe:work", exe)}, argv, *([] if inherit else ["-i"]))
    assert theirs == {"vfork_work": expected}


# ---- 2. a shell running children, and a program that never calls the function ------------------------


def _perf_env() -> dict[str, str]:
    """The environment perf stat gives its command (it adds PERF_BUILDID_DIR, PREFIX and a PATH entry).

    bash's malloc count depends on its environment, so pmu's command is given the same one.
    """
    r = subprocess.run(
        ["perf", "stat", "-e", "task-clock", "--", "/usr/bin/env", "-0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(item.split("=", 1) for item in r.stdout.split("\0") if "=" in item)


@pytest.mark.skipif(not os.path.exists(BASH), reason="bash is not at /bin/bash")
@pytest.mark.parametrize("argv", [[BASH, "-c", LOOP], ["/bin/true"]], ids=["bash-loop", "true"])
@pytest.mark.parametrize("inherit", [True, False], ids=["inherit", "no-inherit"])
def test_libc_malloc_equals_perf(perf, argv, inherit):
    flags = [] if inherit else ["--no-inherit"]
    event = "uprobe:libc:malloc"
    # bash's malloc count depends on its environment: give pmu's command the one perf gives its own.
    env = None if perf.reason else _perf_env()
    r = run_pmu("stat", "-x,", *flags, "-e", event, "--", *argv, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    ours = stat_counts(r.stderr)
    assert list(ours) == [event]
    if argv[0] == BASH:
        assert ours[event] > 100  # bash mallocs at every start
    theirs, _ = perf.stat({"malloc": _offset(event)}, argv, *([] if inherit else ["-i"]))
    assert ours == {event: theirs["malloc"]}


@pytest.mark.skipif(not os.path.exists(BASH), reason="bash is not at /bin/bash")
def test_bash_children_are_counted_only_with_inherit(build):
    """bash's children (exec'd from its forks) are counted with inherit only; the shell itself never
    calls the function."""
    forker = str(build("forker"))
    loop = f"for i in 1 2 3 4 5; do {forker} leaf 7; done"
    event = f"uprobe:{forker}:work"
    r = run_pmu("stat", "-x,", "-e", event, "--", BASH, "-c", loop, timeout=30)
    assert r.returncode == 0, r.stderr
    assert stat_counts(r.stderr) == {event: 35}
    r = run_pmu("stat", "-x,", "-i", "-e", event, "--", BASH, "-c", loop, timeout=30)
    assert r.returncode == 0, r.stderr
    assert stat_counts(r.stderr) == {event: 0}


# ---- 3. dlopen and dlclose --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("plugin") / "libplugin.so"
    subprocess.run(
        ["gcc", "-O1", "-g", "-shared", "-fPIC", "-o", str(out), str(TARGETS / "life_plugin.c")],
        check=True,
    )
    return str(out)


def _dlopen_counts(stdout: str) -> tuple[int, int]:
    m = re.fullmatch(r"plugin=(\d+) busy=(\d+)\n", stdout)
    assert m, stdout
    return int(m[1]), int(m[2])


@pytest.mark.parametrize("m", [0, 300], ids=["once", "reopened"])
@pytest.mark.parametrize("mode", ["seq", "thread"])
def test_dlopen_dlclose_equals_perf(build, plugin, perf, mode, m):
    exe = str(build("life_dlopen"))
    n = 500
    argv = [exe, plugin, str(n), str(m), mode]
    pw, bw = f"uprobe:{plugin}:plugin_work", "uprobe:busy_work"
    r = run_pmu("stat", "-x,", "-e", pw, "-e", bw, "--", *argv, timeout=HANG)
    assert r.returncode == 0, (r.stdout, r.stderr)  # 3: a byte of the old range was changed
    plugin_calls, busy = _dlopen_counts(r.stdout)
    assert plugin_calls == n + m
    if mode == "thread":
        assert busy > 1000
    assert stat_counts(r.stderr) == {pw: n + m, bw: busy}
    assert_nothing_left(exe)

    probes = {"plugin_work": _offset(pw), "busy_work": _offset(bw, exe)}
    theirs, pr = perf.stat(probes, argv)
    assert pr.returncode == 0, pr.stderr
    # perf's run prints its own busy count (the thread variant's depends on timing).
    assert _dlopen_counts(pr.stdout)[0] == n + m
    assert theirs == {"plugin_work": n + m, "busy_work": _dlopen_counts(pr.stdout)[1]}


# ---- 4. killed by a signal mid-run ------------------------------------------------------------------

DIE_K = 123
DIE_T, DIE_J = 3, 40


def _die(how: str, sig: int, threads: int, who: str, *marks: pytest.MarkDecorator) -> object:
    return pytest.param(how, sig, threads, who, marks=marks, id=f"{how}-{threads}threads-{who}")


@pytest.mark.parametrize(
    "how,sig,threads,who",
    [
        _die("kill", signal.SIGKILL, 0, "main"),
        _die("segv", signal.SIGSEGV, 0, "main"),
        _die("abort", signal.SIGABRT, 0, "main"),
        _die("segv", signal.SIGSEGV, DIE_T, "main"),
        _die("kill", signal.SIGKILL, DIE_T, "thread"),
        _die("segv", signal.SIGSEGV, DIE_T, "thread"),
        _die("abort", signal.SIGABRT, DIE_T, "thread"),
        _die("int", signal.SIGINT, 0, "main"),
        _die("pipe", signal.SIGPIPE, 0, "main"),
    ],
)
def test_killed_mid_run(build, perf, how, sig, threads, who):
    exe = str(build("life_die"))
    argv = [exe, str(DIE_K), how, str(threads), str(DIE_J), who]
    plain = subprocess.run(argv, capture_output=True, timeout=HANG)
    assert plain.returncode == -sig
    r = run_pmu("stat", "-x,", "-e", "uprobe:work", "--", *argv, timeout=HANG)
    expected = DIE_K + threads * DIE_J
    assert (r.returncode, stat_counts(r.stderr)) == (128 + sig, {"uprobe:work": expected}), r.stderr
    assert_nothing_left(exe)
    theirs, _ = perf.stat({"die_work": _offset("uprobe:work", exe)}, argv)
    assert theirs == {"die_work": expected}


# ---- 5. exit statuses through a fork ----------------------------------------------------------------


@pytest.mark.parametrize(
    "parent,child,how,expected",
    [
        (3, 0, "wait", 3),
        (0, 3, "wait", 0),
        (5, 3, "relay", 3),
        (5, 0, "relay", 0),
        (3, 0, "nowait", 3),
        (0, 3, "nowait", 0),
        pytest.param(3, 0, "thread", 3),
    ],
    ids=["parent3", "child3", "relay3", "relay0", "nowait-parent3", "nowait-child3", "thread-parent3"],
)
def test_exit_status_is_the_commands_own(build, perf, parent, child, how, expected):
    exe = str(build("life_status"))
    argv = [exe, str(parent), str(child), how]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=HANG)
    assert plain.returncode == expected
    # With "nowait" the parent is gone before its child calls work: only the parent's call is counted.
    calls = 1 if how == "nowait" else 3
    for flags, count in (([], calls), (["-i"], 1)):
        r = run_pmu("stat", "-x,", *flags, "-e", "uprobe:work", "--", *argv, timeout=HANG)
        assert r.returncode == expected, r.stderr
        # The child outlives pmu's wait with "nowait" and still finishes (the pipe's EOF waits for it).
        assert r.stdout == "child done\n"
        assert stat_counts(r.stderr) == {"uprobe:work": count}
    assert_nothing_left(exe)
    probe = {"status_work": _offset("uprobe:work", exe)}
    assert perf.stat(probe, argv)[0] == {"status_work": calls}
    assert perf.stat(probe, argv, "-i")[0] == {"status_work": 1}


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs /usr/bin/python3")
@pytest.mark.parametrize("inherit", [True, False])
def test_vfork_exec_child_is_let_go_without_inherit(inherit):
    """posix_spawn (vfork) children: followed with inherit; with --no-inherit, untraced once they exec."""
    script = (
        "import subprocess, time\n"
        "p = subprocess.Popen(['sleep', '1']); time.sleep(0.3)\n"
        "print([l.split()[1] for l in open(f'/proc/{p.pid}/status') if l.startswith('TracerPid')][0])\n"
        "p.wait()\n"
    )
    flags = [] if inherit else ["--no-inherit"]
    r = run_pmu("stat", "-x,", *flags, "-e", "uprobe:libc:malloc", "--", "/usr/bin/python3", "-c", script)
    assert r.returncode == 0, r.stderr
    traced_by = int(r.stdout.strip())
    assert (traced_by != 0) is inherit
