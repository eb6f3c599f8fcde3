"""`pmu stat`: count probe hits over a command's run and print them as perf stat does."""

from __future__ import annotations

import argparse
import contextlib
import locale
import sys

from pmu.commands.options import (
    add_event_options,
    add_target_options,
    command,
    ids,
    launched,
    report_engines_and_errors,
)
from pmu.errors import FileError, UsageError
from pmu.events.attr import EventAttr
from pmu.events.spec import parse_event_list
from pmu.evlist import Evlist
from pmu.output.stat import NumberFormat, StatLine, StatReport, write


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "stat",
        help="count probe hits while a command runs",
        description="Count uprobe hits while COMMAND runs, like perf stat.",
        usage="pmu stat -e EVENT [-e EVENT...] [options] -- COMMAND [ARGS...]",
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
    p.add_argument("-o", "--output", metavar="FILE", help="write the counts to FILE instead of stderr")
    add_target_options(p)
    p.set_defaults(func=run)


def build_attrs(args: argparse.Namespace) -> list[EventAttr]:
    """The EventAttrs a `pmu stat` command line asks for (checked by tests without running anything)."""
    if not args.event:
        raise UsageError("no events given: use -e EVENT (for example -e uprobe:./prog:main)")
    specs = parse_event_list(args.event)
    at_exec = launched(args)
    return [
        EventAttr(
            probe=spec,
            disabled=at_exec,
            enable_on_exec=at_exec,
            inherit=not args.no_inherit,
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
    if args.sep == "\\t":
        args.sep = "\t"
    cmd = command(args)
    pids, tids = ids(args.pid, "pid"), ids(args.tid, "tid")
    evlist = Evlist(attrs, optimize=not args.no_optimize)
    target: str | None = None
    if pids or tids:
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
        if args.per_thread or args.per_process:
            rows = evlist.per_task(evsel) if args.per_thread else evlist.per_process(evsel)
            for task, counts in rows:
                if counts.value:
                    label = f"{task.comm}-{task.tid if args.per_thread else task.pid}"
                    lines.append(StatLine(evsel.name, counts, thread=label))
        else:
            lines.append(StatLine(evsel.name, evlist.read(evsel)))
    report = StatReport(
        command=cmd,
        lines=lines,
        elapsed_s=result.elapsed_s,
        user_s=result.user_s,
        sys_s=result.sys_s,
        target=target,
        per_thread=args.per_thread or args.per_process,
    )
    numbers = _numbers()
    if args.output:
        try:
            with open(args.output, "w") as f:
                write(report, f, csv_sep=args.sep, json=args.json, numbers=numbers)
        except OSError as err:
            raise FileError(f"cannot write {args.output}: {err.strerror}") from None
    else:
        write(report, sys.stderr, csv_sep=args.sep, json=args.json, numbers=numbers)
    report_engines_and_errors(evlist, args.verbose)
    return result.status
