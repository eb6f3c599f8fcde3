"""Return probes inside the traced process: a shadow stack per thread, no stop, no syscall.

A return probe's entry is a jump patch to a stub (`stub`) that calls the entry routine of the process's
return blob (retprobe.S, assembled into CODE below). The routine finds the thread's counter cell of
the site and its shadow row, pushes a frame (the return-address slot, the real return address, the
cell, the site's descriptor, with --latency or recording the entry time, recording the arguments) and
points the return address at the blob's return trampoline. The trampoline finds the innermost frame
of its slot, counts the return in the frame's cell, adds the latency to the site's log2 histogram,
records (retval, latency, the entry's arguments) into the ring, pops the frame and jumps to the real
return address. Every register and flag is kept.

Frames left without returning (longjmp, an exception, setcontext) are dropped: at an entry those whose
slot lies below the new one, at most DROP_LIMIT (4 KiB) below (farther, they may be another stack's: a
signal handler on an alternate stack above the thread's), at a return those above the frame of its
slot. They are counted lost, and the last 64 a thread dropped are kept in its graveyard, where a
return that finds no frame of its slot on the stack looks, the most recent first; then in every row (a
thread that moved its FS base inside the function). A new frame is reserved (depth raised, its slot -1)
before it is filled, so that a signal handler's probed calls meanwhile go above it.

An entry the routine cannot serve (a thread with no TLS, no free row, a full shadow stack of MAXDEPTH
frames, an address space where two threads share an FS base) goes on to SKIP_TRAP, where pmu keeps
an int3: its return is hijacked by ptrace (returns.py), exact and slow; should pmu be gone, the trap
guard steps over it and the call is not probed.

Memory (the blob and both areas are the tracee's; nothing here needs pmu alive):

- the blob: CODE in an out-of-line area, its first words (SHADOW, RETAREA, LOCKED) set by pmu;
- the shadow area: private anonymous memory, so a forked child gets a copy with its copy of the stacks:

      0x0000  keys   u64[NSLOTS]             FS base owning each row (0 free)
      0x2000  rows   256 KiB each: depth u64, graveyard count u64, at 0x40 the graveyard (64 x 32
                     bytes: slot, orig, cell, descriptor), at 0x1000 frames of 128 bytes:
                     slot, orig, tsc, cell, descriptor, state, args[6]

- the return area: a memfd shared with pmu (a forked child gets its own, at the same address):

      0x0000  lost     u64[NRET]              frames dropped, per return site
      0x0200  skipped  u64[NRET]              entries not hijacked, per return site
      0x0400  mult     u64                    ns = ticks * mult >> 32
      0x0800  descriptors, 64 bytes each:     bank, site u32, ret u32, flags u32, nargs u32, ring, ip,
                                              event u32, period u32, entry bank, entry site u32
      0x1800  used     u8[NSLOTS]             the rows histograms were written in
      0x2000  hist     u64[NSLOTS][NRET][64]  log2 latency histograms, by (thread's shadow row, site)
      0x2002000 sum_ns u64[NSLOTS][NRET]      their sums (a thread's row is its own: no lock)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from pmu.trace import trampoline

NRET = 64
"""Return sites one address space can have in the process (the rest trap)."""
FLAG_LATENCY, FLAG_RECORD = 1, 2
"""A descriptor's flags: keep a latency histogram; record every return into the ring."""

# The blob's words pmu sets.
B_SHADOW, B_RETAREA, B_LOCKED = 0x00, 0x08, 0x10
# The shadow area.
S_ROWS = 0x2000
S_ROW_SHIFT = 18
SHADOW_BYTES = S_ROWS + (trampoline.NSLOTS << S_ROW_SHIFT)
R_DEPTH, R_GNEXT, R_GRAVE, R_FRAMES = 0x00, 0x08, 0x40, 0x1000
FRAME = 128
MAXDEPTH = 2016
DROP_LIMIT = 4096
"""An entry drops the frames whose slot lies below its own by at most this much (retprobe.S's)."""
"""Frames a thread's shadow stack holds; deeper calls are not probed (counted skipped)."""
F_SLOT, F_ORIG, F_TSC, F_CELL, F_DESC, F_STATE, F_ARGS = 0, 8, 16, 24, 32, 40, 48
STATE_LIVE, STATE_RESTORED = 0, 1
"""A frame's state: its slot holds the trampoline, or (an exception unwinding) the real address."""
# The return area.
A_LOST, A_SKIPPED, A_MULT, A_DESCS, A_HIST, A_SUMNS = 0x0000, 0x0200, 0x0400, 0x0800, 0x2000, 0x2002000
A_USED = 0x1800
"""u8[NSLOTS]: the shadow rows whose histograms hold something (only those are read: a page of the
memfd read where nothing was written would be made)."""
SKIP_RSP = 0xC8
"""At SKIP_TRAP, the probed function's return-address slot is RSP + SKIP_RSP; the registers the entry
routine saved, from RSP: r10, r9, r8, rdx, rcx, the flags, rax."""
DESC = 64
D_EBANK = 48
"""Where a descriptor's entry bank and site are (`Desc.ebank`)."""
HROWS = trampoline.NSLOTS
BUCKETS = 64
AREA_BYTES = A_SUMNS + HROWS * NRET * 8

