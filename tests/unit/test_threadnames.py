"""ThreadNames: (pid, FS base, TSC) -> (pid, TID) for records written by trampolines."""

from __future__ import annotations

import numpy as np

from pmu.ring import RECORD_DTYPE
from pmu.threadnames import ThreadNames


def _records(rows: list[tuple[int, int, int]]) -> np.ndarray:
    r = np.zeros(len(rows), RECORD_DTYPE)
    for i, (pid, fs, tsc) in enumerate(rows):
        r[i]["pid"], r[i]["thread"], r[i]["time"] = pid, fs, tsc
    return r


def test_one_thread_per_key_and_reuse_over_time() -> None:
    names = ThreadNames()
    names.note(10, 0xA000, 100, 10, 11)
    names.note(10, 0xB000, 100, 10, 12)
    names.note(10, 0xA000, 500, 10, 13)  # 11 exited; 13 got its TLS block
    r = _records([(10, 0xA000, 150), (10, 0xB000, 160), (10, 0xA000, 600), (10, 0xA000, 50)])
    names.resolve(r)
    assert r["thread"].tolist() == [11, 12, 13, 11]  # before the first note: the first thread noted
    assert r["pid"].tolist() == [10] * 4
    assert names.unnamed == 0


def test_vfork_child_borrows_its_parents_key() -> None:
    names = ThreadNames()
    names.note(10, 0xA000, 100, 10, 10)
    names.note(10, 0xA000, 200, 20, 20)  # vfork: records of (10, A) are the child's
    names.note(10, 0xA000, 300, 10, 10)  # the child exec'd: the parent's again
    assert [names.lookup(10, 0xA000, t) for t in (150, 250, 350)] == [(10, 10), (20, 20), (10, 10)]


def test_unknown_keys_go_to_the_main_thread() -> None:
    names = ThreadNames()
    r = _records([(30, 0, 1), (30, 0xC000, 2)])
    names.resolve(r)
    assert r["thread"].tolist() == [30, 30]
    assert names.unnamed == 1  # no TLS yet is not counted: only the main thread can run then


def test_many_interleaved_runs_take_the_sorting_path() -> None:
    names = ThreadNames()
    for k in range(4):
        names.note(10, 0x1000 * (k + 1), 0, 10, 100 + k)
    names.note(10, 0x1000, 5000, 10, 200)
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 4, 10000)
    r = _records([(10, 0x1000 * (int(k) + 1), i) for i, k in enumerate(keys)])
    names.resolve(r)
    expected = [100 + int(k) if not (k == 0 and i >= 5000) else 200 for i, k in enumerate(keys)]
    assert r["thread"].tolist() == expected
