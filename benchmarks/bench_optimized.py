"""Benchmark: the acceptance of jump-optimized probes, side by side in one run.

pmu's default engine replaces the probed function's first bytes by a jmp to a trampoline inside the
traced process, which counts the hit per thread in shared memory: no ptrace stop per hit. Three parts:

- counting: `pmu stat` (optimized) on `work` in tests/targets/hot.c (`hot N` calls it N times) against a
  kernel uprobe at the same file offset counted by `perf stat` (target: pmu <= 1/300 of its cost per
  hit) and against `uftrace record -P work`, which patches the function at run time (target: pmu <= 1/20),
  and at most 3 ns a hit.
- threads: `pmu stat --per-thread` on tests/targets/mt.c with four threads on this machine's CPUs
  (`mt 4 K`: thread i calls work i*K times, 10K in all) against one thread with the same total
  (`mt 1 10K`): the cost per hit with four threads must be no worse than with one.
- recording: `pmu record` (optimized: the trampoline also appends a record per hit to a ring in the
  process, which pmu converts and writes to Parquet while the program runs) against `uftrace record`
  (target: pmu <= 1/2, Parquet writing included, with no record lost).

The method is bench_stat.py's: cost per hit is the slope between two run sizes, (t(N2) - t(N1)) /
(N2 - N1) on the median wall-clock time of R runs each, minus the slope of the uninstrumented program
(the same build, same sizes); the R repetitions go round all tools in turn. Every pmu run has -v and the
engine it names is checked (the counting and thread rows must be "optimized"). Counts must equal N
exactly: pmu stat's count, per thread pmu stat's count against the program's own `tid=... calls=...`
lines, pmu record's Parquet rows + lost, perf stat's count, uftrace report's calls (read back untimed).

Prints a table and PASS/FAIL verdicts with the ratios; with --results, replaces (or appends) the
"## Jump-optimized probes" section of that Markdown file and leaves the rest. It is a measurement, not a
test: it exits 0 whatever the verdicts.

    .venv/bin/python benchmarks/bench_optimized.py [--quick] [--repeat R] [--only NAMES] [--results FILE.md]
"""

from __future__ import annotations

import datetime
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench_record import Readback, base_name, counter, pmu_rows, remover, uftrace_calls
from bench_stat import (
    CC_FLAGS,
    CC_FLAGS_FENTRY,
    KERNEL_SLACK,
    KERNEL_SLACK_NOTE,
    PROBE,
    ROOT,
    SYMBOL,
    BenchError,
    Completed,
    Row,
    Tool,
    bench_arguments,
    chosen,
    commands,
    commands_block,
    compile_hot,
    compile_target,
    csv_count,
    excess_note,
    file_offset,
    kernel_probe,
    machine,
    measure_rounds,
    overheads,
    pmu_argv,
    run,
    update_results,
)

SECTION = "## Jump-optimized probes"
MT_SOURCE = ROOT / "tests" / "targets" / "mt.c"
CC_FLAGS_MT = [*CC_FLAGS, "-pthread"]
THREADS = 4
"""mt's thread i (1-based) calls work i*K times: 1+2+3+4 = 10 K in all."""
MT_SHARE = THREADS * (THREADS + 1) // 2

PMU = "pmu stat (optimized)"
KERNEL = "kernel uprobe (perf stat)"
UFTRACE = "uftrace record"
PMU_MT1 = "pmu stat (optimized), mt 1 thread"
PMU_MT4 = f"pmu stat (optimized), mt {THREADS} threads"
BASE_MT1 = "baseline mt 1 thread"
BASE_MT4 = f"baseline mt {THREADS} threads"
RECORD = "pmu record"
RECORD_PAGES = 65536
"""pmu record's -m for the recording rows: 256 MiB, 2 Mi records: N2 fits, so no record can be lost."""

PARTS = {
    "baseline": "counting",
    PMU: "counting",
    KERNEL: "counting",
    "baseline (fentry build)": "counting",
    UFTRACE: "counting, recording",
    BASE_MT1: "threads",
    PMU_MT1: "threads",
    BASE_MT4: "threads",
    PMU_MT4: "threads",
    RECORD: "recording",
}


# ------------------------------------------------------------------------------------------ read-backs


