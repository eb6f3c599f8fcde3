"""Naming the threads of records that recording trampolines wrote: (pid, FS base, TSC) -> (pid, TID).

A trampoline knows its thread only by its FS base (its TLS block, `rdfsbase`) and its process by the pid
pmu wrote in the counter area; the kernel's TID costs a system call. pmu sees every thread's FS base
while it is stopped (a new thread at its first stop, before it runs; the main thread when the dynamic
linker has set its TLS up) and notes it here with the TSC of that moment. glibc reuses a finished
thread's stack and TLS for the next thread, so one FS base may name several threads over time: a record
goes to the thread noted last before its timestamp. A vfork child runs on its parent's thread (same
memory, same TLS, same counter area) until it execs or exits: pmu notes the parent's key as the child's
at the vfork and gives it back afterwards. A record whose key was never noted (only when a thread was
never seen stopped) goes to the process's main thread and is counted in `unnamed`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

_MANY_RUNS = 64
"""Above this many runs of one key in a batch (and more than 1 in 32 rows), group by sorting instead."""


class ThreadNames:
    """(pid, FS base) -> [(since TSC, pid, tid)], and the bulk lookup that rewrites drained records."""

    def __init__(self) -> None:
        self._names: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        self.unnamed = 0
        """Records whose (pid, FS base) was never noted (given to the process's main thread)."""

    def note(self, key_pid: int, fs_base: int, since: int, pid: int, tid: int) -> None:
        """From TSC `since` on, records of (key_pid, fs_base) are thread tid of process pid."""
        entries = self._names.setdefault((key_pid, fs_base), [])
        if entries and entries[-1][1:] == (pid, tid):
            return
        entries.append((since, pid, tid))
        entries.sort(key=lambda e: e[0])

    def lookup(self, key_pid: int, fs_base: int, tsc: int) -> tuple[int, int]:
        """(pid, tid) of one record (for tests and single records)."""
        pids, tids = self.columns(np.array([key_pid]), np.array([fs_base]), np.array([tsc], dtype=np.int64))
        return int(pids[0]), int(tids[0])

    def resolve(self, records: npt.NDArray[Any]) -> None:
        """Rewrite `pid` and `thread` of ring records (thread = FS base, time = raw TSC) in place, so that
        `thread` holds the TID; records keep their order."""
        pid, tid = self.columns(records["pid"], records["thread"], records["time"])
        records["pid"] = pid
        records["thread"] = tid

    def columns(
        self, pid: npt.NDArray[Any], fs: npt.NDArray[Any], tsc: npt.NDArray[Any]
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """(pid, tid) columns for records' (pid, FS base, TSC) columns (which may be strided views)."""
        n = len(fs)
        out_pid = np.empty(n, np.int32)
        out_tid = np.empty(n, np.int32)
        if n == 0:
            return out_pid, out_tid
        if bool((fs == fs[0]).all()) and bool((pid == pid[0]).all()):  # one thread (no copy of the keys)
            p, t = self._resolve(int(pid[0]), int(fs[0]), tsc)
            out_pid[:] = p
            out_tid[:] = t
            return out_pid, out_tid
        fs = np.ascontiguousarray(fs)
        pid = np.ascontiguousarray(pid)
        change = np.flatnonzero((fs[1:] != fs[:-1]) | (pid[1:] != pid[:-1])) + 1
        if len(change) <= _MANY_RUNS or len(change) * 32 <= n:
            bounds = [0, *change.tolist(), n]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                p, t = self._resolve(int(pid[a]), int(fs[a]), tsc[a:b])
                out_pid[a:b] = p
                out_tid[a:b] = t
            return out_pid, out_tid
        order = np.lexsort((fs, pid))
        sfs, spid = fs[order], pid[order]
        change = np.flatnonzero((sfs[1:] != sfs[:-1]) | (spid[1:] != spid[:-1])) + 1
        bounds = [0, *change.tolist(), n]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            rows = order[a:b]
            p, t = self._resolve(int(spid[a]), int(sfs[a]), tsc[rows])
            out_pid[rows] = p
            out_tid[rows] = t
        return out_pid, out_tid

    def _resolve(
        self, key_pid: int, fs_base: int, tsc: npt.NDArray[Any]
    ) -> tuple[int | npt.NDArray[np.int64], int | npt.NDArray[np.int64]]:
        entries = self._names.get((key_pid, fs_base))
        if not entries:
            if fs_base:
                self.unnamed += len(tsc)
            return key_pid, key_pid  # no TLS yet: only the main thread runs
        if len(entries) == 1:
            return entries[0][1], entries[0][2]
        since = np.array([e[0] for e in entries], dtype=np.int64)
        k = np.searchsorted(since, tsc, side="right") - 1
        np.maximum(k, 0, out=k)  # before the first note: the first thread noted
        return (
            np.array([e[1] for e in entries], dtype=np.int64)[k],
            np.array([e[2] for e in entries], dtype=np.int64)[k],
        )
