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
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from pmu.errors import RelocationError, TraceError
from pmu.trace import guard, retprobe, trampoline, unwind
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
    on_skipped_entry: Callable[[Task, int, int, tuple[int, ...]], None] | None = None
    """Called with (task, return site, return-address slot, argument registers) for an entry the
    return blob left to ptrace (retprobe.SKIP_TRAP): its owner hijacks the return with `hijack_return`."""

    if TYPE_CHECKING:  # the Tracer's, which this class is mixed into

        def stopped(self, mm: AddressSpace) -> contextlib.AbstractContextManager[int]: ...

        def _alloc_slot(self, mm: AddressSpace, addr: int, tid: int, size: int = SLOT_SIZE) -> int: ...

        def _guard(self, mm: AddressSpace, tid: int, ill: bool = False) -> guard.Guard | None: ...

        def insert(self, mm: AddressSpace, addr: int, consumer: BreakpointHandler) -> None: ...

        def fs_base(self, task: Task) -> int: ...

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
        if (mm.ret_tramp is None and mm.returns is None) or mm.dead:
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
        with contextlib.suppress(OSError):
            self._restore_inprocess(task, mark=True)
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
        with contextlib.suppress(OSError):
            self._rehijack_inprocess(task)
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

    def hijack_return(self, task: Task, handler: ReturnHandler, rsp: int | None = None) -> None:
        """At a function's entry: make its return trap, so that `handler` runs when it returns.

        The return address at [RSP] (or at `rsp`, the slot) is replaced by the trampoline and kept on
        the task's shadow stack (as the kernel's uretprobes do). Frames left without returning
        (longjmp) are dropped when a later entry or return finds them below the stack pointer.
        """
        mm = task.mm
        tramp = mm.ret_tramp
        if tramp is None:
            return
        if rsp is None:
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
            # frames below (or at) this slot are dead, if near: farther, they may be another stack's
            # (a handler on an alternate stack above the thread's), left to a return to judge
            while shadow and shadow[-1].rsp <= rsp and rsp - shadow[-1].rsp <= retprobe.DROP_LIMIT:
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
        """Put back every return address of task's shadow stacks (before it leaves our care)."""
        mm = task.mm
        with contextlib.suppress(OSError):
            self._restore_inprocess(task)
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

    # ---- return probes served in the process (retprobe.py) ---------------------------------------

    def _skipped_entry(self, task: Task) -> None:
        """The return blob could not take an entry (retprobe.SKIP_TRAP): the function's slot and its
        arguments, from where the entry routine keeps them, to `on_skipped_entry`."""
        rp = task.mm.returns
        if rp is None or self.on_skipped_entry is None:
            return
        regs = pt.get_regs(task.tid)
        saved = struct.unpack("<5Q", task.mm.read(regs.rsp, 40))  # r10, r9, r8, rdx, rcx
        args = (regs.rdi, regs.rsi, saved[3], saved[4], saved[2], saved[1])
        self.on_skipped_entry(task, rp.area.ret_of(regs.r11), regs.rsp + retprobe.SKIP_RSP, args)

    @staticmethod
    def _shadow_rows(mm: AddressSpace, fs: int) -> list[int]:
        """Indexes of the rows of mm's shadow area keyed by FS base fs."""
        assert mm.returns is not None
        keys = np.frombuffer(mm.read(mm.returns.shadow, 8 * trampoline.NSLOTS), dtype="<u8")
        return [int(i) for i in np.flatnonzero(keys == fs)]

    @staticmethod
    def _row_frames(mm: AddressSpace, row: int) -> list[tuple[int, int, int, int, int]]:
        """The frames of the shadow row at `row`: (slot, orig, cell, descriptor, state), innermost last."""
        depth = min(int.from_bytes(mm.read(row, 8), "little"), retprobe.MAXDEPTH)
        if not depth:
            return []
        return retprobe.frames(mm.read(row, retprobe.R_FRAMES + retprobe.FRAME * depth))

    def _inprocess_frames(self, task: Task) -> tuple[int, list[tuple[int, int, int, int, int]]]:
        """(the task's shadow row, found by its FS base, and its frames), (0, []) if it has none."""
        mm = task.mm
        rp = mm.returns
        fs = self.fs_base(task) if rp is not None and not mm.dead else 0
        rows = self._shadow_rows(mm, fs) if fs else []
        if rp is None or not rows:
            return 0, []
        row = retprobe.row_address(rp.shadow, rows[0])
        return row, self._row_frames(mm, row)

    def _restore_inprocess(self, task: Task, mark: bool = False) -> None:
        """Put the real return address back in every slot of the task's in-process frames that holds
        the return trampoline. The frames stay (a thread inside the return trampoline still finds its
        own); with `mark` (an exception starts to unwind) they are marked restored, for `_caught`."""
        rp = task.mm.returns
        if rp is None:
            return
        row, frames = self._inprocess_frames(task)
        mm = task.mm
        tramp = rp.tramp.to_bytes(8, "little")
        for i, (slot, orig, _cell, _desc, state) in enumerate(frames):
            if not 0 < slot < 1 << 63:
                continue  # dead (0), or still being filled by its entry (-1)
            if state == retprobe.STATE_LIVE:
                with contextlib.suppress(OSError):
                    if mm.read(slot, 8) == tramp:
                        mm.write(slot, orig.to_bytes(8, "little"))
                if mark:
                    at = row + retprobe.R_FRAMES + retprobe.FRAME * i + retprobe.F_STATE
                    mm.write(at, retprobe.STATE_RESTORED.to_bytes(8, "little"))

    def _rehijack_inprocess(self, task: Task) -> None:
        """A C++ handler begins: the in-process frames an exception left alive (slot above the stack
        pointer) return through the trampoline again; the ones it unwound stay restored, and are dropped
        (counted lost) by the next entry or return that meets them."""
        rp = task.mm.returns
        if rp is None:
            return
        row, frames = self._inprocess_frames(task)
        if not any(f[4] == retprobe.STATE_RESTORED for f in frames):
            return
        mm = task.mm
        rsp = pt.peek_user(task.tid, pt.RSP)
        tramp = rp.tramp.to_bytes(8, "little")
        for i, (slot, orig, _cell, _desc, state) in enumerate(frames):
            if state != retprobe.STATE_RESTORED or slot <= rsp or slot >= 1 << 63:
                continue
            if mm.read(slot, 8) == orig.to_bytes(8, "little"):
                mm.write(slot, tramp)
            at = row + retprobe.R_FRAMES + retprobe.FRAME * i + retprobe.F_STATE
            mm.write(at, retprobe.STATE_LIVE.to_bytes(8, "little"))

    def _free_shadow_row(self, task: Task) -> None:
        """A thread is gone: its shadow row is emptied and given back (depth, graveyard, then the key),
        so that a thread that gets its FS base later (glibc reuses a finished thread's TLS) starts with
        no frames. Not while another live thread of the process has that FS base."""
        mm = task.mm
        rp = mm.returns
        fs = task.fs_base
        if rp is None or mm.dead or not fs or task.pid != mm.pid:
            return
        gone = (TaskState.EXITED, TaskState.EXITING)
        if any(t is not task and t.fs_base == fs and t.state not in gone for t in mm.tasks):
            return
        with contextlib.suppress(OSError):
            for index in self._shadow_rows(mm, fs):
                row = retprobe.row_address(rp.shadow, index)
                for slot, _orig, _cell, desc, _state in self._row_frames(mm, row):
                    if 0 < slot < 1 << 63:  # a frame it leaves (pthread_exit inside it): never returns
                        rp.area.note_lost(rp.area.ret_of(desc))
                mm.write(row, bytes(16))
                mm.write(rp.shadow + 8 * index, bytes(8))