# ---- the machine code: retprobe.S assembled (`make retprobe` writes this block) ----
# BEGIN GENERATED
CODE = bytes.fromhex(
    "00000000000000000000000000000000000000000000000066662e0f1f84000000000066662e0f1f8400000000006666"
    "2e0f1f8400000000000f1f8000000000509f0f90c0505152415041514152498b53304885d27457418b4b38803c0a0074"
    "4d4989c9f3480faec04885c0743a4881c2001000004889c148c1e90c81e1ff030000483904ca7405e8c9010000751248"
    "c1e1094801d1f04aff84c900200000eb0d4881ea00100000f04aff44ca40498b13418b4b08803c0a000f848901000048"
    "833d49ffffff000f8565010000f3480faec04885c00f84570100004989c94881c2001000004889c148c1e90c81e1ff03"
    "0000483904ca7405e8590100000f852f01000048c1e1094c8d940a002000004f8d14ca488b15e6feffff4889c148c1e9"
    "0c81e1ff030000483904ca7405e8240100000f85fa00000048c1e1124c8d8c0a00200000498b094c8d8424c800000048"
    "85c9743c4889c848c1e007498d9401800f00004c39027728720e488d0578010000493900741aeb0e4c89c0482b02483d"
    "00100000770ae81501000048ffc9ebbf4989094881f9e00700000f83920000004889c848c1e007498d94010010000048"
    "c702ffffffff48ffc14989094c8952184989d2498b00498942084d895a2049c742280000000041f74310030000007443"
    "0f3148c1e2204809d04989421041f7431002000000742c49897a3049897238488b44241849894240488b442420498942"
    "48488b44241049894250488b442408498942584d8902488d05bc000000498900eb16488b15cffdffff418b430cf048ff"
    "84c2000200006690415a415941585a5958047f9e58c3415041514889c148c1e90c81e1ff03000041b800040000483904"
    "ca742848833cca0075104989c131c0f04c0fb10cca4c89c87411ffc181e1ff03000041ffc875d64183c80141594158c3"
    "5051498b4108488d48014989490883e03fc1e005498d440140488b0a488908488b4a0848894808488b4a184889481048"
    "8b4a20488948188b490c488b0527fdfffff048ff04c85958c3488d642480509f0f90c050525141504151415241534c8d"
    "8424b8000000f3480faec0488b15eefcffff4889c148c1e90c81e1ff030000483904ca7405e82cffffff0f85b4020000"
    "48c1e1124c8d8c0a00200000498b094889c84885c0743948ffc84989c249c1e2074f8d9411001000004d390275e4488d"
    "50014839ca737448ffc94889ca48c1e207498d941100100000e822ffffffebde498b510831c04c8d52ff4929c24183e2"
    "3f49c1e2054f8d5411404d3902740cffc083f84072e0e93902000049c70200000000498b52188b520c4c8b1d48fcffff"
    "f049ff0cd3498b5208498910498b4a1048ff014d8b01e9eb010000498b52084989104989c0498b4a1848ff014d8b5a20"
    "41f74310030000000f84c80100000f3148c1e2204809d050492b4210488b15f5fbffff48f7a200040000480facd02041"
    "f74310010000007451504c89c9482b0dccfbffff48c1e912488b15c9fbffffc6840a0018000001c1e10641034b0c4801"
    "84ca00200002c1e106480fbdc0740effc083f83f7609b83f000000eb0231c001c148ff84ca002000005841f743100200"
    "00000f843a010000498b4a18488b09418b532c83fa017615504889c889d131d248f7f1584885d20f8515010000575650"
    "498b7b18488b8f00010000488b87800000004889c24829ca483b57180f83d8000000488d5001f0480fb1978000000075"
    "d34823472048c1e007488db40700100000488b44241848894608f3480faec048894610498b038b800008000089461841"
    "8b432889461c498b432048894620418b4b1431c083f9007604498b42304889462831c083f9017604498b423848894630"
    "31c083f9027604498b42404889463831c083f9037604498b42484889464031c083f9047604498b42504889464831c083"
    "f9057604498b425848894650488b44245848894658488b04244889466048c746680100000048c746700000000048c746"
    "7800000000488916eb15f048ff8780010000418b4328f048ff84c700020000585e5f4883c4084d8901415b415a415941"
    "58595a58047f9e58488da42480000000ff6424f8488b1515faffff31c948833cca00744e4989c949c1e1124e8d8c0a00"
    "200000498b01483de007000077344885c0742f48ffc84989c249c1e2074f8d9411001000004d390275e4498b42084989"
    "00498b4218f048ff0049c70200000000eb87ffc181f90004000072a10f0b"
)
ENTRY = 0x40
RET_TRAMP = 0x2E9
SKIP_TRAP = 0x246
# END GENERATED


