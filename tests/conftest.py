"""Shared test helpers: build the C targets with gcc, run pmu as a user would, check nothing is left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ROOT / "tests" / "targets"
NO_OPTIMIZE = os.environ.get("PMU_TEST_NO_OPTIMIZE") == "1"
"""Run every pmu stat/record of the tests with --no-optimize (make test runs the suite both ways)."""

# The tests check what signals do to pmu and its targets with their default dispositions. A run started
# as a background job of a script (SIGINT ignored) or under nohup (SIGHUP ignored) would hand those
# ignored dispositions to every process the tests start: give them back their defaults first.
signal.signal(signal.SIGINT, signal.default_int_handler)
for _sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT):
    signal.signal(_sig, signal.SIG_DFL)


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """build("hot") compiles tests/targets/hot.c once per session and returns the binary's path."""
    out = tmp_path_factory.mktemp("bin")
    cache: dict[tuple[str, tuple[str, ...]], Path] = {}

    def _build(name: str, *flags: str, suffix: str = "") -> Path:
        key = (name, flags)
        if key not in cache:
            exe = out / (name + suffix)
            cmd = ["gcc", "-O1", "-g", "-pthread", *flags, "-o", str(exe), str(TARGETS / f"{name}.c")]
            subprocess.run(cmd, check=True)
            cache[key] = exe
        return cache[key]

    return _build


def run_pmu(
    *args: str | os.PathLike[str],
    timeout: float = 120,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m pmu ARGS` and return the completed process (text stdout/stderr)."""
    argv = [str(a) for a in args]
    if NO_OPTIMIZE and argv and argv[0] in ("stat", "record"):
        argv.insert(1, "--no-optimize")
    return subprocess.run(
        [sys.executable, "-m", "pmu", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def processes_running(path: Path | str) -> list[int]:
    """PIDs of live processes whose executable is `path` (none should be left after pmu exits)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            exe = os.readlink(f"/proc/{entry}/exe")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if exe == str(path) and state != "Z":
            found.append(int(entry))
    return found


def stat_counts(stderr: str, sep: str = ",") -> dict[str, int]:
    """{event: count} from `pmu stat -x SEP` output."""
    counts: dict[str, int] = {}
    for line in stderr.splitlines():
        fields = line.split(sep)
        if len(fields) >= 3 and fields[0].isdigit():
            counts[fields[2]] = int(fields[0])
    return counts


def per_thread_counts(stderr: str, sep: str = ",") -> dict[tuple[str, int], int]:
    """{(event, tid): count} from `pmu stat --per-thread -x SEP` output."""
    counts: dict[tuple[str, int], int] = {}
    for line in stderr.splitlines():
        fields = line.split(sep)
        if len(fields) >= 4 and fields[1].isdigit():
            tid = int(fields[0].rsplit("-", 1)[1])
            counts[(fields[3], tid)] = int(fields[1])
    return counts


def have_kernel_uprobes() -> str | None:
    """None if `perf probe` can place kernel uprobes here, else the reason to skip."""
    if os.geteuid() != 0:
        return "needs root for perf probe"
    if shutil.which("perf") is None:
        return "perf is not installed"
    if not os.path.exists("/sys/kernel/tracing/uprobe_events"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], capture_output=True)
    if not os.path.exists("/sys/kernel/tracing/uprobe_events"):
        return "no tracefs uprobe_events (kernel without uprobes?)"
    return None


def _tracefs_write(line: str) -> None:
    fd = os.open("/sys/kernel/tracing/uprobe_events", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


KPROBE_GROUP = f"pmutest{os.getpid()}"
"""The tracefs group of the tests' kernel uprobes: one per test process, so that two suites running at
once on one machine (a developer's and a clean checkout's) never define or delete each other's probes."""


class KernelUprobes:
    """Kernel uprobes placed through tracefs at exact file offsets, counted with `perf stat`."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, name: str, path: str, file_offset: int, ret: bool = False, ref_ctr: int = 0) -> str:
        """Place p:GROUP/NAME PATH:0xOFFSET (r: for a return probe; `ref_ctr`: the file offset of a USDT
        semaphore, which the kernel then holds incremented, as perf probe does for an SDT event);
        returns the perf event name."""
        where = f"{path}:{file_offset:#x}" + (f"({ref_ctr:#x})" if ref_ctr else "")
        _tracefs_write(f"{'r' if ret else 'p'}:{KPROBE_GROUP}/{name} {where}\n")
        self.names.append(name)
        return f"{KPROBE_GROUP}:{name}"

    def stat(self, events: list[str], argv: list[str], *extra: str) -> dict[str, int]:
        """Run argv under `perf stat -x,` with the given events; returns {event: count}."""
        args = ["perf", "stat", "-x,", *extra]
        for e in events:
            args += ["-e", e]
        r = subprocess.run([*args, "--", *argv], capture_output=True, text=True, timeout=120)
        return stat_counts(r.stderr)

    def clear(self) -> None:
        for name in self.names:
            _tracefs_write(f"-:{KPROBE_GROUP}/{name}\n")
        self.names.clear()


@pytest.fixture
def kernel_uprobes():
    reason = have_kernel_uprobes()
    if reason:
        pytest.skip(reason)
    _sweep_stale_groups()
    k = KernelUprobes()
    try:
        yield k
    finally:
        k.clear()


def _sweep_stale_groups() -> None:
    """Delete the probes of test processes that are gone (killed before their fixture cleared them)."""
    from pmu.perf_event import sweep_stale_groups

    sweep_stale_groups("pmutest")
