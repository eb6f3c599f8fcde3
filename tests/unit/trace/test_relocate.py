"""Tests for pmu.trace.relocate: slots read back with capstone, then run for real against the originals.

The execution tests map RWX pages in this process (an "original" area, a "near" one within ±2 GiB of it and a
"far" one more than 4 GiB away), write tiny functions that start (or continue, after a prologue) with the
instruction under test, and compare what the original returns with what the relocated copy returns.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import capstone
import pytest
from capstone import x86

from pmu.errors import RelocationError
from pmu.trace.maps import free_gap_near, read_maps
from pmu.trace.relocate import SLOT_SIZE, Insn, build_slot, decode, jump, relocate

# --- reading code back ----------------------------------------------------------------------------------

_MD = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_MD.detail = True
_ABS = bytes.fromhex("ff2500000000")


class Step(NamedTuple):
    mnemonic: str
    kind: str  # "rel": relative branch, "abs": jmp [rip+0] + quad, "mem": RIP-relative operand, "": neither
    target: int | None
    op_str: str = ""


def walk(code: bytes, address: int) -> list[Step]:
    """Decode `code` at `address`, reading `jmp [rip+0]; .quad` as one absolute jump."""
    steps, off = [], 0
    while off < len(code):
        ci = next(_MD.disasm(code[off:], address + off, 1))
        off += ci.size
        if bytes(ci.bytes) == _ABS:
            steps.append(Step("jmp", "abs", int.from_bytes(code[off : off + 8], "little")))
            off += 8
            continue
        kind, target = "", None
        if x86.X86_GRP_BRANCH_RELATIVE in ci.groups:
            kind, target = "rel", ci.operands[0].imm
        for op in ci.operands:
            if op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP:
                kind, target = "mem", ci.address + ci.size + op.mem.disp
        steps.append(Step(ci.mnemonic, kind, target, ci.op_str))
    return steps


def after_push(steps: list[Step]) -> list[Step]:
    """The steps after a leading `push imm32` [+ `mov dword ptr [rsp + 4], imm32`]."""
    assert steps[0].mnemonic == "push"
    return steps[2:] if steps[1].op_str.startswith("dword ptr [rsp + 4], ") else steps[1:]


def shape(steps: list[Step]) -> list[tuple[str, str, int | None]]:
    return [(s.mnemonic, s.kind, s.target) for s in steps]


def pushed(steps: list[Step]) -> int:
    """The value that a leading `push imm32` [+ `mov dword ptr [rsp + 4], imm32`] leaves on the stack."""
    assert steps[0].mnemonic == "push"
    value = int(steps[0].op_str, 16) & 0xFFFF_FFFF_FFFF_FFFF
    if value >> 31 & 1:
        value |= 0xFFFF_FFFF_0000_0000
    if steps[1].op_str.startswith("dword ptr [rsp + 4], "):
        value = (value & 0xFFFF_FFFF) | int(steps[1].op_str.rsplit(", ", 1)[1], 16) << 32
    return value


A = 0x5555_5555_4000  # a typical PIE text address
NEAR = A + 0x10_0000
FAR = 0x7F00_0000_0000
JCC = ["jo", "jno", "jb", "jae", "je", "jne", "jbe", "ja", "js", "jns", "jp", "jnp", "jl", "jge", "jle", "jg"]


def slot_steps(hexcode: str, address: int = A, slot: int = NEAR) -> tuple[list[Step], int]:
    code, length = build_slot(bytes.fromhex(hexcode) + b"\x90" * 16, address, slot)
    assert len(code) <= SLOT_SIZE
    return walk(code, slot), length


# --- decode and jump ------------------------------------------------------------------------------------


def test_decode_gives_text_and_bytes() -> None:
    insns = decode(bytes.fromhex("f30f1efa554889e5c3"), A, 4)
    assert [i.text for i in insns] == ["endbr64", "push rbp", "mov rbp, rsp", "ret"]
    assert insns[1] == Insn(A + 4, 1, "push", "rbp", b"\x55")
    assert [i.address for i in insns] == [A, A + 4, A + 5, A + 8]


def test_decode_refuses_garbage_and_short_code() -> None:
    with pytest.raises(RelocationError, match="cannot decode bytes 06"):
        decode(b"\x06", A)
    with pytest.raises(RelocationError, match="ends within instruction 2 of 2"):
        decode(b"\x55\x48\x89", A, 2)


def test_jump_rel32_in_reach_else_absolute() -> None:
    assert jump(A, A + 0x100) == b"\xe9" + (0xFB).to_bytes(4, "little")
    assert shape(walk(jump(A, A - 0x1000), A)) == [("jmp", "rel", A - 0x1000)]
    far = jump(A, FAR)
    assert len(far) == 14
    assert shape(walk(far, A)) == [("jmp", "abs", FAR)]
    # the edges of rel32 reach
    assert len(jump(A, A + 5 + 0x7FFF_FFFF)) == 5
    assert len(jump(A, A + 5 + 0x8000_0000)) == 14
    assert len(jump(A, A + 5 - 0x8000_0000)) == 5


# --- slots read back ------------------------------------------------------------------------------------


@pytest.mark.parametrize("slot", [NEAR, FAR])
@pytest.mark.parametrize("hexcode", ["55", "f30f1efa", "c3", "0f05", "4889e5", "415f"])
def test_plain_instruction_is_copied(hexcode: str, slot: int) -> None:
    code, length = build_slot(bytes.fromhex(hexcode) + b"\x90" * 16, A, slot)
    n = len(bytes.fromhex(hexcode))
    assert length == n
    assert code[:n] == bytes.fromhex(hexcode)
    assert code[n:] == jump(slot + n, A + n)


@pytest.mark.parametrize(
    ("hexcode", "mnemonic", "tail"),
    [
        ("488b05102f0000", "mov", ""),  # mov rax, [rip+0x2f10]
        ("488d3dc0ffffff", "lea", ""),  # lea rdi, [rip-0x40]
        ("803d0c2f000005", "cmp", ", 5"),  # cmp byte [rip+x], 5: an immediate after the displacement
        ("48c705f0ffffff2a000000", "mov", ", 0x2a"),  # mov qword [rip-0x10], 0x2a: imm32 after it
        ("66813d00100000ffff", "cmp", ", 0xffff"),  # cmp word [rip+x], 0xffff: operand-size prefix, imm16
        ("660f6f0500100000", "movdqa", ""),  # capstone 5 says disp_size 2 under 0x66; it is 4
        ("62f17c48100500010000", "vmovups", ""),  # EVEX with a RIP-relative operand
        ("ff2510000000", "jmp", ""),  # jmp [rip+0x10]
    ],
)
def test_rip_relative_operand_keeps_its_target(hexcode: str, mnemonic: str, tail: str) -> None:
    [orig] = walk(bytes.fromhex(hexcode), A)
    steps, length = slot_steps(hexcode)
    assert length == len(bytes.fromhex(hexcode))
    assert shape(steps) == [(mnemonic, "mem", orig.target), ("jmp", "rel", A + length)]
    assert steps[0].op_str.endswith(tail)
    assert len(steps[0].op_str) > 0


def test_rip_relative_out_of_reach_is_refused() -> None:
    with pytest.raises(RelocationError) as err:
        build_slot(bytes.fromhex("488b05102f0000"), A, FAR)
    assert str(err.value).startswith(f"cannot relocate 'mov rax, qword ptr [rip + 0x2f10]' at 0x{A:x}: ")
    assert "out of rel32 reach" in str(err.value)


@pytest.mark.parametrize("slot", [NEAR, FAR])
@pytest.mark.parametrize("rel32", [False, True], ids=["rel8", "rel32"])
@pytest.mark.parametrize("cc", range(16), ids=JCC)
def test_jcc_goes_to_true_target(cc: int, rel32: bool, slot: int) -> None:
    code = bytes([0x0F, 0x80 | cc]) + (0x40).to_bytes(4, "little") if rel32 else bytes([0x70 | cc, 0x40])
    steps, length = slot_steps(code.hex(), slot=slot)
    target, after = A + length + 0x40, A + length
    if slot == NEAR:
        assert shape(steps) == [(JCC[cc], "rel", target), ("jmp", "rel", after)]
    else:  # inverted condition over an absolute jump to the target
        assert shape(steps) == [
            (JCC[cc ^ 1], "rel", slot + 16),
            ("jmp", "abs", target),
            ("jmp", "abs", after),
        ]


@pytest.mark.parametrize("slot", [NEAR, FAR])
@pytest.mark.parametrize(
    ("hexcode", "mnemonic"),
    [("e010", "loopne"), ("e110", "loope"), ("e210", "loop"), ("e310", "jrcxz"), ("67e310", "jecxz")],
)
def test_rel8_only_branches_go_through_a_long_jump(hexcode: str, mnemonic: str, slot: int) -> None:
    steps, length = slot_steps(hexcode, slot=slot)
    head = length - 1  # prefix + opcode
    kind = "rel" if slot == NEAR else "abs"
    far_jump = len(jump(slot + head + 3, A + length + 0x10))
    assert shape(steps) == [
        (mnemonic, "rel", slot + head + 3),
        ("jmp", "rel", slot + head + 3 + far_jump),
        ("jmp", kind, A + length + 0x10),
        ("jmp", kind, A + length),
    ]


@pytest.mark.parametrize("slot", [NEAR, FAR])
@pytest.mark.parametrize("hexcode", ["eb10", "e910000000", "ebfe", "f2e910000000"])
def test_jmp_rel_becomes_absolute(hexcode: str, slot: int) -> None:
    [orig] = walk(bytes.fromhex(hexcode), A)
    steps, length = slot_steps(hexcode, slot=slot)
    kind = "rel" if slot == NEAR else "abs"
    assert shape(steps) == [("jmp", kind, orig.target), ("jmp", kind, A + length)]


@pytest.mark.parametrize("slot", [NEAR, FAR])
@pytest.mark.parametrize("address", [A, 0x7F12_8000_1000, 0x1000], ids=["pie", "high-half", "low"])
def test_call_rel32_pushes_true_return_address(address: int, slot: int) -> None:
    steps, length = slot_steps("e8fb0f0000", address=address, slot=slot)
    assert length == 5
    assert pushed(steps) == address + 5
    kind = "rel" if slot == NEAR and address == A else "abs"
    assert shape(steps)[-2:] == [("jmp", kind, address + 0x1000), ("jmp", kind, address + 5)]
    assert len(after_push(steps)) == 2
    assert len(steps) == (
        3 if address < 0x8000_0000 else 4
    )  # the high half only when sign extension is wrong


@pytest.mark.parametrize(
    ("hexcode", "jmp_text"),
    [
        ("ffd0", "jmp rax"),
        ("41ffd3", "jmp r11"),
        ("3effd0", "notrack jmp rax"),  # notrack call rax -> notrack jmp rax
        ("ff5008", "jmp qword ptr [rax + 8]"),
        ("41ff542408", "jmp qword ptr [r12 + 8]"),  # r12 as a base looks like rsp in the ModRM byte
        ("ff542408", "jmp qword ptr [rsp + 0x10]"),  # the push moved rsp: 8 more
        ("ff1424", "jmp qword ptr [rsp + 8]"),  # no displacement -> disp8
        ("ff542478", "jmp qword ptr [rsp + 0x80]"),  # disp8 overflows -> disp32
        ("ff54c410", "jmp qword ptr [rsp + rax*8 + 0x18]"),
        ("ff9424f0ffffff", "jmp qword ptr [rsp - 8]"),
        ("67ff10", "jmp qword ptr [eax]"),
    ],
)
def test_call_indirect_pushes_return_address_then_jumps(hexcode: str, jmp_text: str) -> None:
    steps, length = slot_steps(hexcode)
    assert length == len(bytes.fromhex(hexcode))
    assert pushed(steps) == A + length
    jmp, *back = after_push(steps)
    assert f"{jmp.mnemonic} {jmp.op_str}" == jmp_text
    assert shape(back) == [("jmp", "rel", A + length)]


def test_call_rip_relative_memory_keeps_its_target() -> None:
    [orig] = walk(bytes.fromhex("ff15102f0000"), A)
    steps, _ = slot_steps("ff15102f0000")
    assert pushed(steps) == A + 6
    assert shape(after_push(steps)) == [("jmp", "mem", orig.target), ("jmp", "rel", A + 6)]
    with pytest.raises(RelocationError, match="out of rel32 reach"):
        build_slot(bytes.fromhex("ff15102f0000"), A, FAR)


@pytest.mark.parametrize(
    ("hexcode", "text", "reason"),
    [
        ("cc", "int3", "another debugger's breakpoint"),
        ("cd03", "int 3", "another debugger's breakpoint"),
        ("f1", "int1", "debug trap"),
        ("0f0b", "ud2", "#UD"),
        ("c7f810000000", "xbegin 0x555555554016", "transaction"),
        ("ffd4", "call rsp", "through rsp"),
        ("ff1c24", "call ptr [rsp]", "far call"),
        ("ff9424fcffff7f", "call qword ptr [rsp + 0x7ffffffc]", "overflows"),
        ("67ff1500000000", "call qword ptr [eip]", "EIP-relative"),
        ("66ff10", "call qword ptr [rax]", "operand-size prefix"),
    ],
)
def test_refused_instructions(hexcode: str, text: str, reason: str) -> None:
    with pytest.raises(RelocationError) as err:
        build_slot(bytes.fromhex(hexcode) + b"\x90" * 8, A, NEAR)
    message = str(err.value)
    assert message.startswith(f"cannot relocate '{text}' at 0x{A:x}: ")
    assert reason in message
    assert "\n" not in message


def test_undecodable_bytes_are_refused() -> None:
    with pytest.raises(RelocationError, match=f"at 0x{A:x}: capstone cannot decode"):
        build_slot(b"\xff\xff\x90", A, NEAR)


# --- sequences (jump-optimized probes) ------------------------------------------------------------------


def test_relocate_prologue_of_three() -> None:
    code, length = relocate(bytes.fromhex("f30f1efa554889e5c3"), A, NEAR, count=3)
    assert (code, length) == (bytes.fromhex("f30f1efa554889e5"), 8)


def test_relocate_prologue_with_rip_relative_load() -> None:
    original = bytes.fromhex("55488b05102f00004889e5")
    [_, load, _] = walk(original, A)
    code, length = relocate(original, A, NEAR, count=3)
    assert length == len(original) == len(code)
    assert shape(walk(code, NEAR)) == [("push", "", None), ("mov", "mem", load.target), ("mov", "", None)]


def test_relocate_sequence_branch_inside_goes_to_the_copy() -> None:
    # xor eax,eax; test rdi,rdi; jne L; mov al,9; L: add eax,5 | jne 0 (back to the start: a true target)
    original = bytes.fromhex("31c04885ff7502b00983c00575f2")
    code, length = relocate(original, A, FAR, count=6)
    assert length == len(original)
    steps = walk(code, FAR)
    add = FAR + 2 + 3 + 6 + 2  # where the copy of `add eax, 5` lands (jne becomes a 6-byte jne rel32)
    assert steps[2] == Step("jne", "rel", add, steps[2].op_str)
    assert steps[4].mnemonic == "add" and walk(code[add - FAR :], add)[0].mnemonic == "add"
    assert shape(steps[5:]) == [("je", "rel", add + 3 + 2 + 14), ("jmp", "abs", A)]


def test_relocate_sequence_refusals() -> None:
    with pytest.raises(RelocationError, match="not the last of the displaced instructions"):
        relocate(bytes.fromhex("e8000000005d"), A, NEAR, count=2)
    assert relocate(bytes.fromhex("55e800000000"), A, NEAR, count=2)[1] == 6  # a call may end the run
    with pytest.raises(RelocationError, match="middle of an instruction"):
        relocate(bytes.fromhex("7401b0095d"), A, NEAR, count=3)  # je into the imm8 of mov al, 9
    with pytest.raises(RelocationError, match=f"'int3' at 0x{A + 1:x}: .*another debugger"):
        relocate(bytes.fromhex("55cc"), A, NEAR, count=2)
    with pytest.raises(RelocationError, match="at least one"):
        relocate(b"\x55", A, NEAR, count=0)


# --- real execution -------------------------------------------------------------------------------------

_PROT_RWX = 7
_MAP_PRIVATE_ANON = 0x22
_MAP_FIXED_NOREPLACE = 0x100000
_AREA = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class Area:
    """An RWX mapping with a bump allocator."""

    def __init__(self, base: int) -> None:
        self.base = self.next = base

    def reserve(self, size: int) -> int:
        address = self.next
        self.next = (address + size + 15) & ~15
        assert self.next <= self.base + _AREA
        return address

    def put(self, code: bytes) -> int:
        address = self.reserve(len(code))
        write(address, code)
        return address


def write(address: int, code: bytes) -> None:
    ctypes.memmove(address, code, len(code))


def _map(hint: int | None) -> int | None:
    flags = _MAP_PRIVATE_ANON | (_MAP_FIXED_NOREPLACE if hint else 0)
    got = _libc.mmap(hint, _AREA, _PROT_RWX, flags, -1, 0)
    if got in (None, ctypes.c_void_p(-1).value):
        return None
    if hint and got != hint:
        _libc.munmap(got, _AREA)
        return None
    return int(got)


class Memory(NamedTuple):
    orig: Area
    near: Area
    far: Area
    ret_addr: int  # a function that returns its own return address
    forty_two: int  # a function that returns 42


@pytest.fixture(scope="module")
def memory() -> Iterator[Memory]:
    orig = _map(None)
    if orig is None:
        pytest.skip("cannot map RWX memory here")
    mapped = [orig]

    def nearby(around: int, reach: int) -> int:
        """Map an area in a free gap within `reach` of `around`, found in /proc/self/maps."""
        for _ in range(8):
            hint = free_gap_near(read_maps(os.getpid()), around, _AREA, reach=reach)
            got = _map(hint) if hint is not None else None
            if got is not None:
                mapped.append(got)
                return got
        pytest.fail(f"no free gap for an RWX area within {reach:#x} of 0x{around:x}")

    near = nearby(orig, 1 << 29)
    far = nearby(orig - (8 << 30), 1 << 30)
    assert abs(near - orig) < 1 << 30 and abs(far - orig) > 4 << 30
    area = Area(orig)
    ret_addr = area.put(bytes.fromhex("488b0424c3"))  # mov rax, [rsp]; ret
    forty_two = area.put(bytes.fromhex("b82a000000c3"))  # mov eax, 42; ret
    yield Memory(area, Area(near), Area(far), ret_addr, forty_two)
    for base in mapped:
        _libc.munmap(base, _AREA)


@pytest.fixture(params=["near", "far"])
def where(request: pytest.FixtureRequest, memory: Memory) -> Area:
    area: Area = getattr(memory, request.param)
    return area


def call(address: int, *args: int) -> int:
    function = ctypes.CFUNCTYPE(ctypes.c_uint64, *[ctypes.c_int64] * len(args))(address)
    result: int = function(*args)
    return result


Maker = Callable[[int], tuple[bytes, bytes, bytes]]


def place(memory: Memory, where: Area, make: Maker) -> tuple[int, int, int]:
    """Write an original function (prologue + probed instruction + epilogue; `make` gets its address) and a
    relocated one (prologue + jump to the slot, whose jump back lands in the original). Returns the original,
    the relocated one and the probed address."""
    function = memory.orig.reserve(256)
    prologue, probed, epilogue = make(function)
    write(function, prologue + probed + epilogue)
    probe = function + len(prologue)
    slot_address = where.reserve(SLOT_SIZE)
    slot, length = build_slot(probed + epilogue, probe, slot_address)
    assert length == len(probed)
    write(slot_address, slot)
    stub = where.reserve(len(prologue) + 14)
    write(stub, prologue + jump(stub + len(prologue), slot_address))
    return function, stub, probe


def rel32(frm: int, to: int) -> bytes:
    """The rel32 field of an instruction ending at `frm` reaching `to`."""
    return (to - frm).to_bytes(4, "little", signed=True)


def differential(memory: Memory, where: Area, make: Maker, *arg_sets: tuple[int, ...]) -> list[int]:
    original, relocated, _ = place(memory, where, make)
    results = []
    for args in arg_sets or [()]:
        expected = call(original, *args)
        assert call(relocated, *args) == expected, args
        results.append(expected)
    return results


def test_exec_plain_push_pop(memory: Memory, where: Area) -> None:
    # push rdi | pop rax; ret
    assert differential(memory, where, lambda f: (b"", b"\x57", b"\x58\xc3"), (7,), (-3,)) == [7, 2**64 - 3]


def test_exec_lea_rip(memory: Memory) -> None:
    # lea rax, [rip+0x100] | ret
    original, relocated, probe = place(
        memory, memory.near, lambda f: (b"", bytes.fromhex("488d0500010000"), b"\xc3")
    )
    assert call(original) == call(relocated) == probe + 7 + 0x100


def test_exec_mov_from_rip(memory: Memory) -> None:
    cell = memory.orig.put((0x1122_3344_5566_7788).to_bytes(8, "little"))
    # mov rax, [rip+cell] | ret
    results = differential(
        memory, memory.near, lambda f: (b"", b"\x48\x8b\x05" + rel32(f + 7, cell), b"\xc3")
    )
    assert results == [0x1122_3344_5566_7788]


def test_exec_cmp_rip_with_immediate(memory: Memory) -> None:
    cell = memory.orig.put(b"\x5a" + bytes(7))
    for imm in (0x5A, 0x5B, 0x01, 0xFF):
        # cmp byte [rip+cell], imm | pushfq; pop rax; ret
        results = differential(
            memory,
            memory.near,
            lambda f, imm=imm: (b"", b"\x80\x3d" + rel32(f + 7, cell) + bytes([imm]), b"\x9c\x58\xc3"),
        )
        assert (results[0] & 0x40 != 0) == (imm == 0x5A)  # ZF


def test_exec_store_rip_with_immediate(memory: Memory) -> None:
    cell = memory.orig.put(bytes(8))

    def make(f: int) -> tuple[bytes, bytes, bytes]:
        store = (
            b"\xc7\x05" + rel32(f + 10, cell) + (0x1234_5678).to_bytes(4, "little")
        )  # mov dword [rip+cell], imm
        load = b"\x8b\x05" + rel32(f + 16, cell) + b"\xc3"  # mov eax, [rip+cell]; ret
        return b"", store, load

    original, relocated, _ = place(memory, memory.near, make)
    assert call(original) == 0x1234_5678
    write(cell, bytes(8))
    assert call(relocated) == 0x1234_5678


def test_exec_call_rel32(memory: Memory, where: Area) -> None:
    # call ret_addr | ret: both return the original return address
    original, relocated, probe = place(
        memory, where, lambda f: (b"", b"\xe8" + rel32(f + 5, memory.ret_addr), b"\xc3")
    )
    assert call(original) == call(relocated) == probe + 5

    # call forty_two | add eax, 1; ret
    def make(f: int) -> tuple[bytes, bytes, bytes]:
        return b"", b"\xe8" + rel32(f + 5, memory.forty_two), b"\x83\xc0\x01\xc3"

    assert differential(memory, where, make) == [43]


def test_exec_call_rip_memory(memory: Memory) -> None:
    cell = memory.orig.put(memory.ret_addr.to_bytes(8, "little"))
    # call [rip+cell] | ret
    original, relocated, probe = place(
        memory, memory.near, lambda f: (b"", b"\xff\x15" + rel32(f + 6, cell), b"\xc3")
    )
    assert call(original) == call(relocated) == probe + 6


@pytest.mark.parametrize(
    ("prologue", "probed", "epilogue"),
    [
        ("4889f8", "ffd0", "c3"),  # mov rax, rdi | call rax | ret
        ("4989fb", "41ffd3", "c3"),  # mov r11, rdi | call r11 | ret
        ("57", "ff1424", "59c3"),  # push rdi | call [rsp] | pop rcx; ret
        ("5756", "ff542408", "4883c410c3"),  # push rdi; push rsi | call [rsp+8] | add rsp, 16; ret
        ("574883ec78", "ff542478", "4881c480000000c3"),  # push rdi; sub rsp, 0x78 | call [rsp+0x78] | ...
        ("5731c0", "ff14c4", "59c3"),  # push rdi; xor eax, eax | call [rsp+rax*8] | pop rcx; ret
    ],
)
def test_exec_call_indirect(memory: Memory, where: Area, prologue: str, probed: str, epilogue: str) -> None:
    parts = bytes.fromhex(prologue), bytes.fromhex(probed), bytes.fromhex(epilogue)
    original, relocated, probe = place(memory, where, lambda f: parts)
    # rdi: the function to call; rsi: garbage that a wrong [rsp+...] would call
    assert (
        call(original, memory.ret_addr, 0x4141)
        == call(relocated, memory.ret_addr, 0x4141)
        == probe + len(parts[1])
    )


def test_exec_call_through_memory_with_base(memory: Memory, where: Area) -> None:
    table = (ctypes.c_uint64 * 2)(0, memory.forty_two)
    # mov rax, rdi | call [rax+8] | ret
    parts = (b"\x48\x89\xf8", b"\xff\x50\x08", b"\xc3")
    assert differential(memory, where, lambda f: parts, (ctypes.addressof(table),)) == [42]


@pytest.mark.parametrize("probed", ["eb06", "e906000000"], ids=["rel8", "rel32"])
def test_exec_jmp_rel(memory: Memory, where: Area, probed: str) -> None:
    # jmp L | mov eax, 1; ret | L: mov eax, 2; ret
    parts = (b"", bytes.fromhex(probed), bytes.fromhex("b801000000c3b802000000c3"))
    assert differential(memory, where, lambda f: parts) == [2]


def test_exec_jmp_rip_memory(memory: Memory) -> None:
    cell = memory.orig.put(memory.forty_two.to_bytes(8, "little"))
    # jmp [rip+cell] (a tail call)
    assert differential(memory, memory.near, lambda f: (b"", b"\xff\x25" + rel32(f + 6, cell), b"")) == [42]


_CMP_PAIRS = [(0, 0), (1, 2), (2, 1), (-1, 1), (1, -1), (-(2**63), 1), (2**63 - 1, -1), (0x80, 0), (3, 3)]


@pytest.mark.parametrize("rel32", [False, True], ids=["rel8", "rel32"])
@pytest.mark.parametrize("cc", range(16), ids=JCC)
def test_exec_jcc(memory: Memory, where: Area, cc: int, rel32: bool) -> None:
    branch = bytes([0x0F, 0x80 | cc, 6, 0, 0, 0]) if rel32 else bytes([0x70 | cc, 6])
    # cmp rdi, rsi | jcc L | mov eax, 1; ret | L: mov eax, 2; ret
    parts = (b"\x48\x39\xf7", branch, bytes.fromhex("b801000000c3b802000000c3"))
    assert set(differential(memory, where, lambda f: parts, *_CMP_PAIRS)) == {1, 2}  # taken and not taken


@pytest.mark.parametrize("branch", ["e004", "e104", "e204", "e304", "67e304"])
def test_exec_loops_and_jrcxz(memory: Memory, where: Area, branch: str) -> None:
    # (rdi, rsi, rdx, rcx): cmp rdi, rsi | loop*/jrcxz L | mov rax, rcx; ret | L: lea rax, [rcx+100]; ret
    parts = (b"\x48\x39\xf7", bytes.fromhex(branch), bytes.fromhex("4889c8c3488d4164c3"))
    arg_sets = [(a, b, 0, rcx) for a, b in [(0, 0), (0, 1)] for rcx in (0, 1, 2, 1 << 32, (1 << 32) + 1)]
    assert len(set(differential(memory, where, lambda f: parts, *arg_sets))) > 2


# --- real execution of relocated runs: the original is then patched with a jump, as an optimized probe is ---


def optimize(memory: Memory, function: int, original: bytes, count: int) -> tuple[int, int]:
    """Relocate `count` instructions at `function` into a trampoline in the near area, then overwrite them
    with a jump to it (and int3 padding). Returns (trampoline, length)."""
    trampoline = memory.near.reserve(count * 32 + 14)
    code, length = relocate(original, function, trampoline, count)
    write(trampoline, code + jump(trampoline + len(code), function + length))
    patch = jump(function, trampoline)
    assert len(patch) <= length
    write(function, patch + b"\xcc" * (length - len(patch)))
    return trampoline, length


@pytest.mark.parametrize(
    ("body", "count", "rest"),
    [
        ("f30f1efa554889e5", 3, "4889e84829e04883c0075dc3"),  # endbr64; push rbp; mov rbp, rsp | rbp-rsp+7
        ("554889e54883ec10", 3, "4883c4104889f85dc3"),  # push rbp; mov rbp, rsp; sub rsp, 16 | return rdi
        ("31c04885ff7502b00983c005", 5, "c3"),  # xor; test rdi; jne L; mov al, 9; L: add eax, 5 | ret
    ],
)
def test_exec_relocated_run(memory: Memory, body: str, count: int, rest: str) -> None:
    code = bytes.fromhex(body + rest)
    function = memory.orig.put(code)
    before = [call(function, arg) for arg in (0, 1, 99)]
    optimize(memory, function, code, count)
    assert [call(function, arg) for arg in (0, 1, 99)] == before


def test_exec_relocated_run_with_rip_relative_load(memory: Memory) -> None:
    cell = memory.orig.put((0xDEAD_BEEF).to_bytes(8, "little"))
    function = memory.orig.reserve(32)
    # push rbp; mov rax, [rip+cell]; mov rbp, rsp | pop rbp; ret
    code = b"\x55\x48\x8b\x05" + rel32(function + 8, cell) + b"\x48\x89\xe5" + b"\x5d\xc3"
    write(function, code)
    assert call(function) == 0xDEAD_BEEF
    optimize(memory, function, code, 3)
    assert call(function) == 0xDEAD_BEEF


def test_exec_relocated_run_ending_in_call(memory: Memory) -> None:
    function = memory.orig.reserve(32)
    # push rbx; mov ebx, 1; call forty_two | add eax, ebx; pop rbx; ret
    code = b"\x53\xbb\x01\x00\x00\x00\xe8" + rel32(function + 11, memory.forty_two) + b"\x01\xd8\x5b\xc3"
    write(function, code)
    assert call(function) == 43
    optimize(memory, function, code, 3)
    assert call(function) == 43