@dataclass(frozen=True)
class Desc:
    """A return site's descriptor in the return area."""

    bank: int
    """Address of the counter bank whose column counts the site's returns."""
    site: int
    """The column's site in that bank."""
    ret: int
    """The site's index among the address space's return sites (< NRET)."""
    flags: int = 0
    nargs: int = 0
    ring: int = 0
    ip: int = 0
    event: int = 0
    period: int = 1
    ebank: int = 0
    """The counter bank of an entry probe on the same function, counted by the stub too (0: none)."""
    esite: int = 0

    def pack(self) -> bytes:
        return struct.pack(
            "<QIIIIQQIIQI",
            self.bank,
            self.site,
            self.ret,
            self.flags,
            self.nargs,
            self.ring,
            self.ip,
            self.event,
            self.period,
            self.ebank,
            self.esite,
        ).ljust(DESC, b"\0")


def desc_address(area: int, ret: int) -> int:
    return area + A_DESCS + DESC * ret


def header(shadow: int, retarea: int, locked: bool = False) -> bytes:
    """The blob's first words."""
    return struct.pack("<QQQ", shadow, retarea, int(locked))


def stub_head(desc: int) -> bytes:
    """A return site's stub up to its displaced instructions; `stub` finishes it."""
    return (
        b"\x48\x8d\x64\x24\x80"  # lea rsp, [rsp-0x80]        step over the red zone
        + b"\x41\x53"  # push r11
        + b"\x49\xbb"
        + desc.to_bytes(8, "little")  # movabs r11, DESC
        + b"\xff\x15\x00\x00\x00\x00"  # call [rip+X]               the entry routine (X set by stub)
        + b"\x41\x5b"  # pop r11
        + b"\x48\x8d\xa4\x24\x80\x00\x00\x00"  # lea rsp, [rsp+0x80]
    )


STUB_HEAD = len(stub_head(0))


def stub(desc: int, entry: int, relocated: bytes, at: int, back: int) -> bytes:
    """The whole stub placed at `at`: call the entry routine at `entry` with the descriptor at `desc`,
    run `relocated` (already relocated to run after the head), jump back to `back`; the entry
    routine's address is kept after the jump."""
    from pmu.trace.relocate import jump

    head = bytearray(stub_head(desc))
    code = bytes(head) + relocated
    code += jump(at + len(code), back)
    call_end = 5 + 2 + 10 + 6  # the call's end, from the stub's start
    head[call_end - 4 : call_end] = struct.pack("<i", len(code) - call_end)
    return bytes(head) + code[len(head) :] + entry.to_bytes(8, "little")


def frames(row: bytes) -> list[tuple[int, int, int, int, int]]:
    """(slot, orig, cell, descriptor, state) of each frame of a shadow row read from the tracee
    (its first R_FRAMES bytes and the frames in use)."""
    depth = int.from_bytes(row[:8], "little")
    out = []
    for i in range(depth):
        at = R_FRAMES + FRAME * i
        slot, orig, _tsc, cell, desc, state = struct.unpack_from("<6Q", row, at)
        out.append((slot, orig, cell, desc, state))
    return out


def row_address(shadow: int, index: int) -> int:
    return shadow + S_ROWS + (index << S_ROW_SHIFT)


def histograms(area: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hist[NRET][BUCKETS], sum_ns[NRET]) over every thread, from the return area's words (u64). Only
    the rows threads claimed are summed (the rest were never touched, nor are their pages made)."""
    used = np.flatnonzero(area[A_USED // 8 : A_USED // 8 + HROWS // 8].view(np.uint8))
    hist = area[A_HIST // 8 : A_HIST // 8 + HROWS * NRET * BUCKETS].reshape(HROWS, NRET, BUCKETS)
    sums = area[A_SUMNS // 8 : A_SUMNS // 8 + HROWS * NRET].reshape(HROWS, NRET)
    return hist[used].sum(axis=0, dtype=np.uint64), sums[used].sum(axis=0, dtype=np.uint64)


def histogram(area: np.ndarray, ret: int) -> tuple[np.ndarray, int]:
    """(buckets, sum of ns) of return site `ret` from the return area's words (u64)."""
    hist, sums = histograms(area)
    return hist[ret], int(sums[ret])
