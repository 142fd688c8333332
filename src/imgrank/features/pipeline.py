"""Sorting's consumer of the feature stream: every file's features -> one score per file.

:func:`score_images` runs :func:`imgrank.features.stream.iter_features` and a
scorer over its batches. The stream does the work (cache lookups, the decode
pool, the image tower, cache writes); this module only scores and keeps the
results in input order.

JPEGs are decoded with DCT scaling (see :func:`imgrank.images.decode.load_pixels`):
the rankings stay those of a full decode (``tests/test_pipeline_parity.py``
holds the fast path to a Spearman correlation of at least 0.999 against a
straightforward full-decode path).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgrank.errors import ModelError
from imgrank.features.stream import (
    DEFAULT_BATCH_SIZE,
    ImageEncoder,
    PipelineStats,
    iter_features,
)
from imgrank.images.decode import DEFAULT_MAX_PIXELS
from imgrank.models.scoring import Scorer
from imgrank.ranking import SkippedFile

if TYPE_CHECKING:
    from imgrank.features.cache import EmbeddingCache

__all__ = ["DEFAULT_BATCH_SIZE", "ImageEncoder", "PipelineStats", "score_images"]


def score_images(
    paths: list[Path],
    encoder: ImageEncoder,
    scorer: Scorer,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_skip: Callable[[SkippedFile], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    cache: EmbeddingCache | None = None,
    on_warning: Callable[[str], None] | None = None,
    draft: bool = True,
    stats: PipelineStats | None = None,
) -> list[tuple[Path, float]]:
    """Score every image of ``paths``; unusable files go to ``on_skip``.

    Args:
        paths: image files, in any order.
        encoder: the image tower (``RankingModel.image_encoder``).
        scorer: turns features into scores (``RankingModel.scorer(prompt)``).
        on_progress: called with the number of files finished (scored or
            skipped) since the last call.
        Other arguments: see :func:`imgrank.features.stream.iter_features`.

    Returns:
        ``(path, score)`` for every image that was scored, in input order.
    """
    stats = stats if stats is not None else PipelineStats()
    results: dict[int, float] = {}

    def skipped(item: SkippedFile) -> None:
        if on_skip is not None:
            on_skip(item)
        if on_progress is not None:
            on_progress(1)

    stream = iter_features(
        paths,
        encoder,
        tokens=scorer.needs_tokens,
        cache=cache,
        batch_size=batch_size,
        workers=workers,
        max_pixels=max_pixels,
        draft=draft,
        on_skip=skipped,
        on_warning=on_warning,
        stats=stats,
    )
    # closing(): an interrupted run (Ctrl-C, a failing scorer) still writes what it cached.
    with contextlib.closing(stream):
        for batch in stream:
            started = time.perf_counter()
            scores = np.asarray(scorer.score(batch.features), dtype=np.float64).reshape(-1)
            stats.score_seconds += time.perf_counter() - started
            if scores.shape[0] != len(batch.indices):
                raise ModelError(
                    f"the scorer returned {scores.shape[0]} scores for {len(batch.indices)} images"
                )
            results.update(zip(batch.indices, scores.tolist(), strict=True))
            if on_progress is not None:
                on_progress(len(batch.indices))
    return [(paths[index], results[index]) for index in sorted(results)]
