"""The stat printer against the real perf binary: same counts in, the same lines out as `perf stat`.

Puts kernel uprobes on a tiny C program with `perf probe`, runs `perf stat` (text, -x, -j, --per-thread
-p) on it, feeds the counts and run-times perf printed to pmu's formatter and compares line by line.
Multiplexed and enabled-but-never-ran counts cannot be produced with uprobes (software events always
fit), so those go through `perf stat record` + `perf stat report` with the counts patched in the file.
Skipped unless root, with perf, gcc and working `perf probe`. The probes are always deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pmu.events.event import Counts
from pmu.output.stat import (
    C_NUMBERS,
    NumberFormat,
    StatLine,
    StatReport,
    format_csv,
    format_json,
    format_text,
)

PROGRAM = r"""
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((noinline)) int work(int x) { __asm__ volatile(""); return x * 2 + 1; }
__attribute__((noinline)) int spare(int x) { __asm__ volatile(""); return x + 3; }

static long n, delay_ms;

static void *loop(void *arg) {
    long times = n * (long)arg;
    int s = 0;
    usleep(delay_ms * 1000);
    for (long i = 0; i < times; i++)
        s += work((int)i);
    return (void *)(long)s;
}

/* prog N DELAY_MS: three threads call work() N, 2N and 3N times after sleeping DELAY_MS. */
int main(int argc, char **argv) {
    pthread_t t[2];
    n = argc > 1 ? atol(argv[1]) : 1000;
    delay_ms = argc > 2 ? atol(argv[2]) : 0;
    for (long k = 0; k < 2; k++)
        pthread_create(&t[k], 0, loop, (void *)(k + 2));
    loop((void *)1L);
    for (int k = 0; k < 2; k++)
        pthread_join(t[k], 0);
    if (argc > 3)
        spare(0);
    return 0;
}
"""

C_ENV = {**os.environ, "LC_ALL": "C"}
"""perf's text output follows the locale; C gives ungrouped counts (pmu's C_NUMBERS)."""


def perf(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["perf", *args], capture_output=True, text=True, timeout=timeout, env=env or C_ENV, check=False
    )


@dataclass(frozen=True)
class Probed:
    prog: Path
    work: str
    """The probe on work(): hit N, 2N and 3N times by the three threads."""
    spare: str
    """The probe on spare(): never hit."""

    @property
    def events(self) -> list[str]:
        return [self.work, self.spare]

    def event_args(self) -> list[str]:
        return [arg for event in self.events for arg in ("-e", event)]


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Probed]:
    if os.geteuid() != 0:
        pytest.skip("kernel uprobes through perf probe need root")
    for tool in ("perf", "gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    tmp = tmp_path_factory.mktemp("perf_format")
    source, prog = tmp / "prog.c", tmp / "prog"
    source.write_text(PROGRAM)
    subprocess.run(["gcc", "-O1", "-g", "-pthread", "-o", str(prog), str(source)], check=True)
    # perf 6.1 wants event names unique across groups, and others may be probing concurrently.
    group = f"pmut{os.getpid()}"
    work, spare = f"{group}:{group}_work", f"{group}:{group}_spare"
    try:
        for event, func in ((work, "work"), (spare, "spare")):
            added = perf("probe", "-x", str(prog), "-a", f"{event}={func}")
            if added.returncode != 0:
                pytest.skip(f"perf probe does not work here: {added.stderr.strip()}")
        yield Probed(prog, work, spare)
    finally:
        perf("probe", "-d", f"{group}:*")


def stat(probed: Probed, *options: str, n: int = 200, delay_ms: int = 0) -> subprocess.CompletedProcess[str]:
    done = perf("stat", *options, *probed.event_args(), str(probed.prog), str(n), str(delay_ms))
    assert done.returncode == 0, done.stderr
    return done


def stat_attached(probed: Probed, *options: str) -> tuple[int, str]:
    """perf stat --per-thread -p PID on the program while its three threads sleep; returns (pid, stderr)."""
    proc = subprocess.Popen([str(probed.prog), "200", "1000"])
    # perf stat -p waits for the process to vanish, and a zombie does not: reap it as soon as it exits.
    reaper = threading.Thread(target=proc.wait, daemon=True)
    reaper.start()
    try:
        time.sleep(0.3)
        done = perf("stat", "--per-thread", *options, *probed.event_args(), "-p", str(proc.pid))
        assert done.returncode == 0, done.stderr
        return proc.pid, done.stderr
    finally:
        reaper.join(timeout=30)
        if proc.poll() is None:
            proc.kill()


# -- parsing perf's output ------------------------------------------------------------------------------


def csv_lines(stderr: str, events: list[str], thread: bool = False, sep: str = ",") -> list[list[str]]:
    name_at = 3 if thread else 2
    rows = [line.split(sep) for line in stderr.splitlines()]
    return [row for row in rows if len(row) > name_at and row[name_at] in events]


def line_from_csv(row: list[str], thread: bool = False) -> StatLine:
    """A StatLine carrying the count and run-time perf printed (run == ena: percent was 100.00)."""
    if thread:
        tid, row = row[0], row[1:]
    assert row[4] == "100.00", row
    run = int(row[3])
    counts = None if row[0] == "<not counted>" else Counts(int(row[0]), run, run)
    return StatLine(event=row[2], counts=counts, thread=tid if thread else None, unit=row[1])


def json_lines(stderr: str) -> list[tuple[str, dict[str, object]]]:
    return [(line, json.loads(line)) for line in stderr.splitlines() if line.startswith("{")]


def line_from_json(obj: dict[str, object]) -> StatLine:
    assert obj["pcnt-running"] == 100.0, obj
    run = obj["event-runtime"]
    value = obj["counter-value"]
    assert isinstance(run, int) and isinstance(value, str)
    counts = None if value == "<not counted>" else Counts(int(float(value)), run, run)
    thread = obj.get("thread")
    assert thread is None or isinstance(thread, str)
    return StatLine(event=str(obj["event"]), counts=counts, thread=thread, unit=str(obj["unit"]))


TEXT_LINE = re.compile(
    r"^(?:\s*(?P<thread>\S+-\d+)\s+)?\s*(?P<count>[\d,.]+|<not counted>)\s+(?P<event>\S+)\s*$"
)
SECONDS = re.compile(r"^\s+(?P<s>\d+\.\d+) seconds (?P<what>time elapsed|user|sys)$")


def parse_text(stderr: str, events: list[str]) -> tuple[str, list[StatLine], dict[str, float]]:
    """perf's text from its header on, the event lines (run == ena assumed) and the seconds lines."""
    text = stderr[stderr.index("\n Performance counter stats for ") :]
    lines, seconds = [], {}
    for raw in text.splitlines():
        if (m := TEXT_LINE.match(raw)) and m["event"] in events:
            count = m["count"]
            counts = None if count == "<not counted>" else full(int(re.sub(r"\D", "", count)))
            lines.append(StatLine(event=m["event"], counts=counts, thread=m["thread"]))
        elif m := SECONDS.match(raw):
            seconds[m["what"]] = float(m["s"])
    return text, lines, seconds


