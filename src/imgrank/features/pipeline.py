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
    from imgrank.images.facts import PhotoFacts

__all__ = ["DEFAULT_BATCH_SIZE", "FeatureListener", "ImageEncoder", "PipelineStats", "score_images"]

#: ``on_features(paths, pooled, facts)``: a batch of scored images, their (N, E) pooled
#: embeddings, and their hashes and capture times from this run's decode (None when
#: served from the cache).
FeatureListener = Callable[[list[Path], np.ndarray, "list[PhotoFacts | None] | None"], None]


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
    on_features: FeatureListener | None = None,
    decode_device: str | None = None,
) -> list[tuple[Path, float]]:
    """Score every image of ``paths``; unusable files go to ``on_skip``.

    Args:
        paths: image files, in any order.
        encoder: the image tower (``RankingModel.image_encoder``).
        scorer: turns features into scores (``RankingModel.scorer(prompt)``).
        on_progress: called with the number of files finished (scored or
            skipped) since the last call.
        on_features: told the pooled embedding of every scored image, with its hash and
            capture time when they came from this run's decode (None for cache hits):
            ``imgrank cull`` groups with them.
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
        decode_device=decode_device,
        on_skip=skipped,
        on_warning=on_warning,
        stats=stats,
        facts=on_features is not None,
    )
    # closing(): an interrupted run (Ctrl-C, a failing scorer) still writes what it cached.
    with contextlib.closing(stream):
        for batch in stream:
            if on_features is not None:
                on_features(
                    [paths[i] for i in batch.indices], batch.features.pooled, batch.facts
                )
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
