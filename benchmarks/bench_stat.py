"""Benchmark: per-hit overhead of `pmu stat` against ltrace, a kernel uprobe via perf, bpftrace, uftrace.

Every tool counts the calls of `work` in tests/targets/hot.c (`hot N` calls it N times). A tool's cost per
hit is the slope between two run sizes, (t(N2) - t(N1)) / (N2 - N1) on the median wall-clock time of R
runs each, so start-up drops out; subtracting the slope of the uninstrumented program gives the overhead
per hit. Where a tool reports a count it must equal N exactly. pmu runs twice: with its int3 engine
(`--no-optimize`, one ptrace stop per hit; the row the acceptance "pmu <= 1/2 of ltrace" is about) and
with its default jump-optimized probes (far larger N); every pmu run has -v, and the engine it names must
be the row's. The int3 engine and ltrace also run with the whole command under `taskset -c CPU` (rows
marked [cpu CPU]): ptrace round trips are bimodal when the scheduler splits tracer and program across
CPUs. Prints a table; with --results, replaces (or appends) this script's section of that Markdown file
and leaves the others. It is a measurement, not a test: it exits 0 whatever the verdict.

    .venv/bin/python benchmarks/bench_stat.py [--quick] [--repeat R] [--no-pin] [--results FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "targets" / "hot.c"
SYMBOL = "work"
PROBE = "pmubench/work"
TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
RUN_TIMEOUT_S = 600.0
CC_FLAGS = ["-O1", "-g"]
# uftrace without capstone patches only compiler-prepared entries, so it gets its own build.
CC_FLAGS_FENTRY = ["-O1", "-g", "-fno-pie", "-no-pie", "-pg", "-mfentry", "-mnop-mcount"]

Completed = subprocess.CompletedProcess[str]


class BenchError(Exception):
    """A tool could not be measured; the message says why, in one line."""


@dataclass(frozen=True)
class Tool:
    """One row: how to run a tool for n hits, and how to read the hit count it reports."""

    name: str
    n1: int
    n2: int
    argv: Callable[[str, str], list[str]]
    """The command for (target path, n); called with placeholders to show the command."""
    target: str = "hot"
    """Which build it runs: "hot" (gcc -O1 -g) or "hot-fentry" (the uftrace build)."""
    baseline: str | None = "baseline"
    """The row whose slope is subtracted; None for a baseline itself."""
    count: Callable[[Completed], int] | None = None
    """Reads the hit count from a timed run; None when the timed runs report none."""
    verify: Callable[[str], str] | None = None
    """Checks the count once at a small N, untimed; returns what it checked, raises BenchError."""
    prepare: Callable[[], None] | None = None
    """Runs before each timed run, untimed (e.g. removing the previous run's output)."""
    context: Callable[[], contextlib.AbstractContextManager[None]] | None = None
    """Set-up and tear-down around all of this tool's runs (the kernel probe)."""
    note: str = ""
    engine: str | None = None
    """For pmu rows (whose argv has -v): the engine pmu -v must report ("optimized", "int3"), or "" to
    only report it; None for other tools."""
    slack: float = 0.0
    """How far above N (a fraction of N) a count may be and still pass; the excess is reported. 0 for pmu:
    its counts must be exact. The kernel uprobe gets a little, as it now and then counts one call twice."""


@dataclass
class Row:
    """What was measured for one tool."""

    tool: Tool
    t1: list[float] = field(default_factory=list)
    t2: list[float] = field(default_factory=list)
    c1: list[float] = field(default_factory=list)
    c2: list[float] = field(default_factory=list)
    """CPU seconds (user + system of the command and everything it waited for) of each run at N1, N2."""
    checked: str = ""
    error: str | None = None
    engine: str = ""
    """What pmu -v said about the probe (pmu rows only)."""
    excess: int = 0
    """Hits counted beyond N, over all runs (only within the tool's slack)."""

    @property
    def slope(self) -> float:
        """Seconds per hit: the slope between the medians at N1 and N2."""
        t1, t2 = statistics.median(self.t1), statistics.median(self.t2)
        return (t2 - t1) / (self.tool.n2 - self.tool.n1)

    @property
    def cpu_slope(self) -> float:
        """CPU seconds per hit: the slope between the medians of the CPU times at N1 and N2."""
        c1, c2 = statistics.median(self.c1), statistics.median(self.c2)
        return (c2 - c1) / (self.tool.n2 - self.tool.n1)


# ---------------------------------------------------------------------------------------------- helpers


def run(argv: Sequence[str], timeout: float = RUN_TIMEOUT_S) -> tuple[float, Completed]:
    """Run argv to completion, capturing its output; return (wall-clock seconds, result)."""
    elapsed, _, done = run_timed(argv, timeout)
    return elapsed, done


def run_timed(argv: Sequence[str], timeout: float = RUN_TIMEOUT_S) -> tuple[float, float, Completed]:
    """run, also returning the CPU seconds (user + system) of the command and everything it waited for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, errors="replace", timeout=timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired as err:
        raise BenchError(f"timed out after {timeout:.0f} s: {shlex.join(argv)}") from err
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise BenchError(f"exit status {done.returncode}: {shlex.join(argv)}: {tail}")
    return elapsed, cpu, done


def pmu_engine(stderr: str) -> str:
    """What `pmu stat -v` / `pmu record -v` says serves the (one) probe: "optimized (jump patch, ...)",
    "int3", "int3 (not optimized: ...)"."""
    found = re.search(r"^pmu: u(?:ret)?probe:\S+: ((?:optimized|int3|not armed).*)$", stderr, re.MULTILINE)
    if found is None:
        raise BenchError(f"no 'pmu: EVENT: how' line from -v in stderr: {stderr.strip()[-200:]!r}")
    return found.group(1).strip()


def pmu_argv(
    command: str, target: str, n: str, *options: str, optimize: bool = True, kind: str = "uprobe"
) -> list[str]:
    """python -m pmu COMMAND -v [--no-optimize] OPTIONS -e KIND:TARGET:SYMBOL -- TARGET N."""
    return [
        sys.executable,
        "-m",
        "pmu",
        command,
        "-v",
        *([] if optimize else ["--no-optimize"]),
        *options,
        "-e",
        f"{kind}:{target}:{SYMBOL}",
        "--",
        target,
        n,
    ]


def pin_suffix(cpu: str) -> str:
    return f" [cpu {cpu}]"


def pinned(tool: Tool, cpu: str) -> Tool:
    """tool with its whole command (tracer and traced program) run under `taskset -c CPU`."""
    return replace(
        tool,
        name=tool.name + pin_suffix(cpu),
        argv=lambda h, k: ["taskset", "-c", cpu, *tool.argv(h, k)],
        note="",
    )


def csv_count(stderr: str, event_prefix: str) -> int:
    """The count of the first `perf stat -x,` line whose event starts with event_prefix."""
    for line in stderr.splitlines():
        fields = line.split(",")
        if len(fields) >= 3 and fields[2].startswith(event_prefix):
            try:
                return int(fields[0])
            except ValueError as err:
                raise BenchError(f"no count for {event_prefix} in CSV line {line!r}") from err
    raise BenchError(f"no CSV line for {event_prefix} in stderr: {stderr.strip()[-200:]!r}")


def compile_target(out: Path, flags: Sequence[str], source: Path = SOURCE) -> None:
    """gcc FLAGS -o out SOURCE (tests/targets/hot.c by default)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit(f"bench: needs gcc to build {source.relative_to(ROOT)}")
    subprocess.run([cc, *flags, "-o", str(out), str(source)], check=True)


def file_offset(path: str, symbol: str) -> int:
    """The file offset of symbol's entry, as uprobe_events wants it: vaddr - p_vaddr + p_offset."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        symtab: Any = elf.get_section_by_name(".symtab") or elf.get_section_by_name(".dynsym")
        if symtab is None:
            raise BenchError(f"{path} has no symbol table")
        matches = [s for s in symtab.get_symbol_by_name(symbol) or [] if s["st_info"]["type"] == "STT_FUNC"]
        if not matches:
            raise BenchError(f"no function {symbol} in {path}")
        vaddr = int(matches[0]["st_value"])
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_memsz"]:
                return vaddr - int(seg["p_vaddr"]) + int(seg["p_offset"])
    raise BenchError(f"{symbol} at {vaddr:#x} is in no PT_LOAD segment of {path}")


def uprobe_events_file() -> Path:
    """/sys/kernel/tracing/uprobe_events, mounting tracefs first when it is missing."""
    for d in TRACEFS_DIRS:
        if (Path(d) / "uprobe_events").exists():
            return Path(d) / "uprobe_events"
    mount = subprocess.run(
        ["mount", "-t", "tracefs", "nodev", TRACEFS_DIRS[0]], capture_output=True, text=True
    )
    events = Path(TRACEFS_DIRS[0]) / "uprobe_events"
    if mount.returncode != 0 or not events.exists():
        raise BenchError(f"no uprobe_events and mounting tracefs failed: {mount.stderr.strip()}")
    return events


def write_probe_line(events: Path, line: str) -> None:
    """Append one line to uprobe_events (appending keeps everybody else's probes).

    os.open, not open(..., "a"): Python's append mode seeks to the end, which tracefs refuses (EINVAL).
    """
    fd = os.open(events, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@contextlib.contextmanager
def kernel_probe(hot: str) -> Iterator[None]:
    """Define p:pmubench/work at work's file offset in hot; always remove it again."""
    events = uprobe_events_file()
    definition = f"p:{PROBE} {hot}:{file_offset(hot, SYMBOL):#x}"
    with contextlib.suppress(OSError):  # a probe left over by an interrupted run
        write_probe_line(events, f"-:{PROBE}")
    try:
        write_probe_line(events, definition)
    except OSError as err:
        raise BenchError(f"cannot define {definition!r} in {events}: {err}") from err
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            write_probe_line(events, f"-:{PROBE}")


# ------------------------------------------------------------------------------------------------ tools


KERNEL_SLACK = 1e-4
KERNEL_SLACK_NOTE = (
    "Its count may exceed N by up to 0.01 % (the excess is shown under hits checked): now and then the "
    "kernel uprobe fires twice for one call (seen with perf record: two samples with the same timestamp, "
    "200001 for 200000 calls)"
)
PMU_OPT = "pmu stat (optimized)"
PMU_INT3 = "pmu stat --no-optimize (int3)"
LTRACE = "ltrace"


def build_tools(
    hot: str, hot_fentry: str | None, tmp: Path, scale: float, cpu: str | None = None
) -> tuple[list[Tool], list[str]]:
    """The rows to measure, and notes on the tools that are skipped. With cpu, the ptrace-based tools
    (pmu's int3 engine and ltrace) also run with the whole command under `taskset -c CPU`."""

    def n(x: int) -> int:
        return max(100, int(x * scale))

    notes: list[str] = []
    int3 = Tool(
        PMU_INT3,
        n(5_000),
        n(50_000),
        lambda h, k: pmu_argv("stat", h, k, "-x,", optimize=False),
        count=lambda done: csv_count(done.stderr, "uprobe:"),
        engine="int3",
        note="--no-optimize: one ptrace stop per hit (the engine pmu record uses too)",
    )
    tools = [
        Tool("baseline", n(2_000_000), n(20_000_000), lambda h, k: [h, k], baseline=None),
        Tool(
            PMU_OPT,
            n(10_000_000),
            n(50_000_000),
            lambda h, k: pmu_argv("stat", h, k, "-x,"),
            count=lambda done: csv_count(done.stderr, "uprobe:"),
            engine="optimized",
            note="the default: work's first bytes become a jmp to a trampoline in the process that counts "
            "the hit per thread in shared memory, no stop per hit; hence its much larger N",
        ),
        int3,
    ]
    pin = cpu is not None and shutil.which("taskset") is not None
    if cpu is not None and not pin:
        notes.append("taskset: not installed, the pinned rows are skipped")
    if pin:
        assert cpu is not None
        tools.append(pinned(int3, cpu))

    if shutil.which("ltrace"):

        def ltrace_verify(h: str) -> str:
            out = tmp / "ltrace.out"
            small = 1000
            run(["ltrace", "-x", SYMBOL, "-o", str(out), h, str(small)])
            seen = sum(1 for line in out.read_text().splitlines() if line.startswith(f"{SYMBOL}("))
            if seen != small:
                raise BenchError(f"ltrace saw {seen} calls of {SYMBOL} at N={small}, not {small}")
            return f"{small} at N={small}"

        ltrace = Tool(
            LTRACE,
            n(5_000),
            n(50_000),
            lambda h, k: ["ltrace", "-x", SYMBOL, "-o", "/dev/null", h, k],
            verify=ltrace_verify,
        )
        tools.append(ltrace)
        if pin:
            assert cpu is not None
            tools.append(pinned(ltrace, cpu))
    else:
        notes.append("ltrace: not installed, skipped (`make bench` installs it)")

    if shutil.which("perf"):
        try:
            offset = f"{file_offset(hot, SYMBOL):#x} in this build"
        except BenchError as err:
            offset = str(err)
        tools.append(
            Tool(
                "kernel uprobe (perf stat)",
                n(20_000),
                n(200_000),
                lambda h, k: ["perf", "stat", "-x,", "-e", PROBE.replace("/", ":"), "--", h, k],
                count=lambda done: csv_count(done.stderr, PROBE.replace("/", ":")),
                context=lambda: kernel_probe(hot),
                slack=KERNEL_SLACK,
                note=f"OFFSET = {SYMBOL}'s file offset: vaddr - PT_LOAD p_vaddr + p_offset ({offset}). "
                + KERNEL_SLACK_NOTE,
            )
        )
    else:
        notes.append("kernel uprobe: perf not installed, skipped")

    if shutil.which("bpftrace"):
        tools.append(
            Tool(
                "bpftrace (context)",
                n(20_000),
                n(200_000),
                lambda h, k: ["bpftrace", "-e", f"uprobe:{h}:{SYMBOL} {{ @ = count(); }}", "-c", f"{h} {k}"],
                count=bpftrace_count,
            )
        )
    else:
        notes.append("bpftrace: not installed, skipped")

    if not shutil.which("uftrace"):
        notes.append("uftrace: not installed, skipped")
    elif hot_fentry is None:
        notes.append("uftrace: the -pg -mfentry -mnop-mcount build failed, skipped")
    else:
        data = tmp / "uftrace.data"

        def uftrace_verify(h: str) -> str:
            small = 1000
            shutil.rmtree(data, ignore_errors=True)
            run(["uftrace", "record", "-P", SYMBOL, "-d", str(data), h, str(small)])
            _, done = run(["uftrace", "report", "-d", str(data)])
            calls = [p[-2] for p in (line.split() for line in done.stdout.splitlines()) if p[-1:] == [SYMBOL]]
            if calls != [str(small)]:
                raise BenchError(f"uftrace report shows {calls or 'no'} calls of {SYMBOL} at N={small}")
            return f"{small} at N={small}"

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
                "uftrace (context)",
                n(100_000),
                n(1_000_000),
                lambda h, k: ["uftrace", "record", "-P", SYMBOL, "-d", str(data), h, k],
                target="hot-fentry",
                baseline="baseline (fentry build)",
                verify=uftrace_verify,
                prepare=lambda: shutil.rmtree(data, ignore_errors=True),
                note="runs $HOT_FENTRY (this uftrace has no capstone, so it patches only -pg -mfentry code)",
            ),
        ]
    return tools, notes


