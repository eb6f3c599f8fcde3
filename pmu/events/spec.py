"""The `-e` event-string grammar: pure parsing of `[uprobe:]TARGET:LOCATION` into ProbeSpec values.

No file system access here; symbols.py resolves a ProbeSpec against ELF files.

Grammar (one event; a comma separates events in one -e value):

    EVENT    := [TYPE ':'] [TARGET ':'] LOCATION
    TYPE     := 'uprobe' | 'uretprobe'
    TARGET   := a path to an ELF file (contains '/') | a library short name (libc, libz.so.1)
    LOCATION := SYMBOL ['+' OFFSET] | '0x' HEXADDR
    OFFSET   := decimal | '0x' hex
    USDT     := 'usdt:' [TARGET ':' [PROVIDER ':']] NAME      (bpftrace's spelling)

Without a TARGET the event names the launched command's own executable (target None). With two parts,
`uprobe:work` and `uretprobe:work` are TYPE:LOCATION; anything else is TARGET:LOCATION (kind uprobe).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from pmu.errors import EventSpecError
from pmu.events.counters import CounterSpec, counter


class ProbeKind(Enum):
    """Which side of a function a probe fires on."""

    UPROBE = "uprobe"
    """Function entry (or any instruction): fires when the instruction is about to run."""
    URETPROBE = "uretprobe"
    """Function return: fires when the probed function returns to its caller."""
    USDT = "usdt"
    """A statically defined probe (`.note.stapsdt`): fires at its sites, the program's own `nop`s."""


@dataclass(frozen=True)
class ProbeSpec:
    """One parsed event string, before any file is looked at."""

    kind: ProbeKind
    """uprobe or uretprobe."""
    target: str | None
    """ELF path (contains '/') or library short name (libc, libz.so.1); None = the command's executable."""
    symbol: str | None
    """Symbol name, or None when the location is an absolute ELF virtual address."""
    offset: int
    """Byte offset from the symbol's start (0 when absent); unused for an address."""
    address: int | None
    """ELF virtual address for `0xADDR` locations, else None."""
    text: str
    """The event as the user wrote it (used as the event's name in output)."""
    provider: str | None = None
    """A USDT probe's provider, where the event names it (`usdt:TARGET:PROVIDER:NAME`)."""

    @property
    def name(self) -> str:
        return self.text


_KINDS = {kind.value: kind for kind in ProbeKind}

# Event types of perf and bpftrace that pmu does not serve: named in a clear error rather than taken
# for a library called "kprobe". Single letters are bpftrace's aliases (k, kr, t, u, ur, ...).
_FOREIGN_TYPES = frozenset(
    {
        "kprobe", "kretprobe", "tracepoint", "rawtracepoint", "sdt", "software", "hardware",
        "profile", "interval", "watchpoint", "asyncwatchpoint", "kfunc", "kretfunc", "fentry", "fexit",
        "iter", "rt", "BEGIN", "END", "k", "kr", "t", "u", "ur", "U", "p", "h", "s", "i", "w", "aw", "f",
        "fr", "it", "r",
    }
)  # fmt: skip

_SYMBOL_RE = re.compile(r"[A-Za-z_.$@][A-Za-z0-9_.$@]*")
_NUMBER_RE = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]+")
_HEX_RE = re.compile(r"0[xX][0-9a-fA-F]+")
_FORM = "expected [uprobe:|uretprobe:][TARGET:]LOCATION, LOCATION being SYMBOL[+OFFSET] or 0xADDR"


def _error(text: str, problem: str, hint: str = "") -> EventSpecError:
    return EventSpecError(f"{problem} in event '{text}'" + (f" ({hint})" if hint else ""))


def _unknown_type(text: str, word: str) -> EventSpecError:
    return EventSpecError(
        f"unknown event type '{word}' in '{text}' (pmu supports uprobe, uretprobe, usdt and counters)"
    )


def _parse_number(text: str, digits: str, what: str) -> int:
    if not _NUMBER_RE.fullmatch(digits):
        raise _error(text, f"bad {what} '{digits}'", "write decimal or 0x hex")
    return int(digits, 16) if digits[:2].lower() == "0x" else int(digits, 10)


