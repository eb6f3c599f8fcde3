"""Attach to running processes, count, and leave them exactly as they were (issue: lifetimes)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pmu.events.spec import parse_event
from pmu.events.symbols import resolve_probe
from tests.conftest import NO_OPTIMIZE, ROOT, per_thread_counts, run_pmu, stat_counts


class Spin:
    """A running multi-threaded target (tests/targets/spin.c) and snapshots of its memory."""

    def __init__(self, exe, seconds: float = 600, threads: int = 3, busy: bool = False) -> None:
        self.exe = str(exe)
        argv = [self.exe, str(seconds), str(threads)] + (["busy"] if busy else [])
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "ready\n"
        self.pid = self.proc.pid

    def code(self) -> dict[str, bytes]:
        """Every executable mapping's bytes, keyed by its maps line."""
        out = {}
        with open(f"/proc/{self.pid}/maps") as maps, open(f"/proc/{self.pid}/mem", "rb") as mem:
            for line in maps:
                fields = line.split()
                if "x" not in fields[1] or fields[-1] in ("[vsyscall]", "[vdso]"):
                    continue
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                mem.seek(lo)
                out[line] = mem.read(hi - lo)
        return out

    def maps(self) -> list[str]:
        with open(f"/proc/{self.pid}/maps") as f:
            return f.read().splitlines()

    def tracer(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
        raise AssertionError("no TracerPid")

    def threads(self) -> list[int]:
        return sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))

    def states(self) -> set[str]:
        out = set()
        for t in self.threads():
            with open(f"/proc/{self.pid}/task/{t}/stat") as f:
                out.add(f.read().rsplit(")", 1)[1].split()[0])
        return out

    def finish(self) -> str:
        """Ask it to stop (SIGUSR1), check it exits normally, return its last line."""
        self.proc.send_signal(signal.SIGUSR1)
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0
        assert out.startswith("total=")
        return out

    def calls(self) -> int:
        """How many times its threads have called work() so far (the sum of spin.c's `calls`)."""
        from elftools.elf.elffile import ELFFile

        with open(self.exe, "rb") as f:
            (sym,) = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name("calls")
            value, size = sym["st_value"], sym["st_size"]
        base = min(int(line.split("-")[0], 16) for line in self.maps() if line.endswith(self.exe))
        with open(f"/proc/{self.pid}/mem", "rb") as mem:
            mem.seek(base + value)
            data = mem.read(size)
        return sum(int.from_bytes(data[i : i + 8], "little", signed=True) for i in range(0, size, 8))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def spin(build):
    s = Spin(build("spin"))
    yield s
    s.kill()


def _work_address(spin: Spin) -> int:
    probe = resolve_probe(parse_event(f"uprobe:{spin.exe}:work"), spin.exe)
    for line in spin.maps():
        f = line.split()
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        off = int(f[2], 16)
        if f[-1] == spin.exe and "x" in f[1] and off <= probe.file_offset < off + hi - lo:
            return lo + probe.file_offset - off
    raise AssertionError("work is not mapped")


