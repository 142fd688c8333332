"""Metrics checked against values worked out by hand (and a brute-force pair count)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgrank.training.metrics import evaluate, group_metrics, pairwise_accuracy, round_half_up


def test_perfect_order_scores_one_everywhere() -> None:
    m = group_metrics([1.0, 2.0, 3.0, 4.0], [1, 2, 3, 4])
    assert (m.PLCC, m.SRCC, m.KRCC, m.accuracy) == pytest.approx((1, 1, 1, 1))
    assert m.MAE == 0.0 and m.n == 4


def test_two_swapped_pairs_by_hand() -> None:
    # predictions 1 2 3 4 against targets 2 1 4 3:
    # Pearson: deviations (-1.5,-.5,.5,1.5) and (-.5,-1.5,1.5,.5): cov 3, variances 5 and 5 -> 0.6
    # Spearman: d = (-1,1,-1,1), 1 - 6*4/(4*15) = 0.6
    # Kendall: of 6 pairs, (1,2) and (3,4) are discordant -> (4-2)/6 = 1/3; accuracy 4/6
    # MAE: every prediction is off by one -> 1
    m = group_metrics([1, 2, 3, 4], [2, 1, 4, 3])
    assert pytest.approx(0.6) == m.PLCC
    assert pytest.approx(0.6) == m.SRCC
    assert pytest.approx(1 / 3) == m.KRCC
    assert m.accuracy == pytest.approx(4 / 6)
    assert pytest.approx(1.0) == m.MAE


def test_ties_by_hand() -> None:
    # predictions 1 1 2, targets 1 2 3: pair (1,2) is tied in predictions (half right),
    # the other two concordant -> accuracy 2.5/3; tau-b = 2 / sqrt((3-1)*(3-0)).
    # Spearman on ranks (1.5,1.5,3) vs (1,2,3): cov 1.5, variances 1.5 and 2 -> 1.5/sqrt(3)
    m = group_metrics([1, 1, 2], [1, 2, 3])
    assert m.accuracy == pytest.approx(5 / 6)
    assert pytest.approx(2 / math.sqrt(6)) == m.KRCC
    assert pytest.approx(1.5 / math.sqrt(3)) == m.SRCC


def test_reversed_order_is_minus_one_and_zero_accuracy() -> None:
    m = group_metrics([4, 3, 2, 1], [1, 2, 3, 4])
    assert (m.SRCC, m.KRCC, m.accuracy) == pytest.approx((-1, -1, 0))


def test_round_halves_up_before_scoring() -> None:
    assert round_half_up(np.array([0.4, 1.5, 2.49, 2.5, -0.5])).tolist() == [0, 2, 2, 3, 0]
    # rounded predictions 0 2 2 3 against 0 1 2 3: only the second is off, by one
    m = group_metrics([0.4, 1.5, 2.49, 2.5], [0, 1, 2, 3], round_predictions=True)
    assert pytest.approx(0.25) == m.MAE
    # the tie 2,2 created by rounding makes one ordered pair a coin toss: 5.5 of 6
    assert m.accuracy == pytest.approx(5.5 / 6)
    unrounded = group_metrics([0.4, 1.5, 2.49, 2.5], [0, 1, 2, 3])
    assert unrounded.accuracy == 1.0


def test_undefined_values_are_nan_not_errors() -> None:
    constant_targets = group_metrics([1, 2, 3], [5, 5, 5])
    assert math.isnan(constant_targets.SRCC) and math.isnan(constant_targets.accuracy)
    constant_predictions = group_metrics([7, 7, 7], [1, 2, 3])
    assert math.isnan(constant_predictions.PLCC)
    assert constant_predictions.accuracy == 0.5  # every pair a coin toss
    single = group_metrics([1.0], [2.0])
    assert single.n == 1 and math.isnan(single.SRCC) and single.MAE == 1.0


def test_without_mae_reports_none_in_json() -> None:
    m = group_metrics([0.1, 0.2], [1, 2], with_mae=False)
    assert m.to_dict()["MAE"] is None
    assert m.to_dict()["SRCC"] == pytest.approx(1.0)


def test_groups_are_scored_separately_and_averaged_unweighted() -> None:
    groups = ["a"] * 4 + ["b"] * 4 + ["c"] * 2
    predictions = [1, 2, 3, 4] + [1, 2, 3, 4] + [1, 2]
    targets = [1, 2, 3, 4] + [2, 1, 4, 3] + [9, 9]
    report = evaluate(groups, predictions, targets)
    assert list(report.groups) == ["a", "b", "c"]
    assert pytest.approx(0.6) == report.groups["b"].SRCC
    # group c (constant targets) has no SRCC and is left out of the average: (1 + 0.6) / 2
    assert pytest.approx(0.8) == report.mean.SRCC
    assert report.mean.n == 10
    # Across groups the order would not matter: a global SRCC would differ.
    data = json.loads(json.dumps(report.to_dict()))
    assert set(data["mean"]) == {"PLCC", "SRCC", "KRCC", "MAE", "accuracy", "n"}
    assert data["groups"]["c"]["SRCC"] is None


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError):
        group_metrics([1, 2], [1, 2, 3])


def _brute_force_accuracy(p: list[float], y: list[float]) -> float:
    right = total = 0.0
    for i, j in itertools.combinations(range(len(p)), 2):
        if y[i] == y[j]:
            continue
        total += 1
        if p[i] == p[j]:
            right += 0.5
        elif (p[i] - p[j]) * (y[i] - y[j]) > 0:
            right += 1
    return right / total if total else float("nan")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3)), min_size=2, max_size=25))
def test_fast_pair_count_matches_brute_force(pairs: list[tuple[int, int]]) -> None:
    # Small integer ranges force many ties in both predictions and targets.
    p = [float(a) for a, _ in pairs]
    y = [float(b) for _, b in pairs]
    expected = _brute_force_accuracy(p, y)
    got = pairwise_accuracy(p, y)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-9)
