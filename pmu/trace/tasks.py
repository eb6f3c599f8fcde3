"""Traced tasks (threads) and the address spaces they share; where tracee memory is read and written."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from pmu.ring import Ring
from pmu.trace import retprobe, trampoline
from pmu.trace.guard import Guard
from pmu.trace.maps import Mapping, read_maps


class TaskState(Enum):
    """Where a traced thread is, as far as the tracer knows."""

    NEW = "new"
    """Reported by its parent's clone/fork event but not yet in its first stop."""
    RUNNING = "running"
    """Resumed by us; may stop at any moment."""
    STOPPED = "stopped"
    """In a ptrace-stop that we have not resumed yet."""
    GROUP_STOPPED = "group-stopped"
    """In a group-stop (SIGSTOP and friends), listened to with PTRACE_LISTEN."""
    EXITING = "exiting"
    """Resumed from its exit stop: it will never stop for us again (a leader may linger as a zombie
    until its other threads are gone), so it is neither interrupted nor waited for."""
    EXITED = "exited"
    """Gone."""


ReturnHandler = Callable[["Task", "ReturnFrame", int], None]
"""Called at a hijacked return with the task, its frame and the function's return value (rax)."""


@dataclass(eq=False)
class ReturnFrame:
    """One hijacked return: the stack slot whose return address we replaced with the trampoline."""

    rsp: int
    """Address of the return-address slot (RSP at function entry)."""
    orig: int
    """The real return address."""
    handler: ReturnHandler
    entry_ns: int
    """CLOCK_MONOTONIC at entry, for latency."""
    chained: bool = False
    """The slot already held the trampoline (a tail call out of a probed function): returning from
    this frame also returns from the frame below it."""
    restored: bool = False
    """The real return address is back in the slot while an exception unwinds the stack (unwind.py)."""


@dataclass(eq=False)
class Task:
    """One traced thread. Satisfies pmu.core.Task."""

    tid: int
    pid: int
    mm: AddressSpace
    state: TaskState = TaskState.NEW
    detach_on_stop: bool = False
    """Detach at its first stop (a forked child nobody counts)."""
    fs_base: int = 0
    """The thread's FS base when last seen stopped: how trampolines tell threads apart."""
    shadow: list[ReturnFrame] = field(default_factory=list)
    """Hijacked returns, innermost last (the per-thread shadow stack of return probes)."""
    _comm: str | None = None

    @property
    def comm(self) -> str:
        if self.state is not TaskState.EXITED:
            try:
                with open(f"/proc/{self.pid}/task/{self.tid}/comm") as f:
                    self._comm = f.read().strip()
            except OSError:
                pass
        return self._comm or "?"

    def remember_comm(self) -> None:
        """Read the command name now, while /proc still has it."""
        _ = self.comm

    def __repr__(self) -> str:
        return f"Task({self.tid}/{self.pid} {self.state.value})"


BreakpointHandler = Callable[[Task], None]


@dataclass(eq=False)
class Breakpoint:
    """An int3 at `addr`, shared by every consumer that asked for that address (reference-counted)."""

    addr: int
    orig: bytes
    """The bytes the trap replaced (the displaced instruction: int3 over each, or UD over a lone one)."""
    slot: int
    """Address of the out-of-line copy of the displaced instruction (followed by a jump back)."""
    length: int = 1
    """Length of the displaced instruction. Above 1, no thread can ever be at addr+1 but by our int3,
    so a SIGTRAP there is ours without asking the kernel for its si_code."""
    consumers: list[BreakpointHandler] = field(default_factory=list)


@dataclass(eq=False)
class JumpPatch:
    """A jump-optimized probe: `jmp rel32` at addr (padded with int3 to whole instructions) to a
    trampoline that counts in column `column` of the address space's counter area."""

    addr: int
    orig: bytes
    """The displaced bytes, restored on unpatch."""
    tramp: int
    column: int
    moves: tuple[tuple[int, int], ...]
    """(offset in the patched bytes, address in the trampoline) for each displaced instruction."""
    users: int = 1
    """Sites that use it; a forked child's copies have none until re-added."""
    lock_at: int = 0
    """Address of its trampoline's nop-or-lock byte (trampoline.LOCK)."""
    ret: int = -1
    """A return probe's index among its address space's return sites (retprobe.py), -1 for an entry
    probe: the trampoline is a stub calling the return blob, and the column counts returns."""
    guest: JumpPatch | None = None
    """An entry probe at the same address as this return probe: its column is counted by this stub
    (the descriptor's entry bank and site); mm.jumps holds the return probe's patch."""


