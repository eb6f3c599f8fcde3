"""The parser of the `pmu` command line: one-line usage errors that name the help to read, --version."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS = ("stat", "record", "list", "report")
TRACING = frozenset({"stat", "record"})
"""The subcommands that trace processes: the ones that keep the stop signals (pmu.stopping)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit status 2, naming the --help to read."""

    help_prog: str | None = None
    """Whose --help a usage error points to (default: this parser's own, `pmu` or `pmu stat`)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"pmu: {message} (see '{self.help_prog or self.prog} --help')\n")
        raise SystemExit(2)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """As argparse's; an option the subcommand does not know points to the subcommand's --help."""
        ns, extras = super().parse_known_args(args, namespace)
        sub = getattr(ns, "subcommand", None)
        self.help_prog = f"{self.prog} {sub}" if extras and sub else None
        return ns, extras


class _Version(argparse.Action):
    """--version: pmu's version from the installed package's metadata, printed as perf prints its own."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        sys.stdout.write(f"pmu version {version()}\n")
        sys.stdout.flush()
        raise SystemExit(0)


def version() -> str:
    """The installed pmu's version (package metadata); the source tree's when pmu is not installed."""
    from importlib import metadata

    try:
        return metadata.version("pmu")
    except metadata.PackageNotFoundError:
        from pmu import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: every subcommand's module imported and its options added."""
    parser = _Parser(prog="pmu", description="perf for user-space probes")
    parser.add_argument("--version", action=_Version, help="print pmu's version and exit")
    sub = parser.add_subparsers(dest="subcommand", parser_class=_Parser, metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"pmu.commands.{name}")
        module.add_parser(sub)
    return parser
