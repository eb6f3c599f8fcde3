"""pmu.core.Latency: the log2 histogram of call latencies behind pmu stat --latency."""

from __future__ import annotations

from pmu.core import Latency


def test_buckets_mean_and_percentiles() -> None:
    lat = Latency()
    for ns in [0, 1, 3, 900, 1000, 1023, 1024, 5_000_000]:
        lat.add(ns)
    assert lat.calls == 8 and lat.total_ns == sum([0, 1, 3, 900, 1000, 1023, 1024, 5_000_000])
    assert lat.buckets[0] == 1 and lat.buckets[1] == 1 and lat.buckets[2] == 1
    assert lat.buckets[10] == 3 and lat.buckets[11] == 1 and lat.buckets[23] == 1
    assert lat.percentile(50) == 1023  # the 4th of 8 calls is in the 512..1023 bucket
    assert lat.percentile(75) == 1023
    assert lat.percentile(87.5) == 2047
    assert lat.percentile(100) == (1 << 23) - 1
    assert Latency().percentile(50) == 0 and Latency().calls == 0


def test_negative_and_huge_latencies_stay_in_range() -> None:
    lat = Latency()
    lat.add(-5)  # a clock step backwards counts as 0
    lat.add(1 << 70)
    assert lat.buckets[0] == 1 and lat.buckets[64] == 1
