"""pmu's counts equal perf stat's with kernel uprobes at the same file offsets (root and perf needed)."""

from __future__ import annotations

import os
import shutil

import pytest

from pmu.events.spec import parse_event
from pmu.events.symbols import resolve_probe, resolve_target
from tests.conftest import NO_OPTIMIZE, run_pmu, stat_counts

SQL = (
    "create table t(x); "
    + " ".join(f"insert into t values ({i});" for i in range(50))
    + " select count(*), sum(x) from t; select * from t where x > 40;"
)


def _offset(event: str, exe: str | None = None) -> tuple[str, int]:
    spec = parse_event(event)
    path = resolve_target(spec.target, exe)
    probe = resolve_probe(spec, path)
    return probe.path, probe.file_offset


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="sqlite3 is not installed")
def test_sqlite3_step_equals_perf(kernel_uprobes):
    event = "uprobe:libsqlite3:sqlite3_step"
    path, off = _offset(event)
    kname = kernel_uprobes.add("sqlite3_step", path, off)
    argv = ["sqlite3", ":memory:", SQL]
    perf = kernel_uprobes.stat([kname], argv)
    r = run_pmu("stat", "-x,", "-e", event, "--", *argv)
    assert r.returncode == 0, r.stderr
    ours = stat_counts(r.stderr)
    assert perf[kname] > 50
    assert ours == {event: perf[kname]}


def test_threads_equal_perf(build, kernel_uprobes):
    mt = str(build("mt"))
    path, off = _offset("uprobe:work", mt)
    kname = kernel_uprobes.add("mt_work", path, off)
    perf = kernel_uprobes.stat([kname], [mt, "4", "500"])
    r = run_pmu("stat", "-x,", "-e", "uprobe:work", "--", mt, "4", "500")
    assert stat_counts(r.stderr) == {"uprobe:work": perf[kname]} == {"uprobe:work": 5000}


PYTHON = "/usr/bin/python3.11"
CPYTHON = [
    *("PyObject_Malloc", "PyObject_Free", "PyObject_Hash", "PyMem_Malloc", "PyObject_GC_Del"),
    *("_PyEval_EvalFrameDefault", "PyLong_FromLong", "PyObject_GetAttr", "PyUnicode_New", "PyTuple_New"),
    *("PyList_Append", "PyObject_RichCompare", "PyNumber_Add", "PyDict_SetItem", "PyObject_Call"),
    "PyMem_Free",
]
"""The hot functions of CPython on a script that builds dicts, strings, lists and tuples (issue 11: the
tail calls through function pointers among them used to keep them on int3)."""
SCRIPT = """
d = {}
for i in range(ROUNDS):
    d[i] = str(i); l = [i]; l.append(i + 1); t = (i, i); h = hash(t); s = i + 1.5
"""


@pytest.mark.skipif(not os.path.exists(PYTHON), reason=f"{PYTHON} is not installed")
def test_cpython_hot_functions_equal_perf(kernel_uprobes):
    """16 hot functions of the CPython binary: every one jump-optimized (-v), every count equal to a
    kernel uprobe's at the same offset, on the same deterministic script (PYTHONHASHSEED=0)."""
    rounds = 3000 if NO_OPTIMIZE else 30000
    # The same environment for both, whoever runs them: its size and order change CPython's allocations.
    argv = ["env", "-i", "PYTHONHASHSEED=0", PYTHON, "-c", SCRIPT.replace("ROUNDS", str(rounds))]
    events = {f"uprobe:{PYTHON}:{f}": f for f in CPYTHON}
    names = {e: kernel_uprobes.add(f"py_{f.strip('_')}", *_offset(e)) for e, f in events.items()}
    perf = kernel_uprobes.stat(list(names.values()), argv)
    r = run_pmu("stat", "-v", "-x,", *[a for e in events for a in ("-e", e)], "--", *argv)
    assert r.returncode == 0, r.stderr
    if not NO_OPTIMIZE:
        for e in events:
            assert f"pmu: {e}: optimized (jump patch" in r.stderr, r.stderr
    ours = stat_counts(r.stderr)
    assert ours == {e: perf[k] for e, k in names.items()}
    assert sum(ours.values()) > 10 * rounds
