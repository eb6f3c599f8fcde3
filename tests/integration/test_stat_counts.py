"""`pmu stat` counts exactly, on real processes under real ptrace."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import NO_OPTIMIZE, TARGETS, per_thread_counts, processes_running, run_pmu, stat_counts


def test_two_functions_single_thread(build):
    hot = build("hot")
    r = run_pmu("stat", "-x,", "-e", f"uprobe:{hot}:work", "-e", f"uprobe:{hot}:work2", "--", hot, "1001")
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout == f"sum={sum(i * 3 + 1 for i in range(1001)) + sum(i ^ 0x55 for i in range(0, 1001, 2))}\n"
    )
    counts = stat_counts(r.stderr)
    assert counts == {f"uprobe:{hot}:work": 1001, f"uprobe:{hot}:work2": 501}
    assert processes_running(hot) == []


def test_comma_list_and_own_executable(build):
    hot = build("hot")
    r = run_pmu("stat", "-x,", "-e", "uprobe:work,uprobe:work2", "--", hot, "10")
    assert r.returncode == 0, r.stderr
    assert stat_counts(r.stderr) == {"uprobe:work": 10, "uprobe:work2": 5}


def test_two_events_on_one_address_share_a_breakpoint(build):
    hot = build("hot")
    r = run_pmu("stat", "-x,", "-e", f"{hot}:work", "-e", "uprobe:work", "--", hot, "77")
    assert r.returncode == 0, r.stderr
    assert stat_counts(r.stderr) == {f"{hot}:work": 77, "uprobe:work": 77}


def test_exit_status_is_the_commands(build):
    hot = build("hot")
    r = run_pmu("stat", "-x,", "-e", "uprobe:work", "--", hot, "5", "7")
    assert r.returncode == 7
    assert stat_counts(r.stderr) == {"uprobe:work": 5}


def test_threads_total_and_per_thread(build):
    mt = build("mt")
    r = run_pmu("stat", "-x,", "-e", "uprobe:work", "--", mt, "4", "1000")
    assert r.returncode == 0, r.stderr
    assert stat_counts(r.stderr) == {"uprobe:work": 1000 * (1 + 2 + 3 + 4)}
    r = run_pmu("stat", "-x,", "--per-thread", "-e", "uprobe:work", "--", mt, "4", "1000")
    assert r.returncode == 0, r.stderr
    expected = {("uprobe:work", int(t)): int(c) for t, c in re.findall(r"tid=(\d+) calls=(\d+)", r.stdout)}
    assert len(expected) == 4
    assert per_thread_counts(r.stderr) == expected
    assert processes_running(mt) == []


def test_signal_handler_and_main(build):
    sig = build("sig")
    r = run_pmu("stat", "-x,", "-e", "uprobe:work", "--", sig, "100", "10")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"handled={10 * 7 * 10}\n"
    assert stat_counts(r.stderr) == {"uprobe:work": 110}


def test_tracee_own_traps_pass_through(build):
    traps = build("traps")
    plain = __import__("subprocess").run([traps], capture_output=True, text=True)
    r = run_pmu("stat", "-x,", "-e", "uprobe:work", "--", traps)
    assert r.returncode == plain.returncode == 0, r.stderr
    assert r.stdout == plain.stdout  # the handler saw the same traps with the same si_code
    assert stat_counts(r.stderr) == {"uprobe:work": 3}


def test_relocated_instructions_run_correctly(build):
    reloc = build("reloc")
    plain = __import__("subprocess").run([reloc, "50"], capture_output=True, text=True)
    events = ["f_riprel", "f_ripload", "f_call", "f_jmp", "f_jcc+3", "f_cmpimm"]
    args = [a for e in events for a in ("-e", f"uprobe:{e}")]
    r = run_pmu("stat", "-x,", *args, "--", reloc, "50")
    assert r.returncode == 0, r.stderr
    assert r.stdout == plain.stdout
    counts = stat_counts(r.stderr)
    assert counts == {f"uprobe:{e}": 51 for e in events[:4]} | {"uprobe:f_jcc+3": 52, "uprobe:f_cmpimm": 51}


def test_text_output_like_perf(build):
    hot = build("hot")
    r = run_pmu("stat", "-e", "uprobe:work", "--", hot, "12345")
    assert r.returncode == 0, r.stderr
    assert f"Performance counter stats for '{hot} 12345':" in r.stderr
    assert re.search(r"^\s+12,345\s+uprobe:work\s*$", r.stderr, re.M), r.stderr
    assert re.search(r"seconds time elapsed", r.stderr)
    assert "Traceback" not in r.stderr


def test_the_command_gets_the_environment_unchanged(tmp_path):
    """pmu limits numpy's BLAS threads in its own process; the command it runs must not see that."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["PMU_TEST_MARK"] = "1"
    plain = subprocess.run(["/usr/bin/env"], capture_output=True, text=True, env=env)
    r = run_pmu("stat", "-x,", "-e", "uprobe:libc:getenv", "--", "/usr/bin/env", env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == sorted(plain.stdout.splitlines())
    assert "OPENBLAS_NUM_THREADS" not in r.stdout and "PMU_TEST_MARK=1" in r.stdout


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tests/targets/many.c: a library of 1000 functions, and the program that calls each a known number
    of times, linked against it (library last, for linkers that drop unneeded libraries)."""
    out = tmp_path_factory.mktemp("many")
    source = TARGETS / "many.c"
    lib, exe = out / "libmany.so", out / "many"
    subprocess.run(["gcc", "-O1", "-g", "-shared", "-fPIC", "-DLIB", "-o", lib, source], check=True)
    link = ["-L", out, "-lmany", f"-Wl,-rpath,{out}"]
    subprocess.run(["gcc", "-O1", "-g", "-DMAIN", "-o", exe, source, *link], check=True)
    return lib, exe


def test_a_thousand_probes_on_one_library(many: tuple[Path, Path]) -> None:
    """1000 probes, one per function of a library: every one jump-optimized (there is no limit to the
    optimized probes of a process: counter banks are added as they are needed), each count the
    program's own."""
    lib, exe = many
    events = [f"uprobe:{lib}:f{k:03d}" for k in range(1000)]
    r = run_pmu("stat", "-v", "-x,", *[a for e in events for a in ("-e", e)], "--", exe, "2")
    assert r.returncode == 0, r.stderr
    said = {f"uprobe:{lib}:{name}": int(n) for name, n in re.findall(r"^(f\d{3}) (\d+)$", r.stdout, re.M)}
    assert len(said) == 1000
    assert stat_counts(r.stderr) == said
    how = re.findall(rf"^pmu: uprobe:{re.escape(str(lib))}:f\d{{3}}: (\w+)", r.stderr, re.M)
    assert len(how) == 1000
    assert set(how) == ({"int3"} if NO_OPTIMIZE else {"optimized"})


def test_a_probe_armed_nowhere_says_what_was_mapped_instead(many: tuple[Path, Path], tmp_path: Path) -> None:
    """A probe on a copy of a library the program does not map (as a short name that resolved to the
    system's libpython while a pyenv python maps its own): one warning line after the counts naming the
    file mapped under that name, where perf prints a silent 0."""
    lib, exe = many
    other = tmp_path / "libmany.so"
    other.write_bytes(lib.read_bytes())
    r = run_pmu("stat", "-x,", "-e", f"uprobe:{other}:f001", "--", exe, "1")
    assert r.returncode == 0, r.stderr
    assert stat_counts(r.stderr) == {f"uprobe:{other}:f001": 0}
    warning = [line for line in r.stderr.splitlines() if line.startswith("pmu: ")]
    assert warning == [
        f"pmu: uprobe:{other}:f001: never armed: no traced process mapped {other}; they mapped {lib} instead"
    ]
    r = run_pmu("stat", "-x,", "-e", f"uprobe:{lib}:f001", "--", exe, "1")
    assert not [line for line in r.stderr.splitlines() if line.startswith("pmu: ")], r.stderr
