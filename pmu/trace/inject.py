"""Syscalls run inside a stopped tracee: mmap and munmap of the out-of-line area, as gdb runs infcalls.

The thread's registers (and the two code bytes the first syscall in a process borrows) are restored
exactly; a signal that arrives meanwhile is handed back to the caller to deliver later, unchanged.

The first syscall in a process (the mmap of pmu's guard area) borrows bytes no thread ever runs: the
tail of an executable mapping past its ELF segment's end (spare_code); only where there is none does
it borrow the two bytes at the thread's rip. Syscalls then run through the guard area's restoring
stub (guard.py): the thread is pointed at `syscall` followed by code that reloads every register from
a save block and returns to where the thread was. pmu normally puts the registers back itself after
the one step; the stub's own way back is for a pmu killed in between, so that its death never leaves a
thread with borrowed registers or a process with borrowed code.
"""

from __future__ import annotations

import os
import signal

from pmu.errors import TraceError
from pmu.trace import ptrace_ops as pt
from pmu.trace.maps import Mapping
from pmu.trace.tasks import AddressSpace

SYSCALL_INSN = b"\x0f\x05"
RED_ZONE = 128

SYS_CLOSE = 3
SYS_FTRUNCATE = 77
SYS_MEMFD_CREATE = 319
MFD_CLOEXEC = 1
SYS_MMAP = 9
SYS_MPROTECT = 10
SYS_RT_SIGACTION = 13
SYS_MUNMAP = 11
SYS_OPENAT = 257
AT_FDCWD = -100
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x01, 0x02, 0x10, 0x20, 0x100000
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000


