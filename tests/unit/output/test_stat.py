"""Golden tests of the stat printer against lines perf 6.1 printed on real uprobe events (see stat.py)."""

from __future__ import annotations

import io
import json

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
    write,
)

EN_US = NumberFormat(thousands_sep=",", decimal_point=".", grouping=(3, 3, 0))
DE_DE = NumberFormat(thousands_sep=".", decimal_point=",", grouping=(3, 3, 0))
FR_FR = NumberFormat(thousands_sep="\u202f", decimal_point=",", grouping=(3, 0))


def pad(text: str, width: int) -> str:
    """A perf line: `text` followed by the trailing blanks perf printed, `width` characters in all."""
    assert len(text) <= width
    return text + " " * (width - len(text))


def full(value: int, ns: int = 1_000_000) -> Counts:
    """A count that ran the whole time it was enabled."""
    return Counts(value=value, time_enabled=ns, time_running=ns)


def report(lines: list[StatLine], **kw: object) -> StatReport:
    defaults: dict[str, object] = {
        "command": ["./prog", "1000"],
        "lines": lines,
        "elapsed_s": 0.031216118,
        "user_s": 0.0,
        "sys_s": 0.041169,
    }
    defaults.update(kw)
    return StatReport(**defaults)  # type: ignore[arg-type]


LONG = "probe_prog:averyveryverylongprobename_abcdefghijk"

# -- text -----------------------------------------------------------------------------------------------


def test_text_command_layout() -> None:
    # perf stat -e probe_prog:averyveryverylongprobename_abcdefghijk,probe_prog:ab,probe_prog:work ./prog 1000
    rep = report(
        [
            StatLine(LONG, full(4000)),
            StatLine("probe_prog:ab", full(0)),
            StatLine("probe_prog:work", full(4000)),
        ],
        elapsed_s=0.033573835,
        user_s=0.0,
        sys_s=0.040882,
    )
    expected = (
        "\n"
        " Performance counter stats for './prog 1000':\n"
        "\n"
        + pad("              4000      " + LONG, 108)
        + "\n"
        + pad("                 0      probe_prog:ab", 91)
        + "\n"
        + pad("              4000      probe_prog:work", 91)
        + "\n"
        "\n"
        "       0.033573835 seconds time elapsed\n"
        "\n"
        "       0.000000000 seconds user\n"
        "       0.040882000 seconds sys\n"
        "\n"
        "\n"
    )
    assert format_text(rep, C_NUMBERS) == expected


def test_text_not_counted_uses_perf_narrower_name_column() -> None:
    # perf stat -D 2000 -e ...: the program exits before the events are enabled.
    rep = report([StatLine(LONG, None), StatLine("probe_prog:ab", None)], elapsed_s=0.000003385, sys_s=0.0)
    lines = format_text(rep, C_NUMBERS).split("\n")
    assert lines[3] == pad("     <not counted>      " + LONG, 108)
    assert lines[4] == pad("     <not counted>      probe_prog:ab", 84)


def test_text_counts_that_never_ran_are_not_counted() -> None:
    enabled_never_ran = Counts(value=5, time_enabled=1000, time_running=0)
    never_enabled = Counts(value=0, time_enabled=0, time_running=0)
    rep = report([StatLine("minor-faults", enabled_never_ran), StatLine("probe_prog:ab", never_enabled)])
    lines = format_text(rep, C_NUMBERS).split("\n")
    assert lines[3] == pad("     <not counted>      minor-faults", 84) + "  (0.00%)"
    assert lines[4] == pad("     <not counted>      probe_prog:ab", 84)


def test_text_multiplexed_is_scaled_and_shows_percent_running() -> None:
    # perf stat report of a run where page-faults had val=1000 ena=3000 run=2000, minor-faults 12345/1000/999
    rep = report(
        [
            StatLine("page-faults", Counts(value=1000, time_enabled=3000, time_running=2000)),
            StatLine("minor-faults", Counts(value=12345, time_enabled=1000, time_running=999)),
        ]
    )
    lines = format_text(rep, C_NUMBERS).split("\n")
    assert lines[3] == pad("              1500      page-faults", 91) + "  (66.67%)"
    assert lines[4] == pad("             12357      minor-faults", 91) + "  (99.90%)"


