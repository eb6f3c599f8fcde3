"""Benchmark: cost per recorded hit of `pmu record` against perf record on a kernel uprobe, bpftrace, uftrace.

Every tool writes one record per call of `work` in tests/targets/hot.c (`hot N` calls it N times) to a
file, and the whole command is timed, so `pmu record`'s Parquet writing is included (as are perf's
perf.data, bpftrace's text file and uftrace's data directory). The method is bench_stat.py's: cost per
hit is the slope between two run sizes, (t(N2) - t(N1)) / (N2 - N1) on the median wall-clock time of R
runs each, minus the slope of the uninstrumented program; here the R repetitions go round all tools in
turn, so that a burst of other load lands on one run of each tool. After every timed run (untimed) the
output is read back and must hold N records: pmu's Parquet rows + `pmu.lost` == `pmu.hits_per_event` ==
N, perf script's lines, bpftrace's timestamp lines, uftrace report's calls. pmu runs with --no-optimize
here: this is the int3 engine (one ptrace stop per hit) against peers that also trap; the default,
jump-optimized recording is measured against uftrace in bench_optimized.py. pmu, perf and bpftrace run
twice: as they are, and with the whole command under `taskset -c CPU` (rows marked [cpu CPU]), because
pmu's ptrace round trips are bimodal when the scheduler is free to split tracer and program across CPUs.

Prints a table; with --results, replaces (or appends) the "## pmu record" section of that Markdown file
and leaves the rest as it is. No threshold is set: it records the ratios pmu / perf record and
pmu / bpftrace, and exits 0.

    .venv/bin/python benchmarks/bench_record.py [--quick] [--repeat R] [--no-pin] [--results FILE.md]
"""

from __future__ import annotations

import datetime
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench_stat import (
    KERNEL_SLACK,
    PROBE,
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
    file_offset,
    kernel_probe,
    machine,
    measure_rounds,
    run,
    update_results,
)

SECTION = "## pmu record"
PMU = "pmu record --no-optimize"
PERF = "kernel uprobe (perf record)"
BPFTRACE = "bpftrace printf"


def bpftrace_program(target: str) -> str:
    """A bpftrace program printing one line per hit of SYMBOL in target: the hit's nsecs."""
    return f'uprobe:{target}:{SYMBOL} {{ printf("%llu\\n", nsecs); }}'


@dataclass
class Readback:
    """What the untimed read-backs found, by tool name: output bytes at each N, pmu's lost records."""

    what: dict[str, str]
    """What is checked, by base tool name (without the pinning suffix)."""
    current: str = ""
    """The tool being measured; main sets it."""
    sizes: dict[tuple[str, int], int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)


def pin_suffix(cpu: str) -> str:
    return f" [cpu {cpu}]"


def base_name(name: str) -> str:
    """The tool's name without the pinning suffix."""
    return name.split(" [cpu ", 1)[0]


def pinned(tool: Tool, cpu: str) -> Tool:
    """tool with its whole command (tracer, tracee, writer) run under `taskset -c CPU`."""
    return replace(
        tool,
        name=tool.name + pin_suffix(cpu),
        argv=lambda h, k: ["taskset", "-c", cpu, *tool.argv(h, k)],
        note="",
    )


def size_of(path: Path) -> int:
    """Bytes in a file, or in all files under a directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def remover(*paths: Path) -> Callable[[], None]:
    """A prepare step deleting the previous run's output (and the .old the tools rename it to)."""

    def prepare() -> None:
        for p in paths:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    return prepare


# ------------------------------------------------------------------------------------------ read-backs


def pmu_rows(path: Path, back: Readback) -> int:
    """Rows + lost of a pmu record Parquet file, after checking they equal pmu.hits_per_event's total."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except OSError as err:
        raise BenchError(f"cannot read {path}: {err}") from err
    kv = {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()}
    try:
        lost = int(kv["pmu.lost"])
        hits = sum(int(v) for v in json.loads(kv["pmu.hits_per_event"]).values())
    except (KeyError, ValueError) as err:
        raise BenchError(f"{path} lacks pmu.lost / pmu.hits_per_event metadata: {err}") from err
    if meta.num_rows + lost != hits:
        raise BenchError(f"{path}: {meta.num_rows} rows + {lost} lost != pmu.hits_per_event {hits}")
    back.lost[back.current] = back.lost.get(back.current, 0) + lost
    return int(meta.num_rows) + lost


def perf_script_lines(path: Path) -> int:
    """Samples in a perf.data file: perf script prints one line per tracepoint sample."""
    _, done = run(["perf", "script", "-i", str(path)])
    return sum(1 for line in done.stdout.splitlines() if line.strip())


def timestamp_lines(path: Path) -> int:
    """Lines of bpftrace's output that are a timestamp (it also writes "Attaching 1 probe...")."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if line.strip().isdigit())