def _parse_location(text: str, location: str) -> tuple[str | None, int, int | None]:
    """Return (symbol, offset, address) for LOCATION."""
    if not location:
        raise _error(text, "empty symbol")
    if location[:2].lower() == "0x":
        if not _HEX_RE.fullmatch(location):
            raise _error(text, f"bad address '{location}'", "write 0x and hex digits")
        return None, 0, int(location, 16)
    if location[0].isdigit():
        raise _error(text, f"bad location '{location}'", "an address is written 0xADDR")
    symbol, plus, offset_text = location.partition("+")
    if not symbol:
        raise _error(text, "empty symbol")
    if not plus and "-" in symbol:
        name, _, rest = symbol.partition("-")
        if _SYMBOL_RE.fullmatch(name) and _NUMBER_RE.fullmatch(rest):
            raise _error(text, f"negative offset '-{rest}'")
    if not _SYMBOL_RE.fullmatch(symbol):
        bad = next(ch for ch in symbol if not re.fullmatch(r"[A-Za-z0-9_.$@]", ch))
        raise _error(text, f"invalid character {bad!r} in symbol '{symbol}'")
    if not plus:
        return symbol, 0, None
    if not offset_text:
        raise _error(text, f"missing offset after '{symbol}+'")
    if offset_text.startswith("-"):
        raise _error(text, f"negative offset '{offset_text}'")
    return symbol, _parse_number(text, offset_text, "offset"), None


def parse_event(text: str) -> ProbeSpec:
    """Parse one event string; raise EventSpecError (one line, naming the problem) when malformed."""
    text = text.strip()
    if not text:
        raise EventSpecError(f"empty event '' ({_FORM})")
    if "," in text:
        raise _error(text, "unexpected ','", "a comma separates events in an -e list")
    parts = text.split(":")
    if parts[0] == "usdt":
        return _parse_usdt(text, parts[1:])
    kind = ProbeKind.UPROBE
    target: str | None = None
    if len(parts) > 3:
        raise _error(text, "too many ':'", _FORM)
    if len(parts) == 3:
        word = parts[0]
        if word not in _KINDS:
            if "/" in word or "." in word or not word:
                raise _error(text, "too many ':'", _FORM)
            raise _unknown_type(text, word)
        kind, target, location = _KINDS[word], parts[1], parts[2]
        if not target:
            raise _error(text, "empty target")
    elif len(parts) == 2:
        first, location = parts
        if first in _KINDS:
            kind = _KINDS[first]
        elif first in _FOREIGN_TYPES:
            raise _unknown_type(text, first)
        elif not first:
            raise _error(text, "empty target")
        else:
            target = first
    else:
        location = parts[0]
        if location in _KINDS:
            raise _error(text, f"missing location after '{location}'", _FORM)
    symbol, offset, address = _parse_location(text, location)
    if kind is ProbeKind.URETPROBE and symbol is not None and offset != 0:
        raise _error(text, f"uretprobe on {symbol}+{offset:#x}", "a uretprobe must be on a function entry")
    return ProbeSpec(kind=kind, target=target, symbol=symbol, offset=offset, address=address, text=text)


_USDT_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USDT_FORM = "expected usdt:[TARGET:[PROVIDER:]]NAME"


def _parse_usdt(text: str, parts: list[str]) -> ProbeSpec:
    if not parts or len(parts) > 3:
        raise _error(text, "bad USDT event", _USDT_FORM)
    target = parts[0] if len(parts) >= 2 else None
    provider = parts[1] if len(parts) == 3 else None
    name = parts[-1]
    if target == "":
        raise _error(text, "empty target")
    for word, what in ((provider, "provider"), (name, "probe name")):
        if word is not None and not _USDT_NAME_RE.fullmatch(word):
            raise _error(text, f"bad USDT {what} '{word}'", _USDT_FORM)
    return ProbeSpec(
        kind=ProbeKind.USDT, target=target, symbol=name, offset=0, address=None, text=text, provider=provider
    )


EventSpec = ProbeSpec | CounterSpec
"""What one event string names: a probe, or one of the kernel's generic counters."""


def parse_event_list(texts: list[str]) -> list[EventSpec]:
    """Parse every -e value; each may hold a comma-separated list of events.

    perf's counter names (`task-clock`, `cs`, `cycles`, see counters.py) name counters, as in perf; a
    symbol of that name is written `uprobe:NAME`.
    """
    specs: list[EventSpec] = []
    for value in texts:
        pieces = value.split(",")
        for piece in pieces:
            if not piece.strip():
                raise EventSpecError(f"empty event in '{value.strip()}' (a comma separates events)")
            found = counter(piece)
            specs.append(found if found is not None else parse_event(piece))
    return specs
