"""The `pmu` command line: one module per subcommand, dispatched here; errors printed once, here.

Each subcommand module offers `add_parser(subparsers)` (registering its options and setting
`func=run` as the parser default) and `run(args) -> int` (the exit status).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from pmu import environ
from pmu.errors import PmuError

_SUBCOMMANDS = ("stat", "record", "list", "report")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"pmu: {message} (see 'pmu {self.prog.split()[-1]} --help')\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _Parser(prog="pmu", description="perf for user-space probes")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True
    for name in _SUBCOMMANDS:
        module = importlib.import_module(f"pmu.commands.{name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `pmu ARGV`; return the exit status. PmuErrors become one line on stderr."""
    environ.set_own()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        status: int = args.func(args)
    except PmuError as err:
        sys.stderr.write(f"pmu: {err.message}\n")
        return err.exit_status
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug of ours: the tracees were already restored by the finally blocks
        if os.environ.get("PMU_DEBUG"):
            raise
        sys.stderr.write(f"pmu: internal error: {type(err).__name__}: {err} (PMU_DEBUG=1 shows where)\n")
        return 2
    return status
