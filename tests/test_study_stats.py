"""The numbers behind a comparison over several runs: equal-forgetting interpolation, t intervals,
paired differences, the tuning choice (icu/comparison/stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from icu.comparison.stats import best_lr, crossing, format_interval, paired_differences, t_interval


def test_crossing_interpolates_between_the_validations_around_the_threshold():
    # MA 0.9 -> 0.7 -> 0.4 crosses 0.5 between epochs 1 and 2, two thirds of the way:
    # w = (0.7 - 0.5) / (0.7 - 0.4) = 2/3; held-out 2.0 -> 2.6 gives 2.0 + 2/3 * 0.6 = 2.4
    at = crossing([0.9, 0.7, 0.4], [1.5, 2.0, 2.6], 0.5)
    assert at["reached"] and at["value"] == pytest.approx(2.4) and at["epoch"] == pytest.approx(1 + 2 / 3)
    # the first validation at or below the threshold counts, later ones do not
    at = crossing([0.9, 0.5, 0.2, 0.6], [1.0, 3.0, 9.0, 9.0], 0.5)
    assert at["value"] == pytest.approx(3.0) and at["epoch"] == pytest.approx(1.0)
    assert crossing([0.4, 0.3], [1.0, 2.0], 0.5) == {"value": 1.0, "epoch": 0.0, "reached": True}
    never = crossing([0.9, 0.8], [1.0, 2.0], 0.5)
    assert not never["reached"] and math.isnan(never["value"]) and math.isnan(never["epoch"])
    with pytest.raises(ValueError):
        crossing([0.9, 0.8], [1.0], 0.5)


def test_t_interval_matches_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        x = rng.normal(2.0, 0.3, n)
        ours = t_interval(x)
        lo, hi = scipy.stats.t.interval(0.95, n - 1, loc=x.mean(), scale=scipy.stats.sem(x))
        assert ours["mean"] == pytest.approx(x.mean()) and ours["n"] == n
        assert ours["mean"] - ours["half"] == pytest.approx(lo) and ours["mean"] + ours["half"] == pytest.approx(hi)
    lo, hi = scipy.stats.t.interval(0.9, 3, loc=np.mean([1, 2, 4, 8]), scale=scipy.stats.sem([1, 2, 4, 8]))
    assert t_interval([1, 2, 4, 8], 0.9)["half"] == pytest.approx((hi - lo) / 2)
    one = t_interval([3.0, float("nan"), None])
    assert one["mean"] == 3.0 and one["n"] == 1 and math.isnan(one["half"])
    assert t_interval([])["n"] == 0


def test_paired_differences_pair_runs_by_key():
    a = {("exp0", 0): 2.0, ("exp0", 1): 2.5, ("exp0", 2): 2.2, ("exp1", 0): 9.0}
    b = {("exp0", 0): 1.0, ("exp0", 1): 1.4, ("exp0", 2): 1.3}  # no exp1 run: that one is not paired
    d = paired_differences(a, b)
    diffs = [1.0, 1.1, 0.9]
    lo, hi = scipy.stats.t.interval(0.95, 2, loc=np.mean(diffs), scale=scipy.stats.sem(diffs))
    assert d["n"] == 3 and d["mean"] == pytest.approx(1.0) and d["half"] == pytest.approx((hi - lo) / 2)
    assert d["excludes_zero"]
    noisy = paired_differences({1: 1.0, 2: -1.0, 3: 0.5}, {1: 0.0, 2: 0.0, 3: 0.0})
    assert not noisy["excludes_zero"]


def test_best_lr_takes_the_lowest_score_among_runs_that_reached():
    grid = [{"lr": 1e-4, "reached": True, "score": 2.5}, {"lr": 5e-5, "reached": True, "score": 2.3},
            {"lr": 2e-5, "reached": False, "score": 1.0}, {"lr": 1e-5, "reached": True, "score": float("nan")}]
    assert best_lr(grid)["lr"] == 5e-5
    assert best_lr([{"lr": 1e-4, "reached": True, "score": 2.0}, {"lr": 3e-4, "reached": True, "score": 2.0}])["lr"] == 3e-4
    assert best_lr([{"lr": 1e-4, "reached": False, "score": 2.0}]) is None


def test_format_interval():
    assert format_interval(2.1234, 0.0512) == "2.123 ± 0.051"
    assert format_interval(2.1234, float("nan")) == "2.123"
    assert format_interval(float("nan"), 0.1) == ""