def test_scaling_truncates_like_perf() -> None:
    # (u64)((double)1001 * 3 / 2) == 1501, not 1502.
    rep = report([StatLine("e", Counts(value=1001, time_enabled=3, time_running=2))])
    assert format_csv(rep, ",") == "1501,,e,2,66.00,,\n"
    assert format_text(rep, C_NUMBERS).split("\n")[3].startswith("              1501      e ")


def test_text_attached_process_has_no_rusage_lines() -> None:
    # perf stat -e p2:w -p 4632
    rep = report([StatLine("p2:w", full(8000))], target="process id '4632'", elapsed_s=2.002265439)
    expected = (
        "\n"
        " Performance counter stats for process id '4632':\n"
        "\n" + pad("              8000      p2:w", 91) + "\n"
        "\n"
        "       2.002265439 seconds time elapsed\n"
        "\n"
    )
    assert format_text(rep, C_NUMBERS) == expected


def test_text_per_thread_sorted_by_count() -> None:
    # perf stat --per-thread -e p3:w3 -e probe_prog:avery... -p 5245 (a 4-thread process)
    rep = report(
        [
            StatLine("p3:w3", full(5000), thread="prog3-5245"),
            StatLine(LONG, full(0), thread="prog3-5245"),
            StatLine("p3:w3", full(9000), thread="prog3-5247"),
            StatLine(LONG, full(0), thread="prog3-5247"),
            StatLine("p3:w3", full(0), thread="prog3-5248"),
            StatLine(LONG, full(0), thread="prog3-5248"),
            StatLine("p3:w3", full(20000), thread="prog3-5249"),
            StatLine(LONG, full(0), thread="prog3-5249"),
        ],
        target="process id '5245'",
        per_thread=True,
        elapsed_s=3.003456099,
    )
    expected = (
        "\n"
        " Performance counter stats for process id '5245':\n"
        "\n"
        + pad("           prog3-5249                  20000      p3:w3", 117)
        + "\n"
        + pad("           prog3-5247                   9000      p3:w3", 117)
        + "\n"
        + pad("           prog3-5245                   5000      p3:w3", 117)
        + "\n"
        + pad("           prog3-5248                      0      p3:w3", 117)
        + "\n"
        + pad("           prog3-5245                      0      " + LONG, 134)
        + "\n"
        + pad("           prog3-5247                      0      " + LONG, 134)
        + "\n"
        + pad("           prog3-5248                      0      " + LONG, 134)
        + "\n"
        + pad("           prog3-5249                      0      " + LONG, 134)
        + "\n"
        + "\n"
        "       3.003456099 seconds time elapsed\n"
        "\n"
    )
    assert format_text(rep, C_NUMBERS) == expected


def test_text_per_thread_not_counted_and_odd_comms() -> None:
    rep = report(
        [StatLine("e", None, thread="a-b-c-12"), StatLine("e", full(1), thread="nodash")],
        per_thread=True,
        target="thread id '12'",
    )
    lines = format_text(rep, C_NUMBERS).split("\n")
    assert lines[3] == pad("          nodash-         " + "                 1      e", 117)
    assert lines[4] == pad("           a-b-c-12       " + "     <not counted>      e", 110)


def test_per_thread_line_without_thread_is_an_error() -> None:
    with pytest.raises(ValueError, match="without a thread"):
        format_text(report([StatLine("e", full(1))], per_thread=True), C_NUMBERS)