@dataclass(eq=False)
class CounterBank:
    """One memfd shared between pmu and one address space, in the layout trampoline.py defines for
    NSITES sites: ENABLED flags and MISS counters per site, the owner PID, KEYS = the FS base that
    claimed each row, ROWS = one counter per site and row. pmu keeps its own mapping, so counts stay
    readable after the tracee exec'd or died."""

    mem: mmap.mmap
    address: int
    """Where the tracee maps it."""
    size: int

    def words(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys, rows, misses): views of the row keys (NSLOTS), the counters (NSLOTS x NSITES) and
        the per-site miss counters (NSITES)."""
        view = np.frombuffer(self.mem, dtype="<u8")
        keys = view[trampoline.KEYS // 8 : trampoline.KEYS // 8 + trampoline.NSLOTS]
        rows = view[trampoline.ROWS // 8 :].reshape(trampoline.NSLOTS, trampoline.NSITES)
        misses = view[trampoline.MISS // 8 : trampoline.MISS // 8 + trampoline.NSITES]
        return keys, rows, misses

    def format(self, pid: int) -> None:
        """A new bank's constants: the pid recording trampolines put in their records (a forked child's
        own), and row 0 reserved (trampoline.RESERVED)."""
        self.mem[trampoline.PID : trampoline.PID + 4] = pid.to_bytes(4, "little")
        self.mem[trampoline.KEYS : trampoline.KEYS + 8] = trampoline.RESERVED.to_bytes(8, "little")

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.mem.close()


@dataclass(eq=False)
class CounterArea:
    """The trampolines' counters of one address space: banks of NSITES columns each (column c is site
    c % NSITES of bank c // NSITES), made as probes need them, so there is no limit to the optimized
    probes of a process. The only code that reads or writes them on pmu's side: the trampolines write
    them in the tracee. A thread has a row of its own in each bank it counts in."""

    banks: list[CounterBank] = field(default_factory=list)
    locked: bool = False
    """Two live threads share an FS base (so a row): every enabled site is ON_LOCKED, which sends the
    flag-free fast path to its slow path, whose row increment is locked (trampoline.py)."""
    tcb: bool = False
    """Every thread's FS base points to its own TCB (whose first word is its address): enabled sites are
    ON_TCB, and fast paths read the identity with a load (fs:[0]) instead of rdfsbase."""

    @staticmethod
    def bank_of(column: int) -> tuple[int, int]:
        """(bank index, site in the bank) of a column."""
        return divmod(column, trampoline.NSITES)

    @property
    def columns(self) -> int:
        return len(self.banks) * trampoline.NSITES

    def row(self, fs: int) -> np.ndarray:
        """The counts (one per column) of the thread with FS base fs: the sum of every row keyed by it
        (a thread may hold several), zeros if none or fs is 0."""
        if not fs or not self.banks:
            return np.zeros(self.columns, dtype=np.int64)
        parts = []
        for bank in self.banks:
            keys, rows, _ = bank.words()
            parts.append(rows[keys == fs].sum(axis=0, dtype=np.int64))
        total: np.ndarray = np.concatenate(parts)
        return total

    def unowned(self, known: set[int], columns: Iterable[int]) -> int:
        """Hits of the columns no known FS base can claim: rows keyed by a stranger (a thread gone
        before pmu saw its TLS) and the misses (no TLS yet, no free row)."""
        total = 0
        strangers: dict[int, np.ndarray] = {}
        for column in columns:
            index, site = self.bank_of(column)
            keys, rows, misses = self.banks[index].words()
            if index not in strangers:
                strangers[index] = np.array([int(k) not in known for k in keys])
            total += int(rows[strangers[index], site].sum()) + int(misses[site])
        return total

    def free_rows(self, fs: int) -> None:
        """Give fs's rows back: counts first, then the key, so a thread claiming a row finds it zeroed."""
        for bank in self.banks:
            keys, rows, _ = bank.words()
            for index in np.flatnonzero(keys == fs):
                rows[index] = 0
                keys[index] = 0

    def _value(self) -> int:
        if self.locked:
            return trampoline.ON_LOCKED
        return trampoline.ON_TCB if self.tcb else trampoline.ON

    def set_enabled(self, column: int, on: bool) -> None:
        """Whether the site of `column` counts (its trampoline tests this byte first)."""
        index, site = self.bank_of(column)
        self.banks[index].mem[trampoline.ENABLED + site] = self._value() if on else 0

    def _rewrite(self) -> None:
        value = self._value()
        for bank in self.banks:
            for site in range(trampoline.NSITES):
                if bank.mem[trampoline.ENABLED + site]:
                    bank.mem[trampoline.ENABLED + site] = value

    def lock(self) -> None:
        """From now on every hit's row increment is locked (see `locked`)."""
        self.locked = True
        self._rewrite()

    def set_tcb(self, ok: bool) -> None:
        """Whether fast paths may take a thread's identity from its TCB (see `tcb`)."""
        if ok != self.tcb:
            self.tcb = ok
            self._rewrite()

    def copy_enabled(self, other: CounterArea) -> None:
        """Every site enabled as in `other`, bank by bank (a forked child's own area, from its
        parent's)."""
        enabled = slice(trampoline.ENABLED, trampoline.ENABLED + trampoline.NSITES)
        for mine, theirs in zip(self.banks, other.banks, strict=False):
            mine.mem[enabled] = theirs.mem[enabled]
        self.locked, self.tcb = other.locked, other.tcb

    def copy_keys(self, other: CounterArea) -> None:
        """Every row owned as in `other` (a forked child's own area: the counter cells its copied
        in-process return frames point to are its parent's rows, at the same addresses)."""
        keys = slice(trampoline.KEYS, trampoline.KEYS + 8 * trampoline.NSLOTS)
        for mine, theirs in zip(self.banks, other.banks, strict=False):
            mine.mem[keys] = theirs.mem[keys]

    def close(self) -> None:
        for bank in self.banks:
            bank.close()


