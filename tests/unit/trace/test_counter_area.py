"""CounterArea: the pmu-side reader and writer of the trampolines' counter area (trampoline.py's layout),
on a real memfd laid out as a trampoline leaves it."""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from pmu.trace import trampoline
from pmu.trace.tasks import CounterArea


def _area() -> CounterArea:
    fd = os.memfd_create("test-counters")
    os.ftruncate(fd, trampoline.AREA_BYTES)
    return CounterArea(fd, mmap.mmap(fd, trampoline.AREA_BYTES), 0x7000_0000, trampoline.AREA_BYTES)


def _claim(area: CounterArea, row: int, fs: int, counts: dict[int, int]) -> None:
    """What a trampoline does for thread fs in row `row`: the key, then counts per site column."""
    struct.pack_into("<Q", area.mem, trampoline.KEYS + 8 * row, fs)
    for column, n in counts.items():
        struct.pack_into("<Q", area.mem, trampoline.ROWS + 8 * (row * trampoline.NSITES + column), n)


def test_row_sums_every_row_a_thread_holds() -> None:
    area = _area()
    _claim(area, 3, 0xAAA0, {0: 5, 2: 7})
    _claim(area, 900, 0xAAA0, {0: 1})  # a second row of the same thread
    _claim(area, 4, 0xBBB0, {0: 100})
    got = area.row(0xAAA0)
    assert got[0] == 6 and got[2] == 7 and got.sum() == 13
    assert area.row(0xBBB0)[0] == 100
    assert not area.row(0xCCC0).any() and not area.row(0).any()
    area.close()


def test_free_rows_zeroes_counts_and_keys_of_one_thread_only() -> None:
    area = _area()
    _claim(area, 1, 0xAAA0, {1: 9})
    _claim(area, 2, 0xAAA0, {1: 1})
    _claim(area, 5, 0xBBB0, {1: 4})
    area.free_rows(0xAAA0)
    assert not area.row(0xAAA0).any()
    assert area.row(0xBBB0)[1] == 4
    view = np.frombuffer(area.mem, dtype="<u8")
    assert view[trampoline.KEYS // 8 + 1] == 0 and view[trampoline.KEYS // 8 + 2] == 0
    area.close()


def test_unowned_counts_strangers_rows_and_misses_of_the_given_columns() -> None:
    area = _area()
    _claim(area, 0, 0xAAA0, {0: 10, 1: 20})
    _claim(area, 1, 0xDEAD0, {0: 3, 1: 4})  # a thread pmu never saw
    struct.pack_into("<Q", area.mem, trampoline.MISS + 8 * 0, 2)
    struct.pack_into("<Q", area.mem, trampoline.MISS + 8 * 1, 50)
    assert area.unowned({0, 0xAAA0}, [0]) == 3 + 2
    assert area.unowned({0, 0xAAA0}, [0, 1]) == 3 + 2 + 4 + 50
    assert area.unowned({0, 0xAAA0, 0xDEAD0}, [1]) == 50
    area.close()


def test_enabled_flags_and_format() -> None:
    parent, child = _area(), _area()
    parent.set_enabled(0, True)
    parent.set_enabled(5, True)
    parent.set_enabled(5, False)
    parent.set_enabled(63, True)
    child.copy_enabled(parent)
    flags = child.mem[trampoline.ENABLED : trampoline.ENABLED + trampoline.NSITES]
    assert [i for i, b in enumerate(flags) if b] == [0, 63]
    child.format(123456)
    assert struct.unpack_from("<I", child.mem, trampoline.PID)[0] == 123456
    assert struct.unpack_from("<Q", child.mem, trampoline.KEYS)[0] == trampoline.RESERVED  # row 0
    parent.close()
    child.close()


def test_modes_of_enabled_sites() -> None:
    """ON, ON_TCB once every thread has its TCB, ON_LOCKED over both once two threads share a row;
    disabled sites stay 0 whatever the mode, and a child's area starts in its parent's mode."""
    area = _area()

    def flags() -> list[int]:
        return list(area.mem[trampoline.ENABLED : trampoline.ENABLED + 3])

    area.set_enabled(0, True)
    area.set_enabled(2, True)
    assert flags() == [trampoline.ON, 0, trampoline.ON]
    area.set_tcb(True)
    assert flags() == [trampoline.ON_TCB, 0, trampoline.ON_TCB]
    area.set_enabled(1, True)
    assert flags() == [trampoline.ON_TCB] * 3
    area.set_tcb(False)
    assert flags() == [trampoline.ON] * 3
    area.set_tcb(True)
    child = _area()
    child.copy_enabled(area)
    assert child.tcb and list(child.mem[trampoline.ENABLED : trampoline.ENABLED + 3]) == flags()
    area.lock()
    area.set_enabled(1, False)
    area.set_tcb(False)
    assert flags() == [trampoline.ON_LOCKED, 0, trampoline.ON_LOCKED]
    area.close()
    child.close()
