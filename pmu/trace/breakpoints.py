"""Breakpoints and what they stand on: int3 (or UD) traps and their out-of-line slots, the areas the
slots live in, the syscalls pmu runs in a stopped tracee, and the trap guard that lets a tracee survive a
trap its dead tracer left behind (guard.py).

A mixin of the Tracer (pmu/trace/tracer.py): its methods run with the tracer's state (tasks, pending
stops, `stopped`), as parts of one object; this module is the tracer's breakpoint job.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from pmu.errors import RelocationError, TraceError
from pmu.trace import guard, inject
from pmu.trace import ptrace_ops as pt
from pmu.trace.maps import PAGE, free_gap_near
from pmu.trace.relocate import SLOT_SIZE, build_slot
from pmu.trace.tasks import AddressSpace, Breakpoint, BreakpointHandler, SlotArea, Task, TaskState

if TYPE_CHECKING:
    from collections import deque

INT3 = b"\xcc"
UD = bytes([guard.UD])
"""The trap of a probe on a 1-byte instruction (see guard.py): a SIGILL with RIP at the probe."""
AREA_SIZE = 16 * PAGE
"""An out-of-line area: slots, trampolines and scratch bytes, mapped near the code they serve."""
NEAR = (1 << 31) - AREA_SIZE - PAGE
"""How far an area may be from the code it serves: a rel32 jump's reach, less the area itself."""


