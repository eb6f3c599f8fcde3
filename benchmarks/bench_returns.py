"""Benchmark: return probes served in the process (issue 11's acceptance 6), side by side in one run.

pmu's default engine serves `uretprobe:` with a jump patch at the function's entry: the return blob in
the process pushes a frame on the thread's shadow stack and hijacks the return address; the return
trampoline counts (and with --latency adds the call's latency to a log2 histogram, with pmu record
appends a record with retval and latency) and jumps back. No ptrace stop per call. Rows:

- counting: `pmu stat -e uretprobe:work` on tests/targets/hot.c (target: <= 20 ns a call, entry and
  return), against a kernel uretprobe at the same offset counted by `perf stat`;
- --latency: `pmu stat --latency -e uretprobe:work` (target: <= 25 ns a call);
- recording: `pmu record -e uretprobe:work` (a record per return with retval and latency_ns, Parquet
  writing included, none lost) against `uftrace record -P work`, which records the entry and the exit
  of each call (target: pmu <= 1/2 of uftrace).

The method is bench_stat.py's (bench_optimized.py's tools and checks): cost per call is the slope between
two run sizes on the median wall-clock time of R runs each, minus the uninstrumented program's slope.
Every pmu run has -v and must say its return probe is optimized; every count must equal N.

    .venv/bin/python benchmarks/bench_returns.py [--quick] [--repeat R] [--only NAMES] [--results FILE.md]
"""

from __future__ import annotations

import contextlib
import datetime
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench_optimized import UFTRACE, fraction, machine_cpus, measure_all, table, uftrace_patches_plain
from bench_optimized import Summary as _Summary
from bench_record import Readback, counter, pmu_rows, remover, uftrace_calls
from bench_stat import (
    CC_FLAGS,
    CC_FLAGS_FENTRY,
    KERNEL_SLACK,
    KERNEL_SLACK_NOTE,
    SYMBOL,
    BenchError,
    Row,
    Tool,
    bench_arguments,
    chosen,
    commands,
    commands_block,
    compile_hot,
    csv_count,
    file_offset,
    machine,
    overheads,
    pmu_argv,
    update_results,
    uprobe_events_file,
    write_probe_line,
)

SECTION = "## Return probes in the process"
PMU = "pmu stat uretprobe"
LATENCY = "pmu stat --latency uretprobe"
KERNEL = "kernel uretprobe (perf stat)"
RECORD = "pmu record uretprobe"
RPROBE = "pmubench/work_ret"
RECORD_PAGES = 65536
"""256 MiB of ring: room for N2 records, so that none is lost (the verdict needs none lost)."""


@contextlib.contextmanager
def kernel_return_probe(hot: str) -> Iterator[None]:
    """Define r:pmubench/work_ret at work's file offset in hot; always remove it again."""
    events = uprobe_events_file()
    definition = f"r:{RPROBE} {hot}:{file_offset(hot, SYMBOL):#x}"
    with contextlib.suppress(OSError):
        write_probe_line(events, f"-:{RPROBE}")
    try:
        write_probe_line(events, definition)
    except OSError as err:
        raise BenchError(f"cannot define {definition!r} in {events}: {err}") from err
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            write_probe_line(events, f"-:{RPROBE}")


def latency_calls(stderr: str) -> int:
    """The calls of `pmu stat --latency -x,`'s latency line (EVENT,latency,CALLS,MEAN,...) after checking
    the count line says as many."""
    for line in stderr.splitlines():
        fields = line.split(",")
        if len(fields) >= 3 and fields[1] == "latency" and fields[2].isdigit():
            calls = int(fields[2])
            count = csv_count(stderr, "uretprobe:")
            if count != calls:
                raise BenchError(f"latency line says {calls} calls, the count {count}")
            return calls
    raise BenchError(f"no latency line in stderr: {stderr.strip()[-200:]!r}")


