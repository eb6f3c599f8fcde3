"""Jump-optimized probes: the counter area's layout and the counting trampoline, hand-encoded x86-64.

A probed function's first instructions (at least 5 bytes, whole instructions) are replaced by a
`jmp rel32` to a trampoline mapped within ±2 GiB. The trampoline counts the hit in a counter area inside
the traced process (no stop, no syscall), runs the relocated displaced instructions and jumps back.
Counts are kept per thread: a thread is known by its FS base (`rdfsbase`), which it claims a row for
with `lock cmpxchg` the first time it hits; pmu maps FS bases to TIDs. The templates below are the one
place the machine code is written; tests disassemble what they produce and run it under unicorn.

Two forms. Where the CPU has BMI2 (`fast_path`), a counting trampoline's fast path touches no flag, so
it needs no pushfq/popfq (about 8 ns a hit on AMD Zen 4): a thread whose row is the one its FS base
hashes to (the common case) counts with lea/mov, branches with jrcxz and hashes with rorx/shlx/shrx;
everything else (the first hit's claim, a taken row, no TLS, a locked site) goes to a slow path after the
trampoline's jump back, which saves the flags and runs the classic search. The classic form (flags
saved, one path) serves recording trampolines and CPUs without BMI2.

Counter area (one per address space: a memfd mapped shared by the tracee and by pmu):

    0x0000  enabled  u8[NSITES]          a site counts only while its byte is non-zero (ON, or
                                          ON_LOCKED: fast paths go to their slow path)
    0x0040  miss     u64[NSITES]          hits from threads that found no free row (lock inc)
    0x0800  pid      u32                  the process the area belongs to (forked children get their own
                                          area at the same address), for the `pid` of ring records
    0x1000  keys     u64[NSLOTS]          FS base owning each row (0 = free); claimed by the trampoline;
                                          row 0 is RESERVED
    0x3000  rows     u64[NSLOTS][NSITES]  per-thread hit counts, one 512-byte row per thread

Recording (pmu record): after counting, the trampoline of a site that records appends one record per hit
to a ring mapped shared into the process (pmu/ring.py: the layout and the CAS protocol, followed step by
step): time = raw TSC (`rdtsc`, read before reserving), thread = FS base (`rdfsbase`), pid from the counter
area, the event index and probed address baked in, the first N argument registers as they were at the
probe (read back from where the prologue saved them), retval 0, latency -1, flags 0. A full ring counts
the hit lost (lost_total and lost[event]) and the program goes on: producers never wait. With a period
(perf's -c), only hits whose per-thread count at the site is a multiple of it are recorded.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass

NSITES = 64
"""Probe sites (columns) one address space can have optimized."""
NSLOTS = 1024
"""Threads (rows) that can count at once; a power of two. A thread that finds no free row counts in
the site's miss counter: totals stay exact, only per-thread attribution is lost."""
ENABLED = 0x0000
MISS = 0x0040
PID = 0x0800
KEYS = 0x1000
ROWS = KEYS + 8 * NSLOTS
ROW_SHIFT = 9  # log2(NSITES * 8)
AREA_BYTES = ROWS + NSLOTS * NSITES * 8
RED_ZONE = 128


def _u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def _i8(v: int) -> bytes:
    if not -128 <= v <= 127:
        raise ValueError(f"short jump out of range: {v}")
    return struct.pack("<b", v)


@dataclass(frozen=True)
class Trampoline:
    """A generated trampoline: its bytes, and where the relocated displaced instructions start."""

    code: bytes
    body: int
    """Offset of the relocated displaced instructions (a thread moved off the patched bytes goes there)."""
    lock: int = 0
    """Offset of the byte before the row increment: a nop, or a lock prefix (see LOCK)."""


NOP, LOCK = 0x90, 0xF0
"""The byte before the per-thread row's `inc`. Rows are per thread, so the increment needs no lock,
until two live threads share an FS base (a clone without CLONE_SETTLS, an arch_prctl to another
thread's TLS): they then share a row, and pmu turns the nop into a lock prefix in every trampoline of
that address space (one byte at an instruction boundary, every thread stopped)."""


