"""Time-stamp counter (TSC) to CLOCK_MONOTONIC conversion, with a measured error bound.

Why TSC: a jump-optimized probe's trampoline runs inside the traced process and must stamp its record in
a few cycles, with no syscall and no call into the vDSO (whose data page the trampoline cannot find
cheaply). `rdtsc` is one instruction; with constant_tsc/nonstop_tsc (and the TSC as the kernel's
clocksource) it ticks at a fixed rate on every CPU, so pmu converts the raw values to CLOCK_MONOTONIC
nanoseconds afterwards, in bulk.

Calibration: `sample()` runs a few bytes of hand-encoded machine code, `rdtsc; lfence`,
`clock_gettime(CLOCK_MONOTONIC)` (libc's, hence the vDSO's), `lfence; rdtsc`, and keeps the narrowest of a
few tries; the lfences keep each TSC read on its side of the clock's own. The clock was read somewhere
between the two TSC reads: a `Sample` pairs their midpoint `tsc` with the clock's `ns`, and `width` is the
bracket in ticks. A `Calibration` takes two samples 2 ms apart when made (so it always has a segment to
extrapolate with), then one per `add()` (every ~50 ms while recording, and at the end). `to_ns` is
piecewise linear between consecutive samples, computed from each segment's origin (`ns_k + rint((tsc -
tsc_k) * slope_k)`) so float64 loses nothing; before the first and after the last sample it extends the
first and last segment. It is monotone non-decreasing and takes exactly `ns_k` at each sample's `tsc_k`.
The kernel itself computes CLOCK_MONOTONIC as a linear function of the TSC whose slope NTP adjusts now
and then, so between samples a straight line is a close model.

`error_ns()` is the stated error of a converted value between the first and last sample: the largest
half-bracket (where in its bracket a clock read fell is unknown) in ns, plus the largest distance of an
interior sample from the straight line through its two neighbours (how far the clock bends between
samples, NTP slewing included). It is a measured estimate, not a proof; values outside the sampled
span drift further, by the end segments' slope error times the distance.

The code is mapped read+execute from a memfd (pmu.ring's `_map_code`: never writable and executable at
once), once, lazily. Without executable memory there is no way to read the TSC from Python: `read_tsc`,
and so `sample` and `Calibration`, raise OSError. If only the sampling code cannot be mapped, `sample`
falls back to `read_tsc(); time.monotonic_ns(); read_tsc()`: correct, with a bracket a few times wider.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from pmu.ring import _map_code

READ_TSC_CODE: Final[Sequence[tuple[bytes, str]]] = (
    (b"\x0f\x31", "rdtsc  # edx:eax = TSC"),
    (b"\x48\xc1\xe2\x20", "shl rdx, 0x20"),
    (b"\x48\x09\xd0", "or rax, rdx  # return the 64-bit TSC"),
    (b"\xc3", "ret"),
)
"""`uint64_t read_tsc(void)`: each entry is one instruction and its capstone text, then `  # note`."""

SAMPLE_CODE: Final[Sequence[tuple[bytes, str]]] = (
    (b"\x53", "push rbx"),
    (b"\x41\x54", "push r12"),
    (b"\x41\x55", "push r13  # three pushes: rsp is 16-byte aligned at the call"),
    (b"\x48\x89\xfb", "mov rbx, rdi  # out: u64[4] = t0, t1, tv_sec, tv_nsec"),
    (b"\x49\x89\xf4", "mov r12, rsi  # clock_gettime"),
    (b"\x0f\x31", "rdtsc"),
    (b"\x0f\xae\xe8", "lfence  # later instructions wait for t0"),
    (b"\x48\xc1\xe2\x20", "shl rdx, 0x20"),
    (b"\x48\x09\xd0", "or rax, rdx"),
    (b"\x49\x89\xc5", "mov r13, rax  # t0"),
    (b"\xbf\x01\x00\x00\x00", "mov edi, 1  # CLOCK_MONOTONIC"),
    (b"\x48\x8d\x73\x10", "lea rsi, [rbx + 0x10]  # &out[2], a struct timespec"),
    (b"\x41\xff\xd4", "call r12"),
    (b"\x0f\xae\xe8", "lfence  # t1 waits for the clock's own TSC read"),
    (b"\x0f\x31", "rdtsc"),
    (b"\x48\xc1\xe2\x20", "shl rdx, 0x20"),
    (b"\x48\x09\xd0", "or rax, rdx  # t1"),
    (b"\x4c\x89\x2b", "mov qword ptr [rbx], r13"),
    (b"\x48\x89\x43\x08", "mov qword ptr [rbx + 8], rax"),
    (b"\x41\x5d", "pop r13"),
    (b"\x41\x5c", "pop r12"),
    (b"\x5b", "pop rbx"),
    (b"\xc3", "ret"),
)
"""`void sample(uint64_t out[4], void *clock_gettime)`, annotated as `READ_TSC_CODE`."""


def assemble(code: Sequence[tuple[bytes, str]]) -> bytes:
    """The machine code of an annotated listing."""
    return b"".join(b for b, _ in code)


@functools.cache
def _reader() -> Callable[[], int] | None:
    addr = _map_code(assemble(READ_TSC_CODE))
    return None if addr is None else ctypes.PYFUNCTYPE(ctypes.c_uint64)(addr)


@functools.cache
def _sampler() -> Callable[[int, int], None] | None:
    addr = _map_code(assemble(SAMPLE_CODE))
    return None if addr is None else ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(addr)


@functools.cache
def _clock_gettime() -> int:
    addr = ctypes.cast(ctypes.CDLL(None).clock_gettime, ctypes.c_void_p).value
    if addr is None:
        raise OSError("clock_gettime not found in libc")
    return addr


def read_tsc() -> int:
    """The current TSC (`rdtsc`, not ordered against nearby instructions); OSError if it cannot be run."""
    read = _reader()
    if read is None:
        raise OSError("cannot map executable memory to run rdtsc")
    return read()


@dataclass(frozen=True, slots=True)
class Sample:
    """One calibration point: CLOCK_MONOTONIC read `ns` while the TSC was within `tsc` ± `width` / 2."""

    tsc: int
    ns: int
    width: int


def _sample_python() -> Sample:
    t0 = read_tsc()
    ns = time.monotonic_ns()
    t1 = read_tsc()
    return Sample((t0 + t1) // 2, ns, t1 - t0)


def sample(tries: int = 5) -> Sample:
    """The narrowest of `tries` (at least 1) calibration points taken now (see the module docstring)."""
    run = _sampler()
    if run is None:
        return min((_sample_python() for _ in range(max(tries, 1))), key=lambda s: s.width)
    out = (ctypes.c_uint64 * 4)()
    addr, clock = ctypes.addressof(out), _clock_gettime()
    best = Sample(0, 0, 1 << 64)
    for _ in range(max(tries, 1)):
        run(addr, clock)
        t0, t1, sec, nsec = out
        if t1 - t0 < best.width:
            best = Sample((t0 + t1) // 2, sec * 1_000_000_000 + nsec, t1 - t0)
    return best


class Calibration:
    """TSC-to-CLOCK_MONOTONIC conversion from samples taken at construction and at each `add()`."""

    def __init__(self) -> None:
        self._samples: list[Sample] = []
        self._arrays: tuple[list[int], list[int], list[float]] | None = None
        self.add()
        time.sleep(0.002)
        if not self.add():
            raise OSError("the TSC or CLOCK_MONOTONIC did not advance in 2 ms: the TSC is not usable")

    @property
    def samples(self) -> tuple[Sample, ...]:
        """The samples kept, in increasing tsc (and ns) order."""
        return tuple(self._samples)

    def add(self) -> bool:
        """Take a sample now; False if it was dropped for not being later than the last in both tsc and ns."""
        s = sample()
        if self._samples and (s.tsc <= self._samples[-1].tsc or s.ns <= self._samples[-1].ns):
            return False
        self._samples.append(s)
        if self._arrays is not None:  # extend the segments (a long run adds thousands of samples)
            t, n, slopes = self._arrays
            slopes.append((s.ns - n[-1]) / (s.tsc - t[-1]))
            t.append(s.tsc)
            n.append(s.ns)
        return True

    def _segments(self) -> tuple[list[int], list[int], list[float]]:
        """Sample tsc, sample ns, and the slope (ns per tick) of each of the len - 1 segments."""
        if self._arrays is None:
            t = [s.tsc for s in self._samples]
            n = [s.ns for s in self._samples]
            slopes = [(n[k + 1] - n[k]) / (t[k + 1] - t[k]) for k in range(len(t) - 1)]
            self._arrays = (t, n, slopes)
        return self._arrays

    @property
    def ticks_per_ns(self) -> float:
        """The mean TSC rate over the whole calibration, in ticks per nanosecond."""
        first, last = self._samples[0], self._samples[-1]
        return (last.tsc - first.tsc) / (last.ns - first.ns)

    def to_ns_scalar(self, tsc: int) -> int:
        """`to_ns` for one value (the same arithmetic, the same result)."""
        t, n, slopes = self._segments()
        k = bisect.bisect_right(t, tsc, 1, len(t) - 1) - 1
        return n[k] + round((tsc - t[k]) * slopes[k])

    def to_ns(self, tsc: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """CLOCK_MONOTONIC ns of TSC values (any shape).

        A sorted 1-d array is converted a segment at a time (about 2 ns a value); anything else takes a
        binary search among the samples per value (15-45 ns a value): sort first if that matters.
        """
        x = np.asarray(tsc, dtype=np.int64)
        flat = x.ravel()
        t, n, slopes = self._segments()
        if flat.size:
            # The common case, a batch drained soon after it was written: every value in one segment.
            lo = bisect.bisect_right(t, int(flat.min()), 1, len(t) - 1) - 1
            if lo == bisect.bisect_right(t, int(flat.max()), 1, len(t) - 1) - 1:
                f = (flat - t[lo]).astype(np.float64)
                f *= slopes[lo]
                res = np.rint(f, out=f).astype(np.int64)
                res += n[lo]
                return res.reshape(x.shape)
        inner = np.array(t[1:-1], dtype=np.int64)
        if flat.size > 1 and bool(np.all(flat[1:] >= flat[:-1])):
            # Sorted: each segment is one contiguous slice; loop over the segments that hold values.
            bounds = np.concatenate(([0], np.searchsorted(flat, inner), [flat.size]))
            used = np.flatnonzero(bounds[1:] > bounds[:-1])
            if used.size * 256 <= flat.size:
                out = np.empty_like(flat)
                for k in used.tolist():
                    lo, hi = int(bounds[k]), int(bounds[k + 1])
                    f = (flat[lo:hi] - t[k]).astype(np.float64)
                    f *= slopes[k]
                    out[lo:hi] = np.rint(f, out=f)
                    out[lo:hi] += n[k]
                return out.reshape(x.shape)
        k_ = np.searchsorted(inner, flat, side="right")
        f = (flat - np.array(t, dtype=np.int64)[k_]).astype(np.float64)
        f *= np.array(slopes)[k_]
        res = np.rint(f, out=f).astype(np.int64) + np.array(n, dtype=np.int64)[k_]
        return res.reshape(x.shape)

    def error_ns(self) -> int:
        """The stated error of `to_ns` within the sampled span, in ns (see the module docstring)."""
        s = self._samples
        half = max(x.width for x in s) / 2 / self.ticks_per_ns
        bend = 0.0
        for a, b, c in zip(s, s[1:], s[2:], strict=False):
            line = a.ns + (b.tsc - a.tsc) * (c.ns - a.ns) / (c.tsc - a.tsc)
            bend = max(bend, abs(b.ns - line))
        return math.ceil(half + bend)
