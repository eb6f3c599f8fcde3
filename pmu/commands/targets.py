"""The -p/-t targets, checked before pmu attaches: each one given once, and each one a thing pmu can trace.

The kernel answers PTRACE_SEIZE with a bare EPERM for pmu's own process, a zombie and a kernel thread, and
a target given twice would be found "already traced" by pmu itself; each gets its own one-line message
here, from /proc/PID/status and /proc/PID/stat. What only the attach can tell (another user's process, a
ptrace scope, a debugger holding it) is left to the tracer's own checks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from pmu.errors import ProcessError, TracePermissionError, UsageError
from pmu.trace.maps import tgid_of, threads_of

PID_MAX = (1 << 31) - 1
"""The largest pid_t: a bigger number is no process on any kernel (one below may still be absent)."""
PF_KTHREAD = 0x00200000
"""The `flags` bit of /proc/PID/stat that marks a kernel thread (include/linux/sched.h)."""
_NUMBER = re.compile(r"[0-9]+")


def parse_ids(text: str | None, what: str) -> list[int]:
    """A -p/-t list: decimal numbers 1..PID_MAX separated by commas ([] when the option is not given)."""
    if text is None:
        return []
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or not all(_NUMBER.fullmatch(part) for part in parts):
        raise UsageError(f"bad {what} list '{text}': expected numbers separated by commas")
    found = [int(part) for part in parts]
    for n in found:
        if not 1 <= n <= PID_MAX:
            raise UsageError(f"bad {what} list '{text}': {n} is not a {what} (1 to {PID_MAX})")
    return found


def check(pids: Sequence[int], tids: Sequence[int]) -> None:
    """Raise the one-line error for the first target pmu should not try to attach to."""
    _once(pids, "process")
    _once(tids, "thread")
    for pid in pids:
        _check_process(pid)
    for tid in tids:
        pid = _check_thread(tid)
        if pid in pids:
            owner = "it is process" if tid == pid else "it is a thread of process"
            raise UsageError(f"thread {tid} is given twice: {owner} {pid}, which -p attaches to already")


def _once(ids: Sequence[int], what: str) -> None:
    seen: set[int] = set()
    for n in ids:
        if n in seen:
            raise UsageError(f"{what} {n} is given twice")
        seen.add(n)


def _check_process(pid: int) -> None:
    tgid = tgid_of(pid)
    if tgid < 0:
        raise ProcessError(f"no process with pid {pid}")
    if tgid != pid:
        return  # a thread's id given to -p: the tracer's own check says what it is
    _not_pmu(pid, f"process {pid}")
    state, flags = _stat(pid)
    if flags & PF_KTHREAD:
        raise TracePermissionError(f"cannot trace process {pid}: it is a kernel thread (no user-space code)")
    if state in "ZX":
        threads = [t for t in threads_of(pid) if t != pid and _stat(pid, t)[0] not in "ZX"]
        if not threads:
            raise ProcessError(
                f"cannot trace process {pid}: it has exited (a zombie its parent has not reaped)"
            )
        raise TracePermissionError(
            f"cannot trace process {pid}: its main thread has exited (the kernel traces no zombie thread; "
            f"{len(threads)} other thread{'s' if len(threads) > 1 else ''} still run)"
        )


def _check_thread(tid: int) -> int:
    """The process of thread `tid`, once it is known to be a thread pmu can trace."""
    pid = tgid_of(tid)
    if pid < 0:
        raise ProcessError(f"no thread with tid {tid}")
    _not_pmu(pid, f"thread {tid}")
    state, flags = _stat(pid, tid)
    if flags & PF_KTHREAD:
        raise TracePermissionError(f"cannot trace thread {tid}: it is a kernel thread (no user-space code)")
    if state in "ZX":
        raise ProcessError(f"cannot trace thread {tid}: it has exited (a zombie)")
    return pid


def _not_pmu(pid: int, what: str) -> None:
    if pid == os.getpid():
        raise TracePermissionError(f"cannot trace {what}: it is pmu itself (a tracer cannot trace itself)")


def _stat(pid: int, tid: int | None = None) -> tuple[str, int]:
    """(state letter, flags) of a task, from /proc/PID[/task/TID]/stat; ("X", 0) once it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
    except (OSError, IndexError):
        return "X", 0
    return fields[0], int(fields[6])
