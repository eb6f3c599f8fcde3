"""USDT probes (`usdt:TARGET:[PROVIDER:]NAME`, from `.note.stapsdt`): every site of a name, the
semaphore held while armed and put back after, the arguments from the note's operands; counts equal the
kernel's (a tracefs uprobe with the semaphore's reference counter, as perf probe makes an SDT event)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from pmu.events import usdt
from tests.conftest import run_pmu, stat_counts

PYTHON = "/usr/bin/python3.11"


def _file_offset(path: str, vaddr: int) -> int:
    """vaddr's offset in the file (its PT_LOAD's p_offset + the distance from its p_vaddr)."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_memsz"]:
                return int(vaddr - seg["p_vaddr"] + seg["p_offset"])
    raise AssertionError(f"{vaddr:#x} is in no PT_LOAD of {path}")


def _kernel_sdt(kernel_uprobes, path: str, provider: str, name: str, tag: str) -> list[str]:
    """One kernel uprobe per site of the probe, with the semaphore's reference counter."""
    events = []
    for i, note in enumerate(n for n in usdt.notes(path) if (n.provider, n.name) == (provider, name)):
        ref = _file_offset(path, note.semaphore) if note.semaphore else 0
        events.append(kernel_uprobes.add(f"{tag}{i}", path, _file_offset(path, note.pc), ref_ctr=ref))
    return events


def test_usdt_counts_and_semaphore_equal_perf(build, kernel_uprobes):
    exe = str(build("usdt"))
    argv = [exe, "3000"]
    bare = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert bare.stdout == "ticks=3000 enabled=0\n"  # nobody holds the semaphore
    tick = _kernel_sdt(kernel_uprobes, exe, "demo", "tick", "sdt_tick")
    plain = _kernel_sdt(kernel_uprobes, exe, "demo", "plain", "sdt_plain")
    assert len(tick) == 1 and len(plain) == 2  # plain() is inlined at two sites
    perf = kernel_uprobes.stat(tick + plain, argv)
    r = run_pmu("stat", "-v", "-x,", "-e", f"usdt:{exe}:tick", "-e", f"usdt:{exe}:demo:plain", "--", *argv)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ticks=3000 enabled=3000\n"  # the semaphore was held
    ours = stat_counts(r.stderr)
    assert ours[f"usdt:{exe}:tick"] == perf[tick[0]] == 3000
    assert ours[f"usdt:{exe}:demo:plain"] == sum(perf[e] for e in plain) == 3000


def test_usdt_arguments_recorded(build, tmp_path):
    exe = str(build("usdt"))
    out = tmp_path / "u.parquet"
    r = run_pmu("record", "--args", "2", "-o", out, "-e", f"usdt:{exe}:tick", "--", exe, "500")
    assert r.returncode == 0, r.stderr
    df = pq.read_table(out).to_pandas()
    assert sorted(df["arg0"].tolist()) == list(range(500))
    assert df["arg1"].nunique() == 3  # the three names' addresses


def test_semaphore_put_back_after_an_attached_run(build, tmp_path):
    """Attached to a running program: the semaphore is 1 while pmu runs (read by pmu's own command,
    which pmu starts once its probes are armed), and 0 again after; the program goes on right."""
    exe = str(build("usdt"))
    stop = tmp_path / "stop"
    proc = subprocess.Popen([exe, "wait", str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        note = next(n for n in usdt.notes(exe) if n.name == "tick")
        with open(f"/proc/{pid}/maps") as maps:
            lines = maps.read().splitlines()
        base = next(int(line.split("-")[0], 16) for line in lines if line.endswith(os.path.realpath(exe)))
        sem = base + note.semaphore  # a PIE: the first mapping is at the load bias

        def value() -> int:
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(sem)
                return int.from_bytes(mem.read(2), "little")

        assert value() == 0
        reader = (
            f"m = open('/proc/{pid}/mem', 'rb'); m.seek({sem}); print(int.from_bytes(m.read(2), 'little'))"
        )
        cmd = [sys.executable, "-c", reader]
        r = run_pmu("stat", "-x,", "-p", str(pid), "-e", f"usdt:{exe}:tick", "--", *cmd)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "1"
        assert value() == 0
        assert stat_counts(r.stderr)[f"usdt:{exe}:tick"] >= 0
    finally:
        stop.touch()
        proc.wait(timeout=30)
    assert proc.returncode == 0


@pytest.mark.skipif(not os.path.exists(PYTHON), reason=f"no {PYTHON} (Debian's, with USDT probes)")
def test_python_usdt_equals_perf(kernel_uprobes, tmp_path):
    """CPython's own USDT probes (Debian builds it with them): function__return and line, counted as
    perf counts the SDT events, the semaphores held by both."""
    script = tmp_path / "s.py"
    script.write_text("def f(x):\n    return x + 1\n\nfor i in range(2000):\n    f(i)\n")
    argv = ["env", "-i", "PYTHONHASHSEED=0", PYTHON, "-I", "-S", str(script)]
    names = {}
    for name in ("function__return", "line"):
        events = _kernel_sdt(kernel_uprobes, PYTHON, "python", name, f"py_{name[:4]}")
        assert len(events) == 1
        names[f"usdt:{PYTHON}:python:{name}"] = events[0]
    perf = kernel_uprobes.stat(list(names.values()), argv)
    r = run_pmu("stat", "-x,", *[a for e in names for a in ("-e", e)], "--", *argv)
    assert r.returncode == 0, r.stderr
    assert stat_counts(r.stderr) == {e: perf[k] for e, k in names.items()}
    assert perf[names[f"usdt:{PYTHON}:python:function__return"]] >= 2000


def test_usdt_bad_input_is_one_line(build):
    exe = str(build("usdt"))
    r = run_pmu("stat", "-e", f"usdt:{exe}:nosuch", "--", exe, "1")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no USDT probe nosuch" in r.stderr
    assert "demo:plain" in r.stderr and "demo:tick" in r.stderr  # the ones it has
    true = shutil.which("true")
    assert true is not None
    r = run_pmu("stat", "-e", f"usdt:{true}:x", "--", true)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "has no USDT probes" in r.stderr


def test_list_usdt(build):
    exe = str(build("usdt"))
    r = run_pmu("list", "--usdt", exe)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["demo:plain", "demo:tick"]
    r = run_pmu("list", "--usdt", "-v", exe, "tick")
    (line,) = r.stdout.splitlines()  # the operands are the compiler's choice of registers
    assert line.startswith("demo:tick  1 site, semaphore, args: -8@") and line.count("@") == 2
