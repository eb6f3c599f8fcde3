"""Stripped binaries probe by name from their debug symbols, found as gdb finds them: a separate debug
file named by .gnu_debuglink (next to the binary) or by build ID under /usr/lib/debug, and
MiniDebugInfo (.gnu_debugdata, an xz-compressed symbol table inside the binary)."""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pmu.events.symbols import DEBUG_ROOT, resolve_target
from tests.conftest import TARGETS, run_pmu, stat_counts

pytestmark = pytest.mark.skipif(shutil.which("objcopy") is None, reason="needs binutils' objcopy")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _stripped_hot(tmp_path: Path) -> tuple[Path, Path]:
    exe, debug = tmp_path / "hot", tmp_path / "hot.debug"
    _run("gcc", "-O1", "-g", "-o", str(exe), str(TARGETS / "hot.c"))
    _run("objcopy", "--only-keep-debug", str(exe), str(debug))
    _run("strip", "--strip-all", str(exe))
    return exe, debug


def _counts(exe: Path) -> dict[str, int]:
    r = run_pmu("stat", "-x,", "-e", "uprobe:work", "-e", "uprobe:work2", "--", str(exe), "3000")
    assert r.returncode == 0, r.stderr
    return stat_counts(r.stderr)


def test_stripped_binary_without_symbols_says_so(tmp_path):
    exe, _ = _stripped_hot(tmp_path)
    r = run_pmu("stat", "-e", "uprobe:work", "--", str(exe), "10")
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_gnu_debuglink_next_to_the_binary(tmp_path):
    exe, debug = _stripped_hot(tmp_path)
    _run("objcopy", f"--add-gnu-debuglink={debug}", str(exe))
    assert _counts(exe) == {"uprobe:work": 3000, "uprobe:work2": 1500}
    r = run_pmu("list", str(exe), "work*")
    assert r.stdout.split() == ["work", "work2"]


def test_debuglink_with_a_wrong_crc_is_not_used(tmp_path):
    exe, debug = _stripped_hot(tmp_path)
    _run("objcopy", f"--add-gnu-debuglink={debug}", str(exe))
    debug.write_bytes(debug.read_bytes() + b"\0")  # no longer the file the link names
    r = run_pmu("stat", "-e", "uprobe:work", "--", str(exe), "10")
    assert r.returncode == 2


def test_minidebuginfo(tmp_path):
    exe, debug = _stripped_hot(tmp_path)
    mini = tmp_path / "mini"
    _run("objcopy", "--strip-debug", str(debug), str(mini))  # the symbol table, no DWARF
    packed = tmp_path / "mini.xz"
    packed.write_bytes(lzma.compress(mini.read_bytes()))
    _run("objcopy", f"--add-section=.gnu_debugdata={packed}", str(exe))
    assert _counts(exe) == {"uprobe:work": 3000, "uprobe:work2": 1500}


def test_libc_local_functions_from_its_build_id_debug_file():
    """Debian's libc6-dbg: libc's local functions (the IFUNC implementations) probe by name."""
    libc = resolve_target("libc", None, [])
    out = subprocess.run(["readelf", "-n", libc], capture_output=True, text=True).stdout
    build_id = next((line.split()[-1] for line in out.splitlines() if "Build ID" in line), "")
    if not os.path.exists(os.path.join(DEBUG_ROOT, ".build-id", build_id[:2], build_id[2:] + ".debug")):
        pytest.skip("no debug file of libc (apt install libc6-dbg)")
    r = run_pmu("list", "libc", "__memmove_avx*unaligned_erms")
    assert "__memmove_avx_unaligned_erms" in r.stdout.split()
    r = run_pmu("stat", "-x,", "-e", "uprobe:libc:__memmove_avx_unaligned_erms", "--", "true")
    assert r.returncode == 0, r.stderr
