"""Test the request, not only the result: the EventAttrs a command line builds, without running anything."""

from __future__ import annotations

import pytest

from pmu.commands import build_parser
from pmu.commands import record as record_cmd
from pmu.commands import stat as stat_cmd
from pmu.errors import UsageError
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


def test_engine_switches_parse():
    args = build_parser().parse_args(["stat", "--no-optimize", "-v", "-e", "uprobe:w", "--", "x"])
    assert args.no_optimize and args.verbose


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        (stat_cmd, ["stat", "--", "./x"], "no events given"),
        (record_cmd, ["record", "-c", "0", "-e", "uprobe:w", "--", "./x"], "bad -c period"),
        (record_cmd, ["record", "--args", "7", "-e", "uprobe:w", "--", "./x"], "at most 6"),
    ],
)
def test_bad_requests(module, argv, message):
    with pytest.raises(UsageError, match=message):
        _attrs(module, *argv)