def bpftrace_count(done: Completed) -> int:
    """The `@: N` line bpftrace prints at exit."""
    found = re.search(r"^@: (\d+)$", done.stdout, re.MULTILINE)
    if found is None:
        raise BenchError(f"no '@: N' in bpftrace's output: {done.stdout.strip()[-200:]!r}")
    return int(found.group(1))


# -------------------------------------------------------------------------------------------- measuring


def measure(tool: Tool, path: str, repeat: int) -> Row:
    """Time R runs at N1 and at N2 (alternating), checking counts; errors land in the row, not raised."""
    row = Row(tool)
    try:
        with tool.context() if tool.context else contextlib.nullcontext():
            checks = [tool.verify(path)] if tool.verify else []
            for _ in range(repeat):
                for size, times in ((tool.n1, row.t1), (tool.n2, row.t2)):
                    if tool.prepare:
                        tool.prepare()
                    elapsed, cpu, done = run_timed(tool.argv(path, str(size)))
                    times.append(elapsed)
                    (row.c1 if size == tool.n1 else row.c2).append(cpu)
                    if tool.count is not None:
                        got = tool.count(done)
                        if not size <= got <= size + int(size * tool.slack):
                            raise BenchError(f"counted {got} hits of {SYMBOL} at N={size}, not {size}")
                        row.excess += got - size
                    if tool.engine is not None:
                        row.engine = pmu_engine(done.stderr)
                        if not row.engine.startswith(tool.engine):
                            raise BenchError(
                                f"pmu -v says {row.engine!r}, not {tool.engine} as this row needs"
                            )
                    log(f"  {tool.name:<32} N={size:<10} {elapsed:8.3f} s")
            if tool.count is not None:
                checks.append(f"= N in all {2 * repeat} runs" + excess_note(row.excess))
            row.checked = "; ".join(checks) or "not reported"
    except BenchError as err:
        row.error = str(err)
        log(f"  {tool.name}: FAILED: {err}")
    return row


