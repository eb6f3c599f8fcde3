"""The `pmu stat` printer: counts laid out byte for byte as perf 6.1's `perf stat` prints them (text, -x, -j).

Scripts written against `perf stat -x,` or `perf stat -j` must run unchanged on pmu's output, so every
width, separator and quirk below was taken from the perf 6.1 binary (util/stat-display.c), not guessed:

- text: a count is `%'18.0f` (grouped by the locale's LC_NUMERIC, as printf's `'` flag does), a 4-wide unit
  column, then the name padded to 32 columns, or to 25 for `<not counted>` (perf 6.1 takes another code
  path there), then 35 columns of empty metric, then `  (xx.xx%)` when the event ran for less time than it
  was enabled. `--per-thread` lines start with `%16s-%-8d ` (COMM right-aligned, TID left-aligned).
- CSV: `count,unit,event,run-time,percent,,` (the two empty fields are the metric value and unit); the
  percentage is integer-divided before it is printed (`100 * run / ena` in u64, so 66.67% prints 66.00),
  and the text output alone prints the exact one. No header and no time lines.
- JSON: one object per line with perf's keys and its ` : ` spacing; the count is a string with six
  decimals, `metric-unit` is "(null)" for a counted event (perf prints a NULL pointer) and "" otherwise.
- A multiplexed count is scaled as perf scales it: `(u64)((double)val * ena / run)`, truncated.
- Per-thread lines are grouped by event, threads sorted by count, highest first, as perf 6.1 sorts them.
"""

from __future__ import annotations

import dataclasses
import json as _json
import locale
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from pmu.events.event import Counts

NOT_COUNTED = "<not counted>"
"""What perf prints in the count field of an event that never ran (time_running or time_enabled is 0)."""
NOT_SUPPORTED = "<not supported>"
"""What perf prints for an event the machine cannot count (a hardware event without a hardware PMU)."""

COUNTS_LEN = 18
"""Width of the count column in text output."""
UNIT_LEN = 4
"""Width of the unit column in text output (perf's unit_width, strlen("unit"); longer units overflow)."""
EVNAME_LEN = 32
"""Width of the event-name column of a counted event in text output."""
EVNAME_LEN_NOT_COUNTED = 25
"""Width of the event-name column of a `<not counted>` event in text output (perf 6.1 quirk)."""
METRIC_LEN = 35
"""Width of the (empty, for probes) metric column that follows the event name in text output."""
COMM_LEN = 16
"""Width of the right-aligned COMM in a --per-thread text line."""
TID_LEN = 8
"""Width of the left-aligned TID in a --per-thread text line."""

_CHAR_MAX = 127
"""localeconv()'s grouping value meaning "no further grouping"."""


@dataclass(frozen=True)
class StatLine:
    """One event's result, for the whole run or (with --per-thread) for one thread."""

    event: str
    """The event name as the user wrote it."""
    counts: Counts | None
    """The reading; None when the event was never enabled or never ran (`<not counted>`)."""
    thread: str | None = None
    """"COMM-TID" for --per-thread lines, None otherwise."""
    unit: str = ""
    """The event's unit (empty for probes; `msec` for task-clock and cpu-clock, whose count is in ns
    and printed in msec with two decimals, as perf's)."""
    metric: tuple[float, str] | None = None
    """perf's shadow metric for the line, (value, unit): `CPUs utilized`, `K/sec`; None for none."""
    supported: bool = True
    """False: the machine cannot count the event (`<not supported>`)."""
    cpu: int | None = None
    """With -A (per-CPU output): the CPU of the line."""


@dataclass(frozen=True)
class StatReport:
    """Everything `pmu stat` prints at the end of a run."""

    command: list[str]
    """The command line, for the header "Performance counter stats for 'CMD':"."""
    lines: list[StatLine]
    elapsed_s: float
    """Wall-clock seconds from start to end of the measurement."""
    user_s: float
    """User CPU seconds of the command (printed only when pmu launched it)."""
    sys_s: float
    """System CPU seconds of the command (printed only when pmu launched it)."""
    target: str | None = None
    """What was attached to instead of a command, e.g. "process id '1234'" or "thread id '1234'"."""
    per_thread: bool = False
    """One line per event and thread, each led by its COMM-TID, as `perf stat --per-thread`."""
    system_wide: bool = False
    """A system-wide run (-a/-C): the header says 'system wide' and no user/sys times follow."""
    cpu_list: str | None = None
    """-C's list as given: the header says 'CPU(s) LIST' instead, as perf's."""


