"""The flag-free fast path of the counting trampoline (trampoline._fast_head and its slow path), run under
unicorn as pmu builds it: counts right in every case, and leaves every register, the flags and the red
zone as they were."""

from __future__ import annotations

import struct

import capstone
import pytest

from pmu.trace import trampoline
from pmu.trace.trampoline import ENABLED, KEYS, MISS, NSITES, NSLOTS, ON, ON_LOCKED, ON_TCB, ROWS, build

unicorn = pytest.importorskip("unicorn")
uc_x86 = pytest.importorskip("unicorn.x86_const")

AREA = 0x7F12_3456_7000
CODE = 0x10000
BACK = 0x30000
STACK = 0x80000
SITE = 5
FS = 0x7F12_0004_5640
RELOCATED = bytes.fromhex("488d5b07")  # lea rbx, [rbx+7]: a displaced instruction that leaves the flags
REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
FLAGS = (0x1, 0x4, 0x10, 0x40, 0x80, 0x400, 0x800)
"""CF, PF, AF, ZF, SF, DF, OF: the flags a trampoline could clobber."""


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path, whatever this machine's CPU (unicorn emulates BMI2)."""
    monkeypatch.setattr(trampoline, "fast_path", lambda: True)


def _slot(fs: int) -> int:
    return (fs >> 12) & (NSLOTS - 1)


class Machine:
    def __init__(self, enabled: int = ON, fs: int = FS, tcb: int | None = None) -> None:
        """With `tcb`, the first word at FS base (the TCB's self pointer, read in ON_TCB mode)."""
        self.tramp = build(AREA, SITE, RELOCATED, CODE, BACK)
        self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self.uc.mem_map(AREA, trampoline.AREA_BYTES)
        self.uc.mem_map(CODE, 0x1000)
        self.uc.mem_map(BACK, 0x1000)
        self.uc.mem_map(STACK - 0x10000, 0x20000)
        self.uc.mem_write(CODE, self.tramp.code)
        self.uc.mem_write(BACK, b"\xf4")  # hlt where the jump back lands
        self.uc.mem_write(AREA + ENABLED + SITE, bytes([enabled]))
        if tcb is not None:
            self.uc.mem_map(fs & ~0xFFF, 0x1000)
            self.uc.mem_write(fs, struct.pack("<Q", tcb))
        self.claim(0, trampoline.RESERVED)  # as CounterArea.format leaves a new area
        self.uc.reg_write(uc_x86.UC_X86_REG_FS_BASE, fs)
        self.ran: list[int] = []
        self.uc.hook_add(unicorn.UC_HOOK_CODE, lambda uc, addr, size, _: self.ran.append(addr))

    def claim(self, slot: int, key: int) -> None:
        self.uc.mem_write(AREA + KEYS + 8 * slot, struct.pack("<Q", key))

    def hit(self, flags: int = 0x202) -> None:
        """One call through the trampoline: every register as it was but rbx (+7 by the relocated lea),
        the red zone untouched."""
        values = {r: 0x1111_0000_0000 * (i + 1) + i for i, r in enumerate(REGS)}
        for r, v in values.items():
            self.uc.reg_write(getattr(uc_x86, f"UC_X86_REG_{r.upper()}"), v)
        self.uc.reg_write(uc_x86.UC_X86_REG_RSP, STACK)
        self.uc.reg_write(uc_x86.UC_X86_REG_EFLAGS, flags)
        redzone = bytes(range(128))
        self.uc.mem_write(STACK - 128, redzone)
        self.ran.clear()
        self.uc.emu_start(CODE, BACK)
        values["rbx"] += 7
        for r, v in values.items():
            assert self.uc.reg_read(getattr(uc_x86, f"UC_X86_REG_{r.upper()}")) == v, r
        assert self.uc.reg_read(uc_x86.UC_X86_REG_RSP) == STACK
        assert bytes(self.uc.mem_read(STACK - 128, 128)) == redzone

    def flags_after(self, flags: int) -> int:
        """The flags when the call reaches the jump back, from `flags` (the relocated lea keeps them)."""
        self.hit(flags)
        return int(self.uc.reg_read(uc_x86.UC_X86_REG_EFLAGS))

    def count(self, slot: int) -> int:
        return int(struct.unpack("<Q", self.uc.mem_read(AREA + ROWS + (slot * NSITES + SITE) * 8, 8))[0])

    def key(self, slot: int) -> int:
        return int(struct.unpack("<Q", self.uc.mem_read(AREA + KEYS + 8 * slot, 8))[0])

    def misses(self) -> int:
        return int(struct.unpack("<Q", self.uc.mem_read(AREA + MISS + 8 * SITE, 8))[0])

    @property
    def slow(self) -> bool:
        """Whether the last hit went through the slow path (the code after the jump back)."""
        start = CODE + self.tramp.body + len(RELOCATED) + 5  # past the jmp rel32 back
        return any(start <= a < CODE + len(self.tramp.code) for a in self.ran)


