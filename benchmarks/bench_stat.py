"""Benchmark: per-hit overhead of `pmu stat` against ltrace, a kernel uprobe via perf, bpftrace, uftrace.

Every tool counts the calls of `work` in tests/targets/hot.c (`hot N` calls it N times). A tool's cost per
hit is the slope between two run sizes, (t(N2) - t(N1)) / (N2 - N1) on the median wall-clock time of R
runs each, so start-up drops out; subtracting the slope of the uninstrumented program gives the overhead
per hit. Where a tool reports a count it must equal N exactly. Prints a table; with --results, rewrites
that Markdown file with the machine, the table, the commands and the verdict "pmu <= 1/2 of ltrace".
It is a measurement, not a test: it exits 0 whatever the verdict.

    .venv/bin/python benchmarks/bench_stat.py [--quick] [--repeat R] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
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


@dataclass
class Row:
    """What was measured for one tool."""

    tool: Tool
    t1: list[float] = field(default_factory=list)
    t2: list[float] = field(default_factory=list)
    checked: str = ""
    error: str | None = None

    @property
    def slope(self) -> float:
        """Seconds per hit: the slope between the medians at N1 and N2."""
        t1, t2 = statistics.median(self.t1), statistics.median(self.t2)
        return (t2 - t1) / (self.tool.n2 - self.tool.n1)


# ---------------------------------------------------------------------------------------------- helpers


def run(argv: Sequence[str], timeout: float = RUN_TIMEOUT_S) -> tuple[float, Completed]:
    """Run argv to completion, capturing its output; return (wall-clock seconds, result)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, errors="replace", timeout=timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired as err:
        raise BenchError(f"timed out after {timeout:.0f} s: {shlex.join(argv)}") from err
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise BenchError(f"exit status {done.returncode}: {shlex.join(argv)}: {tail}")
    return elapsed, done


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


