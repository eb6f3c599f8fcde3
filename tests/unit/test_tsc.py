"""Tests of pmu.tsc against the real TSC and CLOCK_MONOTONIC: the machine code read back with capstone,
calibration points bracketed by time.monotonic_ns(), and the conversion's shape (monotone, continuous)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import capstone
import numpy as np
import pytest

from pmu import tsc
from pmu.tsc import READ_TSC_CODE, SAMPLE_CODE, Calibration, Sample, read_tsc, sample

SLACK_NS = 2_000


@pytest.fixture(scope="module")
def cal() -> Calibration:
    """A calibration over ~50 ms, sampled every ~10 ms."""
    c = Calibration()
    for _ in range(5):
        time.sleep(0.01)
        assert c.add()
    return c


def test_read_tsc_increases() -> None:
    values = [read_tsc() for _ in range(1000)]
    assert values[0] > 0
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] > values[0]


@pytest.mark.parametrize("code", [READ_TSC_CODE, SAMPLE_CODE], ids=["read_tsc", "sample"])
def test_code_is_what_its_comments_say(code: Sequence[tuple[bytes, str]]) -> None:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for raw, comment in code:
        insns = list(md.disasm(raw, 0))
        assert len(insns) == 1 and insns[0].size == len(raw), comment
        assert f"{insns[0].mnemonic} {insns[0].op_str}".strip() == comment.split("  #")[0]
    whole = tsc.assemble(code)
    assert sum(i.size for i in md.disasm(whole, 0)) == len(whole)


def test_read_tsc_code() -> None:
    text = [comment.split("  #")[0] for _, comment in READ_TSC_CODE]
    assert text == ["rdtsc", "shl rdx, 0x20", "or rax, rdx", "ret"]


def test_sample_code() -> None:
    text = [comment.split("  #")[0] for _, comment in SAMPLE_CODE]
    call = text.index("call r12")
    # Callee-saved registers are pushed, then popped in reverse: entry rsp is 8 mod 16, 3 pushes align it.
    pushes = [t for t in text[:call] if t.startswith("push")]
    assert pushes == ["push rbx", "push r12", "push r13"]
    assert text[-4:] == ["pop r13", "pop r12", "pop rbx", "ret"]
    assert not any(t.startswith(("push", "pop", "sub rsp", "add rsp")) for t in text[len(pushes) : -4])
    # t0 is read and fenced before the call; the second read is fenced after it.
    assert text[:call].count("rdtsc") == 1 and text[text.index("rdtsc") + 1] == "lfence"
    assert text[call + 1 : call + 3] == ["lfence", "rdtsc"]
    assert f"mov edi, {time.CLOCK_MONOTONIC}" in text[:call] and "lea rsi, [rbx + 0x10]" in text[:call]
    assert text[-6:-4] == ["mov qword ptr [rbx], r13", "mov qword ptr [rbx + 8], rax"]


@pytest.mark.parametrize("take", [sample, tsc._sample_python], ids=["native", "python"])
def test_sample_brackets_the_clock(take: Callable[[], Sample]) -> None:
    before = time.monotonic_ns()
    s = take()
    after = time.monotonic_ns()
    assert isinstance(s, Sample)
    assert 0 <= s.width < 100_000
    assert before <= s.ns <= after
    t = read_tsc()
    assert s.tsc <= t


def test_calibration_converts_a_fresh_read(cal: Calibration) -> None:
    err = cal.error_ns()
    # Between two samples (interpolated) and after the last one (extrapolated, a few µs).
    for add_after in (True, False):
        before = time.monotonic_ns()
        t = read_tsc()
        after = time.monotonic_ns()
        if add_after:
            time.sleep(0.005)
            assert cal.add()
        ns = cal.to_ns_scalar(t)
        assert before - err - SLACK_NS <= ns <= after + err + SLACK_NS
        assert int(cal.to_ns(np.array([t], dtype=np.int64))[0]) == ns


def test_calibration_basics(cal: Calibration) -> None:
    s = cal.samples
    assert len(s) >= 6
    assert all(a.tsc < b.tsc and a.ns < b.ns for a, b in zip(s, s[1:], strict=False))
    assert 0.1 < cal.ticks_per_ns < 10
    assert 0 <= cal.error_ns() < 5_000


def test_continuous_at_samples(cal: Calibration) -> None:
    s = cal.samples
    at = cal.to_ns(np.array([x.tsc for x in s], dtype=np.int64))
    assert np.all(np.abs(at - np.array([x.ns for x in s])) <= 1)
    # Just left of each interior sample, the previous segment ends within a tick's worth of ns.
    left = cal.to_ns(np.array([x.tsc - 1 for x in s[1:-1]], dtype=np.int64))
    assert np.all(at[1:-1] - left >= 0) and np.all(at[1:-1] - left <= 2)


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_monotone_beyond_both_ends(cal: Calibration, order: str) -> None:
    s = cal.samples
    span = s[-1].tsc - s[0].tsc
    rng = np.random.default_rng(7)
    x = np.sort(rng.integers(s[0].tsc - span, s[-1].tsc + span, 200_000, dtype=np.int64))
    x = np.concatenate([x, [p.tsc for p in s]])
    x.sort()
    if order == "sorted":
        ns = cal.to_ns(x)
    else:
        perm = rng.permutation(x.size)
        ns = np.empty_like(x)
        ns[perm] = cal.to_ns(x[perm])
    assert ns.dtype == np.int64 and ns.shape == x.shape
    assert np.all(np.diff(ns) >= 0)
    # Both paths and the scalar version do the same arithmetic.
    for i in rng.integers(0, x.size, 200):
        assert int(ns[i]) == cal.to_ns_scalar(int(x[i]))


def test_to_ns_million(cal: Calibration) -> None:
    s = cal.samples
    x = np.linspace(s[0].tsc, s[-1].tsc, 1_000_000).astype(np.int64)
    ns = cal.to_ns(x)
    assert ns.shape == (1_000_000,)
    assert ns[0] == s[0].ns and ns[-1] == s[-1].ns
    assert np.all(np.diff(ns) >= 0)
    assert cal.to_ns(x.reshape(1000, 1000)).shape == (1000, 1000)
    assert cal.to_ns(np.array([], dtype=np.int64)).shape == (0,)
