"""How well predicted scores order images: PLCC, SRCC, KRCC, MAE and pairwise accuracy.

These are the numbers the ranking-adapter paper reports, computed per group
(images are only compared with images of the same group and prompt) and then
averaged over groups:

* **PLCC**: Pearson's linear correlation between predictions and targets.
* **SRCC**: Spearman's rank correlation (Pearson's on ranks; ties get their average rank).
* **KRCC**: Kendall's tau-b (concordant minus discordant pairs, corrected for ties).
* **MAE**: mean absolute error, meaningful only when predictions are in the
  targets' units (a trained adapter regresses the targets; a zero-shot score does not).
* **accuracy**: pairwise ranking accuracy: of the pairs of images whose targets
  differ, the fraction the predictions put in the same order (a tie in the
  predictions counts as half right, i.e. a coin toss).

The correlations come from :mod:`scipy.stats`. A value that is not defined
(fewer than two images, or every prediction or target equal) is NaN and is
left out of the average.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Metric names in display order; also the keys of the JSON report.
METRIC_NAMES = ("PLCC", "SRCC", "KRCC", "MAE", "accuracy")


@dataclass(frozen=True)
class Metrics:
    """The metrics of one group (or their average over groups).

    Attributes:
        PLCC: Pearson linear correlation.
        SRCC: Spearman rank correlation.
        KRCC: Kendall tau-b.
        MAE: mean absolute error (NaN when not asked for).
        accuracy: pairwise ranking accuracy in [0, 1].
        n: number of images (for an average: all images of the averaged groups).
    """

    PLCC: float
    SRCC: float
    KRCC: float
    MAE: float
    accuracy: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the documented keys; undefined values become None."""
        out: dict[str, Any] = {}
        for name in METRIC_NAMES:
            value = getattr(self, name)
            out[name] = None if math.isnan(value) else float(value)
        out["n"] = int(self.n)
        return out


@dataclass
class EvalReport:
    """Metrics per group and their unweighted average over groups.

    Attributes:
        groups: metrics of each group, keyed by the group's display name, in first-seen order.
        mean: each metric averaged over the groups where it is defined; ``n`` is the total.
        rounded: whether predictions were rounded before computing the metrics.
    """

    groups: dict[str, Metrics] = field(default_factory=dict)
    mean: Metrics = field(default_factory=lambda: _undefined(0))
    rounded: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``{"groups": {name: metrics}, "mean": metrics, "rounded": bool}``."""
        return {
            "groups": {name: m.to_dict() for name, m in self.groups.items()},
            "mean": self.mean.to_dict(),
            "rounded": self.rounded,
        }


def _undefined(n: int) -> Metrics:
    nan = float("nan")
    return Metrics(PLCC=nan, SRCC=nan, KRCC=nan, MAE=nan, accuracy=nan, n=n)


def round_half_up(values: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, halves upwards (2.5 -> 3), as people round grades.

    numpy's own rounding sends halves to the even neighbour (2.5 -> 2), which
    would put a prediction exactly between two ordinal classes in a class that
    depends on its parity.
    """
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5)


