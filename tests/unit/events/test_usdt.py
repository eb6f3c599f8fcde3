"""USDT: the event grammar and the notes' argument operands (pmu/events/usdt.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pmu.errors import EventSpecError, SymbolError
from pmu.events.spec import ProbeKind, parse_event
from pmu.events.usdt import parse_arg


@pytest.mark.parametrize(
    ("text", "target", "provider", "name"),
    [
        ("usdt:tick", None, None, "tick"),
        ("usdt:./app:tick", "./app", None, "tick"),
        ("usdt:/usr/bin/python3:python:function__entry", "/usr/bin/python3", "python", "function__entry"),
        ("usdt:libc:memory_malloc_retry", "libc", None, "memory_malloc_retry"),
    ],
)
def test_usdt_grammar(text: str, target: str | None, provider: str | None, name: str) -> None:
    spec = parse_event(text)
    assert (spec.kind, spec.target, spec.provider, spec.symbol) == (ProbeKind.USDT, target, provider, name)
    assert spec.name == text


@pytest.mark.parametrize(
    "text", ["usdt:", "usdt:a:b:c:d", "usdt::tick", "usdt:./app:bad-name", "usdt:./a:p:1x"]
)
def test_usdt_grammar_errors(text: str) -> None:
    with pytest.raises(EventSpecError):
        parse_event(text)


REGS = SimpleNamespace(
    rax=0xFFFF_FFFF_FFFF_FFFE, rbx=0x1122_3344_5566_7788, rsp=0x1000, rbp=0x2000, rdx=3, rip=0
)
MEMORY = {0x1000 + 112: (-5).to_bytes(4, "little", signed=True), 0x2000 - 16: (77).to_bytes(8, "little")}
MEMORY[0x2000 + 3 * 8 + 8] = (9).to_bytes(8, "little")
MEMORY[0x5000 + 0x40 + 8] = (42).to_bytes(8, "little")


def _read(addr: int, size: int) -> bytes | None:
    data = MEMORY.get(addr)
    return None if data is None else data[:size]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8@%rbx", 0x1122_3344_5566_7788),
        ("-4@%eax", (-2) & (1 << 64) - 1),  # the low half, sign-extended
        ("4@%eax", 0xFFFF_FFFE),
        ("1@%bl", 0x88),
        ("1@%bh", 0x77),
        ("-2@%bx", 0x7788),
        ("4@$5", 5),
        ("-4@$-3", (-3) & (1 << 64) - 1),
        ("-4@112(%rsp)", (-5) & (1 << 64) - 1),
        ("8@-16(%rbp)", 77),
        ("8@8(%rbp,%rdx,8)", 9),
        ("%rbx", 0x1122_3344_5566_7788),  # no size: 8
        ("8@64(%rsp)", 0),  # unreadable memory reads as 0, never a fault
    ],
)
def test_operands(text: str, value: int) -> None:
    assert parse_arg(text).value(REGS, _read, 0) == value


def test_rip_relative_symbol_operand() -> None:
    from dataclasses import replace

    arg = replace(parse_arg("8@counter+8(%rip)"), sym_vaddr=0x40)
    assert arg.symbol == "counter"
    assert arg.value(REGS, _read, 0x5000) == 42  # bias + the symbol's vaddr + 8


@pytest.mark.parametrize("text", ["3@%rax", "8@%xmm0", "8@(%rax", "x@%rax", "8@sym(%rax)"])
def test_operand_errors(text: str) -> None:
    with pytest.raises(SymbolError):
        parse_arg(text)