def thread_counts(done: Completed) -> int:
    """The total of `pmu stat --per-thread -x,`'s lines (COMM-TID,COUNT,,EVENT,...), after checking that
    each thread's count equals the `tid=TID calls=CALLS` line mt printed for it."""
    pmu: dict[int, int] = {}
    for line in done.stderr.splitlines():
        fields = line.split(",")
        if len(fields) >= 4 and fields[3].startswith("uprobe:") and fields[1].isdigit():
            tid = fields[0].rpartition("-")[2]
            if not tid.isdigit():
                raise BenchError(f"no thread id in per-thread line {line!r}")
            pmu[int(tid)] = pmu.get(int(tid), 0) + int(fields[1])
    own: dict[int, int] = {}
    for line in done.stdout.splitlines():
        words = dict(w.split("=", 1) for w in line.split() if "=" in w)
        if "tid" in words and "calls" in words:
            own[int(words["tid"])] = int(words["calls"])
    if not own:
        raise BenchError(f"no tid=... calls=... lines from mt: {done.stdout.strip()[-200:]!r}")
    hit = {tid: n for tid, n in pmu.items() if n}
    if hit != own:
        raise BenchError(
            f"pmu per thread {dict(sorted(hit.items()))} != mt's own {dict(sorted(own.items()))}"
        )
    return sum(hit.values())


