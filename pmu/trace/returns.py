"""Return probes: a function's return address is hijacked at its entry so that its return traps.

The return address at [RSP] is replaced by the address of an int3 pmu maps (the return trampoline) and
kept on the thread's shadow stack, as the kernel's uretprobes do; at the trap the frame's handler runs
and the thread goes on at the real return address. Every address is put back before a thread leaves
pmu's care (`_unhijack`), and before an exception unwinds its stack (`_unwinding`, unwind.py); the trap
guard knows the frames should pmu die (guard.py).

A mixin of the Tracer (pmu/trace/tracer.py), as breakpoints.py is.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pmu.errors import RelocationError, TraceError
from pmu.trace import guard, unwind
from pmu.trace import ptrace_ops as pt
from pmu.trace.breakpoints import INT3
from pmu.trace.relocate import SLOT_SIZE
from pmu.trace.tasks import AddressSpace, BreakpointHandler, ReturnFrame, ReturnHandler, Task, TaskState


class Returns:
    """The tracer's return hijacking (mixed into Tracer)."""

    unguarded_returns = 0
    """Entries whose return was not hijacked: more live frames than the trap guard can restore."""
    on_frame_lost: Callable[[ReturnFrame], None] | None = None
    """Called for a hijacked frame left without returning (longjmp over it, an exception through it)."""

    if TYPE_CHECKING:  # the Tracer's, which this class is mixed into

        def stopped(self, mm: AddressSpace) -> contextlib.AbstractContextManager[int]: ...

        def _alloc_slot(self, mm: AddressSpace, addr: int, tid: int, size: int = SLOT_SIZE) -> int: ...

        def _guard(self, mm: AddressSpace, tid: int, ill: bool = False) -> guard.Guard | None: ...

        def insert(self, mm: AddressSpace, addr: int, consumer: BreakpointHandler) -> None: ...

    def return_trampoline(self, mm: AddressSpace, near: int) -> int:
        """The int3 hijacked returns land on in mm (made on first use, with every thread stopped)."""
        if mm.ret_tramp is None:
            with self.stopped(mm) as tid:
                slot = self._alloc_slot(mm, near, tid)
                g = self._guard(mm, tid)
                if g is not None:
                    mm.write(g.base + guard.RET_TRAMP, slot.to_bytes(8, "little"))
                mm.write(slot, INT3 * 2)  # the second for a trap dropped as pmu dies (guard.py)
                mm.ret_tramp = slot
            self._hook_unwinder(mm)
        return mm.ret_tramp

    def _hook_unwinder(self, mm: AddressSpace) -> None:
        """Once mm has return probes, break at the unwinder's entries in it (unwind.py): called when the
        return trampoline is made and whenever files may have been mapped (dlopen of libgcc_s)."""
        if mm.ret_tramp is None or mm.dead:
            return
        try:
            found = unwind.entry_addresses(mm.pid)
        except OSError:
            return
        for addr, name in found.items():
            catch = name in unwind.CATCH
            consumer = self._caught if catch else self._unwinding
            bp = mm.breakpoints.get(addr)
            if (bp is not None and consumer in bp.consumers) or addr in mm.jumps:
                continue
            with contextlib.suppress(RelocationError, OSError):
                self.insert(mm, addr, consumer)
                mm.internal[addr] = "catch" if catch else "unwind"

    def _unwinding(self, task: Task) -> None:
        """An exception (or a forced unwind) starts through the task's stack: every return address pmu
        hijacked on it is put back first, so that the unwinder finds the real callers and the program
        goes on as without pmu. The frames stay on the shadow stack, marked restored, until the handler
        begins (`_caught`)."""
        mm = task.mm
        tramp = mm.ret_tramp
        if tramp is None:
            return
        for frame in task.shadow:
            if not frame.restored:
                with contextlib.suppress(OSError):
                    self._swap_return(mm, frame, tramp, frame.orig)
            frame.restored = True

    def _caught(self, task: Task) -> None:
        """A C++ handler begins (__cxa_begin_catch): the frames the exception unwound (below the stack
        pointer now) are dropped, as frames left by longjmp; the ones it left alive are hijacked again,
        so that their returns count."""
        mm = task.mm
        tramp = mm.ret_tramp
        if tramp is None or not any(f.restored for f in task.shadow):
            return
        rsp = pt.peek_user(task.tid, pt.RSP)
        shadow = task.shadow
        while shadow and shadow[-1].restored and shadow[-1].rsp < rsp:
            frame = shadow.pop()  # unwound by the exception
            self._drop_frame(mm, frame)
            self._lost(frame)
        for frame in shadow:
            if frame.restored:
                frame.restored = False
                with contextlib.suppress(OSError):
                    self._swap_return(mm, frame, frame.orig, tramp)

    def hijack_return(self, task: Task, handler: ReturnHandler) -> None:
        """At a function's entry: make its return trap, so that `handler` runs when it returns.

        The return address at [RSP] is replaced by the trampoline and kept on the task's shadow stack
        (as the kernel's uretprobes do). Frames left without returning (longjmp) are dropped when a
        later entry or return finds them below the stack pointer.
        """
        mm = task.mm
        tramp = mm.ret_tramp
        if tramp is None:
            return
        rsp = pt.peek_user(task.tid, pt.RSP)
        orig = int.from_bytes(mm.read(rsp, 8), "little")
        shadow = task.shadow
        chained = orig == tramp
        if chained:
            while shadow and shadow[-1].rsp < rsp:
                self._lost(shadow.pop())
            if not shadow:  # not one of ours after all: leave it alone
                return
        else:
            while shadow and shadow[-1].rsp <= rsp:
                frame = shadow.pop()
                self._drop_frame(mm, frame)
                self._lost(frame)
            entry = mm.guard.frame_entry(rsp, orig) if mm.guard is not None else None
            if entry is None and mm.guard is not None:
                self.unguarded_returns += 1  # the guard's table is full: this return is not probed,
                return  # as it would not survive a pmu killed meanwhile
            if entry is not None:
                mm.write(*entry)  # first: the slot is never the trampoline without its entry
            mm.write(rsp, tramp.to_bytes(8, "little"))
        shadow.append(ReturnFrame(rsp, orig, handler, time.monotonic_ns(), chained))

    def arguments(self, task: Task, n: int) -> tuple[int, ...]:
        """The first n integer arguments (x86-64 SysV: rdi, rsi, rdx, rcx, r8, r9) of a stopped task."""
        regs = pt.get_regs(task.tid)
        return (regs.rdi, regs.rsi, regs.rdx, regs.rcx, regs.r8, regs.r9)[:n]

    def _returned(self, task: Task, run_handlers: bool = True) -> int:
        """A hijacked return trapped (or is about to): pop its frames, running their handlers unless
        pmu is leaving, and return the real return address."""
        slot = pt.peek_user(task.tid, pt.RSP) - 8
        shadow = task.shadow
        while shadow and shadow[-1].rsp < slot:
            frame = shadow.pop()  # longjmp'd over
            self._drop_frame(task.mm, frame)
            self._lost(frame)
        if not shadow:
            raise TraceError(
                f"thread {task.tid} returned through pmu's trampoline with no frame to return to"
            )
        retval = pt.peek_user(task.tid, pt.RAX) if run_handlers else 0
        while True:
            frame = shadow.pop()
            self._drop_frame(task.mm, frame)
            if run_handlers:
                frame.handler(task, frame, retval)
            if not (frame.chained and shadow):
                return frame.orig

    def _unhijack(self, task: Task) -> None:
        """Put back every return address of task's shadow stack (before it leaves our care)."""
        mm = task.mm
        tramp = mm.ret_tramp
        if tramp is None or not task.shadow:
            return
        if task.state is TaskState.STOPPED and pt.peek_user(task.tid, pt.RIP) == tramp:
            pt.poke_user(task.tid, pt.RIP, self._returned(task, run_handlers=False))
        for frame in task.shadow:
            self._swap_return(mm, frame, tramp, frame.orig)
            self._drop_frame(mm, frame)
        task.shadow.clear()

    @staticmethod
    def _swap_return(mm: AddressSpace, frame: ReturnFrame, now: int, then: int) -> None:
        """Write `then` in the frame's return-address slot if it holds `now` (a chained frame's slot is
        the frame's below it, which does the writing)."""
        if not frame.chained and mm.read(frame.rsp, 8) == now.to_bytes(8, "little"):
            mm.write(frame.rsp, then.to_bytes(8, "little"))

    def _lost(self, frame: ReturnFrame) -> None:
        if self.on_frame_lost is not None:
            self.on_frame_lost(frame)

    @staticmethod
    def _drop_frame(mm: AddressSpace, frame: ReturnFrame) -> None:
        if mm.guard is not None and not frame.chained:
            mm.guard.drop_frame(frame.rsp)
