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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from pmu.errors import RelocationError, TraceError
from pmu.ring import ClockKind, Ring, ThreadKind
from pmu.trace import inject, retprobe, trampoline
from pmu.trace import ptrace_ops as pt
from pmu.trace.breakpoints import INT3
from pmu.trace.patchsafety import PatchPlan
from pmu.trace.relocate import SLOT_SIZE, relocate_run
from pmu.trace.tasks import (
    AddressSpace,
    CounterArea,
    CounterBank,
    InProcessReturns,
    JumpPatch,
    ReturnArea,
    Task,
    TaskState,
    TraceeRing,
)


class _Shared(Protocol):
    """pmu's side of a shared memfd: its size, and closing it (mapping and descriptor)."""

    @property
    def size(self) -> int: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=_Shared)


@dataclass(frozen=True)
class ReturnSpec:
    """A jump patch that serves a return probe in the process (retprobe.py)."""

    latency: bool = False
    """Keep a log2 histogram of the calls' latencies."""


def _own_return_area(fd: int) -> ReturnArea:
    os.ftruncate(fd, retprobe.AREA_BYTES)
    mem = mmap.mmap(fd, retprobe.AREA_BYTES)
    os.close(fd)
    area = ReturnArea(mem, 0, retprobe.AREA_BYTES)
    area.put(retprobe.A_MULT, _ns_mult().to_bytes(8, "little"))
    return area


def _ns_mult() -> int:
    """ns = ticks * mult >> 32, for the return trampoline's latencies: from a calibration over a few
    milliseconds (a latency's error is that of the TSC's rate, about 0.1 %)."""
    from pmu.tsc import Calibration

    global _MULT
    if _MULT is None:
        clock = Calibration()
        clock.add()
        time.sleep(0.005)
        clock.add()
        _MULT = round((1 << 32) / clock.ticks_per_ns)
    return _MULT


_MULT: int | None = None


