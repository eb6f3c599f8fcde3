"""Mappings of a traced process: /proc/PID/maps parsed into values, file placement and free gaps."""

from __future__ import annotations

import os
from dataclasses import dataclass

PAGE = 4096


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: int
    """Device number as os.stat's st_dev encodes it (os.makedev of the major:minor shown)."""
    ino: int
    path: str

    @property
    def executable(self) -> bool:
        return "x" in self.perms

    def holds_file_offset(self, dev: int, ino: int, file_offset: int) -> bool:
        return (
            self.ino == ino
            and self.dev == dev
            and self.offset <= file_offset < self.offset + (self.end - self.start)
        )


def read_maps(pid: int) -> list[Mapping]:
    """Parse /proc/PID/maps; raises OSError if the process is gone."""
    result = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = parts[0].split("-")
            major, minor = parts[3].split(":")
            result.append(
                Mapping(
                    start=int(lo, 16),
                    end=int(hi, 16),
                    perms=parts[1],
                    offset=int(parts[2], 16),
                    dev=os.makedev(int(major, 16), int(minor, 16)),
                    ino=int(parts[4]),
                    path=parts[5].strip() if len(parts) > 5 else "",
                )
            )
    return result


def addresses_of(maps: list[Mapping], dev: int, ino: int, file_offset: int) -> list[int]:
    """Run-time addresses where the byte at `file_offset` of file (dev, ino) is mapped executable."""
    return [
        m.start + file_offset - m.offset
        for m in maps
        if m.executable and m.holds_file_offset(dev, ino, file_offset)
    ]


def mapped_files(maps: list[Mapping]) -> list[str]:
    """Paths of the files a process maps, in order of first appearance."""
    seen: dict[str, None] = {}
    for m in maps:
        if m.path.startswith("/") and m.ino:
            seen.setdefault(m.path, None)
    return list(seen)


def free_gap_near(maps: list[Mapping], address: int, size: int, reach: int = 1 << 30) -> int | None:
    """A page-aligned start for `size` free bytes within `reach` of `address`, closest first."""
    spans = sorted((m.start, m.end) for m in maps)
    lo_limit = max(PAGE * 16, address - reach)
    hi_limit = min((1 << 47) - PAGE, address + reach)
    best: int | None = None
    prev_end = PAGE * 16
    for start, end in [*spans, (hi_limit, hi_limit)]:
        gap_lo, gap_hi = max(prev_end, lo_limit), min(start, hi_limit)
        if gap_hi - gap_lo >= size + 2 * PAGE:
            # Take the end of the gap nearest to the address, leaving a guard page.
            cand = gap_hi - PAGE - size if gap_hi <= address else gap_lo + PAGE
            cand &= ~(PAGE - 1)
            if best is None or abs(cand - address) < abs(best - address):
                best = cand
        prev_end = max(prev_end, end)
    return best


def threads_of(pid: int) -> list[int]:
    """The thread ids of process `pid`, in order ([] if there is no such process)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []


def status_field(tid: int, key: str) -> str | None:
    """The value of field `key` ("Tgid", "SigBlk", ...) of /proc/TID/status; None if there is no such
    thread (or field)."""
    try:
        with open(f"/proc/{tid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == key:
                    return value.strip()
    except OSError:
        pass
    return None


def tgid_of(tid: int) -> int:
    """The thread group (process) a thread belongs to, from /proc; -1 if there is no such thread."""
    value = status_field(tid, "Tgid")
    return int(value) if value is not None else -1
