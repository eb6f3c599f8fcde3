"""Tests of pmu.ring: layout, wrap-around, exact lost accounting, the commit protocol, and real concurrency.

C_PRODUCER below is the reference producer of the ring layout in C, the executable form of the
specification in pmu/ring.py's docstring for whoever writes the jump-optimized probes' trampolines. The
tests run several of them (and forked Python producers) against the Python consumer at once.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pmu import ring as ringmod
from pmu.errors import UsageError
from pmu.ring import (
    FLAG_RETURN,
    HEADER_DTYPE,
    HEADER_SIZE,
    MAX_EVENTS,
    MAX_PAGES,
    RECORD_DTYPE,
    RECORD_SIZE,
    ClockKind,
    Ring,
    ThreadKind,
    parse_mmap_pages,
)

C_PRODUCER = r"""
/* Reference producer for pmu's ring, layout version 1 (pmu/ring.py documents it byte by byte).
 *
 *   producer --layout                 print the offset of every header and record field
 *   producer FD ID THREADS COUNT      map the ring in memfd FD (inherited) and, from THREADS threads at
 *                                     once, write COUNT records each, thread j using event ID*THREADS+j
 *
 * Record k of thread j of producer ID holds: ip = ID << 40 | j << 32 | k, args = {ID, j, k, k*3, ~k, 6},
 * retval = ~ip, latency_ns = k, flags = k & 1, time = CLOCK_MONOTONIC, thread = TID, pid = getpid().
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

struct pmu_ring_header {
    uint64_t magic;           /* "PMURING\0" */
    uint32_t version;         /* 1 */
    uint32_t header_size;     /* 4096 */
    uint32_t record_size;     /* 128 */
    uint32_t max_events;      /* 256 */
    uint64_t capacity;        /* power of two */
    uint64_t mask;            /* capacity - 1 */
    uint32_t clock;           /* 0 = CLOCK_MONOTONIC ns, 1 = TSC */
    uint32_t thread;          /* 0 = TID, 1 = FS base */
    uint32_t nevents;
    uint8_t pad0[0x80 - 0x34];
    uint64_t head;            /* CAS by producers */
    uint8_t pad1[0x78];
    uint64_t tail;            /* written by the consumer only */
    uint8_t pad2[0x78];
    uint64_t lost_total;      /* atomic add by producers */
    uint8_t pad3[0x78];
    uint64_t lost[256];       /* atomic add by producers */
    uint8_t pad4[0x1000 - 0xa00];
};

struct pmu_record {
    uint64_t seq;             /* commit word: index + 1, stored last */
    int64_t time;
    uint64_t thread;
    int32_t pid;
    uint32_t event;
    uint64_t ip;
    uint64_t args[6];
    uint64_t retval;
    int64_t latency_ns;
    uint32_t flags;           /* bit 0: return record */
    uint8_t reserved[20];     /* 0 */
};

_Static_assert(sizeof(struct pmu_ring_header) == 4096, "header page");
_Static_assert(offsetof(struct pmu_ring_header, head) == 0x80, "head");
_Static_assert(offsetof(struct pmu_ring_header, tail) == 0x100, "tail");
_Static_assert(offsetof(struct pmu_ring_header, lost_total) == 0x180, "lost_total");
_Static_assert(offsetof(struct pmu_ring_header, lost) == 0x200, "lost");
_Static_assert(sizeof(struct pmu_record) == 128, "record");

