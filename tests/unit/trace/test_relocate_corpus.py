"""Differential tests of relocation on real function prologues (libc, libsqlite3, python3), under unicorn.

For every function of each library, the site a jump patch would displace (the fewest whole instructions
covering 5 bytes at its entry) is checked by `pmu.trace.patchsafety`; when it can be patched, the run is
relocated to a trampoline within ±2 GiB and both are executed from the same random registers, flags, stack
and memory: (a) the original instructions from the entry until RIP leaves them (or comes back to the entry),
(b) the trampoline (relocated code and the jump back) with the patch written over the entry, until RIP
leaves it. Registers, arithmetic flags, XMM registers, where control went, and the final contents of every
byte either run wrote must be the same. The int3 path (the first instruction alone, through `build_slot`,
in a slot near or more than 4 GiB away) is checked the same way, as is moving a thread stopped inside the
displaced instructions to the matching point of the trampoline. Every refusal must carry a named reason.

The library's PT_LOAD segments are mapped at a fixed load base, so RIP-relative loads see the file's bytes;
other reads map a page of deterministic random bytes on demand, so prologues that dereference their
(random) arguments run on. Unicorn lacks AVX and some other extensions: a run the emulator cannot execute
(an invalid instruction in the original) is counted apart, and both runs must still agree.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pytest

from pmu.errors import RelocationError
from pmu.events.spec import ProbeKind, ProbeSpec
from pmu.events.symbols import list_functions, points_into, resolve_probe
from pmu.trace.patchsafety import JumpTable, PatchPlan, PatchRefused, Refusal, check_jump_patch, jump_tables
from pmu.trace.relocate import build_slot, decode, jump, relocate

unicorn = pytest.importorskip("unicorn")
uc_x86 = pytest.importorskip("unicorn.x86_const")

LIBRARIES = {
    "libc": "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "libsqlite3": "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0",
    "python3": "/usr/bin/python3.11",
}
PIC_BASE = 0x7F3A_5000_0000
"""Where shared objects (and PIEs) are loaded; fixed executables load at their own addresses."""
PAGE = 0x1000
GIB = 1 << 30
STACK, STACK_SIZE = 0x7FFD_C000_0000, 0x10_0000
HEAP, HEAP_SIZE = 0x5600_0000_0000, 0x10_0000
TLS, TLS_SIZE = 0x7F11_0000_0000, 0x2_0000
FAR_SLOTS = 0x7E00_0000_0000
"""Slots more than 4 GiB from any library: relocation must use absolute jumps there."""
USER_END = 1 << 47
"""Pages are mapped on demand below this (user space); beyond it an access faults in both runs."""
STEP_LIMIT = 200
PAGE_LIMIT = 64
"""Pages mapped on demand per case: a `rep stos` with a random count must not map the address space."""
SEED = 20240611
MIN_OK = 1000
"""The acceptance bar: jump-patch sites that ran to completion and matched, over all libraries."""

GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *(f"r{i}" for i in range(8, 16))]
XMMS = [f"xmm{i}" for i in range(16)]
FLAGS_MASK = 0x8D5 | 0x400  # CF PF AF ZF SF OF, and DF
MASK64 = (1 << 64) - 1


def _reg(name: str) -> int:
    return int(getattr(uc_x86, f"UC_X86_REG_{name.upper()}"))


# Why relocate refuses an instruction (its message names it): the reasons the tests know.
RELOCATE_REASONS = {
    "an int3 already at the site": "int3",
    "int1 (icebp)": "int1",
    "raises #UD on purpose": "ud",
    "a transaction begun out of line": "xbegin",
    "EIP-relative addressing": "eip-relative",
    "a far call": "far-call",
    "an operand-size prefix on a branch": "opsize-branch",
    "it calls through rsp": "call-through-rsp",
    "out of rel32 reach": "rip-out-of-reach",
    "capstone cannot decode": "undecodable",
    "ends within instruction": "truncated",
    "its slot needs": "slot-too-big",
    "returns into them": "call-not-last",
    "branches into the middle of an instruction": "branch-mid-instruction",
}


def relocate_reason(err: RelocationError) -> str:
    """The named reason of one of relocate's refusals; AssertionError for an unknown one."""
    found = [name for text, name in RELOCATE_REASONS.items() if text in err.message]
    assert found, f"refused for a reason the tests do not name: {err.message}"
    return found[0]


# --- the corpus -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Function:
    name: str
    vaddr: int
    size: int
    code: bytes
    """The function's bytes, from the file."""


@dataclass(frozen=True)
class Segment:
    vaddr: int
    memsz: int
    data: bytes