def measure_rounds(
    tools: list[Tool], paths: dict[str, str], repeat: int, before: Callable[[Tool], None] | None = None
) -> list[Row]:
    """`measure`, one repetition of every tool at a time, so that a burst of other load on the machine
    lands on one run of each tool rather than on all runs of one. `before` is called ahead of each
    tool's runs (to say where read-backs land). The caller writes each row's `checked`."""
    rows = [Row(t) for t in tools]
    for rep in range(repeat):
        log(f"repetition {rep + 1} of {repeat}:")
        for row in rows:
            if row.error is not None:
                continue
            if before is not None:
                before(row.tool)
            one = measure(row.tool, paths[row.tool.target], 1)
            row.t1 += one.t1
            row.t2 += one.t2
            row.c1 += one.c1
            row.c2 += one.c2
            row.error = one.error
            row.excess += one.excess
            if one.engine and one.engine not in row.engine.split(" / "):
                row.engine = f"{row.engine} / {one.engine}" if row.engine else one.engine
    return rows


def excess_note(excess: int) -> str:
    """ " (N + EXCESS hits in all)" when a peer counted some calls twice (within its slack), else ""."""
    return f" but {excess} hit{'s' if excess > 1 else ''} too many in all (counted twice)" if excess else ""


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Summary:
    """Overheads per hit (seconds) by tool name, the verdicts (the first is the acceptance) and other
    findings."""

    overhead: dict[str, float]
    verdicts: list[str]
    findings: list[str] = field(default_factory=list)