def test_attach_for_the_life_of_a_command(spin):
    code_before, maps_before = spin.code(), spin.maps()
    r = run_pmu("stat", "-x,", "-p", spin.pid, "-e", "uprobe:work", "--", "sleep", "1")
    assert r.returncode == 0, r.stderr
    count = stat_counts(r.stderr)["uprobe:work"]
    assert count > 100  # three threads call work every ~200 µs
    assert spin.tracer() == 0
    assert spin.code() == code_before  # every byte restored
    assert spin.maps() == maps_before  # the out-of-line area is gone
    assert spin.states() <= {"S", "R"}
    spin.finish()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_attach_until_a_signal(spin, sig):
    code_before, maps_before = spin.code(), spin.maps()
    work = _work_address(spin)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pmu", "stat", "-x,", "-p", str(spin.pid), "-e", "uprobe:work"]
    if NO_OPTIMIZE:
        cmd.insert(4, "--no-optimize")
    pmu = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    # Armed (int3, one-byte UD or jump patch: every call counted from then on), and 51 calls made since:
    # no guess at how long either takes on this machine. The deadline only keeps a hang from lasting.
    deadline = time.monotonic() + 120
    with open(f"/proc/{spin.pid}/mem", "rb", buffering=0) as mem:  # unbuffered: each read is fresh
        while pmu.poll() is None and time.monotonic() < deadline:
            mem.seek(work)
            if mem.read(1) in (b"\xcc", b"\x06", b"\xe9"):
                break
            time.sleep(0.01)
    assert spin.tracer() != 0, "pmu did not attach"
    armed = spin.calls()
    while spin.calls() < armed + 51 and pmu.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    pmu.send_signal(sig)
    _, err = pmu.communicate(timeout=30)
    assert pmu.returncode == 0, err
    assert "Traceback" not in err
    assert stat_counts(err)["uprobe:work"] > 50
    assert spin.tracer() == 0
    assert spin.code() == code_before
    assert spin.maps() == maps_before
    spin.finish()


def test_attach_until_the_process_exits(build):
    """Without a command pmu counts until the process exits. The process is told to exit only once the
    probe is in place (a process that ends by a clock could end before a slow start attached)."""
    s = Spin(build("spin"), seconds=300)
    try:
        addr = _work_address(s)
        with open(f"/proc/{s.pid}/mem", "rb") as mem:
            mem.seek(addr)
            orig = mem.read(1)
        cmd = [sys.executable, "-m", "pmu", "stat", "-x,", "-p", str(s.pid), "-e", "uprobe:work"]
        if NO_OPTIMIZE:
            cmd.insert(4, "--no-optimize")
        pmu = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        while pmu.poll() is None:
            with open(f"/proc/{s.pid}/mem", "rb") as mem:
                mem.seek(addr)
                if mem.read(1) != orig:
                    break
        s.proc.send_signal(signal.SIGUSR1)
        _, err = pmu.communicate(timeout=60)
        assert pmu.returncode == 0, err
        assert stat_counts(err)["uprobe:work"] > 0
        out, _ = s.proc.communicate(timeout=10)
        assert s.proc.returncode == 0 and out.startswith("total=")
    finally:
        s.kill()


def test_attach_per_thread_and_single_thread(spin):
    r = run_pmu("stat", "-x,", "--per-thread", "-p", spin.pid, "-e", "uprobe:work", "--", "sleep", "0.5")
    assert r.returncode == 0, r.stderr
    per = per_thread_counts(r.stderr)
    workers = [t for t in spin.threads() if t != spin.pid]
    assert {tid for (_, tid) in per} == set(workers)  # main only joins; every worker hit
    r = run_pmu("stat", "-x,", "-t", workers[0], "-e", "uprobe:work", "--", "sleep", "0.5")
    assert r.returncode == 0, r.stderr
    assert stat_counts(r.stderr)["uprobe:work"] > 50
    r = run_pmu("stat", "-x,", "-t", spin.pid, "-e", "uprobe:work", "--", "sleep", "0.5")
    assert stat_counts(r.stderr)["uprobe:work"] == 0  # the main thread never calls work
    assert spin.tracer() == 0
    spin.finish()


def test_attach_errors(spin, tmp_path):
    r = run_pmu("stat", "-p", "999999999", "-e", "uprobe:/bin/true:main")
    assert r.returncode == 2 and r.stderr.strip() == "pmu: no process with pid 999999999"
    r = run_pmu("stat", "-p", "12x", "-e", "uprobe:work")
    assert r.returncode == 2 and "bad pid list" in r.stderr
    # Already traced: a first pmu holds it, a second one is told who.
    first = subprocess.Popen(
        [os.sys.executable, "-m", "pmu", "stat", "-x,", "-p", str(spin.pid), "-e", "uprobe:work"],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while spin.tracer() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    r = run_pmu("stat", "-p", spin.pid, "-e", "uprobe:work")
    assert r.returncode == 2
    assert r.stderr.strip() == f"pmu: process {spin.pid} is already traced by pid {first.pid} (a debugger?)"
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=30)
    assert first.returncode == 0
    assert spin.tracer() == 0
    spin.finish()