class Patches:
    """The tracer's jump patches, counter areas and tracee rings (mixed into Tracer)."""

    early: dict[int, int]
    ring_shape: tuple[int, int] | None
    rings: list[Ring]

    if TYPE_CHECKING:  # the Tracer's, which this class is mixed into

        def stopped(self, mm: AddressSpace) -> contextlib.AbstractContextManager[int]: ...

        def _alloc_slot(self, mm: AddressSpace, addr: int, tid: int, size: int = SLOT_SIZE) -> int: ...

        def _syscall(self, tid: int, mm: AddressSpace, nr: int, *args: int) -> int: ...

        def _hook_unwinder(self, mm: AddressSpace) -> None: ...

        def return_trampoline(self, mm: AddressSpace, near: int) -> int: ...

        def insert(self, mm: AddressSpace, addr: int, consumer: Callable[[Task], None]) -> None: ...

        def _skipped_entry(self, task: Task) -> None: ...

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
        returns: ReturnSpec | None = None,
    ) -> JumpPatch:
        """Replace the instructions `plan` displaces at addr by a jump to a counting trampoline (which
        also records hits into mm's ring with `record` = (event index, number of args, period)),
        counting from the moment the jump is written if `enabled`. With `returns`, a return probe
        served in the process (retprobe.py): the trampoline is a stub that hijacks the return, and its
        column counts returns (recorded with `record`, their latency kept with `returns.latency`).

        Every thread is stopped; one whose RIP lies inside the displaced instructions is moved to the
        matching instruction of the trampoline. An existing patch at addr (a forked child's copy) is
        re-owned instead.
        """
        patch = mm.jumps.get(addr)
        if patch is not None:
            if (patch.ret >= 0) == (returns is not None):
                patch.users += 1
                return patch
            if returns is None:
                return self._entry_guest(mm, patch)
        host = patch  # an entry probe's counting trampoline, which a return stub takes over
        if host is not None:
            host.users, users = 0, host.users  # not a user of its own bytes any more
        for other in mm.breakpoints:
            if addr < other < addr + plan.length:
                raise RelocationError(f"another probe at {other:#x} lies inside the bytes to patch")
        try:
            return self._jump_patch(mm, addr, plan, record, enabled, returns, host)
        finally:
            if host is not None:
                host.users = users

    def _jump_patch(
        self,
        mm: AddressSpace,
        addr: int,
        plan: PatchPlan,
        record: tuple[int, int, int] | None,
        enabled: bool,
        returns: ReturnSpec | None,
        host: JumpPatch | None,
    ) -> JumpPatch:
        column = mm.columns
        area = self.counters(mm, addr, column)
        index, site = area.bank_of(column)
        base = area.banks[index].address
        spec = None
        ring = 0
        if record is not None:
            ring = self.tracee_ring(mm, addr).address
            spec = trampoline.RecordSpec(ring, record[0], addr, record[1], record[2])
        ret = -1
        desc = 0
        if returns is not None:
            rp = self.inprocess_returns(mm, addr)
            if rp.used >= retprobe.NRET:
                raise RelocationError(f"more than {retprobe.NRET} return probes in one process")
            ret = rp.used
            flags = (retprobe.FLAG_LATENCY if returns.latency else 0) | (
                retprobe.FLAG_RECORD if record else 0
            )
            event, nargs, period = record or (0, 0, 1)
            ebank = esite = 0
            if host is not None:  # the entry probe there: counted by the stub from now on
                ebank, esite = self._bank_site(mm, host.column)
            d = retprobe.Desc(base, site, ret, flags, nargs, ring, addr, event, period, ebank, esite)
            desc = retprobe.desc_address(rp.area.address, ret)
            rp.area.put(desc - rp.area.address, d.pack())  # before any thread can enter
            rp.used += 1
        with self.stopped(mm) as tid:
            code = mm.read(addr, plan.length + 16)
            if host is not None:
                code = host.orig + code[len(host.orig) :]
            if code[:1] == INT3:
                raise RelocationError(f"there is already an int3 at {addr:#x}")
            if returns is not None:
                assert mm.returns is not None
                head = retprobe.STUB_HEAD
                tramp = self._alloc_slot(mm, addr, tid, head + 16 * plan.count + 64 + 8)
            else:
                head = len(trampoline.counting_trampoline(base, site, spec))
                tramp = self._alloc_slot(
                    mm, addr, tid, head + 16 * plan.count + 64 + trampoline.SLOW_PATH_BYTES
                )
            body, _, placed = relocate_run(code, addr, tramp + head, plan.count)
            moves = [(offset, tramp + head + at) for offset, at in zip(plan.boundaries, placed, strict=True)]
            if returns is not None:
                assert mm.returns is not None
                tcode = retprobe.stub(desc, mm.returns.blob + retprobe.ENTRY, body, tramp, addr + plan.length)
                lock = 0
            else:
                tr = trampoline.build(base, site, body, tramp, addr + plan.length, spec, mm.locked)
                tcode, lock = tr.code, tr.lock
            mm.write(tramp, tcode)
            for t in mm.tasks:
                if t.state is TaskState.STOPPED:
                    rip = pt.peek_user(t.tid, pt.RIP)
                    for offset, target in moves:
                        if offset and rip == addr + offset:
                            pt.poke_user(t.tid, pt.RIP, target)
            area.set_enabled(column, enabled)  # before any thread can enter
            rel = tramp - (addr + 5)
            mm.write(addr, b"\xe9" + rel.to_bytes(4, "little", signed=True) + INT3 * (plan.length - 5))
            lock_at = tramp + lock if lock else 0
            patch = JumpPatch(
                addr, code[: plan.length], tramp, column, tuple(moves), lock_at=lock_at, ret=ret, guest=host
            )
            mm.jumps[addr] = patch
            mm.columns += 1
        return patch

    def _bank_site(self, mm: AddressSpace, column: int) -> tuple[int, int]:
        """(the address of the bank holding `column`, its site there)."""
        area = self.counters(mm, 0, column)
        index, site = area.bank_of(column)
        return area.banks[index].address, site

    def _entry_guest(self, mm: AddressSpace, host: JumpPatch) -> JumpPatch:
        """An entry probe at the address of a return probe's stub: counted by the stub, in a column of
        its own (the descriptor's entry bank and site)."""
        if host.guest is not None:
            host.guest.users += 1
            return host.guest
        column = mm.columns
        ebank, esite = self._bank_site(mm, column)
        mm.columns += 1
        guest = JumpPatch(host.addr, host.orig, host.tramp, column, host.moves)
        assert mm.returns is not None
        mm.returns.area.set_entry(host.ret, ebank, esite)
        host.guest = guest
        return guest

    def inprocess_returns(self, mm: AddressSpace, near: int) -> InProcessReturns:
        """mm's machinery for return probes served in the process (retprobe.py), made on first use with
        every thread stopped: the shadow area (private: a forked child's is a copy), the return area
        (a memfd pmu maps too) and the blob, its first words pointing to both."""
        if mm.returns is not None:
            return mm.returns
        with self.stopped(mm) as tid:
            prot = inject.PROT_READ | inject.PROT_WRITE
            flags = inject.MAP_PRIVATE | inject.MAP_ANONYMOUS | inject.MAP_NORESERVE
            shadow = self._syscall(tid, mm, inject.SYS_MMAP, 0, retprobe.SHADOW_BYTES, prot, flags, -1, 0)
            if not 0 < shadow < 1 << 47:
                raise TraceError(
                    f"cannot map a shadow stack area in process {mm.pid}: {os.strerror(-shadow)}"
                )
            try:
                area, address = self._shared_memfd(mm, tid, near, "returns", _own_return_area, 0)
                area.address = address
                try:
                    blob = self._alloc_slot(mm, near, tid, len(retprobe.CODE))
                    mm.write(blob, retprobe.CODE)
                    mm.write(blob, retprobe.header(shadow, address, mm.locked))
                except BaseException:
                    self._syscall(tid, mm, inject.SYS_MUNMAP, address, area.size)
                    area.close()
                    raise
            except BaseException:
                self._syscall(tid, mm, inject.SYS_MUNMAP, shadow, retprobe.SHADOW_BYTES)
                raise
            mm.returns = InProcessReturns(blob, shadow, area)
        self.return_trampoline(mm, near)  # for the entries the blob leaves to ptrace (SKIP_TRAP)
        self.insert(mm, blob + retprobe.SKIP_TRAP, self._skipped_entry)
        mm.internal[blob + retprobe.SKIP_TRAP] = "skip"
        self._hook_unwinder(mm)
        return mm.returns

    def _own_returns(self, child: Task, shared: InProcessReturns) -> None:
        """A forked child keeps the shadow area (a copy) and blob, and gets a return area of its own at
        its parent's address, with the same descriptors (its lost counts and histograms start at 0)."""
        state, child.state = child.state, TaskState.STOPPED
        try:
            near = shared.blob
            fixed = shared.area.address
            area, _ = self._shared_memfd(child.mm, child.tid, near, "returns", _own_return_area, 0, fixed)
            area.address = fixed
            descs = slice(retprobe.A_DESCS, retprobe.A_DESCS + retprobe.DESC * retprobe.NRET)
            assert area.mem is not None and shared.area.mem is not None
            area.mem[descs] = shared.area.mem[descs]
            child.mm.returns = InProcessReturns(shared.blob, shared.shadow, area, shared.used)
            shared.area.fold()  # the child no longer writes its parent's
        finally:
            child.state = state

    def unpatch(self, mm: AddressSpace, addr: int, returns: bool = False) -> None:
        """Drop one user of the jump patch at addr (the return probe's with `returns`, else the entry
        probe's); the last one puts the original bytes back. A return stub that also counts an entry
        probe stays while that probe does, its returns no longer counted.

        A thread inside the trampoline finishes its way through it (the trampoline stays mapped)."""
        host = mm.jumps.get(addr)
        if host is None:
            return
        if (host.ret >= 0) != returns:
            guest = host.guest
            if guest is None:
                return
            guest.users -= 1
            if guest.users > 0:
                return
            host.guest = None
            if not mm.dead and mm.returns is not None:
                mm.returns.area.set_entry(host.ret, 0, 0)
            if host.users > 0:
                return
        else:
            host.users -= 1
            if host.users > 0:
                return
            if host.guest is not None and host.guest.users > 0:
                if mm.counters is not None:
                    mm.counters.set_enabled(host.column, False)
                return
        del mm.jumps[addr]
        if not mm.dead:
            with self.stopped(mm), contextlib.suppress(OSError):
                mm.write(addr, host.orig)

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
            own.copy_keys(shared)  # and rows where its parent's were: hijacked returns point into them
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
        if mm.returns is not None:  # no new in-process frames: the two would share a shadow row
            with self.stopped(mm):
                mm.write(mm.returns.blob + retprobe.B_LOCKED, (1).to_bytes(8, "little"))
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
