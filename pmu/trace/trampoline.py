"""Jump-optimized probes: the counter area's layout and the counting trampoline, hand-encoded x86-64.

A probed function's first instructions (at least 5 bytes, whole instructions) are replaced by a
`jmp rel32` to a trampoline mapped within ±2 GiB. The trampoline counts the hit in a counter area inside
the traced process (no stop, no syscall), runs the relocated displaced instructions and jumps back.
Counts are kept per thread: a thread is known by its FS base (`rdfsbase`), which it claims a row for
with `lock cmpxchg` the first time it hits; pmu maps FS bases to TIDs. The template below is the one
place the machine code is written; tests disassemble what it produces.

Counter area (one per address space, private anonymous memory, read and written by pmu through
/proc/PID/mem):

    0x0000  enabled  u8[NSITES]          a site counts only while its byte is non-zero
    0x0040  miss     u64[NSITES]          hits from threads that found no free row (lock inc)
    0x1000  keys     u64[NSLOTS]          FS base owning each row (0 = free); claimed by the trampoline
    0x2000  rows     u64[NSLOTS][NSITES]  per-thread hit counts, one 512-byte row per thread
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NSITES = 64
"""Probe sites (columns) one address space can have optimized."""
NSLOTS = 256
"""Threads (rows) that can count at once; a power of two."""
ENABLED = 0x0000
MISS = 0x0040
KEYS = 0x1000
ROWS = 0x2000
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


def counting_trampoline(area: int, site: int) -> bytes:
    """The counting prologue for column `site` of the counter area at `area` (flags and registers saved,
    red zone stepped over); the caller appends the relocated instructions and the jump back."""
    if not 0 <= site < NSITES:
        raise ValueError(f"site column {site} out of range")
    # (label, bytes, branch target label or None); short branches are resolved below.
    prog: list[tuple[str, bytes, str | None]] = [
        ("", b"\x48\x8d\x64\x24\x80", None),  # lea rsp, [rsp-0x80]     step over the red zone
        ("", b"\x9c", None),  # pushfq
        ("", b"\x50", None),  # push rax
        ("", b"\x51", None),  # push rcx
        ("", b"\x52", None),  # push rdx
        ("", b"\x41\x50", None),  # push r8
        ("", b"\x41\x51", None),  # push r9
        ("", b"\x48\xba" + struct.pack("<Q", area), None),  # movabs rdx, AREA
        ("", b"\x80\xba" + _u32(ENABLED + site) + b"\x00", None),  # cmp byte [rdx+ENABLED+site], 0
        ("", b"\x74", "done"),  # je done                   disabled: count nothing
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
        ("", b"\xeb", "done"),  # jmp done
        ("found", b"\x48\xc1\xe1" + bytes([ROW_SHIFT]), None),  # shl rcx, ROW_SHIFT
        ("", b"\x48\xff\x84\x0a" + _u32(ROWS + 8 * site), None),  # inc qword [rdx+rcx+ROWS+8*site]
        ("done", b"\x41\x59", None),  # pop r9
        ("", b"\x41\x58", None),  # pop r8
        ("", b"\x5a", None),  # pop rdx
        ("", b"\x59", None),  # pop rcx
        ("", b"\x58", None),  # pop rax
        ("", b"\x9d", None),  # popfq
        ("", b"\x48\x8d\xa4\x24\x80\x00\x00\x00", None),  # lea rsp, [rsp+0x80]
    ]
    offsets: dict[str, int] = {}
    pos = 0
    for label, code, target in prog:
        if label:
            offsets[label] = pos
        pos += len(code) + (1 if target else 0)
    out = bytearray()
    for _label, code, target in prog:
        out += code
        if target:
            out += _i8(offsets[target] - (len(out) + 1))
    return bytes(out)


def build(area: int, site: int, relocated: bytes, tramp_addr: int, back: int) -> Trampoline:
    """The whole trampoline at `tramp_addr`: count, run `relocated` (already relocated to run right
    after the counting prologue), jump back to `back`."""
    from pmu.trace.relocate import jump

    head = counting_trampoline(area, site)
    body = len(head)
    code = head + relocated
    return Trampoline(code + jump(tramp_addr + len(code), back), body)
