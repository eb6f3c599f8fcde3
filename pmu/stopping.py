"""Stop requests: SIGINT, SIGTERM and SIGHUP, taken over first thing by `pmu`, become a flag each phase reads.

perf takes its signals over first thing and always prints what it counted; so does pmu. The handler here
never raises (no KeyboardInterrupt inside an import, a patch being written into a process, a detach): it
notes the signal and tells the listeners (`listen`), which only set flags (the tracer's `request_stop`).
The phases read the flag where they may stop: `check()` before a run starts raises StopRequested, and the
command line then undoes what was started and ends pmu by that signal (`die`); a run that has started
ends as its end would (counts printed, the targets restored and detached).

SIGINT is taken over even when pmu starts with it ignored (`pmu stat -p PID ... &` in a script: the shell
ignores SIGINT for it), as perf does; SIGTERM and SIGHUP are left ignored if they are (`nohup pmu ...`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Listener = Callable[[int], None]

_received: list[int] = []
"""Stop signals received so far, first first."""
_original: dict[int, signal.Handlers] = {}
"""The disposition each stop signal had when pmu started (SIG_IGN or SIG_DFL), for the commands it runs."""
_taken: set[int] = set()
_listeners: list[Listener] = []


class StopRequested(BaseException):
    """A stop signal came before the run started: undo what was started, then end pmu by that signal.

    A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def take_over() -> None:
    """Handle the stop signals from now on (idempotent). A signal that arrived meanwhile is not lost: they
    are blocked while the handlers change, and one pending is delivered to the new handler."""
    if _taken:
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        for signum in STOP_SIGNALS:
            current = signal.getsignal(signum)
            ignored = current == signal.SIG_IGN
            _original[signum] = signal.SIG_IGN if ignored else signal.SIG_DFL
            if ignored and signum != signal.SIGINT:
                continue
            signal.signal(signum, _on_signal)
            _taken.add(signum)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def give_back() -> None:
    """For commands that trace nothing (list, report): the stop signals act as in any program again, ending
    pmu at once; a stop that came already ends it now."""
    if _received:
        die(_received[0])
    for signum in list(_taken):
        signal.signal(signum, _original[signum])
        _taken.discard(signum)


def hold() -> None:
    """Block the stop signals for good: pmu is about to exit with its status, and Python's finalization gives
    them their default action back (a SIGHUP then would end a run already reported)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def original(signum: int) -> signal.Handlers:
    """What `signum` was when pmu started (SIG_IGN or SIG_DFL): what a command pmu runs starts with."""
    return _original.get(signum, signal.SIG_DFL)


def requested() -> int | None:
    """The first stop signal received, if any."""
    return _received[0] if _received else None


def check() -> None:
    """StopRequested if a stop signal came: called between the phases before a run starts."""
    if _received:
        raise StopRequested(_received[0])


@contextlib.contextmanager
def listen(listener: Listener) -> Iterator[None]:
    """Call `listener(signum)` for each stop signal while in the block; at once for one that came already.
    It runs inside a signal handler, between any two bytecodes of the main thread: it may set flags,
    arm a timer or send a signal, nothing that could break what it interrupts."""
    _listeners.append(listener)
    try:
        for signum in list(_received):
            listener(signum)
        yield
    finally:
        _listeners.remove(listener)


def die(signum: int) -> None:
    """End pmu by `signum`, as the shell expects of a program stopped by a signal (perf does the same):
    what was started must be undone already. Does not return."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signum,))
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # only if the signal could not end us


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    for listener in list(_listeners):
        listener(signum)