def _tie_pairs(values: np.ndarray) -> int:
    """Number of unordered pairs whose values are equal."""
    _, counts = np.unique(values, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def _joint_tie_pairs(a: np.ndarray, b: np.ndarray) -> int:
    """Number of unordered pairs equal in both ``a`` and ``b``."""
    _, counts = np.unique(np.stack([a, b], axis=1), axis=0, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def pairwise_accuracy(
    predictions: Sequence[float] | np.ndarray, targets: Sequence[float] | np.ndarray
) -> float:
    """Fraction of target-ordered pairs that the predictions order the same way.

    Only pairs with different targets count (there is no right order for a
    tie). A pair the predictions tie counts as half right. NaN when every
    target is equal.

    The count runs in O(n log n) from Kendall's tau-b and the tie counts
    instead of visiting the n^2 pairs, so a group of 100,000 images is fine:
    with n0 = n(n-1)/2 pairs, n1 ties in predictions, n2 ties in targets and
    n3 pairs tied in both, the untied pairs split into concordant C and
    discordant D with C + D = n0 - n1 - n2 + n3 and
    C - D = tau_b * sqrt((n0 - n1)(n0 - n2)).
    """
    from scipy.stats import kendalltau

    p = np.asarray(predictions, dtype=np.float64).reshape(-1)
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} targets")
    n = p.size
    n0 = n * (n - 1) // 2
    n1, n2 = _tie_pairs(p), _tie_pairs(y)
    n3 = _joint_tie_pairs(p, y)
    ordered = n0 - n2  # pairs with different targets: the ones that have a right order
    if ordered == 0:
        return float("nan")
    untied = n0 - n1 - n2 + n3  # pairs untied in both
    if untied == 0:
        concordant = 0.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tau = float(kendalltau(p, y).statistic)
        difference = tau * math.sqrt(float(n0 - n1) * float(n0 - n2))
        concordant = (untied + difference) / 2.0
    tied_in_predictions_only = n1 - n3
    return (concordant + 0.5 * tied_in_predictions_only) / ordered


def group_metrics(
    predictions: Sequence[float] | np.ndarray,
    targets: Sequence[float] | np.ndarray,
    *,
    round_predictions: bool = False,
    with_mae: bool = True,
) -> Metrics:
    """All metrics for the images of one group.

    Args:
        predictions: one score per image.
        targets: the labelled value per image, same order.
        round_predictions: round predictions to the nearest integer first (halves
            up), for ordinal targets such as age groups or decades.
        with_mae: compute MAE; pass False when predictions are not in the
            targets' units (zero-shot scores), and MAE is reported as NaN.

    Raises:
        ValueError: predictions and targets differ in length.
    """
    from scipy.stats import kendalltau, pearsonr, spearmanr

    p = np.asarray(predictions, dtype=np.float64).reshape(-1)
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} targets")
    if round_predictions:
        p = round_half_up(p)
    n = int(p.size)
    if n == 0:
        return _undefined(0)
    mae = float(np.mean(np.abs(p - y))) if with_mae else float("nan")
    if n < 2:
        return Metrics(float("nan"), float("nan"), float("nan"), mae, float("nan"), n)
    constant = bool(np.all(p == p[0]) or np.all(y == y[0]))
    if constant:
        # Correlations are undefined (scipy would warn and return NaN); accuracy
        # still is defined when the targets vary (every pair a coin toss).
        plcc = srcc = krcc = float("nan")
    else:
        with warnings.catch_warnings():
            # Nearly constant inputs make scipy warn about precision; the value is still right.
            warnings.simplefilter("ignore")
            plcc = float(pearsonr(p, y).statistic)
            srcc = float(spearmanr(p, y).statistic)
            krcc = float(kendalltau(p, y).statistic)
    return Metrics(PLCC=plcc, SRCC=srcc, KRCC=krcc, MAE=mae, accuracy=pairwise_accuracy(p, y), n=n)


def average(metrics: Iterable[Metrics]) -> Metrics:
    """Unweighted mean over groups of each metric where it is defined; ``n`` is summed.

    Unweighted, as in the paper: a large group does not drown the others.
    """
    items = list(metrics)
    values: dict[str, float] = {}
    for name in METRIC_NAMES:
        defined = [getattr(m, name) for m in items if not math.isnan(getattr(m, name))]
        values[name] = float(np.mean(defined)) if defined else float("nan")
    return Metrics(n=sum(m.n for m in items), **values)


def evaluate(
    groups: Sequence[str],
    predictions: Sequence[float] | np.ndarray,
    targets: Sequence[float] | np.ndarray,
    *,
    round_predictions: bool = False,
    with_mae: bool = True,
) -> EvalReport:
    """Metrics per group and averaged, from parallel lists of groups, predictions and targets.

    Args:
        groups: the group of each image (images are compared within a group only).
        predictions: one score per image.
        targets: the labelled value per image.
        round_predictions: see :func:`group_metrics`.
        with_mae: see :func:`group_metrics`.
    """
    p = np.asarray(predictions, dtype=np.float64).reshape(-1)
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if not (len(groups) == p.size == y.size):
        raise ValueError(f"{len(groups)} groups, {p.size} predictions, {y.size} targets")
    members: dict[str, list[int]] = {}
    for index, name in enumerate(groups):
        members.setdefault(name, []).append(index)
    per_group = {
        name: group_metrics(p[idx], y[idx], round_predictions=round_predictions, with_mae=with_mae)
        for name, idx in members.items()
    }
    return EvalReport(groups=per_group, mean=average(per_group.values()), rounded=round_predictions)