def overheads(rows: list[Row]) -> dict[str, float]:
    """Overhead per hit (seconds) by tool name: its slope minus its baseline's."""
    slopes = {r.tool.name: r.slope for r in rows if r.error is None}
    return {
        r.tool.name: slopes[r.tool.name] - slopes[r.tool.baseline]
        for r in rows
        if r.error is None and r.tool.baseline is not None and r.tool.baseline in slopes
    }


def at_most(
    name: str, value: float | None, peer: str, other: float | None, fraction: float, text: str
) -> str:
    """The verdict "NAME <= FRACTION of PEER's": PASS or FAIL with the ratio, FAIL when one is missing."""
    if value is None or not other:
        missing = " and ".join(x for x, v in ((name, value), (peer, other)) if not v)
        return f"{text}: FAIL (not measured: {missing})"
    ratio = value / other
    return f"{text}: {'PASS' if ratio <= fraction else 'FAIL'} (ratio {ratio:.3g})"


def summarize(rows: list[Row], cpu: str | None = None) -> Summary:
    overhead = overheads(rows)
    verdicts = [
        at_most(
            PMU_INT3,
            overhead.get(PMU_INT3),
            LTRACE,
            overhead.get(LTRACE),
            0.5,
            f"{PMU_INT3} overhead per hit <= 1/2 of {LTRACE}'s",
        )
    ]
    findings = []
    names = {r.tool.name for r in rows}
    if cpu is not None and PMU_INT3 + pin_suffix(cpu) in names:
        pin = pin_suffix(cpu)
        verdicts.append(
            at_most(
                PMU_INT3 + pin,
                overhead.get(PMU_INT3 + pin),
                LTRACE + pin,
                overhead.get(LTRACE + pin),
                0.5,
                f"pinned: {PMU_INT3 + pin} overhead per hit <= 1/2 of {LTRACE + pin}'s",
            )
        )
    opt = overhead.get(PMU_OPT)
    for suffix in ("", *([pin_suffix(cpu)] if cpu is not None else [])):
        int3 = overhead.get(PMU_INT3 + suffix)
        if opt and int3:
            findings.append(
                f"{PMU_OPT} costs 1/{int3 / opt:.0f} of {PMU_INT3 + suffix} per hit "
                f"({opt * 1e9:.3g} ns vs {int3 * 1e6:.3g} µs)"
            )
    return Summary(overhead, verdicts, findings)