@dataclass(frozen=True)
class Library:
    path: str
    base: int
    segments: tuple[Segment, ...]
    functions: tuple[Function, ...]
    entries: frozenset[int]
    """Every function symbol's address (other entry points must not be inside a patch)."""

    def read(self, address: int, size: int) -> bytes:
        """The file's bytes at a (loaded) address, for patchsafety to read jump tables."""
        vaddr = address - self.base
        for seg in self.segments:
            if seg.vaddr <= vaddr and vaddr + size <= seg.vaddr + len(seg.data):
                return seg.data[vaddr - seg.vaddr : vaddr - seg.vaddr + size]
        raise ValueError(f"{address:#x} is not in the file")

    @property
    def lo(self) -> int:
        return min(s.vaddr for s in self.segments) + self.base

    @property
    def hi(self) -> int:
        return max(s.vaddr + s.memsz for s in self.segments) + self.base


@cache
def load_library(path: str) -> Library:
    """The functions of `path` as `list_functions` and `resolve_probe` see them, one per address."""
    from elftools.elf.elffile import ELFFile

    sizes: dict[int, int] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        pic = elf["e_type"] == "ET_DYN"
        segments = tuple(
            Segment(seg["p_vaddr"], seg["p_memsz"], seg.data())
            for seg in elf.iter_segments()
            if seg["p_type"] == "PT_LOAD"
        )
        for section in elf.iter_sections():
            if section["sh_type"] not in ("SHT_SYMTAB", "SHT_DYNSYM"):
                continue
            for sym in section.iter_symbols():
                if sym["st_shndx"] != "SHN_UNDEF" and sym["st_info"]["type"] in ("STT_FUNC", "STT_LOOS"):
                    sizes[sym["st_value"]] = max(sizes.get(sym["st_value"], 0), sym["st_size"])
    with open(path, "rb") as f:
        data = f.read()
    functions: dict[int, Function] = {}
    for name in list_functions(path):
        try:
            probe = resolve_probe(ProbeSpec(ProbeKind.UPROBE, path, name, 0, None, name), path)
        except Exception:  # an ambiguous local name: its other aliases cover the address
            continue
        if probe.vaddr in functions:
            continue
        size = sizes.get(probe.vaddr, 0)
        code = data[probe.file_offset : probe.file_offset + max(size, 32)]
        functions[probe.vaddr] = Function(name, probe.vaddr, size, code)
    return Library(
        path=path,
        base=PIC_BASE if pic else 0,
        segments=segments,
        functions=tuple(functions[v] for v in sorted(functions)),
        entries=frozenset(sizes),
    )