def full(value: int) -> Counts:
    return Counts(value, 1000, 1000)


def cmd(probed: Probed, n: int = 200, delay_ms: int = 0) -> list[str]:
    return [str(probed.prog), str(n), str(delay_ms)]


# -- uprobe events: command runs ------------------------------------------------------------------------


def test_csv_matches_perf(probed: Probed) -> None:
    for sep in (",", ";"):
        rows = csv_lines(stat(probed, "-x", sep).stderr, probed.events, sep=sep)
        assert [row[2] for row in rows] == probed.events
        assert rows[0][0] == "1200" and rows[1][0] == "0"  # 200 + 400 + 600 hits of work(), none of spare()
        rep = StatReport(cmd(probed), [line_from_csv(row) for row in rows], 0.0, 0.0, 0.0)
        ours = [line.split(sep) for line in format_csv(rep, sep).splitlines()]
        assert [len(row) for row in ours] == [len(row) for row in rows] == [7, 7]
        assert ours == rows


def test_json_matches_perf(probed: Probed) -> None:
    theirs = json_lines(stat(probed, "-j").stderr)
    assert [obj["event"] for _, obj in theirs] == probed.events
    rep = StatReport(cmd(probed), [line_from_json(obj) for _, obj in theirs], 0.0, 0.0, 0.0)
    ours = json_lines(format_json(rep))
    assert [list(obj) for _, obj in ours] == [list(obj) for _, obj in theirs]
    assert [obj for _, obj in ours] == [obj for _, obj in theirs]
    assert [line for line, _ in ours] == [line for line, _ in theirs]


