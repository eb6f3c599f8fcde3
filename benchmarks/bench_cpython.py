"""Benchmark: 16 hot functions of the CPython binary, counted by `pmu stat` and by `perf stat` on kernel
uprobes at the same file offsets, in one run (issue 11, acceptance 1).

The workload is a Python script that builds dicts, strings, lists and tuples (about 2 M hits of the 16
functions), run with a fixed environment (`env -i PYTHONHASHSEED=0`) so that every run makes the same
calls. Each tool's run is timed whole (wall clock, median of R runs, the repetitions going round the
tools in turn); every count of pmu's must equal perf's, and pmu -v must say each probe is optimized.

Prints a table; with --results, replaces (or appends) the "## CPython" section of that Markdown file
and leaves the rest. A measurement, not a test: it exits 0 whatever it finds.

    .venv/bin/python benchmarks/bench_cpython.py [--quick] [--repeat R] [--results FILE.md]
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shlex
import statistics
import sys
from collections.abc import Iterator, Sequence

from bench_stat import (
    ROOT,
    BenchError,
    bench_arguments,
    commands_block,
    csv_count,
    log,
    machine,
    run,
    update_results,
    uprobe_events_file,
    write_probe_line,
)

sys.path.insert(0, str(ROOT))
from pmu.events.spec import parse_event  # noqa: E402  (pmu from this checkout)
from pmu.events.symbols import resolve_probe  # noqa: E402

SECTION = "## CPython: 16 hot functions against perf stat"
PYTHON = "/usr/bin/python3.11"
FUNCTIONS = [
    *("PyObject_Malloc", "PyObject_Free", "PyObject_Hash", "PyMem_Malloc", "PyObject_GC_Del"),
    *("_PyEval_EvalFrameDefault", "PyLong_FromLong", "PyObject_GetAttr", "PyUnicode_New", "PyTuple_New"),
    *("PyList_Append", "PyObject_RichCompare", "PyNumber_Add", "PyDict_SetItem", "PyObject_Call"),
    "PyMem_Free",
]
SCRIPT = """
d = {}
for i in range(ROUNDS):
    d[i] = str(i); l = [i]; l.append(i + 1); t = (i, i); h = hash(t); s = i + 1.5
"""
GROUP = "pmubenchpy"


def workload(rounds: int) -> list[str]:
    return ["env", "-i", "PYTHONHASHSEED=0", PYTHON, "-c", SCRIPT.replace("ROUNDS", str(rounds))]


def kernel_name(function: str) -> str:
    return "p" + re.sub(r"[^A-Za-z0-9]", "", function)


@contextlib.contextmanager
def kernel_probes() -> Iterator[list[str]]:
    """p:pmubenchpy/NAME at each function's file offset; always removed again."""
    events = uprobe_events_file()
    defined = []
    try:
        for f in FUNCTIONS:
            probe = resolve_probe(parse_event(f"uprobe:{PYTHON}:{f}"), PYTHON)
            name = kernel_name(f)
            with contextlib.suppress(OSError):
                write_probe_line(events, f"-:{GROUP}/{name}")
            write_probe_line(events, f"p:{GROUP}/{name} {probe.path}:{probe.file_offset:#x}")
            defined.append(name)
        yield [f"{GROUP}:{n}" for n in defined]
    finally:
        for name in defined:
            with contextlib.suppress(OSError):
                write_probe_line(events, f"-:{GROUP}/{name}")