def test_text_thousands_separators_follow_the_locale() -> None:
    # LC_ALL=en_US.UTF-8 / de_DE.UTF-8 / fr_FR.UTF-8 perf stat report, counts 1234567890 and 12357 (99.90%)
    rep = report(
        [
            StatLine("page-faults", full(1234567890)),
            StatLine("minor-faults", Counts(value=12345, time_enabled=1000, time_running=999)),
        ],
        target="x",
        elapsed_s=0.001218327,
    )
    en = format_text(rep, EN_US).split("\n")
    assert en[3] == pad("     1,234,567,890      page-faults", 91)
    assert en[4] == pad("            12,357      minor-faults", 91) + "  (99.90%)"
    de = format_text(rep, DE_DE).split("\n")
    assert de[3] == pad("     1.234.567.890      page-faults", 91)
    assert de[4] == pad("            12.357      minor-faults", 91) + "  (99,90%)"
    assert de[6] == "       0,001218327 seconds time elapsed"
    # glibc pads by characters, so a multi-byte separator keeps the column at 18 characters.
    fr = format_text(rep, FR_FR).split("\n")
    assert fr[3] == pad("     1\u202f234\u202f567\u202f890      page-faults", 91)
    assert fr[4] == pad("            12\u202f357      minor-faults", 91) + "  (99,90%)"


@pytest.mark.parametrize(
    ("grouping", "expected"),
    [
        ((3, 3, 0), "1,234,567,890"),
        ((3, 0), "1,234,567,890"),
        ((3, 2, 0), "1,23,45,67,890"),
        ((3, 127), "1234567,890"),
        ((3,), "1234567,890"),
        ((), "1234567890"),
    ],
)
def test_grouping_rules(grouping: tuple[int, ...], expected: str) -> None:
    numbers = NumberFormat(thousands_sep=",", grouping=grouping)
    assert numbers.count(1234567890.0) == expected
    assert numbers.count(999.0) == "999"
    assert numbers.count(0.0) == "0"


def test_from_locale_reads_the_process_locale() -> None:
    # Python leaves LC_NUMERIC at "C" unless someone calls setlocale: no grouping, "." decimal point.
    numbers = NumberFormat.from_locale()
    assert numbers.count(1234567.0).replace(numbers.thousands_sep, "") == "1234567"
    assert numbers.decimal_point in {".", ","}


# -- CSV ------------------------------------------------------------------------------------------------


def test_csv_fields() -> None:
    # perf stat -x, -e probe_prog:work -e probe_prog:other ./prog
    rep = report(
        [
            StatLine("probe_prog:work", full(1237567, 12052051220)),
            StatLine("probe_prog:other", full(0, 12052051220)),
        ]
    )
    assert format_csv(rep, ",") == (
        "1237567,,probe_prog:work,12052051220,100.00,,\n0,,probe_prog:other,12052051220,100.00,,\n"
    )
    assert format_csv(rep, ";").splitlines()[0] == "1237567;;probe_prog:work;12052051220;100.00;;"
    assert format_csv(rep, "\t").splitlines()[1] == "0\t\tprobe_prog:other\t12052051220\t100.00\t\t"


def test_csv_never_groups_digits() -> None:
    rep = report([StatLine("e", full(1234567890, 3000))])
    assert format_csv(rep, ",") == "1234567890,,e,3000,100.00,,\n"


def test_csv_not_counted_and_multiplexed() -> None:
    # perf stat -x, -D 2000 ...; and perf stat -x, report of patched val/ena/run
    rep = report(
        [
            StatLine("probe_prog:work", None),
            StatLine("page-faults", Counts(value=1000, time_enabled=3000, time_running=2000)),
            StatLine("minor-faults", Counts(value=5, time_enabled=1000, time_running=0)),
            StatLine("x", Counts(value=12345, time_enabled=1000, time_running=999)),
        ]
    )
    assert format_csv(rep, ",").splitlines() == [
        "<not counted>,,probe_prog:work,0,100.00,,",
        "1500,,page-faults,2000,66.00,,",
        "<not counted>,,minor-faults,0,0.00,,",
        "12357,,x,999,99.00,,",
    ]


