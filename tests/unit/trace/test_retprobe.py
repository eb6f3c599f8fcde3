"""The in-process return probe (pmu/trace/retprobe.S, as retprobe.py embeds it), run under unicorn on
small programs assembled here: returns counted, every register and flag kept, frames left by a
longjmp dropped and counted lost, recursion, the depth limit, latency histograms and ring records."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

import pytest

from pmu.trace import retprobe, trampoline
from pmu.trace.retprobe import Desc

unicorn = pytest.importorskip("unicorn")
uc_x86 = pytest.importorskip("unicorn.x86_const")

pytestmark = pytest.mark.skipif(shutil.which("ld") is None, reason="needs GNU as and ld")

PROG = 0x10000
FUNC = PROG + 0x100
BLOB = 0x40000
STUB = 0x48000
BANK = 0x7F00_0000_0000
SHADOW = 0x7E00_0000_0000
AREA = 0x7D00_0000_0000
RING = 0x7C00_0000_0000
STACK = 0x80_0000
FS = 0x7F12_0004_5640
SITE = 3
RET = 5
ROW = (FS >> 12) & (trampoline.NSLOTS - 1)
REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _asm(source: str, base: int) -> bytes:
    """`source` assembled to run at `base` (absolute call and jump targets)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, elf, raw = (os.path.join(tmp, n) for n in ("p.S", "p.o", "p.elf", "p.bin"))
        with open(src, "w") as f:
            f.write(".intel_syntax noprefix\n.text\n.globl _start\n_start:\n" + source + "\n")
        subprocess.run(["as", "--64", "-o", obj, src], check=True)
        subprocess.run(["ld", f"-Ttext={base:#x}", "-o", elf, obj], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", elf, raw], check=True)
        with open(raw, "rb") as f:
            return f.read()


def test_embedded_code_is_the_source_assembled() -> None:
    """retprobe.py's CODE is retprobe.S as it stands (`make retprobe` after every change)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools"))
    import gen_retprobe

    code, symbols = gen_retprobe.assemble()
    assert code == retprobe.CODE
    assert (symbols["entry"], symbols["ret_tramp"]) == (retprobe.ENTRY, retprobe.RET_TRAMP)
    assert symbols["skip_trap"] == retprobe.SKIP_TRAP
    with open(gen_retprobe.SOURCE) as f:
        source = f.read()
    for name in ("MAXDEPTH", "DROP_LIMIT", "R_FRAMES", "R_GRAVE", "S_ROWS", "A_HIST", "A_SUMNS", "A_USED"):
        found = re.search(rf"\.equ {name}, (0x[0-9a-fA-F]+|\d+)", source)
        assert found is not None and int(found.group(1), 0) == getattr(retprobe, name), name
    assert retprobe.CODE[retprobe.SKIP_TRAP : retprobe.SKIP_TRAP + 2] == b"\x66\x90"  # pmu's int3 goes there


class Machine:
    """A program whose `func` (at FUNC: `lea rbx, [rbx+7]; nop` first, then `body`) is return-probed."""

    def __init__(
        self, caller: str, body: str, flags: int = 0, nargs: int = 0, period: int = 1, esite: int = -1
    ) -> None:
        self.uc = uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.mem_map(PROG, 0x1000)
        uc.mem_map(BLOB, 0x2000)
        uc.mem_map(STUB, 0x1000)
        uc.mem_map(BANK, trampoline.AREA_BYTES)
        uc.mem_map(SHADOW, 0x2000)
        uc.mem_map(retprobe.row_address(SHADOW, ROW), 0x40000)
        uc.mem_map(AREA, retprobe.AREA_BYTES + 0xFFF & ~0xFFF)
        uc.mem_map(RING, 0x2000)
        uc.mem_map(STACK - 0x100000, 0x110000)
        prog = _asm(caller, PROG)
        assert len(prog) <= 0x100
        uc.mem_write(PROG, prog)
        func = _asm("lea rbx, [rbx+7]\nnop\n" + body, FUNC)
        uc.mem_write(FUNC, func)
        uc.mem_write(BLOB, retprobe.CODE)
        uc.mem_write(BLOB, retprobe.header(SHADOW, AREA))
        uc.mem_write(BANK + trampoline.ENABLED + SITE, bytes([trampoline.ON]))
        uc.mem_write(BANK + trampoline.PID, struct.pack("<I", 4242))
        uc.mem_write(AREA + retprobe.A_MULT, struct.pack("<Q", 1 << 32))  # 1 ns a tick
        uc.mem_write(RING + 0x18, struct.pack("<QQ", 16, 15))  # capacity, mask
        entry = (BANK, esite) if esite >= 0 else (0, 0)
        desc = Desc(BANK, SITE, RET, flags, nargs, RING, FUNC, 9, period, *entry)
        uc.mem_write(retprobe.desc_address(AREA, RET), desc.pack())
        code = retprobe.stub(
            retprobe.desc_address(AREA, RET), BLOB + retprobe.ENTRY, func[:5], STUB, FUNC + 5
        )
        uc.mem_write(STUB, code)
        uc.mem_write(FUNC, b"\xe9" + struct.pack("<i", STUB - (FUNC + 5)))  # the jump patch
        uc.reg_write(uc_x86.UC_X86_REG_FS_BASE, FS)

    def run(self, flags: int = 0x202) -> dict[str, int]:
        values = {r: 0x1111_0000_0000 * (i + 1) + i for i, r in enumerate(REGS)}
        for r, v in values.items():
            self.uc.reg_write(getattr(uc_x86, f"UC_X86_REG_{r.upper()}"), v)
        self.uc.reg_write(uc_x86.UC_X86_REG_RSP, STACK)
        self.uc.reg_write(uc_x86.UC_X86_REG_EFLAGS, flags)
        self.uc.emu_start(PROG, 0, count=5_000_000)
        rip = self.uc.reg_read(uc_x86.UC_X86_REG_RIP)
        assert PROG <= rip < PROG + 0x100, hex(rip)  # stopped at the caller's hlt
        out = {r: self.uc.reg_read(getattr(uc_x86, f"UC_X86_REG_{r.upper()}")) for r in REGS}
        out["rsp"] = self.uc.reg_read(uc_x86.UC_X86_REG_RSP)
        out["eflags"] = self.uc.reg_read(uc_x86.UC_X86_REG_EFLAGS)
        out["before"] = values  # type: ignore[assignment]
        return out

    def u64(self, addr: int) -> int:
        return int(struct.unpack("<Q", self.uc.mem_read(addr, 8))[0])

    @property
    def count(self) -> int:
        return self.cell(SITE)

    def cell(self, site: int) -> int:
        bank_row = next(
            i for i in range(trampoline.NSLOTS) if self.u64(BANK + trampoline.KEYS + 8 * i) == FS
        )
        return self.u64(BANK + trampoline.ROWS + (bank_row << trampoline.ROW_SHIFT) + 8 * site)

    @property
    def depth(self) -> int:
        return self.u64(retprobe.row_address(SHADOW, ROW))

    def lost(self) -> int:
        return self.u64(AREA + retprobe.A_LOST + 8 * RET)

    def skipped(self) -> int:
        return self.u64(AREA + retprobe.A_SKIPPED + 8 * RET)


def _runs_right(m: Machine, rax: int, returns: int, lost: int) -> None:
    """The program's result, the returns counted and the frames counted lost; the shadow stack empty."""
    out = m.run()
    assert out["rax"] == rax
    assert m.count == returns
    assert m.lost() == lost
    assert m.depth == 0


LOOP = """
    mov rcx, 10
1:  push rcx
    mov rdi, rcx
    call {func}
    pop rcx
    loop 1b
    hlt
"""


def test_returns_counted_and_every_register_and_flag_kept() -> None:
    m = Machine(LOOP.format(func=FUNC), "lea rax, [rdi+1]\nret")
    for flags in (0x202, 0x202 | 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x800):
        out = m.run(flags)
        before = out.pop("before")
        assert out["eflags"] == flags
        assert out["rsp"] == STACK
        for r in REGS:
            want = {"rax": 2, "rcx": 0, "rdi": 1, "rbx": before["rbx"] + 7 * 10}.get(r, before[r])  # type: ignore[index]
            assert out[r] == want, r
    assert m.count == 20
    assert m.depth == 0
    assert m.lost() == m.skipped() == 0


def test_recursion_counts_every_return() -> None:
    body = f"""
    test rdi, rdi
    jz 2f
    dec rdi
    call {FUNC}
    inc rax
    ret
2:  xor eax, eax
    ret
"""
    m = Machine(f"mov rdi, 50\ncall {FUNC}\nhlt", body)
    out = m.run()
    assert out["rax"] == 50
    assert m.count == 51
    assert m.depth == 0


def test_frames_deeper_than_the_shadow_stack_are_skipped_not_lost() -> None:
    body = f"""
    test rdi, rdi
    jz 2f
    dec rdi
    call {FUNC}
    inc rax
    ret
2:  xor eax, eax
    ret
"""
    deep = retprobe.MAXDEPTH + 10
    m = Machine(f"mov rdi, {deep - 1}\ncall {FUNC}\nhlt", body)
    out = m.run()
    assert out["rax"] == deep - 1
    assert m.count == retprobe.MAXDEPTH
    assert m.skipped() == 10
    assert m.depth == 0


def test_a_frame_left_by_longjmp_is_dropped_and_counted_lost() -> None:
    """func's first call never returns (rsp reset, jump to the caller: longjmp); its frame is dropped
    at the next entry, whose slot is the same, and the program goes on right."""
    caller = f"""
    mov rdi, 0
    mov r12, rsp
    lea r13, [rip+3f]
    call {FUNC}
3:  mov rdi, 1
    call {FUNC}
    hlt
"""
    body = """
    test rdi, rdi
    jnz 4f
    mov rsp, r12
    jmp r13
4:  mov eax, 77
    ret
"""
    _runs_right(Machine(caller, body), rax=77, returns=1, lost=1)


def test_a_return_above_frames_left_behind_drops_them() -> None:
    """A frame abandoned inside another (a longjmp out of the inner call to a point inside the outer
    one): the outer function's return finds its own frame under it, drops it and returns right."""
    caller = f"mov rdi, 2\ncall {FUNC}\nhlt"
    body = f"""
    cmp rdi, 2
    jne 5f
    mov rdi, 1
    mov r12, rsp
    lea r13, [rip+6f]
    call {FUNC}
6:  mov eax, 99
    ret
5:  mov rsp, r12
    jmp r13
"""
    _runs_right(Machine(caller, body), rax=99, returns=1, lost=1)


def test_a_tail_call_into_itself_keeps_the_outer_frame() -> None:
    """func tail-calls itself once (jmp, the same return slot): both frames return, in order."""
    caller = f"mov rdi, 1\ncall {FUNC}\nhlt"
    body = f"""
    test rdi, rdi
    jz 7f
    dec rdi
    jmp {FUNC}
7:  mov eax, 5
    ret
"""
    _runs_right(Machine(caller, body), rax=5, returns=2, lost=0)


def test_latency_histogram() -> None:
    m = Machine(LOOP.format(func=FUNC), "lea rax, [rdi+1]\nret", flags=retprobe.FLAG_LATENCY)
    m.run()
    words = __import__("numpy").frombuffer(bytes(m.uc.mem_read(AREA, retprobe.AREA_BYTES)), dtype="<u8")
    buckets, total = retprobe.histogram(words, RET)
    assert int(buckets.sum()) == 10
    assert total > 0
    assert m.count == 10


def test_recorded_returns() -> None:
    m = Machine(LOOP.format(func=FUNC), "lea rax, [rdi+1]\nret", flags=retprobe.FLAG_RECORD, nargs=2)
    m.run()
    head = m.u64(RING + 0x80)
    assert head == 10
    for n in range(10):
        rec = bytes(m.uc.mem_read(RING + 0x1000 + 128 * n, 128))
        seq, _t, thread, pid, event, ip = struct.unpack_from("<QQQIIQ", rec)
        args = struct.unpack_from("<6Q", rec, 0x28)
        retval, latency, flags = struct.unpack_from("<QqQ", rec, 0x58)
        assert (seq, thread, pid, event, ip) == (n + 1, FS, 4242, 9, FUNC)
        assert args[0] == 10 - n and args[2:] == (0, 0, 0, 0)
        assert retval == 11 - n
        assert latency >= 0
        assert flags == 1


def test_recorded_with_a_period() -> None:
    m = Machine(LOOP.format(func=FUNC), "lea rax, [rdi+1]\nret", flags=retprobe.FLAG_RECORD, period=3)
    m.run()
    assert m.u64(RING + 0x80) == 3  # the 3rd, 6th and 9th returns
    assert m.count == 10


def test_disabled_site_counts_nothing_and_keeps_registers() -> None:
    m = Machine(LOOP.format(func=FUNC), "lea rax, [rdi+1]\nret")
    m.uc.mem_write(BANK + trampoline.ENABLED + SITE, b"\0")
    out = m.run()
    assert out["rax"] == 2
    assert m.depth == 0
    assert m.u64(SHADOW + 8 * ROW) == 0  # no row claimed


def test_a_frame_dropped_from_below_another_stack_is_found_in_the_graveyard() -> None:
    """A signal handler on an alternate stack above the thread's calls func inside func: the entry
    there takes the outer frame for dead (its slot is below) and drops it; the outer return finds it
    in the graveyard and returns right, and nothing is counted lost."""
    alt = STACK + 0x8000
    caller = f"mov rdi, 2\ncall {FUNC}\nhlt"
    body = f"""
    cmp rdi, 2
    jne 8f
    mov r12, rsp
    mov rsp, {alt}
    mov rdi, 1
    call {FUNC}
    mov rsp, r12
    add rax, 100
    ret
8:  mov eax, 1
    ret
"""
    _runs_right(Machine(caller, body), rax=101, returns=2, lost=0)


@pytest.mark.parametrize("entry_on", [True, False])
def test_an_entry_probe_on_the_same_function_is_counted_by_the_stub(entry_on: bool) -> None:
    m = Machine(LOOP.format(func=FUNC), "lea rax, [rdi+1]\nret", esite=SITE + 1)
    if entry_on:
        m.uc.mem_write(BANK + trampoline.ENABLED + SITE + 1, bytes([trampoline.ON]))
    out = m.run()
    assert out["rax"] == 2
    assert m.count == 10
    assert m.cell(SITE + 1) == (10 if entry_on else 0)
