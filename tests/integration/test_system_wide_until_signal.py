"""`pmu stat -a` without a command counts until Ctrl-C (SIGINT) or SIGTERM, then prints, as perf stat -a."""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from pmu import perf_event

_libc = ctypes.CDLL(None, use_errno=True)
NR_PIDFD_GETFD = 438


def _enabled_counters(pid: int) -> int:
    """How many of pmu's perf_event descriptors are enabled: each is taken into this process with
    pidfd_getfd(2) and read (pmu opens them with TOTAL_TIME_ENABLED: an enabled one has time)."""
    n = 0
    pidfd = os.pidfd_open(pid)
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[perf_event]":
                    continue
            except OSError:
                continue
            mine = _libc.syscall(NR_PIDFD_GETFD, pidfd, int(fd), 0)
            if mine < 0:
                continue
            try:
                _, enabled, _ = struct.unpack("<QQQ", os.read(mine, 24))
                n += enabled > 0
            finally:
                os.close(mine)
    finally:
        os.close(pidfd)
    return n


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_counts_every_call_made_until_the_signal(build, sig) -> None:
    hot = build("hot")
    argv = [sys.executable, "-m", "pmu", "stat", "-a", "-x,", "-e", f"uprobe:{hot}:work,task-clock"]
    pmu = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        want = 2 * len(perf_event.online_cpus())  # one descriptor per event and CPU
        deadline = time.monotonic() + 120
        while _enabled_counters(pmu.pid) < want:  # every one open and enabled: counting has begun
            assert pmu.poll() is None, pmu.communicate()
            assert time.monotonic() < deadline, "pmu never enabled its counters"
            time.sleep(0.01)
        subprocess.run([hot, "1234"], check=True, capture_output=True)
        pmu.send_signal(sig)
        _, err = pmu.communicate(timeout=60)
    finally:
        if pmu.poll() is None:
            pmu.kill()
            pmu.wait()
    assert pmu.returncode == 0, err
    lines = [line.split(",") for line in err.splitlines()]
    assert lines[0][:3] == ["1234", "", f"uprobe:{hot}:work"]
    assert lines[1][1:3] == ["msec", "task-clock"] and float(lines[1][0]) > 0
