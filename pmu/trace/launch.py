"""Commands and CPUs as the scheduler's tasks when nothing needs ptrace (perf stat's own way).

`launch_untraced` forks a child that waits on a pipe until pmu has opened its counters (kernel counters
opened on a task that is still `exec_pending` start at its exec, as perf's enable_on_exec), then lets
it exec. `CpuTask` is the context of one CPU in a system-wide run.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from pmu.errors import ProcessError


@dataclass(eq=False)
class PlainTask:
    """A launched command pmu does not trace (satisfies pmu.core.Task)."""

    tid: int
    pid: int
    exec_pending: bool = True
    """Not exec'd yet: still pmu's forked child waiting on its pipe."""
    _comm: str = ""

    @property
    def comm(self) -> str:
        if not self._comm:
            with contextlib.suppress(OSError), open(f"/proc/{self.tid}/comm") as f:
                self._comm = f.read().strip()
        return self._comm or "?"


@dataclass(eq=False)
class CpuTask:
    """One CPU of a system-wide run, as the scheduler's task: tid -1 - cpu, pid -1."""

    cpu: int

    @property
    def tid(self) -> int:
        return -1 - self.cpu

    @property
    def pid(self) -> int:
        return -1

    @property
    def comm(self) -> str:
        return f"CPU{self.cpu}"


def exec_when_told(
    rfd: int,
    wfd: int,
    exe: str,
    argv: Sequence[str],
    child_signals: Mapping[int, signal.Handlers],
    env: Mapping[str, str],
    failed: int | None = None,
) -> NoReturn:
    """In a forked child: wait for b"g" on the pipe rfd (wfd is its other end), then exec `exe` with the
    given dispositions and environment. Anything else on the pipe, its closing, or a failed exec ends
    the child with status 127 (having written a byte to `failed`, when given, for an exec that failed)."""
    try:
        os.close(wfd)
        go = os.read(rfd, 1)
        os.close(rfd)
        if go == b"g":
            for signum, handler in child_signals.items():
                signal.signal(signum, handler)
            os.execve(exe, list(argv), env)
    except BaseException:
        pass
    if failed is not None:
        with contextlib.suppress(OSError):
            os.write(failed, b"x")
    os._exit(127)


class Untraced:
    """A command forked and held before its exec, then let go and waited for."""

    def __init__(
        self,
        argv: Sequence[str],
        exe: str,
        child_signals: Mapping[int, signal.Handlers],
        env: Mapping[str, str],
    ) -> None:
        rfd, wfd = os.pipe()
        ok_r, ok_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # child
            os.close(ok_r)
            exec_when_told(rfd, wfd, exe, argv, child_signals, env, failed=ok_w)
        os.close(rfd)
        os.close(ok_w)
        self.pid = pid
        self.task = PlainTask(tid=pid, pid=pid)
        self._go = wfd
        self._ok = ok_r
        self.status: int | None = None

    def release(self) -> None:
        """Let the child exec; ProcessError if the exec failed."""
        os.write(self._go, b"g")
        os.close(self._go)
        failed = os.read(self._ok, 1)
        os.close(self._ok)
        self.task.exec_pending = False
        if failed:
            self.wait()
            raise ProcessError("cannot run the command: exec failed")

    def abandon(self) -> None:
        """Never run it: the child exits at once."""
        with contextlib.suppress(OSError):
            os.close(self._go)
        with contextlib.suppress(OSError):
            os.close(self._ok)
        self.wait()

    def poll(self) -> int | None:
        """The command's wait status if it has ended, else None (never blocks)."""
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
        return self.status

    def wait(self) -> int:
        """Wait for the command's end; its wait status."""
        if self.status is None:
            _, self.status = os.waitpid(self.pid, 0)
        return self.status
