"""`pmu report`: summarize a recording from `pmu record` per event and per thread, as text, CSV or JSON.

pandas and matplotlib are imported when the command runs, not when the parser is built, so that other
subcommands (`pmu stat`) start without them. The numbers come from `pmu.analysis.summary`.

A reader that goes away early (`pmu report | head`) ends the report quietly, as it ends `cat` or
`perf report --stdio`: the output is written with SIGPIPE's default action, so the process dies of
SIGPIPE (status 141 in the shell, which `set -o pipefail` sees as a broken pipe, not as an error of
pmu's) instead of printing a BrokenPipeError. Nothing is left half-done by then: plots are written first.
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from pmu.recording import DEFAULT_PATH

if TYPE_CHECKING:
    from pmu.analysis import EventSummary, Percentiles, Summary

DEFAULT_INPUT = DEFAULT_PATH
"""The file read without -i, as `pmu record` writes it without -o."""

CSV_FIELDS = (
    "event",
    "pid",
    "tid",
    "count",
    "duration_s",
    "rate_hz",
    "interarrival_p50_ns",
    "interarrival_p90_ns",
    "interarrival_p99_ns",
    "latency_p50_ns",
    "latency_p90_ns",
    "latency_p99_ns",
    "lost",
)
"""CSV columns: one row per event (pid and tid empty), then one per thread of that event."""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "report",
        help="summarize a recording per event and per thread",
        description="Summarize a pmu recording: per event and per thread, hit counts, rates, "
        "inter-arrival times and return-probe latencies.",
        usage="pmu report [-i FILE] [--plot DIR] [--format text|csv|json]",
    )
    p.add_argument(
        "-i",
        "--input",
        default=DEFAULT_INPUT,
        metavar="FILE",
        help=f"the recording (default {DEFAULT_INPUT})",
    )
    p.add_argument(
        "--plot",
        metavar="DIR",
        help="also write rates.png, interarrival.png and (for return probes) latency.png into DIR",
    )
    p.add_argument("--format", choices=("text", "csv", "json"), default="text", help="output format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pmu import analysis

    df = analysis.load(args.input)
    result = analysis.summary(df)
    if args.plot:
        analysis.write_plots(df, args.plot)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as cat does: see the module's docstring
    if args.format == "json":
        write_json(result, sys.stdout)
    elif args.format == "csv":
        write_csv(result, sys.stdout)
    else:
        write_text(result, sys.stdout)
    sys.stdout.flush()
    return 0


# --- outputs -----------------------------------------------------------------------------------------


def write_json(result: Summary, out: TextIO) -> None:
    """The summary as one JSON object (pmu.analysis.Summary's keys)."""
    json.dump(result, out, indent=2)
    out.write("\n")


def _num(value: float | int | None) -> str:
    return "" if value is None else repr(value)


def _pcts(p: Percentiles | None) -> list[str]:
    return ["", "", ""] if p is None else [_num(p["p50"]), _num(p["p90"]), _num(p["p99"])]


def write_csv(result: Summary, out: TextIO) -> None:
    """A header line, then per event a row with pid and tid empty followed by a row per thread."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for ev in result["events"]:
        lat = ev["latency_ns"]
        latency = ["", "", ""] if lat is None else [_num(lat["p50"]), _num(lat["p90"]), _num(lat["p99"])]
        w.writerow(
            [
                ev["event"],
                "",
                "",
                ev["count"],
                _num(ev["duration_s"]),
                _num(ev["rate_hz"]),
                *_pcts(ev["interarrival_ns"]),
                *latency,
                ev["lost"],
            ]
        )
        for t in ev["threads"]:
            w.writerow(
                [ev["event"], t["pid"], t["tid"], t["count"], _num(t["duration_s"]), _num(t["rate_hz"])]
                + [""] * 3
                + _pcts(t["latency_ns"])
                + [""]
            )


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _ns(p: Percentiles) -> str:
    return f"p50 {p['p50']:,.0f} ns  p90 {p['p90']:,.0f} ns  p99 {p['p99']:,.0f} ns"


def _event_lines(ev: EventSummary) -> Iterator[str]:
    name = ev["event"]
    yield f"# Event: {name}"
    yield f"# Samples: {ev['count']:,} of event '{name}'"
    yield f"# Event count: {ev['hits']:,}"
    if ev["count"]:
        yield f"# Duration: {ev['duration_s']:.6f} s, {_rate(ev['rate_hz'])} hits/s"
    if ev["interarrival_ns"] is not None:
        yield f"# Inter-arrival: {_ns(ev['interarrival_ns'])}"
    if ev["return_probe"]:
        lat = ev["latency_ns"]
        yield "# Latency: " + ("none recorded" if lat is None else f"{_ns(lat)} ({lat['count']:,} calls)")
    if ev["lost"]:
        yield f"# Lost records: {ev['lost']:,}"
    yield "#"
    timed = ev["latency_ns"] is not None  # a return probe: each thread's latency p50 and p99 too
    head = f"# {'Count':>10}  {'Percent':>7}  {'Hits/s':>14}  {'Duration/s':>11}  {'PID':>8}  {'TID':>8}"
    yield head + (f"  {'Lat p50 ns':>11}  {'Lat p99 ns':>11}" if timed else "")
    dots = f"  {'.' * 11}  {'.' * 11}" if timed else ""
    yield f"# {'.' * 10}  {'.' * 7}  {'.' * 14}  {'.' * 11}  {'.' * 8}  {'.' * 8}{dots}"
    yield "#"
    for t in ev["threads"]:
        share = 100.0 * t["count"] / ev["count"] if ev["count"] else 0.0
        cells = ""
        tl = t["latency_ns"]
        if timed:
            cells = f"  {'-':>11}  {'-':>11}" if tl is None else f"  {tl['p50']:>11,.0f}  {tl['p99']:>11,.0f}"
        yield (
            f"  {t['count']:>10,}  {share:>6.2f}%  {_rate(t['rate_hz']):>14}  {t['duration_s']:>11.6f}"
            f"  {t['pid']:>8}  {t['tid']:>8}{cells}"
        )
    cpus = ev["cpus"]
    if cpus:  # a system-wide recording: where the hits ran
        yield ""
        yield f"# {'Count':>10}  {'Percent':>7}  {'CPU':>5}"
        yield f"# {'.' * 10}  {'.' * 7}  {'.' * 5}"
        yield "#"
        for cpu, n in cpus.items():
            share = 100.0 * n / ev["count"] if ev["count"] else 0.0
            yield f"  {n:>10,}  {share:>6.2f}%  {cpu:>5}"
    yield ""


def write_text(result: Summary, out: TextIO) -> None:
    """Headers in the manner of `perf report --stdio` (`# Event: ...`), then a table of threads per event."""
    lines = [f"# pmu report of {result['path']}"]
    if result["command"]:
        lines.append(f"# Command: {' '.join(result['command'])}")
    if result["start_time"]:
        lines.append(f"# Started: {result['start_time']}")
    lines.append(f"# Records: {result['records']:,} over {result['duration_s']:.6f} s")
    if result["sample_period"] and result["sample_period"] > 1:
        lines.append(f"# Sample period: {result['sample_period']} (one record per that many hits)")
    if result["lost"]:
        lines.append(f"# Lost records: {result['lost']:,}")
    lines.append("#")
    lines.append("")
    for ev in result["events"]:
        lines.extend(_event_lines(ev))
    out.write("\n".join(lines))
