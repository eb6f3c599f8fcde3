"""`pmu list TARGET [PATTERN]`: the functions a file or library can be probed at, as `perf probe -F -x`."""

from __future__ import annotations

import argparse
import os
import sys

from pmu.events.symbols import list_functions, resolve_target


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "list",
        help="list the functions of a file or library that can be probed",
        description="Print the function symbols defined in TARGET (.symtab and .dynsym), one per line, "
        "sorted: every name printed can be probed with -e TARGET:NAME.",
        usage="pmu list TARGET [PATTERN]",
    )
    p.add_argument(
        "target",
        metavar="TARGET",
        help="path to an ELF file (contains '/') or a library short name (libc, libsqlite3, libz.so.1)",
    )
    p.add_argument(
        "pattern",
        metavar="PATTERN",
        nargs="?",
        default="*",
        help="shell glob the names must match, e.g. 'mall*' (default: every function)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = resolve_target(args.target, exe=None, mapped=())
    names = list_functions(path, args.pattern)
    try:
        sys.stdout.write("".join(f"{name}\n" for name in names))
        sys.stdout.flush()
    except BrokenPipeError:  # `pmu list libc | head`: the reader is gone, which is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0