def test_csv_per_thread() -> None:
    # perf stat -x, --per-thread -e p2:w -p 4601; perf stat -x';' --per-thread -t 2431 (never enabled)
    rep = report(
        [
            StatLine("p2:w", full(3000, 30106112), thread="prog2-4603"),
            StatLine("p2:w", full(5000, 49599050), thread="prog2-4601"),
        ],
        per_thread=True,
    )
    assert format_csv(rep, ",") == (
        "prog2-4601,5000,,p2:w,49599050,100.00,,\nprog2-4603,3000,,p2:w,30106112,100.00,,\n"
    )
    nc = report([StatLine("probe_prog:work", None, thread="bash-2431")], per_thread=True)
    assert format_csv(nc, ";") == "bash-2431;<not counted>;;probe_prog:work;0;100.00;;\n"


def test_csv_has_seven_fields_per_line_plus_thread() -> None:
    rep = report([StatLine("e", full(1)), StatLine("f", None)])
    assert all(len(line.split(",")) == 7 for line in format_csv(rep, ",").splitlines())
    rep_t = report([StatLine("e", full(1), thread="c-1")], per_thread=True)
    assert len(format_csv(rep_t, ",").rstrip("\n").split(",")) == 8


# -- JSON -----------------------------------------------------------------------------------------------


def test_json_lines() -> None:
    # perf stat -j -e probe_prog:work -e probe_prog:other ./prog
    rep = report(
        [
            StatLine("probe_prog:work", full(1237567, 12113952426)),
            StatLine("probe_prog:other", full(0, 12113952426)),
        ]
    )
    assert format_json(rep).splitlines() == [
        '{"counter-value" : "1237567.000000", "unit" : "", "event" : "probe_prog:work", '
        '"event-runtime" : 12113952426, "pcnt-running" : 100.00, "metric-value" : 0.000000, '
        '"metric-unit" : "(null)"}',
        '{"counter-value" : "0.000000", "unit" : "", "event" : "probe_prog:other", '
        '"event-runtime" : 12113952426, "pcnt-running" : 100.00, "metric-value" : 0.000000, '
        '"metric-unit" : "(null)"}',
    ]


def test_json_not_counted_and_multiplexed() -> None:
    rep = report(
        [
            StatLine("probe_prog:work", None),
            StatLine("page-faults", Counts(value=1000, time_enabled=3000, time_running=2000)),
            StatLine("minor-faults", Counts(value=5, time_enabled=1000, time_running=0)),
        ]
    )
    assert format_json(rep).splitlines() == [
        '{"counter-value" : "<not counted>", "unit" : "", "event" : "probe_prog:work", '
        '"event-runtime" : 0, "pcnt-running" : 100.00, "metric-value" : 0.000000, "metric-unit" : ""}',
        '{"counter-value" : "1500.000000", "unit" : "", "event" : "page-faults", '
        '"event-runtime" : 2000, "pcnt-running" : 66.00, "metric-value" : 0.000000, '
        '"metric-unit" : "(null)"}',
        '{"counter-value" : "<not counted>", "unit" : "", "event" : "minor-faults", '
        '"event-runtime" : 0, "pcnt-running" : 0.00, "metric-value" : 0.000000, "metric-unit" : ""}',
    ]


def test_json_per_thread_and_parseable() -> None:
    # perf stat -j --per-thread -e p2:w -p 4621
    rep = report(
        [
            StatLine("p2:w", full(3000, 30762692), thread="prog2-4623"),
            StatLine("p2:w", full(5000, 49569547), thread="prog2-4621"),
            StatLine('we"ird', None, thread="prog2-4621"),
        ],
        per_thread=True,
    )
    lines = format_json(rep).splitlines()
    assert lines[0] == (
        '{"thread" : "prog2-4621", "counter-value" : "5000.000000", "unit" : "", "event" : "p2:w", '
        '"event-runtime" : 49569547, "pcnt-running" : 100.00, "metric-value" : 0.000000, '
        '"metric-unit" : "(null)"}'
    )
    objs = [json.loads(line) for line in lines]
    keys = ["thread", "counter-value", "unit", "event", "event-runtime", "pcnt-running", "metric-value"]
    assert [list(o) for o in objs] == [[*keys, "metric-unit"]] * 3
    assert objs[1]["thread"] == "prog2-4623"
    assert objs[2]["event"] == 'we"ird'


