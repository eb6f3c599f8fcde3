"""The `pmu` command line: one module per subcommand, dispatched here; errors printed once, here.

Each subcommand module offers `add_parser(subparsers)` (registering its options and setting
`func=run` as the parser default) and `run(args) -> int` (the exit status). `main` takes the stop signals
over before it imports anything heavy (pmu.stopping), so this module imports nothing at its top that the
interpreter has not loaded already.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (pmu.commands.parser)."""
    from pmu.commands.parser import build_parser as build

    return build()


def main(argv: Sequence[str] | None = None) -> int:
    """Run `pmu ARGV`; return the exit status. PmuErrors become one line on stderr; a stop signal that comes
    before the run starts ends pmu by that signal, once what was started is undone (pmu.stopping).

    Takes SIGINT, SIGTERM and SIGHUP over for the rest of the process's life (list and report give them
    back: they trace nothing), and returns with them blocked: what comes once the run is over and
    reported changes nothing, as pmu is about to exit."""
    try:
        from pmu import stopping

        stopping.take_over()
    except KeyboardInterrupt:  # Python's own SIGINT handler, a moment before ours was in
        _die_of_sigint()
    try:
        status = _main(argv)
    except (MemoryError, SystemError) as err:  # out of _main's own handlers, which ran out of memory too
        try:
            ours = isinstance(err, MemoryError) or _for_want_of_memory(err)
            reraise = bool(os.environ.get("PMU_DEBUG")) or not ours
        except MemoryError:  # not even enough to look at it: want of memory it is
            reraise = False
        if reraise:
            raise
        os.write(2, _OUT_OF_MEMORY_BYTES)  # nothing left to allocate a str with, maybe
        status = 2
    stopping.hold()
    return status


def _die_of_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def _main(argv: Sequence[str] | None) -> int:
    from pmu import environ, stopping
    from pmu.errors import PmuError

    environ.set_own()
    try:
        environ.check_address_space()
        parser = build_parser()
        args = parser.parse_args(argv)
        from pmu.commands.options import check_args
        from pmu.commands.parser import TRACING

        if args.subcommand not in TRACING:
            stopping.give_back()
        check_args(args)
        stopping.check()
        status: int = args.func(args)
    except stopping.StopRequested as stop:
        stopping.die(stop.signum)
        raise
    except PmuError as err:
        sys.stderr.write(f"pmu: {err.message}\n")
        return err.exit_status
    except KeyboardInterrupt:
        return 130
    except MemoryError as err:  # raised anywhere (numpy, pyarrow, the tracer): the tracees were restored
        if os.environ.get("PMU_DEBUG"):
            raise
        said = str(err)  # pmu's own say what ran out ("out of memory: cannot map a ring of ...")
        sys.stderr.write(f"pmu: {said}\n" if said.startswith("out of memory") else OUT_OF_MEMORY)
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
_OUT_OF_MEMORY_BYTES = OUT_OF_MEMORY.encode()

_NO_MEMORY_TEXTS = ("failed to map segment from shared object", "cannot allocate memory")
"""What the dynamic linker (dlopen of an extension module or its libraries) says for want of memory."""


def _for_want_of_memory(err: BaseException) -> bool:
    """Whether an exception (an ImportError of numpy's, say) was caused by memory running out: a MemoryError
    or ENOMEM in its chain, the dynamic linker's words for a mapping that failed, or, under an address-space
    limit, CPython's "error return without exception set" (an import whose allocation failed can return
    NULL without setting MemoryError: seen at ulimit -v 100 and 121 MB while stat.py imports)."""
    import resource  # loaded already (pmu.environ)

    limited = resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, MemoryError):
            return True
        if isinstance(cause, OSError) and cause.errno == errno.ENOMEM:
            return True
        if limited and isinstance(cause, SystemError):
            return True
        if isinstance(cause, ImportError | OSError) and any(
            text in str(cause).lower() for text in _NO_MEMORY_TEXTS
        ):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