def test_another_users_process(spin):
    """pmu run as nobody may not trace root's process: one line naming the reason and the fix."""
    cmd = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        os.sys.executable,
        "-m",
        "pmu",
        "stat",
        "-p",
        str(spin.pid),
        "-e",
        f"uprobe:{spin.exe}:work",
    ]
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/", env=env)
    except FileNotFoundError:
        pytest.skip("setpriv is not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root to run pmu as another user")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot trace process" in lines[0] and "permission denied" in lines[0], (
        r.stderr
    )
    assert spin.tracer() == 0
    spin.finish()


FILL_HITS = 20_000
"""Hits the full-disk target makes: about 1 MB of Parquet (six random words a record), 15 times the
disk, in either engine."""


class Fill(Spin):
    """tests/targets/fill.c: FILL_HITS calls of work once the probe is in, then blocks until finish()."""

    def __init__(self, exe, hits: int) -> None:
        self.exe = str(exe)
        self.proc = subprocess.Popen([self.exe, str(hits)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "ready\n"
        self.pid = self.proc.pid

    def done(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()


def test_full_disk_restores_and_detaches(build, tmp_path):
    """pmu's own failure mid-run (the output disk fills up) still leaves the process as it was.

    Nothing depends on speed: the target makes a fixed number of hits once the probe is in, far more
    than the disk holds, then blocks; the run ends when the command (cat of pmu's stdin) sees EOF, which
    the test gives only after the target said it was done."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tiny tmpfs")
    disk = tmp_path / "tiny"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount tmpfs")
    fill = Fill(build("fill"), FILL_HITS)
    try:
        code_before, maps_before = fill.code(), fill.maps()
        out = disk / "big.parquet"
        argv = [
            "record",
            "-o",
            str(out),
            "--args",
            "6",
            "-p",
            str(fill.pid),
            "-e",
            "uprobe:work",
            "--",
            "cat",
        ]
        if NO_OPTIMIZE:
            argv.insert(1, "--no-optimize")
        pmu = subprocess.Popen(
            [sys.executable, "-m", "pmu", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert fill.done() == "done armed=1\n"  # every hit made with the probe in place
            _, stderr = pmu.communicate(input="", timeout=120)  # EOF: cat exits, the run ends
        finally:
            if pmu.poll() is None:
                pmu.kill()
        assert pmu.returncode == 2, stderr
        assert stderr.strip().splitlines()[-1] == f"pmu: cannot write {out}: No space left on device"
        assert "Traceback" not in stderr
        assert fill.tracer() == 0
        assert fill.code() == code_before
        assert fill.maps() == maps_before
        assert fill.finish().strip() == f"total={FILL_HITS} bad=0"
    finally:
        fill.kill()
        subprocess.run(["umount", str(disk)])


def test_attach_detach_busy_threads_many_times(build):
    """Threads calling the probed function in a tight loop are often stopped inside the displaced bytes
    or the out-of-line copies: each attach must move them right, each detach must step them out (never
    leaving a trap flag behind). Twenty rounds; every result the target computes stays right."""
    busy = Spin(build("spin"), seconds=60, busy=True)
    try:
        for _ in range(20):
            r = run_pmu("stat", "-x,", "-p", busy.pid, "-e", "uprobe:work", "--", "sleep", "0.05")
            assert r.returncode == 0, r.stderr
            assert stat_counts(r.stderr)["uprobe:work"] > 0
            assert busy.tracer() == 0
        assert re.match(r"total=\d+ bad=0$", busy.finish().strip())
    finally:
        busy.kill()
