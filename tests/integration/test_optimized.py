"""Jump-optimized probes: exact counts with no stop per hit, refusals with reasons, and a target that
keeps running when pmu itself is killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import NO_OPTIMIZE, ROOT, per_thread_counts, run_pmu, stat_counts
from tests.integration.test_vs_perf import _offset

pytestmark = pytest.mark.skipif(NO_OPTIMIZE, reason="these tests are about the optimized mode")


def test_four_threads_exact_per_thread(build):
    mt = build("mt")
    r = run_pmu("stat", "-v", "-x,", "--per-thread", "-e", "uprobe:work", "--", mt, "4", "250000")
    assert r.returncode == 0, r.stderr
    assert "pmu: uprobe:work: optimized (jump patch" in r.stderr
    expected = {("uprobe:work", int(t)): int(c) for t, c in re.findall(r"tid=(\d+) calls=(\d+)", r.stdout)}
    assert sorted(expected.values()) == [250000, 500000, 750000, 1000000]
    assert per_thread_counts(r.stderr) == expected
    r = run_pmu("stat", "-x,", "-e", "uprobe:work", "--", mt, "4", "250000")
    assert stat_counts(r.stderr) == {"uprobe:work": 2_500_000}


def test_refused_sites_fall_back_to_int3_with_a_reason(build):
    reloc = build("reloc")
    r = run_pmu("stat", "-v", "-x,", "-e", "uprobe:f_jmp", "-e", "uprobe:f_riprel", "--", reloc, "20")
    assert r.returncode == 0, r.stderr
    assert stat_counts(r.stderr) == {"uprobe:f_jmp": 21, "uprobe:f_riprel": 21}
    assert re.search(
        r"pmu: uprobe:f_jmp: int3 \(not optimized: cannot place a jump .*past-symbol-end", r.stderr
    )
    assert "pmu: uprobe:f_riprel: optimized" in r.stderr
    r = run_pmu("stat", "-v", "--no-optimize", "-x,", "-e", "uprobe:f_riprel", "--", reloc, "20")
    assert "pmu: uprobe:f_riprel: int3" in r.stderr
    assert stat_counts(r.stderr) == {"uprobe:f_riprel": 21}


def test_a_function_with_a_jump_table_is_optimized(build, kernel_uprobes):
    """gcc's switch jump table (`jmp rax` through a table in .rodata): its entries are read from the file
    and checked as branches, so the entry takes a jump patch; counts equal the kernel uprobe's."""
    exe = build("switch")
    r = run_pmu("stat", "-v", "-x,", "-e", "uprobe:classify", "--", exe, "200000")
    assert r.returncode == 0, r.stderr
    assert "pmu: uprobe:classify: optimized (jump patch" in r.stderr, r.stderr
    assert "classify called 200000 times" in r.stdout
    assert stat_counts(r.stderr) == {"uprobe:classify": 200_000}
    bare = subprocess.run([exe, "200000"], capture_output=True, text=True, timeout=60)
    assert r.stdout == bare.stdout  # every case returned what it returns without pmu
    path, offset = _offset("uprobe:classify", str(exe))
    name = kernel_uprobes.add("classify", path, offset)
    assert kernel_uprobes.stat([name], [str(exe), "200000"]) == {name: 200_000}


@pytest.mark.parametrize("pie", [True, False], ids=["pie", "no-pie"])
def test_indirect_tail_calls_are_optimized(build, kernel_uprobes, pie):
    """dispatch() ends in jumps through pointers (`jmp [rdx+rax*8]` through a table of functions, `jmp
    [rip+chosen]`): no pointer of the file lands in its first bytes (relocations in a PIE, the data itself
    in an executable), so its entry takes a jump patch; output and count as without pmu / the kernel's."""
    flags = ("-O2",) if pie else ("-O2", "-no-pie", "-fno-pie")
    exe = build("tailcall", *flags, suffix="_pie" if pie else "_nopie")
    r = run_pmu("stat", "-v", "-x,", "-e", "uprobe:dispatch", "--", exe, "200000")
    assert r.returncode == 0, r.stderr
    assert "pmu: uprobe:dispatch: optimized (jump patch" in r.stderr, r.stderr
    bare = subprocess.run([exe, "200000"], capture_output=True, text=True, timeout=60)
    assert r.stdout == bare.stdout and "dispatch called 200000 times" in r.stdout
    assert stat_counts(r.stderr) == {"uprobe:dispatch": 200_000}
    path, offset = _offset("uprobe:dispatch", str(exe))
    name = kernel_uprobes.add("dispatch", path, offset)
    assert kernel_uprobes.stat([name], [str(exe), "200000"]) == {name: 200_000}


