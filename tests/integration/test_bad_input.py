"""Every bad input: one line on stderr naming the problem, exit status 2, no traceback, nothing left."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import processes_running, run_pmu


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pmu: "), lines[0]
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    ("event", "needles"),
    [
        ("uprobe:/no/such/file:work", ["no such file", "/no/such/file"]),
        ("uprobe:{txt}:work", ["not an ELF file", "notelf.txt"]),
        ("uprobe:{hot}:wrok", ["unknown symbol 'wrok'", "work"]),
        ("kprobe:do_sys_open", ["unknown event type 'kprobe'"]),
        ("uprobe:{hot}:work+", ["work+"]),
        ("uprobe:{hot}:work+zz", ["work+zz"]),
        ("uprobe:{hot}:work+0x10000", ["past the end of work"]),
        ("uprobe:{hot}:main+1", ["inside the instruction"]),
        ("uprobe:libnosuchthing:foo", ["unknown library 'libnosuchthing'"]),
        ("uprobe:", ["uprobe:"]),
    ],
)
def test_bad_event(build, tmp_path, event, needles):
    hot = build("hot")
    txt = tmp_path / "notelf.txt"
    txt.write_text("hello\n")
    event = event.format(hot=hot, txt=txt)
    r = run_pmu("stat", "-e", event, "--", hot, "10")
    _one_line_error(r, *needles)
    assert r.stdout == ""  # the command never ran
    assert processes_running(hot) == []


def test_command_not_found():
    r = run_pmu("stat", "-e", "uprobe:work", "--", "/no/such/command")
    _one_line_error(r, "/no/such/command")
    r = run_pmu("stat", "-e", "uprobe:work", "--", "no-such-command-xyz")
    _one_line_error(r, "no-such-command-xyz", "not found")


def test_no_event_and_nothing_to_measure():
    r = run_pmu("stat")  # (with a command and no -e, pmu stat counts perf's default set)
    _one_line_error(r, "-e")
    assert r.stdout == ""


def test_no_command():
    r = run_pmu("stat", "-e", "uprobe:/bin/true:main")
    _one_line_error(r, "command")


def test_unknown_option():
    r = run_pmu("stat", "--bogus", "-e", "uprobe:work", "--", "true")
    _one_line_error(r, "--bogus")


def test_list_bad_target():
    r = run_pmu("list", "/no/such/file")
    _one_line_error(r, "no such file")


def test_unrelocatable_instruction(build):
    reloc = build("reloc")
    r = run_pmu("stat", "-e", "uprobe:f_ud2", "--", reloc, "1")
    _one_line_error(r, "cannot probe f_ud2", "ud2")
    assert r.stdout == ""
    assert processes_running(reloc) == []


def test_version():
    """`pmu --version` prints the installed package's version (as perf prints its own) and exits 0."""
    import tomllib

    from tests.conftest import ROOT

    with open(ROOT / "pyproject.toml", "rb") as f:
        expected = tomllib.load(f)["project"]["version"]
    r = run_pmu("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"pmu version {expected}\n", "")


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        ((), ["required: COMMAND", "(see 'pmu --help')"]),
        (("bogus",), ["invalid choice: 'bogus'", "(see 'pmu --help')"]),
        (("stat", "--bogus", "-e", "uprobe:work", "--", "true"), ["--bogus", "(see 'pmu stat --help')"]),
        (("record", "--bogus", "-e", "uprobe:work", "--", "true"), ["--bogus", "(see 'pmu record --help')"]),
        (("list", "libc", "x", "y"), ["unrecognized arguments: y", "(see 'pmu list --help')"]),
        (("stat", "-x"), ["expected one argument", "(see 'pmu stat --help')"]),
    ],
)
def test_usage_errors_point_to_the_right_help(argv, needles):
    r = run_pmu(*argv)
    _one_line_error(r, *needles)
    assert "pmu pmu" not in r.stderr


def test_ldconfig_in_path_is_not_run(tmp_path):
    """An `ldconfig` planted first in $PATH (pmu often runs as root) is never run: the system's is."""
    import os

    bindir = tmp_path / "bin"
    bindir.mkdir()
    mark = tmp_path / "ran"
    fake = bindir / "ldconfig"
    libc = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")
    fake.write_text(f"#!/bin/sh\ntouch {mark}\nprintf '\\tlibpmufake.so.1 (libc6,x86-64) => {libc}\\n'\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    r = run_pmu("list", "libpmufake", "malloc", env=env, cwd=str(bindir))
    _one_line_error(r, "unknown library 'libpmufake'")
    assert not mark.exists()
    r = run_pmu("list", "libc", "malloc", env=env)  # the system's cache is read
    assert r.returncode == 0 and r.stdout == "malloc\n", r.stderr
    assert not mark.exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("stat", "-p", ""), "bad pid list '': expected numbers separated by commas"),
        (("stat", "-t", ""), "bad tid list '': expected numbers separated by commas"),
        (("stat", "-p", "1,,2"), "bad pid list '1,,2': expected numbers separated by commas"),
        (("stat", "-p", "0"), "bad pid list '0': 0 is not a pid (1 to 2147483647)"),
        (
            ("stat", "-t", "4294967297"),
            "bad tid list '4294967297': 4294967297 is not a tid (1 to 2147483647)",
        ),
        (("stat", "-x", ""), "bad -x '': the field separator must be at least one character"),
        (
            ("record", "-c", "18446744073709551616"),
            "bad -c period 18446744073709551616: must be at most 18446744073709551615",
        ),
        (("record", "-c", "0"), "bad -c period 0: must be at least 1"),
        (("record", "--args", "7"), "bad --args 7: must be at most 6"),
        (("record", "--args", "-1"), "bad --args -1: must be at least 0"),
        (("record", "-m", "0"), "bad -m pages 0: must be at least 1"),
        (("record", "-m", "262145"), "bad -m pages 262145: must be at most 262144"),
    ],
)
def test_bad_number(build, tmp_path, argv, expected):
    """Every numeric option is checked for its range before anything runs or is written."""
    hot = build("hot")
    out = tmp_path / "out.parquet"
    r = run_pmu(*argv, "-o", out, "-e", "uprobe:work", "--", hot, "10")
    _one_line_error(r)
    assert r.stderr == f"pmu: {expected}\n"
    assert r.stdout == ""
    assert not out.exists()
    assert processes_running(hot) == []


@pytest.mark.parametrize("megabytes", [30, 50, 80, 90])
def test_out_of_address_space(build, megabytes):
    """Under `ulimit -v`: one line, exit 2, whether numpy's import, its OpenBLAS (which would exit 1 from C)
    or anything later runs out; the command never runs."""
    import resource
    import sys

    hot = build("hot")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (megabytes << 20, megabytes << 20))

    r = subprocess.run(
        [sys.executable, "-m", "pmu", "stat", "-e", "uprobe:work", "--", hot, "10"],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=60,
    )
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (
        "pmu: out of memory (a limit such as ulimit -v, or the machine's memory is exhausted)\n"
    )
    assert processes_running(hot) == []
