"""`pmu list [TARGET [PATTERN]]`: the functions a file or library can be probed at, as `perf probe -F -x`;
without TARGET, the kernel's generic counters, as `perf list sw hw`."""

from __future__ import annotations

import argparse
import os
import sys

from pmu.events.counters import NAMES, TYPE_HARDWARE, TYPE_SOFTWARE, names
from pmu.events.symbols import list_functions, resolve_target


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "list",
        help="list the functions of a file or library that can be probed",
        description="Print the function symbols defined in TARGET (.symtab and .dynsym), one per line, "
        "sorted: every name printed can be probed with -e TARGET:NAME. Without TARGET, the kernel's "
        "counters pmu stat counts (-e task-clock,cycles), as perf list.",
        usage="pmu list [--usdt] [-v] [TARGET [PATTERN]]",
    )
    p.add_argument(
        "target",
        metavar="TARGET",
        nargs="?",
        help="path to an ELF file (contains '/') or a library short name (libc, libsqlite3, libz.so.1)",
    )
    p.add_argument(
        "pattern",
        metavar="PATTERN",
        nargs="?",
        default="*",
        help="shell glob the names must match, e.g. 'mall*' (default: every function)",
    )
    p.add_argument(
        "--usdt",
        action="store_true",
        help="list TARGET's USDT probes (PROVIDER:NAME, for -e usdt:TARGET:PROVIDER:NAME) instead",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="say of each function whether a probe at its entry is jump-optimized, or why it uses int3; "
        "of each USDT probe its sites, semaphore and arguments",
    )
    p.set_defaults(func=run)


def engines(path: str, found: list[str]) -> list[str]:
    """`NAME  optimized` or `NAME  int3 (not optimized: WHY)` for each function, as pmu stat -v says it."""
    from pmu.errors import PmuError, RelocationError
    from pmu.events.spec import ProbeKind, ProbeSpec
    from pmu.events.symbols import resolve_probe
    from pmu.uprobe_pmu import jump_plan

    width = max((len(name) for name in found), default=0)
    lines = []
    for name in found:
        try:
            jump_plan(resolve_probe(ProbeSpec(ProbeKind.UPROBE, path, name, 0, None, name), path))
            how = "optimized"
        except RelocationError as err:
            how = f"int3 (not optimized: {err.message})"
        except PmuError as err:
            how = f"not probeable: {err.message}"
        lines.append(f"{name:<{width}}  {how}")
    return lines


def usdt_probes(path: str, pattern: str, verbose: bool) -> list[str]:
    """`PROVIDER:NAME` of each USDT probe of path matching pattern (with -v: sites, semaphore, arguments)."""
    import fnmatch

    from pmu.events import usdt

    probes: dict[str, list[usdt.UsdtNote]] = {}
    for note in usdt.notes(path):
        name = f"{note.provider}:{note.name}"
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(note.name, pattern):
            probes.setdefault(name, []).append(note)
    if not verbose:
        return sorted(probes)
    width = max((len(n) for n in probes), default=0)
    lines = []
    for name in sorted(probes):
        sites = probes[name]
        sem = "semaphore" if sites[0].semaphore else "no semaphore"
        plural = "s" if len(sites) > 1 else ""
        lines.append(f"{name:<{width}}  {len(sites)} site{plural}, {sem}, args: {sites[0].arg_text or '-'}")
    return lines


def counters() -> list[str]:
    """perf list's lines for the generic counters: `  NAME OR ALIAS   [Hardware event]`."""
    lines = []
    for kind, label in ((TYPE_HARDWARE, "Hardware event"), (TYPE_SOFTWARE, "Software event")):
        for name in names(kind):
            aliases = [a for a, (canonical, _, _) in NAMES.items() if canonical == name and a != name]
            shown = " OR ".join([name, *aliases])
            lines.append(f"  {shown:<50} [{label}]")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.target is None:
        found = counters()
    else:
        path = resolve_target(args.target, exe=None, mapped=())
        if args.usdt:
            found = usdt_probes(path, args.pattern, args.verbose)
        else:
            found = list_functions(path, args.pattern)
            if args.verbose:
                found = engines(path, found)
    try:
        sys.stdout.write("".join(f"{name}\n" for name in found))
        sys.stdout.flush()
    except BrokenPipeError:  # `pmu list libc | head`: the reader is gone, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0