def test_text_matches_perf(probed: Probed) -> None:
    text, lines, seconds = parse_text(stat(probed).stderr, probed.events)
    assert [line.event for line in lines] == probed.events
    rep = StatReport(cmd(probed), lines, seconds["time elapsed"], seconds["user"], seconds["sys"])
    assert format_text(rep, C_NUMBERS) == text


def test_text_grouped_counts_match_perf_under_en_us(probed: Probed, tmp_path: Path) -> None:
    locales = tmp_path / "locales"
    locales.mkdir()
    built = subprocess.run(
        ["localedef", "-i", "en_US", "-f", "UTF-8", str(locales / "en_US.UTF-8")],
        capture_output=True,
        check=False,
    )
    if built.returncode not in (0, 1) or not (locales / "en_US.UTF-8").exists():
        pytest.skip("cannot build an en_US.UTF-8 locale with localedef")
    env = {**os.environ, "LOCPATH": str(locales), "LC_ALL": "en_US.UTF-8"}
    done = perf("stat", *probed.event_args(), *cmd(probed, n=1000), env=env)
    assert done.returncode == 0, done.stderr
    text, lines, seconds = parse_text(done.stderr, probed.events)
    assert "             6,000      " in text  # 1000 + 2000 + 3000 hits, grouped
    rep = StatReport(cmd(probed, n=1000), lines, seconds["time elapsed"], seconds["user"], seconds["sys"])
    assert format_text(rep, NumberFormat(",", ".", (3, 3, 0))) == text


def test_not_counted_matches_perf(probed: Probed) -> None:
    """-D delays enabling past the program's end: the events are never enabled."""
    options = ("-D", "500")
    rows = csv_lines(stat(probed, "-x,", *options, n=0).stderr, probed.events)
    assert [row[0] for row in rows] == ["<not counted>"] * 2
    rep = StatReport(cmd(probed, n=0), [line_from_csv(row) for row in rows], 0.0, 0.0, 0.0)
    assert [line.split(",") for line in format_csv(rep, ",").splitlines()] == rows
    assert all(line.counts is None for line in rep.lines)

    theirs = json_lines(stat(probed, "-j", *options, n=0).stderr)
    rep = StatReport(cmd(probed, n=0), [line_from_json(obj) for _, obj in theirs], 0.0, 0.0, 0.0)
    assert [line for line, _ in json_lines(format_json(rep))] == [line for line, _ in theirs]

    text, lines, seconds = parse_text(stat(probed, *options, n=0).stderr, probed.events)
    assert [line.counts for line in lines] == [None, None]
    rep = StatReport(cmd(probed, n=0), lines, seconds["time elapsed"], seconds["user"], seconds["sys"])
    assert format_text(rep, C_NUMBERS) == text


# -- uprobe events: --per-thread on an attached process -------------------------------------------------


def test_per_thread_csv_matches_perf(probed: Probed) -> None:
    pid, stderr = stat_attached(probed, "-x,")
    rows = csv_lines(stderr, probed.events, thread=True)
    assert len(rows) == 6 and {row[0] for row in rows} == {f"prog-{tid}" for tid in tids(rows)}
    assert f"prog-{pid}" in {row[0] for row in rows}
    rep = StatReport([], [line_from_csv(row, thread=True) for row in rows], 0.0, 0.0, 0.0, per_thread=True)
    ours = [line.split(",") for line in format_csv(rep, ",").splitlines()]
    assert [len(row) for row in ours] == [len(row) for row in rows] == [8] * 6
    assert ours == rows
    # perf lists each event's threads by count, highest first; pmu does the same from any order.
    work_counts = [int(row[1]) for row in rows if row[3] == probed.work]
    assert work_counts == sorted(work_counts, reverse=True)
    shuffled = StatReport([], rep.lines[::-1], 0.0, 0.0, 0.0, per_thread=True)
    ours_shuffled = [line.split(",") for line in format_csv(shuffled, ",").splitlines()]
    assert [row[1] for row in ours_shuffled if row[3] == probed.work] == [str(c) for c in work_counts]


