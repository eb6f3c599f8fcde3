"""The records jump-optimized probes write into rings in the traced processes, turned into hits: part of
the uprobe PMU (pmu/uprobe_pmu.py), which the evlist reaches only through Pmu.samples/lost/flush.

A trampoline's record holds the raw `rdtsc` and the thread's FS base; here the TSC becomes CLOCK_MONOTONIC
ns (a calibration sampled while recording) and the FS base a TID (ThreadNames, fed from every FS base the
tracer sees a thread have, and from vfork). Rings are drained DRAIN_CHUNK records at a time, at most
DRAIN_BUDGET chunks a ring per call (the tracer is asked to call again soon), so that the tracer keeps
answering stops while a busy ring empties.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from pmu.core import Task as AnyTask
from pmu.hits import Hits
from pmu.ring import RECORDS_PER_PAGE, Ring
from pmu.threadnames import ThreadNames
from pmu.trace.tasks import Task
from pmu.trace.tracer import Tracer
from pmu.tsc import Calibration, read_tsc

DRAIN_CHUNK = 8192
"""Records taken from a trampoline ring at a time (their first lines, 512 KiB, stay in the cache while
they are copied and converted)."""
DRAIN_BUDGET = 16
"""Chunks per drain call before the tracer gets to answer stops again."""
RETURN_WORDS = 14
"""A record's words up to its flags (seq, time, thread, pid|event, ip, args[6], retval, latency, flags):
taken where trampolines record returns."""
CALIBRATE_EVERY = 0.1
"""Seconds between TSC calibration samples while recording (and one at the end)."""


class TrampolineRecords:
    """The tracee rings of one recording run, drained into hits."""

    def __init__(self, tracer: Tracer, ring: Ring, nargs: int) -> None:
        self.tracer = tracer
        tracer.ring_shape = (ring.capacity // RECORDS_PER_PAGE, ring.nevents)
        tracer.on_fs_base = self._fs_base_seen
        self.names = ThreadNames()
        """Who wrote the records (their thread field is an FS base)."""
        self.clock = Calibration()
        """TSC -> CLOCK_MONOTONIC for them."""
        self.nargs = nargs
        """Argument columns the records have."""
        self.only_tids: dict[int, set[int]] = {}
        """With -t: {pid: the only threads of it whose records are kept} (trampolines record every thread)."""
        self._words = np.empty((DRAIN_CHUNK, 5 + nargs), np.uint64)  # reused: no page faults per chunk
        self._returns = False
        self._vfork_parents: dict[int, tuple[Task, int]] = {}
        self._calibrated = 0.0
        self._lost_closed: dict[int, int] = {}
        self._lost_closed_total = 0
        self._used = False
        """Some records came from trampolines (their times are calibrated TSC)."""

    @property
    def returns(self) -> bool:
        """Some trampolines record returns (retprobe.py): records are taken up to their flags word."""
        return self._returns

    @returns.setter
    def returns(self, on: bool) -> None:
        if on and not self._returns:
            self._words = np.empty((DRAIN_CHUNK, RETURN_WORDS), np.uint64)
        self._returns = on

    # ---- draining ---------------------------------------------------------------------------------

    def take(self, sink: Callable[[Hits], None], final: bool = False) -> None:
        """What the rings hold, as hits given to `sink` chunk by chunk (final: no producer is left,
        take everything). A chunk's columns are views of one buffer that the next chunk reuses: the
        sink takes what it needs before it returns."""
        tracer = self.tracer
        if not (tracer.rings or tracer.retired):
            return
        self._used = True
        now = time.monotonic()
        if final or now - self._calibrated >= CALIBRATE_EVERY:
            self.clock.add()
            self._calibrated = now
        self._close_retired(sink)
        for _ in range(1 if final else DRAIN_BUDGET):
            full = False
            for ring in tracer.rings:
                full = self._drain_ring(ring, sink, final) or full
            if not full:
                return
        tracer.tick_due = True  # more is waiting: come back once stops are answered

    def close(self) -> None:
        """The run is over and its records drained: every ring closed, their lost counts kept."""
        tracer = self.tracer
        for ring in tracer.rings + tracer.retired:
            self._lost(ring)
            ring.close()
        tracer.rings.clear()
        tracer.retired.clear()

    def _drain_ring(self, ring: Ring, sink: Callable[[Hits], None], final: bool) -> bool:
        """One chunk of a ring (final: all of it, abandoned records skipped); True if the chunk came
        full (more is likely waiting)."""
        while True:
            words = ring.take(DRAIN_CHUNK, self._words.shape[1], self._words)
            if len(words):
                sink(self._named_words(words))
            if len(words) < DRAIN_CHUNK or not final:
                break
        if final and len(records := ring.drain(final=True)):  # after an abandoned record
            sink(self._named(records))
        return len(words) == DRAIN_CHUNK

    def _close_retired(self, sink: Callable[[Hits], None]) -> None:
        """Drain the rings no process maps any more to the end, keep their lost counts, close them."""
        retired = self.tracer.retired
        while retired:
            ring = retired[0]
            self._drain_ring(ring, sink, final=True)
            self._lost(ring)
            retired.pop(0)
            ring.close()

    def _lost(self, ring: Ring) -> None:
        for e, n in ring.lost_per_event().items():
            self._lost_closed[e] = self._lost_closed.get(e, 0) + n
        self._lost_closed_total += ring.lost_total

    # ---- accounting -------------------------------------------------------------------------------

    def lost_per_event(self) -> dict[int, int]:
        """{event index: records lost because a ring was full}, over every ring (closed ones too)."""
        out = dict(self._lost_closed)
        for ring in self.tracer.rings + self.tracer.retired:
            for e, n in ring.lost_per_event().items():
                out[e] = out.get(e, 0) + n
        return out

    def clock_error_ns(self) -> int:
        """The stated error of the records' times: the calibration's, if trampolines recorded."""
        return self.clock.error_ns() if self._used else 0

    # ---- naming threads ---------------------------------------------------------------------------

    def _fs_base_seen(self, task: Task) -> None:
        self.names.note(task.pid, task.fs_base, read_tsc(), task.pid, task.tid)

    def vforked(self, parent: Task, child: AnyTask) -> None:
        """The vfork child runs on its parent's thread (and TLS): records on it are the child's meanwhile."""
        fs = self.tracer.fs_base(parent)
        self._vfork_parents[child.tid] = (parent, fs)
        self.names.note(parent.pid, fs, read_tsc(), child.pid, child.tid)

    def vfork_done(self, child: AnyTask) -> None:
        found = self._vfork_parents.pop(child.tid, None)
        if found is not None:
            parent, fs = found
            self.names.note(parent.pid, fs, read_tsc(), parent.pid, parent.tid)

    # ---- records as hits --------------------------------------------------------------------------

    def _named_words(self, words: np.ndarray) -> Hits:
        """Records given as their first words (ring.take), as hits."""
        halves = words.view(np.int32)  # word 3 is pid (low half) and event (high half)
        args = tuple(words[:, 5 + i] for i in range(self.nargs))
        returns = None
        if words.shape[1] >= RETURN_WORDS:
            returns = (words[:, 11], words[:, 12].view(np.int64), words[:, 13].astype(np.uint32))
        return self._hits(
            words[:, 1].view(np.int64), halves[:, 6], words[:, 2], halves[:, 7], words[:, 4], args, returns
        )

    def _named(self, records: np.ndarray) -> Hits:
        """Whole records (Ring.drain), as hits."""
        args = tuple(records["args"][:, i] for i in range(self.nargs))
        returns = None
        if self._returns:
            returns = (
                records["retval"],
                records["latency_ns"].astype(np.int64),
                records["flags"].astype(np.uint32),
            )
        return self._hits(
            records["time"], records["pid"], records["thread"], records["event"], records["ip"], args, returns
        )

    def _hits(
        self,
        tsc: np.ndarray,
        key_pid: np.ndarray,
        fs_base: np.ndarray,
        event: np.ndarray,
        ip: np.ndarray,
        args: tuple[np.ndarray, ...],
        returns: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> Hits:
        """Columns of records as hits: time in CLOCK_MONOTONIC ns, thread a TID, and without the threads
        -t leaves out; `returns` (retval, latency_ns, flags) where return trampolines record too."""
        pid, tid = self.names.columns(key_pid, fs_base, tsc)
        time_ns = self.clock.to_ns(tsc)
        other = np.zeros(len(tsc), dtype=bool)
        for p, tids in self.only_tids.items():
            other |= (pid == p) & ~np.isin(tid, list(tids))
        if other.any():
            keep = ~other
            time_ns, pid, tid, event, ip = time_ns[keep], pid[keep], tid[keep], event[keep], ip[keep]
            args = tuple(a[keep] for a in args)
            if returns is not None:
                returns = (returns[0][keep], returns[1][keep], returns[2][keep])
        if returns is None:
            return Hits(time_ns, pid, tid, event, ip, args)
        return Hits(time_ns, pid, tid, event, ip, args, *returns)