class Breakpoints:
    """The tracer's int3 probes, slots and guard (mixed into Tracer)."""

    pending: deque[tuple[int, int]]

    if TYPE_CHECKING:  # the Tracer's, which this class is mixed into

        def stopped(self, mm: AddressSpace) -> contextlib.AbstractContextManager[int]: ...

        def _cont(self, task: Task, sig: int = 0) -> None: ...

        def _returned(self, task: Task, run_handlers: bool = True) -> int: ...

    def _trap(self, task: Task) -> bool:
        """A SIGTRAP: a probe's int3, a hijacked return, or else not ours (False)."""
        tid = task.tid
        try:
            rip = pt.peek_user(tid, pt.RIP)
            bp = task.mm.breakpoints.get(rip - 1)
            returned = bp is None and rip - 1 == task.mm.ret_tramp and task.shadow
            if returned and pt.siginfo_code(tid)[1] == pt.SI_KERNEL:
                task.state = TaskState.STOPPED
                pt.poke_user(tid, pt.RIP, self._returned(task))
                self._cont(task)
                task.state = TaskState.RUNNING
                return True
            if bp is not None or (rip - 1) in task.mm.removed:
                ours = bp is not None and bp.length > 1 or pt.siginfo_code(tid)[1] == pt.SI_KERNEL
                if ours:  # bp None: a breakpoint another thread removed meanwhile: rewind to it
                    self._hit(task, bp, rip - 1)
                    return True
            task.state = TaskState.STOPPED
            return False
        except pt.PtraceError as err:
            if not pt.is_gone(err):
                raise
            return True  # gone: nothing left to deliver

    def _hit(self, task: Task, bp: Breakpoint | None, rewind: int | None) -> None:
        """A probe's trap in a stopped thread: its consumers run and the thread goes on in the slot; a
        trap whose breakpoint is gone (`bp` None) goes on at `rewind` (None: where it is)."""
        task.state = TaskState.STOPPED  # consumers may stop every thread to patch
        if bp is not None:
            for consumer in bp.consumers:
                consumer(task)
            pt.poke_user(task.tid, pt.RIP, bp.slot)
        elif rewind is not None:
            pt.poke_user(task.tid, pt.RIP, rewind)
        self._cont(task)
        task.state = TaskState.RUNNING

    def _fault(self, task: Task) -> bool:
        """A SIGILL: a hit of a probe on a 1-byte instruction (its UD, with RIP still at the probe) if
        the kernel raised it for an invalid opcode there; any other is the program's, delivered."""
        tid = task.tid
        try:
            rip = pt.peek_user(tid, pt.RIP)
            mm = task.mm
            bp = mm.breakpoints.get(rip)
            site = bp is not None and bp.length == 1 or bp is None and rip in mm.removed
            if site and pt.siginfo_code(tid)[1] == guard.ILL_ILLOPN:
                self._hit(task, bp, None)  # bp None: removed meanwhile, RIP already at what is there now
                return True
            return False
        except pt.PtraceError as err:
            if not pt.is_gone(err):
                raise
            return True

    def insert(self, mm: AddressSpace, addr: int, consumer: BreakpointHandler) -> None:
        """Add `consumer` to the int3 at `addr` (writing it, with every thread of mm stopped, if new)."""
        bp = mm.breakpoints.get(addr)
        if bp is not None:
            bp.consumers.append(consumer)
            return
        with self.stopped(mm) as stopped_tid:
            code = mm.read(addr, 16)
            if code[:1] == INT3:
                raise RelocationError(
                    f"there is already an int3 at {addr:#x} (another debugger's breakpoint?)"
                )
            slot = self._alloc_slot(mm, addr, stopped_tid)
            body, length = build_slot(code, addr, slot)
            mm.write(slot, body)
            self._guard_site(mm, stopped_tid, addr, slot, length)
            # int3 over every byte, or UD over a lone one: see guard.py for a trap dropped as pmu dies
            write_first_byte_first(mm, addr, INT3 * length if length > 1 else UD)
            mm.removed.discard(addr)
            mm.breakpoints[addr] = Breakpoint(addr, code[:length], slot, length, [consumer])

    def remove(self, mm: AddressSpace, addr: int, consumer: BreakpointHandler) -> None:
        """Drop `consumer` from the int3 at `addr`; restore the original byte when it was the last."""
        bp = mm.breakpoints.get(addr)
        if bp is None:
            return
        with contextlib.suppress(ValueError):
            bp.consumers.remove(consumer)
        if not bp.consumers:
            self._restore(mm, bp)

    def _restore(self, mm: AddressSpace, bp: Breakpoint) -> None:
        del mm.breakpoints[bp.addr]
        mm.internal.pop(bp.addr, None)
        if mm.dead:
            return
        with self.stopped(mm):
            with contextlib.suppress(OSError):
                write_first_byte_last(mm, bp.addr, bp.orig)
            mm.removed.add(bp.addr)

    def forget_mapping(self, mm: AddressSpace, addr: int) -> None:
        """The code at `addr` was unmapped: drop its breakpoint without writing anything."""
        mm.jumps.pop(addr, None)
        bp = mm.breakpoints.pop(addr, None)
        if bp is not None:
            bp.consumers.clear()
            mm.internal.pop(addr, None)
        length = bp.length if bp is not None else 1
        for trap in range(addr, addr + length):
            entry = mm.guard.forget_site(trap) if mm.guard is not None else None
            if entry is not None:
                with contextlib.suppress(OSError):
                    mm.write(*entry)

    def semaphore_hold(self, mm: AddressSpace, addr: int) -> None:
        """Increment the USDT semaphore (a u16) at addr: the program computes the probe's arguments and
        reaches its site while the semaphore is non-zero. A forked child's copy of its parent's
        increment is taken over rather than added to."""
        if mm.inherited.get(addr, 0) > 0:
            mm.inherited[addr] -= 1
        else:
            self._add_semaphore(mm, addr, 1)
        mm.semaphores[addr] = mm.semaphores.get(addr, 0) + 1

    def semaphore_release(self, mm: AddressSpace, addr: int) -> None:
        """Undo one `semaphore_hold` (nothing once mm is gone)."""
        held = mm.semaphores.get(addr, 0)
        if held <= 0:
            return
        mm.semaphores[addr] = held - 1
        if not mm.dead:
            self._add_semaphore(mm, addr, -1)

    def _add_semaphore(self, mm: AddressSpace, addr: int, delta: int) -> None:
        with contextlib.suppress(OSError), self.stopped(mm):
            value = int.from_bytes(mm.read(addr, 2), "little")
            mm.write(addr, ((value + delta) & 0xFFFF).to_bytes(2, "little"))

    def collect(self, mm: AddressSpace) -> None:
        """Restore every breakpoint and jump patch of mm that nothing holds (after a fork)."""
        for addr, n in list(mm.inherited.items()):  # increments of the parent's no probe of ours took
            for _ in range(n):
                self._add_semaphore(mm, addr, -1)
        mm.inherited.clear()
        for bp in [b for b in mm.breakpoints.values() if not b.consumers]:
            self._restore(mm, bp)
        for patch in list(mm.jumps.values()):
            guest = patch.guest
            if guest is not None and guest.users <= 0:
                patch.guest = None
                if mm.returns is not None:  # the child's own descriptors: its entries not counted
                    mm.returns.area.set_entry(patch.ret, 0, 0)
            if patch.users > 0 or patch.guest is not None:
                if patch.users <= 0 and mm.counters is not None:
                    mm.counters.set_enabled(patch.column, False)  # a stub kept for its entry probe
                continue
            del mm.jumps[patch.addr]
            with contextlib.suppress(OSError):
                mm.write(patch.addr, patch.orig)

    def _alloc_slot(self, mm: AddressSpace, addr: int, tid: int, size: int = SLOT_SIZE) -> int:
        size = -(-size // SLOT_SIZE) * SLOT_SIZE
        for area in mm.areas:
            if abs(area.base - addr) < NEAR and area.used + size <= area.size:
                slot = area.base + area.used
                area.used += size
                return slot
        maps = mm.maps()
        for _ in range(8):
            hint = free_gap_near(maps, addr, AREA_SIZE)
            if hint is None:
                break
            prot = inject.PROT_READ | inject.PROT_EXEC
            flags = inject.MAP_PRIVATE | inject.MAP_ANONYMOUS | inject.MAP_FIXED_NOREPLACE
            base = self._syscall(tid, mm, inject.SYS_MMAP, hint, AREA_SIZE, prot, flags, -1, 0)
            if base == hint:
                mm.areas.append(SlotArea(base, AREA_SIZE, size))
                return base
            if base > 0 and base < 1 << 47:  # mapped elsewhere: give it back
                self._syscall(tid, mm, inject.SYS_MUNMAP, base, AREA_SIZE)
            maps = mm.maps()
        raise TraceError(f"cannot map an out-of-line area near {addr:#x} in process {mm.pid}")

    def _syscall(self, tid: int, mm: AddressSpace, nr: int, *args: int) -> int:
        """Run a syscall in stopped thread tid of mm: through the guard area's restoring stub (made by
        the first syscall pmu runs in mm), so that a pmu killed meanwhile leaves nothing borrowed."""
        g = self._guard_area(mm, tid)
        if g is None:
            result, signals = inject.inject_syscall(tid, mm, nr, *args)
        else:
            stub, save = g.base + guard.STUB, g.base + guard.SAVE
            result, signals = inject.stub_syscall(tid, mm, stub, save, nr, *args)
        for sig in signals:
            self.pending.append((tid, (sig << 8) | 0x7F))
        return result

    def _guard_area(self, mm: AddressSpace, tid: int) -> guard.Guard | None:
        """mm's guard area, mapped by the first syscall pmu runs in mm (through a stub in spare code
        bytes, see inject.spare_code, or where there are none the two bytes at the thread's rip); None
        if it cannot be mapped."""
        if mm.guard is not None:
            return mm.guard
        prot = inject.PROT_READ | inject.PROT_EXEC
        flags = inject.MAP_PRIVATE | inject.MAP_ANONYMOUS
        args = (inject.SYS_MMAP, 0, guard.SIZE, prot, flags, -1, 0)
        spare = inject.spare_code(mm.pid, mm.maps(), guard.SPARE_SIZE)
        if spare is None:
            base, signals = inject.inject_syscall(tid, mm, *args)
        else:  # a stub of its own in bytes no thread runs: a pmu killed meanwhile leaves nothing wrong
            kept = mm.read(spare, guard.SPARE_SIZE)
            mm.write(spare, guard.stub_code(0, spare + guard.SPARE_SAVE))
            try:
                base, signals = inject.stub_syscall(tid, mm, spare, spare + guard.SPARE_SAVE, *args)
            finally:
                mm.write(spare, kept)
        for sig in signals:
            self.pending.append((tid, (sig << 8) | 0x7F))
        if base < 0:
            return None
        mm.write(base, guard.code_page(base))
        mm.guard = guard.Guard(base)
        return mm.guard

    def _guard(self, mm: AddressSpace, tid: int, ill: bool = False) -> guard.Guard | None:
        """mm's trap guard, installed on first use (every thread of mm stopped, `tid` one of them): the
        program's SIGTRAP disposition (and with `ill` its SIGILL one) saved and the guard's handler set.
        None if it cannot be installed (the probes then work, unguarded should pmu die)."""
        g = self._guard_area(mm, tid)
        if g is None:
            return None
        if not g.installed:
            data = inject.PROT_READ | inject.PROT_WRITE
            rest = guard.SIZE - guard.CODE_PAGE
            if self._syscall(tid, mm, inject.SYS_MPROTECT, g.base + guard.CODE_PAGE, rest, data):
                return None
            if not self._take_signal(mm, tid, g, guard.SIGTRAP, guard.OLD_ACT, guard.NEW_ACT):
                return None
            g.installed = True
        if ill and not g.ill_installed:
            if not self._take_signal(mm, tid, g, guard.SIGILL, guard.OLD_ILL, guard.NEW_ILL):
                return None
            g.ill_installed = True
        return g

    def _take_signal(self, mm: AddressSpace, tid: int, g: guard.Guard, sig: int, old: int, new: int) -> bool:
        """Save the program's disposition of `sig` at g.base+old and make the guard's handler it."""
        if self._syscall(tid, mm, inject.SYS_RT_SIGACTION, sig, 0, g.base + old, 8) < 0:
            return False
        _, old_flags, _, _ = guard.parse_sigaction(mm.read(g.base + old, 32))
        mm.write(g.base + new, guard.guard_action(g.base, old_flags))
        return self._syscall(tid, mm, inject.SYS_RT_SIGACTION, sig, g.base + new, 0, 8) >= 0

    def _guard_site(self, mm: AddressSpace, tid: int, addr: int, slot: int, length: int) -> None:
        """Tell mm's guard where the traps about to be written over the `length` bytes at addr (int3s,
        or UD over a 1-byte instruction) continue: the probe's slot."""
        g = self._guard(mm, tid, ill=length == 1)
        if g is None:
            return
        opcode = guard.INT3 if length > 1 else guard.UD
        for trap in range(addr, addr + length):
            entry = g.site_entry(trap, slot, addr, opcode)
            if entry is not None:
                mm.write(*entry)
        mm.write(*g.nsites_bytes())

    def _unguard(self, mm: AddressSpace, tid: int) -> None:
        """Put the program's SIGTRAP disposition back (unless it set one of its own meanwhile) and unmap
        the guard area: the last syscall pmu runs in mm. Every int3 of ours must be gone already."""
        g = mm.guard
        if g is None:
            return
        taken = [(guard.SIGTRAP, guard.OLD_ACT)] if g.installed else []
        taken += [(guard.SIGILL, guard.OLD_ILL)] if g.ill_installed else []
        for sig, old in taken:
            query = g.base + guard.QUERY
            if self._syscall(tid, mm, inject.SYS_RT_SIGACTION, sig, 0, query, 8) >= 0:
                handler, _, _, _ = guard.parse_sigaction(mm.read(query, 32))
                if handler == g.base + guard.CODE:
                    self._syscall(tid, mm, inject.SYS_RT_SIGACTION, sig, g.base + old, 0, 8)
        mm.guard = None
        _, signals = inject.munmap(tid, mm, g.base, guard.SIZE)  # not through the stub it unmaps
        for sig in signals:
            self.pending.append((tid, (sig << 8) | 0x7F))


def write_first_byte_first(mm: AddressSpace, addr: int, trap: bytes) -> None:
    """Write a probe's traps over an instruction: the trap at its first byte first, in a write of its
    own, so that a pmu killed between the writes leaves a trap the guard handles, never the original
    first byte followed by int3s (an instruction that is neither)."""
    mm.write(addr, trap[:1])
    if len(trap) > 1:
        mm.write(addr + 1, trap[1:])


def write_first_byte_last(mm: AddressSpace, addr: int, orig: bytes) -> None:
    """Put an instruction back from under its traps: its tail while the first byte still traps, then
    the first byte (see write_first_byte_first)."""
    if len(orig) > 1:
        mm.write(addr + 1, orig[1:])
    mm.write(addr, orig[:1])
