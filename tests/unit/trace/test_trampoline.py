"""The counting trampoline is generated from one template: disassemble it and check every step. These are
the classic trampolines (flags saved with pushfq), which recording always uses and counting uses on CPUs
without BMI2; test_fast_trampoline.py has the flag-free fast path."""

from __future__ import annotations

import os
import struct

import capstone
import pytest

from pmu.ring import ClockKind, Ring, ThreadKind
from pmu.trace import trampoline
from pmu.trace.trampoline import (
    ENABLED,
    KEYS,
    MISS,
    NSITES,
    NSLOTS,
    PID,
    ROW_SHIFT,
    ROWS,
    RecordSpec,
    build,
    counting_trampoline,
)

AREA = 0x7F12_3456_7000


@pytest.fixture(autouse=True)
def classic(monkeypatch: pytest.MonkeyPatch) -> None:
    """The classic trampoline, whatever this machine's CPU."""
    monkeypatch.setattr(trampoline, "fast_path", lambda: False)


def _num(v: int) -> str:
    """As capstone prints a displacement: decimal below 10, else hex."""
    return str(v) if v < 10 else hex(v)


def _disasm(code: bytes, at: int = 0x1000) -> list[tuple[int, str, str]]:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    out = [(i.address, i.mnemonic, i.op_str) for i in md.disasm(code, at)]
    assert sum(len(i.bytes) for i in md.disasm(code, at)) == len(code), "every byte decodes"
    return out


def _check_frame(text: list[str], saved: list[str]) -> None:
    """The red zone is stepped over before anything is pushed, flags and `saved` are pushed in this
    order, popped in the reverse order, and the red zone given back after everything is popped."""
    n = len(saved) + 2
    assert text[:n] == ["lea rsp, [rsp - 0x80]", "pushfq", *(f"push {r}" for r in saved)]
    assert text[-n:] == [*(f"pop {r}" for r in reversed(saved)), "popfq", "lea rsp, [rsp + 0x80]"]


def _check_branches(insns: list[tuple[int, str, str]], restore: str) -> None:
    """Every branch lands on an instruction of the prologue or on its end (the relocated code), and the
    first je (the disabled check) on `restore`, the first instruction of the register restore."""
    by_addr = {a: f"{m} {o}".strip() for a, m, o in insns}
    end = insns[-1][0] + 8
    for _, mnemonic, op in insns:
        if mnemonic.startswith("j"):
            target = int(op, 16)
            assert target in by_addr or target == end, (mnemonic, op)
    je_done = next(op for _, m, op in insns if m == "je")
    assert by_addr[int(je_done, 16)] == restore


@pytest.mark.parametrize("site", [0, 5, NSITES - 1])
def test_counting_prologue(site: int) -> None:
    insns = _disasm(counting_trampoline(AREA, site))
    text = [f"{m} {o}".strip() for _, m, o in insns]
    _check_frame(text, ["rax", "rcx", "rdx", "r8", "r9"])
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
    # The disabled check jumps straight to the register restore.
    _check_branches(insns, "pop r9")


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


# ---- recording ------------------------------------------------------------------------------------

RING = 0x7F00_0010_0000
IP = 0x5555_5555_1136


@pytest.mark.parametrize("nargs", [0, 3, 6])
def test_recording_prologue(nargs: int) -> None:
    spec = RecordSpec(RING, 7, IP, nargs)
    insns = _disasm(counting_trampoline(AREA, 5, spec))
    text = [f"{m} {o}".strip() for _, m, o in insns]
    _check_frame(text, ["rax", "rcx", "rdx", "r8", "r9", "rdi", "r10"])
    # The ring protocol of pmu/ring.py: tail read before head, full check, CAS, commit last.
    at = text.index(f"movabs rdi, {RING:#x}")
    assert text.index("rdtsc") < at  # time taken before reserving
    assert text[at + 1 : at + 3] == ["mov rcx, qword ptr [rdi + 0x100]", "mov rax, qword ptr [rdi + 0x80]"]
    assert "lock cmpxchg qword ptr [rdi + 0x80], rdx" in text
    commit = text.index("mov qword ptr [rax], rdx")
    assert all("[rax" not in t for t in text[commit + 1 :])  # nothing written to the record after seq
    assert "mov dword ptr [rax + 0x1c], 7" in text
    assert f"movabs rcx, {IP:#x}" in text
    assert f"mov r8d, dword ptr [rdx + {PID:#x}]" in text
    assert "lock inc qword ptr [rdi + 0x180]" in text
    assert f"lock inc qword ptr [rdi + {0x200 + 8 * 7:#x}]" in text
    _check_branches(insns, "pop r10")  # disabled: neither counted nor recorded


unicorn = pytest.importorskip("unicorn")
uc_x86 = pytest.importorskip("unicorn.x86_const")


