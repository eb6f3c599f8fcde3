"""Options stat and record share: events, what to run or attach to, and how probes are served."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pmu.errors import UsageError

if TYPE_CHECKING:
    from pmu.evlist import Evlist


def add_event_options(p: argparse.ArgumentParser, kinds: str = "uprobe:|uretprobe:") -> None:
    """-e, and the engine switches (--no-optimize, -v)."""
    p.add_argument(
        "-e",
        "--event",
        action="append",
        default=[],
        metavar="EVENT",
        help=f"[{kinds}]TARGET:LOCATION (repeatable, or comma-separated)",
    )
    p.add_argument(
        "--no-optimize",
        action="store_true",
        help="use int3 probes everywhere (default: jump-optimized probes where it is safe)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="say how each probe is served")


def add_target_options(p: argparse.ArgumentParser) -> None:
    """What to measure: a command (after --), running processes (-p) or threads (-t); -i."""
    p.add_argument(
        "-i",
        "--no-inherit",
        action="store_true",
        help="do not follow forked children (threads are always followed)",
    )
    p.add_argument("-p", "--pid", metavar="PID[,PID...]", help="attach to running processes (every thread)")
    p.add_argument("-t", "--tid", metavar="TID[,TID...]", help="attach to single threads")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run")


def command(args: argparse.Namespace) -> list[str]:
    """The command line after `--` (or after the options)."""
    cmd = list(args.command)
    return cmd[1:] if cmd and cmd[0] == "--" else cmd


def launched(args: argparse.Namespace) -> bool:
    """pmu runs the command itself (rather than attaching): events open disabled, enabled at exec."""
    return bool(command(args)) and not (args.pid or args.tid)


def ids(text: str | None, what: str) -> list[int]:
    """A -p/-t list: numbers separated by commas."""
    if not text:
        return []
    try:
        found = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"bad {what} list '{text}': expected numbers separated by commas") from None
    if not found or any(i <= 0 for i in found):
        raise UsageError(f"bad {what} list '{text}'")
    return found


def report_engines_and_errors(evlist: Evlist, verbose: bool) -> None:
    """After a run: with -v, how each event's probe was served; always, events that failed to arm."""
    if verbose:
        for evsel in evlist.evsels:
            sys.stderr.write(f"pmu: {evsel.name}: {evlist.describe(evsel)}\n")
    for line in evlist.errors():
        sys.stderr.write(f"pmu: {line}\n")
