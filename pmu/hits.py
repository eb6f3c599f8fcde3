"""Hits as columns: what `pmu record` drains from rings and hands to the Parquet writer (numpy only, so
that importing it costs nothing when only counting)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from pmu.ring import MAX_ARGS, RECORD_DTYPE

COLUMNS_VIEW: Final = np.dtype(
    {
        "names": ["time", "tid", "pid", "event", "ip", "args", "retval", "latency_ns", "flags"],
        "formats": ["<i8", "<i4", "<i4", "<i4", "<u8", ("<u8", (MAX_ARGS,)), "<u8", "<i8", "<u4"],
        "offsets": [0x08, 0x10, 0x18, 0x1C, 0x20, 0x28, 0x58, 0x60, 0x68],
        "itemsize": RECORD_DTYPE.itemsize,
    }
)
"""RECORD_DTYPE as the columns want it: `tid` the low half of `thread` (a TID), `event` as i32."""


@dataclass(frozen=True)
class Hits:
    """A batch of hits as columns of equal length: `time` in CLOCK_MONOTONIC ns, `tid` a TID, `event` an
    event index, `args` one column per argument register recorded; `retval`, `latency_ns` and `flags`
    (ring.py's FLAG_RETURN) for batches that may hold returns, None for entries only."""

    time: npt.NDArray[np.int64]
    pid: npt.NDArray[Any]
    tid: npt.NDArray[Any]
    event: npt.NDArray[Any]
    ip: npt.NDArray[Any]
    args: tuple[npt.NDArray[Any], ...] = ()
    retval: npt.NDArray[Any] | None = None
    latency_ns: npt.NDArray[Any] | None = None
    flags: npt.NDArray[Any] | None = None

    def __len__(self) -> int:
        return len(self.time)

    @classmethod
    def of_records(cls, records: npt.NDArray[Any], nargs: int) -> Hits:
        """Views of ring records (`time` already in ns and `thread` a TID) as columns."""
        view = records.view(COLUMNS_VIEW)
        args = view["args"]
        return cls(
            view["time"],
            view["pid"],
            view["tid"],
            view["event"],
            view["ip"],
            tuple(args[:, i] for i in range(nargs)),
            view["retval"],
            view["latency_ns"],
            view["flags"],
        )

    @classmethod
    def merged(cls, batches: Sequence[Hits]) -> Hits:
        """One batch of all, in time order (stable: a thread's own order is kept)."""
        order = np.argsort(np.concatenate([b.time for b in batches]), kind="stable")
        nargs = min(len(b.args) for b in batches)

        def column(get: Callable[[Hits], npt.NDArray[Any]]) -> npt.NDArray[Any]:
            return np.concatenate([np.asarray(get(b)) for b in batches])[order]

        returns = all(b.retval is not None for b in batches)
        if not returns:
            batches = [b if b.retval is not None else b.with_no_returns() for b in batches]
        return cls(
            column(lambda b: b.time),
            column(lambda b: b.pid),
            column(lambda b: b.tid),
            column(lambda b: b.event),
            column(lambda b: b.ip),
            tuple(column(lambda b, i=i: b.args[i]) for i in range(nargs)),  # type: ignore[misc]
            column(lambda b: b.retval),  # type: ignore[arg-type,return-value]
            column(lambda b: b.latency_ns),  # type: ignore[arg-type,return-value]
            column(lambda b: b.flags),  # type: ignore[arg-type,return-value]
        )

    def with_no_returns(self) -> Hits:
        """The same hits with explicit return columns (no returns among them)."""
        n = len(self.time)
        return Hits(
            self.time,
            self.pid,
            self.tid,
            self.event,
            self.ip,
            self.args,
            np.zeros(n, np.uint64),
            np.full(n, -1, np.int64),
            np.zeros(n, np.uint32),
        )
