"""A Go program, built by the test: entry probes count (jump-optimized), return probes are refused in one
line in both engines, since goroutine stacks move as they grow and cannot carry a hijacked return
address (kernel uretprobes crash Go programs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import NO_OPTIMIZE, TARGETS, run_pmu, stat_counts

pytestmark = pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain (apt install golang-go)")


@pytest.fixture(scope="module")
def gowork(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("go")
    exe = out / "gowork"
    env = {**os.environ, "GOCACHE": str(out / "cache"), "GOPATH": str(out / "gopath"), "GO111MODULE": "off"}
    subprocess.run(["go", "build", "-o", exe, TARGETS / "gowork.go"], check=True, env=env, cwd=out)
    return exe


def test_entry_probes_count_in_a_go_program(gowork: Path) -> None:
    r = run_pmu("stat", "-v", "-x,", "-e", "uprobe:main.work", "--", gowork, "100000")
    assert r.returncode == 0, r.stderr
    assert "work called 100000 times" in r.stdout
    assert stat_counts(r.stderr) == {"uprobe:main.work": 100_000}
    assert ("int3" if NO_OPTIMIZE else "optimized (jump patch") in r.stderr


@pytest.mark.parametrize("engine", ["ptrace", "kernel"])
def test_return_probes_are_refused_in_a_go_program(gowork: Path, engine: str) -> None:
    r = run_pmu("stat", "--engine", engine, "-x,", "-e", "uretprobe:main.work", "--", gowork, "10")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "is a Go program" in r.stderr and "uprobe:" in r.stderr
    assert "work called" not in r.stdout  # refused before anything ran
