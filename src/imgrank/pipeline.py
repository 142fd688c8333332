"""Streaming: decode pool -> pixel batches -> image encoder -> scorer.

Decoding runs in a thread pool (Pillow releases the GIL while it decodes and
resizes) while the main thread runs the model on the previous batch. The
number of images in flight is bounded, so memory does not grow with the size
of the folder.

This module is runtime-agnostic: the encoder may be the torch backbone or an
onnxruntime session, as long as it follows :class:`ImageEncoder`. It does not
import torch.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from imgrank.backbone import PreprocessConfig
from imgrank.errors import ImageDecodeError
from imgrank.images import DEFAULT_MAX_PIXELS, load_pixels
from imgrank.ranking import SkippedFile
from imgrank.scoring import FeatureBatch, Scorer

DEFAULT_BATCH_SIZE = 32


class ImageEncoder(Protocol):
    """An image tower: the torch :class:`imgrank.backbone.Backbone` or an ONNX session."""

    preprocess: PreprocessConfig

    @property
    def fingerprint(self) -> str:
        """Identifies the features produced (architecture, weights, preprocessing)."""
        ...

    def encode_pixels(self, pixels: np.ndarray, *, tokens: bool = False) -> FeatureBatch:
        """Features of normalised pixels (N, 3, S, S)."""
        ...


def default_workers() -> int:
    """Decode threads: one per core (decoding and the model share the machine)."""
    return max(1, os.cpu_count() or 1)


@dataclass
class DecodedBatch:
    """Pixels of the images of one batch that decoded, in input order."""

    paths: list[Path]
    pixels: np.ndarray


def decode_batches(
    paths: Iterable[Path],
    preprocess: PreprocessConfig,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: bool = True,
    on_skip: Callable[[SkippedFile], None] | None = None,
) -> Iterator[DecodedBatch]:
    """Decode images in a thread pool and yield them in input order, batch by batch.

    At most ``2 * batch_size`` images are decoded ahead of the consumer, so a
    folder of 100,000 photos needs no more memory than one of 100.
    A file that cannot be used is reported through ``on_skip`` and left out.
    """
    workers = workers or default_workers()
    in_flight_limit = max(2 * batch_size, workers)

    def decode(path: Path) -> np.ndarray:
        return load_pixels(path, preprocess, draft=draft, max_pixels=max_pixels)

    pending: deque[tuple[Path, Future[np.ndarray]]] = deque()
    batch_paths: list[Path] = []
    batch_pixels: list[np.ndarray] = []
    source = iter(paths)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgrank-decode") as pool:

        def refill() -> None:
            while len(pending) < in_flight_limit:
                path = next(source, None)
                if path is None:
                    return
                pending.append((path, pool.submit(decode, path)))

        refill()
        while pending:
            path, future = pending.popleft()
            try:
                pixels = future.result()
            except ImageDecodeError as exc:
                if on_skip is not None:
                    on_skip(SkippedFile(path, exc.reason))
            except Exception as exc:  # noqa: BLE001 - one bad file must never stop the run
                if on_skip is not None:
                    on_skip(SkippedFile(path, f"unexpected error: {type(exc).__name__}: {exc}"))
            else:
                batch_paths.append(path)
                batch_pixels.append(pixels)
            refill()
            if len(batch_paths) == batch_size:
                yield DecodedBatch(batch_paths, np.stack(batch_pixels))
                batch_paths, batch_pixels = [], []
        if batch_paths:
            yield DecodedBatch(batch_paths, np.stack(batch_pixels))


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
) -> list[tuple[Path, float]]:
    """Score every image of ``paths``; unusable files go to ``on_skip``.

    Args:
        paths: image files, in any order.
        encoder: the image tower.
        scorer: turns features into scores.
        batch_size: images per forward pass.
        workers: decode threads (default: one per core).
        max_pixels: decompression-bomb guard.
        on_skip: called for each file left out, with the reason.
        on_progress: called with the number of files finished (scored or skipped) since the last call.

    Returns:
        ``(path, score)`` for every image that was scored, in input order.
    """
    scored: list[tuple[Path, float]] = []

    def skipped(item: SkippedFile) -> None:
        if on_skip is not None:
            on_skip(item)
        if on_progress is not None:
            on_progress(1)

    for batch in decode_batches(
        paths,
        encoder.preprocess,
        batch_size=batch_size,
        workers=workers,
        max_pixels=max_pixels,
        on_skip=skipped,
    ):
        features = encoder.encode_pixels(batch.pixels, tokens=scorer.needs_tokens)
        scores = np.asarray(scorer.score(features), dtype=np.float64).reshape(-1)
        scored.extend(zip(batch.paths, scores.tolist(), strict=True))
        if on_progress is not None:
            on_progress(len(batch.paths))
    return scored
