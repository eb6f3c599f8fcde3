"""Out-of-line execution: displaced instructions rewritten to run elsewhere (int3 slots, jump trampolines).

A probe overwrites the instruction at its address, so the tracer runs a copy of it somewhere else: a slot in a
page mapped within ±2 GiB of the code, followed by a jump back, so a hit costs one stop and no single-step.
`relocate` rewrites a run of instructions so that they behave at the new address as they did at the old one:
RIP-relative operands keep their targets, relative branches reach their true targets (or the relocated copy
of an instruction of the run), and calls push the true return address. Whatever cannot be made equivalent
raises `RelocationError` naming the instruction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import capstone
from capstone import x86

from pmu.errors import RelocationError

SLOT_SIZE: int = 64
"""Bytes reserved per out-of-line slot; every slot `build_slot` returns fits."""

_MAX_INSN = 15
_ABS_JUMP = b"\xff\x25\x00\x00\x00\x00"  # jmp qword ptr [rip+0], followed by the 8-byte target
_OPSIZE, _ADDRSIZE = 0x66, 0x67


@dataclass(frozen=True)
class Insn:
    """One decoded x86-64 instruction."""

    address: int
    """Where the instruction lives (the address it was decoded at)."""
    size: int
    """Its length in bytes."""
    mnemonic: str
    """Capstone's mnemonic: "push", "je", "call"."""
    op_str: str
    """Capstone's operands in Intel syntax: "rbp", "qword ptr [rip + 0x2f0c]"."""
    raw: bytes
    """Its encoding."""

    @property
    def text(self) -> str:
        """The instruction as one would write it: "push rbp", "ret"."""
        return f"{self.mnemonic} {self.op_str}".rstrip()


@dataclass(frozen=True)
class _Decoded:
    """An instruction with the encoding details relocation needs (capstone's detail, typed)."""

    insn: Insn
    id: int
    """Capstone's instruction id (x86.X86_INS_*)."""
    prefixes: frozenset[int]
    """Legacy prefix bytes present (REX excluded)."""
    opcode: bytes
    relative: bool
    """A relative branch: jmp/jcc/call/loop/jrcxz rel, xbegin."""
    modrm_offset: int
    disp_offset: int
    disp_size: int
    imm_offset: int
    imm_size: int
    mem_base: int
    """Capstone register id of the memory operand's base (0: no memory operand or no base)."""
    mem_disp: int
    """The memory operand's displacement, as capstone decoded it."""
    reg: int
    """Capstone register id of the first register operand (0: none)."""

    @property
    def end(self) -> int:
        return self.insn.address + self.insn.size

    @property
    def modrm(self) -> int:
        return self.insn.raw[self.modrm_offset]

    def field(self, offset: int, size: int) -> int:
        """The signed little-endian integer at `offset` in the encoding."""
        return int.from_bytes(self.insn.raw[offset : offset + size], "little", signed=True)

    def refuse(self, reason: str) -> RelocationError:
        return RelocationError(f"cannot relocate '{self.insn.text}' at 0x{self.insn.address:x}: {reason}")


@functools.cache
def _capstone() -> Any:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    return md


def _convert(ci: Any) -> _Decoded:
    mem_base = mem_disp = reg = 0
    for op in ci.operands:
        if op.type == x86.X86_OP_MEM and not mem_base:
            mem_base, mem_disp = int(op.mem.base), int(op.mem.disp)
        elif op.type == x86.X86_OP_REG and not reg:
            reg = int(op.reg)
    insn = Insn(int(ci.address), int(ci.size), str(ci.mnemonic), str(ci.op_str), bytes(ci.bytes))
    return _Decoded(
        insn=insn,
        id=int(ci.id),
        prefixes=frozenset(int(p) for p in ci.prefix if p),
        opcode=bytes(ci.opcode),
        relative=x86.X86_GRP_BRANCH_RELATIVE in ci.groups,
        modrm_offset=int(ci.modrm_offset),
        disp_offset=int(ci.disp_offset),
        disp_size=int(ci.disp_size),
        imm_offset=int(ci.imm_offset),
        imm_size=int(ci.imm_size),
        mem_base=mem_base,
        mem_disp=mem_disp,
        reg=reg,
    )


def _decode(code: bytes, address: int, count: int) -> list[_Decoded]:
    if count < 1:
        raise RelocationError(f"cannot relocate {count} instructions at 0x{address:x}: need at least one")
    found = [_convert(ci) for ci in _capstone().disasm(code, address, count)]
    if len(found) < count:
        at = sum(d.insn.size for d in found)
        padded = list(_capstone().disasm(code[at:] + bytes(_MAX_INSN), 0, 1))
        if at >= len(code) or (padded and padded[0].size > len(code) - at):
            why = f"the code given ends within instruction {len(found) + 1} of {count}"
        else:
            why = f"capstone cannot decode bytes {code[at : at + _MAX_INSN].hex(' ')}"
        raise RelocationError(f"cannot relocate the instruction at 0x{address + at:x}: {why}")
    return found