# -- write ----------------------------------------------------------------------------------------------


def test_write_dispatches_on_options() -> None:
    rep = report([StatLine("e", full(1234))])
    for kwargs, expected in [
        ({"csv_sep": ","}, format_csv(rep, ",")),
        ({"json": True}, format_json(rep)),
        ({"numbers": EN_US}, format_text(rep, EN_US)),
    ]:
        out = io.StringIO()
        write(rep, out, **kwargs)  # type: ignore[arg-type]
        assert out.getvalue() == expected
    assert "1,234" in format_text(rep, EN_US)


def test_write_rejects_csv_with_json() -> None:
    with pytest.raises(ValueError, match="mutually exclusive"):
        write(report([]), io.StringIO(), csv_sep=",", json=True)


# ---- kernel counters: lines perf 6.1 printed on this machine (`perf stat -- ls /`, `-a -A`, -x, -j) ----

from pmu.output.stat import shadow_metrics  # noqa: E402


def _default_set(
    elapsed_s: float, task_clock_ns: int, cs: int, migrations: int, faults: int
) -> list[StatLine]:
    run = task_clock_ns
    lines = [
        StatLine("task-clock", Counts(task_clock_ns, run, run), unit="msec"),
        StatLine("context-switches", Counts(cs, run, run)),
        StatLine("cpu-migrations", Counts(migrations, run, run)),
        StatLine("page-faults", Counts(faults, run, run)),
    ]
    lines += [
        StatLine(n, None, supported=False) for n in ("cycles", "instructions", "branches", "branch-misses")
    ]
    return shadow_metrics(lines, elapsed_s)


def test_text_default_set_as_perf_prints_it() -> None:
    # perf stat -- ls /  (1.40 msec, elapsed 0.000006599 s: perf's own odd elapsed time gave 211.522)
    lines = _default_set(0.0066189, 1_400_000, 0, 0, 102)
    text = format_text(report(lines, elapsed_s=0.0066189), EN_US).splitlines()
    assert text[3] == pad(
        "              1.40 msec task-clock                       #    0.212 CPUs utilized", 91
    )
    assert text[4] == pad("                 0      context-switches                 #    0.000 /sec", 91)
    assert text[6] == pad("               102      page-faults                      #   72.857 K/sec", 91)
    assert text[7] == pad("   <not supported>      cycles", 84)
    assert text[10] == pad("   <not supported>      branch-misses", 84)


def test_csv_default_set_as_perf_prints_it() -> None:
    lines = _default_set(0.002, 1_412_465, 0, 0, 101)
    assert format_csv(report(lines), ",").splitlines() == [
        "1.41,msec,task-clock,1412465,100.00,0.706,CPUs utilized",
        "0,,context-switches,1412465,100.00,0.000,/sec",
        "0,,cpu-migrations,1412465,100.00,0.000,/sec",
        "101,,page-faults,1412465,100.00,71.506,K/sec",
        "<not supported>,,cycles,0,100.00,,",
        "<not supported>,,instructions,0,100.00,,",
        "<not supported>,,branches,0,100.00,,",
        "<not supported>,,branch-misses,0,100.00,,",
    ]


