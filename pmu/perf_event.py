"""perf_event_open(2) through ctypes: the attr structure, opening, reading and enabling a counter.

No dependency beyond the C library. The layout is include/uapi/linux/perf_event.h's perf_event_attr at
PERF_ATTR_SIZE_VER7 (128 bytes), which every kernel since 6.3 reads and every older one since 5.x
accepts for the fields used here (the kernel zero-checks whatever it does not know).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

NR_PERF_EVENT_OPEN = 298
"""x86-64 syscall number."""

# attr.flags bits
DISABLED = 1 << 0
INHERIT = 1 << 1
EXCLUDE_HV = 1 << 6
ENABLE_ON_EXEC = 1 << 12
SAMPLE_ID_ALL = 1 << 18
USE_CLOCKID = 1 << 25

# read_format
FORMAT_TOTAL_TIME_ENABLED = 1
FORMAT_TOTAL_TIME_RUNNING = 2

# sample_type
SAMPLE_IP = 1 << 0
SAMPLE_TID = 1 << 1
SAMPLE_TIME = 1 << 2
SAMPLE_CPU = 1 << 7
SAMPLE_REGS_USER = 1 << 12

RECORD_LOST = 2
RECORD_SAMPLE = 9

REG_ARGS = (5, 4, 3, 2, 16, 17)
"""perf_event_x86_regs of the SysV argument registers, in argument order: rdi, rsi, rdx, rcx, r8, r9."""

CLOCK_MONOTONIC = 1

IOC_ENABLE = 0x2400
IOC_DISABLE = 0x2401
IOC_RESET = 0x2403

FLAG_FD_CLOEXEC = 1 << 3

DEVICES = Path("/sys/bus/event_source/devices")
TRACEFS = Path("/sys/kernel/tracing")
TYPE_TRACEPOINT = 2


class Attr(ctypes.Structure):
    """struct perf_event_attr (the fields pmu sets; the rest stay zero)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("reserved_2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32),
        ("reserved_3", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64),
    ]