/* The whole producer protocol. Returns 1 if the record was committed, 0 if the ring was full. */
static int pmu_ring_write(struct pmu_ring_header *h, const struct pmu_record *rec)
{
    struct pmu_record *records = (struct pmu_record *)((char *)h + h->header_size);
    uint64_t i;
    for (;;) {
        uint64_t t = __atomic_load_n(&h->tail, __ATOMIC_ACQUIRE);   /* tail before head */
        i = __atomic_load_n(&h->head, __ATOMIC_ACQUIRE);
        if (i - t >= h->capacity) {
            __atomic_fetch_add(&h->lost_total, 1, __ATOMIC_RELAXED);
            __atomic_fetch_add(&h->lost[rec->event], 1, __ATOMIC_RELAXED);
            return 0;
        }
        if (__atomic_compare_exchange_n(&h->head, &i, i + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
            break;
    }
    struct pmu_record *slot = &records[i & h->mask];
    memcpy((char *)slot + 8, (const char *)rec + 8, sizeof *rec - 8);
    __atomic_store_n(&slot->seq, i + 1, __ATOMIC_RELEASE);           /* commit, last */
    return 1;
}

static struct pmu_ring_header *ring;
static unsigned long id, count;

static void *run(void *arg)
{
    uint64_t j = (uint64_t)(uintptr_t)arg;
    uint32_t event = (uint32_t)(id * 2 + j);
    for (uint64_t k = 0; k < count; k++) {
        struct pmu_record r;
        struct timespec ts;
        memset(&r, 0, sizeof r);
        clock_gettime(CLOCK_MONOTONIC, &ts);
        r.time = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
        r.thread = (uint64_t)gettid();
        r.pid = getpid();
        r.event = event;
        r.ip = (uint64_t)id << 40 | j << 32 | k;
        r.args[0] = id; r.args[1] = j; r.args[2] = k; r.args[3] = k * 3; r.args[4] = ~k; r.args[5] = 6;
        r.retval = ~r.ip;
        r.latency_ns = (int64_t)k;
        r.flags = (uint32_t)(k & 1);
        pmu_ring_write(ring, &r);
    }
    return NULL;
}

#define F(s, f) printf(#s "." #f " %zu\n", offsetof(struct pmu_##s, f))
int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "--layout") == 0) {
        F(ring_header, magic); F(ring_header, version); F(ring_header, header_size);
        F(ring_header, record_size); F(ring_header, max_events); F(ring_header, capacity);
        F(ring_header, mask); F(ring_header, clock); F(ring_header, thread); F(ring_header, nevents);
        F(ring_header, head); F(ring_header, tail); F(ring_header, lost_total); F(ring_header, lost);
        F(record, seq); F(record, time); F(record, thread); F(record, pid); F(record, event);
        F(record, ip); F(record, args); F(record, retval); F(record, latency_ns); F(record, flags);
        return 0;
    }
    if (argc != 5) return 2;
    int fd = atoi(argv[1]);
    id = strtoul(argv[2], NULL, 0);
    unsigned long threads = strtoul(argv[3], NULL, 0);
    count = strtoul(argv[4], NULL, 0);
    struct stat st;
    if (fstat(fd, &st) < 0) { perror("fstat"); return 1; }
    ring = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ring == MAP_FAILED) { perror("mmap"); return 1; }
    if (memcmp(&ring->magic, "PMURING", 8) || ring->version != 1 || ring->record_size != 128
        || ring->header_size != 4096 || threads > 2 || id * 2 + threads > ring->nevents) {
        fprintf(stderr, "not a version-1 pmu ring, or too few events\n");
        return 1;
    }
    pthread_t tids[2];
    for (unsigned long j = 0; j < threads; j++)
        pthread_create(&tids[j], NULL, run, (void *)(uintptr_t)j);
    for (unsigned long j = 0; j < threads; j++)
        pthread_join(tids[j], NULL);
    return 0;
}
"""

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.fixture(scope="module")
def producer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C producer, compiled once."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    d = tmp_path_factory.mktemp("producer")
    (d / "producer.c").write_text(C_PRODUCER)
    exe = d / "producer"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-pthread", "-o", exe, d / "producer.c"], check=True)
    return exe


@pytest.fixture(params=["native", "python"])
def make_ring(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Ring]]:
    """Ring.create with the atomic machine-code writer, or with the single-producer Python fallback."""
    if request.param == "python":
        monkeypatch.setattr(ringmod, "_map_code", lambda code: None)
    rings: list[Ring] = []

    def make(pages: int = 1, nevents: int = 4, **kw: Any) -> Ring:
        r = Ring.create(pages, nevents, **kw)
        assert r.atomic == (request.param == "native")
        rings.append(r)
        return r

    yield make
    for r in rings:
        r.close()


def header(r: Ring) -> np.void:
    """The ring's header page as HEADER_DTYPE, read through the fd (not through the Ring)."""
    return np.frombuffer(os.pread(r.fd, HEADER_SIZE, 0), HEADER_DTYPE)[0]