# --- the machine ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """What a run starts from, besides memory."""

    gprs: tuple[int, ...]
    xmms: tuple[int, ...]
    eflags: int

    @staticmethod
    def random(rng: random.Random) -> State:
        gprs = []
        for name in GPRS:
            if name == "rsp":  # 8 mod 16, as at a function's entry, with room on both sides
                gprs.append(STACK + STACK_SIZE // 2 + rng.randrange(-0x400, 0x400) * 16 + 8)
                continue
            kind = rng.random()
            if kind < 0.5:  # a pointer into the heap
                gprs.append(HEAP + HEAP_SIZE // 4 + rng.randrange(HEAP_SIZE // 2) // 8 * 8)
            elif kind < 0.6:  # a pointer into the stack
                gprs.append(STACK + STACK_SIZE // 4 + rng.randrange(STACK_SIZE // 2))
            elif kind < 0.85:
                gprs.append(rng.choice([0, 1, 2, rng.randrange(256), rng.randrange(1 << 32), MASK64]))
            else:
                gprs.append(rng.getrandbits(64))
        xmms = tuple(rng.getrandbits(128) for _ in XMMS)
        eflags = 0x202 | (rng.getrandbits(12) & 0x8D5)
        return State(tuple(gprs), xmms, eflags)


@dataclass(frozen=True)
class Outcome:
    """How a run ended, and the state it left."""

    dest: int | None
    """Where control went when it left the code under test (None: it faulted or hit the step limit)."""
    fault: tuple[str, int] | None
    """(unicorn error, index of the faulting instruction of the run) when it faulted."""
    access: tuple[int, int] | None
    """(access type, address) of the unmapped access that ended it, if any."""
    gprs: tuple[int, ...]
    xmms: tuple[int, ...]
    eflags: int
    memory: dict[int, int]
    """Final value of every byte the run wrote."""
    initial: dict[int, int]
    """Value before the run of every byte it wrote."""
    steps: int


def _page_content(page: int) -> bytes:
    return hashlib.shake_128(page.to_bytes(8, "little") + SEED.to_bytes(8, "little")).digest(PAGE)


class Machine:
    """One unicorn x86-64 machine with a library loaded, reused for every case of that library."""

    def __init__(self, library: Library, rng: random.Random) -> None:
        self.uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self.library = library
        spans: list[list[int]] = []
        for seg in sorted(library.segments, key=lambda s: s.vaddr):
            lo = (library.base + seg.vaddr) & ~(PAGE - 1)
            hi = (library.base + seg.vaddr + seg.memsz + PAGE - 1) & ~(PAGE - 1)
            if spans and lo <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], hi)
            else:
                spans.append([lo, hi])
        for lo, hi in spans:
            self.uc.mem_map(lo, hi - lo)
        for seg in library.segments:
            self.uc.mem_write(library.base + seg.vaddr, seg.data)
        for lo, size in ((STACK, STACK_SIZE), (HEAP, HEAP_SIZE), (TLS, TLS_SIZE)):
            self.uc.mem_map(lo, size)
            self.uc.mem_write(lo, rng.randbytes(size))
        self.uc.reg_write(_reg("fs_base"), TLS + TLS_SIZE // 2)
        self.uc.reg_write(_reg("gs_base"), TLS + TLS_SIZE // 4)
        self.trampolines = self._map_trampolines()
        self.far_slots = FAR_SLOTS
        self.uc.mem_map(FAR_SLOTS, PAGE)
        self.on_demand: list[int] = []
        self.uc.hook_add(unicorn.UC_HOOK_CODE, self._on_code)
        self.uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, self._on_write)
        self.uc.hook_add(unicorn.UC_HOOK_MEM_UNMAPPED, self._on_unmapped)
        self._reset_run((0, 0), None)

    def _map_trampolines(self) -> list[int]:
        """Pages within ±2 GiB of every byte of the library (so RIP-relative operands stay in reach)."""
        lo, hi = self.library.lo, self.library.hi
        reach = 2 * GIB - (hi - lo) - 0x100_0000
        pages = []
        for distance in (0x10_0000, 0x400_0000, GIB, reach):
            for page in ((lo - distance) & ~(PAGE - 1), (hi + distance) & ~(PAGE - 1)):
                if page >= 0x10000:
                    self.uc.mem_map(page, PAGE)
                    pages.append(page)
        return pages

    # -- hooks --

    def _reset_run(self, bounds: tuple[int, int], entry: int | None) -> None:
        self.bounds = bounds
        self.reentry = entry
        self.steps = 0
        self.dest: int | None = None
        self.access: tuple[int, int] | None = None
        self.saved: dict[int, int] = {}

    def _on_code(self, uc: Any, address: int, size: int, _: Any) -> None:
        lo, hi = self.bounds
        if not lo <= address < hi or (address == self.reentry and self.steps):
            self.dest = address
            uc.emu_stop()
            return
        self.steps += 1
        if self.steps > STEP_LIMIT:
            uc.emu_stop()

    def _initial(self, address: int) -> int:
        try:
            return int(self.uc.mem_read(address, 1)[0])
        except unicorn.UcError:  # about to be mapped on demand
            page = address & ~(PAGE - 1)
            return _page_content(page)[address - page]

    def _on_write(self, uc: Any, access: int, address: int, size: int, value: int, _: Any) -> None:
        for a in range(address, address + size):
            if a not in self.saved:
                self.saved[a] = self._initial(a)

    def _on_unmapped(self, uc: Any, access: int, address: int, size: int, value: int, _: Any) -> bool:
        self.access = (access, address)
        if access == unicorn.UC_MEM_FETCH_UNMAPPED:
            self.dest = address
            return False
        if address + max(size, 1) > USER_END:
            return False  # non-canonical, or kernel space: a fault in both runs
        first, last = address & ~(PAGE - 1), (address + max(size, 1) - 1) & ~(PAGE - 1)
        for page in range(first, last + PAGE, PAGE):
            if any(lo <= page <= hi for lo, hi, _ in uc.mem_regions()):
                continue  # the access straddles a mapped page and this one
            if len(self.on_demand) >= PAGE_LIMIT:
                return False
            uc.mem_map(page, PAGE)
            uc.mem_write(page, _page_content(page))
            self.on_demand.append(page)
        self.access = None
        return True

    # -- runs --

    def run(self, state: State, start: int, bounds: tuple[int, int], reentry: int | None) -> Outcome:
        """Run from `start` until RIP leaves `bounds` (or comes back to `reentry`); restore what it wrote."""
        uc = self.uc
        for name, value in zip(GPRS, state.gprs, strict=True):
            uc.reg_write(_reg(name), value)
        for name, value in zip(XMMS, state.xmms, strict=True):
            uc.reg_write(_reg(name), value)
        uc.reg_write(_reg("eflags"), state.eflags)
        self._reset_run(bounds, reentry)
        error: str | None = None
        try:
            uc.emu_start(start, MASK64, count=STEP_LIMIT + 2)
        except unicorn.UcError as err:
            if not (err.errno == unicorn.UC_ERR_FETCH_UNMAPPED and self.dest is not None):
                error = str(err)
        rip = uc.reg_read(_reg("rip"))
        memory = {}
        for a, value in list(self.saved.items()):
            try:
                memory[a] = int(uc.mem_read(a, 1)[0])
            except unicorn.UcError:  # a write that faulted: the hook saw it, the memory never did
                del self.saved[a]
                continue
            uc.mem_write(a, bytes([value]))
        return Outcome(
            dest=self.dest if error is None else None,
            fault=(error, rip) if error is not None else None,
            access=self.access if error is not None else None,
            gprs=tuple(uc.reg_read(_reg(name)) for name in GPRS),
            xmms=tuple(uc.reg_read(_reg(name)) for name in XMMS),
            eflags=uc.reg_read(_reg("eflags")) & FLAGS_MASK,
            memory=memory,
            initial=dict(self.saved),
            steps=self.steps,
        )

    def forget_pages(self) -> None:
        for page in self.on_demand:
            self.uc.mem_unmap(page, PAGE)
        self.on_demand.clear()

    def write(self, address: int, code: bytes) -> bytes:
        """Write code (unicorn keeps translated blocks until told to drop them); returns the old bytes."""
        old = bytes(self.uc.mem_read(address, len(code)))
        self.uc.mem_write(address, code)
        self.uc.ctl_remove_cache(address, address + len(code))
        return old


# --- one differential case --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A run of original instructions and its relocated copy."""

    entry: int
    """Address of the first original instruction."""
    length: int
    """Bytes of original instructions."""
    boundaries: tuple[int, ...]
    """Offsets of the original instructions."""
    code: bytes
    """The relocated code followed by the jump back, placed at `at`."""
    at: int
    offsets: tuple[int, ...]
    """Offsets in `code` of the relocated copy of each original instruction."""
    patch: bytes
    """What a probe writes over the original instructions (jmp + int3 padding, or int3)."""


def relocated_offsets(code: bytes, entry: int, at: int, count: int) -> tuple[int, ...]:
    """Where relocate puts each instruction's copy: the length of the relocated first i instructions
    (a branch's encoding does not depend on whether its target is in the run, so the layout agrees)."""
    return (0, *(len(relocate(code, entry, at, i)[0]) for i in range(1, count)))


def make_case(
    fn_code: bytes, entry: int, plan_len: int, count: int, boundaries: tuple[int, ...], at: int
) -> Case:
    body, length = relocate(fn_code, entry, at, count)
    assert length == plan_len
    return Case(
        entry=entry,
        length=length,
        boundaries=boundaries,
        code=body + jump(at + len(body), entry + length),
        at=at,
        offsets=relocated_offsets(fn_code, entry, at, count),
        patch=jump(entry, at) + b"\xcc" * (length - 5) if length >= 5 else b"\xcc",
    )


def _index(offsets: tuple[int, ...], offset: int) -> int:
    return max(i for i, o in enumerate(offsets) if o <= offset)


def compare(machine: Machine, state: State, case: Case, start_index: int = 0) -> tuple[str, str]:
    """Run both and return (verdict, why): verdict "ran", "faulted", "unsupported" (all agree), or
    "mismatch"."""
    entry, end = case.entry, case.entry + case.length
    original = machine.run(state, entry + case.boundaries[start_index], (entry, end), entry)
    old = machine.write(entry, case.patch)
    machine.write(case.at, case.code)
    try:
        copy = machine.run(
            state, case.at + case.offsets[start_index], (case.at, case.at + len(case.code)), None
        )
    finally:
        machine.write(entry, old)
        machine.forget_pages()
    if original.fault is None and original.dest is None:
        return "unsupported", f"more than {STEP_LIMIT} steps"
    problems = []
    if original.fault is not None or copy.fault is not None:
        where: list[tuple[str, int | str, tuple[int, int] | None] | None] = []
        for outcome, base, offsets in ((original, entry, case.boundaries), (copy, case.at, case.offsets)):
            if outcome.fault is None:
                where.append(None)
            else:
                error, rip = outcome.fault
                inside = 0 <= rip - base < (case.length if base == entry else len(case.code))
                where.append((error, _index(offsets, rip - base) if inside else hex(rip), outcome.access))
        if where[0] != where[1]:
            problems.append(f"fault {where[0]} != {where[1]}")
    elif original.dest != copy.dest:
        problems.append(f"went to {original.dest:#x} != {copy.dest:#x}")
    for name, a, b in zip(GPRS, original.gprs, copy.gprs, strict=True):
        if a != b:
            problems.append(f"{name} {a:#x} != {b:#x}")
    for name, a, b in zip(XMMS, original.xmms, copy.xmms, strict=True):
        if a != b:
            problems.append(f"{name} {a:#x} != {b:#x}")
    if original.eflags != copy.eflags:
        problems.append(f"eflags {original.eflags:#x} != {copy.eflags:#x}")
    initial = {**copy.initial, **original.initial}
    for address in sorted(initial):
        a = original.memory.get(address, initial[address])
        b = copy.memory.get(address, initial[address])
        if a != b:
            problems.append(f"byte at {address:#x}: {a:#04x} != {b:#04x}")
            break
    if problems:
        return "mismatch", "; ".join(problems[:4])
    if original.fault is not None:
        unsupported = "UC_ERR_INSN_INVALID" in original.fault[0] or "UC_ERR_EXCEPTION" in original.fault[0]
        return ("unsupported" if unsupported else "faulted"), original.fault[0]
    return "ran", ""


# --- the corpus run ---------------------------------------------------------------------------------------


@dataclass
class Tally:
    jump: collections.Counter[str] = field(default_factory=collections.Counter)
    """Jump-patch sites: "ran", "faulted", "unsupported", "mismatch", or "refused:REASON"."""
    int3: collections.Counter[str] = field(default_factory=collections.Counter)
    """int3 slots within ±2 GiB of the code, the same way."""
    int3_far: collections.Counter[str] = field(default_factory=collections.Counter)
    """int3 slots more than 4 GiB away (absolute jumps; RIP-relative operands are out of reach)."""
    resume: collections.Counter[str] = field(default_factory=collections.Counter)
    """Threads moved from inside the displaced instructions to the trampoline."""
    mismatches: list[str] = field(default_factory=list)

    def record(self, counter: collections.Counter[str], verdict: str, why: str, what: str) -> None:
        counter[verdict] += 1
        if verdict == "mismatch":
            self.mismatches.append(f"{what}: {why}")


def _seed(*parts: object) -> random.Random:
    return random.Random(":".join(map(str, (SEED, *parts))))


def run_corpus(label: str, library: Library) -> Tally:
    tally = Tally()
    machine = Machine(library, _seed(label, "machine"))
    base = library.base
    entries = {base + e for e in library.entries}
    for fn in library.functions:
        rng = _seed(label, fn.vaddr)
        entry = base + fn.vaddr
        state = State.random(rng)

        # The jump patch.
        tramp = rng.choice(machine.trampolines) + rng.randrange(PAGE - 256)
        try:
            plan: PatchPlan | None = check_jump_patch(
                fn.code,
                entry,
                fn.size,
                entry,
                trampoline=tramp,
                known_entries=entries,
                read=library.read,
                pointed=lambda lo, hi: points_into(library.path, lo - base, hi - base),
            )
        except PatchRefused as err:
            plan = None
            reason = err.refusal.name
            if err.refusal is Refusal.UNRELOCATABLE:
                reason += ":" + relocate_reason(err)
            tally.jump[f"refused:{reason}"] += 1
        if plan is not None:
            assert plan.site == entry and plan.length >= 5 and plan.boundaries[0] == 0
            case = make_case(fn.code, entry, plan.length, plan.count, plan.boundaries, tramp)
            verdict, why = compare(machine, state, case)
            tally.record(tally.jump, verdict, why, f"{label} {fn.name} (jump patch)")
            if plan.count > 1:  # a thread stopped inside the displaced instructions, moved to the copy
                i = rng.randrange(1, plan.count)
                verdict, why = compare(machine, state, case, start_index=i)
                tally.record(tally.resume, verdict, why, f"{label} {fn.name} (resumed at instruction {i})")

        # The int3 path: the first instruction alone, in a slot near the code or far from it.
        far = rng.random() < 0.25
        slot = (machine.far_slots if far else rng.choice(machine.trampolines)) + rng.randrange(PAGE - 256)
        try:
            slot_code, length = build_slot(fn.code, entry, slot)
        except RelocationError as err:
            reason = relocate_reason(err)
            assert far or reason != "rip-out-of-reach", err.message
            (tally.int3_far if far else tally.int3)[f"refused:{reason}"] += 1
            continue
        case = Case(entry, length, (0,), slot_code, slot, (0,), b"\xcc")
        verdict, why = compare(machine, state, case)
        tally.record(
            tally.int3_far if far else tally.int3,
            verdict,
            why,
            f"{label} {fn.name} ({'far' if far else 'near'} int3 slot)",
        )
    return tally


@cache
def corpus(label: str) -> Tally:
    return run_corpus(label, load_library(LIBRARIES[label]))


def _present() -> Iterator[Any]:
    for label, path in LIBRARIES.items():
        yield pytest.param(
            label, marks=pytest.mark.skipif(not os.path.exists(path), reason=f"{path} is missing"), id=label
        )


def _table(label: str, tally: Tally) -> str:
    def fmt(counter: collections.Counter[str]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))

    return (
        f"{label}: {len(load_library(LIBRARIES[label]).functions)} functions\n"
        f"  jump patch: {fmt(tally.jump)}\n"
        f"  resume inside: {fmt(tally.resume)}\n"
        f"  int3 slot: {fmt(tally.int3)}\n"
        f"  far int3 slot: {fmt(tally.int3_far)}"
    )


@pytest.mark.parametrize("label", list(_present()))
def test_relocated_prologues_behave_as_the_originals(label: str, capsys: pytest.CaptureFixture[str]) -> None:
    tally = corpus(label)
    with capsys.disabled():
        print("\n" + _table(label, tally))
    assert not tally.mismatches, "\n".join(tally.mismatches[:20])
    known = {f"refused:{r.name}" for r in Refusal} | {"ran", "faulted", "unsupported"}
    unknown = {k for k in tally.jump if k not in known and not k.startswith("refused:UNRELOCATABLE:")}
    assert not unknown, f"jump-patch sites refused for reasons the tests do not name: {unknown}"
    assert tally.jump["ran"] > 0 and tally.int3["ran"] > 0 and tally.int3_far["ran"] > 0
    assert "refused:rip-out-of-reach" not in tally.int3


def test_corpus_passes_a_thousand_prologues() -> None:
    present = [label for label, path in LIBRARIES.items() if os.path.exists(path)]
    if not present:
        pytest.skip("none of the corpus libraries is installed")
    ran = sum(corpus(label).jump["ran"] for label in present)
    assert ran >= MIN_OK, f"only {ran} jump-patch sites ran and matched"


# --- jump tables: where the jump goes is where the table says ---------------------------------------------


def _family(register: str) -> str | None:
    """The 64-bit register a register name is part of ("edi" -> "rdi", "r9b" -> "r9"), None if not one."""
    if m := re.fullmatch(r"(r(?:[89]|1[0-5]))[dwb]?", register):
        return m.group(1)
    if m := re.fullmatch(r"[re]?([abcd])[xlh]", register):
        return f"r{m.group(1)}x"
    if m := re.fullmatch(r"[re]?(si|di|bp|sp)l?", register):
        return f"r{m.group(1)}"
    return None


def check_table(machine: Machine, table: JumpTable, rng: random.Random) -> collections.Counter[str]:
    """Run the recognized sequence with index values in and out of the table's bounds: the jump must go to
    the entry the index selects (or, out of bounds, to the compare's branch), never anywhere else."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs

    seen: collections.Counter[str] = collections.Counter()
    code = bytes(machine.uc.mem_read(table.start, table.jump - table.start + 16))
    insns = list(Cs(CS_ARCH_X86, CS_MODE_64).disasm_lite(code, table.start))
    end = next(a + size for a, size, _, _ in insns if a == table.jump)
    branches = {
        int(op, 0) for a, _, m, op in insns if a < table.jump and m.startswith("j") and op[:1].isdigit()
    }
    register = _family(table.index)
    exact = register is not None and insns[0][2] == "cmp"
    n = len(table.targets)
    values = [*range(min(n, 24)), *(rng.randrange(n) for _ in range(4)), n, n + 1, 0xFFFF_FFFF]
    for value in values if register is not None else range(6):
        state = State.random(rng)
        if register is not None:
            gprs = list(state.gprs)
            gprs[GPRS.index(register)] = value
            state = State(tuple(gprs), state.xmms, state.eflags)
        outcome = machine.run(state, table.start, (table.start, end), None)
        machine.forget_pages()
        if outcome.dest is None:
            seen["faulted"] += 1
        elif exact and value < n:
            assert outcome.dest == table.targets[value], (hex(table.jump), value)
            seen["entry"] += 1
        elif outcome.dest in branches:
            seen["bound"] += 1
        else:
            assert outcome.dest in table.targets, (hex(table.jump), value, hex(outcome.dest))
            seen["entry"] += 1
    return seen


@pytest.mark.parametrize("label", list(_present()))
def test_jump_tables_send_the_jump_where_the_table_says(
    label: str, capsys: pytest.CaptureFixture[str]
) -> None:
    library = load_library(LIBRARIES[label])
    machine = Machine(library, _seed(label, "tables"))
    rng = _seed(label, "tables")
    seen: collections.Counter[str] = collections.Counter()
    for fn in library.functions:
        if not fn.size:
            continue
        for table in jump_tables(fn.code, library.base + fn.vaddr, fn.size, library.read):
            seen["tables"] += 1
            seen += check_table(machine, table, rng)
    with capsys.disabled():
        print(f"\n{label} jump tables: " + ", ".join(f"{k} {v}" for k, v in sorted(seen.items())))
    assert seen["tables"] > 0 and seen["entry"] > seen["tables"]


# --- the harness itself, and the far trampoline -----------------------------------------------------------


def _rip_relative_site(library: Library) -> tuple[Function, PatchPlan]:
    """A patchable function whose displaced instructions include a RIP-relative operand."""
    for fn in library.functions:
        entry = library.base + fn.vaddr
        try:
            plan = check_jump_patch(fn.code, entry, fn.size, entry)
        except PatchRefused:
            continue
        if any("rip" in insn.op_str for insn in plan.insns):
            return fn, plan
    pytest.skip("no patchable prologue with a RIP-relative operand")


def _first_library() -> Library:
    for path in LIBRARIES.values():
        if os.path.exists(path):
            return load_library(path)
    pytest.skip("none of the corpus libraries is installed")


def test_rip_relative_operand_out_of_reach_of_a_far_trampoline_is_refused() -> None:
    library = _first_library()
    fn, plan = _rip_relative_site(library)
    entry = library.base + fn.vaddr
    [target] = [
        insn.address + insn.size + int(insn.op_str.split("rip ")[1].split("]")[0].replace(" ", ""), 16)
        for insn in plan.insns
        if "rip" in insn.op_str
    ][:1]
    # Within reach of the site (the patch's jmp rel32 gets there) but not of the operand's target.
    edge = entry + 5 + (-(2 * GIB) + 0x40 if target > entry else 2 * GIB - 0x40)
    assert -(2 * GIB) <= edge - (entry + 5) < 2 * GIB
    with pytest.raises(
        PatchRefused, match=r"\(out-of-reach\).*reads 0x[0-9a-f]+, out of rel32 reach"
    ) as info:
        check_jump_patch(fn.code, entry, fn.size, entry, trampoline=edge)
    assert info.value.refusal is Refusal.OUT_OF_REACH
    with pytest.raises(RelocationError, match="out of rel32 reach"):
        relocate(fn.code, entry, edge, plan.count)
    # Past reach of the site itself.
    for far in (entry + 3 * GIB, entry - 3 * GIB):
        with pytest.raises(PatchRefused, match=r"\(out-of-reach\)") as info:
            check_jump_patch(fn.code, entry, fn.size, entry, trampoline=far)
        assert info.value.refusal is Refusal.OUT_OF_REACH
    # And the same site is accepted with a trampoline in reach of both.
    check_jump_patch(fn.code, entry, fn.size, entry, trampoline=entry + 0x100_0000)


def _sabotaged(case: Case, code: bytes) -> Case:
    return Case(case.entry, case.length, case.boundaries, code, case.at, case.offsets, case.patch)


def test_the_harness_catches_a_wrong_relocation() -> None:
    """Copying the bytes without fixing the RIP-relative displacement, or pushing a wrong return address,
    must not go unnoticed."""
    library = _first_library()
    machine = Machine(library, _seed("sabotage"))
    fn, plan = _rip_relative_site(library)
    entry = library.base + fn.vaddr
    tramp = machine.trampolines[0] + 0x100
    case = make_case(fn.code, entry, plan.length, plan.count, plan.boundaries, tramp)
    state = State.random(_seed("sabotage", 1))
    assert compare(machine, state, case)[0] == "ran"
    raw = fn.code[: plan.length] + jump(tramp + plan.length, entry + plan.length)
    verdicts = {
        compare(machine, State.random(_seed("sabotage", i)), _sabotaged(case, raw))[0] for i in range(8)
    }
    assert verdicts == {"mismatch"}

    # A call whose copy pushes the address of the copy instead of the true return address.
    call = bytes.fromhex("e8") + (0x40 - 5).to_bytes(4, "little", signed=True)
    site = library.lo + 0x10_0000  # any bytes of the mapped library will do as the callee
    saved = machine.write(site, call)
    try:
        body, _ = relocate(call, site, tramp, 1)
        good = Case(site, 5, (0,), body + jump(tramp + len(body), site + 5), tramp, (0,), b"\xcc" * 5)
        assert compare(machine, state, good) == ("ran", "")
        bad = _sabotaged(good, b"\xe8" + (site + 0x40 - (tramp + 5)).to_bytes(4, "little", signed=True))
        verdict, why = compare(machine, state, bad)
        assert verdict == "mismatch" and "byte at" in why
    finally:
        machine.write(site, saved)


def test_relocated_offsets_match_a_hand_made_layout() -> None:
    """The test's own mapping of instructions to their copies."""
    # test rdi, rdi (3 bytes, copied); je +1 (rel8 -> jcc rel32, 6 bytes); nop
    code = bytes.fromhex("4885ff740190")
    assert relocated_offsets(code, 0x1000, 0x7000_0000, 3) == (0, 3, 9)


# --- instructions prologues rarely show, and relocate's known bugs ----------------------------------------

ZOO = [
    # loops and jrcxz (rel8 only: a short branch over an absolute jump), with the 0x67 ecx forms
    "e2f0", "e1f0", "e0f0", "e3f0", "67e3f0", "67e2f0",
    # every jcc, rel8 and rel32
    *(f"{0x70 + cc:02x}30" for cc in range(16)),
    *(f"0f{0x80 + cc:02x}00010000" for cc in range(16)),
    "eb30", "e900100000", "e8f0ffffff",  # jmp rel8, jmp rel32, call rel32 backwards
    # indirect calls: through registers, memory, the stack (the return address is pushed first)
    "ffd0", "41ffd3", "ff13", "ff1424", "ff542408", "ff942400010000", "ff54cc08", "ff1510000000",
    # RIP-relative operands: loads, stores, an immediate after the displacement, SSE, a jump through memory
    "488b0510000000", "488d3df0ffffff", "803d1000000005", "48c705100000002a000000", "f20f100510000000",
    "66813d00100000ffff", "ff2510000000", "c6057fffffff01",
    # no relocation needed
    "55", "415f", "c3", "c20800", "ff2424", "ffe0", "4889e5", "f30f1efa",
]  # fmt: skip


def _zoo_state(rng: random.Random) -> State:
    """Random registers, but pointers where an indirect call reads memory (so it does not fault: see
    test_faulting_indirect_call_leaves_the_stack_alone)."""
    state = State.random(rng)
    gprs = list(state.gprs)
    for name in ("rax", "rbx", "r11"):
        gprs[GPRS.index(name)] = HEAP + HEAP_SIZE // 4 + rng.randrange(HEAP_SIZE // 2) // 8 * 8
    gprs[GPRS.index("rcx")] = rng.randrange(4)  # an index into the stack; loop and jrcxz both ways
    return State(tuple(gprs), state.xmms, state.eflags)


def _zoo_run(hexcode: str, far: bool, state_of: Callable[[random.Random], State]) -> list[tuple[str, str]]:
    library = _first_library()
    machine = _zoo_machine(library)
    code = bytes.fromhex(hexcode)
    site = library.lo + 0x2_0000
    slot = (machine.far_slots if far else machine.trampolines[0]) + 0x123
    saved = machine.write(site, code)
    try:
        slot_code, length = build_slot(code + b"\x90" * 16, site, slot)
        assert length == len(code)
        case = Case(site, length, (0,), slot_code, slot, (0,), b"\xcc")
        return [compare(machine, state_of(_seed(hexcode, far, i)), case) for i in range(6)]
    finally:
        machine.write(site, saved)


@cache
def _zoo_machine(library: Library) -> Machine:
    return Machine(library, _seed("zoo"))


@pytest.mark.parametrize("far", [False, True], ids=["near", "far"])
@pytest.mark.parametrize("hexcode", ZOO)
def test_instruction_zoo_behaves_as_the_original(hexcode: str, far: bool) -> None:
    if far and "rip" in " ".join(i.op_str for i in decode(bytes.fromhex(hexcode), 0x1000)):
        with pytest.raises(RelocationError, match="out of rel32 reach"):
            _zoo_run(hexcode, far, _zoo_state)
        return
    results = _zoo_run(hexcode, far, _zoo_state)
    assert all(verdict == "ran" for verdict, _ in results), results


@pytest.mark.parametrize("hexcode", ["ff5424f8", "ff5424fc", "ff5424f4"])  # call [rsp-8], [rsp-4], [rsp-12]
def test_call_through_the_slot_below_rsp(hexcode: str) -> None:
    """`call [rsp+d]` with -16 < d < 0 reads the slot the copy's push of the return address takes:
    refused (it once relocated into a jump to its own return address)."""
    code = bytes.fromhex(hexcode) + b"\x90" * 16
    with pytest.raises(RelocationError, match="overlaps the stack slot"):
        relocate(code, 0x400000, 0x401000)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="relocate divergence: an indirect call whose memory operand faults has, in the copy, already "
    "pushed the return address (rsp is 8 lower, a stack slot written) when the fault is taken",
)
def test_faulting_indirect_call_leaves_the_stack_alone() -> None:
    def bad_pointer(rng: random.Random) -> State:
        state = State.random(rng)
        gprs = list(state.gprs)
        gprs[GPRS.index("rbx")] = 0xFFFF_8000_0000_0000  # kernel space: the read faults in both runs
        return State(tuple(gprs), state.xmms, state.eflags)

    results = _zoo_run("ff13", False, bad_pointer)  # call [rbx]
    assert all(verdict == "faulted" for verdict, _ in results), results