def uftrace_calls(data: Path) -> int:
    """The calls of SYMBOL that uftrace report shows for a data directory."""
    _, done = run(["uftrace", "report", "-d", str(data)])
    calls = [p[-2] for p in (line.split() for line in done.stdout.splitlines()) if p[-1:] == [SYMBOL]]
    if len(calls) != 1 or not calls[0].isdigit():
        raise BenchError(f"uftrace report shows {calls or 'no'} calls of {SYMBOL}")
    return int(calls[0])


def counter(out: Path, read: Callable[[], int], back: Readback) -> Callable[[Completed], int]:
    """A Tool.count that reads the run's output file back (untimed) and notes its size."""

    def count(done: Completed) -> int:
        del done
        if not out.exists():
            raise BenchError(f"{back.current} wrote no {out}")
        got = read()
        back.sizes[(back.current, got)] = size_of(out)
        return got

    return count


# ------------------------------------------------------------------------------------------------ tools


def build_tools(
    hot: str, hot_fentry: str | None, tmp: Path, scale: float, cpu: str | None
) -> tuple[list[Tool], list[str], Readback]:
    """The rows to measure, notes on the tools that are skipped, and where read-backs land."""

    def n(x: int) -> int:
        return max(100, int(x * scale))

    back = Readback({})
    notes: list[str] = []
    parquet = tmp / "pmu.parquet"
    back.what[PMU] = "Parquet rows + pmu.lost = pmu.hits_per_event"
    tools = [
        Tool("baseline", n(2_000_000), n(20_000_000), lambda h, k: [h, k], baseline=None),
        Tool(
            PMU,
            n(20_000),
            n(200_000),
            lambda h, k: [
                sys.executable,
                "-m",
                "pmu",
                "record",
                "--no-optimize",
                "-o",
                str(parquet),
                "-e",
                f"uprobe:{h}:{SYMBOL}",
                "--",
                h,
                k,
            ],
            count=counter(parquet, lambda: pmu_rows(parquet, back), back),
            prepare=remover(parquet, Path(f"{parquet}.old"), Path(f"{parquet}.tmp")),
        ),
    ]

    if shutil.which("perf"):
        try:
            offset = f"{file_offset(hot, SYMBOL):#x} in this build"
        except BenchError as err:
            offset = str(err)
        data = tmp / "perf.data"
        back.what[PERF] = "perf script lines"
        tools.append(
            Tool(
                PERF,
                n(20_000),
                n(200_000),
                lambda h, k: [
                    "perf",
                    "record",
                    "--no-bpf-event",
                    "-e",
                    PROBE.replace("/", ":"),
                    "-o",
                    str(data),
                    "--",
                    h,
                    k,
                ],
                count=counter(data, lambda: perf_script_lines(data), back),
                slack=KERNEL_SLACK,  # a kernel uprobe now and then fires twice for one call
                prepare=remover(data, Path(f"{data}.old")),
                context=lambda: kernel_probe(hot),
                note=f"OFFSET = {SYMBOL}'s file offset: vaddr - PT_LOAD p_vaddr + p_offset ({offset}). "
                "--no-bpf-event: without it perf record's side-band thread, polling with a 1 s timeout, "
                "holds its exit until the poll expires: 0-1 s per run that has nothing to do with hits",
            )
        )
    else:
        notes.append("kernel uprobe: perf not installed, skipped")

    if shutil.which("bpftrace"):
        text = tmp / "bpftrace.out"
        back.what[BPFTRACE] = "timestamp lines"
        tools.append(
            Tool(
                BPFTRACE,
                n(20_000),
                n(200_000),
                lambda h, k: [
                    "bpftrace",
                    "-o",
                    str(text),
                    "-e",
                    bpftrace_program(h),
                    "-c",
                    f"{h} {k}",
                ],
                count=counter(text, lambda: timestamp_lines(text), back),
                prepare=remover(text),
                note="writes one line per hit (its nsecs), plus an 'Attaching 1 probe...' line",
            )
        )
    else:
        notes.append("bpftrace: not installed, skipped")

    if cpu is not None:
        if shutil.which("taskset"):
            tools += [pinned(t, cpu) for t in tools if t.baseline is not None]
        else:
            notes.append("taskset: not installed, the pinned rows are skipped")

    if not shutil.which("uftrace"):
        notes.append("uftrace: not installed, skipped")
    elif hot_fentry is None:
        notes.append("uftrace: the -pg -mfentry -mnop-mcount build failed, skipped")
    else:
        ufdata = tmp / "uftrace.data"
        name = "uftrace record (context)"
        back.what[name] = f"uftrace report calls of {SYMBOL}"
        tools += [
            Tool(
                "baseline (fentry build)",
                n(2_000_000),
                n(20_000_000),
                lambda h, k: [h, k],
                "hot-fentry",
                None,
            ),
            Tool(
                name,
                n(100_000),
                n(1_000_000),
                lambda h, k: ["uftrace", "record", "-P", SYMBOL, "-d", str(ufdata), h, k],
                target="hot-fentry",
                baseline="baseline (fentry build)",
                count=counter(ufdata, lambda: uftrace_calls(ufdata), back),
                prepare=remover(ufdata),
                note="runs $HOT_FENTRY (this uftrace has no capstone, so it patches only -pg -mfentry "
                "code); it records the entry and the exit of each call",
            ),
        ]
    return tools, notes, back


