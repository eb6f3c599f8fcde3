"""Test the request, not only the result: the EventAttrs a command line builds, without running anything."""

from __future__ import annotations

import pytest

from pmu.commands import build_parser
from pmu.commands import record as record_cmd
from pmu.commands import stat as stat_cmd
from pmu.errors import UsageError
from pmu.events.counters import DEFAULT_SET
from pmu.events.spec import ProbeKind


def _attrs(module, *argv: str):
    args = build_parser().parse_args(list(argv))
    return args, module.build_attrs(args)


def test_stat_of_a_command_opens_disabled_and_enables_at_exec():
    _, attrs = _attrs(stat_cmd, "stat", "-e", "uprobe:work,uprobe:./x:f+4", "--", "./x")
    assert [a.name for a in attrs] == ["uprobe:work", "uprobe:./x:f+4"]
    assert all(a.disabled and a.enable_on_exec and a.inherit for a in attrs)
    assert all(a.sample_period == 0 for a in attrs)


def test_no_inherit_gives_inherit_false():
    for flag in ("-i", "--no-inherit"):
        _, attrs = _attrs(stat_cmd, "stat", flag, "-e", "uprobe:work", "--", "./x")
        assert attrs[0].inherit is False


def test_attach_opens_enabled():
    args, attrs = _attrs(stat_cmd, "stat", "-p", "1234", "-e", "uprobe:libc:malloc", "--", "sleep", "1")
    assert not attrs[0].disabled and not attrs[0].enable_on_exec
    assert args.pid == "1234"


def test_record_samples_every_hit_or_every_nth():
    _, attrs = _attrs(record_cmd, "record", "-e", "uretprobe:work", "--args", "2", "--", "./x")
    assert attrs[0].sample_period == 1 and attrs[0].sample_args == 2
    assert attrs[0].probe.kind is ProbeKind.URETPROBE
    _, attrs = _attrs(record_cmd, "record", "-c", "10", "-e", "uprobe:work", "--", "./x")
    assert attrs[0].sample_period == 10


def test_stat_without_events_counts_perfs_default_set():
    _, attrs = _attrs(stat_cmd, "stat", "--", "./x")
    assert [a.name for a in attrs] == list(DEFAULT_SET)
    assert [a.pmu for a in attrs] == ["software"] * 4 + ["hardware"] * 4
    assert all(a.disabled and a.enable_on_exec and a.inherit for a in attrs)


def test_counters_and_uprobes_mix_each_on_its_pmu():
    _, attrs = _attrs(stat_cmd, "stat", "-e", "task-clock,cs,uprobe:libc:malloc,cycles", "--", "./x")
    assert [(a.name, a.pmu) for a in attrs] == [
        ("task-clock", "software"),
        ("cs", "software"),
        ("uprobe:libc:malloc", "uprobe"),
        ("cycles", "hardware"),
    ]
    assert attrs[1].counter is not None and attrs[1].counter.name == "context-switches"


def test_kernel_engine_and_system_wide_put_uprobes_on_the_kernel_pmu():
    _, attrs = _attrs(stat_cmd, "stat", "--engine", "kernel", "-e", "uprobe:libc:malloc", "--", "./x")
    assert attrs[0].pmu == "kernel-uprobe" and attrs[0].enable_on_exec
    _, attrs = _attrs(stat_cmd, "stat", "-a", "-e", "uprobe:libc:malloc", "--", "sleep", "1")
    assert attrs[0].pmu == "kernel-uprobe"
    assert attrs[0].disabled and not attrs[0].enable_on_exec  # opened first, enabled together


def test_engine_switches_parse():
    args = build_parser().parse_args(["stat", "--no-optimize", "-v", "-e", "uprobe:w", "--", "x"])
    assert args.no_optimize and args.verbose


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        (stat_cmd, ["stat"], "no events given"),
        (stat_cmd, ["stat", "-a", "--engine", "ptrace", "-e", "uprobe:libc:malloc"], "kernel engine"),
        (record_cmd, ["record", "-e", "task-clock", "--", "./x"], "pmu stat"),
        (record_cmd, ["record", "-c", "0", "-e", "uprobe:w", "--", "./x"], "bad -c period"),
        (record_cmd, ["record", "--args", "7", "-e", "uprobe:w", "--", "./x"], "at most 6"),
    ],
)
def test_bad_requests(module, argv, message):
    with pytest.raises(UsageError, match=message):
        _attrs(module, *argv)
