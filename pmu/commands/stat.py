"""`pmu stat`: count probe hits over a command's run and print them as perf stat does."""

from __future__ import annotations

import argparse
import contextlib
import json
import locale
import sys

from pmu.commands.options import (
    add_event_options,
    add_target_options,
    command,
    engine,
    ids,
    launched,
    pmu_for,
    report_engines_and_errors,
    system_wide_cpus,
)
from pmu.core import Latency
from pmu.errors import FileError, UsageError
from pmu.events.attr import EventAttr
from pmu.events.counters import DEFAULT_SET
from pmu.events.spec import EventSpec, ProbeKind, ProbeSpec, parse_event_list
from pmu.evlist import Evlist
from pmu.output.stat import NumberFormat, StatLine, StatReport, shadow_metrics, write


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "stat",
        help="count probe hits while a command runs",
        description="Count uprobe hits and kernel counters while COMMAND runs, like perf stat "
        "(without -e: perf's default set of counters).",
        usage="pmu stat [-e EVENT...] [options] -- COMMAND [ARGS...]",
    )
    add_event_options(p)
    p.add_argument(
        "-x",
        "--field-separator",
        dest="sep",
        metavar="SEP",
        help="print CSV-style output with SEP between fields, as perf stat -x",
    )
    p.add_argument("-j", "--json", action="store_true", help="print one JSON object per counter")
    p.add_argument("--per-thread", action="store_true", help="one line per thread that hit")
    p.add_argument(
        "--per-process", action="store_true", help="one line per process that hit (children apart)"
    )
    p.add_argument(
        "-A", "--no-aggr", action="store_true", help="with -a/-C: one line per CPU, as perf stat -A"
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write the counts to FILE instead of stderr")
    p.add_argument(
        "--latency",
        action="store_true",
        help="for return probes (uretprobe:): each call's latency into a log2 histogram, then its mean"
        " and percentiles (no record per call)",
    )
    add_target_options(p)
    p.set_defaults(func=run)


def build_attrs(args: argparse.Namespace) -> list[EventAttr]:
    """The EventAttrs a `pmu stat` command line asks for (checked by tests without running anything)."""
    system_wide = system_wide_cpus(args) is not None
    if not args.event and not (command(args) or args.pid or args.tid or system_wide):
        raise UsageError("no events given: use -e EVENT (for example -e uprobe:./prog:main)")
    default = DEFAULT_SET
    if system_wide:  # perf 6.1 counts cpu-clock, not task-clock, system-wide
        default = ("cpu-clock", *DEFAULT_SET[1:])
    specs = parse_event_list(args.event or [",".join(default)])
    at_exec = launched(args) and not system_wide
    used = engine(args)

    def returns(spec: EventSpec) -> bool:
        return isinstance(spec, ProbeSpec) and spec.kind is ProbeKind.URETPROBE

    if getattr(args, "latency", False) and not any(returns(spec) for spec in specs):
        raise UsageError("--latency measures return probes: give one with -e uretprobe:TARGET:FUNCTION")
    return [
        EventAttr(
            spec=spec,
            pmu=pmu_for(spec, used),
            disabled=at_exec or system_wide,
            enable_on_exec=at_exec,
            inherit=not args.no_inherit,
            latency=getattr(args, "latency", False) and returns(spec),
        )
        for spec in specs
    ]


def _numbers() -> NumberFormat:
    """The locale's number format, as perf uses it; counts are grouped by thousands even in C."""
    with contextlib.suppress(locale.Error):
        locale.setlocale(locale.LC_NUMERIC, "")
    numbers = NumberFormat.from_locale()
    if not numbers.thousands_sep:
        numbers = NumberFormat(thousands_sep=",", decimal_point=numbers.decimal_point, grouping=(3, 0))
    return numbers


def run(args: argparse.Namespace) -> int:
    attrs = build_attrs(args)
    if args.sep is not None and args.json:
        raise UsageError("-x and -j cannot be used together")
    if args.per_thread and args.per_process:
        raise UsageError("--per-thread and --per-process cannot be used together")
    cpus = system_wide_cpus(args)
    if args.no_aggr and cpus is None:
        raise UsageError("-A (one line per CPU) needs -a or -C")
    if args.sep == "\\t":
        args.sep = "\t"
    cmd = command(args)
    pids, tids = ids(args.pid, "pid"), ids(args.tid, "tid")
    evlist = Evlist(attrs, optimize=not args.no_optimize)
    target: str | None = None
    if cpus is not None:
        result = evlist.run_system_wide(cpus, cmd)
    elif pids or tids:
        result = evlist.run_attached(pids, tids, cmd)
        target = (
            f"process id '{','.join(map(str, pids))}'" if pids else f"thread id '{','.join(map(str, tids))}'"
        )
    elif cmd:
        result = evlist.run_command(cmd)
    else:
        raise UsageError("no command given: pmu stat -e EVENT -- COMMAND [ARGS...] (or -p PID)")
    lines: list[StatLine] = []
    for evsel in evlist.evsels:
        unit = evsel.attr.counter.unit if evsel.attr.counter is not None else ""
        supported = evlist.supported(evsel)
        if args.no_aggr:
            for task, counts in evlist.per_task(evsel):
                cpu = getattr(task, "cpu", None)
                lines.append(StatLine(evsel.name, counts, unit=unit, supported=supported, cpu=cpu))
        elif args.per_thread or args.per_process:
            rows = evlist.per_task(evsel) if args.per_thread else evlist.per_process(evsel)
            for task, counts in rows:
                if counts.value:
                    label = f"{task.comm}-{task.tid if args.per_thread else task.pid}"
                    lines.append(StatLine(evsel.name, counts, thread=label, unit=unit))
        else:
            lines.append(StatLine(evsel.name, evlist.read(evsel), unit=unit, supported=supported))
    lines = shadow_metrics(lines, result.elapsed_s)
    report = StatReport(
        command=cmd,
        lines=lines,
        elapsed_s=result.elapsed_s,
        user_s=result.user_s,
        sys_s=result.sys_s,
        target=target,
        per_thread=args.per_thread or args.per_process,
        system_wide=cpus is not None,
        cpu_list=args.cpu,
    )
    numbers = _numbers()
    latencies = [(evsel.name, evlist.latency(evsel)) for evsel in evlist.evsels] if args.latency else []
    after = "".join(
        latency_line(name, lat, args.sep, args.json) for name, lat in latencies if lat is not None
    )
    if args.output:
        try:
            with open(args.output, "w") as f:
                write(report, f, csv_sep=args.sep, json=args.json, numbers=numbers)
                f.write(after)
        except OSError as err:
            raise FileError(f"cannot write {args.output}: {err.strerror}") from None
    else:
        write(report, sys.stderr, csv_sep=args.sep, json=args.json, numbers=numbers)
        sys.stderr.write(after)
    report_engines_and_errors(evlist, args.verbose)
    return result.status


PERCENTILES = (50, 90, 99)


def latency_line(name: str, lat: Latency, sep: str | None, as_json: bool) -> str:
    """One event's latencies: calls, mean, and p50/p90/p99 as the top of their log2 bucket (so "p99 <=
    X"), in the output's form (text comment, -x fields, -j object)."""
    calls = lat.calls
    mean = lat.total_ns // calls if calls else 0
    tops = [lat.percentile(q) for q in PERCENTILES]
    if as_json:
        fields = {"event": name, "latency-calls": calls, "latency-mean-ns": mean}
        fields.update({f"latency-p{q}-ns": top for q, top in zip(PERCENTILES, tops, strict=True)})
        return json.dumps(fields) + "\n"
    if sep is not None:
        return sep.join([name, "latency", str(calls), str(mean), *map(str, tops)]) + "\n"
    shown = ", ".join(f"p{q} <= {top:,} ns" for q, top in zip(PERCENTILES, tops, strict=True))
    return f"# latency of {name}: {calls:,} calls, mean {mean:,} ns; {shown} (log2 buckets)\n"