# -------------------------------------------------------------------------------------------- measuring


def measure_interleaved(tools: list[Tool], paths: dict[str, str], repeat: int, back: Readback) -> list[Row]:
    """bench_stat's measure_rounds, with read-backs landing in `back` and each row's check written."""

    def before(tool: Tool) -> None:
        back.current = tool.name

    rows = measure_rounds(tools, paths, repeat, before)
    for row in rows:
        what = back.what.get(base_name(row.tool.name))
        if row.error is not None or what is None:
            row.checked = "not reported"
        else:
            row.checked = f"{what} = N in all {2 * repeat} runs"
            if row.tool.name in back.lost:
                row.checked += f"; lost {back.lost[row.tool.name]} in all"
    return rows


# ------------------------------------------------------------------------------------------------ report


def overheads(rows: list[Row]) -> dict[str, float]:
    """Overhead per hit (seconds) by tool name: its slope minus its baseline's."""
    slopes = {r.tool.name: r.slope for r in rows if r.error is None}
    return {
        r.tool.name: slopes[r.tool.name] - slopes[r.tool.baseline]
        for r in rows
        if r.error is None and r.tool.baseline is not None and r.tool.baseline in slopes
    }


def ratios(overhead: dict[str, float], cpu: str | None) -> list[str]:
    """The recorded ratios: pmu record's overhead per recorded hit over perf record's and bpftrace's,
    unpinned and with every command on one CPU."""
    modes = [("", "unpinned")]
    if cpu is not None:
        modes.append((pin_suffix(cpu), f"every command on CPU {cpu}"))
    lines = []
    for peer in (PERF, BPFTRACE):
        parts = []
        for suffix, how in modes:
            pmu, other = overhead.get(PMU + suffix), overhead.get(peer + suffix)
            parts.append(f"{how}: " + ("not measured" if pmu is None or not other else f"{pmu / other:.3g}"))
        lines.append(f"pmu record / {peer}, overhead per recorded hit: " + "; ".join(parts))
    return lines