def compile_target(out: Path, flags: Sequence[str]) -> None:
    """gcc FLAGS -o out tests/targets/hot.c."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("bench_stat: needs gcc to build tests/targets/hot.c")
    subprocess.run([cc, *flags, "-o", str(out), str(SOURCE)], check=True)


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


def build_tools(hot: str, hot_fentry: str | None, tmp: Path, scale: float) -> tuple[list[Tool], list[str]]:
    """The rows to measure, and notes on the tools that are skipped."""

    def n(x: int) -> int:
        return max(100, int(x * scale))

    notes: list[str] = []
    tools = [
        Tool("baseline", n(2_000_000), n(20_000_000), lambda h, k: [h, k], baseline=None),
        Tool(
            "pmu stat",
            n(2_000),
            n(20_000),
            lambda h, k: [
                sys.executable,
                "-m",
                "pmu",
                "stat",
                "-x,",
                "-e",
                f"uprobe:{h}:{SYMBOL}",
                "--",
                h,
                k,
            ],
            count=lambda done: csv_count(done.stderr, "uprobe:"),
        ),
    ]

    if shutil.which("ltrace"):

        def ltrace_verify(h: str) -> str:
            out = tmp / "ltrace.out"
            small = 1000
            run(["ltrace", "-x", SYMBOL, "-o", str(out), h, str(small)])
            seen = sum(1 for line in out.read_text().splitlines() if line.startswith(f"{SYMBOL}("))
            if seen != small:
                raise BenchError(f"ltrace saw {seen} calls of {SYMBOL} at N={small}, not {small}")
            return f"{small} at N={small}"

        tools.append(
            Tool(
                "ltrace",
                n(2_000),
                n(20_000),
                lambda h, k: ["ltrace", "-x", SYMBOL, "-o", "/dev/null", h, k],
                verify=ltrace_verify,
            )
        )
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
                note=f"OFFSET = {SYMBOL}'s file offset: vaddr - PT_LOAD p_vaddr + p_offset ({offset})",
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
                    elapsed, done = run(tool.argv(path, str(size)))
                    times.append(elapsed)
                    if tool.count is not None:
                        got = tool.count(done)
                        if got != size:
                            raise BenchError(f"counted {got} hits of {SYMBOL} at N={size}, not {size}")
                    log(f"  {tool.name:<26} N={size:<10} {elapsed:8.3f} s")
            if tool.count is not None:
                checks.append(f"= N in all {2 * repeat} runs")
            row.checked = "; ".join(checks) or "not reported"
    except BenchError as err:
        row.error = str(err)
        log(f"  {tool.name}: FAILED: {err}")
    return row


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Summary:
    """Overheads per hit (seconds) by tool name, and the acceptance verdict."""

    overhead: dict[str, float]
    verdict: str


def summarize(rows: list[Row]) -> Summary:
    slopes = {r.tool.name: r.slope for r in rows if r.error is None}
    overhead: dict[str, float] = {}
    for r in rows:
        if r.error is None and r.tool.baseline is not None and r.tool.baseline in slopes:
            overhead[r.tool.name] = slopes[r.tool.name] - slopes[r.tool.baseline]
    pmu, ltrace = overhead.get("pmu stat"), overhead.get("ltrace")
    if pmu is None or ltrace is None:
        missing = " and ".join(name for name, v in (("pmu stat", pmu), ("ltrace", ltrace)) if v is None)
        verdict = f"pmu overhead per hit <= 1/2 of ltrace's: FAIL (not measured: {missing})"
    else:
        ratio = pmu / ltrace
        result = "PASS" if pmu <= ltrace / 2 else "FAIL"
        verdict = f"pmu overhead per hit <= 1/2 of ltrace's: {result} (ratio {ratio:.3f})"
    return Summary(overhead, verdict)


def table(rows: list[Row], summary: Summary) -> str:
    """The results as a Markdown table."""
    head = [
        "tool",
        "N1",
        "N2",
        "median t(N1) s",
        "median t(N2) s",
        "µs/hit raw",
        "overhead µs/hit",
        "ratio to pmu",
        "hits checked",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    pmu = summary.overhead.get("pmu stat")
    for r in rows:
        t = r.tool
        if r.error is not None:
            cells = [t.name, f"{t.n1:,}", f"{t.n2:,}", "-", "-", "-", "-", "-", f"FAILED: {r.error}"]
        else:
            over = summary.overhead.get(t.name)
            ratio = "-" if over is None or not pmu else f"{over / pmu:.3g}"
            cells = [
                t.name,
                f"{t.n1:,}",
                f"{t.n2:,}",
                f"{statistics.median(r.t1):.3f}",
                f"{statistics.median(r.t2):.3f}",
                f"{r.slope * 1e6:.4g}",
                "-" if over is None else f"{over * 1e6:.4g}",
                ratio,
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


def commands(tools: list[Tool], tmp: str) -> list[str]:
    """The exact commands, with $HOT for the build, $TMP for the scratch directory and N for the size."""
    placeholder = {"hot": "$HOT", "hot-fentry": "$HOT_FENTRY"}
    out = [
        f"gcc {shlex.join(CC_FLAGS)} -o $HOT tests/targets/hot.c",
        f"gcc {shlex.join(CC_FLAGS_FENTRY)} -o $HOT_FENTRY tests/targets/hot.c   # uftrace only",
    ]
    for t in tools:
        argv = [("python" if a == sys.executable else a) for a in t.argv(placeholder[t.target], "N")]
        shown = " ".join(shell_word(a.replace(tmp, "$TMP")) for a in argv)
        if t.context is not None:
            out.append(f"echo 'p:{PROBE} '$HOT:OFFSET >> /sys/kernel/tracing/uprobe_events")
        out.append(f"{shown}   # {t.name}, N in ({t.n1}, {t.n2})")
        if t.context is not None:
            out.append(f"echo '-:{PROBE}' >> /sys/kernel/tracing/uprobe_events")
    return out


def report(
    rows: list[Row], summary: Summary, tools: list[Tool], notes: list[str], repeat: int, tmp: str
) -> str:
    today = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    notes = notes + [f"{t.name}: {t.note}" for t in tools if t.note]
    parts = [
        "# pmu stat: overhead per hit against peers",
        "",
        "Written by `benchmarks/bench_stat.py --results benchmarks/RESULTS.md`; rerun it to refresh.",
        "",
        f"- date: {today}",
        f"- machine: {machine()}",
        f"- method: wall-clock time of whole runs, median of {repeat} per size; cost per hit = "
        "(t(N2) - t(N1)) / (N2 - N1), so start-up drops out; overhead = that minus the slope of the "
        "uninstrumented program (its own build's, for uftrace). `hot N` calls `work` N times. "
        "Rows marked (context) are extra peers, not part of the check.",
        "",
        table(rows, summary),
        "",
        f"**{summary.verdict}**",
        "",
        "## Commands",
        "",
        "```sh",
        *commands(tools, tmp),
        "```",
    ]
    if notes:
        parts += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", "-r", type=int, default=3, help="runs per size; the median is used")
    parser.add_argument("--quick", action="store_true", help="run sizes / 4, for a fast look")
    parser.add_argument("--results", type=Path, help="rewrite this Markdown file with the results")
    parser.add_argument("--only", help="comma-separated tool names (prefixes) to run; baselines always run")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    with tempfile.TemporaryDirectory(prefix="pmu-bench-") as tmpdir:
        tmp = Path(tmpdir)
        hot = tmp / "hot"
        compile_target(hot, CC_FLAGS)
        hot_fentry: Path | None = tmp / "hot-fentry"
        try:
            compile_target(tmp / "hot-fentry", CC_FLAGS_FENTRY)
        except subprocess.CalledProcessError:
            hot_fentry = None
        paths = {"hot": str(hot), "hot-fentry": str(hot_fentry)}
        tools, notes = build_tools(
            str(hot), None if hot_fentry is None else str(hot_fentry), tmp, 0.25 if args.quick else 1.0
        )
        if args.only:
            wanted = [w.strip() for w in args.only.split(",")]
            tools = [t for t in tools if t.baseline is None or any(t.name.startswith(w) for w in wanted)]
        rows = []
        for tool in tools:
            log(f"{tool.name}:")
            rows.append(measure(tool, paths[tool.target], args.repeat))

    summary = summarize(rows)
    print(table(rows, summary))
    print()
    for note in notes:
        print(f"note: {note}")
    print(summary.verdict)
    if args.results is not None:
        args.results.write_text(report(rows, summary, tools, notes, args.repeat, tmpdir))
        print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