@dataclass(eq=False)
class ReturnArea:
    """The return area of one address space (retprobe.py): a memfd shared with the tracee, mapped at
    `address` there. pmu keeps its own mapping while the tracee maps it, then folds what it holds into
    a few arrays (`fold`: lost and skipped counts, a histogram a site), so that they stay readable
    after the tracee exec'd, died or was left, and its 32 MiB of histograms by thread are let go."""

    mem: mmap.mmap | None
    address: int
    size: int
    users: int = 1
    """Live address spaces that map it (a forked child until it has its own)."""
    _folded: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    _left: dict[int, int] = field(default_factory=dict)

    def _summary(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(lost[NRET], skipped[NRET], hist[NRET][BUCKETS], sum_ns[NRET])."""
        if self._folded is not None:
            return self._folded
        assert self.mem is not None
        words = np.frombuffer(self.mem, dtype="<u8")
        lost = words[retprobe.A_LOST // 8 : retprobe.A_LOST // 8 + retprobe.NRET].copy()
        skipped = words[retprobe.A_SKIPPED // 8 : retprobe.A_SKIPPED // 8 + retprobe.NRET].copy()
        hist, sums = retprobe.histograms(words)
        return lost, skipped, hist, sums

    def lost(self, ret: int) -> int:
        return int(self._summary()[0][ret]) + self._left.get(ret, 0)

    def note_lost(self, ret: int) -> None:
        """A frame of return site `ret` a thread left behind as it exited (counted by pmu)."""
        if 0 <= ret < retprobe.NRET:
            self._left[ret] = self._left.get(ret, 0) + 1

    def skipped(self, ret: int) -> int:
        return int(self._summary()[1][ret])

    def histogram(self, ret: int) -> tuple[np.ndarray, int]:
        _, _, hist, sums = self._summary()
        return hist[ret], int(sums[ret])

    def put(self, offset: int, data: bytes) -> None:
        assert self.mem is not None
        self.mem[offset : offset + len(data)] = data

    def ret_of(self, desc: int) -> int:
        """The return site whose descriptor is at `desc` (an address in the tracee)."""
        return (desc - self.address - retprobe.A_DESCS) // retprobe.DESC

    def set_entry(self, ret: int, ebank: int, esite: int) -> None:
        """Point return site `ret`'s descriptor at an entry probe's column, which its stub then counts
        (ebank 0: none)."""
        self.put(retprobe.A_DESCS + retprobe.DESC * ret + retprobe.D_EBANK, struct.pack("<QI", ebank, esite))

    def fold(self) -> None:
        """One address space no longer writes it; the last: keep the summary, let the mapping go."""
        self.users -= 1
        if self.users <= 0 and self._folded is None and self.mem is not None:
            self._folded = self._summary()
            self.close()

    def close(self) -> None:
        if self.mem is not None:
            with contextlib.suppress(BufferError, ValueError):
                self.mem.close()
                self.mem = None


@dataclass(eq=False)
class InProcessReturns:
    """Return probes served inside one address space (retprobe.py): the blob (entry routine and return
    trampoline) in an out-of-line area, the private shadow area, and the shared return area."""

    blob: int
    shadow: int
    area: ReturnArea
    used: int = 0
    """Return sites handed out (each has a descriptor in the area; never reused)."""

    @property
    def tramp(self) -> int:
        """Where hijacked returns land."""
        return self.blob + retprobe.RET_TRAMP


@dataclass(eq=False)
class TraceeRing:
    """A ring (pmu/ring.py) that recording trampolines of an address space write into: made by the
    tracee as a memfd, mapped shared by it at `address` and by pmu (`ring`). A forked child shares its
    parent's (same mapping, same address); its records carry its own pid from its counter area."""

    ring: Ring
    address: int
    size: int
    users: int = 1
    """Live address spaces that map it (the one that made it, and its forked children)."""


@dataclass
class SlotArea:
    """A page range mapped r-x inside the tracee for out-of-line slots; slots are never reused."""

    base: int
    size: int
    used: int = 0


class AddressSpace:
    """One mm: the memory shared by a process's threads (and a vfork child until it execs)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tasks: set[Task] = set()
        self.breakpoints: dict[int, Breakpoint] = {}
        self.removed: set[int] = set()
        """Addresses whose int3 we removed: a trap already raised there is ours and is rewound."""
        self.areas: list[SlotArea] = []
        self.jumps: dict[int, JumpPatch] = {}
        """Jump-optimized probes by address."""
        self.columns = 0
        """Counter columns handed out so far (never reused: a retired column keeps its counts)."""
        self.counters: CounterArea | None = None
        """The counter area the trampolines of this address space count in."""
        self.ring: TraceeRing | None = None
        """The ring its recording trampolines write into (pmu record)."""
        self.ret_tramp: int | None = None
        """Address of the int3 that hijacked returns land on (in an out-of-line area)."""
        self.returns: InProcessReturns | None = None
        """Return probes served in the process itself (jump-patched entries)."""
        self.semaphores: dict[int, int] = {}
        """USDT semaphores pmu incremented in this memory: address -> by how much (released on disarm)."""
        self.inherited: dict[int, int] = {}
        """A forked child's copies of its parent's increments, until its own probes take them over."""
        self.internal: dict[int, str] = {}
        """Tracer-owned breakpoints (address -> purpose), such as the dynamic linker's r_brk."""
        self.locked = False
        """Whether its trampolines' row increments are locked (two live threads share an FS base)."""
        self.guard: Guard | None = None
        """The SIGTRAP handler that keeps a trap of ours harmless should pmu die (see guard.py)."""
        self.dead = False
        self._fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)

    def read(self, addr: int, size: int) -> bytes:
        return os.pread(self._fd, size, addr)

    def write(self, addr: int, data: bytes) -> None:
        done = os.pwrite(self._fd, data, addr)
        if done != len(data):
            raise OSError(f"short write at {addr:#x}")

    def maps(self) -> list[Mapping]:
        return read_maps(self.pid)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"AddressSpace({self.pid}, {len(self.breakpoints)} bps)"