def decode(code: bytes, address: int, count: int = 1) -> list[Insn]:
    """Decode `count` x86-64 instructions from `code`, which lives at `address`; RelocationError if not."""
    return [d.insn for d in _decode(code, address, count)]


# --- encoders ---------------------------------------------------------------------------------------------


def _fits(value: int, bits: int) -> bool:
    return -(1 << (bits - 1)) <= value < (1 << (bits - 1))


def _le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little", signed=True)


def jump(from_address: int, to_address: int) -> bytes:
    """A jump placed at `from_address` to `to_address`: `jmp rel32` (5 bytes) if in reach, else
    `jmp [rip+0]; .quad to_address` (14 bytes). Uses no register and leaves the flags alone."""
    rel = to_address - (from_address + 5)
    if _fits(rel, 32):
        return b"\xe9" + _le(rel, 4)
    return _ABS_JUMP + to_address.to_bytes(8, "little")


def _push_address(address: int) -> bytes:
    """Push a 64-bit constant without a register or flags: `push imm32` (sign-extended), then
    `mov dword [rsp+4], imm32` for the high half unless the sign extension already got it right."""
    low = address & 0xFFFF_FFFF
    code = b"\x68" + low.to_bytes(4, "little")
    if low - ((low & 0x8000_0000) << 1) != address:
        code += b"\xc7\x44\x24\x04" + (address >> 32).to_bytes(4, "little")
    return code


def _jcc(cc: int, at: int, target: int) -> bytes:
    """`jcc target` placed at `at`: `jcc rel32` if in reach, else `j!cc over; jmp target(abs)`."""
    rel = target - (at + 6)
    if _fits(rel, 32):
        return bytes([0x0F, 0x80 | cc]) + _le(rel, 4)
    far = jump(at + 2, target)
    return bytes([0x70 | (cc ^ 1), len(far)]) + far


def _short_branch(head: bytes, at: int, target: int) -> bytes:
    """A rel8-only branch (loop*, jrcxz, jecxz; `head` is its prefix and opcode) placed at `at`:
    `head taken; jmp short over; taken: jmp target(abs)`."""
    far = jump(at + len(head) + 3, target)
    return head + b"\x02\xeb" + bytes([len(far)]) + far


# --- relocation -------------------------------------------------------------------------------------------


def _refusal(d: _Decoded) -> str | None:
    """Why `d` cannot run out of line, or None."""
    if d.id == x86.X86_INS_INT3 or (d.id == x86.X86_INS_INT and d.field(d.imm_offset, 1) == 3):
        return "an int3 already at the site is another debugger's breakpoint"
    if d.id == x86.X86_INS_INT1:
        return "int1 (icebp) raises a debug trap"
    if d.id in (x86.X86_INS_UD0, x86.X86_INS_UD1, x86.X86_INS_UD2):
        return "it raises #UD on purpose, and its fault address would be the copy's"
    if d.id == x86.X86_INS_XBEGIN:
        return "a transaction begun out of line would abort into the copy"
    if d.mem_base == x86.X86_REG_EIP:
        return "EIP-relative addressing is not supported"
    if d.opcode[0] == 0xFF and (d.modrm >> 3) & 7 == 3:
        return "a far call would push the copy's CS:RIP"
    if _OPSIZE in d.prefixes and (d.relative or (d.opcode[0] == 0xFF and (d.modrm >> 3) & 7 in (2, 4))):
        return "an operand-size prefix on a branch truncates RIP on some CPUs"
    return None


def _fix_rip(d: _Decoded, at: int, raw: bytes) -> bytes:
    """`raw` (d's encoding, or one of the same length and layout) with its RIP-relative displacement, if
    any, rewritten so that it reaches the same address from `at`."""
    if d.mem_base != x86.X86_REG_RIP:
        return raw
    # RIP-relative is always disp32 (capstone 5 reports disp_size 2 under a 0x66 prefix: trust the offset).
    if d.field(d.disp_offset, 4) != d.mem_disp or d.disp_offset + 4 > d.insn.size:
        raise d.refuse("capstone's RIP-relative displacement does not match the encoding")
    target = d.end + d.mem_disp
    disp = target - (at + d.insn.size)
    if not _fits(disp, 32):
        raise d.refuse(f"its RIP-relative operand 0x{target:x} is out of rel32 reach of 0x{at:x}")
    return raw[: d.disp_offset] + _le(disp, 4) + raw[d.disp_offset + 4 :]


