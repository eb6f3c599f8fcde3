"""The trap guard: a SIGTRAP (and SIGILL) handler pmu installs in a process before it writes its first
trap there, so that a trap pmu leaves behind never kills the process, even when pmu itself is killed
(SIGKILL).

While pmu traces the process the handler never runs for pmu's own traps: each int3 of ours stops the
thread and pmu handles it. Only when no tracer is left (pmu died) does the kernel deliver such a trap
to the process, and the handler then does what pmu would have done, minus the counting:

- an int3 at a probe site (or the invalid opcode UD on a 1-byte instruction, a SIGILL): continue in
  the site's out-of-line slot (the relocated displaced instruction and a jump back), or rewind to the
  site if its trap was removed meanwhile;
- the int3 that hijacked returns land on: return to the real return address, found by stack slot in
  the frame table pmu fills at every hijack;
- any other SIGTRAP or SIGILL (the program's own int3 or ud2, raise, kill -TRAP): what the program's own
  disposition says. A handler of the program's is called with the same arguments; SIG_IGN returns;
  SIG_DFL is put back and the signal raised again, so the process dies of SIGTRAP as it would have.

At detach pmu puts the program's disposition back (unless the program changed it meanwhile) and
unmaps the area. Known limits: a program that queries SIGTRAP's disposition while traced sees the
guard's; one that installs its own SIGTRAP handler while traced replaces the guard (pmu's traps are
then unguarded should pmu die); a thread that blocks SIGTRAP dies of a trap left behind, as the kernel
forces the default action on a blocked synchronous trap.

The area (private anonymous memory: a forked child gets a copy of the tables with its copy of the
stacks; exec drops the handler with the image):

    0x0000  handler code                                         r-x
    0x0D00  the syscall stub (inject.stub_syscall), 0x0E00 its save block
    0x0F00  the restorer (rt_sigreturn)
    0x1000  the program's sigaction (kernel layout: handler, flags, restorer, mask)
    0x1020  the guard's sigaction
    0x1040  scratch sigaction (what the disposition is at detach)
    0x1060  ret_tramp  u64        the return trampoline's int3 (0: none)
    0x1068  nsites     u64        site entries in use
    0x1080  the program's SIGILL sigaction, 0x10A0 the guard's
    0x2000  sites      (trap address, slot, probe address, trap opcode) u64s, NSITES of them
    0x22000 frames     (stack slot, return address) u64 pairs, NFRAMES of them

A probe's int3 fills every byte of the displaced instruction, and the return trampoline is two int3s:
a thread stopped at a trap when pmu dies is not given its SIGTRAP (the kernel drops a signal whose
delivery stop outlives the tracer) and resumes after the int3; it then traps on the next one, this
time with no tracer to drop the signal, and the handler knows that address too. A 1-byte instruction
has no second byte to trap on: its probe is the invalid opcode UD instead of an int3, a fault that
leaves RIP at the trap, so a thread whose SIGILL was dropped runs the trap again, and this time the
handler has it (the SIGILL disposition is taken over only once such a probe exists).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from pmu.trace.trampoline import _assemble, _Insn

SIGTRAP = 5
SIGILL = 4
ILL_ILLOPN = 2
"""si_code of the SIGILL an invalid opcode (#UD) raises."""
UD = 0x06
"""The trap written over a 1-byte instruction: invalid in 64-bit mode, so a fault (#UD, SIGILL) that
leaves RIP at the byte, where an int3 is a trap that leaves it after."""
INT3 = 0xCC
SA_SIGINFO = 0x4
SA_ONSTACK = 0x08000000
SA_RESTORER = 0x04000000
SIG_DFL, SIG_IGN = 0, 1
SI_KERNEL = 0x80

CODE = 0x0000
STUB = 0x0D00
SAVE = 0x0E00
RESTORER = 0x0F00
OLD_ACT = 0x1000
NEW_ACT = 0x1020
QUERY = 0x1040
RET_TRAMP = 0x1060
NSITES_USED = 0x1068
OLD_ILL = 0x1080
NEW_ILL = 0x10A0
SITES = 0x2000
NSITES = 4096
FRAMES = SITES + 32 * NSITES
NFRAMES = 65536
"""Hijacked returns a process can have live at once (recursion 10,000 deep in several threads)."""
SIZE = FRAMES + 16 * NFRAMES
CODE_PAGE = 0x1000
SPARE_SAVE = 0x40
"""Where the save block goes after a stub written into spare code (inject.spare_code)."""
SPARE_SIZE = SPARE_SAVE + 0x90

# ucontext_t on x86-64: uc_mcontext.gregs starts at 40; RSP is gregs[15], RIP gregs[16].
UC_RSP = 40 + 8 * 15
UC_RIP = 40 + 8 * 16
SI_CODE = 8
SYS_RT_SIGRETURN = 15
SYS_RT_SIGACTION = 13
SYS_MPROTECT = 10
SYS_GETPID = 39
SYS_GETTID = 186
SYS_TGKILL = 234


def _d32(v: int) -> bytes:
    return struct.pack("<i", v)


def handler_code() -> bytes:
    """The handler of SIGTRAP and SIGILL (rdi = signal, rsi = siginfo, rdx = ucontext), position
    independent: it finds the area from its own address. It uses only rax, rcx, r8-r11 until it hands
    over to the program's handler with rdi, rsi and rdx as the kernel passed them."""
    prog: list[_Insn] = [
        ("", b"\x4c\x8d\x1d" + _d32(-7), None),  # lea r11, [rip-7]         the area (this insn is first)
        ("", b"\x83\xff" + bytes([SIGILL]), None),  # cmp edi, SIGILL
        ("", b"\x74", "ill"),  # je ill
        ("", b"\x81\x7e" + bytes([SI_CODE]) + struct.pack("<I", SI_KERNEL), None),  # cmp [rsi+8], SI_KERNEL
        ("", b"\x75", "chain"),  # jne chain                 not a trap instruction: not ours
        ("", b"\x48\x8b\x82" + _d32(UC_RIP), None),  # mov rax, [rdx+RIP]
        ("", b"\x4c\x8d\x40\xff", None),  # lea r8, [rax-1]           where the int3 is
        ("", b"\x4d\x3b\x83" + _d32(RET_TRAMP), None),  # cmp r8, [r11+RET_TRAMP]
        ("", b"\x74", "ret"),  # je ret
        ("", b"\x4d\x8d\x48\xff", None),  # lea r9, [r8-1]            the trampoline's second int3:
        ("", b"\x4d\x3b\x8b" + _d32(RET_TRAMP), None),  # cmp r9, [r11+RET_TRAMP]   its first one's trap
        ("", b"\x75", "sites"),  # jne sites                                 dropped as pmu died
        ("ret", b"\x4c\x8b\x92" + _d32(UC_RSP), None),  # mov r10, [rdx+RSP]
        ("", b"\x49\x83\xea\x08", None),  # sub r10, 8                the slot `ret` popped
        ("", b"\x49\x8d\x8b" + _d32(FRAMES), None),  # lea rcx, [r11+FRAMES]
        ("", b"\x41\xb9" + struct.pack("<I", NFRAMES), None),  # mov r9d, NFRAMES
        ("floop", b"\x4c\x39\x11", None),  # cmp [rcx], r10
        ("", b"\x74", "ffound"),  # je ffound
        ("", b"\x48\x83\xc1\x10", None),  # add rcx, 16
        ("", b"\x41\xff\xc9", None),  # dec r9d
        ("", b"\x75", "floop"),  # jne floop
        ("", b"\xeb", "chain"),  # jmp chain
        ("ffound", b"\x48\x8b\x41\x08", None),  # mov rax, [rcx+8]          the real return address
        ("", b"\xeb", "setrip"),  # jmp setrip
        ("sites", b"\x49\x8d\x8b" + _d32(SITES), None),  # lea rcx, [r11+SITES]
        ("", b"\x4d\x8b\x8b" + _d32(NSITES_USED), None),  # mov r9, [r11+NSITES_USED]
        ("", b"\x4d\x85\xc9", None),  # test r9, r9
        ("", b"\x74", "chain"),  # je chain
        ("sloop", b"\x4c\x39\x01", None),  # cmp [rcx], r8
        ("", b"\x74", "sfound"),  # je sfound
        ("", b"\x48\x83\xc1\x20", None),  # add rcx, 32
        ("", b"\x49\xff\xc9", None),  # dec r9
        ("", b"\x75", "sloop"),  # jne sloop
        ("", b"\xeb", "chain"),  # jmp chain
        ("ill", b"\x81\x7e" + bytes([SI_CODE]) + struct.pack("<I", ILL_ILLOPN), None),  # cmp [rsi+8], ILLOPN
        ("", b"\x75", "chain"),  # jne chain                 not an invalid opcode: not ours
        ("", b"\x4c\x8b\x82" + _d32(UC_RIP), None),  # mov r8, [rdx+RIP]         a fault: at the trap
        ("", b"\xeb", "sites"),  # jmp sites
        ("sfound", b"\x48\x8b\x41\x08", None),  # mov rax, [rcx+8]          the out-of-line slot
        ("", b"\x45\x0f\xb6\x08", None),  # movzx r9d, byte [r8]
        ("", b"\x4c\x3b\x49\x18", None),  # cmp r9, [rcx+24]          the trap still there?
        ("", b"\x74", "setrip"),  # je setrip
        ("", b"\x48\x8b\x41\x10", None),  # mov rax, [rcx+16]         removed meanwhile: rewind
        ("setrip", b"\x48\x89\x82" + _d32(UC_RIP), None),  # mov [rdx+RIP], rax
        ("", b"\xc3", None),  # ret                       to the restorer: rt_sigreturn
        ("chain", b"\x49\x8d\x8b" + _d32(OLD_ACT), None),  # lea rcx, [r11+OLD_ACT]   the program's
        ("", b"\x83\xff" + bytes([SIGILL]), None),  # cmp edi, SIGILL            disposition of the
        ("", b"\x75", "chosen"),  # jne chosen                signal
        ("", b"\x49\x8d\x8b" + _d32(OLD_ILL), None),  # lea rcx, [r11+OLD_ILL]
        ("chosen", b"\x48\x8b\x01", None),  # mov rax, [rcx]
        ("", b"\x48\x83\xf8\x01", None),  # cmp rax, SIG_IGN
        ("", b"\x74", "out"),  # je out
        ("", b"\x48\x85\xc0", None),  # test rax, rax             SIG_DFL?
        ("", b"\x74", "dfl"),  # je dfl
        ("", b"\xff\xe0", None),  # jmp rax                   its handler, same arguments
        ("out", b"\xc3", None),  # ret
        ("dfl", b"\x41\x89\xf9", None),  # mov r9d, edi              the signal, kept over syscalls
        ("", b"\x48\x89\xce", None),  # mov rsi, rcx              its old (default) disposition
        ("", b"\x31\xd2", None),  # xor edx, edx
        ("", b"\x41\xba\x08\x00\x00\x00", None),  # mov r10d, 8
        ("", b"\xb8" + struct.pack("<I", SYS_RT_SIGACTION), None),  # mov eax, rt_sigaction
        ("", b"\x0f\x05", None),  # syscall                   the default back
        ("", b"\xb8" + struct.pack("<I", SYS_GETPID), None),  # mov eax, getpid
        ("", b"\x0f\x05", None),  # syscall
        ("", b"\x49\x89\xc0", None),  # mov r8, rax
        ("", b"\xb8" + struct.pack("<I", SYS_GETTID), None),  # mov eax, gettid
        ("", b"\x0f\x05", None),  # syscall
        ("", b"\x48\x89\xc6", None),  # mov rsi, rax
        ("", b"\x4c\x89\xc7", None),  # mov rdi, r8
        ("", b"\x44\x89\xca", None),  # mov edx, r9d              the signal
        ("", b"\xb8" + struct.pack("<I", SYS_TGKILL), None),  # mov eax, tgkill
        ("", b"\x0f\x05", None),  # syscall                   pending until the handler returns
        ("", b"\xc3", None),  # ret
    ]
    return _assemble(prog)


RESTORER_CODE = b"\xb8" + struct.pack("<I", SYS_RT_SIGRETURN) + b"\x0f\x05"  # mov eax, 15; syscall


_SAVED = (
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rbp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
)


def stub_code(base: int, save: int | None = None) -> bytes:
    """`syscall`, then every register reloaded from the save block (at base+SAVE, or at `save`) and a
    return to where the thread was: rsp is pointed at the block, the registers popped in _SAVED
    order, then the flags, then rsp (to 8 bytes below the red zone, where pmu wrote the thread's rip),
    and `ret 128` goes back. The block is only read: it may lie in read-only memory."""
    pops = {
        "rax": b"\x58", "rbx": b"\x5b", "rcx": b"\x59", "rdx": b"\x5a", "rsi": b"\x5e", "rdi": b"\x5f",
        "rbp": b"\x5d", "r8": b"\x41\x58", "r9": b"\x41\x59", "r10": b"\x41\x5a", "r11": b"\x41\x5b",
        "r12": b"\x41\x5c", "r13": b"\x41\x5d", "r14": b"\x41\x5e", "r15": b"\x41\x5f",
    }  # fmt: skip
    block = base + SAVE if save is None else save
    code = b"\x0f\x05" + b"\x48\xbc" + struct.pack("<Q", block)  # syscall; movabs rsp, SAVE
    code += b"".join(pops[r] for r in _SAVED)
    return code + b"\x9d" + b"\x5c" + b"\xc2\x80\x00"  # popfq; pop rsp; ret 128


def save_block(regs: Any, back: int) -> bytes:
    """The stub's save block for registers `regs` (a user_regs_struct) returning through `back`."""
    values = [int(getattr(regs, r)) for r in _SAVED] + [int(regs.eflags), back]
    return struct.pack(f"<{len(values)}Q", *(v & 0xFFFFFFFFFFFFFFFF for v in values))


def code_page(base: int) -> bytes:
    """The first page of the area at `base`: the handler, the syscall stub and the restorer."""
    code = handler_code()
    assert len(code) <= STUB
    page = bytearray(CODE_PAGE)
    page[CODE : CODE + len(code)] = code
    stub = stub_code(base)
    assert len(stub) <= SAVE - STUB
    page[STUB : STUB + len(stub)] = stub
    page[RESTORER : RESTORER + len(RESTORER_CODE)] = RESTORER_CODE
    return bytes(page)


def sigaction_bytes(handler: int, flags: int, restorer: int, mask: int) -> bytes:
    return struct.pack("<QQQQ", handler, flags, restorer, mask)


def parse_sigaction(raw: bytes) -> tuple[int, int, int, int]:
    handler, flags, restorer, mask = struct.unpack("<QQQQ", raw[:32])
    return handler, flags, restorer, mask


def guard_action(base: int, old_flags: int) -> bytes:
    """The guard's own sigaction: SA_SIGINFO, its restorer, the program's SA_ONSTACK choice."""
    flags = SA_SIGINFO | SA_RESTORER | (old_flags & SA_ONSTACK)
    return sigaction_bytes(base + CODE, flags, base + RESTORER, 0)


@dataclass(eq=False)
class Guard:
    """pmu's mirror of one address space's guard area: where it is, and which entries are in use."""

    base: int
    installed: bool = False
    """Whether the handler is SIGTRAP's disposition (the area exists from the first syscall pmu runs)."""
    ill_installed: bool = False
    """Whether it is SIGILL's too (from the first probe on a 1-byte instruction)."""
    sites: dict[int, int] = field(default_factory=dict)
    """Probe address -> index of its entry."""
    frames: dict[int, int] = field(default_factory=dict)
    """Stack slot -> index of its entry, kept after the frame returned: a slot hijacked again reuses its
    entry, so the table never holds two entries for one slot."""
    owner: dict[int, int] = field(default_factory=dict)
    """Index -> the stack slot its entry is for."""
    free: dict[int, None] = field(default_factory=dict)
    """Indexes whose frame returned, to be given to another slot when no index is left."""

    def copy(self) -> Guard:
        """A forked child's: the same area at the same address, a copy of its tables."""
        return Guard(
            self.base,
            self.installed,
            self.ill_installed,
            dict(self.sites),
            dict(self.frames),
            dict(self.owner),
            dict(self.free),
        )

    def site_entry(self, trap: int, slot: int, probe: int, opcode: int = INT3) -> tuple[int, bytes] | None:
        """(where, bytes) to write so that the trap `opcode` at `trap` (a byte of the probe at `probe`)
        goes on in `slot`, or back to `probe` once removed; None if the table is full. The caller
        writes NSITES_USED too (see nsites_bytes)."""
        index = self.sites.get(trap)
        if index is None:
            if len(self.sites) >= NSITES:
                return None
            index = self.sites[trap] = len(self.sites)
        return self.base + SITES + 32 * index, struct.pack("<QQQQ", trap, slot, probe, opcode)

    def forget_site(self, addr: int) -> tuple[int, bytes] | None:
        """The code at addr was unmapped: its entry must no longer match (its index stays used)."""
        index = self.sites.get(addr)
        if index is None:
            return None
        return self.base + SITES + 32 * index, struct.pack("<QQQQ", 0, 0, 0, 0)

    def nsites_bytes(self) -> tuple[int, bytes]:
        return self.base + NSITES_USED, struct.pack("<Q", len(self.sites))

    def frame_entry(self, rsp: int, orig: int) -> tuple[int, bytes] | None:
        """(where, bytes) that tell the handler the real return address of the slot at rsp; None if
        the table is full (that return is then unguarded)."""
        index = self.frames.get(rsp)
        if index is not None:
            self.free.pop(index, None)
        else:
            if len(self.owner) < NFRAMES:
                index = len(self.owner)
            elif self.free:
                index = next(iter(self.free))
                del self.free[index]
                del self.frames[self.owner[index]]
            else:
                return None
            self.frames[rsp] = index
            self.owner[index] = rsp
        return self.base + FRAMES + 16 * index, struct.pack("<QQ", rsp, orig)

    def drop_frame(self, rsp: int) -> None:
        """The frame at rsp returned (or was abandoned): its entry may go to another slot. Its stale
        contents are harmless: a slot holds the trampoline only after a newer write of its entry."""
        index = self.frames.get(rsp)
        if index is not None:
            self.free[index] = None