class _Machine:
    """The recording trampoline run under unicorn, with a real Ring's memory as its ring."""

    CODE = 0x10000
    STACK = 0x80000
    FS = 0x7F12_0000_0040
    REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9", "rax", "rbx", "r10", "r11", "rbp")

    def __init__(self, ring: Ring, nargs: int, enabled: bool = True, period: int = 1) -> None:
        self.ring = ring
        self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self.uc.mem_map(AREA, trampoline.AREA_BYTES)
        self.uc.mem_map(RING, (ring.size + 0xFFF) & ~0xFFF)
        self.uc.mem_map(self.CODE, 0x1000)
        self.uc.mem_map(self.STACK - 0x10000, 0x20000)
        self.uc.mem_write(AREA + ENABLED + 5, b"\x01" if enabled else b"\x00")
        self.uc.mem_write(AREA + PID, (4242).to_bytes(4, "little"))
        self.uc.mem_write(RING, os.pread(ring.fd, ring.size, 0))
        code = (
            counting_trampoline(AREA, 5, RecordSpec(RING, 1, IP, nargs, period)) + b"\xf4"
        )  # hlt at the end
        self.end = self.CODE + len(code) - 1
        self.uc.mem_write(self.CODE, code)
        self.uc.reg_write(uc_x86.UC_X86_REG_FS_BASE, self.FS)

    def run(self) -> dict[str, int]:
        """One hit: every register given a distinct value, checked unchanged afterwards."""
        values = {r: 0x1111_0000_0000 * (i + 1) + i for i, r in enumerate(self.REGS)}
        for r, v in values.items():
            self.uc.reg_write(getattr(uc_x86, f"UC_X86_REG_{r.upper()}"), v)
        self.uc.reg_write(uc_x86.UC_X86_REG_RSP, self.STACK)
        redzone = bytes(range(128))
        self.uc.mem_write(self.STACK - 128, redzone)
        self.uc.emu_start(self.CODE, self.end)
        for r, v in values.items():
            assert self.uc.reg_read(getattr(uc_x86, f"UC_X86_REG_{r.upper()}")) == v, r
        assert self.uc.reg_read(uc_x86.UC_X86_REG_RSP) == self.STACK
        assert bytes(self.uc.mem_read(self.STACK - 128, 128)) == redzone  # the red zone is untouched
        os.pwrite(self.ring.fd, bytes(self.uc.mem_read(RING, self.ring.size)), 0)
        return values

    def row(self) -> int:
        view = bytes(self.uc.mem_read(AREA, trampoline.AREA_BYTES))
        keys = struct.unpack_from(f"<{NSLOTS}Q", view, KEYS)
        i = keys.index(self.FS)
        return int(struct.unpack_from("<Q", view, ROWS + i * NSITES * 8 + 8 * 5)[0])


@pytest.mark.parametrize("nargs", [0, 2, 6])
def test_recording_trampoline_runs(nargs: int) -> None:
    with Ring.create(1, 2, clock=ClockKind.TSC, thread=ThreadKind.FS_BASE) as ring:
        m = _Machine(ring, nargs)
        values = m.run()
        m.run()
        assert m.row() == 2
        records = ring.drain()
        assert len(records) == 2 and ring.lost_total == 0
        r = records[0]
        assert (int(r["thread"]), int(r["pid"]), int(r["event"]), int(r["ip"])) == (m.FS, 4242, 1, IP)
        expected = [values[a] for a in ("rdi", "rsi", "rdx", "rcx", "r8", "r9")[:nargs]]
        assert [int(a) for a in r["args"]] == expected + [0] * (6 - nargs)
        assert (int(r["retval"]), int(r["latency_ns"]), int(r["flags"])) == (0, -1, 0)
        assert int(records[1]["time"]) >= int(r["time"]) > 0


def test_recording_full_ring_counts_lost() -> None:
    with Ring.create(1, 2, clock=ClockKind.TSC, thread=ThreadKind.FS_BASE) as ring:
        m = _Machine(ring, 0)
        for _ in range(ring.capacity + 3):
            m.run()
        assert m.row() == ring.capacity + 3  # every hit counted
        assert len(ring.drain()) == ring.capacity
        assert ring.lost_total == 3 and ring.lost_per_event()[1] == 3


def test_disabled_recording_trampoline_does_nothing() -> None:
    with Ring.create(1, 2, clock=ClockKind.TSC, thread=ThreadKind.FS_BASE) as ring:
        m = _Machine(ring, 6, enabled=False)
        m.run()
        assert len(ring.drain()) == 0 and ring.lost_total == 0


def test_recording_with_a_period_records_every_nth_hit() -> None:
    """perf's -c: a record when the thread's count at the site is a multiple of the period."""
    with Ring.create(1, 2, clock=ClockKind.TSC, thread=ThreadKind.FS_BASE) as ring:
        m = _Machine(ring, 1, period=3)
        for _ in range(8):
            m.run()
        assert m.row() == 8  # every hit counted
        assert len(ring.drain()) == 2 and ring.lost_total == 0  # hits 3 and 6


def test_period_frame_and_range() -> None:
    text = [
        f"{m} {o}".strip() for _, m, o in _disasm(counting_trampoline(AREA, 1, RecordSpec(RING, 0, IP, 0, 7)))
    ]
    at = text.index("div rcx")
    assert text[at - 2 : at + 3] == ["xor edx, edx", "mov ecx, 7", "div rcx", "test rdx, rdx", text[at + 2]]
    assert text[at + 2].startswith("jne ")
    with pytest.raises(ValueError):
        counting_trampoline(AREA, 1, RecordSpec(RING, 0, IP, 0, 0))
