"""Evaluating a scorer on labels: ``imgrank eval``.

Any model :func:`imgrank.models.loading.load_model` loads (zero-shot CLIP,
an adapter, a linear/MLP head, on torch or onnxruntime) is scored on every
labelled image and measured per group (PLCC, SRCC, KRCC, MAE, pairwise accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgrank.models.scoring import FeatureBatch
from imgrank.models.selection import ModelSelection
from imgrank.training.datasets import LabelSet
from imgrank.training.encoding import encode_usable
from imgrank.training.metrics import EvalReport, evaluate
from imgrank.training.progress import TrainingReporter


@dataclass
class EvalResult:
    """Predictions and metrics of one scorer on a label set."""

    report: EvalReport
    labels: LabelSet
    predictions: list[float]
    scorer: str


def evaluate_labels(
    labels: LabelSet,
    selection: ModelSelection,
    *,
    round_predictions: bool = False,
    cache: Path | bool | None = True,
    batch_size: int = 32,
    workers: int | None = None,
    reporter: TrainingReporter | None = None,
) -> EvalResult:
    """Score every labelled image with a model and compute the metrics.

    Args:
        labels: From :func:`imgrank.training.datasets.load_labels`.
        selection: The model: zero-shot CLIP on ``model``/``pretrained``, or a
            model folder (``adapter``: an adapter or a head), as for ``sort``.
        round_predictions: Round predictions to integers first (ordinal targets).
        cache: The embedding cache: True for the default file, a path, or None/False for none.
        batch_size: Images per forward pass.
        workers: Decode threads.
        reporter: Progress hooks.

    Raises:
        DataError: nothing usable (a group of one image is reported as undefined instead).
        UsageError: inconsistent model options.
        ModelError / AdapterMismatchError: the model cannot be loaded.
    """
    from imgrank.models.loading import load_model

    reporter = reporter or TrainingReporter()
    # A group of one image has no order to measure: its correlations show as undefined
    # and it is left out of the average, as docs/training.md says; it is not an error.
    labels.require_rows_per_group(1, purpose="evaluation")
    model = load_model(selection, warn=reporter.warn)
    encoded, labels = encode_usable(
        labels, model.image_encoder, tokens=model.needs_tokens, batch_size=batch_size,
        workers=workers, cache=cache, reporter=reporter, purpose="evaluation", minimum=1,
    )  # fmt: skip

    scores: dict[tuple[Path, str], float] = {}
    for prompt in labels.prompts():
        scorer = model.scorer(prompt)
        paths = list(dict.fromkeys(row.path for row in labels.rows if row.prompt == prompt))
        for start in range(0, len(paths), max(1, batch_size)):
            chunk = paths[start : start + batch_size]
            idx = [encoded.index[p] for p in chunk]
            batch = FeatureBatch(
                pooled=encoded.pooled[idx],
                tokens=None if encoded.tokens is None else encoded.tokens[idx],
            )
            values = np.asarray(scorer.score(batch), dtype=np.float64).reshape(-1)
            scores.update({(p, prompt): float(v) for p, v in zip(chunk, values, strict=True)})
    names = labels.group_names()
    predictions = [scores[(row.path, row.prompt)] for row in labels.rows]
    report = evaluate(
        [names[row.key] for row in labels.rows],
        predictions,
        [row.value for row in labels.rows],
        round_predictions=round_predictions,
        with_mae=model.kind != "zero-shot",
    )
    return EvalResult(report=report, labels=labels, predictions=predictions, scorer=model.name)
