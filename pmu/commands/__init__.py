"""The `pmu` command line: one module per subcommand, dispatched here; errors printed once, here.

Each subcommand module offers `add_parser(subparsers)` (registering its options and setting
`func=run` as the parser default) and `run(args) -> int` (the exit status).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from pmu import environ
from pmu.errors import PmuError

_SUBCOMMANDS = ("stat", "record", "list", "report")


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
    import importlib

    parser = _Parser(prog="pmu", description="perf for user-space probes")
    parser.add_argument("--version", action=_Version, help="print pmu's version and exit")
    sub = parser.add_subparsers(dest="subcommand", parser_class=_Parser, metavar="COMMAND")
    sub.required = True
    for name in _SUBCOMMANDS:
        module = importlib.import_module(f"pmu.commands.{name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `pmu ARGV`; return the exit status. PmuErrors become one line on stderr."""
    environ.set_own()
    try:
        environ.check_address_space()
        parser = build_parser()
        args = parser.parse_args(argv)
        from pmu.commands.options import check_args

        check_args(args)
        status: int = args.func(args)
    except PmuError as err:
        sys.stderr.write(f"pmu: {err.message}\n")
        return err.exit_status
    except KeyboardInterrupt:
        return 130
    except MemoryError:  # raised anywhere (numpy, pyarrow, the tracer): the tracees were restored on the way
        if os.environ.get("PMU_DEBUG"):
            raise
        sys.stderr.write(OUT_OF_MEMORY)
        return 2
    except Exception as err:  # a bug of ours: the tracees were already restored by the finally blocks
        if os.environ.get("PMU_DEBUG"):
            raise
        if _for_want_of_memory(err):
            sys.stderr.write(OUT_OF_MEMORY)
        else:
            sys.stderr.write(f"pmu: internal error: {type(err).__name__}: {err} (PMU_DEBUG=1 shows where)\n")
        return 2
    return status


OUT_OF_MEMORY = "pmu: out of memory (a limit such as ulimit -v, or the machine's memory is exhausted)\n"

_NO_MEMORY_TEXTS = ("failed to map segment from shared object", "cannot allocate memory")
"""What the dynamic linker (dlopen of an extension module or its libraries) says for want of memory."""


def _for_want_of_memory(err: BaseException) -> bool:
    """Whether an exception (an ImportError of numpy's, say) was caused by memory running out: a MemoryError
    or ENOMEM in its chain, or the dynamic linker's words for a mapping that failed."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, MemoryError):
            return True
        if isinstance(cause, OSError) and cause.errno == errno.ENOMEM:
            return True
        if isinstance(cause, ImportError | OSError) and any(
            text in str(cause).lower() for text in _NO_MEMORY_TEXTS
        ):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
