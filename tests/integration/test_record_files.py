"""What `pmu record` does to the file system: nothing before the run records, no link ever followed, and
a full disk ending in one line with the traced process restored (issue 9, items 8, 9 and 11)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import run_pmu
from tests.integration.test_attach import Spin


class FixedHits(Spin):
    """tests/targets/fixed_hits.c, running: NT threads that call work() N times each per round, a round
    being started by `go()` or by the command `go_command()` gives pmu (which pmu runs once it has
    attached and armed its probes, so every hit of the round is counted, whatever the machine's speed)."""

    def __init__(self, exe: Path, workdir: Path, threads: int, calls: int) -> None:
        self.ctl, self.done = workdir / "ctl", workdir / "done"
        for fifo in (self.ctl, self.done):
            os.mkfifo(fifo)
        self.exe = str(exe)
        self.per_round = threads * calls
        argv = [self.exe, str(self.ctl), str(self.done), str(threads), str(calls)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "ready\n"
        self.pid = self.proc.pid
        self.rounds = 0

    def go_command(self, hold: bool = False) -> list[str]:
        """A command that makes one round and exits when it is done (for `pmu record -p PID -- CMD`);
        with `hold`, it then waits until `release()`, so pmu can only end by its own failure."""
        self.rounds += 1
        script = f"echo go > '{self.ctl}' && cat '{self.done}'"
        if hold:
            self.hold = self.ctl.parent / "hold"
            os.mkfifo(self.hold)
            # and not on pmu's stdout and stderr, which it would keep open after pmu has ended
            script = f"exec >/dev/null 2>&1; {script} && cat '{self.hold}'"
        return ["sh", "-c", script]

    def release(self) -> None:
        """Let the command of `go_command(hold=True)` end: its cat gets the FIFO's end of file, or,
        not there yet (pmu ended before the command reached it), the command is killed: it must not
        outlive the test."""
        try:
            fd = os.open(self.hold, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:  # ENXIO: no reader yet
            pass
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if str(self.hold).encode() in f.read():
                            os.kill(int(entry), signal.SIGKILL)
                except OSError:
                    continue

    def go(self) -> None:
        """One round without pmu: each call still computes right. The line of the round pmu's command
        started may come first: a command pmu ended on its own failure may not have read it yet."""
        self.rounds += 1
        self.ctl.write_text("go\n")
        lines = self.done.read_text().splitlines()
        assert 1 <= len(lines) <= 2 and set(lines) == {f"done {self.per_round} 0"}, lines

    def finish(self) -> str:
        self.ctl.write_text("quit\n")
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, out
        assert out == f"total={self.rounds * self.per_round} bad=0\n"
        return out


@pytest.fixture
def fixed_hits(build: Callable[..., Path], tmp_path: Path) -> Callable[[int, int], FixedHits]:
    made: list[FixedHits] = []

    def make(threads: int, calls: int) -> FixedHits:
        workdir = tmp_path / f"fifos{len(made)}"
        workdir.mkdir()
        target = FixedHits(build("fixed_hits"), workdir, threads, calls)
        made.append(target)
        return target

    yield make  # type: ignore[misc]
    for target in made:
        target.kill()


def _listing(directory: Path) -> dict[str, bytes | str]:
    """Every entry of a directory: a file's bytes, a link's target."""
    out: dict[str, bytes | str] = {}
    for entry in sorted(directory.iterdir()):
        out[entry.name] = os.readlink(entry) if entry.is_symlink() else entry.read_bytes()
    return out


def _one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pmu: ") and needle in lines[0], r.stderr


@pytest.fixture
def recordings(build: Callable[..., Path], tmp_path: Path) -> Path:
    """A directory holding a good recording and its .old, as a user has after two runs."""
    hot = build("hot")
    d = tmp_path / "recs"
    d.mkdir()
    for n in ("100", "200"):
        r = run_pmu("record", "-o", d / "good.parquet", "-e", "uprobe:work", "--", hot, n)
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in d.iterdir()) == ["good.parquet", "good.parquet.old"]
    return d


# --- item 9: a failing run changes nothing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "needle"),
    [
        ("unknown symbol", "unknown symbol 'NoSuchSymbol'"),
        ("unknown library", "libnosuchlib"),
        ("command not found", "command not found"),
    ],
)
def test_a_failing_launch_touches_nothing(recordings: Path, build, how: str, needle: str) -> None:
    before = _listing(recordings)
    hot = build("hot")
    event = {"unknown symbol": "uprobe:libc:NoSuchSymbol", "unknown library": "uprobe:libnosuchlib:f"}
    argv = ["/no/such/command"] if how == "command not found" else [str(hot), "10"]
    for _ in range(2):  # two typos in a row: the recording is still there, and its .old
        r = run_pmu(
            "record", "-o", recordings / "good.parquet", "-e", event.get(how, "uprobe:work"), "--", *argv
        )
        _one_line_error(r, needle)
        assert _listing(recordings) == before


def test_a_failing_attach_touches_nothing(recordings: Path, fixed_hits) -> None:
    target = fixed_hits(2, 10)
    before = _listing(recordings)
    out = recordings / "good.parquet"
    r = run_pmu(
        "record", "-o", out, "-p", target.pid, "-e", "uprobe:NoSuchSymbol", "--", *target.go_command()
    )
    _one_line_error(r, "unknown symbol 'NoSuchSymbol'")
    target.rounds -= 1  # pmu failed before it ran the command
    assert _listing(recordings) == before
    r = run_pmu("record", "-o", out, "-p", "999999999", "-e", "uprobe:work")
    assert r.returncode == 2 and r.stderr.startswith("pmu: "), r.stderr
    assert _listing(recordings) == before
    assert target.tracer() == 0
    target.go()
    target.finish()


def test_a_run_that_records_replaces_and_keeps_old(recordings: Path, build) -> None:
    previous = (recordings / "good.parquet").read_bytes()
    r = run_pmu("record", "-o", recordings / "good.parquet", "-e", "uprobe:work", "--", build("hot"), "300")
    assert r.returncode == 0, r.stderr
    assert (recordings / "good.parquet.old").read_bytes() == previous
    assert pq.ParquetFile(recordings / "good.parquet").metadata.num_rows == 300
    assert sorted(p.name for p in recordings.iterdir()) == ["good.parquet", "good.parquet.old"]


def test_unwritable_output_fails_before_the_run(build, tmp_path: Path) -> None:
    """The output's directory is checked at start: the command does not run for nothing."""
    marker = tmp_path / "ran"
    r = run_pmu(
        "record", "-o", tmp_path / "nodir" / "x.parquet", "-e", "uprobe:libc:getpid", "--", "touch", marker
    )
    _one_line_error(r, f"cannot write {tmp_path / 'nodir' / 'x.parquet'}: No such file or directory")
    assert not marker.exists()


# --- item 8: links planted in a shared directory --------------------------------------------------------


def test_planted_links_are_not_followed(build, tmp_path: Path) -> None:
    """As root in a world-writable directory, links another user planted where pmu used to write its
    temporary file (and its likely variants) are left alone; the file they point to is untouched."""
    victim = tmp_path / "rootfile"
    victim.write_text("root's data\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    planted = ["out.parquet.tmp", ".out.parquet.tmp", "out.parquet.old.tmp"]
    for name in planted:
        (shared / name).symlink_to(victim)
    out = shared / "out.parquet"
    r = run_pmu("record", "-o", out, "-e", "uprobe:work", "--", build("hot"), "1000")
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "root's data\n"
    assert sorted(p.name for p in shared.iterdir()) == sorted([*planted, "out.parquet"])
    assert all(os.readlink(shared / name) == str(victim) for name in planted)
    assert pq.ParquetFile(out).metadata.num_rows == 1000
    assert stat.S_ISREG(os.lstat(out).st_mode)


def test_a_device_is_written_in_place(build) -> None:
    r = run_pmu("record", "-o", "/dev/null", "-e", "uprobe:work", "--", build("hot"), "100")
    assert r.returncode == 0, r.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and not os.path.exists("/dev/null.old")


def test_a_fifo_is_written_in_place(build, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    r = run_pmu("record", "-o", fifo, "-e", "uprobe:work", "--", build("hot"), "100")
    data, _ = reader.communicate(timeout=60)
    assert r.returncode == 0, r.stderr
    assert data.startswith(b"PAR1") and data.endswith(b"PAR1")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


# --- item 11: a full disk during record -p ---------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs filled to its last byte: every write to it fails with ENOSPC, whatever pmu writes."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    d = tmp_path / "full"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)]).returncode:
        pytest.skip("cannot mount tmpfs")
    try:
        fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # ENOSPC: full
        finally:
            os.close(fd)
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)])


