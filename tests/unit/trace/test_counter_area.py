"""CounterArea: the pmu-side reader and writer of the trampolines' counter area (trampoline.py's layout),
on a real memfd laid out as a trampoline leaves it."""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from pmu.trace import trampoline
from pmu.trace.tasks import CounterArea, CounterBank


def _bank() -> CounterBank:
    fd = os.memfd_create("test-counters")
    os.ftruncate(fd, trampoline.AREA_BYTES)
    mem = mmap.mmap(fd, trampoline.AREA_BYTES)
    os.close(fd)
    return CounterBank(mem, 0x7000_0000, trampoline.AREA_BYTES)


def _area(banks: int = 1) -> CounterArea:
    return CounterArea([_bank() for _ in range(banks)])


def _claim(area: CounterArea, row: int, fs: int, counts: dict[int, int], bank: int = 0) -> None:
    """What a trampoline does for thread fs in row `row` of a bank: the key, then counts per site."""
    mem = area.banks[bank].mem
    struct.pack_into("<Q", mem, trampoline.KEYS + 8 * row, fs)
    for site, n in counts.items():
        struct.pack_into("<Q", mem, trampoline.ROWS + 8 * (row * trampoline.NSITES + site), n)


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
    view = np.frombuffer(area.banks[0].mem, dtype="<u8")
    assert view[trampoline.KEYS // 8 + 1] == 0 and view[trampoline.KEYS // 8 + 2] == 0
    area.close()


def test_unowned_counts_strangers_rows_and_misses_of_the_given_columns() -> None:
    area = _area()
    _claim(area, 0, 0xAAA0, {0: 10, 1: 20})
    _claim(area, 1, 0xDEAD0, {0: 3, 1: 4})  # a thread pmu never saw
    struct.pack_into("<Q", area.banks[0].mem, trampoline.MISS + 8 * 0, 2)
    struct.pack_into("<Q", area.banks[0].mem, trampoline.MISS + 8 * 1, 50)
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
    flags = child.banks[0].mem[trampoline.ENABLED : trampoline.ENABLED + trampoline.NSITES]
    assert [i for i, b in enumerate(flags) if b] == [0, 63]
    child.banks[0].format(123456)
    assert struct.unpack_from("<I", child.banks[0].mem, trampoline.PID)[0] == 123456
    assert struct.unpack_from("<Q", child.banks[0].mem, trampoline.KEYS)[0] == trampoline.RESERVED
    parent.close()
    child.close()


def test_modes_of_enabled_sites() -> None:
    """ON, ON_TCB once every thread has its TCB, ON_LOCKED over both once two threads share a row;
    disabled sites stay 0 whatever the mode, and a child's area starts in its parent's mode."""
    area = _area()

    def flags() -> list[int]:
        return list(area.banks[0].mem[trampoline.ENABLED : trampoline.ENABLED + 3])

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
    assert child.tcb and list(child.banks[0].mem[trampoline.ENABLED : trampoline.ENABLED + 3]) == flags()
    area.lock()
    area.set_enabled(1, False)
    area.set_tcb(False)
    assert flags() == [trampoline.ON_LOCKED, 0, trampoline.ON_LOCKED]
    area.close()
    child.close()


def test_columns_past_one_bank_are_in_the_next() -> None:
    """Column NSITES + 3 is site 3 of bank 1: its counts, flags and misses are that bank's."""
    area = _area(banks=3)
    column = trampoline.NSITES + 3
    assert area.bank_of(column) == (1, 3) and area.columns == 3 * trampoline.NSITES
    _claim(area, 7, 0xAAA0, {3: 11})  # bank 0's site 3 is column 3
    _claim(area, 9, 0xAAA0, {3: 5}, bank=1)
    _claim(area, 2, 0xAAA0, {0: 1}, bank=2)
    got = area.row(0xAAA0)
    assert len(got) == 3 * trampoline.NSITES
    assert (got[3], got[column], got[2 * trampoline.NSITES]) == (11, 5, 1) and got.sum() == 17
    area.set_enabled(column, True)
    assert area.banks[1].mem[trampoline.ENABLED + 3] == trampoline.ON
    assert not area.banks[0].mem[trampoline.ENABLED + 3]
    struct.pack_into("<Q", area.banks[1].mem, trampoline.MISS + 8 * 3, 4)
    assert area.unowned({0, 0xAAA0}, [column]) == 4
    area.free_rows(0xAAA0)
    assert not area.row(0xAAA0).any()
    area.close()