@dataclass(frozen=True)
class NumberFormat:
    """How the text output writes numbers: the LC_NUMERIC conventions that perf's printf follows.

    perf calls setlocale(LC_ALL, "") and prints counts with `%'18.0f`, so under en_US a count reads
    1,234,567, under de_DE 1.234.567 and under C (or C.UTF-8) 1234567; decimal points follow the locale
    too. CSV and JSON always use the C conventions (perf would break its own CSV and JSON under de_DE).
    """

    thousands_sep: str = ""
    decimal_point: str = "."
    grouping: tuple[int, ...] = ()
    """Group sizes from the right, as localeconv() gives them: 0 repeats the last, 127 stops grouping."""

    @classmethod
    def from_locale(cls) -> NumberFormat:
        """The process's current LC_NUMERIC (the stat command sets it from the environment, as perf does)."""
        conv = locale.localeconv()
        sep, point, grouping = conv["thousands_sep"], conv["decimal_point"], conv["grouping"]
        return cls(
            thousands_sep=sep if isinstance(sep, str) else "",
            decimal_point=point if isinstance(point, str) and point else ".",
            grouping=tuple(grouping) if isinstance(grouping, list) else (),
        )

    def count(self, value: float) -> str:
        """`%'.0f`: the value rounded to an integer, digits grouped."""
        text = f"{value:.0f}"
        sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
        return sign + self._group(digits)

    def grouped(self, value: float, decimals: int) -> str:
        """`%'.Nf`: digits grouped, the locale's decimal point (perf's msec counts)."""
        text = f"{value:.{decimals}f}"
        whole, _, frac = text.partition(".")
        out = self.count(float(whole)) if whole not in ("-0",) else "-0"
        return out + (self.decimal_point + frac if decimals else "")

    def fixed(self, value: float, decimals: int) -> str:
        """`%.Nf` with the locale's decimal point (perf groups only counts, not times or percentages)."""
        return f"{value:.{decimals}f}".replace(".", self.decimal_point)

    def _group(self, digits: str) -> str:
        if not self.thousands_sep:
            return digits
        groups: list[str] = []
        end = len(digits)
        for size in self._sizes():
            if end <= size:
                break
            groups.append(digits[end - size : end])
            end -= size
        groups.append(digits[:end])
        return self.thousands_sep.join(reversed(groups))

    def _sizes(self) -> Iterator[int]:
        last: int | None = None
        for size in self.grouping:
            if size == 0:
                if last is None:
                    return
                while True:
                    yield last
            if size <= 0 or size >= _CHAR_MAX:
                return
            yield size
            last = size


C_NUMBERS = NumberFormat()
"""The C locale: no thousands separator, "." decimal point."""