def build_tools(
    hot: str, hot_fentry: str | None, tmp: Path, scale: float
) -> tuple[list[Tool], list[str], Readback]:
    def n(x: int) -> int:
        return max(100, int(x * scale))

    back = Readback({})
    notes: list[str] = []
    tools = [
        Tool("baseline", n(10_000_000), n(100_000_000), lambda h, k: [h, k], baseline=None),
        Tool(
            PMU,
            n(10_000_000),
            n(100_000_000),
            lambda h, k: pmu_argv("stat", h, k, "-x,", kind="uretprobe"),
            count=lambda done: csv_count(done.stderr, "uretprobe:"),
            engine="optimized",
        ),
        Tool(
            LATENCY,
            n(10_000_000),
            n(100_000_000),
            lambda h, k: pmu_argv("stat", h, k, "-x,", "--latency", kind="uretprobe"),
            count=lambda done: latency_calls(done.stderr),
            engine="optimized",
        ),
    ]
    if shutil.which("perf"):
        tools.append(
            Tool(
                KERNEL,
                n(10_000),
                n(100_000),
                lambda h, k: ["perf", "stat", "-x,", "-e", RPROBE.replace("/", ":"), "--", h, k],
                count=lambda done: csv_count(done.stderr, RPROBE.replace("/", ":")),
                context=lambda: kernel_return_probe(hot),
                slack=KERNEL_SLACK,
                note="a trap into the kernel at the entry and another at the return; a smaller N. "
                + KERNEL_SLACK_NOTE,
            )
        )
    else:
        notes.append(f"{KERNEL}: perf not installed, skipped")
    if not shutil.which("uftrace"):
        notes.append(f"{UFTRACE}: uftrace not installed, skipped")
    else:
        ufdata = tmp / "uftrace.data"
        back.what[UFTRACE] = f"uftrace report calls of {SYMBOL}"
        target, baseline = ("hot", "baseline") if uftrace_patches_plain(hot, tmp) else ("", "")
        if not target and hot_fentry is not None:
            target, baseline = "hot-fentry", "baseline (fentry build)"
            tools.append(
                Tool(baseline, n(10_000_000), n(50_000_000), lambda h, k: [h, k], "hot-fentry", None)
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
                    note="records the entry and the exit of each call of work to its data directory",
                )
            )
        else:
            notes.append(f"{UFTRACE}: cannot patch the plain build and no -pg build, skipped")
    parquet = tmp / "pmu.parquet"
    back.what[RECORD] = "Parquet rows + pmu.lost = pmu.hits_per_event"
    tools.append(
        Tool(
            RECORD,
            n(250_000),
            n(2_000_000),
            lambda h, k: pmu_argv(
                "record", h, k, "-m", str(RECORD_PAGES), "-o", str(parquet), kind="uretprobe"
            ),
            count=counter(parquet, lambda: pmu_rows(parquet, back), back),
            prepare=remover(parquet, Path(f"{parquet}.old"), Path(f"{parquet}.tmp")),
            engine="optimized",
            note=f"-m {RECORD_PAGES}: room for N2 records in the process's ring; each record has the "
            "return's time, retval and latency_ns (two rdtsc, at the entry and the return)",
        )
    )
    return tools, notes, back


def verdict_ns(text: str, value: float | None, limit_ns: float) -> str:
    if value is None:
        return f"{text}: FAIL (not measured; target <= {limit_ns:g} ns)"
    ok = "PASS" if value <= limit_ns * 1e-9 else "FAIL"
    return f"{text}: {ok} ({value * 1e9:.3g} ns; target <= {limit_ns:g} ns)"


def summarize(rows: list[Row], lost: dict[str, int]) -> _Summary:
    over = overheads(rows)
    verdicts = [
        verdict_ns(f"counting: {PMU}, entry and return, per call", over.get(PMU), 20),
        verdict_ns(f"--latency: {LATENCY}, per call", over.get(LATENCY), 25),
    ]
    rec, uf = over.get(RECORD), over.get(UFTRACE)
    text = f"recording: {RECORD} <= 1/2 of {UFTRACE} (entry+exit), Parquet writing included, none lost"
    if lost.get(RECORD):
        verdicts.append(f"{text}: FAIL ({lost[RECORD]:,} records lost)")
    elif rec is None or not uf:
        verdicts.append(f"{text}: FAIL (not measured; target <= 1/2)")
    else:
        ratio = rec / uf
        verdicts.append(
            f"{text}: {'PASS' if ratio <= 0.5 else 'FAIL'} (ratio {fraction(ratio)}; target <= 1/2)"
        )
    findings = []
    k, p = over.get(KERNEL), over.get(PMU)
    if k and p:
        findings.append(
            f"counting: {PMU} costs {fraction(p / k)} of a kernel uretprobe's "
            f"({p * 1e9:.3g} vs {k * 1e9:.4g} ns a call)"
        )
    return _Summary(over, {}, verdicts, findings)


def section(
    rows: list[Row], summary: _Summary, tools: list[Tool], notes: list[str], repeat: int, tmp: str
) -> str:
    today = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    notes = notes + [f"{t.name}: {t.note}" for t in tools if t.note]
    builds = [f"gcc {shlex.join(CC_FLAGS)} -o $HOT tests/targets/hot.c"]
    if any(t.target == "hot-fentry" for t in tools):
        builds.append(f"gcc {shlex.join(CC_FLAGS_FENTRY)} -o $HOT_FENTRY tests/targets/hot.c   # uftrace")
    parts = [
        SECTION,
        "",
        "Issue 11's acceptance 6 for return probes: `uretprobe:` served inside the process by the "
        "return blob (pmu/trace/retprobe.S: a shadow stack per thread, the return address hijacked, no "
        "stop per call). Written by `benchmarks/bench_returns.py --results benchmarks/RESULTS.md`, "
        "which replaces only this section.",
        "",
        f"- date: {today}",
        f"- machine: {machine()} ({machine_cpus()} CPUs)",
        f"- method: wall-clock time of whole commands, median of {repeat} per size; cost per call = "
        "(t(N2) - t(N1)) / (N2 - N1) minus the uninstrumented program's slope. Every count equals N.",
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


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_arguments(__doc__, SECTION, 7, False, argv)
    with tempfile.TemporaryDirectory(prefix="pmu-bench-returns-") as tmpdir:
        tmp = Path(tmpdir)
        paths = compile_hot(tmp)
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