def table(rows: list[Row], summary: Summary) -> str:
    """The results as a Markdown table. "ratio to pmu int3" is to the int3 row run the same way (pinned
    or not)."""
    head = [
        "tool",
        "engine (pmu -v)",
        "N1",
        "N2",
        "median t(N1) s",
        "median t(N2) s",
        "t(N2) min-max s",
        "µs/hit raw",
        "overhead µs/hit",
        "ratio to pmu int3",
        "ratio to pmu optimized",
        "hits checked",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    opt = summary.overhead.get(PMU_OPT)
    for r in rows:
        t = r.tool
        engine = "-" if t.engine is None else (r.engine or "?")
        if r.error is not None:
            cells = [t.name, engine, f"{t.n1:,}", f"{t.n2:,}", *["-"] * 7, f"FAILED: {r.error}"]
        else:
            over = summary.overhead.get(t.name)
            suffix = t.name[len(t.name.split(" [cpu ", 1)[0]) :]
            int3 = summary.overhead.get(PMU_INT3 + suffix)
            cells = [
                t.name,
                engine,
                f"{t.n1:,}",
                f"{t.n2:,}",
                f"{statistics.median(r.t1):.3f}",
                f"{statistics.median(r.t2):.3f}",
                f"{min(r.t2):.2f}-{max(r.t2):.2f}",
                f"{r.slope * 1e6:.4g}",
                "-" if over is None else f"{over * 1e6:.4g}",
                "-" if over is None or not int3 else f"{over / int3:.3g}",
                "-" if over is None or not opt else f"{over / opt:.3g}",
                r.checked,
            ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"nproc {len(os.sched_getaffinity(0))}, kernel {platform.release()}, CPU {model}"


def shell_word(word: str) -> str:
    """word quoted for sh, in double quotes when it holds a $PLACEHOLDER, so that it still expands."""
    if "$" not in word:
        return shlex.quote(word)
    if shlex.quote(word.replace("$", "")) == word.replace("$", ""):
        return word
    return '"' + re.sub(r'(["\\`])', r"\\\1", word) + '"'


def commands(tools: list[Tool], tmp: str, builds: Sequence[str] | None = None) -> list[str]:
    """The exact commands, with $HOT (etc.) for the build, $TMP for the scratch directory and N for the
    size; builds are the gcc lines to show first (default: hot.c's two builds)."""
    placeholder = {"hot": "$HOT", "hot-fentry": "$HOT_FENTRY", "mt": "$MT"}
    out = list(
        builds
        if builds is not None
        else [
            f"gcc {shlex.join(CC_FLAGS)} -o $HOT tests/targets/hot.c",
            f"gcc {shlex.join(CC_FLAGS_FENTRY)} -o $HOT_FENTRY tests/targets/hot.c   # uftrace only",
        ]
    )
    for t in tools:
        argv = [("python" if a == sys.executable else a) for a in t.argv(placeholder[t.target], "N")]
        shown = " ".join(shell_word(a.replace(tmp, "$TMP")) for a in argv)
        if t.context is not None:
            out.append(f"echo 'p:{PROBE} '$HOT:OFFSET >> /sys/kernel/tracing/uprobe_events")
        out.append(f"{shown}   # {t.name}, N in ({t.n1}, {t.n2})")
        if t.context is not None:
            out.append(f"echo '-:{PROBE}' >> /sys/kernel/tracing/uprobe_events")
    return out


# ----------------------------------------------------------------------------------------- RESULTS.md


def commands_block(lines: Sequence[str]) -> list[str]:
    """A section's "### Commands": the exact commands, as a sh code block."""
    return ["### Commands", "", "```sh", *lines, "```"]


RESULTS_HEADER = (
    "# pmu benchmarks\n\n"
    "Each `##` section is written by one script run with `--results benchmarks/RESULTS.md`, which "
    "replaces only its own section (or appends it) and leaves the others as they are; `make bench` runs "
    "them all: `benchmarks/bench_stat.py`, `benchmarks/bench_record.py`, `benchmarks/bench_optimized.py`, "
    "`benchmarks/bench_system_wide.py`, `benchmarks/bench_cpython.py`.\n"
)
SECTION = "## pmu stat: overhead per hit against peers"
LEGACY_TITLE = "# pmu stat: overhead per hit against peers"
"""bench_stat.py's section used to be the whole file's title, with `## Commands` and `## Notes` in it."""


def section_bounds(lines: list[str], heading: str) -> tuple[int, int] | None:
    """(first line, end) of the section under heading: up to the next level-1 or -2 heading outside code
    fences, or the end."""
    start = None
    fenced = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if start is None and line.rstrip() == heading:
            start = i
        elif start is not None and re.match(r"#{1,2} ", line):
            return start, i
    return None if start is None else (start, len(lines))


def replace_section(text: str, heading: str, new: str) -> str:
    """text with the section under heading replaced by new, or with new appended when it has none."""
    lines = text.splitlines(keepends=True)
    bounds = section_bounds(lines, heading)
    if bounds is None:
        head = text.rstrip("\n")
        return (head + "\n\n" if head else "") + new
    start, end = bounds
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + new + ("\n" + tail if tail else "")


def update_results(path: Path, heading: str, new: str) -> None:
    """Replace (or append) one section of the results file, keeping the rest; a missing or empty file
    gets the header first. bench_stat.py's old layout (its section as the file's title) is converted."""
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines(keepends=True)
    if lines and lines[0].rstrip() == LEGACY_TITLE:
        end = next(
            (
                i
                for i, line in enumerate(lines)
                if i > 0 and re.match(r"#{1,2} ", line) and line.rstrip() not in ("## Commands", "## Notes")
            ),
            len(lines),
        )
        text = RESULTS_HEADER + "\n" + SECTION + "\n\n" + "".join(lines[end:])
    if not text.strip():
        text = RESULTS_HEADER
    path.write_text(replace_section(text, heading, new))


def report(
    rows: list[Row],
    summary: Summary,
    tools: list[Tool],
    notes: list[str],
    repeat: int,
    tmp: str,
    cpu: str | None = None,
) -> str:
    """bench_stat.py's section of RESULTS.md."""
    today = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    notes = notes + [f"{t.name}: {t.note}" for t in tools if t.note]
    notes.append(
        "engine (pmu -v): every pmu command runs with -v and each timed run's line `pmu: EVENT: HOW` must "
        "name the engine the row is for (optimized or int3), or the row fails"
    )
    if cpu is not None:
        notes.append(
            f"rows marked [cpu {cpu}] run the whole command under `taskset -c {cpu}`: tracer and traced "
            "program share one CPU. With the int3 engine each hit is a ptrace round trip (the program "
            "stops and wakes the tracer, which resumes it); unpinned, a run is either about as fast as a "
            "pinned one or much slower with more system time (earlier runs: ~16 vs ~45 µs/hit), depending "
            "on how the scheduler places the two on this 2-vCPU VM; see the t(N2) min-max column. ltrace "
            "is ptrace-based too, so it is pinned alike for the pinned verdict. The optimized engine has "
            "no stop per hit and is not pinned."
        )
    parts = [
        SECTION,
        "",
        "Written by `benchmarks/bench_stat.py --results benchmarks/RESULTS.md`, which replaces only this "
        "section.",
        "",
        f"- date: {today}",
        f"- machine: {machine()}",
        f"- method: wall-clock time of whole runs, median of {repeat} per size; cost per hit = "
        "(t(N2) - t(N1)) / (N2 - N1), so start-up drops out; overhead = that minus the slope of the "
        "uninstrumented program (its own build's, for uftrace). `hot N` calls `work` N times. "
        "The acceptance compares pmu's int3 engine (`--no-optimize`) with ltrace; the jump-optimized "
        "engine (pmu's default) is measured too, with far larger N. "
        "Rows marked (context) are extra peers, not part of the check.",
        "",
        table(rows, summary),
        "",
        *(f"- **{v}**" for v in summary.verdicts),
        *(f"- {f}" for f in summary.findings),
        "",
        *commands_block(commands(tools, tmp)),
    ]
    if notes:
        parts += ["", "### Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------------------- main


def bench_arguments(
    doc: str, section: str, repeat: int, pins: bool, argv: Sequence[str] | None
) -> argparse.Namespace:
    """The options every benchmark script takes (with --cpu/--no-pin when it has pinned rows); `cpu` is
    then None when the pinned rows are skipped."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeat", "-r", type=int, default=repeat, help="runs per size; the median is used")
    parser.add_argument("--quick", action="store_true", help="run sizes / 4, for a fast look")
    parser.add_argument(
        "--results", type=Path, help=f"replace (or append) the {section!r} section of this Markdown file"
    )
    parser.add_argument("--only", help="comma-separated tool names (prefixes) to run; baselines always run")
    if pins:
        parser.add_argument("--cpu", default="0", help="CPU for the pinned rows (taskset -c CPU); default 0")
        parser.add_argument("--no-pin", action="store_true", help="skip the pinned rows")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.cpu = None if not pins or args.no_pin else args.cpu
    return args


def compile_hot(tmp: Path) -> dict[str, str]:
    """tests/targets/hot.c built in tmp as "hot" (CC_FLAGS) and, when gcc can, "hot-fentry" (the build
    uftrace patches): {name: path}."""
    paths = {"hot": str(tmp / "hot")}
    compile_target(tmp / "hot", CC_FLAGS)
    try:
        compile_target(tmp / "hot-fentry", CC_FLAGS_FENTRY)
        paths["hot-fentry"] = str(tmp / "hot-fentry")
    except subprocess.CalledProcessError:
        pass
    return paths


def chosen(tools: list[Tool], only: str | None) -> list[Tool]:
    """The tools --only names (by prefix), and every baseline."""
    if not only:
        return tools
    wanted = [w.strip() for w in only.split(",")]
    return [t for t in tools if t.baseline is None or any(t.name.startswith(w) for w in wanted)]


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_arguments(__doc__, SECTION, 3, True, argv)
    cpu = args.cpu

    with tempfile.TemporaryDirectory(prefix="pmu-bench-") as tmpdir:
        tmp = Path(tmpdir)
        paths = compile_hot(tmp)
        tools, notes = build_tools(
            paths["hot"], paths.get("hot-fentry"), tmp, 0.25 if args.quick else 1.0, cpu
        )
        tools = chosen(tools, args.only)
        rows = []
        for tool in tools:
            log(f"{tool.name}:")
            rows.append(measure(tool, paths[tool.target], args.repeat))

    summary = summarize(rows, cpu)
    print(table(rows, summary))
    print()
    for note in notes:
        print(f"note: {note}")
    for line in summary.verdicts + summary.findings:
        print(line)
    if args.results is not None:
        update_results(args.results, SECTION, report(rows, summary, tools, notes, args.repeat, tmpdir, cpu))
        print(f"wrote the {SECTION!r} section of {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