@dataclass(frozen=True)
class _Reading:
    """A line's numbers as perf prints them."""

    value: float | None
    """The count (scaled when multiplexed), None when perf would print `<not counted>`."""
    run: int
    ena: int
    absent: str = NOT_COUNTED
    """What the count field says when value is None."""

    @property
    def csv_percent(self) -> float:
        """perf's CSV/JSON percentage: 100 unless run != ena, then 100 * run / ena in integer (u64) math."""
        if self.run == self.ena or self.ena == 0:
            return 100.0
        return float(100 * self.run // self.ena)


def _read(line: StatLine) -> _Reading:
    counts = line.counts
    if not line.supported:
        return _Reading(None, 0, 0, NOT_SUPPORTED)
    if counts is None:
        return _Reading(None, 0, 0)
    run, ena = counts.time_running, counts.time_enabled
    if run == 0 or ena == 0:
        return _Reading(None, run, ena)
    value = counts.value
    if run < ena:
        # perf_counts_values__scale: (u64)((double)val * ena / run), in that order, truncated.
        value = int(float(value) * ena / run)
    return _Reading(float(value), run, ena)


def _ordered(report: StatReport) -> list[StatLine]:
    """Lines in perf's order: as given, or with --per-thread each event's threads by count, highest first."""
    if not report.per_thread or any(line.cpu is not None for line in report.lines):
        return list(report.lines)
    by_event: dict[str, list[StatLine]] = {}
    for line in report.lines:
        if line.thread is None:
            raise ValueError(f"per-thread report has a line without a thread: {line.event}")
        by_event.setdefault(line.event, []).append(line)
    ordered: list[StatLine] = []
    for lines in by_event.values():
        ordered.extend(sorted(lines, key=lambda line: -(_read(line).value or 0.0)))
    return ordered


def _thread_std(thread: str) -> str:
    comm, dash, tid = thread.rpartition("-")
    if not dash:
        comm, tid = thread, ""
    return f"{comm:>{COMM_LEN}}-{tid:<{TID_LEN}} "


def _is_msec(line: StatLine) -> bool:
    return line.unit == "msec"


def _text_metric(line: StatLine, numbers: NumberFormat) -> str:
    """perf's print_metric_std: ` # ` then `%8.3f`, a space, the unit padded to fill METRIC_LEN."""
    if line.metric is None:
        return " " * METRIC_LEN
    value, unit = line.metric
    head = f" # {numbers.fixed(value, 3):>8}"
    return head + " " + f"{unit:<{METRIC_LEN - len(head) - 1}}"


def _text_line(line: StatLine, per_thread: bool, numbers: NumberFormat) -> str:
    reading = _read(line)
    prefix = _thread_std(line.thread or "") if per_thread and line.cpu is None else ""
    if line.cpu is not None:
        prefix = f"CPU{line.cpu:<7} "
    if reading.value is None:
        fields = (
            f"{reading.absent:>{COUNTS_LEN}} {line.unit:<{UNIT_LEN}} {line.event:<{EVNAME_LEN_NOT_COUNTED}}"
        )
        metric = " " * METRIC_LEN
    else:
        if _is_msec(line):
            count = numbers.grouped(reading.value / 1e6, 2)
        else:
            count = numbers.count(reading.value)
        fields = f"{count:>{COUNTS_LEN}} {line.unit:<{UNIT_LEN}} {line.event:<{EVNAME_LEN}}"
        metric = _text_metric(line, numbers)
    running = ""
    if reading.run != reading.ena:
        running = f"  ({numbers.fixed(100.0 * reading.run / reading.ena, 2)}%)"
    return prefix + fields + metric + running


def format_text(report: StatReport, numbers: NumberFormat | None = None) -> str:
    """`perf stat`'s default output: header, one line per event, elapsed time, and user/sys for commands.

    numbers: how to write counts and decimals; None reads the process's current LC_NUMERIC.
    """
    numbers = NumberFormat.from_locale() if numbers is None else numbers
    what = report.target if report.target is not None else "'" + " ".join(report.command) + "'"
    if report.system_wide:
        what = f"'CPU(s) {report.cpu_list}'" if report.cpu_list else "'system wide'"
    out = [f"\n Performance counter stats for {what}:\n\n"]
    out.extend(_text_line(line, report.per_thread, numbers) + "\n" for line in _ordered(report))
    out.append(f"\n {numbers.fixed(report.elapsed_s, 9):>17} seconds time elapsed")
    if report.target is None and not report.system_wide:
        # perf shows the rusage of a command it launched, never of a process it attached to.
        out.append(f"\n\n {numbers.fixed(report.user_s, 9):>17} seconds user\n")
        out.append(f" {numbers.fixed(report.sys_s, 9):>17} seconds sys\n")
    out.append("\n\n")
    return "".join(out)


def format_csv(report: StatReport, sep: str) -> str:
    """`perf stat -x SEP`: `[COMM-TID,]count,unit,event,run-time,percent,,` per line; nothing else."""
    out: list[str] = []
    for line in _ordered(report):
        reading = _read(line)
        fields = [line.thread or ""] if report.per_thread and line.cpu is None else []
        if line.cpu is not None:
            fields = [f"CPU{line.cpu}"]
        if reading.value is None:
            fields.append(reading.absent)
        elif _is_msec(line):
            fields.append(f"{reading.value / 1e6:.2f}")
        else:
            fields.append(f"{reading.value:.0f}")
        fields += [line.unit, line.event, str(reading.run), f"{reading.csv_percent:.2f}"]
        if line.metric is not None and reading.value is not None:
            fields += [f"{line.metric[0]:.3f}", line.metric[1]]
        else:
            fields += ["", ""]
        out.append(sep.join(fields) + "\n")
    return "".join(out)


def _quote(text: str) -> str:
    return _json.dumps(text, ensure_ascii=False)


def format_json(report: StatReport) -> str:
    """`perf stat -j`: one JSON object per line, perf's keys in perf's order and spacing."""
    out: list[str] = []
    for line in _ordered(report):
        reading = _read(line)
        items: list[tuple[str, str]] = []
        if line.cpu is not None:
            items.append(("cpu", _quote(str(line.cpu))))
        elif report.per_thread:
            items.append(("thread", _quote(line.thread or "")))
        if reading.value is None:
            value = reading.absent
        else:
            value = f"{reading.value / 1e6 if _is_msec(line) else reading.value:f}"
        metric_value, metric_unit = 0.0, "" if reading.value is None else "(null)"
        if line.metric is not None and reading.value is not None:
            metric_value, metric_unit = line.metric
        items += [
            ("counter-value", _quote(value)),
            ("unit", _quote(line.unit)),
            ("event", _quote(line.event)),
            ("event-runtime", str(reading.run)),
            ("pcnt-running", f"{reading.csv_percent:.2f}"),
            ("metric-value", f"{metric_value:f}"),
            ("metric-unit", _quote(metric_unit)),
        ]
        out.append("{" + ", ".join(f"{_quote(key)} : {value}" for key, value in items) + "}\n")
    return "".join(out)


def write(
    report: StatReport,
    stream: TextIO,
    csv_sep: str | None = None,
    json: bool = False,
    numbers: NumberFormat | None = None,
) -> None:
    """Print the report as perf would with the same options: -j (json), -x SEP (csv_sep), or text.

    csv_sep is used as given: turning the two characters `\\t` into a tab, as perf does, is the
    option parser's job. numbers applies to the text output only (see format_text).
    """
    if json and csv_sep is not None:
        raise ValueError("CSV and JSON output are mutually exclusive")
    if json:
        stream.write(format_json(report))
    elif csv_sep is not None:
        stream.write(format_csv(report, csv_sep))
    else:
        stream.write(format_text(report, numbers))


def shadow_metrics(lines: list[StatLine], elapsed_s: float) -> list[StatLine]:
    """The lines with perf 6.1's generic shadow metrics (stat-shadow.c) filled in, per aggregation unit
    (the whole run, each thread, each CPU): task-clock and cpu-clock get `CPUs utilized` (their time
    over the wall-clock time); every other counted event next to one gets its rate per second of it,
    in /sec, K/sec, M/sec or G/sec (convert_unit_double)."""
    clock: dict[tuple[str | None, int | None], float] = {}
    for line in lines:
        reading = _read(line)
        if _is_msec(line) and reading.value is not None:
            clock.setdefault((line.thread, line.cpu), reading.value)
    out: list[StatLine] = []
    for line in lines:
        reading = _read(line)
        metric: tuple[float, str] | None = None
        if reading.value is not None:
            nsecs = clock.get((line.thread, line.cpu))
            if _is_msec(line):
                metric = (reading.value / (elapsed_s * 1e9) if elapsed_s > 0 else 0.0, "CPUs utilized")
            elif nsecs is not None:
                metric = _rate(1e9 * reading.value / nsecs if nsecs else 0.0)
        out.append(dataclasses.replace(line, metric=metric))
    return out


def _rate(per_sec: float) -> tuple[float, str]:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if per_sec > scale:
            return per_sec / scale, f"{prefix}/sec"
    return per_sec, "/sec"
