"""Training losses of the ranking-aware adapter.

All losses take the adapter's outputs for ONE group of images scored for the
same prompt (pairs between groups mean nothing), with targets ``y`` (N,):

* :func:`regression_loss`: ``log(1 + SmoothL1(s, y))``, SmoothL1 with beta 1,
  averaged over the batch;
* :func:`pairwise_bce_loss` (the authors' released default): binary
  cross-entropy with logits of the N*N pair logits against ``1[y_i > y_j]``
  (ties and ``i == j`` are labelled 0), averaged over all ordered pairs;
* :func:`pairwise_hinge_loss` (as the paper's slides write it):
  ``sum over pairs with y_i > y_j of max(0, 1 - o_ij)``;
* :func:`score_difference_rank_loss` (the "LTR paradigm" ablation): the same
  BCE on ``s_i - s_j`` instead of a pair head;
* :func:`adapter_loss`: ``0.2 * regression + 1.0 * rank`` (the released weights).

Pair logits are laid out as :class:`imgrank.models.adapter.RankingAdapter` returns
them: row ``i*N + j`` is "image i ranks above image j".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

from imgrank.errors import DataError

RankLoss = Literal["bce", "hinge"]
RANK_LOSSES: tuple[str, ...] = ("bce", "hinge")

#: The released training weights of the two terms.
DEFAULT_REGRESSION_WEIGHT = 0.2
DEFAULT_RANK_WEIGHT = 1.0


@dataclass
class LossParts:
    """The total loss (to backpropagate) and its two terms (to log)."""

    total: torch.Tensor
    regression: torch.Tensor
    rank: torch.Tensor


def _flat_targets(targets: torch.Tensor, n: int) -> torch.Tensor:
    targets = targets.reshape(-1)
    if targets.shape[0] != n:
        raise DataError(f"{n} scores but {targets.shape[0]} targets")
    return targets


def pair_labels(targets: torch.Tensor) -> torch.Tensor:
    """(N*N,) float labels ``1[y_i > y_j]`` in the pair-logit layout (ties and i == j are 0)."""
    y = targets.reshape(-1)
    return (
        (y.unsqueeze(1) > y.unsqueeze(0))
        .reshape(-1)
        .to(y.dtype if y.is_floating_point() else torch.float32)
    )


def _check_pairs(pair_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    n = targets.reshape(-1).shape[0]
    logits = pair_logits.reshape(-1)
    if logits.shape[0] != n * n:
        raise DataError(f"{logits.shape[0]} pair logits for {n} targets (expected {n * n})")
    return logits


def regression_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log(1 + SmoothL1(s, y))`` with beta 1, mean over the batch."""
    scores = scores.reshape(-1)
    targets = _flat_targets(targets, scores.shape[0]).to(scores.dtype)
    return torch.log1p(F.smooth_l1_loss(scores, targets, beta=1.0))


def pairwise_bce_loss(pair_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE with logits against ``1[y_i > y_j]`` over all N*N ordered pairs (released default)."""
    logits = _check_pairs(pair_logits, targets)
    return F.binary_cross_entropy_with_logits(logits, pair_labels(targets).to(logits.dtype))


def pairwise_hinge_loss(
    pair_logits: torch.Tensor, targets: torch.Tensor, *, reduction: Literal["sum", "mean"] = "sum"
) -> torch.Tensor:
    """``max(0, 1 - o_ij)`` over the pairs with ``y_i > y_j``.

    Args:
        pair_logits: (N*N, 1) or (N*N,).
        targets: (N,).
        reduction: ``"sum"`` as the paper's slides write it, or ``"mean"`` over
            the ordered pairs that have ``y_i > y_j`` (so the weight of the
            term does not grow with the batch size).
    """
    logits = _check_pairs(pair_logits, targets)
    mask = pair_labels(targets).to(logits.dtype)
    hinge = torch.clamp(1.0 - logits, min=0.0) * mask
    if reduction == "sum":
        return hinge.sum()
    if reduction == "mean":
        return hinge.sum() / mask.sum().clamp(min=1.0)
    raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")


def score_difference_rank_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """RankNet-style BCE on ``s_i - s_j`` (the paper's "LTR paradigm" row, no pair head)."""
    s = scores.reshape(-1)
    _flat_targets(targets, s.shape[0])
    return pairwise_bce_loss((s.unsqueeze(1) - s.unsqueeze(0)).reshape(-1), targets)


def adapter_loss(
    scores: torch.Tensor,
    pair_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    rank: RankLoss = "bce",
    regression_weight: float = DEFAULT_REGRESSION_WEIGHT,
    rank_weight: float = DEFAULT_RANK_WEIGHT,
) -> LossParts:
    """The training loss: ``regression_weight * L_reg + rank_weight * L_rank``.

    Works for every adapter variant: for ``"ltr"`` the adapter's pair logits
    are already score differences, so ``rank="bce"`` is
    :func:`score_difference_rank_loss`.

    Args:
        scores: (N, 1) regression outputs.
        pair_logits: (N*N, 1) pair outputs.
        targets: (N,) targets of images that share one prompt and group.
        rank: ``"bce"`` (released default) or ``"hinge"`` (summed, as in the slides).
        regression_weight: weight of the regression term (0.2 released).
        rank_weight: weight of the rank term (1.0 released).
    """
    if rank not in RANK_LOSSES:
        raise ValueError(f"rank must be one of {', '.join(RANK_LOSSES)}, not {rank!r}")
    reg = regression_loss(scores, targets)
    rank_term = (
        pairwise_bce_loss(pair_logits, targets)
        if rank == "bce"
        else pairwise_hinge_loss(pair_logits, targets)
    )
    return LossParts(
        total=regression_weight * reg + rank_weight * rank_term, regression=reg, rank=rank_term
    )
