"""Benchmark: `pmu stat -a` against `perf stat -a`, both on a kernel uprobe at the same file offset.

With -a pmu serves a uprobe by the kernel's uprobe PMU (perf_event_open, one event per CPU), as perf stat
does with a probe defined in uprobe_events: a hit costs the kernel's uprobe handling in both, and pmu must
add nothing to it. Two parts, measured in one run, the repetitions going round every row in turn:

- start-up: wall-clock time of `TOOL stat -a -e PROBE -- true`, median of R runs, minus that of `true`
  itself; pmu's row set beside the start of its interpreter (`python -c pass`) and of its command line
  (`python -m pmu --help`), which bound what pmu's own work can be.
- per hit: the workload is two processes at once (`sh -c "hot K & hot K; wait"`, K = N/2: tests/targets/
  hot.c calls `work` K times), started during the run on this machine's CPUs; cost per hit is the slope
  between two sizes, (t(N2) - t(N1)) / (N2 - N1) on the medians, minus the slope of the workload
  without a tool. Both tools' counts must equal N (the kernel may count a call twice now and then, within
  bench_stat.py's slack), and pmu -v must say the kernel's uprobe PMU serves the event.

Prints a table and the ratios; with --results, replaces (or appends) the "## pmu stat -a" section of
that Markdown file and leaves the rest. It is a measurement, not a test: it exits 0 whatever it finds.

    .venv/bin/python benchmarks/bench_system_wide.py [--quick] [--repeat R] [--results FILE.md]
"""

from __future__ import annotations

import datetime
import re
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench_stat import (
    CC_FLAGS,
    KERNEL_SLACK,
    KERNEL_SLACK_NOTE,
    PROBE,
    SYMBOL,
    BenchError,
    Completed,
    Row,
    Tool,
    bench_arguments,
    commands_block,
    compile_target,
    csv_count,
    excess_note,
    file_offset,
    kernel_probe,
    log,
    machine,
    measure_rounds,
    overheads,
    run,
    shell_word,
    update_results,
)

SECTION = "## pmu stat -a: system-wide counting against perf stat -a"
PMU = "pmu stat -a"
PERF = "perf stat -a (kernel uprobe)"
BASELINE = "workload alone"
KERNEL_ENGINE = "the kernel's uprobe PMU"
"""What `pmu stat -v` says of an event the kernel's uprobe PMU serves."""
PROCESSES = 2