def tids(rows: list[list[str]]) -> set[str]:
    return {row[0].rsplit("-", 1)[1] for row in rows}


def test_per_thread_json_matches_perf(probed: Probed) -> None:
    _, stderr = stat_attached(probed, "-j")
    theirs = json_lines(stderr)
    assert len(theirs) == 6 and all(list(obj)[0] == "thread" for _, obj in theirs)
    rep = StatReport([], [line_from_json(obj) for _, obj in theirs], 0.0, 0.0, 0.0, per_thread=True)
    ours = json_lines(format_json(rep))
    assert [list(obj) for _, obj in ours] == [list(obj) for _, obj in theirs]
    assert [line for line, _ in ours] == [line for line, _ in theirs]


def test_per_thread_text_matches_perf(probed: Probed) -> None:
    pid, stderr = stat_attached(probed)
    text, lines, seconds = parse_text(stderr, probed.events)
    assert len(lines) == 6 and all(line.thread for line in lines)
    assert "seconds user" not in text
    rep = StatReport(
        [], lines, seconds["time elapsed"], 0.0, 0.0, target=f"process id '{pid}'", per_thread=True
    )
    assert format_text(rep, C_NUMBERS) == text


# -- multiplexed and enabled-but-never-ran counts, through perf stat report -----------------------------

PERF_RECORD_STAT = 76


def patch_stat_records(data: Path, out: Path, counts: list[tuple[int, int, int]]) -> int:
    """Rewrite (val, ena, run) of the PERF_RECORD_STAT records in a `perf stat record` file."""
    blob = bytearray(data.read_bytes())
    assert blob[:8] == b"PERFILE2"
    data_offset, data_size = struct.unpack_from("<QQ", blob, 0x28)
    at, patched = data_offset, 0
    while at < data_offset + data_size and patched < len(counts):
        kind, _misc, size = struct.unpack_from("<IHH", blob, at)
        if kind == PERF_RECORD_STAT:
            # header(8) id(8) cpu(4) thread(4) then val, ena, run
            struct.pack_into("<QQQ", blob, at + 24, *counts[patched])
            patched += 1
        at += size
    out.write_bytes(bytes(blob))
    return patched


def test_multiplexed_and_never_ran_match_perf_stat_report(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("perf") is None:
        pytest.skip("needs root and perf")
    recorded, patched = tmp_path / "stat.data", tmp_path / "patched.data"
    done = perf("stat", "record", "-o", str(recorded), "-e", "page-faults", "-e", "minor-faults", "true")
    if done.returncode != 0:
        pytest.skip(f"perf stat record does not work here: {done.stderr.strip()}")
    counts = [(1000, 3000, 2000), (5, 1000, 0)]  # 66.67% running; enabled but never ran
    assert patch_stat_records(recorded, patched, counts) == 2
    lines = [
        StatLine(event, Counts(v, e, r))
        for event, (v, e, r) in zip(["page-faults", "minor-faults"], counts, strict=True)
    ]
    rep = StatReport(["true"], lines, 0.0, 0.0, 0.0, target="x")

    def report(*options: str) -> str:
        out = perf("stat", *options, "report", "-i", str(patched))
        assert out.returncode == 0, out.stderr
        return out.stdout + out.stderr

    csv = [line for line in report("-x,").splitlines() if line.count(",") >= 6]
    assert csv == ["1500,,page-faults,2000,66.00,,", "<not counted>,,minor-faults,0,0.00,,"]
    assert format_csv(rep, ",").splitlines() == csv

    theirs = json_lines(report("-j"))
    assert [line for line, _ in json_lines(format_json(rep))] == [line for line, _ in theirs]

    text = [line for line in report().splitlines() if "faults" in line and "stat record" not in line]
    assert text[0].endswith("  (66.67%)") and text[1].endswith("  (0.00%)")
    assert format_text(rep, C_NUMBERS).splitlines()[3:5] == text