def put(r: Ring, n: int, event: int = 0, start: int = 0) -> list[bool]:
    """Write n records whose time is start, start+1, ...; returns what each write returned."""
    return [r.write(event, start + i, 1000 + i, 42, 0x400000 + i) for i in range(n)]


# -- layout ------------------------------------------------------------------------------------------


def test_record_dtype_layout() -> None:
    assert RECORD_DTYPE.itemsize == RECORD_SIZE == 128
    offsets = {name: RECORD_DTYPE.fields[name][1] for name in RECORD_DTYPE.names}
    assert offsets == {
        "seq": 0x00,
        "time": 0x08,
        "thread": 0x10,
        "pid": 0x18,
        "event": 0x1C,
        "ip": 0x20,
        "args": 0x28,
        "retval": 0x58,
        "latency_ns": 0x60,
        "flags": 0x68,
    }
    assert all(RECORD_DTYPE.fields[n][0].byteorder in "<|=" for n in RECORD_DTYPE.names)
    assert HEADER_DTYPE.itemsize == HEADER_SIZE == 4096


def test_c_layout_matches_numpy(producer: Path) -> None:
    out = subprocess.run([producer, "--layout"], capture_output=True, text=True, check=True).stdout
    c = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()}
    for name in HEADER_DTYPE.names:
        assert c[f"ring_header.{name}"] == HEADER_DTYPE.fields[name][1], name
    for name in RECORD_DTYPE.names:
        assert c[f"record.{name}"] == RECORD_DTYPE.fields[name][1], name


@needs_gcc
def test_write_code_is_the_listing(tmp_path: Path) -> None:
    """The machine code Ring.write runs is the assembly in _WRITE_ASM, byte for byte."""
    if shutil.which("objcopy") is None:
        pytest.skip("objcopy is not installed")
    hdr, body = 0x1122334455667788, 0x0123456789ABCDEF
    src = ".intel_syntax noprefix\n.text\n" + ringmod._WRITE_ASM.replace("HEADER", hex(hdr)).replace(
        "BODY", hex(body)
    )
    (tmp_path / "w.S").write_text(src)
    subprocess.run(["gcc", "-c", "-o", tmp_path / "w.o", tmp_path / "w.S"], check=True)
    subprocess.run(
        ["objcopy", "-O", "binary", "-j", ".text", tmp_path / "w.o", tmp_path / "w.bin"], check=True
    )
    assert (tmp_path / "w.bin").read_bytes() == ringmod._write_code(hdr, body)