@dataclass(frozen=True)
class RecordSpec:
    """What a recording trampoline writes besides counting: where the ring is and the record's constants."""

    ring: int
    """Address of the ring's header in the traced process."""
    event: int
    """Event index of the records (ring.py: < the ring's nevents)."""
    ip: int
    """The probed address."""
    nargs: int = 0
    """Argument registers to record (rdi, rsi, rdx, rcx, r8, r9 in that order); the rest are 0."""
    period: int = 1
    """Record a hit only when the thread's count at this site is a multiple of it (perf's -c)."""


# Where the prologue of a recording trampoline saved each argument register, from RSP after its pushes
# (pushfq, rax, rcx, rdx, r8, r9, rdi, r10): None for rsi, which the trampoline never changes.
_ARG_SAVED: tuple[int | None, ...] = (8, None, 32, 40, 24, 16)

_Insn = tuple[str, bytes, str | None]
"""(label, bytes, branch target label or None): a branch's bytes are its short opcode (0x7X or 0xEB)."""


def _assemble(prog: list[_Insn]) -> bytes:
    """Lay out `prog`, giving each branch a rel8 where it reaches and a rel32 where it does not."""
    return _assemble_labels(prog)[0]


def _assemble_labels(prog: list[_Insn]) -> tuple[bytes, dict[str, int]]:
    """`_assemble`, also returning each label's offset. A `jrcxz` (0xE3) has no rel32 form: it must
    reach its target with a rel8."""
    wide: set[int] = set()
    while True:
        offsets: dict[str, int] = {}
        ends: list[int] = []
        pos = 0
        for n, (label, code, target) in enumerate(prog):
            if label:
                offsets[label] = pos
            if target is None:
                pos += len(code)
            elif n in wide:
                pos += 5 if code == b"\xeb" else 6
            else:
                pos += 2
            ends.append(pos)
        far = {
            n
            for n, (_, _, target) in enumerate(prog)
            if target is not None and n not in wide and not -128 <= offsets[target] - ends[n] <= 127
        }
        if not far:
            break
        if any(prog[n][1] == JRCXZ for n in far):
            raise ValueError("a jrcxz does not reach its target")
        wide |= far
    out = bytearray()
    for n, (_label, code, target) in enumerate(prog):
        if target is None:
            out += code
            continue
        rel = offsets[target] - ends[n]
        if n not in wide:
            out += code + _i8(rel)
        elif code == b"\xeb":
            out += b"\xe9" + struct.pack("<i", rel)
        else:
            out += bytes([0x0F, code[0] + 0x10]) + struct.pack("<i", rel)
    return bytes(out), offsets


def _row_inc(site: int) -> bytes:
    return b"\x48\xff\x84\x0a" + _u32(ROWS + 8 * site)  # inc qword [rdx+rcx+ROWS+8*site]


def lock_offset(code: bytes, site: int) -> int:
    """Offset in a counting trampoline's `code` of the nop-or-lock byte before its row increment."""
    at = code.find(bytes([NOP]) + _row_inc(site))
    if at < 0:
        at = code.find(bytes([LOCK]) + _row_inc(site))
    assert at >= 0, "no row increment"
    return at


JRCXZ = b"\xe3"
"""jrcxz rel8: a branch on rcx == 0 that neither reads nor writes the flags."""
ON, ON_LOCKED, ON_TCB = 1, 2, 3
"""A site's enabled byte: 0 off, ON, or ON_LOCKED once two live threads share an FS base (a clone
without CLONE_SETTLS): the flag-free fast path then leaves every hit to its slow path, whose row
increment is locked."""
RESERVED = 1
"""Row 0's key, set when an area is made (no FS base is 1): a thread with no TLS yet (FS base 0), which
hashes to row 0, never finds it its own, so the fast path needs no test for it. Threads whose FS base
hashes to row 0 count in another row, through the slow path."""
SLOW_PATH_BYTES = 160
"""Room a fast trampoline's slow path takes after its jump back (checked in `build`)."""


