"""Every integer option of every subcommand has a range that `check_args` enforces."""

from __future__ import annotations

import argparse

import pytest

from pmu.commands import build_parser
from pmu.commands.options import NUMBERS, check_args
from pmu.errors import UsageError
from pmu.ring import MAX_PAGES


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_integer_option_has_a_range():
    found = {action.dest for sub in _subparsers().values() for action in sub._actions if action.type is int}
    assert found == set(NUMBERS)
    assert NUMBERS["pages"][2] == MAX_PAGES


@pytest.mark.parametrize("dest", sorted(NUMBERS))
def test_the_ends_of_each_range(dest):
    option, low, high = NUMBERS[dest]
    flag = option.split()[0]
    for value, ok in ((low, True), (high, True), (low - 1, False), (high + 1, False)):
        args = build_parser().parse_args(["record", flag, str(value), "-e", "uprobe:work", "--", "x"])
        if ok:
            check_args(args)
        else:
            bound = f"at least {low}" if value < low else f"at most {high}"
            with pytest.raises(UsageError, match=f"bad {option} {value}: must be {bound}$"):
                check_args(args)
