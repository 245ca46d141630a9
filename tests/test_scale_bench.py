"""benchmarks/scale.py's ``--train-repeats`` arithmetic: the 10N/N ratio of interleaved pairs, its bootstrap interval
and the verdict on the 0.9x goal (decided on the interval, as train/claims.py decides a claim)."""

from __future__ import annotations

import pytest

from benchmarks.scale import MIN_PAIRS, repeat_ratio


def test_pairs_are_divided_pairwise_and_the_median_is_their_middle():
    out = repeat_ratio([50.0, 100.0, 60.0, 80.0, 70.0], [50.0, 90.0, 66.0, 60.0, 70.0])
    assert out["ratios"] == pytest.approx([1.0, 0.9, 1.1, 0.75, 1.0])
    assert out["median"] == pytest.approx(1.0)
    assert out["low"] <= out["median"] <= out["high"]
    assert 0.75 <= out["low"] and out["high"] <= 1.1


def test_verdict_on_the_interval():
    n = MIN_PAIRS + 3
    assert repeat_ratio([50.0] * n, [48.0, 47.0, 49.0, 46.0, 50.0, 48.0, 47.0, 49.0][:n])["verdict"] == "pass"
    assert repeat_ratio([50.0] * n, [40.0, 41.0, 42.0, 39.0, 40.0, 43.0, 41.0, 40.0][:n])["verdict"] == "fail"
    # ratios straddling 0.9 (half at 0.8, half at 1.0): the interval holds both sides
    straddle = repeat_ratio([50.0] * n, [40.0, 50.0] * (n // 2))
    assert straddle["low"] < 0.9 < straddle["high"] and straddle["verdict"] == "inconclusive"


def test_too_few_pairs_never_decide_and_the_interval_is_still_given():
    out = repeat_ratio([50.0, 60.0], [55.0, 66.0])  # both 1.1x: a narrow interval, well above 0.9
    assert out["low"] == pytest.approx(1.1) and out["high"] == pytest.approx(1.1)
    assert not out["decided"] and out["verdict"] == "inconclusive"


def test_seeded():
    a, b = [50.0, 60.0, 70.0, 55.0, 65.0, 58.0], [45.0, 66.0, 60.0, 57.0, 70.0, 50.0]
    assert repeat_ratio(a, b) == repeat_ratio(a, b)
    assert repeat_ratio(a, b, seed=1)["median"] == repeat_ratio(a, b)["median"]


def test_unpaired_rates_are_refused():
    with pytest.raises(ValueError):
        repeat_ratio([50.0, 60.0], [50.0])