def test_full_disk_during_attach_is_one_line_and_restores(full_disk: Path, fixed_hits) -> None:
    """More records than one row group (2**18), and a command that does not end: pmu can only stop by
    its own failure, writing the first row group from a drain of the event loop while it is attached.
    The drain after the restore must not write again (it did, and `write to closed` was reported)."""
    target = fixed_hits(4, 67_500)  # 270,000 hits
    code_before, maps_before = target.code(), target.maps()
    out = full_disk / "out.parquet"
    cmd = target.go_command(hold=True)
    try:
        r = run_pmu("record", "-o", out, "-p", target.pid, "-e", "uprobe:work", "--", *cmd)
    finally:
        target.release()
    assert r.stderr.splitlines() == [f"pmu: cannot write {out}: No space left on device"], r.stderr
    assert r.returncode == 2
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]
    assert target.tracer() == 0
    assert target.code() == code_before and target.maps() == maps_before
    target.go()
    target.finish()


def test_full_disk_at_close_is_one_line_and_restores(full_disk: Path, fixed_hits) -> None:
    """Fewer records than a row group: the failing write is the file's first, after the run."""
    target = fixed_hits(2, 500)
    code_before, maps_before = target.code(), target.maps()
    out = full_disk / "out.parquet"
    r = run_pmu("record", "-o", out, "-p", target.pid, "-e", "uprobe:work", "--", *target.go_command())
    assert r.stderr.splitlines() == [f"pmu: cannot write {out}: No space left on device"], r.stderr
    assert r.returncode == 2
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]
    assert target.tracer() == 0
    assert target.code() == code_before and target.maps() == maps_before
    target.go()
    target.finish()


def test_counts_are_exact_with_fixed_hits(fixed_hits, tmp_path: Path) -> None:
    """The synchronisation the tests above rely on: the round pmu's command starts is counted whole."""
    target = fixed_hits(3, 1000)
    out = tmp_path / "fh.parquet"
    r = run_pmu("record", "-o", out, "-p", target.pid, "-e", "uprobe:work", "--", *target.go_command())
    assert r.returncode == 0, r.stderr
    meta = pq.read_metadata(out).metadata
    assert json.loads(meta[b"pmu.hits_per_event"]) == {"uprobe:work": 3000}
    assert pq.ParquetFile(out).metadata.num_rows == 3000
    target.finish()
