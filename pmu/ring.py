"""Ring buffers of probe-hit records in shared memory: lock-free producers, one consumer draining in bulk.

A ring is one memfd: a 4 KiB header page, then `capacity` records of 128 bytes (`RECORD_DTYPE`). Producers
are the tracer (`Ring.write`, at each ptrace stop) and jump-optimized probes: hand-encoded x86-64
trampolines (pmu/trace/trampoline.py) and the return trampoline (pmu/trace/retprobe.S, whose records
carry retval, latency_ns and FLAG_RETURN) that run inside the traced process, in many threads at once, with
the memfd mapped shared into it. The consumer is `pmu record`, which calls `Ring.drain` (whole records)
or `Ring.take` (the first words of each, for trampoline rings) and streams them to Parquet. So the layout
below is an ABI for code that is not Python; its version is `VERSION` and any change to it bumps the
version. `tests/unit/test_ring.py` holds a C producer (`C_PRODUCER`) that follows this text and is run
against the Python consumer: it is the executable form of this specification.

Header page (all fields little-endian, offsets in hex; unlisted bytes are 0):

    0x000  u64  magic        b"PMURING\\0" (0x00474e4952554d50)
    0x008  u32  version      1
    0x00c  u32  header_size  4096: offset of record 0 from the start of the ring
    0x010  u32  record_size  128
    0x014  u32  max_events   256: the length of lost[]
    0x018  u64  capacity     records in the ring, a power of two
    0x020  u64  mask         capacity - 1
    0x028  u32  clock        what record.time holds: 0 = CLOCK_MONOTONIC ns, 1 = raw TSC (rdtsc)
    0x02c  u32  thread       what record.thread holds: 0 = TID, 1 = the thread's FS base (its TCB address)
    0x030  u32  nevents      event indexes are 0 .. nevents-1 (nevents <= max_events)
    0x080  u64  head         reservation counter: producers claim record index h with CAS(head, h, h+1)
    0x100  u64  tail         consumption counter: written only by the consumer
    0x180  u64  lost_total   records dropped because the ring was full (lock inc by producers)
    0x200  u64  lost[256]    the same, per event index (lock inc by producers), up to 0xa00

head, tail and lost_total each own a 128-byte block (two cache lines: Intel's adjacent-line prefetcher
moves lines in pairs), so producers bouncing `head` do not steal the consumer's `tail` and the reverse.
The constant fields are written once by `Ring.create`, before any producer exists, and never change.

Record i (a u64 counter that never wraps in practice) lives at `0x1000 + (i & mask) * 128`:

    0x00  u64  seq         commit word: i + 1 once the record is complete (0 in a fresh ring)
    0x08  i64  time        CLOCK_MONOTONIC ns, or raw TSC if header.clock == 1
    0x10  u64  thread      TID, or FS base if header.thread == 1
    0x18  i32  pid         the thread group (process) id
    0x1c  u32  event       event index, < header.nevents
    0x20  u64  ip          the probed address (in the traced process)
    0x28  u64  args[6]     integer argument registers rdi, rsi, rdx, rcx, r8, r9 (unused ones 0)
    0x58  u64  retval      rax at a return probe, else 0
    0x60  i64  latency_ns  return time minus entry time in ns, -1 if unknown or not a return
    0x68  u32  flags       bit 0 (FLAG_RETURN): a uretprobe record; other bits 0
    0x6c       reserved    20 bytes: producers write 0, version-1 consumers ignore them

A record is 64-byte aligned and spans two whole cache lines, so producers in different slots never share
a line. The protocol, with the x86-64 memory model (TSO: plain stores are release, plain loads acquire):

Producer (any number, any process; `_WRITE_ASM` below is the reference code, C_PRODUCER the same in C):
 1. gather every value of the record first (keep the reserved-to-committed window short);
 2. loop: t = load(tail); h = load(head)  -- tail first, else h - t may underflow and look full;
    if h - t >= capacity: `lock inc lost_total`, `lock inc lost[event]`, give up (the hit is lost);
    else `lock cmpxchg head: h -> h + 1`; on failure start the loop again;
 3. write bytes 0x08..0x7f of record h (reserved bytes 0), with ordinary stores (no movnt*);
 4. commit: store seq = h + 1 as one aligned 8-byte store, after every other byte of the record.
Consumer (one): h = load(head); for each index i from tail on, the record is ready iff seq == i + 1
(a stale seq from the previous lap is i + 1 - capacity, a fresh ring's is 0); copy the committed prefix in
bulk; then store tail = the index past it. A producer can reuse a slot only after the consumer's tail
store, which follows its copy; x86 never moves a store before an earlier load, so no fence is needed.
Every attempt is either committed once or counted lost once: records + lost == attempts, exactly.

A reserved but never committed record (its thread killed between steps 2 and 4) stops the drain there:
later records wait, the ring fills and new hits are counted lost. Once no producer can run any more
(every traced process has exited), `drain(final=True)` skips such records and counts them `abandoned`.
Skipping one while its producer lives would let that producer write over a slot already reused.

For trampolines: the ring's address differs in each process that maps it, so embed it per process (or
load it from a per-process slot); `head - tail` is a u64 subtraction; cmpxchg, sub, cmp and inc clobber
the flags and rax/rdx (rdtsc too), so save them; there is no lock and no wait for another thread, so a
signal handler that hits a probe in the middle of a trampoline (same thread) is safe; a thread stopped by
ptrace between steps 2 and 4 delays the drain until it runs again. With header.thread == 1, `fs:[0]`
(glibc's and musl's TCB self-pointer) is the FS base without `rdfsbase`; the consumer maps it to a TID.

The Python producer, `Ring.write`, packs the record body with `struct` into a scratch buffer and runs
`_WRITE_ASM`, mapped executable once per ring with the ring's and the buffer's addresses in it; so it
follows the same atomic protocol and may share a ring with trampolines and other processes. Where
executable memory cannot be mapped, it falls back to plain Python stores (`Ring.atomic` is then False):
correct for a single producer only. In both cases one Python thread per Ring object may write.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import struct
from collections.abc import Callable, Sequence
from enum import IntEnum
from types import TracebackType
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from pmu.errors import UsageError

VERSION: Final = 1
"""Version of the ring layout; bumped by any change to the header or record layout."""
MAGIC: Final = int.from_bytes(b"PMURING\0", "little")
"""First 8 bytes of a ring."""
PAGE_SIZE: Final = 4096
"""Unit of `pages` (perf's -m/--mmap-pages)."""
HEADER_SIZE: Final = 4096
"""Bytes of the header page; record 0 starts here."""
RECORD_SIZE: Final = 128
"""Bytes per record."""
RECORDS_PER_PAGE: Final = PAGE_SIZE // RECORD_SIZE
MAX_EVENTS: Final = 256
"""Per-event lost counters in the header: event indexes must be below this."""
MAX_ARGS: Final = 6
"""Argument registers a record holds."""
MAX_PAGES: Final = 1 << 18
"""Largest ring accepted: 1 GiB of records (8 Mi records)."""
FLAG_RETURN: Final = 1
"""Bit 0 of `flags`: the record is a return (uretprobe) record; `retval` and `latency_ns` are valid."""

OFF_MAGIC: Final = 0x000
OFF_VERSION: Final = 0x008
OFF_HEADER_SIZE: Final = 0x00C
OFF_RECORD_SIZE: Final = 0x010
OFF_MAX_EVENTS: Final = 0x014
OFF_CAPACITY: Final = 0x018
OFF_MASK: Final = 0x020
OFF_CLOCK: Final = 0x028
OFF_THREAD: Final = 0x02C
OFF_NEVENTS: Final = 0x030
OFF_HEAD: Final = 0x080
OFF_TAIL: Final = 0x100
OFF_LOST_TOTAL: Final = 0x180
OFF_LOST: Final = 0x200


class ClockKind(IntEnum):
    """What the `time` field of a ring's records holds (header.clock)."""

    MONOTONIC = 0
    """CLOCK_MONOTONIC in nanoseconds."""
    TSC = 1
    """The raw time-stamp counter (rdtsc); the consumer converts it to ns."""


class ThreadKind(IntEnum):
    """What the `thread` field of a ring's records holds (header.thread)."""

    TID = 0
    """The kernel thread id."""
    FS_BASE = 1
    """The thread's FS base (glibc's TCB address, `fs:[0]`); the consumer maps it to a TID."""


RECORD_DTYPE: Final = np.dtype(
    {
        "names": ["seq", "time", "thread", "pid", "event", "ip", "args", "retval", "latency_ns", "flags"],
        "formats": ["<u8", "<i8", "<u8", "<i4", "<u4", "<u8", ("<u8", (MAX_ARGS,)), "<u8", "<i8", "<u4"],
        "offsets": [0x00, 0x08, 0x10, 0x18, 0x1C, 0x20, 0x28, 0x58, 0x60, 0x68],
        "itemsize": RECORD_SIZE,
    }
)
"""One record as numpy sees it (the module docstring gives each field's meaning)."""

HEADER_DTYPE: Final = np.dtype(
    {
        "names": [
            "magic",
            "version",
            "header_size",
            "record_size",
            "max_events",
            "capacity",
            "mask",
            "clock",
            "thread",
            "nevents",
            "head",
            "tail",
            "lost_total",
            "lost",
        ],
        "formats": [
            "<u8",
            "<u4",
            "<u4",
            "<u4",
            "<u4",
            "<u8",
            "<u8",
            "<u4",
            "<u4",
            "<u4",
            "<u8",
            "<u8",
            "<u8",
            ("<u8", (MAX_EVENTS,)),
        ],
        "offsets": [
            OFF_MAGIC,
            OFF_VERSION,
            OFF_HEADER_SIZE,
            OFF_RECORD_SIZE,
            OFF_MAX_EVENTS,
            OFF_CAPACITY,
            OFF_MASK,
            OFF_CLOCK,
            OFF_THREAD,
            OFF_NEVENTS,
            OFF_HEAD,
            OFF_TAIL,
            OFF_LOST_TOTAL,
            OFF_LOST,
        ],
        "itemsize": HEADER_SIZE,
    }
)
"""The header page as numpy sees it (for reading a ring's header in tests and tools)."""

_BODY_SIZE: Final = RECORD_SIZE - 8
# Record bytes 0x08..0x7f: time, thread, pid, event, ip, args (n given, the rest zero-padded: struct
# zeroes pad bytes), retval, latency_ns, flags, reserved. One Struct per number of args given.
_BODIES: Final = tuple(
    struct.Struct("<qQiIQ" + "Q" * n + f"{8 * (MAX_ARGS - n)}x" + "QqI20x") for n in range(MAX_ARGS + 1)
)
_BODY_EVENT: Final = 0x1C - 8  # offset of `event` in the body
_HEADER_CONST: Final = struct.Struct("<QIIIIQQIII")

_HEAD_W: Final = OFF_HEAD // 8
_TAIL_W: Final = OFF_TAIL // 8
_LOST_TOTAL_W: Final = OFF_LOST_TOTAL // 8
_LOST_W: Final = OFF_LOST // 8

_WRITE_ASM: Final = """\
    movabs rdi, HEADER                  # the ring's header (this ring's address, patched in)
    movabs r8, BODY                     # record bytes 0x08..0x7f, packed by Ring.write
    mov esi, dword ptr [r8+0x14]        # event (record offset 0x1c)
    cmp esi, dword ptr [rdi+0x30]       # event >= nevents: refuse, touch nothing
    jae 3f
1:  mov rcx, qword ptr [rdi+0x100]      # t = tail, loaded before head
    mov rax, qword ptr [rdi+0x80]       # h = head
    mov rdx, rax
    sub rdx, rcx
    cmp rdx, qword ptr [rdi+0x18]       # h - t >= capacity: full
    jae 2f
    lea rdx, [rax+1]
    lock cmpxchg qword ptr [rdi+0x80], rdx  # head: h -> h + 1, else another producer won: retry
    jne 1b
    and rax, qword ptr [rdi+0x20]       # slot = h & mask
    shl rax, 7
    lea rax, [rdi+rax+0x1000]           # record = header + 4096 + slot * 128
    movdqu xmm0, xmmword ptr [r8]
    movdqu xmmword ptr [rax+0x08], xmm0
    movdqu xmm0, xmmword ptr [r8+0x10]
    movdqu xmmword ptr [rax+0x18], xmm0
    movdqu xmm0, xmmword ptr [r8+0x20]
    movdqu xmmword ptr [rax+0x28], xmm0
    movdqu xmm0, xmmword ptr [r8+0x30]
    movdqu xmmword ptr [rax+0x38], xmm0
    movdqu xmm0, xmmword ptr [r8+0x40]
    movdqu xmmword ptr [rax+0x48], xmm0
    movdqu xmm0, xmmword ptr [r8+0x50]
    movdqu xmmword ptr [rax+0x58], xmm0
    movdqu xmm0, xmmword ptr [r8+0x60]
    movdqu xmmword ptr [rax+0x68], xmm0
    mov rcx, qword ptr [r8+0x70]
    mov qword ptr [rax+0x78], rcx
    mov qword ptr [rax], rdx            # commit: seq = h + 1, the last store
    mov eax, 1
    ret
2:  lock inc qword ptr [rdi+0x180]      # lost_total += 1
    lock inc qword ptr [rdi+rsi*8+0x200]  # lost[event] += 1
    xor eax, eax
    ret
3:  mov eax, 2
    ret
"""
"""`int write(void)`: 1 = committed, 0 = ring full (counted lost), 2 = event out of range (GNU as syntax)."""

_WRITE_CODE_TAIL: Final = bytes.fromhex(
    "418b70143b77300f83aa000000488b8f00010000488b87800000004889c24829ca483b5718737c488d5001f0480fb197"
    "8000000075d74823472048c1e007488d840700100000f3410f6f00f30f7f4008f3410f6f4010f30f7f4018f3410f6f40"
    "20f30f7f4028f3410f6f4030f30f7f4038f3410f6f4040f30f7f4048f3410f6f4050f30f7f4058f3410f6f4060f30f7f"
    "4068498b487048894878488910b801000000c3f048ff8780010000f048ff84f70002000031c0c3b802000000c3"
)


def _write_code(header: int, body: int) -> bytes:
    """Machine code of `_WRITE_ASM` with the two addresses filled in."""
    return (
        b"\x48\xbf"
        + header.to_bytes(8, "little")
        + b"\x49\xb8"
        + body.to_bytes(8, "little")
        + _WRITE_CODE_TAIL
    )


_PROT_READ: Final = 1
_PROT_EXEC: Final = 4
_MAP_PRIVATE: Final = 2
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


class _Libc:
    """mmap/munmap through ctypes: Python's mmap module cannot tell the address of a read-only mapping."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.mmap = libc.mmap
        self.mmap.restype = ctypes.c_void_p
        self.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.mmap.argtypes += [ctypes.c_long]
        self.munmap = libc.munmap
        self.munmap.restype = ctypes.c_int
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


_libc: _Libc | None = None


def _map_code(code: bytes) -> int | None:
    """Map `code` read+execute (from a memfd, never writable and executable at once); None if refused."""
    global _libc
    try:
        if _libc is None:
            _libc = _Libc()
        fd = os.memfd_create("pmu-ring-code", os.MFD_CLOEXEC)
    except (OSError, AttributeError):
        return None
    try:
        os.write(fd, code)
        addr = _libc.mmap(None, PAGE_SIZE, _PROT_READ | _PROT_EXEC, _MAP_PRIVATE, fd, 0)
    finally:
        os.close(fd)
    if addr is None or addr == _MAP_FAILED:
        return None
    return int(addr)


def _unmap_code(addr: int) -> None:
    if _libc is not None:
        _libc.munmap(addr, PAGE_SIZE)


def pages_for(pages: int) -> int:
    """`pages` rounded up to a power of two, as perf rounds -m; UsageError if 0, negative or absurd."""
    if isinstance(pages, bool) or not isinstance(pages, int) or not 1 <= pages <= MAX_PAGES:
        raise UsageError(f"invalid number of mmap pages: {pages} (expected 1..{MAX_PAGES})")
    return 1 << (pages - 1).bit_length()


_SIZE_RE: Final = re.compile(r"(\d+)([BKMG]?)", re.IGNORECASE)
_UNITS: Final = {"": 0, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_mmap_pages(text: str) -> int:
    """perf's -m/--mmap-pages: a number of pages, or a size with a B/K/M/G unit; rounded up to a power of two.

    "128" is 128 pages; "1M" is 256 pages of 4 KiB; "3" becomes 4. UsageError for anything else.
    """
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise UsageError(f"invalid number of mmap pages: {text!r}")
    value, unit = int(m.group(1)), _UNITS[m.group(2).upper()]
    pages = value if unit == 0 else -(-value * unit // PAGE_SIZE)
    if not 1 <= pages <= MAX_PAGES:
        raise UsageError(f"invalid number of mmap pages: {text!r} (expected 1..{MAX_PAGES} pages)")
    return pages_for(pages)


class Ring:
    """One ring buffer: a memfd mapped here (and, for trampolines, in traced processes).

    Create with `Ring.create` (a new ring) or `Ring.attach` (map an existing ring's fd). Any number of
    processes may write; one Ring object in one process drains. Closing is idempotent.
    """

    __slots__ = (
        "_fd",
        "_mm",
        "_words",
        "_records",
        "_seq",
        "_bytes",
        "_lines",
        "_capacity",
        "_mask",
        "_nevents",
        "_clock",
        "_thread",
        "_body",
        "_body_view",
        "_packers",
        "_pack0",
        "_anchor",
        "_code",
        "_commit",
        "_abandoned",
        "_closed",
    )

    def __init__(self, fd: int, *, native: bool = True) -> None:
        """Map the ring in memfd `fd` (taking ownership of `fd`); use `create` or `attach` instead."""
        self._closed = True
        self._fd = fd
        head = os.pread(fd, _HEADER_CONST.size, 0)
        if len(head) < _HEADER_CONST.size:
            raise ValueError(f"fd {fd} is not a pmu ring: too short")
        magic, version, header_size, record_size, max_events, capacity, mask, clock, thread, nevents = (
            _HEADER_CONST.unpack(head)
        )
        if magic != MAGIC:
            raise ValueError(f"fd {fd} is not a pmu ring: bad magic {magic:#x}")
        if (version, header_size, record_size, max_events) != (VERSION, HEADER_SIZE, RECORD_SIZE, MAX_EVENTS):
            raise ValueError(f"fd {fd}: unsupported pmu ring version {version}")
        size = HEADER_SIZE + capacity * RECORD_SIZE
        if capacity & mask or mask != capacity - 1 or os.fstat(fd).st_size < size:
            raise ValueError(f"fd {fd}: corrupt pmu ring header (capacity {capacity})")
        self._capacity = int(capacity)
        self._mask = int(mask)
        self._nevents = int(nevents)
        self._clock = ClockKind(clock)
        self._thread = ThreadKind(thread)
        self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._words = memoryview(self._mm).cast("Q")
        self._records: npt.NDArray[Any] = np.ndarray(
            (self._capacity,), RECORD_DTYPE, buffer=self._mm, offset=HEADER_SIZE
        )
        self._seq: npt.NDArray[np.uint64] = self._records["seq"]
        self._bytes: npt.NDArray[np.uint8] = np.frombuffer(self._mm, np.uint8)
        self._lines: npt.NDArray[np.uint64] = np.ndarray(
            (self._capacity, RECORD_SIZE // 8), np.uint64, buffer=self._mm, offset=HEADER_SIZE
        )
        self._body = (ctypes.c_char * _BODY_SIZE)()
        self._body_view = memoryview(self._body).cast("B")
        self._packers = tuple(b.pack_into for b in _BODIES)
        self._pack0 = _BODIES[0].pack_into
        self._abandoned = 0
        self._anchor: ctypes.c_char | None = None
        self._code: int | None = None
        self._commit: Callable[[], int] = self._commit_python
        if native:
            anchor = ctypes.c_char.from_buffer(self._mm)
            code = _map_code(_write_code(ctypes.addressof(anchor), ctypes.addressof(self._body)))
            if code is not None:
                self._anchor = anchor
                self._code = code
                self._commit = ctypes.PYFUNCTYPE(ctypes.c_int)(code)
            else:
                del anchor
        self._closed = False

    @classmethod
    def create(
        cls,
        pages: int,
        nevents: int,
        *,
        clock: ClockKind = ClockKind.MONOTONIC,
        thread: ThreadKind = ThreadKind.TID,
    ) -> Ring:
        """A new, empty ring of `pages` 4 KiB pages of records (rounded up to a power of two), 32 a page.

        `nevents` is the number of event indexes (1..MAX_EVENTS). `clock` and `thread` say what the
        producers of this ring put in `time` and `thread`. UsageError for a bad `pages`.
        """
        fd = os.memfd_create("pmu-ring", os.MFD_CLOEXEC)
        try:
            return cls.format(fd, pages, nevents, clock=clock, thread=thread)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def format(
        cls,
        fd: int,
        pages: int,
        nevents: int,
        *,
        clock: ClockKind = ClockKind.MONOTONIC,
        thread: ThreadKind = ThreadKind.TID,
    ) -> Ring:
        """Make the empty file (a memfd) `fd` a new ring, as `create` does, and map it; the Ring takes
        ownership of `fd`. For a memfd that a traced process made (so that it may map it as any user)."""
        pages = pages_for(pages)
        if isinstance(nevents, bool) or not isinstance(nevents, int) or not 1 <= nevents <= MAX_EVENTS:
            raise UsageError(f"too many events for one ring: {nevents} (at most {MAX_EVENTS})")
        capacity = pages * RECORDS_PER_PAGE
        os.ftruncate(fd, HEADER_SIZE + capacity * RECORD_SIZE)
        consts = _HEADER_CONST.pack(
            MAGIC,
            VERSION,
            HEADER_SIZE,
            RECORD_SIZE,
            MAX_EVENTS,
            capacity,
            capacity - 1,
            clock,
            thread,
            nevents,
        )
        os.pwrite(fd, consts, 0)
        return cls(fd)

    @classmethod
    def attach(cls, fd: int) -> Ring:
        """Map the existing ring in memfd `fd` (which stays the caller's: the Ring works on a dup)."""
        dup = os.dup(fd)
        try:
            return cls(dup)
        except BaseException:
            os.close(dup)
            raise

    @property
    def fd(self) -> int:
        """The memfd holding the ring (close-on-exec); map `size` bytes of it MAP_SHARED to share the ring."""
        return self._fd

    @property
    def size(self) -> int:
        """Bytes of the ring: the header page and the records."""
        return HEADER_SIZE + self._capacity * RECORD_SIZE

    @property
    def capacity(self) -> int:
        """Records the ring holds, a power of two."""
        return self._capacity

    @property
    def nevents(self) -> int:
        """Event indexes this ring accepts: 0 .. nevents-1."""
        return self._nevents

    @property
    def clock(self) -> ClockKind:
        """What `time` holds in this ring's records."""
        return self._clock

    @property
    def thread_kind(self) -> ThreadKind:
        """What `thread` holds in this ring's records."""
        return self._thread

    @property
    def atomic(self) -> bool:
        """True if `write` uses the atomic protocol (safe with other producers), False if single-producer."""
        return self._code is not None

    def write(
        self,
        event: int,
        time: int,
        thread: int,
        pid: int,
        ip: int,
        args: Sequence[int] = (),
        retval: int = 0,
        latency_ns: int = -1,
        flags: int = 0,
    ) -> bool:
        """Append one record; False if the ring is full (the record is then counted lost).

        Values must fit their fields (struct.error otherwise, and nothing is written); at most MAX_ARGS
        args. ValueError for an event index outside 0..nevents-1 or a closed ring.
        """
        if args:
            try:
                pack = self._packers[len(args)]
            except IndexError:
                raise ValueError(f"at most {MAX_ARGS} args per record, not {len(args)}") from None
            pack(self._body, 0, time, thread, pid, event, ip, *args, retval, latency_ns, flags)
        else:  # the common case, without the cost of unpacking args (about 70 ns)
            self._pack0(self._body, 0, time, thread, pid, event, ip, retval, latency_ns, flags)
        r = self._commit()
        if r == 1:
            return True
        if r == 0:
            return False
        raise ValueError(f"event index {event} out of range for a ring of {self._nevents} events")

    def _commit_python(self) -> int:
        """The protocol in plain Python stores, for one producer only (no CAS): as `_WRITE_ASM` returns."""
        if self._closed:
            raise ValueError("write to a closed ring")
        w = self._words
        event = int.from_bytes(self._body_view[_BODY_EVENT : _BODY_EVENT + 4], "little")
        if event >= self._nevents:
            return 2
        t = w[_TAIL_W]
        h = w[_HEAD_W]
        if h - t >= self._capacity:
            w[_LOST_TOTAL_W] += 1
            w[_LOST_W + event] += 1
            return 0
        w[_HEAD_W] = h + 1
        off = HEADER_SIZE + (h & self._mask) * RECORD_SIZE
        self._mm[off + 8 : off + RECORD_SIZE] = self._body_view
        w[off // 8] = h + 1
        return 1

    def drain(self, limit: int | None = None, *, final: bool = False) -> npt.NDArray[Any]:
        """Copy out the committed records from tail on (at most `limit`), in order, and free their slots.

        Stops at the first reserved but uncommitted record. With `final=True` (only once no producer
        can run any more) such records are skipped, counted in `abandoned`, and the ring is emptied.
        """
        if self._closed:
            raise ValueError("drain of a closed ring")
        w = self._words
        t = w[_TAIL_W]
        n = min(w[_HEAD_W] - t, self._capacity)  # more than capacity only from a broken producer
        if limit is not None:
            n = min(n, max(limit, 0))
        if n <= 0:
            return np.empty(0, RECORD_DTYPE)
        start = t & self._mask
        n1 = min(n, self._capacity - start)
        expected = np.arange(t + 1, t + 1 + n, dtype=np.uint64)
        ok = np.empty(n, np.bool_)
        np.equal(self._seq[start : start + n1], expected[:n1], out=ok[:n1])
        np.equal(self._seq[: n - n1], expected[n1:], out=ok[n1:])
        if final and not ok.all():
            slots = (np.flatnonzero(ok) + start) & self._mask
            taken: npt.NDArray[Any] = self._records[slots]
            self._abandoned += n - len(taken)
            w[_TAIL_W] = t + n
            return taken
        k = n if ok.all() else int(np.argmin(ok))
        k1 = min(k, n1)
        result = np.empty(k, RECORD_DTYPE)
        # Raw bytes: numpy copies a structured dtype with gaps field by field, ten times slower.
        dst = result.view(np.uint8)
        dst[: k1 * RECORD_SIZE] = self._bytes[HEADER_SIZE + start * RECORD_SIZE :][: k1 * RECORD_SIZE]
        dst[k1 * RECORD_SIZE :] = self._bytes[HEADER_SIZE : HEADER_SIZE + (k - k1) * RECORD_SIZE]
        w[_TAIL_W] = t + k
        return result

    def take(
        self, limit: int, words: int, out: npt.NDArray[np.uint64] | None = None
    ) -> npt.NDArray[np.uint64]:
        """Copy out the first `words` 8-byte words (seq, time, thread, pid|event<<32, ip, args...) of each
        committed record from tail on (at most `limit`), as a (k, words) array, and free them.

        For a consumer that needs a few fields of many records: one pass copies the words asked for,
        each record's from its commit word up (numpy copies a row with one memmove, whose loads start
        at the row's first bytes), then the copied commit words decide how many are whole. `out`, a
        C-contiguous (rows, words) array to reuse, bounds the count too, and the result is a view of it.
        """
        if self._closed:
            raise ValueError("drain of a closed ring")
        if not 1 <= words <= RECORD_SIZE // 8:
            raise ValueError(f"words must be 1..{RECORD_SIZE // 8}, not {words}")
        w = self._words
        t = w[_TAIL_W]
        n = min(w[_HEAD_W] - t, self._capacity, max(limit, 0))
        if out is not None:
            if out.ndim != 2 or out.shape[1] != words or not out.flags.c_contiguous:
                raise ValueError(f"out must be a C-contiguous (rows, {words}) array")
            n = min(n, len(out))
        if n <= 0:
            return np.empty((0, words), np.uint64)
        start = t & self._mask
        n1 = min(n, self._capacity - start)
        # Each record's words are copied in address order, its commit word first: on x86 (TSO) a load
        # never passes an earlier load, so words copied after a commit word that reads i + 1 are whole.
        result = np.empty((n, words), np.uint64) if out is None else out[:n]
        result[:n1] = self._lines[start : start + n1, :words]
        result[n1:] = self._lines[: n - n1, :words]
        ok = result[:, 0] == np.arange(t + 1, t + 1 + n, dtype=np.uint64)
        k = n if ok.all() else int(np.argmin(ok))
        w[_TAIL_W] = t + k
        return result[:k]

    @property
    def pending(self) -> int:
        """Records reserved and not yet drained (committed or not)."""
        self._check_open()
        return int(self._words[_HEAD_W] - self._words[_TAIL_W])

    @property
    def lost_total(self) -> int:
        """Records lost because the ring was full, plus those abandoned by `drain(final=True)`."""
        self._check_open()
        return int(self._words[_LOST_TOTAL_W]) + self._abandoned

    @property
    def abandoned(self) -> int:
        """Records reserved but never committed, skipped by `drain(final=True)` (their event is unknown)."""
        return self._abandoned

    def lost_per_event(self) -> dict[int, int]:
        """{event index: records lost because the ring was full}, for every index 0..nevents-1."""
        self._check_open()
        return {e: int(self._words[_LOST_W + e]) for e in range(self._nevents)}

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("use of a closed ring")

    def close(self) -> None:
        """Unmap the ring and close its fd; later writes and drains raise ValueError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._commit = self._commit_python  # raises ValueError now that the ring is closed
        if self._code is not None:
            _unmap_code(self._code)
            self._code = None
        self._anchor = None
        del self._records, self._seq, self._bytes, self._lines
        self._words.release()
        self._mm.close()
        os.close(self._fd)

    def __enter__(self) -> Ring:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"<Ring {state} capacity={self._capacity} nevents={self._nevents}>"