def table(rows: list[Row], overhead: dict[str, float], back: Readback) -> str:
    """The results as a Markdown table; a ratio is to the pmu record row run the same way (pinned or not)."""
    head = [
        "tool",
        "N1",
        "N2",
        "median t(N1) s",
        "median t(N2) s",
        "t(N2) min-max s",
        "µs/hit raw",
        "overhead µs/hit",
        "ratio to pmu",
        "output B/hit",
        "records checked",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        t = r.tool
        if r.error is not None:
            cells = [t.name, f"{t.n1:,}", f"{t.n2:,}", *["-"] * 7, f"FAILED: {r.error}"]
        else:
            over = overhead.get(t.name)
            pmu = overhead.get(PMU + t.name[len(base_name(t.name)) :])
            size = back.sizes.get((t.name, t.n2))
            cells = [
                t.name,
                f"{t.n1:,}",
                f"{t.n2:,}",
                f"{statistics.median(r.t1):.3f}",
                f"{statistics.median(r.t2):.3f}",
                f"{min(r.t2):.2f}-{max(r.t2):.2f}",
                f"{r.slope * 1e6:.4g}",
                "-" if over is None else f"{over * 1e6:.4g}",
                "-" if over is None or not pmu else f"{over / pmu:.3g}",
                "-" if size is None else f"{size / t.n2:.3g}",
                r.checked,
            ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def section(
    rows: list[Row],
    overhead: dict[str, float],
    back: Readback,
    tools: list[Tool],
    notes: list[str],
    repeat: int,
    cpu: str | None,
    tmp: str,
) -> str:
    """The "## pmu record" section of RESULTS.md."""
    today = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    notes = notes + [f"{t.name}: {t.note}" for t in tools if t.note]
    notes.append(
        "output B/hit = size of the output (uftrace: its data directory) after the last N2 run, / N2"
    )
    if cpu is not None:
        notes.append(
            f"rows marked [cpu {cpu}] run the whole command under `taskset -c {cpu}`: tracer, traced program "
            "and writer share one CPU. Each pmu hit is a ptrace round trip (the program stops and wakes the "
            "tracer, which resumes it); unpinned, a run is either about as fast as a pinned one or much "
            "slower with more system time, depending on how the scheduler places the two, presumably "
            "because wake-ups across CPUs are costly on this VM (see the t(N2) min-max column). perf "
            "record and bpftrace barely change when pinned."
        )
    parts = [
        SECTION,
        "",
        "Cost per recorded hit of `pmu record --no-optimize` (the int3 engine, one ptrace stop per hit; "
        "Parquet writing included) against peers that trap and write every hit to a file. The default, "
        "jump-optimized recording is measured against uftrace under Jump-optimized probes below. Written "
        "by `benchmarks/bench_record.py --results benchmarks/RESULTS.md`, which replaces only this "
        "section (each benchmark script replaces its own).",
        "",
        f"- date: {today}",
        f"- machine: {machine()}",
        f"- method: as for pmu stat above: wall-clock time of whole commands (the tool writing its file "
        f"included), median of {repeat} per size; cost per hit = (t(N2) - t(N1)) / (N2 - N1), so start-up "
        "drops out; overhead = that minus the slope of the uninstrumented program (its own build's, for "
        "uftrace). The repetitions go round all tools in turn. `hot N` calls `work` N times; after each "
        "timed run the output is read back (untimed) and must hold N records. No threshold is set; the "
        "ratios are recorded. Rows marked (context) are extra peers.",
        "",
        table(rows, overhead, back),
        "",
        *(f"- **{line}**" for line in ratios(overhead, cpu)),
        "",
        *commands_block(commands(tools, tmp)),
    ]
    if notes:
        parts += ["", "### Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_arguments(__doc__, SECTION, 3, True, argv)
    cpu = args.cpu

    with tempfile.TemporaryDirectory(prefix="pmu-bench-record-") as tmpdir:
        tmp = Path(tmpdir)
        paths = compile_hot(tmp)
        tools, notes, back = build_tools(
            paths["hot"], paths.get("hot-fentry"), tmp, 0.25 if args.quick else 1.0, cpu
        )
        rows = measure_interleaved(chosen(tools, args.only), paths, args.repeat, back)

    overhead = overheads(rows)
    print(table(rows, overhead, back))
    print()
    for note in notes:
        print(f"note: {note}")
    for line in ratios(overhead, cpu):
        print(line)
    if args.results is not None:
        new = section(rows, overhead, back, tools, notes, args.repeat, cpu, tmpdir)
        update_results(args.results, SECTION, new)
        print(f"wrote the {SECTION!r} section of {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