def spare_code(pid: int, mappings: list[Mapping], size: int) -> int | None:
    """An address of `size` bytes, 16-aligned, in an executable file mapping of process `pid` past the
    end of the ELF segment it maps (the rest of the segment's last page): code no thread runs and no
    program reads through that mapping. None if no mapping has room."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    for m in mappings:
        if not m.executable or not m.path.startswith("/"):
            continue
        try:
            with open(f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}", "rb") as f:
                segments = [s.header for s in ELFFile(f).iter_segments() if s.header.p_type == "PT_LOAD"]
        except (OSError, ELFError, ValueError):
            continue
        for seg in segments:
            end_offset = seg.p_offset + seg.p_filesz
            if seg.p_memsz != seg.p_filesz or not m.offset <= seg.p_offset < m.offset + (m.end - m.start):
                continue
            start = int(m.start + end_offset - m.offset + 15) & ~15
            if m.start < start and start + size <= m.end:
                return start
    return None


def _syscall_regs(saved: pt.Regs, nr: int, args: tuple[int, ...]) -> pt.Regs:
    """A copy of `saved` set up to make syscall `nr` with `args` (no restart of the borrowed ones)."""
    regs = pt.copy_regs(saved)
    regs.rax = nr
    regs.orig_rax = -1 & 0xFFFFFFFFFFFFFFFF
    for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args, strict=False):
        setattr(regs, name, value & 0xFFFFFFFFFFFFFFFF)
    return regs


def inject_syscall(tid: int, mm: AddressSpace, nr: int, *args: int) -> tuple[int, list[int]]:
    """Run syscall `nr` in stopped thread `tid`; return (result, signals that arrived meanwhile).

    Every thread of `mm` must be stopped. The result is the raw rax (negative errno on failure).
    """
    saved = pt.get_regs(tid)
    regs = _syscall_regs(saved, nr, args)
    at = saved.rip
    orig = mm.read(at, len(SYSCALL_INSN))
    regs.rsp = (saved.rsp - RED_ZONE) & ~0xF
    pending: list[int] = []
    mm.write(at, SYSCALL_INSN)
    try:
        pt.set_regs(tid, regs)
        while True:
            pt.singlestep(tid)
            _, status = pt.wait(tid)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                raise TraceError(f"thread {tid} died while pmu ran a syscall in it")
            sig = os.WSTOPSIG(status)
            if sig == signal.SIGTRAP and status >> 16 == 0:
                now = pt.get_regs(tid)
                if now.rip == at + len(SYSCALL_INSN):
                    result = int(now.rax)
                    break
            elif status >> 16 == 0:
                pending.append(sig)  # a real signal: deliver it later, at the original place
            # PTRACE_EVENT stops (interrupt, exit) cannot complete the step: step again.
    finally:
        mm.write(at, orig)
        pt.set_regs(tid, saved)
    if result >= 1 << 63:
        result -= 1 << 64
    return result, pending


_RESTART = {512, 513, 514}
"""-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND: a blocking syscall the stop interrupted."""
_RESTART_BLOCK = 516
SYS_RESTART_SYSCALL = 219


def _restarted(regs: pt.Regs) -> pt.Regs:
    """`regs` of a thread stopped inside a blocking syscall (rax a restart code), made to run the
    syscall again. The kernel does that itself when it resumes the thread from its stop, but a thread
    that leaves through the stub returns from the stub's syscall-exit stop, where no restart is made:
    its read() would return -512 to the program."""
    orig = int(regs.orig_rax)
    code = (-int(regs.rax)) & 0xFFFFFFFFFFFFFFFF
    if orig >= 1 << 63 or not (code in _RESTART or code == _RESTART_BLOCK):
        return regs
    fixed = pt.copy_regs(regs)
    fixed.rax = SYS_RESTART_SYSCALL if code == _RESTART_BLOCK else orig
    fixed.rip = int(regs.rip) - len(SYSCALL_INSN)
    fixed.orig_rax = -1 & 0xFFFFFFFFFFFFFFFF
    return fixed


def stub_syscall(
    tid: int, mm: AddressSpace, stub: int, save: int, nr: int, *args: int
) -> tuple[int, list[int]]:
    """Run syscall `nr` in stopped thread `tid` through the restoring stub at `stub` (guard.py's
    layout: its save block at `save`). Same contract as inject_syscall."""
    from pmu.trace.guard import save_block

    saved = _restarted(pt.get_regs(tid))
    regs = _syscall_regs(saved, nr, args)
    regs.rip = stub
    back = saved.rsp - RED_ZONE - 8  # the stub's `ret 128` returns through here: below the red zone
    mm.write(back, int(saved.rip).to_bytes(8, "little"))
    mm.write(save, save_block(saved, back))
    pending: list[int] = []
    pt.set_regs(tid, regs)
    # Syscall stops, not a single step: a pmu killed at either stop leaves a thread that simply goes on
    # through the stub, where a step's SIGTRAP, pending as pmu dies, would be delivered to the program.
    entered = False
    try:
        while True:
            pt.syscall(tid)
            _, status = pt.wait(tid)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                raise TraceError(f"thread {tid} died while pmu ran a syscall in it")
            sig = os.WSTOPSIG(status)
            if sig == pt.SYSCALL_TRAP and status >> 16 == 0:
                if entered:
                    result = int(pt.get_regs(tid).rax)
                    break
                entered = True
            elif status >> 16 == 0:
                pending.append(sig)
            # PTRACE_EVENT stops (interrupt, exit): resume to the syscall's stops.
    finally:
        pt.set_regs(tid, saved)
    if result >= 1 << 63:
        result -= 1 << 64
    return result, pending


def mmap_near(tid: int, mm: AddressSpace, hint: int, size: int) -> tuple[int, list[int]]:
    """Map `size` bytes r-x at exactly `hint` (MAP_FIXED_NOREPLACE); returns (address or -errno, signals)."""
    return inject_syscall(
        tid,
        mm,
        SYS_MMAP,
        hint,
        size,
        PROT_READ | PROT_EXEC,
        MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
        -1,
        0,
    )


def munmap(tid: int, mm: AddressSpace, addr: int, size: int) -> tuple[int, list[int]]:
    return inject_syscall(tid, mm, SYS_MUNMAP, addr, size)