def test_header_fields(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(3, 7, clock=ClockKind.TSC, thread=ThreadKind.FS_BASE)
    h = header(r)
    assert bytes(h["magic"].tobytes()) == b"PMURING\0"
    assert (int(h["version"]), int(h["header_size"]), int(h["record_size"])) == (1, 4096, 128)
    assert int(h["max_events"]) == MAX_EVENTS
    assert int(h["capacity"]) == r.capacity == 128  # 3 pages -> 4 pages of 32 records
    assert int(h["mask"]) == 127
    assert (int(h["clock"]), int(h["thread"]), int(h["nevents"])) == (1, 1, 7)
    assert (int(h["head"]), int(h["tail"]), int(h["lost_total"])) == (0, 0, 0)
    assert os.fstat(r.fd).st_size == r.size == 4096 + 128 * 128
    assert (r.clock, r.thread_kind, r.nevents) == (ClockKind.TSC, ThreadKind.FS_BASE, 7)


@pytest.mark.parametrize(("pages", "capacity"), [(1, 32), (2, 64), (3, 128), (1000, 32768), (1024, 32768)])
def test_pages_round_up_to_power_of_two(pages: int, capacity: int) -> None:
    with Ring.create(pages, 1) as r:
        assert r.capacity == capacity


@pytest.mark.parametrize("pages", [0, -1, MAX_PAGES + 1, 1 << 40, True, 2.0])
def test_bad_pages_refused(pages: Any) -> None:
    with pytest.raises(UsageError) as e:
        Ring.create(pages, 1)
    assert "\n" not in str(e.value) and "mmap pages" in str(e.value)


@pytest.mark.parametrize("nevents", [0, MAX_EVENTS + 1])
def test_bad_nevents_refused(nevents: int) -> None:
    with pytest.raises(UsageError):
        Ring.create(1, nevents)


@pytest.mark.parametrize(
    ("text", "pages"),
    [("1", 1), ("3", 4), ("128", 128), ("1B", 1), ("4096B", 1), ("4097b", 2), ("512K", 128)],
)
def test_parse_mmap_pages(text: str, pages: int) -> None:
    assert parse_mmap_pages(text) == pages
    assert parse_mmap_pages("1M") == 256 and parse_mmap_pages("1G") == MAX_PAGES


@pytest.mark.parametrize("text", ["0", "", "x", "-1", "1T", "2G", "1.5M", "0K"])
def test_parse_mmap_pages_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_mmap_pages(text)


# -- write and drain ---------------------------------------------------------------------------------


def test_round_trip_every_field(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1, 4)
    assert r.write(2, 123456789, 4242, 4241, 0x401000, (1, 2, 3))
    assert r.write(3, -5, 2**64 - 1, -1, 2**64 - 1, (2**64 - 1,) * 6, 2**64 - 1, 2**63 - 1, FLAG_RETURN)
    out = r.drain()
    assert out.dtype == RECORD_DTYPE and len(out) == 2
    a, b = out
    assert (a["seq"], a["time"], a["thread"], a["pid"], a["event"], a["ip"]) == (
        1,
        123456789,
        4242,
        4241,
        2,
        0x401000,
    )
    assert list(a["args"]) == [1, 2, 3, 0, 0, 0]
    assert (a["retval"], a["latency_ns"], a["flags"]) == (0, -1, 0)
    assert (b["seq"], b["time"], b["thread"], b["pid"], b["ip"]) == (2, -5, 2**64 - 1, -1, 2**64 - 1)
    assert list(b["args"]) == [2**64 - 1] * 6
    assert (b["retval"], b["latency_ns"], b["flags"]) == (2**64 - 1, 2**63 - 1, 1)
    assert len(r.drain()) == 0 and r.drain().dtype == RECORD_DTYPE
    raw = os.pread(r.fd, RECORD_SIZE * 2, HEADER_SIZE)
    assert raw[0x6C:0x80] == bytes(20) and raw[0x80 + 0x6C :] == bytes(20)  # reserved bytes are 0


def test_reused_slot_gets_zero_args(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1, 1)
    for _ in range(r.capacity):
        r.write(0, 1, 1, 1, 1, (9,) * 6, 9, 9, 1)
    r.drain()
    r.write(0, 1, 1, 1, 1, (7,))
    (rec,) = r.drain()
    assert list(rec["args"]) == [7, 0, 0, 0, 0, 0] and (rec["retval"], rec["latency_ns"], rec["flags"]) == (
        0,
        -1,
        0,
    )


def test_bad_writes_touch_nothing(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1, 2)
    with pytest.raises(ValueError, match="at most 6 args"):
        r.write(0, 1, 1, 1, 1, (1,) * 7)
    with pytest.raises(ValueError, match="event index 2"):
        r.write(2, 1, 1, 1, 1)
    with pytest.raises(struct.error):
        r.write(0, 1, 1, 1, 1, (-1,))
    with pytest.raises(struct.error):
        r.write(-1, 1, 1, 1, 1)
    assert (r.pending, r.lost_total) == (0, 0)
    assert r.write(1, 1, 1, 1, 1)
    assert len(r.drain()) == 1


def test_wrap_around(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1, 1)
    cap = r.capacity
    seen: list[int] = []
    for lap in range(5):
        n = cap * 3 // 4
        assert all(put(r, n, start=lap * 1000))
        out = r.drain()
        assert list(out["time"]) == [lap * 1000 + i for i in range(n)]
        assert list(out["seq"]) == [len(seen) + i + 1 for i in range(n)]
        seen += list(out["seq"])
    assert int(header(r)["head"]) == int(header(r)["tail"]) == 5 * (cap * 3 // 4)
    assert r.lost_total == 0


def test_full_ring_counts_lost_exactly(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1, 3)
    cap = r.capacity
    attempts = {0: 0, 1: 0, 2: 0}
    written = 0
    for i in range(cap * 3 + 5):
        e = i % 3
        attempts[e] += 1
        written += r.write(e, i, 1, 1, 1)
        if i == cap * 2:
            got = r.drain()
            assert list(got["time"]) == list(range(cap))
    assert written == 2 * cap
    lost = r.lost_per_event()
    assert sum(lost.values()) == r.lost_total == sum(attempts.values()) - written
    per_event_written = np.bincount(r.drain()["event"], minlength=3) + np.bincount(got["event"], minlength=3)
    for e in range(3):
        assert per_event_written[e] + lost[e] == attempts[e]
    assert int(header(r)["lost_total"]) == r.lost_total


def test_lost_per_event_lists_every_event(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1, 5)
    put(r, r.capacity, event=4)
    assert not r.write(1, 0, 0, 0, 0)
    assert not r.write(1, 0, 0, 0, 0)
    assert not r.write(3, 0, 0, 0, 0)
    assert r.lost_per_event() == {0: 0, 1: 2, 2: 0, 3: 1, 4: 0}
    assert r.lost_total == 3


def test_drain_limit(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1, 1)
    put(r, 20)
    assert list(r.drain(limit=7)["time"]) == list(range(7))
    assert len(r.drain(limit=0)) == 0
    assert list(r.drain()["time"]) == list(range(7, 20))


class RawProducer:
    """The producer protocol done by hand, through a second mapping, to stop between its steps."""

    def __init__(self, r: Ring) -> None:
        import mmap

        self.mm = mmap.mmap(r.fd, r.size)
        self.words = memoryview(self.mm).cast("Q")
        self.mask = r.capacity - 1

    def reserve(self) -> int:
        h: int = self.words[0x80 // 8]
        self.words[0x80 // 8] = h + 1
        return h

    def commit(self, h: int, time: int) -> None:
        off = HEADER_SIZE + (h & self.mask) * RECORD_SIZE
        struct.pack_into("<qQiIQ", self.mm, off + 8, time, 7, 7, 0, 0x1234)
        self.words[off // 8] = h + 1

    def close(self) -> None:
        self.words.release()
        self.mm.close()


def test_uncommitted_record_stops_the_drain(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1, 1)
    raw = RawProducer(r)
    try:
        put(r, 3)
        gap = raw.reserve()
        put(r, 4, start=100)
        assert r.pending == 8
        assert list(r.drain()["time"]) == [0, 1, 2]
        assert len(r.drain()) == 0 and r.pending == 5
        raw.commit(gap, 50)
        assert list(r.drain()["time"]) == [50, 100, 101, 102, 103]
        assert r.pending == 0 and r.lost_total == 0
    finally:
        raw.close()


def test_uncommitted_record_across_the_wrap(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1, 1)
    raw = RawProducer(r)
    try:
        cap = r.capacity
        put(r, cap - 2)
        r.drain()
        put(r, 3, start=10)  # slots cap-2, cap-1, 0
        gap = raw.reserve()  # slot 1
        put(r, 2, start=20)
        assert list(r.drain()["time"]) == [10, 11, 12]
        raw.commit(gap, 15)
        assert list(r.drain()["time"]) == [15, 20, 21]
    finally:
        raw.close()


def test_final_drain_skips_abandoned(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1, 1)
    raw = RawProducer(r)
    try:
        put(r, 2)
        raw.reserve()
        put(r, 2, start=10)
        raw.reserve()
        assert list(r.drain()["time"]) == [0, 1]
        assert list(r.drain(final=True)["time"]) == [10, 11]
        assert (r.abandoned, r.lost_total, r.pending) == (2, 2, 0)
        assert all(put(r, r.capacity, start=100))  # every slot is usable again
        assert list(r.drain()["time"]) == list(range(100, 100 + r.capacity))
    finally:
        raw.close()


def test_big_bulk_drains(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1 << 13, 2)  # 262144 records
    cap = r.capacity
    start = cap // 3
    put(r, start)
    assert len(r.drain()) == start
    n = cap  # a whole ring's worth, wrapping in the middle
    assert all(r.write(i & 1, i, i, i, i) for i in range(n))
    assert not r.write(0, 0, 0, 0, 0)
    out = r.drain()
    assert len(out) == n
    np.testing.assert_array_equal(out["time"], np.arange(n))
    np.testing.assert_array_equal(out["seq"], np.arange(start + 1, start + n + 1, dtype=np.uint64))
    np.testing.assert_array_equal(out["event"], np.arange(n) & 1)
    assert r.lost_per_event() == {0: 1, 1: 0}


def test_close_and_context_manager() -> None:
    with Ring.create(1, 1) as r:
        r.write(0, 1, 1, 1, 1)
        fd = r.fd
    with pytest.raises(OSError):
        os.fstat(fd)
    r.close()  # idempotent
    with pytest.raises(ValueError):
        r.write(0, 1, 1, 1, 1)
    with pytest.raises(ValueError):
        r.drain()
    with pytest.raises(ValueError):
        _ = r.lost_total
    assert "closed" in repr(r)


def test_attach_shares_the_ring() -> None:
    with Ring.create(2, 3) as a, Ring.attach(a.fd) as b:
        assert (b.capacity, b.nevents) == (a.capacity, a.nevents)
        assert b.fd != a.fd
        put(a, 5)
        assert list(b.drain()["time"]) == list(range(5))
        assert a.pending == 0
    fd = os.memfd_create("not-a-ring")
    try:
        os.write(fd, bytes(8192))
        with pytest.raises(ValueError, match="not a pmu ring"):
            Ring.attach(fd)
    finally:
        os.close(fd)


# -- concurrency -------------------------------------------------------------------------------------


def check_producer_records(records: np.ndarray, ids: range, threads: int, count: int, r: Ring) -> None:
    """Every record of C_PRODUCER arrives exactly once, intact and in its thread's order, or is lost."""
    lost = r.lost_per_event()
    assert r.lost_total == sum(lost.values())
    got_total = 0
    for pid_ in ids:
        for j in range(threads):
            e = pid_ * 2 + j
            mine = records[records["event"] == e]
            k = mine["ip"] & 0xFFFFFFFF
            assert np.all(mine["ip"] >> 32 == (pid_ << 8 | j))
            assert np.all(np.diff(k.astype(np.int64)) > 0), "records of one thread out of order or repeated"
            assert len(mine) + lost[e] == count, (e, len(mine), lost[e])
            args = mine["args"]
            assert np.all(args[:, 0] == pid_) and np.all(args[:, 1] == j) and np.all(args[:, 2] == k)
            assert np.all(args[:, 3] == k * 3) and np.all(args[:, 4] == ~k) and np.all(args[:, 5] == 6)
            assert np.all(mine["retval"] == ~mine["ip"])
            assert np.all(mine["latency_ns"] == k.astype(np.int64)) and np.all(mine["flags"] == (k & 1))
            assert len(set(mine["pid"].tolist())) <= 1 and len(set(mine["thread"].tolist())) <= 1
            got_total += len(mine)
    assert got_total == len(records)


def drain_while(r: Ring, running: Callable[[], bool], pause: float = 0.0) -> np.ndarray:
    """Drain until running() is false (every `pause` s, or as fast as possible), then once more."""
    chunks = []
    while running():
        chunks.append(r.drain())
        if pause:
            time.sleep(pause)
    chunks.append(r.drain())
    assert r.pending == 0
    return np.concatenate(chunks)


@pytest.mark.parametrize(("pages", "pause"), [(2, 0.0002), (2, 0.0), (64, 0.0002), (64, 0.0)])
def test_c_producers_concurrently(producer: Path, pages: int, pause: float) -> None:
    """4 processes x 2 threads write with the documented CAS protocol while Python drains.

    A small ring drained now and then makes producers race for the last free slots; one drained
    continuously makes the consumer read records the moment they are committed.
    """
    count = 50000
    with Ring.create(pages, 8) as r:
        procs = [
            subprocess.Popen([producer, str(r.fd), str(i), "2", str(count)], pass_fds=[r.fd])
            for i in range(4)
        ]
        records = drain_while(r, lambda: any(p.poll() is None for p in procs), pause)
        assert [p.returncode for p in procs] == [0] * 4
        check_producer_records(records, range(4), 2, count, r)
        assert len(records) > 0
        assert np.all(np.diff(records["seq"].astype(np.int64)) == 1)
        assert int(records["seq"][-1]) + r.lost_total == 8 * count


def test_c_and_python_producers_concurrently(producer: Path) -> None:
    """C producers and forked Python producers (Ring.write) share one ring; Python's write is atomic too."""
    count = 20000
    with Ring.create(8, 8) as r:
        if not r.atomic:
            pytest.skip("no executable memory here: Ring.write is single-producer")
        procs = [
            subprocess.Popen([producer, str(r.fd), str(i), "2", str(count)], pass_fds=[r.fd]) for i in (0, 1)
        ]
        children = []
        for i in (2, 3):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                status = 0
                try:
                    for k in range(count):
                        for j in range(2):  # two "threads", interleaved, numbered as C_PRODUCER's
                            ip = i << 40 | j << 32 | k
                            args = (i, j, k, k * 3, ~k & (2**64 - 1), 6)
                            r.write(
                                i * 2 + j,
                                time.monotonic_ns(),
                                1,
                                os.getpid(),
                                ip,
                                args,
                                ~ip & (2**64 - 1),
                                k,
                                k & 1,
                            )
                except BaseException:
                    status = 1
                os._exit(status)
            children.append(pid)
        done: dict[int, int] = {}

        def running() -> bool:
            for pid in children:
                if pid not in done:
                    got, status = os.waitpid(pid, os.WNOHANG)
                    if got:
                        done[pid] = status
            return len(done) < len(children) or any(p.poll() is None for p in procs)

        records = drain_while(r, running)
        assert [p.returncode for p in procs] == [0, 0] and list(done.values()) == [0, 0]
        check_producer_records(records, range(4), 2, count, r)
        assert int(records["seq"][-1]) + r.lost_total == 8 * count


def test_forked_child_writes_into_parents_ring(make_ring: Callable[..., Ring]) -> None:
    r = make_ring(1, 1)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(0 if all(put(r, 10)) else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert list(r.drain()["time"]) == list(range(10))


def test_take_copies_words_of_the_committed_prefix(make_ring: Callable[..., Ring]) -> None:
    """The first words of committed records (across the wrap), stopping at an uncommitted one."""
    r = make_ring(1, 1)
    raw = RawProducer(r)
    try:
        cap = r.capacity
        put(r, cap - 2)
        r.drain()
        put(r, 3, start=10)  # slots cap-2, cap-1, 0
        gap = raw.reserve()  # slot 1
        put(r, 2, start=20)
        words = r.take(100, 5)
        assert words.shape == (3, 5)
        assert words[:, 1].tolist() == [10, 11, 12]  # word 1: time
        assert words[:, 0].tolist() == [cap - 1, cap, cap + 1]  # word 0: seq = index + 1
        assert r.pending == 3  # the taken ones are freed, the rest wait for the gap
        raw.commit(gap, 15)
        assert r.take(2, 2)[:, 1].tolist() == [15, 20]
        assert r.take(100, 16)[:, 1].tolist() == [21]
        assert r.pending == 0 and r.lost_total == 0
        with pytest.raises(ValueError):
            r.take(1, 17)
    finally:
        raw.close()
