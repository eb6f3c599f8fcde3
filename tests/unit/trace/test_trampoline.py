"""The counting trampoline is generated from one template: disassemble it and check every step."""

from __future__ import annotations

import capstone
import pytest

from pmu.trace import trampoline
from pmu.trace.trampoline import (
    ENABLED,
    KEYS,
    MISS,
    NSITES,
    NSLOTS,
    ROW_SHIFT,
    ROWS,
    build,
    counting_trampoline,
)

AREA = 0x7F12_3456_7000


def _num(v: int) -> str:
    """As capstone prints a displacement: decimal below 10, else hex."""
    return str(v) if v < 10 else hex(v)


def _disasm(code: bytes, at: int = 0x1000) -> list[tuple[int, str, str]]:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    out = [(i.address, i.mnemonic, i.op_str) for i in md.disasm(code, at)]
    assert sum(len(i.bytes) for i in md.disasm(code, at)) == len(code), "every byte decodes"
    return out


@pytest.mark.parametrize("site", [0, 5, NSITES - 1])
def test_counting_prologue(site: int) -> None:
    insns = _disasm(counting_trampoline(AREA, site))
    text = [f"{m} {o}".strip() for _, m, o in insns]
    by_addr = {a: f"{m} {o}".strip() for a, m, o in insns}
    # The red zone is stepped over before anything is pushed, and given back after everything is popped.
    assert text[0] == "lea rsp, [rsp - 0x80]"
    assert text[1:7] == ["pushfq", "push rax", "push rcx", "push rdx", "push r8", "push r9"]
    assert text[-7:] == [
        "pop r9",
        "pop r8",
        "pop rdx",
        "pop rcx",
        "pop rax",
        "popfq",
        "lea rsp, [rsp + 0x80]",
    ]
    assert f"movabs rdx, {AREA:#x}" in text
    enabled = ENABLED + site
    assert (f"cmp byte ptr [rdx + {_num(enabled)}], 0" if enabled else "cmp byte ptr [rdx], 0") in text
    assert "rdfsbase rax" in text
    assert f"and ecx, {NSLOTS - 1:#x}" in text
    assert f"lock cmpxchg qword ptr [rdx + rcx*8 + {KEYS:#x}], r9" in text
    assert f"lock inc qword ptr [rdx + {MISS + 8 * site:#x}]" in text
    assert f"shl rcx, {ROW_SHIFT}" in text
    assert f"inc qword ptr [rdx + rcx + {ROWS + 8 * site:#x}]" in text
    assert 1 << ROW_SHIFT == NSITES * 8
    # Every branch lands on an instruction of the prologue or on its end (the relocated code).
    end = insns[-1][0] + 8
    for _, mnemonic, op in insns:
        if mnemonic.startswith("j"):
            target = int(op, 16)
            assert target in by_addr or target == end, (mnemonic, op)
    # The disabled check jumps straight to the register restore.
    je_done = next(op for _, m, op in insns if m == "je")
    assert by_addr[int(je_done, 16)] == "pop r9"


def test_build_appends_relocated_code_and_jump_back() -> None:
    relocated = bytes.fromhex("554889e5")  # push rbp; mov rbp, rsp
    t = build(AREA, 3, relocated, 0x1000, 0x5000)
    insns = _disasm(t.code)
    assert t.code[t.body : t.body + len(relocated)] == relocated
    assert insns[-1][1] == "jmp" and int(insns[-1][2], 16) == 0x5000


def test_layout_fits() -> None:
    assert ROWS + NSLOTS * NSITES * 8 == trampoline.AREA_BYTES
    assert MISS + 8 * NSITES <= KEYS and KEYS + 8 * NSLOTS <= ROWS
    with pytest.raises(ValueError):
        counting_trampoline(AREA, NSITES)
