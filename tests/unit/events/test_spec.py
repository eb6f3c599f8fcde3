"""The -e grammar: which ProbeSpec each event string gives, and the one-line error for each malformed one."""

from __future__ import annotations

import pytest

from pmu.errors import EventSpecError
from pmu.events.spec import ProbeKind, ProbeSpec, parse_event, parse_event_list

U, R = ProbeKind.UPROBE, ProbeKind.URETPROBE


@pytest.mark.parametrize(
    ("text", "kind", "target", "symbol", "offset", "address"),
    [
        ("work", U, None, "work", 0, None),
        ("uprobe:work", U, None, "work", 0, None),
        ("uretprobe:work", R, None, "work", 0, None),
        ("libc:malloc", U, "libc", "malloc", 0, None),
        ("uprobe:libc:malloc", U, "libc", "malloc", 0, None),
        ("uretprobe:libc:malloc", R, "libc", "malloc", 0, None),
        ("uprobe:/tmp/hot:work", U, "/tmp/hot", "work", 0, None),
        ("./hot:work", U, "./hot", "work", 0, None),
        ("uprobe:libz.so.1:inflate", U, "libz.so.1", "inflate", 0, None),
        ("libsqlite3:sqlite3_step", U, "libsqlite3", "sqlite3_step", 0, None),
        ("work+4", U, None, "work", 4, None),
        ("work+0x10", U, None, "work", 16, None),
        ("work+0X1f", U, None, "work", 31, None),
        ("work+010", U, None, "work", 10, None),
        ("uprobe:/tmp/hot:work+0", U, "/tmp/hot", "work", 0, None),
        ("uretprobe:work+0", R, None, "work", 0, None),
        ("0x1139", U, None, None, 0, 0x1139),
        ("uprobe:0x401136", U, None, None, 0, 0x401136),
        ("uretprobe:/tmp/hot:0xABCdef", R, "/tmp/hot", None, 0, 0xABCDEF),
        ("_ZN3foo3barEv", U, None, "_ZN3foo3barEv", 0, None),
        ("_ZN3foo3barEv+0x8", U, None, "_ZN3foo3barEv", 8, None),
        ("libc:memcpy@GLIBC_2.2.5", U, "libc", "memcpy@GLIBC_2.2.5", 0, None),
        ("sym.part.0$x", U, None, "sym.part.0$x", 0, None),
        ("  work  ", U, None, "work", 0, None),
    ],
)
def test_parse_event(
    text: str, kind: ProbeKind, target: str | None, symbol: str | None, offset: int, address: int | None
) -> None:
    spec = parse_event(text)
    assert spec == ProbeSpec(
        kind=kind, target=target, symbol=symbol, offset=offset, address=address, text=text.strip()
    )
    assert spec.name == text.strip()


@pytest.mark.parametrize("word", ["kprobe", "kretprobe", "tracepoint", "sdt", "software", "hardware",
                                  "profile", "interval", "watchpoint", "k", "kr", "t", "p", "h", "s", "i",
                                  "w", "u", "ur"])  # fmt: skip
def test_foreign_event_types_are_named(word: str) -> None:
    text = f"{word}:foo"
    with pytest.raises(EventSpecError) as err:
        parse_event(text)
    expected = f"unknown event type '{word}' in '{text}' (pmu supports uprobe, uretprobe, usdt and counters)"
    assert str(err.value) == expected


def test_kprobe_message_exactly() -> None:
    with pytest.raises(EventSpecError) as err:
        parse_event("kprobe:foo")
    expected = (
        "unknown event type 'kprobe' in 'kprobe:foo' (pmu supports uprobe, uretprobe, usdt and counters)"
    )
    assert str(err.value) == expected


def test_three_parts_with_an_unknown_first_word_is_an_unknown_type() -> None:
    with pytest.raises(EventSpecError, match=r"^unknown event type 'tracepoint' in 'tracepoint:sched:x'"):
        parse_event("tracepoint:sched:x")
    with pytest.raises(EventSpecError, match=r"^unknown event type 'probe' in 'probe:libc:malloc'"):
        parse_event("probe:libc:malloc")


def test_single_letter_function_names_are_symbols() -> None:
    """Only `X:...` is a type position: a function called `p` in the command is fine."""
    assert parse_event("p").symbol == "p"
    assert parse_event("uprobe:t").symbol == "t"


