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
    from imgrank.features.cache import EmbeddingCache, FileKey
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
    # A scorer whose forward is a re-sort's whole cost (an adapter) names its scores'
    # cache key: files scored before by the same scorer are not scored again. Not with
    # on_features (cull groups by every photo's embedding, so each must pass through).
    score_key = getattr(scorer, "cache_key", None) if on_features is None else None
    keys: dict[int, FileKey] = {}
    stored = _stored_scores(paths, score_key, cache, keys, on_warning) if score_key else {}
    results.update(stored)
    if stored and on_progress is not None:
        on_progress(len(stored))
    todo = [index for index in range(len(paths)) if index not in stored]
    if not todo:
        return [(paths[index], results[index]) for index in sorted(results)]

    def skipped(item: SkippedFile) -> None:
        if on_skip is not None:
            on_skip(item)
        if on_progress is not None:
            on_progress(1)

    stream = iter_features(
        [paths[index] for index in todo],
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
            indices = [todo[i] for i in batch.indices]
            if on_features is not None:
                on_features([paths[i] for i in indices], batch.features.pooled, batch.facts)
            started = time.perf_counter()
            scores = np.asarray(scorer.score(batch.features), dtype=np.float64).reshape(-1)
            stats.score_seconds += time.perf_counter() - started
            if scores.shape[0] != len(indices):
                raise ModelError(
                    f"the scorer returned {scores.shape[0]} scores for {len(indices)} images"
                )
            results.update(zip(indices, scores.tolist(), strict=True))
            if on_progress is not None:
                on_progress(len(indices))
    if score_key and cache is not None:
        _store_scores(keys, results, stored, score_key, cache, on_warning)
    return [(paths[index], results[index]) for index in sorted(results)]


def _stored_scores(
    paths: list[Path],
    score_key: str,
    cache: EmbeddingCache | None,
    keys: dict[int, FileKey],
    warn: Callable[[str], None] | None,
) -> dict[int, float]:
    """``{index: score}`` of the files whose score ``score_key`` is in the cache, unchanged.

    Fills ``keys`` with each file's identity now, before anything is read: a score is
    stored under it, so a file that changes while it is read is scored again next time.
    """
    from imgrank.errors import CacheError
    from imgrank.features.cache import FileKey

    if cache is None:
        return {}
    for index, path in enumerate(paths):
        try:
            keys[index] = FileKey.of(path)
        except OSError:
            continue  # the stream reports it
    try:
        found = cache.get_scores(score_key, list(keys.values()))
    except CacheError as exc:
        if warn is not None:
            warn(f"{exc}; the photos are scored again")
        return {}
    return {index: found[key.path] for index, key in keys.items() if key.path in found}


def _store_scores(
    keys: dict[int, FileKey],
    results: dict[int, float],
    stored: dict[int, float],
    score_key: str,
    cache: EmbeddingCache,
    warn: Callable[[str], None] | None,
) -> None:
    """Keep this run's new scores for the next run (a failure costs only that)."""
    from imgrank.errors import CacheError

    scored = [
        (keys[index], score)
        for index, score in results.items()
        if index not in stored and index in keys
    ]
    if not scored:
        return
    try:
        cache.put_scores(score_key, scored)
    except CacheError as exc:
        if warn is not None:
            warn(f"{exc}; the scores were not cached")