def test_enable_on_exec_counts_nothing_before_exec(build):
    """Events open disabled: the trampoline checks the enable flag, and the launcher's own code path
    (before exec) never reaches it. A second, shorter run gives the proportional count."""
    hot = build("hot")
    for n in (1, 1000):
        r = run_pmu("stat", "-x,", "-e", "uprobe:work", "--", hot, str(n))
        assert stat_counts(r.stderr) == {"uprobe:work": n}


def test_pmu_killed_leaves_the_target_running(build):
    """Nothing traps in an optimized probe, so a target whose tracer dies keeps running and behaving."""
    spin = subprocess.Popen([build("spin"), "3", "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert spin.stdout.readline() == "ready\n"
        pmu = subprocess.Popen(
            [sys.executable, "-m", "pmu", "stat", "-v", "-p", str(spin.pid), "-e", "uprobe:work"],
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        _wait_traced(spin.pid)
        assert _jump_patched(spin.pid, build("spin"))
        # Every probed file is mapped already: no dlopen hook, so no int3 at all in the process.
        from pmu.trace.rtld import debug_state_address

        r_brk = debug_state_address(spin.pid)
        assert r_brk is not None
        fd = os.open(f"/proc/{spin.pid}/mem", os.O_RDONLY)
        try:
            assert os.pread(fd, 1, r_brk) != b"\xcc"
        finally:
            os.close(fd)
        pmu.send_signal(signal.SIGKILL)
        pmu.wait(timeout=10)
        out, _ = spin.communicate(timeout=30)
        assert spin.returncode == 0, out
        assert int(re.match(r"total=(\d+) bad=0", out).group(1)) > 1000
    finally:
        if spin.poll() is None:
            spin.kill()


def _wait_traced(pid: int) -> None:
    """Until pmu has attached to pid, and half a second more for it to patch."""
    deadline = time.monotonic() + 20
    while _tracer(pid) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)


def _tracer(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def _jump_patched(pid: int, exe) -> bool:
    from pmu.events.spec import parse_event
    from pmu.events.symbols import resolve_probe

    probe = resolve_probe(parse_event(f"uprobe:{exe}:work"), str(exe))
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            off = int(fields[2], 16)
            if fields[-1] == str(exe) and "x" in fields[1] and off <= probe.file_offset < off + hi - lo:
                fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
                try:
                    return os.pread(fd, 1, lo + probe.file_offset - off) == b"\xe9"
                finally:
                    os.close(fd)
    return False


def test_attach_to_another_users_process(build, tmp_path_factory):
    """root attaching to a process of another user: the counter area is made by the process itself
    (pmu takes its descriptor with pidfd_getfd), so the probe is still optimized."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the target as another user")
    shared = tmp_path_factory.mktemp("nobody")
    shared.chmod(0o755)
    exe = shared / "spin"
    exe.write_bytes(build("spin").read_bytes())
    exe.chmod(0o755)
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(exe), "30", "3"]
    spin = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert spin.stdout.readline() == "ready\n"
        r = run_pmu("stat", "-v", "-x,", "-p", spin.pid, "-e", "uprobe:work", "--", "sleep", "0.5")
        assert r.returncode == 0, r.stderr
        assert "pmu: uprobe:work: optimized" in r.stderr
        assert stat_counts(r.stderr)["uprobe:work"] > 100
        spin.send_signal(signal.SIGUSR1)
        out, _ = spin.communicate(timeout=30)
        assert spin.returncode == 0 and re.match(r"total=\d+ bad=0", out)
    finally:
        if spin.poll() is None:
            spin.kill()


def test_no_jump_patch_where_another_function_jumps_into_the_bytes(build):
    """entry_b jumps into func_a's third byte (hand-written code, as glibc's mempcpy into memmove): a
    jump patch there would send it into the middle of the jmp. pmu finds the branch in the nearby code,
    probes func_a with int3, and the program computes as without pmu."""
    exe = build("intojump")
    bare = subprocess.run([exe, "5000"], capture_output=True, text=True, timeout=60)
    r = run_pmu("stat", "-v", "-x,", "-e", "uprobe:func_a", "-e", "uprobe:entry_b", "--", exe, "5000")
    assert r.returncode == 0, r.stderr
    assert r.stdout == bare.stdout
    assert stat_counts(r.stderr) == {"uprobe:func_a": 5000, "uprobe:entry_b": 5000}
    if not NO_OPTIMIZE:
        refused = r"uprobe:func_a: int3 \(not optimized: .*branch-into-patch.*outside the function"
        assert re.search(refused, r.stderr), r.stderr