FORM = "expected [uprobe:|uretprobe:][TARGET:]LOCATION, LOCATION being SYMBOL[+OFFSET] or 0xADDR"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", f"empty event '' ({FORM})"),
        ("   ", f"empty event '' ({FORM})"),
        ("uprobe:", "empty symbol in event 'uprobe:'"),
        ("libc:", "empty symbol in event 'libc:'"),
        ("uprobe:libc:", "empty symbol in event 'uprobe:libc:'"),
        ("+5", "empty symbol in event '+5'"),
        ("uprobe:+5", "empty symbol in event 'uprobe:+5'"),
        ("work+", "missing offset after 'work+' in event 'work+'"),
        ("work+xyz", "bad offset 'xyz' in event 'work+xyz' (write decimal or 0x hex)"),
        ("work+0x", "bad offset '0x' in event 'work+0x' (write decimal or 0x hex)"),
        ("work+0xg1", "bad offset '0xg1' in event 'work+0xg1' (write decimal or 0x hex)"),
        ("work+1_0", "bad offset '1_0' in event 'work+1_0' (write decimal or 0x hex)"),
        ("work++4", "bad offset '+4' in event 'work++4' (write decimal or 0x hex)"),
        ("work+-4", "negative offset '-4' in event 'work+-4'"),
        ("work-4", "negative offset '-4' in event 'work-4'"),
        ("0xzz", "bad address '0xzz' in event '0xzz' (write 0x and hex digits)"),
        ("0x", "bad address '0x' in event '0x' (write 0x and hex digits)"),
        ("uprobe:0x10+4", "bad address '0x10+4' in event 'uprobe:0x10+4' (write 0x and hex digits)"),
        ("1234", "bad location '1234' in event '1234' (an address is written 0xADDR)"),
        ("a:b:c:d", f"too many ':' in event 'a:b:c:d' ({FORM})"),
        ("uprobe:libc:malloc:x", f"too many ':' in event 'uprobe:libc:malloc:x' ({FORM})"),
        ("/opt/a:b:c", f"too many ':' in event '/opt/a:b:c' ({FORM})"),
        ("uprobe::work", "empty target in event 'uprobe::work'"),
        (":work", "empty target in event ':work'"),
        ("uprobe", f"missing location after 'uprobe' in event 'uprobe' ({FORM})"),
        ("wo rk", "invalid character ' ' in symbol 'wo rk' in event 'wo rk'"),
        ("libc:mal/loc", "invalid character '/' in symbol 'mal/loc' in event 'libc:mal/loc'"),
        (
            "uretprobe:work+4",
            "uretprobe on work+0x4 in event 'uretprobe:work+4' (a uretprobe must be on a function entry)",
        ),
        ("a,b", "unexpected ',' in event 'a,b' (a comma separates events in an -e list)"),
    ],
)
def test_malformed_events(text: str, message: str) -> None:
    with pytest.raises(EventSpecError) as err:
        parse_event(text)
    assert str(err.value) == message
    assert "\n" not in str(err.value)
    assert err.value.exit_status == 2


def test_event_list_splits_on_commas_in_order() -> None:
    specs = parse_event_list(["uprobe:work,uretprobe:work", "libc:malloc", " libc:free , 0x1139 "])
    assert [s.text for s in specs] == ["uprobe:work", "uretprobe:work", "libc:malloc", "libc:free", "0x1139"]
    assert [s.kind for s in specs] == [U, R, U, U, U]
    assert specs[3] == parse_event("libc:free")


def test_event_list_empty() -> None:
    assert parse_event_list([]) == []


@pytest.mark.parametrize("value", ["a,", ",a", "a,,b", ","])
def test_event_list_rejects_empty_events(value: str) -> None:
    with pytest.raises(EventSpecError) as err:
        parse_event_list([value])
    assert str(err.value) == f"empty event in '{value}' (a comma separates events)"


def test_event_list_reports_the_bad_event() -> None:
    with pytest.raises(EventSpecError, match=r"^unknown event type 'kprobe' in 'kprobe:do_sys_open'"):
        parse_event_list(["uprobe:work,kprobe:do_sys_open"])
