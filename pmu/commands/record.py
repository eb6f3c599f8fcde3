"""`pmu record`: sample every (or every N-th) probe hit into a Parquet file, as perf record does."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import errno
import os
import sys
import time
from types import ModuleType
from typing import TYPE_CHECKING

from pmu import recording
from pmu.commands.options import (
    add_event_options,
    add_target_options,
    command,
    engine,
    ids,
    launched,
    pmu_for,
    report_engines_and_errors,
    system_wide,
    system_wide_cpus,
)
from pmu.errors import UsageError
from pmu.events.attr import EventAttr
from pmu.events.counters import CounterSpec
from pmu.events.spec import parse_event_list

if TYPE_CHECKING:
    from pmu.evlist import Evlist
    from pmu.hits import Hits
    from pmu.output.parquet import RecordWriter

DEFAULT_PAGES = 8192
"""Ring size in 4 KiB pages (-m): 32 MiB (262,144 records) for pmu's ring and for each traced process
that records through jump patches, drained every 10 ms and continuously while records keep coming."""
MAX_ARGS = 6
_ARROW_POOL = "ARROW_DEFAULT_MEMORY_POOL"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "record",
        help="record probe hits into a Parquet file",
        description="Record every hit of uprobe/uretprobe events while COMMAND runs, like perf record.",
        usage="pmu record -e EVENT [-e EVENT...] [-o FILE] [-c PERIOD] [--args N] -- COMMAND [ARGS...]",
    )
    add_event_options(p)
    p.add_argument(
        "-o",
        "--output",
        default=recording.DEFAULT_PATH,
        metavar="FILE",
        help="output file (default pmu.parquet; an existing one is kept as FILE.old once the new one is "
        "written)",
    )
    p.add_argument(
        "-c",
        "--count",
        dest="period",
        type=int,
        default=1,
        metavar="PERIOD",
        help="record every PERIOD-th hit of each event (counts stay exact)",
    )
    p.add_argument(
        "--args",
        type=int,
        default=0,
        metavar="N",
        help="record the first N integer arguments (rdi, rsi, rdx, rcx, r8, r9)",
    )
    p.add_argument(
        "-m",
        "--mmap-pages",
        dest="pages",
        type=int,
        default=DEFAULT_PAGES,
        metavar="PAGES",
        help=f"ring buffer size in 4 KiB pages, for each traced process (default {DEFAULT_PAGES})",
    )
    add_target_options(p)
    p.set_defaults(func=run)


def build_attrs(args: argparse.Namespace) -> list[EventAttr]:
    """The EventAttrs a `pmu record` command line asks for (checked by tests without running anything)."""
    if not args.event:
        raise UsageError("no events given: use -e EVENT (for example -e uprobe:./prog:main)")
    if args.period < 1:
        raise UsageError(f"bad -c period {args.period}: must be at least 1")
    if not 0 <= args.args <= MAX_ARGS:
        raise UsageError(
            f"bad --args {args.args}: x86-64 passes at most {MAX_ARGS} integer arguments in registers"
        )
    system_wide = system_wide_cpus(args) is not None
    at_exec = launched(args) and not system_wide
    used = engine(args)
    specs = parse_event_list(args.event)
    for spec in specs:
        if isinstance(spec, CounterSpec):
            raise UsageError(f"{spec.text}: pmu record samples probes; count counters with pmu stat")
    return [
        EventAttr(
            spec=spec,
            pmu=pmu_for(spec, used),
            disabled=at_exec or system_wide,
            enable_on_exec=at_exec,
            inherit=not args.no_inherit,
            sample_period=args.period,
            sample_args=args.args,
        )
        for spec in specs
    ]


def run(args: argparse.Namespace) -> int:
    """Record, then write the file: nothing on disk changes before records come (or the run ends), and
    a run that fails before any record leaves the file system as it was."""
    from pmu.evlist import Evlist

    parquet = _import_parquet()
    from pmu.ring import Ring

    attrs = build_attrs(args)
    cmd = command(args)
    pids, tids = ids(args.pid, "pid"), ids(args.tid, "tid")
    cpus = system_wide_cpus(args)
    if not (cmd or pids or tids or cpus is not None):
        raise UsageError("no command given: pmu record -e EVENT -- COMMAND [ARGS...] (or -p PID)")
    names = [a.name for a in attrs]
    returns = any(a.probe.kind.value == "uretprobe" for a in attrs)
    evlist = Evlist(attrs, optimize=not args.no_optimize)
    start_wall = datetime.datetime.now(datetime.UTC).isoformat()
    start_mono = time.monotonic_ns()
    meta = recording.start_metadata(
        cmd if cmd else [_what(args, pids)], names, args.period, start_wall, start_mono
    )
    writer = parquet.RecordWriter(  # checks PATH only
        args.output, names, args.args, returns, meta, cpu=cpus is not None
    )
    try:
        ring = Ring.create(args.pages, len(attrs))
    except OSError as e:
        if e.errno != errno.ENOMEM:
            raise
        raise MemoryError(f"out of memory: cannot map a ring of {args.pages} pages (-m)") from None
    try:
        writer.prepare()  # memory the writer needs, taken before anything is traced
    except BaseException:
        ring.close()
        raise
    samples = 0

    def sink(hits: Hits) -> None:
        nonlocal samples
        if writer.failed:  # the final drain after a failed write: that failure is the one reported
            return
        samples += len(hits)
        writer.write_hits(hits)

    finished = False
    try:
        evlist.record_into(ring, sink, nargs=args.args)
        if cpus is not None:
            result = evlist.run_system_wide(cpus, cmd)
        elif pids or tids:
            result = evlist.run_attached(pids, tids, cmd)
        else:
            result = evlist.run_command(cmd)
        finished = True
    except OSError as e:
        if e.errno != errno.ENOMEM:  # a mapping (a ring in a traced process) that did not fit
            raise
        raise MemoryError(f"out of memory: {os.strerror(e.errno)}") from None
    finally:
        total_lost = evlist.lost_total
        try:
            _finish(evlist, writer, names, keep=finished or writer.rows_written > 0, failing=not finished)
        finally:
            evlist.close_rings()
    if total_lost:
        sys.stderr.write(f"Lost {total_lost} samples (ring full: try a bigger -m, or -c PERIOD)\n")
    size = os.path.getsize(args.output) / 1e6 if os.path.exists(args.output) else 0.0
    sys.stderr.write(f"[ pmu record: Captured and wrote {size:.3f} MB {args.output} ({samples} samples) ]\n")
    report_engines_and_errors(evlist, args.verbose)
    return result.status


def _what(args: argparse.Namespace, pids: list[int]) -> str:
    """What a recording without a command measured, for its metadata."""
    if system_wide(args):
        return f"-C {args.cpu}" if args.cpu else "-a"
    return f"-p {args.pid}" if pids else f"-t {args.tid}"


def _import_parquet() -> ModuleType:
    """pmu.output.parquet, which imports pyarrow (with malloc as its allocator under `ulimit -v`);
    MemoryError when there is no memory to load it.

    Once libarrow is loaded, its mimalloc crashes in the process's exit handlers (SIGSEGV in
    mi_process_done) if pyarrow's import failed half-way, as under `ulimit -v`: pmu then ends by
    _exit after its one-line error, skipping those handlers."""
    import resource

    limited = resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY
    pool = os.environ.get(_ARROW_POOL)
    if limited and pool is None:
        # pyarrow's default allocator, mimalloc, reserves 1 GiB of address space at its first
        # allocation: most of what a `ulimit -v` leaves pmu. pyarrow reads this when it is imported;
        # the commands pmu runs get the environment as it was.
        os.environ[_ARROW_POOL] = "system"
    try:
        from pmu.output import parquet
    except (ImportError, MemoryError) as e:
        atexit.register(_exit_now)
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, MemoryError) or "failed to map segment" in text or "allocate memory" in text:
            raise MemoryError(f"out of memory: cannot load pyarrow ({text})") from None
        raise
    finally:
        if limited and pool is None:
            del os.environ[_ARROW_POOL]
    return parquet


def _exit_now() -> None:
    """The last exit handler: flush what pmu printed, then end without running the C library's."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(2)  # only registered on the way out of a failed run: its status is 2


def _finish(evlist: Evlist, writer: RecordWriter, names: list[str], keep: bool, failing: bool) -> None:
    """Close the file with the run's final metadata when there is something to keep (a run that ended,
    or one that failed after recording); else discard it, leaving what was on disk untouched. While
    the run's own failure propagates (`failing`), a failure to close is not reported over it."""
    if not keep:
        writer.discard()
        return
    try:
        lost = evlist.lost_per_event()
        hits = {}
        for evsel in evlist.evsels:
            counts = evlist.read(evsel)
            hits[evsel.name] = counts.value if counts else 0
        writer.close(
            recording.final_metadata(
                evlist.lost_total, {names[i]: n for i, n in lost.items()}, hits, evlist.clock_error_ns()
            )
        )
    except Exception:
        writer.discard()
        if not failing:
            raise