def counts(stderr: str, prefix: str, names: Sequence[str]) -> dict[str, int]:
    return {n: csv_count(stderr, f"{prefix}{n}") for n in names}


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_arguments(__doc__ or "", SECTION, 5, False, argv)
    if not os.path.exists(PYTHON):
        raise SystemExit(f"bench: {PYTHON} is not installed")
    rounds = 50_000 if args.quick else 200_000
    command = workload(rounds)
    pmu = [sys.executable, "-m", "pmu", "stat", "-v", "-x,"]
    for f in FUNCTIONS:
        pmu += ["-e", f"uprobe:{PYTHON}:{f}"]
    times: dict[str, list[float]] = {"script alone": [], "perf stat (kernel uprobes)": [], "pmu stat": []}
    checked = ""
    hits = 0
    with kernel_probes() as kernel:
        perf = ["perf", "stat", "-x,", *(a for k in kernel for a in ("-e", k))]
        for rep in range(args.repeat):
            log(f"repetition {rep + 1} of {args.repeat}")
            t, _ = run(command)
            times["script alone"].append(t)
            t, done = run([*perf, "--", *command])
            times["perf stat (kernel uprobes)"].append(t)
            theirs = {f: csv_count(done.stderr, f"{GROUP}:{kernel_name(f)}") for f in FUNCTIONS}
            t, done = run([*pmu, "--", *command])
            times["pmu stat"].append(t)
            ours = {f: csv_count(done.stderr, f"uprobe:{PYTHON}:{f}") for f in FUNCTIONS}
            slow = [f for f in FUNCTIONS if f"pmu: uprobe:{PYTHON}:{f}: optimized" not in done.stderr]
            if slow:
                raise BenchError(f"not optimized: {', '.join(slow)}")
            if ours != theirs:
                diff = {f: (ours[f], theirs[f]) for f in FUNCTIONS if ours[f] != theirs[f]}
                raise BenchError(f"counts differ from perf's (pmu, perf): {diff}")
            hits = sum(ours.values())
            log(f"  {hits:,} hits, equal in both")
        checked = f"all 16 equal to perf's in all {args.repeat} runs ({hits:,} hits a run); all optimized"
    med = {k: statistics.median(v) for k, v in times.items()}
    bare = med["script alone"]
    lines = [
        "| tool | median s | min-max s | minus the script s | ns per hit over the script |",
        "|---|---|---|---|---|",
    ]
    for k, v in times.items():
        over = med[k] - bare
        per = "-" if k == "script alone" else f"{over / hits * 1e9:.0f}"
        lines.append(f"| {k} | {med[k]:.3f} | {min(v):.3f}-{max(v):.3f} | {over:.3f} | {per} |")
    ratio = med["pmu stat"] / med["perf stat (kernel uprobes)"]
    verdict = f"pmu stat's wall time is {ratio:.3g} of perf stat's ({'PASS' if ratio < 1 else 'FAIL'}: below)"
    print("\n".join(lines))
    print(verdict)
    print(checked)
    if args.results is not None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        shown = " ".join(shlex.quote(a) for a in command[:4]) + " -c SCRIPT"
        text = "\n".join(
            [
                SECTION,
                "",
                "Written by `benchmarks/bench_cpython.py --results benchmarks/RESULTS.md`, which replaces "
                "only this section.",
                "",
                f"- date: {now}",
                f"- machine: {machine()}",
                f"- method: wall-clock time of whole runs, median of {args.repeat}, the repetitions going "
                f"round the tools in turn; the 16 functions: {', '.join(FUNCTIONS)}",
                f"- checked: {checked}",
                "",
                *lines,
                "",
                f"- **{verdict}**",
                "- pmu's time includes its start-up (Python and its imports, about 0.4-0.7 s here: see the "
                "pmu stat -a section); the hits cost it a few ns each, a kernel uprobe about 2 µs",
                "",
                *commands_block(
                    [
                        f"SCRIPT='{SCRIPT.replace('ROUNDS', str(rounds)).strip()}'",
                        f"echo 'p:{GROUP}/NAME {PYTHON}:OFFSET' >> /sys/kernel/tracing/uprobe_events",
                        f"perf stat -x, -e {GROUP}:NAME ... -- {shown}",
                        f"python -m pmu stat -v -x, -e uprobe:{PYTHON}:FUNCTION ... -- {shown}",
                    ]
                ),
                "",
            ]
        )
        update_results(args.results, SECTION, text)
        print(f"wrote the {SECTION!r} section of {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
