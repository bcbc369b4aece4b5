"""The statistics of a comparison: Student t intervals, Welch's test, seed groups, mean curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnnlab.analysis.names import name_runs
from cnnlab.analysis.stats import mean_curve, seed_groups, spread, versus_best, welch_p
from tests.fake_runs import seeded_run


def test_a_mean_over_seeds_has_a_student_t_confidence_interval():
    # [1, 2, 3]: mean 2, s = 1, t(0.975, 2) = 4.3027: 2 ± 4.3027 / sqrt(3) = 2 ± 2.484.
    interval = spread([1, 2, 3])
    assert interval.mean == 2 and interval.std == pytest.approx(1.0)
    assert interval.ci95 == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5) and interval.text(3) == "2.000 ± 2.484"
    one = spread([0.8, None, float("nan")])
    assert (one.mean, one.std, one.ci95, one.count, one.text()) == (0.8, None, None, 1, "0.8000 ± -")
    assert spread([]).text() == "-"


def test_welch_p_value_is_the_two_sided_tail_of_t_with_welch_satterthwaite_degrees_of_freedom():
    from scipy import stats

    # a = [1, 2, 3, 4]: mean 2.5, variance 5/3; b = [3, 5, 7]: mean 5, variance 4 (Welch 1947).
    se2_a, se2_b = (5 / 3) / 4, 4 / 3
    t = (2.5 - 5) / math.sqrt(se2_a + se2_b)  # -2.5 / sqrt(7/4) = -1.88982
    df = (se2_a + se2_b) ** 2 / (se2_a ** 2 / 3 + se2_b ** 2 / 2)  # (49/16) / (409/432) = 1323/409
    assert t == pytest.approx(-1.889822, abs=1e-6) and df == pytest.approx(1323 / 409)
    assert welch_p([1, 2, 3, 4], [3, 5, 7]) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    assert welch_p([1, 2, 3, 4], [3, 5, 7]) == pytest.approx(0.14847, abs=1e-5)  # also by integrating t's density
    assert welch_p([0.9], [0.5, 0.6]) is None and welch_p([0.5, 0.5], [0.6, 0.6]) is None  # cannot tell


def test_configurations_are_marked_against_the_best_by_welchs_test_and_too_few_seeds_are_not_marked():
    verdicts = versus_best({"best": spread([0.90, 0.92, 0.91]), "close": spread([0.89, 0.93, 0.90]),
                            "worse": spread([0.50, 0.52, 0.51]), "one seed": spread([0.6]), "failed": spread([])})
    assert {name: v["verdict"] for name, v in verdicts.items()} == {
        "best": "best", "close": "not distinguishable", "worse": "worse", "one seed": "cannot tell",
        "failed": "no result"}
    assert verdicts["close"]["p"] == pytest.approx(welch_p([0.90, 0.92, 0.91], [0.89, 0.93, 0.90])) and \
        verdicts["close"]["p"] > 0.05 and verdicts["worse"]["p"] < 0.05
    lone_best = versus_best({"a": spread([0.95]), "b": spread([0.5, 0.52])})  # the best has one seed: no test
    assert lone_best["b"] == {"verdict": "cannot tell", "p": None, "why": "fewer than 2 seeds"}
    alike = versus_best({"a": spread([0.9, 0.9]), "b": spread([0.8, 0.8])})  # no spread: no test either
    assert alike["b"] == {"verdict": "cannot tell", "p": None, "why": "no spread"}


def test_seed_groups_give_mean_and_interval_of_completed_runs():
    runs = [seeded_run("relu", 0, val_acc=0.90, test_acc=0.80), seeded_run("relu", 1, val_acc=0.94, test_acc=0.84),
            seeded_run("relu", 2, status="failed"), seeded_run("elu", 0, val_acc=0.5, test_acc=0.6)]
    name_runs(runs)
    groups = seed_groups(runs)
    relu = groups["activation=relu"]
    assert (relu["runs"], relu["completed"], relu["seeds"]) == (3, 2, ["0", "1", "2"])
    assert relu["val_acc"].mean == pytest.approx(0.92) and relu["val_acc"].std == pytest.approx(np.std([0.9, 0.94], ddof=1))
    assert relu["test_acc"].ci95 == pytest.approx(12.7062 * np.std([0.80, 0.84], ddof=1) / math.sqrt(2), rel=1e-4)
    assert groups["activation=elu"]["val_acc"].std is None and groups["activation=elu"]["val_acc"].count == 1
    assert relu["vs_best"]["verdict"] == "best" and groups["activation=elu"]["vs_best"]["verdict"] == "cannot tell"


def test_a_mean_curve_is_over_the_steps_every_run_reached_with_a_student_t_band():
    # Two seeds at each step, 0.1 apart: s = 0.0707, t(0.975, 1) = 12.706, so 12.706 * 0.0707 / sqrt(2) = 0.6353.
    steps, mean, half = mean_curve([([0, 5], [2.0, 1.0]), ([0, 5, 10], [2.1, 1.1, 0.3])])
    assert steps == [0, 5] and list(mean) == pytest.approx([2.05, 1.05]) and list(half) == pytest.approx([0.63531] * 2,
                                                                                                        abs=1e-5)
    one = mean_curve([([0, 5], [2.0, 1.0])])
    assert one.steps == [0, 5] and list(one.mean) == [2.0, 1.0] and one.ci95 is None


def test_equal_windows_merges_the_short_windows_around_epoch_ends_and_keeps_logs_that_never_reach_log_every():
    from cnnlab.analysis.stats import equal_windows

    # log_every 4, epochs of 6 steps: logged at 4, 6 (end), 8, 12 (end and a multiple), 13 (a last short window)
    assert equal_windows([4, 6, 8, 12, 13], [1.0, 3.0, 1.0, 2.0, 0.0], 4) == ([4, 8, 12], [1.0, 2.0, 2.0])
    assert equal_windows([8, 16], [2.0, 1.9], 50) == ([8, 16], [2.0, 1.9])  # epoch ends only: as logged
    assert equal_windows([10, 20, 25], [1.0, 1.0, 0.5], None) == ([10, 20], [1.0, 1.0])  # the longest gap stands in
