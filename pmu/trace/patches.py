"""Jump-optimized probes and the memory pmu shares with a tracee.

A jump patch replaces a function's first instructions by a jmp to a counting trampoline in the tracee
(trampoline.py), so a hit costs no stop. The trampolines count into a counter area and record into a
ring; both are memfds the tracee makes and maps shared, and pmu maps too (`_shared_memfd`, the one
routine for both), so counts and records stay readable after the tracee exec'd or died.

A mixin of the Tracer (pmu/trace/tracer.py), as breakpoints.py is.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from pmu.errors import RelocationError, TraceError
from pmu.ring import ClockKind, Ring, ThreadKind
from pmu.trace import inject, trampoline
from pmu.trace import ptrace_ops as pt
from pmu.trace.breakpoints import INT3
from pmu.trace.patchsafety import PatchPlan
from pmu.trace.relocate import SLOT_SIZE, relocate_run
from pmu.trace.tasks import AddressSpace, CounterArea, CounterBank, JumpPatch, Task, TaskState, TraceeRing


class _Shared(Protocol):
    """pmu's side of a shared memfd: its size, and closing it (mapping and descriptor)."""

    @property
    def size(self) -> int: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=_Shared)


class Patches:
    """The tracer's jump patches, counter areas and tracee rings (mixed into Tracer)."""

    early: dict[int, int]
    ring_shape: tuple[int, int] | None
    rings: list[Ring]

    if TYPE_CHECKING:  # the Tracer's, which this class is mixed into

        def stopped(self, mm: AddressSpace) -> contextlib.AbstractContextManager[int]: ...

        def _alloc_slot(self, mm: AddressSpace, addr: int, tid: int, size: int = SLOT_SIZE) -> int: ...

        def _syscall(self, tid: int, mm: AddressSpace, nr: int, *args: int) -> int: ...

    def counters(self, mm: AddressSpace, near: int, column: int = 0) -> CounterArea:
        """The counter area of mm, with a bank for `column`: memfds pmu maps too, mapped shared into the
        tracee (near `near`) as columns need them."""
        area = mm.counters
        if area is None:
            area = mm.counters = CounterArea(locked=mm.locked)
            fresh = True
        else:
            fresh = False
        if column >= area.columns:
            with self.stopped(mm) as tid:
                while column >= area.columns:
                    area.banks.append(self._map_bank(mm, tid, near))
        if fresh:
            self._check_identity(mm)
        return area

    def _map_bank(self, mm: AddressSpace, tid: int, near: int, fixed: int | None = None) -> CounterBank:
        """A new counter bank in mm (at `fixed`, where a forked child's parent has its own)."""

        def own(fd: int) -> CounterBank:
            os.ftruncate(fd, trampoline.AREA_BYTES)
            mem = mmap.mmap(fd, trampoline.AREA_BYTES)  # which keeps a descriptor of its own
            os.close(fd)  # (own() owns fd once it returns, and may close it)
            bank = CounterBank(mem, 0, trampoline.AREA_BYTES)
            bank.format(mm.pid)
            return bank

        bank, address = self._shared_memfd(mm, tid, near, "counter area", own, 0, fixed)
        bank.address = address
        return bank

    def tracee_ring(self, mm: AddressSpace, near: int) -> TraceeRing:
        """The ring mm's recording trampolines write into: made on first use, like the counter area (pmu
        formats it and keeps its own mapping)."""
        if mm.ring is not None:
            return mm.ring
        if self.ring_shape is None:
            raise TraceError("no ring for recording trampolines (not recording)")
        pages, nevents = self.ring_shape

        def own(fd: int) -> Ring:
            return Ring.format(fd, pages, nevents, clock=ClockKind.TSC, thread=ThreadKind.FS_BASE)

        with self.stopped(mm) as tid:
            # Populated now: a page fault per 32 records would more than double the cost of a hit.
            ring, addr = self._shared_memfd(mm, tid, near, "ring", own, inject.MAP_POPULATE)
        self.rings.append(ring)
        mm.ring = TraceeRing(ring, addr, ring.size)
        return mm.ring

    def _shared_memfd(
        self,
        mm: AddressSpace,
        tid: int,
        near: int,
        what: str,
        own: Callable[[int], S],
        flags: int,
        fixed: int | None = None,
    ) -> tuple[S, int]:
        """The one way pmu shares memory with a tracee (stopped thread tid of mm): the tracee makes a
        memfd, so it may run as any user; pmu takes a copy of the descriptor with pidfd_getfd (the ptrace
        right is enough) and `own(fd)` sizes and maps pmu's side (owning fd once it returns); the tracee
        maps it shared (with `flags`, at `fixed`) and closes its descriptor. Returns (what own made, the
        tracee's address); nothing is left, on either side, if a step fails."""
        label = f"pmu-{what.replace(' ', '-')}".encode() + b"\0"
        scratch = self._alloc_slot(mm, near, tid, len(label))
        mm.write(scratch, label)
        tfd = self._syscall(tid, mm, inject.SYS_MEMFD_CREATE, scratch, inject.MFD_CLOEXEC)
        if tfd < 0:
            raise TraceError(f"cannot make a {what} in process {mm.pid}: {os.strerror(-tfd)}")
        try:
            fd = pt.fd_of(mm.pid, tfd)
            try:
                shared = own(fd)
            except BaseException:
                os.close(fd)
                raise
            prot = inject.PROT_READ | inject.PROT_WRITE
            flags |= inject.MAP_SHARED | (inject.MAP_FIXED if fixed else 0)
            addr = self._syscall(tid, mm, inject.SYS_MMAP, fixed or 0, shared.size, prot, flags, tfd, 0)
            if addr < 0 or (fixed and addr != fixed):
                shared.close()
                reason = os.strerror(-addr) if addr < 0 else f"not at {fixed:#x}"
                raise TraceError(f"cannot map a {what} in process {mm.pid}: {reason}")
            return shared, addr
        finally:
            self._syscall(tid, mm, inject.SYS_CLOSE, tfd)

    def jump_patch(
        self,
        mm: AddressSpace,
        addr: int,
        plan: PatchPlan,
        record: tuple[int, int, int] | None = None,
        enabled: bool = False,
    ) -> JumpPatch:
        """Replace the instructions `plan` displaces at addr by a jump to a counting trampoline (which
        also records hits into mm's ring with `record` = (event index, number of args, period)),
        counting from the moment the jump is written if `enabled`.

        Every thread is stopped; one whose RIP lies inside the displaced instructions is moved to the
        matching instruction of the trampoline. An existing patch at addr (a forked child's copy) is
        re-owned instead.
        """
        patch = mm.jumps.get(addr)
        if patch is not None:
            patch.users += 1
            return patch
        for other in mm.breakpoints:
            if addr < other < addr + plan.length:
                raise RelocationError(f"another probe at {other:#x} lies inside the bytes to patch")
        column = mm.columns
        area = self.counters(mm, addr, column)
        index, site = area.bank_of(column)
        base = area.banks[index].address
        spec = None
        if record is not None:
            ring = self.tracee_ring(mm, addr).address
            spec = trampoline.RecordSpec(ring, record[0], addr, record[1], record[2])
        with self.stopped(mm) as tid:
            code = mm.read(addr, plan.length + 16)
            if code[:1] == INT3:
                raise RelocationError(f"there is already an int3 at {addr:#x}")
            head = len(trampoline.counting_trampoline(base, site, spec))
            tramp = self._alloc_slot(mm, addr, tid, head + 16 * plan.count + 64 + trampoline.SLOW_PATH_BYTES)
            body, _, placed = relocate_run(code, addr, tramp + head, plan.count)
            moves = [(offset, tramp + head + at) for offset, at in zip(plan.boundaries, placed, strict=True)]
            tr = trampoline.build(base, site, body, tramp, addr + plan.length, spec, mm.locked)
            mm.write(tramp, tr.code)
            for t in mm.tasks:
                if t.state is TaskState.STOPPED:
                    rip = pt.peek_user(t.tid, pt.RIP)
                    for offset, target in moves:
                        if offset and rip == addr + offset:
                            pt.poke_user(t.tid, pt.RIP, target)
            area.set_enabled(column, enabled)  # before any thread can enter
            rel = tramp - (addr + 5)
            mm.write(addr, b"\xe9" + rel.to_bytes(4, "little", signed=True) + INT3 * (plan.length - 5))
            lock_at = tramp + tr.lock if tr.lock else 0
            patch = JumpPatch(addr, code[: plan.length], tramp, column, tuple(moves), lock_at=lock_at)
            mm.jumps[addr] = patch
            mm.columns += 1
        return patch

    def unpatch(self, mm: AddressSpace, addr: int) -> None:
        """Drop one user of the jump patch at addr; the last one puts the original bytes back.

        A thread inside the trampoline finishes its way through it (the trampoline stays mapped)."""
        patch = mm.jumps.get(addr)
        if patch is None:
            return
        patch.users -= 1
        if patch.users > 0:
            return
        del mm.jumps[addr]
        if not mm.dead:
            with self.stopped(mm), contextlib.suppress(OSError):
                mm.write(addr, patch.orig)

    def _own_counters(self, child: Task, shared: CounterArea) -> None:
        """A forked child counts in a counter area of its own, mapped where the parent's was."""
        if child.tid not in self.early:
            _, status = pt.wait(child.tid)
            self.early[child.tid] = status
        state, child.state = child.state, TaskState.STOPPED
        try:
            own = CounterArea()
            try:
                for bank in shared.banks:
                    near = child.mm.areas[0].base if child.mm.areas else bank.address
                    own.banks.append(self._map_bank(child.mm, child.tid, near, fixed=bank.address))
            except BaseException:
                own.close()
                raise
            own.copy_enabled(shared)  # counting as its parent was: same probes enabled, no counts yet
            child.mm.counters = own
        finally:
            child.state = state

    def _check_identity(self, mm: AddressSpace, new: Task | None = None) -> None:
        """Whether mm's fast paths may read a thread's identity from its TCB (fs:[0], about 2 ns a hit
        cheaper than rdfsbase here): while every thread of mm has an FS base whose first word is the FS
        base itself (the self pointer of glibc's and musl's TCB). A thread with no TLS yet (FS base 0, as
        from an exec until ld.so sets it up) or another runtime's makes it rdfsbase for all. Checked when
        the area is made, at a thread's first stop (before it runs) and whenever pmu sees a thread's FS
        base change (`new`: while the TCB is used, that thread alone can break it; otherwise all are
        looked at again). A thread that moved its FS base to unmapped memory without pmu seeing it stop
        would fault at a probe: runtimes point FS at their TLS."""
        area = mm.counters
        if area is None or os.environ.get("PMU_NO_TCB"):
            return
        if new is not None and area.tcb:
            area.set_tcb(_own_tcb(mm, new))
            return
        gone = (TaskState.EXITED, TaskState.EXITING)
        area.set_tcb(all(_own_tcb(mm, t) for t in mm.tasks if t.state not in gone and t.pid == mm.pid))

    def _check_shared_fs(self, task: Task) -> None:
        """Two live threads with one FS base (a clone without CLONE_SETTLS) share a counter row: from
        now on every trampoline of their address space increments it with a lock (trampoline.LOCK).
        Checked at a thread's first stop, before it has run any code. A vfork child is left out: it
        has its parent's TLS, but the parent is suspended until the child execs or exits."""
        mm = task.mm
        fs = task.fs_base
        if mm.locked or not fs or task.pid != mm.pid:
            return
        live = (TaskState.EXITED, TaskState.EXITING)
        if not any(
            t is not task and t.fs_base == fs and t.pid == mm.pid and t.state not in live for t in mm.tasks
        ):
            return
        mm.locked = True
        if mm.counters is not None:
            mm.counters.lock()  # the fast paths' (a byte each, read at every hit)
        if any(patch.lock_at for patch in mm.jumps.values()):
            with self.stopped(mm):
                for patch in mm.jumps.values():
                    if patch.lock_at:  # a classic trampoline's nop becomes a lock prefix
                        mm.write(patch.lock_at, bytes([trampoline.LOCK]))


def _own_tcb(mm: AddressSpace, task: Task) -> bool:
    """Whether the task's FS base (as last seen) is non-zero and its first word points to itself."""
    fs = task.fs_base
    if not fs:
        return False
    try:
        return mm.read(fs, 8) == fs.to_bytes(8, "little")
    except OSError:
        return False
