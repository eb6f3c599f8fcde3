"""`pmu list TARGET [PATTERN]` as a user runs it: exit status, stdout, and one-line errors on stderr."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ROOT / "tests" / "targets"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def pmu(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pmu", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr == f"pmu: {message}\n"


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("list") / "funcs")
    subprocess.run(["gcc", "-O1", "-o", path, str(TARGETS / "sym_funcs.c")], check=True)
    return path


def test_lists_every_function_sorted(exe: str) -> None:
    result = pmu("list", exe)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    names = result.stdout.splitlines()
    assert names == sorted(set(names))
    assert {"main", "work", "work2", "helper", "_ZN3foo3barEv", "fast", "sym_notype"} <= set(names)
    assert "printf" not in names  # imported, not defined


def test_pattern(exe: str) -> None:
    result = pmu("list", exe, "work*")
    assert (result.returncode, result.stdout, result.stderr) == (0, "work\nwork2\n", "")


def test_pattern_matching_nothing_prints_nothing(exe: str) -> None:
    result = pmu("list", exe, "no_such_function*")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_relative_path(exe: str) -> None:
    result = pmu("list", "./funcs", "work", cwd=os.path.dirname(exe))
    assert (result.returncode, result.stdout) == (0, "work\n")


def test_library_short_name() -> None:
    if not os.path.exists(LIBC):
        pytest.skip(f"no {LIBC}")
    result = pmu("list", "libc", "mall*")
    assert result.returncode == 0, result.stderr
    assert "malloc" in result.stdout.splitlines()
    assert all(name.startswith("mall") for name in result.stdout.splitlines())


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope")
    assert_one_line_error(pmu("list", path), f"no such file: {path}")


def test_not_an_elf_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    assert_one_line_error(pmu("list", str(path)), f"not an ELF file: {path}")


def test_truncated_elf_file(exe: str, tmp_path: Path) -> None:
    path = tmp_path / "cut"
    path.write_bytes(Path(exe).read_bytes()[:2000])
    result = pmu("list", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"pmu: not an ELF file: {path} (")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_unknown_library() -> None:
    assert_one_line_error(
        pmu("list", "libfoo_pmu_nonexistent"),
        "unknown library 'libfoo_pmu_nonexistent': not mapped by the process, not in the ld.so cache",
    )


def test_bare_file_name_hints_at_the_path(exe: str) -> None:
    assert_one_line_error(
        pmu("list", "funcs", cwd=os.path.dirname(exe)),
        "unknown library 'funcs': not mapped by the process, not in the ld.so cache "
        "(for the file in the current directory, write ./funcs)",
    )


def test_without_target_lists_the_counters_as_perf_list() -> None:
    result = pmu("list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "  cpu-cycles OR cycles" + " " * 31 + "[Hardware event]" in lines
    assert any(
        line.startswith("  context-switches OR cs ") and line.endswith("[Software event]") for line in lines
    )
    # every name listed is one pmu stat takes
    perf = subprocess.run(["perf", "list", "sw"], capture_output=True, text=True).stdout
    for name in ("task-clock", "page-faults", "cpu-migrations", "major-faults", "minor-faults"):
        assert name in result.stdout and name in perf


def test_closed_pipe_is_not_an_error() -> None:
    if not os.path.exists(LIBC):
        pytest.skip(f"no {LIBC}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pmu", "list", "libc"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # like `pmu list libc | head -1`
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert stderr == ""


def test_verbose_says_of_each_entry_what_stat_would_use(build):
    """`pmu list -v`: each function with whether a probe at its entry is jump-optimized, or why not, as
    `pmu stat -v` says when it probes them (the reasons' labels agree; addresses are the file's)."""
    exe = str(build("reloc"))
    listed = pmu("list", "-v", exe, "f_*")
    assert listed.returncode == 0, listed.stderr
    how = {name: rest.strip() for name, rest in (line.split(None, 1) for line in listed.stdout.splitlines())}
    assert how["f_riprel"] == "optimized"
    assert (
        how["f_jmp"].startswith("int3 (not optimized: cannot place a jump at")
        and "(past-symbol-end)" in how["f_jmp"]
    )
    events = [a for name in ("f_jmp", "f_riprel") for a in ("-e", f"uprobe:{name}")]
    r = pmu("stat", "-v", "-x,", *events, "--", exe, "20")
    assert r.returncode == 0, r.stderr
    assert "pmu: uprobe:f_riprel: optimized" in r.stderr
    assert "(past-symbol-end)" in next(
        line for line in r.stderr.splitlines() if line.startswith("pmu: uprobe:f_jmp:")
    )
    plain = pmu("list", exe, "f_*")
    assert plain.stdout.split() == list(how)  # -v adds to the names, in the same order