def uftrace_patches_plain(hot: str, tmp: Path) -> bool:
    """Whether `uftrace record -P work` sees work's calls in the plain (not -pg) build: it does only when
    this uftrace can patch arbitrary code (built with capstone)."""
    data = tmp / "uftrace-plain.data"
    try:
        run(["uftrace", "record", "-P", SYMBOL, "-d", str(data), hot, "1000"])
        return uftrace_calls(data) == 1000
    except BenchError:
        return False
    finally:
        shutil.rmtree(data, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ tools


def build_tools(
    hot: str, hot_fentry: str | None, tmp: Path, scale: float
) -> tuple[list[Tool], list[str], Readback]:
    """The rows to measure, notes on what is skipped or how a peer runs, and where read-backs land."""

    def n(x: int) -> int:
        """x scaled, a multiple of 10 so that mt's K = N / 10 is whole."""
        return max(100, int(x * scale) // 10 * 10)

    back = Readback({})
    notes: list[str] = []
    tools = [
        # N2 large enough that the hits' time (a few ns each) stands well above the runs' noise (~0.1 s)
        Tool("baseline", n(10_000_000), n(300_000_000), lambda h, k: [h, k], baseline=None),
        Tool(
            PMU,
            n(10_000_000),
            n(300_000_000),
            lambda h, k: pmu_argv("stat", h, k, "-x,"),
            count=lambda done: csv_count(done.stderr, "uprobe:"),
            engine="optimized",
        ),
    ]

    if shutil.which("perf"):
        try:
            offset = f"{file_offset(hot, SYMBOL):#x} in this build"
        except BenchError as err:
            offset = str(err)
        tools.append(
            Tool(
                KERNEL,
                n(20_000),
                n(200_000),
                lambda h, k: ["perf", "stat", "-x,", "-e", PROBE.replace("/", ":"), "--", h, k],
                count=lambda done: csv_count(done.stderr, PROBE.replace("/", ":")),
                context=lambda: kernel_probe(hot),
                slack=KERNEL_SLACK,
                note=f"OFFSET = {SYMBOL}'s file offset: vaddr - PT_LOAD p_vaddr + p_offset ({offset}); "
                f"one trap into the kernel per hit, so a smaller N. {KERNEL_SLACK_NOTE}",
            )
        )
    else:
        notes.append(f"{KERNEL}: perf not installed, skipped")

    if not shutil.which("uftrace"):
        notes.append(f"{UFTRACE}: uftrace not installed, skipped")
    else:
        ufdata = tmp / "uftrace.data"
        back.what[UFTRACE] = f"uftrace report calls of {SYMBOL}"
        plain = uftrace_patches_plain(hot, tmp)
        if plain:
            target, baseline = "hot", "baseline"
            note = "runs $HOT, the plain build: this uftrace patches work's entry at run time"
        elif hot_fentry is not None:
            target, baseline = "hot-fentry", "baseline (fentry build)"
            note = (
                "runs $HOT_FENTRY: this uftrace has no capstone, and `uftrace record -P work $HOT 1000` "
                "records no call of work, so it gets the -pg -mfentry -mnop-mcount build, whose 5-byte "
                "nop at each function's entry it patches into a call at run time (dynamic tracing); "
                "it records the entry and the exit of each call to its data directory"
            )
            tools.append(
                Tool(
                    baseline,
                    n(10_000_000),
                    n(50_000_000),
                    lambda h, k: [h, k],
                    "hot-fentry",
                    None,
                )
            )
        else:
            target = baseline = ""
            notes.append(
                f"{UFTRACE}: cannot patch the plain build and the -pg -mfentry build failed, skipped"
            )
        if target:
            tools.append(
                Tool(
                    UFTRACE,
                    n(1_000_000),
                    n(10_000_000),
                    lambda h, k: ["uftrace", "record", "-P", SYMBOL, "-d", str(ufdata), h, k],
                    target=target,
                    baseline=baseline,
                    count=counter(ufdata, lambda: uftrace_calls(ufdata), back),
                    prepare=remover(ufdata),
                    note=note,
                )
            )

    for threads, base, name in ((1, BASE_MT1, PMU_MT1), (THREADS, BASE_MT4, PMU_MT4)):
        tools += [
            Tool(base, n(10_000_000), n(50_000_000), mt_argv(threads), target="mt", baseline=None),
            Tool(
                name,
                n(10_000_000),
                n(50_000_000),
                mt_argv(threads, "--per-thread", "-x,"),
                target="mt",
                baseline=base,
                count=thread_counts,
                engine="optimized",
            ),
        ]

    parquet = tmp / "pmu.parquet"
    back.what[RECORD] = "Parquet rows + pmu.lost = pmu.hits_per_event"
    record = Tool(
        RECORD,
        n(250_000),
        n(2_000_000),
        lambda h, k: pmu_argv("record", h, k, "-m", str(RECORD_PAGES), "-o", str(parquet)),
        count=counter(parquet, lambda: pmu_rows(parquet, back), back),
        prepare=remover(parquet, Path(f"{parquet}.old"), Path(f"{parquet}.tmp")),
        engine="optimized",
        note=f"-m {RECORD_PAGES}: a ring of {RECORD_PAGES * 4096 >> 20} MiB in the process, room for N2 "
        "records: this loop makes a hit every ~11 ns, faster than pmu converts and writes them (~30 ns "
        "a record), so pmu writes most of them after the program is done, and a smaller ring would lose "
        "records rather than slow the program (the verdict needs none lost)",
    )
    tools.append(record)
    return tools, notes, back


def mt_argv(threads: int, *pmu_options: str) -> Callable[[str, str], list[str]]:
    """The argv of `mt THREADS K` for N hits in all (K = N / 1 + ... + THREADS), under
    `pmu stat -v PMU_OPTIONS` when there are any."""

    def argv(mt: str, n: str) -> list[str]:
        share = threads * (threads + 1) // 2
        # For a shown command (n = "N"), the shell arithmetic.
        k = str(int(n) // share) if n.isdigit() else (n if share == 1 else f"$(({n}/{share}))")
        if not pmu_options:
            return [mt, str(threads), k]
        return [*pmu_argv("stat", mt, str(threads), *pmu_options), k]

    return argv


# -------------------------------------------------------------------------------------------- measuring

CHECKED = {
    PMU: "pmu count = N",
    KERNEL: "perf stat count = N",
    PMU_MT1: "pmu per thread = mt's tid=... calls=... lines, total = N",
    PMU_MT4: "pmu per thread = mt's tid=... calls=... lines, total = N",
}


def measure_all(tools: list[Tool], paths: dict[str, str], repeat: int, back: Readback) -> list[Row]:
    """bench_stat's measure_rounds, with read-backs landing in `back` and each row's check written."""

    def before(tool: Tool) -> None:
        back.current = tool.name

    rows = measure_rounds(tools, paths, repeat, before)
    for row in rows:
        name = row.tool.name
        what = CHECKED.get(base_name(name)) or back.what.get(base_name(name))
        if row.error is not None or what is None:
            row.checked = "not reported"
        else:
            row.checked = f"{what} in all {2 * repeat} runs" + excess_note(row.excess)
            if name in back.lost:
                row.checked += f"; lost {back.lost[name]} in all"
    return rows


# ------------------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Summary:
    """Overheads per hit (seconds, wall clock and CPU) by tool name, the verdicts and other findings."""

    overhead: dict[str, float]
    cpu: dict[str, float]
    verdicts: list[str]
    findings: list[str]


def cpu_overheads(rows: list[Row]) -> dict[str, float]:
    """CPU seconds per hit by tool name: its CPU-time slope minus its baseline's."""
    slopes = {r.tool.name: r.cpu_slope for r in rows if r.error is None}
    return {
        r.tool.name: slopes[r.tool.name] - slopes[r.tool.baseline]
        for r in rows
        if r.error is None and r.tool.baseline is not None and r.tool.baseline in slopes
    }


def fraction(x: float) -> str:
    """x as "0.0031 = 1/323" (or just "1.2" when x >= 1)."""
    if x >= 1 or x <= 0:
        return f"{x:.3g}"
    return f"{x:.3g} = 1/{1 / x:.3g}" if x > 0.1 else f"{x:.3g} = 1/{1 / x:,.0f}"


def verdict(text: str, value: float | None, other: float | None, limit: float, target: str) -> str:
    """ "TEXT: PASS (ratio R; target T)" when value / other <= limit, FAIL otherwise or when not measured."""
    if value is None or not other:
        return f"{text}: FAIL (not measured; target {target})"
    ratio = value / other
    return f"{text}: {'PASS' if ratio <= limit else 'FAIL'} (ratio {fraction(ratio)}; target {target})"


def summarize(rows: list[Row], back_lost: dict[str, int]) -> Summary:
    over, cpu_over = overheads(rows), cpu_overheads(rows)
    engines = {r.tool.name: r.engine for r in rows}
    pmu = over.get(PMU)
    verdicts = [
        verdict(f"counting: {PMU} <= 1/300 of {KERNEL}", pmu, over.get(KERNEL), 1 / 300, "<= 1/300"),
        verdict(f"counting: {PMU} <= 1/20 of {UFTRACE}", pmu, over.get(UFTRACE), 1 / 20, "<= 1/20"),
        (
            f"counting: {PMU} <= 3 ns a hit: {'PASS' if pmu is not None and pmu <= 3e-9 else 'FAIL'} "
            f"({'not measured' if pmu is None else f'{pmu * 1e9:.2f} ns'}; target <= 3 ns, issue 11)"
        ),
        verdict(
            f"threads: cost per hit with {THREADS} threads <= with 1 (wall clock, {PMU_MT4} / {PMU_MT1})",
            over.get(PMU_MT4),
            over.get(PMU_MT1),
            1.0,
            "<= 1",
        ),
    ]
    findings = []
    mt1, mt4 = cpu_over.get(PMU_MT1), cpu_over.get(PMU_MT4)
    if mt1 and mt4 is not None:
        findings.append(
            f"threads, CPU time instead of wall clock (user + system of every process, which running on "
            f"{machine_cpus()} CPUs cannot hide): {THREADS} threads / 1 thread = {mt4 / mt1:.3g} "
            f"({mt4 * 1e9:.3g} vs {mt1 * 1e9:.3g} ns per hit)"
        )
    uf, rec = over.get(UFTRACE), over.get(RECORD)
    lost = back_lost.get(RECORD, 0)
    text = f"recording: {RECORD} <= 1/2 of {UFTRACE}, Parquet writing included, no record lost"
    if lost:
        verdicts.append(f"{text}: FAIL ({lost:,} records lost: a bigger -m is needed for a fair ratio)")
    else:
        verdicts.append(verdict(text, rec, uf, 0.5, "<= 1/2"))
    engine = engines.get(RECORD) or "?"
    if rec is not None and uf:
        cpu_rec, cpu_uf = cpu_over.get(RECORD), cpu_over.get(UFTRACE)
        findings.append(
            f"recording (pmu record -v: {engine}): {rec * 1e9:.3g} ns per hit against uftrace's "
            f"{uf * 1e9:.3g} (wall clock: the program and pmu run on separate CPUs, so this is the slower "
            "of the two, pmu converting and writing each record)"
            + (
                f"; in CPU time of every process {cpu_rec * 1e9:.3g} against {cpu_uf * 1e9:.3g} ns"
                if cpu_rec is not None and cpu_uf is not None
                else ""
            )
        )
    return Summary(over, cpu_over, verdicts, findings)


def machine_cpus() -> int:
    return len(os.sched_getaffinity(0))


def table(rows: list[Row], summary: Summary) -> str:
    """The results as a Markdown table."""
    head = [
        "part",
        "tool",
        "engine (pmu -v)",
        "N1",
        "N2",
        "median t(N1) s",
        "median t(N2) s",
        "t(N2) min-max s",
        "ns/hit raw",
        "overhead ns/hit",
        "CPU overhead ns/hit",
        "hits checked",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        t = r.tool
        part = PARTS.get(base_name(t.name), "")
        engine = "-" if t.engine is None else (r.engine or "?")
        if r.error is not None:
            cells = [part, t.name, engine, f"{t.n1:,}", f"{t.n2:,}", *["-"] * 6, f"FAILED: {r.error}"]
        else:
            over, cpu = summary.overhead.get(t.name), summary.cpu.get(t.name)
            cells = [
                part,
                t.name,
                engine,
                f"{t.n1:,}",
                f"{t.n2:,}",
                f"{statistics.median(r.t1):.3f}",
                f"{statistics.median(r.t2):.3f}",
                f"{min(r.t2):.2f}-{max(r.t2):.2f}",
                f"{r.slope * 1e9:.4g}",
                "-" if over is None else f"{over * 1e9:.4g}",
                "-" if cpu is None else f"{cpu * 1e9:.4g}",
                r.checked,
            ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def section(
    rows: list[Row],
    summary: Summary,
    tools: list[Tool],
    notes: list[str],
    repeat: int,
    tmp: str,
) -> str:
    """The "## Jump-optimized probes" section of RESULTS.md."""
    today = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    notes = notes + [f"{t.name}: {t.note}" for t in tools if t.note]
    notes += [
        f"threads: `mt T K` starts T threads, thread i calling {SYMBOL} i*K times; "
        f"`mt {THREADS} N/{MT_SHARE}` and `mt 1 N` both make N calls in all, here on {machine_cpus()} "
        "CPUs. Wall clock is the "
        "acceptance's measure; the CPU-time column and finding show the cost with parallelism taken out",
        "CPU overhead ns/hit: the same slope on CPU time (user + system of the command and all it waited "
        "for, from getrusage(RUSAGE_CHILDREN)) instead of wall-clock time",
        "engine (pmu -v): every pmu command runs with -v; the counting and thread rows fail unless each "
        "timed run says optimized",
    ]
    builds = [f"gcc {shlex.join(CC_FLAGS)} -o $HOT tests/targets/hot.c"]
    if any(t.target == "hot-fentry" for t in tools):
        builds.append(f"gcc {shlex.join(CC_FLAGS_FENTRY)} -o $HOT_FENTRY tests/targets/hot.c   # uftrace")
    builds.append(f"gcc {shlex.join(CC_FLAGS_MT)} -o $MT tests/targets/mt.c")
    parts = [
        SECTION,
        "",
        "The acceptance of jump-optimized probes (pmu's default: the probed function's first bytes jump to "
        "a trampoline in the process that counts the hit per thread in shared memory and, for pmu record, "
        "appends a record to a ring buffer there: no ptrace stop per hit), side by side in one run. "
        "Written by `benchmarks/bench_optimized.py --results benchmarks/RESULTS.md`, which replaces only "
        "this section.",
        "",
        f"- date: {today}",
        f"- machine: {machine()}",
        f"- method: wall-clock time of whole commands, median of {repeat} per size; cost per hit = "
        "(t(N2) - t(N1)) / (N2 - N1), so start-up drops out; overhead = that minus the slope of the "
        "uninstrumented program (same build, same sizes). The repetitions go round all tools in turn. "
        f"`hot N` calls `{SYMBOL}` N times; every count is checked to equal N exactly.",
        "",
        table(rows, summary),
        "",
        *(f"- **{v}**" for v in summary.verdicts),
        *(f"- {f}" for f in summary.findings),
        "",
        *commands_block(commands(tools, tmp, builds)),
    ]
    if notes:
        parts += ["", "### Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_arguments(__doc__, SECTION, 9, False, argv)

    with tempfile.TemporaryDirectory(prefix="pmu-bench-optimized-") as tmpdir:
        tmp = Path(tmpdir)
        paths = compile_hot(tmp)
        paths["mt"] = str(tmp / "mt")
        compile_target(tmp / "mt", CC_FLAGS_MT, MT_SOURCE)
        tools, notes, back = build_tools(
            paths["hot"], paths.get("hot-fentry"), tmp, 0.25 if args.quick else 1.0
        )
        rows = measure_all(chosen(tools, args.only), paths, args.repeat, back)

    summary = summarize(rows, back.lost)
    print(table(rows, summary))
    print()
    for note in notes:
        print(f"note: {note}")
    for line in summary.verdicts + summary.findings:
        print(line)
    if args.results is not None:
        update_results(args.results, SECTION, section(rows, summary, tools, notes, args.repeat, tmpdir))
        print(f"wrote the {SECTION!r} section of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