def test_json_default_set_as_perf_prints_it() -> None:
    lines = _default_set(0.0041914305, 1_161_602, 25, 0, 50)
    out = format_json(report(lines)).splitlines()
    assert out[0] == (
        '{"counter-value" : "1.161602", "unit" : "msec", "event" : "task-clock", "event-runtime" : 1161602,'
        ' "pcnt-running" : 100.00, "metric-value" : 0.277137, "metric-unit" : "CPUs utilized"}'
    )
    assert out[1] == (
        '{"counter-value" : "25.000000", "unit" : "", "event" : "context-switches",'
        ' "event-runtime" : 1161602, "pcnt-running" : 100.00, "metric-value" : 21.522002,'
        ' "metric-unit" : "K/sec"}'
    )
    assert out[4] == (
        '{"counter-value" : "<not supported>", "unit" : "", "event" : "cycles", "event-runtime" : 0,'
        ' "pcnt-running" : 100.00, "metric-value" : 0.000000, "metric-unit" : ""}'
    )


def test_per_cpu_lines_as_perf_stat_a_A() -> None:
    # perf stat -a -A -e task-clock,page-faults -- sleep 0.1
    elapsed = 0.104209474
    lines = shadow_metrics(
        [
            StatLine("task-clock", full(104_270_000, 104_270_000), unit="msec", cpu=0),
            StatLine("task-clock", full(104_260_000, 104_260_000), unit="msec", cpu=1),
            StatLine("page-faults", full(5, 104_270_000), cpu=0),
            StatLine("page-faults", full(77, 104_260_000), cpu=1),
        ],
        elapsed,
    )
    text = format_text(report(lines, elapsed_s=elapsed, system_wide=True), EN_US)
    rows = text.splitlines()
    assert rows[1] == " Performance counter stats for 'system wide':"
    assert rows[3] == pad(
        "CPU0                   104.27 msec task-clock                       #    1.001 CPUs utilized", 102
    )
    assert rows[5] == pad(
        "CPU0                        5      page-faults                      #   47.952 /sec", 102
    )
    assert rows[6] == pad(
        "CPU1                       77      page-faults                      #  738.538 /sec", 102
    )
    assert "seconds user" not in text  # perf -a prints no rusage
    csv = format_csv(report(lines, system_wide=True), ",").splitlines()
    assert csv[0].startswith("CPU0,104.27,msec,task-clock,104270000,100.00,1.001,CPUs utilized")
    assert csv[3].startswith("CPU1,77,,page-faults,")
    first = json.loads(format_json(report(lines, system_wide=True)).splitlines()[0])
    assert first["cpu"] == "0" and first["metric-unit"] == "CPUs utilized"


def test_rate_units_follow_perfs_convert_unit_double() -> None:
    ns = 1_000_000_000  # one second of task-clock
    values = {"a": 999, "b": 1_001, "c": 2_000_000, "d": 3_000_000_000}
    lines = [StatLine("task-clock", full(ns, ns), unit="msec")]
    lines += [StatLine(name, full(v, ns)) for name, v in values.items()]
    metrics = [line.metric for line in shadow_metrics(lines, 1.0)[1:]]
    assert metrics == [(999.0, "/sec"), (1.001, "K/sec"), (2.0, "M/sec"), (3.0, "G/sec")]


def test_no_rate_without_a_clock_event() -> None:
    lines = shadow_metrics([StatLine("uprobe:./prog:work", full(1000))], 1.0)
    assert lines[0].metric is None
    assert format_csv(report(lines), ",") == "1000,,uprobe:./prog:work,1000000,100.00,,\n"


def test_multiplexed_counter_with_a_rate_keeps_its_percent() -> None:
    lines = shadow_metrics(
        [
            StatLine("task-clock", full(2_000_000, 2_000_000), unit="msec"),
            StatLine("uprobe:./prog:work", Counts(value=500, time_enabled=2_000_000, time_running=1_000_000)),
        ],
        0.004,
    )
    text = format_text(report(lines), EN_US).splitlines()[4]
    # scaled to 1,000 hits over the 2 ms of task-clock: 500 K/sec; then perf's running column
    assert (
        text
        == pad("             1,000      uprobe:./prog:work               #  500.000 K/sec", 91) + "  (50.00%)"
    )
