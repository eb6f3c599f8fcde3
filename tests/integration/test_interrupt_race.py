"""A thread that raised a trap just as pmu stopped it (PTRACE_INTERRUPT) reports the interrupt stop
first, its RIP past the int3 and the SIGTRAP still queued. pmu must take that trap's stop before it
treats the thread as stopped: detached there, the thread died of the SIGTRAP once the guard was gone
(the target of `pmu stat -p` died now and then at the end of a run).

The race itself is a window of a few instructions; tests/targets/queued_trap.c builds its outcome
deterministically with a real SIGTRAP queued to a real thread (si_code SI_KERNEL, as an int3's)."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pmu.trace import ptrace_ops as pt
from pmu.trace.tracer import Tracer

SYS_RT_SIGPROCMASK = 14
SYSCALL_STOP = (pt.SYSCALL_TRAP << 8) | 0x7F


class _Listener:
    """The tracer's listener, with nothing to hear: the test drives the tracer itself."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda *args, **kwargs: False


def _at_unblock(tid: int) -> None:
    """Run stopped thread `tid` to its syscall-enter stop of rt_sigprocmask (the unblock)."""
    while True:
        pt.syscall(tid)
        _, status = pt.wait(tid)
        assert status & 0xFF == 0x7F, f"the target ended early: status {status:#x}"
        if (
            status & 0xFFFF == SYSCALL_STOP
            and pt.peek_user(tid, pt.REG_OFFSET["orig_rax"]) == SYS_RT_SIGPROCMASK
        ):
            return


def test_a_trap_queued_at_the_interrupt_stop_is_taken(build: Callable[..., Path]) -> None:
    exe = build("queued_trap")
    proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == b"ready\n"
        tracer = Tracer(_Listener())
        (task,) = tracer.attach(proc.pid)
        # Blocked, the queued SIGTRAP is not the thread's to take: it is left alone at the attach.
        assert not tracer.pending
        proc.stdin.write(b"x")
        proc.stdin.flush()
        _at_unblock(task.tid)
        pt.interrupt(task.tid)  # pending until the thread leaves the unblocking syscall
        pt.cont(task.tid)
        task.state = task.state.RUNNING
        resumable = tracer._stop_all(task.mm)
        # The interrupt stop came first, with the trap queued; the stop pmu keeps is the trap's.
        assert resumable == []
        assert [(tid, status & 0xFFFF) for tid, status in tracer.pending] == [
            (task.tid, (signal.SIGTRAP << 8) | 0x7F)
        ]
        assert pt.siginfo_code(task.tid) == (signal.SIGTRAP, pt.SI_KERNEL)
        # Not a trap of pmu's (no probe there): delivered unchanged at the detach, it ends the program.
        tracer.detach_all()
        assert proc.wait(timeout=30) == -signal.SIGTRAP
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