def _call_indirect(d: _Decoded, at: int) -> bytes:
    """`call r/m` (FF /2) → push the true return address, then `jmp r/m` (FF /4) on the same operand."""
    push = _push_address(d.end)
    raw, m = d.insn.raw, d.modrm_offset
    if d.reg in (x86.X86_REG_RSP, x86.X86_REG_ESP):
        raise d.refuse("it calls through rsp, which the pushed return address moves")
    jmp_modrm = (d.modrm & 0xC7) | (4 << 3)
    if d.mem_base not in (x86.X86_REG_RSP, x86.X86_REG_ESP):
        return push + _fix_rip(d, at + len(push), raw[:m] + bytes([jmp_modrm]) + raw[m + 1 :])
    # [rsp + ...]: the push moved rsp down by 8, so reach 8 bytes further (rsp as a base implies a SIB byte).
    size = {0: 0, 1: 1, 2: 4}[d.modrm >> 6]
    disp = d.field(m + 2, size) + 8
    if -8 < disp < 8:  # [rsp+d] with -16 < d < 0 overlaps the slot the pushed return address takes
        raise d.refuse("its operand overlaps the stack slot the pushed return address takes")
    if not _fits(disp, 32):
        raise d.refuse(f"its displacement {disp - 8:#x} + 8 for the pushed return address overflows")
    mod, size = (1, 1) if _fits(disp, 8) else (2, 4)
    return push + raw[:m] + bytes([(mod << 6) | (jmp_modrm & 0x3F), raw[m + 1]]) + _le(disp, size)


def _relocate_one(d: _Decoded, at: int, resolve: Callable[[int], int]) -> bytes:
    """The code that does what `d` does, placed at `at`; `resolve` maps a branch target to where the
    relocated code must go instead (the copy of an instruction of the run, else the target itself)."""
    op = d.opcode[0]
    if not d.relative:
        if op == 0xFF and (d.modrm >> 3) & 7 == 2:
            return _call_indirect(d, at)
        return _fix_rip(d, at, d.insn.raw)
    target = resolve(d.end + d.field(d.imm_offset, d.imm_size))
    if op == 0xE8:  # call rel32
        push = _push_address(d.end)
        return push + jump(at + len(push), target)
    if op in (0xE9, 0xEB):  # jmp rel32, rel8
        return jump(at, target)
    if 0x70 <= op <= 0x7F:  # jcc rel8
        return _jcc(op & 0xF, at, target)
    if op == 0x0F and 0x80 <= d.opcode[1] <= 0x8F:  # jcc rel32
        return _jcc(d.opcode[1] & 0xF, at, target)
    if 0xE0 <= op <= 0xE3:  # loopne, loope, loop, jrcxz (jecxz and the ecx loops with 0x67)
        head = (b"\x67" if _ADDRSIZE in d.prefixes else b"") + bytes([op])
        return _short_branch(head, at, target)
    raise d.refuse("unknown relative branch")


def relocate(code: bytes, address: int, new_address: int, count: int = 1) -> tuple[bytes, int]:
    """Rewrite the `count` instructions at `address` (`code` holds at least their bytes) to run at
    `new_address`. Returns (relocated code, total length of the originals).
    """
    relocated, length, _ = relocate_run(code, address, new_address, count)
    return relocated, length


def relocate_run(
    code: bytes, address: int, new_address: int, count: int = 1
) -> tuple[bytes, int, tuple[int, ...]]:
    """As relocate(), also returning where each instruction's copy starts in the relocated code (to move
    a thread stopped inside the displaced run to the matching point of the copy).

    Branches to an instruction of the run (other than the first) go to its relocated copy; every other
    branch goes to its true target; falling off the end continues after the relocated code, where the caller
    puts the jump back to `address + length`. A call pushes its true return address, so it must be the last
    instruction of a run of several.
    """
    run = _decode(code, address, count)
    for i, d in enumerate(run):
        reason = _refusal(d)
        if reason is None and i < count - 1 and d.id == x86.X86_INS_CALL:
            reason = "it is not the last of the displaced instructions, and returns into them"
        if reason is not None:
            raise d.refuse(reason)
    starts = {d.insn.address: i for i, d in enumerate(run)}
    end = run[-1].end

    def place(offsets: list[int] | None) -> tuple[bytes, list[int]]:
        out, placed = bytearray(), []
        for d in run:

            def resolve(target: int, d: _Decoded = d) -> int:
                if not address < target < end:
                    return target
                if target not in starts:
                    raise d.refuse(f"it branches into the middle of an instruction, to 0x{target:x}")
                return new_address + (offsets[starts[target]] if offsets else 0)

            placed.append(len(out))
            out += _relocate_one(d, new_address + len(out), resolve)
        return bytes(out), placed

    # Encodings of branches within the run do not depend on their target, so a first pass lays the code out
    # and a second one fills in the targets.
    _, offsets = place(None)
    relocated, check = place(offsets)
    assert check == offsets
    return relocated, end - address, tuple(offsets)


def build_slot(code: bytes, address: int, slot_address: int) -> tuple[bytes, int]:
    """The out-of-line slot for a probe at `address` (`code` starts with the displaced instruction), to be
    written at `slot_address`: the relocated instruction, then a jump back to the next one.
    Returns (slot bytes, at most SLOT_SIZE; length of the displaced instruction)."""
    body, length = relocate(code, address, slot_address)
    slot = body + jump(slot_address + len(body), address + length)
    if len(slot) > SLOT_SIZE:
        raise RelocationError(
            f"cannot relocate the instruction at 0x{address:x}: its slot needs {len(slot)} bytes"
        )
    return slot, length