def workload(hot: str, n: str) -> list[str]:
    """PROCESSES copies of hot at once, N calls of work in all (N/PROCESSES each; N placeholder kept)."""
    each = str(int(n) // PROCESSES) if n.isdigit() else f"{n}/{PROCESSES}"
    word = hot if hot.startswith("$") else shlex.quote(hot)
    copies = " & ".join([f"{word} {each}"] * PROCESSES)
    return ["sh", "-c", f"{copies}; wait"]


def pmu_count(done: Completed) -> int:
    """pmu stat -x,'s count of the probe; -v's line must say the kernel's uprobe PMU serves it."""
    engine = re.search(r"^pmu: uprobe:\S+: (.*)$", done.stderr, re.MULTILINE)
    if engine is None or not engine.group(1).startswith(KERNEL_ENGINE):
        said = engine.group(1) if engine else done.stderr.strip()[-200:]
        raise BenchError(f"pmu -v does not say {KERNEL_ENGINE!r} serves the probe: {said!r}")
    return csv_count(done.stderr, "uprobe:")


def build_tools(hot: str, scale: float) -> list[Tool]:
    n1, n2 = int(4_000 * scale) * PROCESSES, int(100_000 * scale) * PROCESSES
    pmu = [sys.executable, "-m", "pmu", "stat", "-a", "-v", "-x,", "-e", f"uprobe:{hot}:{SYMBOL}", "--"]
    perf = ["perf", "stat", "-a", "-x,", "-e", PROBE.replace("/", ":"), "--"]
    return [
        Tool(BASELINE, n1, n2, lambda h, n: workload(h, n), baseline=None),  # the slope subtracted
        Tool(
            PMU,
            n1,
            n2,
            lambda h, n: [*pmu, *workload(h, n)],
            baseline=BASELINE,
            count=pmu_count,
            slack=KERNEL_SLACK,
            note="counts with the kernel's uprobe PMU at work's file offset, one event per CPU. "
            + KERNEL_SLACK_NOTE,
        ),
        Tool(
            PERF,
            n1,
            n2,
            lambda h, n: [*perf, *workload(h, n)],
            count=lambda done: csv_count(done.stderr, PROBE.split("/")[0]),
            baseline=BASELINE,
            context=lambda: kernel_probe(hot),
            slack=KERNEL_SLACK,
            note="the probe p:pmubench/work defined in uprobe_events at work's file offset",
        ),
    ]


@dataclass
class StartUp:
    """Wall-clock seconds of R runs of a command that does (next to) nothing."""

    name: str
    argv: list[str]
    context: Callable[[], object] | None = None
    times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def start_up_rows(hot: str) -> list[StartUp]:
    probe = f"uprobe:{hot}:{SYMBOL}"
    return [
        StartUp("true", ["true"]),
        StartUp(PERF, ["perf", "stat", "-a", "-x,", "-e", PROBE.replace("/", ":"), "--", "true"]),
        StartUp(PMU, [sys.executable, "-m", "pmu", "stat", "-a", "-x,", "-e", probe, "--", "true"]),
        StartUp("python -c pass (context)", [sys.executable, "-c", "pass"]),
        StartUp("python -m pmu --help (context)", [sys.executable, "-m", "pmu", "--help"]),
    ]


def measure_start_up(rows: list[StartUp], hot: str, repeat: int) -> None:
    """R rounds over all rows; perf's rows run with the probe defined."""
    with kernel_probe(hot):
        for _ in range(repeat):
            for row in rows:
                if row.error is not None:
                    continue
                try:
                    elapsed, _ = run(row.argv)
                    row.times.append(elapsed)
                except BenchError as err:
                    row.error = str(err)
                    log(f"  {row.name}: FAILED: {err}")


def measure_hits(tools: list[Tool], hot: str, repeat: int) -> list[Row]:
    """bench_stat.measure_rounds (one repetition of every tool at a time), with each row's check."""
    rows = measure_rounds(tools, {"hot": hot}, repeat)
    for row in rows:
        if row.error is None and row.tool.count is not None:
            row.checked = f"= N in all {2 * repeat} runs" + excess_note(row.excess)
        elif row.error is None:
            row.checked = "not reported"
    return rows


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def start_up_table(rows: list[StartUp]) -> str:
    base = next((r.median for r in rows if r.name == "true" and r.error is None), 0.0)
    perf = next((r.median - base for r in rows if r.name == PERF and r.error is None), None)
    lines = [
        "| command | median ms | min-max ms | minus `true` ms | ratio to perf stat -a |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error is not None:
            lines.append(f"| {r.name} | FAILED: {r.error} | | | |")
            continue
        own = r.median - base
        ratio = "-" if perf is None or r.name == "true" else f"{own / perf:.3g}"
        lines.append(
            f"| {r.name} | {ms(r.median)} | {ms(min(r.times))}-{ms(max(r.times))} | "
            f"{'-' if r.name == 'true' else ms(own)} | {ratio} |"
        )
    return "\n".join(lines)


def hits_table(rows: list[Row]) -> str:
    over = overheads(rows)
    perf = over.get(PERF)
    lines = [
        "| tool | N1 | N2 | median t(N1) s | median t(N2) s | t(N2) min-max s | µs/hit raw | overhead µs/hit "
        "| CPU µs/hit | ratio to perf stat -a | hits checked |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.tool
        if r.error is not None:
            lines.append(f"| {t.name} | {t.n1:,} | {t.n2:,} | FAILED: {r.error} | | | | | | | |")
            continue
        o = over.get(t.name)
        cells = [
            t.name,
            f"{t.n1:,}",
            f"{t.n2:,}",
            f"{statistics.median(r.t1):.3f}",
            f"{statistics.median(r.t2):.3f}",
            f"{min(r.t2):.2f}-{max(r.t2):.2f}",
            f"{r.slope * 1e6:.3g}",
            "-" if o is None else f"{o * 1e6:.3g}",
            f"{r.cpu_slope * 1e6:.3g}",
            "-" if o is None or not perf else f"{o / perf:.3g}",
            r.checked,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(starts: list[StartUp], rows: list[Row]) -> list[str]:
    out = []
    ok = {r.name: r.median for r in starts if r.error is None}
    if {"true", PMU, PERF} <= ok.keys():
        pmu, perf = ok[PMU] - ok["true"], ok[PERF] - ok["true"]
        out.append(
            f"start-up: pmu stat -a takes {ms(pmu)} ms, perf stat -a {ms(perf)} ms ({pmu / perf:.3g} x)"
        )
        if "python -m pmu --help (context)" in ok:
            own = ok[PMU] - ok["python -m pmu --help (context)"]
            out.append(
                f"start-up: of pmu's, {ms(ok['python -m pmu --help (context)'] - ok['true'])} ms is the "
                f"interpreter and pmu's command line (`--help`), {ms(own)} ms opening the events and the run"
            )
    over = overheads(rows)
    if PMU in over and PERF in over and over[PERF]:
        out.append(
            f"per hit: pmu stat -a {over[PMU] * 1e6:.3g} µs, perf stat -a {over[PERF] * 1e6:.3g} µs "
            f"(ratio {over[PMU] / over[PERF]:.3g}): both are the kernel's uprobe cost; pmu adds nothing "
            "per hit when the ratio is 1 within the runs' spread"
        )
    return out


def shown(argv: list[str], tmp: str) -> str:
    """argv as a shell line, with python for this interpreter and $TMP/$HOT for the scratch build."""
    words = [("python" if a == sys.executable else a.replace(f"{tmp}/hot", "$HOT")) for a in argv]
    return " ".join(shell_word(w) for w in words)


def section(starts: list[StartUp], rows: list[Row], tools: list[Tool], repeat: int, tmp: str) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commands = [f"gcc {shlex.join(CC_FLAGS)} -o $HOT tests/targets/hot.c"]
    commands.append(f"echo 'p:{PROBE} '$HOT:OFFSET >> /sys/kernel/tracing/uprobe_events")
    for s in starts:
        commands.append(shown(s.argv, tmp))
    for t in tools:
        commands.append(f"{shown(t.argv('$HOT', 'N'), tmp)}   # N in ({t.n1}, {t.n2})")
    commands.append(f"echo '-:{PROBE}' >> /sys/kernel/tracing/uprobe_events")
    notes = [f"- {t.name}: {t.note}" for t in tools if t.note]
    return "\n".join(
        [
            SECTION,
            "",
            "Written by `benchmarks/bench_system_wide.py --results benchmarks/RESULTS.md`, which replaces "
            "only this section.",
            "",
            f"- date: {now}",
            f"- machine: {machine()}",
            f"- method: median wall-clock time of {repeat} runs per row and size, the repetitions going "
            "round all rows in turn. Start-up: `TOOL -- true` minus `true`. Per hit: the workload is "
            f"{PROCESSES} processes of tests/targets/hot.c at once, N calls of `work` in all; cost per hit = "
            "(t(N2) - t(N1)) / (N2 - N1) minus the workload's own slope; CPU µs/hit is the same slope of "
            "user + system time of the tool and everything it waited for.",
            "",
            "### Start-up",
            "",
            start_up_table(starts),
            "",
            "### Per hit",
            "",
            hits_table(rows),
            "",
            *[f"- **{line}**" for line in findings(starts, rows)],
            "",
            *commands_block(commands),
            "",
            "### Notes",
            "",
            *notes,
            "- OFFSET = work's file offset: vaddr - PT_LOAD p_vaddr + p_offset; pmu computes the same offset "
            "from its own symbol resolution (pmu -v names it)",
            "- where pmu's start-up goes: Python and the imports of pmu's command line (numpy, capstone, "
            "pyelftools: the `--help` row), then the run, where closing a uprobe event waits for the kernel "
            "to unregister it (about 60 ms, perf stat alike: strace -T shows one such close in perf's run); "
            "pmu closes its per-CPU descriptors side by side and reuses the one its event check opened. Fast "
            "start (lazy imports) is issue 13's",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_arguments(__doc__ or "", SECTION, 5, False, argv)
    with tempfile.TemporaryDirectory(prefix="pmu-bench-") as tmpdir:
        hot = str(Path(tmpdir) / "hot")
        compile_target(Path(hot), CC_FLAGS)
        log(f"work at file offset {file_offset(hot, SYMBOL):#x}")
        starts = start_up_rows(hot)
        log("start-up:")
        measure_start_up(starts, hot, args.repeat)
        tools = build_tools(hot, 0.25 if args.quick else 1.0)
        rows = measure_hits(tools, hot, args.repeat)
        text = section(starts, rows, tools, args.repeat, tmpdir)
    print(start_up_table(starts))
    print()
    print(hits_table(rows))
    print()
    for line in findings(starts, rows):
        print(line)
    if args.results is not None:
        update_results(args.results, SECTION, text)
        print(f"wrote the {SECTION!r} section of {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