@functools.cache
def fast_path() -> bool:
    """Whether counting trampolines take the flag-free fast path: it needs BMI2 (rorx, shlx, shrx shift
    without touching the flags), which pmu's own CPU says it has (the tracee runs on the same machine).
    pushfq/popfq cost tens of cycles on some CPUs (AMD Zen: ~10 ns a hit with them, ~2 without)."""
    if os.environ.get("PMU_NO_FAST_TRAMPOLINE"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "bmi2" in line.split()
    except OSError:
        pass
    return False


def _is_fast(record: RecordSpec | None) -> bool:
    return record is None and fast_path()


def _fast_head(area: int, site: int) -> list[_Insn]:
    """A counting trampoline's flag-free fast path: the thread's row is the one its FS base hashes to,
    found at once (the common case: threads hash apart), and incremented with mov/lea/mov (a row is one
    thread's). Anything else (site locked, no TLS yet, the row another's or free) goes to the slow path,
    which saves the flags and does the full search (`_slow_path`). No instruction here reads or writes
    the flags: lea for arithmetic, jrcxz for branches, BMI2 for shifts."""
    row = ROWS + 8 * site
    return [
        ("", b"\x48\x8d\x64\x24\x80", None),  # lea rsp, [rsp-0x80]     step over the red zone
        ("", b"\x50", None),  # push rax
        ("", b"\x51", None),  # push rcx
        ("", b"\x52", None),  # push rdx
        ("", b"\x41\x50", None),  # push r8
        ("", b"\x48\xba" + struct.pack("<Q", area), None),  # movabs rdx, AREA
        ("", b"\x0f\xb6\x8a" + _u32(ENABLED + site), None),  # movzx ecx, byte [rdx+ENABLED+site]
        ("", JRCXZ, "done"),  # jrcxz done                off: count nothing
        ("", b"\x8d\x49" + _i8(-ON_LOCKED), None),  # lea ecx, [rcx-ON_LOCKED]
        ("", JRCXZ, "to_slow"),  # jrcxz to_slow             locked: the slow path's lock inc
        ("", b"\x8d\x49" + _i8(ON_LOCKED - ON), None),  # lea ecx, [rcx+ON_LOCKED-ON]
        ("", JRCXZ, "rdfs"),  # jrcxz rdfs                ON: the FS base from rdfsbase
        ("", b"\x64\x48\x8b\x04\x25" + _u32(0), None),  # mov rax, fs:[0]   ON_TCB: the TCB's self
        # No TLS yet (rax 0) hashes to row 0, whose key is RESERVED: not found, so the slow path's miss.
        ("have", b"\xc4\x63\xfb\xf0\xc0\x0c", None),  # rorx r8, rax, 12
        ("", b"\xb9" + _u32(64 - NSLOTS.bit_length() + 1), None),  # mov ecx, 64 - log2(NSLOTS)
        ("", b"\xc4\x42\xf1\xf7\xc0", None),  # shlx r8, r8, rcx
        ("", b"\xc4\x42\xf3\xf7\xc0", None),  # shrx r8, r8, rcx     r8 = (fs >> 12) & (NSLOTS-1)
        ("", b"\x4a\x8b\x8c\xc2" + _u32(KEYS), None),  # mov rcx, [rdx+r8*8+KEYS]   the row's owner
        ("", b"\x48\xf7\xd1", None),  # not rcx
        ("", b"\x48\x8d\x4c\x01\x01", None),  # lea rcx, [rcx+rax+1]     fs - owner
        ("", JRCXZ, "found"),  # jrcxz found               ours
        ("to_slow", b"\xe9" + _u32(0), None),  # jmp slow (rel32, set by build)
        ("rdfs", b"\xf3\x48\x0f\xae\xc0", None),  # rdfsbase rax              this thread's identity
        ("", b"\xeb", "have"),  # jmp have
        ("found", b"\xb9" + _u32(ROW_SHIFT), None),  # mov ecx, ROW_SHIFT
        ("", b"\xc4\x42\xf1\xf7\xc0", None),  # shlx r8, r8, rcx          the row's offset
        ("", b"\x4a\x8b\x8c\x02" + _u32(row), None),  # mov rcx, [rdx+r8+ROWS+8*site]
        ("", b"\x48\x8d\x49\x01", None),  # lea rcx, [rcx+1]
        ("", b"\x4a\x89\x8c\x02" + _u32(row), None),  # mov [rdx+r8+ROWS+8*site], rcx
        ("done", b"\x41\x58", None),  # pop r8
        ("", b"\x5a", None),  # pop rdx
        ("", b"\x59", None),  # pop rcx
        ("", b"\x58", None),  # pop rax
        ("", b"\x48\x8d\xa4\x24\x80\x00\x00\x00", None),  # lea rsp, [rsp+0x80]
    ]


def _slow_path(site: int) -> bytes:
    """The fast path's slow path, placed after the trampoline's jump back: entered with rax, rcx, rdx,
    r8 saved and rdx = the counter area, it saves the flags and r9, searches (or claims) the thread's
    row as the classic trampoline does, increments it with a lock, and jumps back to the fast path's
    `done` (a jmp rel32 at its end, set by `build`)."""
    code = _assemble(
        [
            ("", b"\x9c", None),  # pushfq
            ("", b"\x41\x51", None),  # push r9
            *_search(site, LOCK),
            ("done", b"\x41\x59", None),  # pop r9
            ("", b"\x9d", None),  # popfq
        ]
    )
    return code + b"\xe9" + _u32(0)


def counting_trampoline(
    area: int, site: int, record: RecordSpec | None = None, locked: bool = False
) -> bytes:
    """The counting (and, with `record`, recording) prologue for column `site` of the counter area at
    `area` (registers, and flags unless it is the flag-free fast path, saved; red zone stepped over); the
    caller appends the relocated instructions and the jump back (`build`)."""
    if not 0 <= site < NSITES:
        raise ValueError(f"site column {site} out of range")
    if _is_fast(record):
        return _assemble(_fast_head(area, site))
    if record is not None and not 0 <= record.nargs <= len(_ARG_SAVED):
        raise ValueError(f"at most {len(_ARG_SAVED)} argument registers, not {record.nargs}")
    if record is not None and not 1 <= record.period < 1 << 32:
        raise ValueError(f"period {record.period} out of range")
    saves: list[_Insn] = [
        ("", b"\x48\x8d\x64\x24\x80", None),  # lea rsp, [rsp-0x80]     step over the red zone
        ("", b"\x9c", None),  # pushfq
        ("", b"\x50", None),  # push rax
        ("", b"\x51", None),  # push rcx
        ("", b"\x52", None),  # push rdx
        ("", b"\x41\x50", None),  # push r8
        ("", b"\x41\x51", None),  # push r9
    ]
    restores: list[_Insn] = [
        ("done", b"\x41\x59", None),  # pop r9
        ("", b"\x41\x58", None),  # pop r8
        ("", b"\x5a", None),  # pop rdx
        ("", b"\x59", None),  # pop rcx
        ("", b"\x58", None),  # pop rax
        ("", b"\x9d", None),  # popfq
        ("", b"\x48\x8d\xa4\x24\x80\x00\x00\x00", None),  # lea rsp, [rsp+0x80]
    ]
    if record is not None:
        saves += [
            ("", b"\x57", None),  # push rdi
            ("", b"\x41\x52", None),  # push r10
        ]
        restores = [
            ("done", b"\x41\x5a", None),  # pop r10
            ("", b"\x5f", None),  # pop rdi
            ("", *restores[0][1:]),
            *restores[1:],
        ]
    count: list[_Insn] = [
        ("", b"\x48\xba" + struct.pack("<Q", area), None),  # movabs rdx, AREA
        ("", b"\x80\xba" + _u32(ENABLED + site) + b"\x00", None),  # cmp byte [rdx+ENABLED+site], 0
        ("", b"\x74", "done"),  # je done                   disabled: count nothing
    ]
    sampled = record is not None and record.period > 1
    count += _search(site, LOCK if locked else NOP, record is not None, sampled)
    return _assemble(saves + count + (_recording(record) if record else []) + restores)


def _search(site: int, prefix: int, record: bool = False, sampled: bool = False) -> list[_Insn]:
    """Find (or claim) the row of the thread whose FS base rdfsbase gives, rdx = the counter area, and
    count the hit in it (after the `prefix` byte: NOP or LOCK) or, with no TLS or no free row, in the
    site's miss counter; then on to `done` (or `record`). Uses rax, rcx, r8, r9 and the flags. `sampled`:
    rax ends up holding the count the period applies to."""
    count: list[_Insn] = [
        ("", b"\xf3\x48\x0f\xae\xc0", None),  # rdfsbase rax              this thread's identity
        ("", b"\x48\x85\xc0", None),  # test rax, rax
        ("", b"\x74", "miss"),  # je miss                   no TLS yet (early start-up)
        ("", b"\x48\x89\xc1", None),  # mov rcx, rax
        ("", b"\x48\xc1\xe9\x0c", None),  # shr rcx, 12
        ("", b"\x81\xe1" + _u32(NSLOTS - 1), None),  # and ecx, NSLOTS-1         first row to try
        ("", b"\x41\xb8" + _u32(NSLOTS), None),  # mov r8d, NSLOTS           rows left to try
        ("loop", b"\x48\x39\x84\xca" + _u32(KEYS), None),  # cmp [rdx+rcx*8+KEYS], rax
        ("", b"\x74", "found"),  # je found                  our row
        ("", b"\x48\x83\xbc\xca" + _u32(KEYS) + b"\x00", None),  # cmp qword [rdx+rcx*8+KEYS], 0
        ("", b"\x75", "next"),  # jne next                  someone else's row
        ("", b"\x49\x89\xc1", None),  # mov r9, rax
        ("", b"\x31\xc0", None),  # xor eax, eax
        ("", b"\xf0\x4c\x0f\xb1\x8c\xca" + _u32(KEYS), None),  # lock cmpxchg [rdx+rcx*8+KEYS], r9
        ("", b"\x4c\x89\xc8", None),  # mov rax, r9
        ("", b"\x74", "found"),  # je found                  claimed a free row
        ("next", b"\xff\xc1", None),  # inc ecx
        ("", b"\x81\xe1" + _u32(NSLOTS - 1), None),  # and ecx, NSLOTS-1
        ("", b"\x41\xff\xc8", None),  # dec r8d
        ("", b"\x75", "loop"),  # jne loop
        ("miss", b"\xf0\x48\xff\x82" + _u32(MISS + 8 * site), None),  # lock inc qword [rdx+MISS+8*site]
    ]
    if sampled:  # the count the period applies to: the misses' (shared) here, the thread's below
        count.append(("", b"\x48\x8b\x82" + _u32(MISS + 8 * site), None))  # mov rax, [rdx+MISS+8*site]
    count += [
        ("", b"\xeb", "record" if record else "done"),  # jmp done (or record)
        ("found", b"\x48\xc1\xe1" + bytes([ROW_SHIFT]), None),  # shl rcx, ROW_SHIFT
        ("", bytes([prefix]) + _row_inc(site), None),  # [lock] inc qword [row+8*site]
    ]
    if sampled:
        count.append(("", b"\x48\x8b\x84\x0a" + _u32(ROWS + 8 * site), None))  # mov rax, [rdx+rcx+ROWS+8*s]
    return count


def _recording(spec: RecordSpec) -> list[_Insn]:
    """Append one record to the ring (pmu/ring.py's producer protocol); rdx holds the counter area."""
    args: list[_Insn] = []
    for i, saved in enumerate(_ARG_SAVED[: spec.nargs]):
        field = bytes([0x28 + 8 * i])
        if saved is None:
            args.append(("", b"\x48\x89\x70" + field, None))  # mov [rax+field], rsi
        else:
            args.append(("", b"\x48\x8b\x4c\x24" + bytes([saved]), None))  # mov rcx, [rsp+saved]
            args.append(("", b"\x48\x89\x48" + field, None))  # mov [rax+field], rcx
    zeros: list[_Insn] = [
        ("", b"\x48\x89\x48" + bytes([0x28 + 8 * i]), None)  # mov [rax+args[i]], rcx (0)
        for i in range(spec.nargs, len(_ARG_SAVED))
    ]
    period: list[_Insn] = []
    if spec.period > 1:
        period = [
            ("", b"\x31\xd2", None),  # xor edx, edx              rdx:rax = the count
            ("", b"\xb9" + _u32(spec.period), None),  # mov ecx, PERIOD
            ("", b"\x48\xf7\xf1", None),  # div rcx                  rdx = count % PERIOD
            ("", b"\x48\x85\xd2", None),  # test rdx, rdx
            ("", b"\x75", "done"),  # jne done                  not this one
        ]
    return [
        ("record", b"\x44\x8b\x82" + _u32(PID), None),  # mov r8d, [rdx+PID]       pid
        *period,
        ("", b"\xf3\x49\x0f\xae\xc1", None),  # rdfsbase r9               thread
        ("", b"\x0f\x31", None),  # rdtsc                     time, before reserving
        ("", b"\x48\xc1\xe2\x20", None),  # shl rdx, 32
        ("", b"\x48\x09\xd0", None),  # or rax, rdx
        ("", b"\x49\x89\xc2", None),  # mov r10, rax
        ("", b"\x48\xbf" + struct.pack("<Q", spec.ring), None),  # movabs rdi, RING
        ("reserve", b"\x48\x8b\x8f\x00\x01\x00\x00", None),  # mov rcx, [rdi+0x100]     t = tail, first
        ("", b"\x48\x8b\x87\x80\x00\x00\x00", None),  # mov rax, [rdi+0x80]      h = head
        ("", b"\x48\x89\xc2", None),  # mov rdx, rax
        ("", b"\x48\x29\xca", None),  # sub rdx, rcx
        ("", b"\x48\x3b\x57\x18", None),  # cmp rdx, [rdi+0x18]      h - t >= capacity: full
        ("", b"\x73", "full"),  # jae full
        ("", b"\x48\x8d\x50\x01", None),  # lea rdx, [rax+1]
        ("", b"\xf0\x48\x0f\xb1\x97\x80\x00\x00\x00", None),  # lock cmpxchg [rdi+0x80], rdx
        ("", b"\x75", "reserve"),  # jne reserve               another producer won: again
        ("", b"\x48\x23\x47\x20", None),  # and rax, [rdi+0x20]      slot = h & mask
        ("", b"\x48\xc1\xe0\x07", None),  # shl rax, 7
        ("", b"\x48\x8d\x84\x07\x00\x10\x00\x00", None),  # lea rax, [rdi+rax+0x1000]  the record
        ("", b"\x4c\x89\x50\x08", None),  # mov [rax+0x08], r10      time
        ("", b"\x4c\x89\x48\x10", None),  # mov [rax+0x10], r9       thread
        ("", b"\x44\x89\x40\x18", None),  # mov [rax+0x18], r8d      pid
        ("", b"\xc7\x40\x1c" + _u32(spec.event), None),  # mov dword [rax+0x1c], EVENT
        ("", b"\x48\xb9" + struct.pack("<Q", spec.ip), None),  # movabs rcx, IP
        ("", b"\x48\x89\x48\x20", None),  # mov [rax+0x20], rcx      ip
        *args,
        ("", b"\x31\xc9", None),  # xor ecx, ecx
        *zeros,
        ("", b"\x48\x89\x48\x58", None),  # mov [rax+0x58], rcx      retval 0
        ("", b"\x48\xc7\x40\x60\xff\xff\xff\xff", None),  # mov qword [rax+0x60], -1   latency
        ("", b"\x48\x89\x48\x68", None),  # mov [rax+0x68], rcx      flags 0, reserved 0
        ("", b"\x48\x89\x48\x70", None),  # mov [rax+0x70], rcx      reserved 0
        ("", b"\x48\x89\x48\x78", None),  # mov [rax+0x78], rcx      reserved 0
        ("", b"\x48\x89\x10", None),  # mov [rax], rdx            commit: seq = h + 1, the last store
        ("", b"\xeb", "done"),  # jmp done
        ("full", b"\xf0\x48\xff\x87\x80\x01\x00\x00", None),  # lock inc qword [rdi+0x180]  lost_total
        ("", b"\xf0\x48\xff\x87" + _u32(0x200 + 8 * spec.event), None),  # lock inc qword [rdi+lost[EVENT]]
    ]


def build(
    area: int,
    site: int,
    relocated: bytes,
    tramp_addr: int,
    back: int,
    record: RecordSpec | None = None,
    locked: bool = False,
) -> Trampoline:
    """The whole trampoline at `tramp_addr`: count (and record), run `relocated` (already relocated to
    run right after the prologue), jump back to `back`. A flag-free fast path (`fast_path`) has its slow
    path after the jump back, at most SLOW_PATH_BYTES."""
    from pmu.trace.relocate import jump

    if not _is_fast(record):
        head = counting_trampoline(area, site, record, locked)
        code = head + relocated
        return Trampoline(code + jump(tramp_addr + len(code), back), len(head), lock_offset(head, site))
    fast, labels = _assemble_labels(_fast_head(area, site))
    out = bytearray(fast + relocated)
    out += jump(tramp_addr + len(out), back)
    slow = len(out)
    tail = _slow_path(site)
    tail = tail[:-4] + struct.pack("<i", labels["done"] - (slow + len(tail)))
    assert len(tail) <= SLOW_PATH_BYTES, len(tail)
    to_slow = labels["to_slow"]
    out[to_slow + 1 : to_slow + 5] = struct.pack("<i", slow - (to_slow + 5))
    return Trampoline(bytes(out) + tail, len(fast), 0)