@pytest.mark.parametrize("mode", [ON, ON_TCB])
def test_first_hit_claims_the_row_then_the_fast_path_counts(mode: int) -> None:
    m = Machine(enabled=mode, tcb=FS)
    m.hit()
    assert m.slow and m.key(_slot(FS)) == FS and m.count(_slot(FS)) == 1
    for n in range(2, 6):
        m.hit()
        assert not m.slow, "a thread at its own row takes the fast path"
        assert m.count(_slot(FS)) == n
    assert m.misses() == 0


def test_a_row_taken_by_another_thread_goes_to_the_next_free_one() -> None:
    m = Machine()
    other = FS + (NSLOTS << 12)  # hashes to the same row
    m.claim(_slot(FS), other)
    for _ in range(3):
        m.hit()
        assert m.slow
    assert m.key(_slot(FS)) == other and m.count(_slot(FS)) == 0
    assert m.key(_slot(FS) + 1) == FS and m.count(_slot(FS) + 1) == 3


def test_no_tls_counts_a_miss() -> None:
    m = Machine(fs=0)
    m.hit()
    m.hit()
    assert m.slow and m.misses() == 2 and m.key(0) == trampoline.RESERVED and m.count(0) == 0


def test_a_thread_that_hashes_to_the_reserved_row_counts_in_the_next() -> None:
    fs = 0x7F12_0000_0040  # bits 12..21 all zero
    m = Machine(fs=fs)
    for _ in range(3):
        m.hit()
        assert m.slow
    assert m.count(0) == 0 and m.key(1) == fs and m.count(1) == 3


def test_disabled_counts_nothing_and_locked_counts_in_the_slow_path() -> None:
    off = Machine(enabled=0)
    off.hit()
    assert not off.slow and off.key(_slot(FS)) == 0 and off.misses() == 0
    locked = Machine(enabled=ON_LOCKED)
    for _ in range(4):
        locked.hit()
        assert locked.slow
    assert locked.count(_slot(FS)) == 4


def test_tcb_mode_reads_the_identity_from_the_tcb() -> None:
    """ON_TCB: the identity is the TCB's first word; one that is not the FS base (another runtime's
    TLS) never finds its row, so every hit goes to the slow path, which counts by rdfsbase."""
    m = Machine(enabled=ON_TCB, tcb=FS)
    m.hit()
    m.hit()
    assert not m.slow
    assert m.count(_slot(FS)) == 2
    other = Machine(enabled=ON_TCB, tcb=0x5555_0000_1230)
    for _ in range(3):
        other.hit()
        assert other.slow
    assert other.key(_slot(FS)) == FS and other.count(_slot(FS)) == 3


@pytest.mark.parametrize("flags", [0x202, 0x202 | sum(FLAGS)])
@pytest.mark.parametrize("enabled", [0, ON, ON_LOCKED, ON_TCB])
def test_flags_are_the_programs(flags: int, enabled: int) -> None:
    """Fast path, slow path, disabled: the program's flags come through the trampoline untouched."""
    m = Machine(enabled=enabled, tcb=FS)
    for _ in range(3):  # the first hit (a claim) and later ones alike
        assert m.flags_after(flags) == flags


def test_the_fast_path_writes_no_flag() -> None:
    """Every instruction up to the relocated code, on the way a hit at its own row takes, neither writes
    nor (but for jrcxz, which reads rcx) tests a flag: capstone's eflags detail says so."""
    t = build(AREA, SITE, RELOCATED, CODE, BACK)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    head = list(md.disasm(t.code[: t.body], CODE))
    assert sum(i.size for i in head) == t.body
    for insn in head:
        if insn.mnemonic == "jmp":
            continue  # to the slow path
        assert insn.eflags == 0, f"{insn.mnemonic} {insn.op_str} touches the flags"
    assert not any(i.mnemonic in ("pushfq", "popfq") for i in head)
    assert [i.mnemonic for i in head].count("jrcxz") == 4
