"""Encoding labelled images once, through the feature stream and the embedding cache.

Training and evaluation never run the image tower per epoch or per prompt:
every distinct image is encoded once by
:func:`imgrank.features.stream.iter_features` (the same decoding, cache
lookups and cache writes as ``imgrank sort``, so a folder sorted once trains
without decoding, and the other way round) and kept in memory as arrays.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgrank.errors import CacheError
from imgrank.training.progress import TrainingReporter

if TYPE_CHECKING:
    import torch

    from imgrank.features.cache import EmbeddingCache
    from imgrank.features.stream import ImageEncoder
    from imgrank.models.clip.towers import Backbone
    from imgrank.training.datasets import LabelSet


@dataclass
class EncodedImages:
    """Features of the images of a label set, one row per distinct file.

    Attributes:
        index: Row of each file in the arrays.
        pooled: (N, E) float32 pooled embeddings (zero-shot scoring).
        tokens: (N, P, D) float32 visual tokens (adapters), or None when not asked for.
        failed: Files that could not be used, with a reason.
        from_cache: How many files were read from the embedding cache.
        seconds: Wall time of the encoding.
    """

    index: dict[Path, int]
    pooled: np.ndarray
    tokens: np.ndarray | None
    failed: dict[Path, str]
    from_cache: int = 0
    seconds: float = 0.0


def encode_images(
    paths: list[Path],
    encoder: ImageEncoder,
    *,
    tokens: bool,
    batch_size: int = 32,
    workers: int | None = None,
    cache: EmbeddingCache | None = None,
    reporter: TrainingReporter | None = None,
) -> EncodedImages:
    """Run every image through the frozen image tower once (cache hits are not decoded).

    Args:
        paths: Distinct image files.
        encoder: The image tower (``RankingModel.image_encoder``).
        tokens: Also keep the visual tokens (needed by adapters).
        batch_size: Images per forward pass.
        workers: Decode threads (default: one per core).
        cache: An open embedding cache, or None to encode everything.
        reporter: Progress hooks.
    """
    from imgrank.features.stream import PipelineStats, iter_features
    from imgrank.ranking import SkippedFile

    reporter = reporter or TrainingReporter()
    started = time.perf_counter()
    failed: dict[Path, str] = {}

    def on_skip(item: SkippedFile) -> None:
        failed[Path(item.path)] = item.reason
        reporter.encoded(1)

    stats = PipelineStats()
    reporter.encoding(len(paths))
    pooled_rows: dict[int, np.ndarray] = {}
    token_rows: dict[int, np.ndarray] = {}
    stream = iter_features(
        paths,
        encoder,
        tokens=tokens,
        cache=cache,
        batch_size=batch_size,
        workers=workers,
        on_skip=on_skip,
        on_warning=reporter.warn,
        stats=stats,
    )
    with contextlib.closing(stream):
        for batch in stream:
            for row, index in enumerate(batch.indices):
                pooled_rows[index] = np.asarray(batch.features.pooled[row], dtype=np.float32)
                if tokens:
                    assert batch.features.tokens is not None
                    token_rows[index] = np.asarray(batch.features.tokens[row], dtype=np.float32)
            reporter.encoded(len(batch))
    order = sorted(pooled_rows)
    index = {paths[i]: row for row, i in enumerate(order)}
    if order:
        pooled = np.stack([pooled_rows[i] for i in order])
        grids = np.stack([token_rows[i] for i in order]) if tokens else None
    else:
        pooled = np.zeros((0, 0), dtype=np.float32)
        grids = np.zeros((0, 0, 0), dtype=np.float32) if tokens else None
    return EncodedImages(
        index=index,
        pooled=pooled,
        tokens=grids,
        failed=failed,
        from_cache=int(stats.cache_hits),
        seconds=time.perf_counter() - started,
    )


def open_cache_for(cache: Path | None | bool, reporter: TrainingReporter) -> EmbeddingCache | None:
    """The embedding cache a command asked for: a path, the default (True), or none (None/False)."""
    if cache is None or cache is False:
        return None
    from imgrank.features.cache import open_cache

    try:
        return open_cache(None if cache is True else cache, on_warning=reporter.warn)
    except CacheError as exc:
        reporter.warn(f"{exc}; encoding without the cache")
        return None


def encode_usable(
    labels: LabelSet,
    encoder: ImageEncoder,
    *,
    tokens: bool,
    batch_size: int,
    workers: int | None,
    cache: Path | None | bool,
    reporter: TrainingReporter,
    purpose: str,
    minimum: int = 2,
) -> tuple[EncodedImages, LabelSet]:
    """Encode the labelled images once (through the cache) and drop rows whose image failed.

    Raises:
        DataError: a group is left with fewer than ``minimum`` usable rows for ``purpose``.
    """
    opened = open_cache_for(cache, reporter)
    try:
        encoded = encode_images(
            labels.paths(),
            encoder,
            tokens=tokens,
            batch_size=batch_size,
            workers=workers,
            cache=opened,
            reporter=reporter,
        )
    finally:
        if opened is not None:
            opened.close()
    usable = labels.without(encoded.failed)
    usable.require_rows_per_group(minimum, purpose=purpose)
    return encoded, usable


def encode_prompts(prompts: list[str], backbone: Backbone) -> dict[str, torch.Tensor]:
    """Text tokens (1, L, D) of each distinct prompt, float32 on the backbone's device."""
    return {
        prompt: backbone.encode_text([prompt]).tokens.float().clone()
        for prompt in dict.fromkeys(prompts)
    }
