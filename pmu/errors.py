"""Errors are values: every failure pmu reports is a PmuError kind with an exit status and one line.

Raised deep (parser, symbol resolver, tracer), printed once by `pmu.commands.main`, never as a traceback.
"""

from __future__ import annotations


class PmuError(Exception):
    """A failure pmu reports to the user as one line on stderr, exiting with `exit_status`."""

    exit_status: int = 2
    kind: str = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(PmuError):
    """The command line is wrong: a missing -e, an unknown option, a missing command."""

    kind = "usage"


class EventSpecError(PmuError):
    """An -e string that does not parse, or names an unknown event type."""

    kind = "event"


class FileError(PmuError):
    """A target file that is missing, unreadable or not an ELF file."""

    kind = "file"


class SymbolError(PmuError):
    """An unknown symbol, or an offset past its end or inside an instruction."""

    kind = "symbol"


class LibraryError(PmuError):
    """A library short name (libc, libsqlite3) that names no library we can find."""

    kind = "library"


class RelocationError(PmuError):
    """An instruction at a probe site that cannot be executed out of line."""

    kind = "relocation"


class ProcessError(PmuError):
    """A command that cannot be started, or a process that does not exist."""

    kind = "process"


class TracePermissionError(PmuError):
    """A process we may not trace: another user's, a restrictive ptrace scope, already traced."""

    kind = "permission"


class TraceError(PmuError):
    """The tracer lost control of a tracee in a way it could not recover from."""

    kind = "trace"