assert ctypes.sizeof(Attr) == 128

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def open_event(attr: Attr, pid: int, cpu: int, group_fd: int = -1) -> int:
    """perf_event_open(attr, pid, cpu, group_fd, FD_CLOEXEC): the new fd; OSError with the errno."""
    attr.size = ctypes.sizeof(Attr)
    fd = _syscall(
        ctypes.c_long(NR_PERF_EVENT_OPEN),
        ctypes.byref(attr),
        ctypes.c_int(pid),
        ctypes.c_int(cpu),
        ctypes.c_int(group_fd),
        ctypes.c_ulong(FLAG_FD_CLOEXEC),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


@dataclass(frozen=True)
class Reading:
    """One read(2) of a counter opened with TOTAL_TIME_ENABLED|RUNNING."""

    value: int
    enabled: int
    running: int


def close_all(fds: list[int]) -> None:
    """Close event descriptors at once: closing a uprobe event waits for the kernel to unregister it (tens
    of ms each, measured here), and waits made side by side end together instead of one after another."""
    if len(fds) < 2:
        for fd in fds:
            os.close(fd)
        return
    import threading

    threads = [threading.Thread(target=os.close, args=(fd,)) for fd in fds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def read_counter(fd: int) -> Reading:
    """The counter's value and times."""
    data = os.read(fd, 24)
    value, enabled, running = struct.unpack("<QQQ", data)
    return Reading(value, enabled, running)


def ioctl(fd: int, request: int) -> None:
    fcntl.ioctl(fd, request, 0)


def pmu_type(name: str) -> int | None:
    """The dynamic type number of a kernel PMU (`uprobe`, `breakpoint`), None if the kernel has none."""
    try:
        return int((DEVICES / name / "type").read_text())
    except (OSError, ValueError):
        return None


def format_bit(pmu: str, field: str) -> int | None:
    """The config bit of a one-bit format field (`uprobe`'s `retprobe` is `config:0`), None if absent."""
    try:
        text = (DEVICES / pmu / "format" / field).read_text().strip()
    except OSError:
        return None
    where, _, bits = text.partition(":")
    if where != "config" or not bits.isdigit():
        return None
    return int(bits)


def online_cpus() -> list[int]:
    """The CPUs perf -a counts on (/sys/devices/system/cpu/online)."""
    return parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text().strip())


def parse_cpu_list(text: str) -> list[int]:
    """A CPU list as the kernel and perf -C write it (`0-3,6`); ValueError if malformed."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(text)
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(text)
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(text)
        cpus.extend(range(first, last + 1))
    return sorted(set(cpus))


def format_cpu_list(cpus: list[int]) -> str:
    """The kernel's way of writing a CPU list (0-3,6)."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive CPUs
    for cpu in sorted(cpus):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def paranoid() -> int:
    """kernel.perf_event_paranoid (2 when unreadable)."""
    try:
        return int(Path("/proc/sys/kernel/perf_event_paranoid").read_text())
    except (OSError, ValueError):
        return 2


NOT_SUPPORTED_ERRNOS = frozenset({errno.ENOENT, errno.EOPNOTSUPP, errno.ENODEV, errno.ENXIO})
"""What perf_event_open answers for an event the machine cannot count (perf prints <not supported>)."""


class SampleRing:
    """The mmap ring of one sampling counter (perf_event_mmap_page, then 2**n data pages)."""

    def __init__(self, fd: int, pages: int) -> None:
        import mmap

        n = 1
        while n < pages:
            n *= 2
        self.map = mmap.mmap(fd, (1 + n) * mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        offset, size = struct.unpack_from("<QQ", self.map, 1040)
        self.offset = offset or mmap.PAGESIZE
        self.size = size or n * mmap.PAGESIZE

    def take(self) -> bytes:
        """Every record written since the last call, as one contiguous copy; the space is given back."""
        head = struct.unpack_from("<Q", self.map, 1024)[0]
        tail = struct.unpack_from("<Q", self.map, 1032)[0]
        if head == tail:
            return b""
        start, end = tail % self.size, head % self.size
        base = self.offset
        if head - tail >= self.size or end <= start:
            data = self.map[base + start : base + self.size] + self.map[base : base + end]
        else:
            data = self.map[base + start : base + end]
        struct.pack_into("<Q", self.map, 1032, head)
        return data

    def close(self) -> None:
        self.map.close()


class TraceUprobes:
    """Uprobes defined through tracefs (`uprobe_events`), as perf probe makes them: a tracepoint event
    opened with perf_event_open inherits to forked children, which the dynamic `uprobe` PMU cannot do
    for a task (the kernel re-reads its config1 path pointer in the forking task, whose memory does not
    have it, and the fork fails with EFAULT). Every probe is in group pmu_PID (PID: pmu's); remove()
    deletes them, and groups left by a pmu that died are deleted by the next one."""

    def __init__(self) -> None:
        self.group = f"pmu_{os.getpid()}"
        self.names: list[str] = []

    @staticmethod
    def available() -> bool:
        """tracefs is there (mounting it if it is not, as perf probe needs, where pmu may)."""
        if (TRACEFS / "uprobe_events").exists():
            return True
        import subprocess

        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True)
        return (TRACEFS / "uprobe_events").exists()

    def add(self, path: str, offset: int, ret: bool) -> int:
        """Define a probe; its tracepoint id."""
        if not self.names:
            self._sweep()
        name = f"e{len(self.names)}"
        self._write(f"{'r' if ret else 'p'}:{self.group}/{name} {path}:{offset:#x}\n")
        self.names.append(name)
        return int((TRACEFS / "events" / self.group / name / "id").read_text())

    def remove(self) -> None:
        """Delete every probe this pmu defined (after their descriptors are closed)."""
        for name in self.names:
            with contextlib.suppress(OSError):
                self._write(f"-:{self.group}/{name}\n")
        self.names.clear()

    @staticmethod
    def _write(line: str) -> None:
        # os.write, not open(..., "a"): Python's append mode seeks, which tracefs refuses (EINVAL).
        fd = os.open(TRACEFS / "uprobe_events", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    @staticmethod
    def _sweep() -> None:
        """Delete the probes of pmu processes that are gone."""
        sweep_stale_groups("pmu_")


def sweep_stale_groups(prefix: str) -> None:
    """Delete the tracefs uprobes of groups PREFIX<pid> whose process is gone (a pmu, or a test process,
    killed before it deleted its own)."""
    try:
        lines = (TRACEFS / "uprobe_events").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        head = line.split(None, 1)[0] if line.strip() else ""
        group, _, name = head[2:].partition("/")
        pid = group.removeprefix(prefix)
        if group.startswith(prefix) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(OSError):
                TraceUprobes._write(f"-:{group}/{name}\n")
