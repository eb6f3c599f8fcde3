"""Options stat and record share: events, what to run or attach to, and how probes are served."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pmu.commands import targets
from pmu.errors import UsageError
from pmu.events.counters import CounterSpec
from pmu.events.spec import EventSpec

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
    p.add_argument(
        "--engine",
        choices=("ptrace", "kernel"),
        help="who serves uprobes: pmu's ptrace engine (default) or the kernel's uprobe PMU "
        "(perf_event_open; the default with -a, and the way to count a process a debugger traces)",
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
    p.add_argument("-a", "--all-cpus", action="store_true", help="system-wide: every process, on every CPU")
    p.add_argument("-C", "--cpu", metavar="CPU[,CPU-CPU...]", help="system-wide on these CPUs only")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run")


def system_wide(args: argparse.Namespace) -> bool:
    """-a or -C was given."""
    return bool(getattr(args, "all_cpus", False) or getattr(args, "cpu", None))


def engine(args: argparse.Namespace) -> str:
    """The engine uprobes use: --engine, or kernel for a system-wide run."""
    chosen: str | None = getattr(args, "engine", None)
    if system_wide(args):
        if chosen == "ptrace":
            raise UsageError("-a/-C count with the kernel engine (--engine ptrace follows tasks only)")
        return "kernel"
    return chosen or "ptrace"


def pmu_for(spec: EventSpec, engine_name: str) -> str:
    """The registry name of the backend that serves one event."""
    if isinstance(spec, CounterSpec):
        return spec.pmu
    return "kernel-uprobe" if engine_name == "kernel" else "uprobe"


def system_wide_cpus(args: argparse.Namespace) -> list[int] | None:
    """The CPUs of a system-wide run (-a: every online one; -C: those), None when not system-wide."""
    from pmu import perf_event

    if getattr(args, "cpu", None) == "":
        raise UsageError("bad -C list '': expected CPU numbers and ranges (0,2-3)")
    if not system_wide(args):
        return None
    online = perf_event.online_cpus()
    if not args.cpu:
        return online
    try:
        cpus = perf_event.parse_cpu_list(args.cpu)
    except ValueError:
        raise UsageError(f"bad -C list '{args.cpu}': expected CPU numbers and ranges (0,2-3)") from None
    missing = [c for c in cpus if c not in online]
    if missing:
        raise UsageError(
            f"bad -C list '{args.cpu}': no CPU {missing[0]} (online: {perf_event.format_cpu_list(online)})"
        )
    return cpus


def command(args: argparse.Namespace) -> list[str]:
    """The command line after `--` (or after the options)."""
    cmd = list(args.command)
    return cmd[1:] if cmd and cmd[0] == "--" else cmd


def launched(args: argparse.Namespace) -> bool:
    """pmu runs the command itself (rather than attaching): events open disabled, enabled at exec."""
    return bool(command(args)) and not (args.pid or args.tid)


def ids(text: str | None, what: str) -> list[int]:
    """A -p/-t list: numbers separated by commas ([] when the option is not given)."""
    return targets.parse_ids(text, what)


NUMBERS: dict[str, tuple[str, int, int]] = {
    "period": ("-c period", 1, (1 << 64) - 1),
    "args": ("--args", 0, 6),
    "pages": ("-m pages", 1, 1 << 18),
}
"""{dest: (option, lowest, highest)} for every integer option of every subcommand: a sample period is a
u64 as perf's, x86-64 passes 6 integer arguments in registers, a ring has at most 2**18 pages
(`pmu.ring.MAX_PAGES`)."""


def check_args(args: argparse.Namespace) -> None:
    """What every subcommand's options must be, checked once parsed and before anything runs: integers in
    their range, a -x separator, and -p/-t targets pmu can attach to (each given once)."""
    for dest, (option, low, high) in NUMBERS.items():
        value = getattr(args, dest, None)
        if isinstance(value, int) and not low <= value <= high:
            bound = f"at least {low}" if value < low else f"at most {high}"
            raise UsageError(f"bad {option} {value}: must be {bound}")
    if getattr(args, "sep", None) == "":
        raise UsageError("bad -x '': the field separator must be at least one character")
    if hasattr(args, "pid"):
        if system_wide(args) and (args.pid or args.tid):
            raise UsageError("-a/-C count system-wide: they do not go with -p/-t")
        targets.check(ids(args.pid, "pid"), ids(args.tid, "tid"))


def report_engines_and_errors(evlist: Evlist, verbose: bool) -> None:
    """After a run: with -v, how each event's probe was served; always, events that failed to arm."""
    if verbose:
        for evsel in evlist.evsels:
            sys.stderr.write(f"pmu: {evsel.name}: {evlist.describe(evsel)}\n")
    for line in evlist.errors():
        sys.stderr.write(f"pmu: {line}\n")
