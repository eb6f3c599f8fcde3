"""Hits as columns: what `pmu record` drains from rings and hands to the Parquet writer (numpy only, so
that importing it costs nothing when only counting)."""

from __future__ import annotations

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
    (ring.py's FLAG_RETURN) for batches that may hold returns, None for entries only; `cpu` where the
    kernel said on which CPU the hit was."""

    time: npt.NDArray[np.int64]
    pid: npt.NDArray[Any]
    tid: npt.NDArray[Any]
    event: npt.NDArray[Any]
    ip: npt.NDArray[Any]
    args: tuple[npt.NDArray[Any], ...] = ()
    retval: npt.NDArray[Any] | None = None
    latency_ns: npt.NDArray[Any] | None = None
    flags: npt.NDArray[Any] | None = None
    cpu: npt.NDArray[Any] | None = None
    """The CPU of each hit, for records of the kernel's PMUs (system-wide runs); None otherwise."""

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
