"""``imgrank cull`` as a library call: folder + prompt -> bursts, each with its best shot.

Two steps, so that re-grouping with other options costs only the grouping:

1. :func:`collect_features` scores the folder exactly as ``imgrank sort`` does (same
   request, same scorer, same cache: :func:`imgrank.sorter.sort_folder`) and keeps
   each photo's embedding, perceptual hash and capture time. After a sort of the same
   folder everything comes from the embedding cache and no photo is decoded.
2. :func:`cull_features` groups them (:mod:`imgrank.grouping`) and ranks each group
   by score; the best ``keep`` of each group are the keepers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgrank.errors import ImageDecodeError, NoImagesRankedError, UsageError
from imgrank.grouping import GroupingOptions, comparable_times, group_photos
from imgrank.images.facts import CaptureTime, PhotoFacts, photo_facts
from imgrank.ranking import SkippedFile
from imgrank.sorter import SortCallbacks, SortRequest, sort_folder

#: JPEGs are decoded at the smallest DCT scale that keeps this many pixels a side when
#: only the hash is wanted (a cache from before hashes were stored): plenty for phash.
FACTS_MIN_SIDE = 256


@dataclass
class FolderFeatures:
    """What grouping needs of every scored photo, in path order.

    Attributes:
        paths: the scored photos, sorted.
        scores: (N,) scores, as ``imgrank sort`` gives them.
        embeddings: (N, E) L2-normalised pooled embeddings.
        hashes: (N,) 64-bit perceptual hashes.
        captured: capture times (None where the photo has none).
        raws: the RAW file of a RAW+JPEG pair ranked through its JPEG (else None).
        skipped: files that could not be used, with reasons.
        prompt, scorer, seconds: as in :class:`imgrank.ranking.Ranking`.
        from_cache: photos whose features came from the cache.
        facts_read: photos opened only to read their hash and capture time (their
            features were cached before imgrank stored hashes).
    """

    paths: list[Path]
    scores: np.ndarray
    embeddings: np.ndarray
    hashes: np.ndarray
    captured: list[CaptureTime | None]
    raws: list[Path | None] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    prompt: str = ""
    scorer: str = ""
    seconds: float = 0.0
    from_cache: int = 0
    facts_read: int = 0


@dataclass(frozen=True)
class CulledPhoto:
    """One photo's place in the culling: its group, its rank inside it, kept or not."""

    group: int
    rank_in_group: int
    keep: bool
    score: float
    path: Path
    captured: CaptureTime | None = None
    #: The RAW twin of a RAW+JPEG pair: kept, linked and moved with ``path``.
    raw: Path | None = None


@dataclass
class Culling:
    """The result: photos ordered by group (capture order), best first within a group."""

    photos: list[CulledPhoto]
    groups: int
    features: FolderFeatures
    options: GroupingOptions
    keep: int
    seconds: float = 0.0

    @property
    def keepers(self) -> list[CulledPhoto]:
        return [p for p in self.photos if p.keep]

    @property
    def rejects(self) -> list[CulledPhoto]:
        return [p for p in self.photos if not p.keep]


def collect_features(
    request: SortRequest,
    callbacks: SortCallbacks | None = None,
    *,
    workers: int | None = None,
) -> FolderFeatures:
    """Score a folder like ``imgrank sort`` and keep what grouping needs.

    Raises:
        UsageError, NoImagesRankedError, ModelError: as :func:`imgrank.sorter.sort_folder`.
    """
    if request.top is not None or request.ascending:
        raise UsageError("culling ranks every photo best first: --top and --ascending do not apply")
    if request.engine != "local" or request.paths_from is not None:
        raise UsageError("imgrank cull reads a folder of photos on the local engine")
    from imgrank.features.parquet import is_dataset

    if is_dataset(request.folder):
        raise UsageError(
            f"{request.folder} is a features dataset written by `imgrank embed`; it stores no "
            "perceptual hashes or capture times: cull the photo folder itself"
        )
    callbacks = callbacks or SortCallbacks()
    pooled: dict[Path, np.ndarray] = {}
    facts: dict[Path, PhotoFacts] = {}

    def listen(paths: list[Path], batch: np.ndarray, batch_facts: list | None) -> None:
        for row, path in enumerate(paths):
            pooled[path] = np.asarray(batch[row], dtype=np.float32)
            if batch_facts is not None and batch_facts[row] is not None:
                facts[path] = batch_facts[row]

    ranking = sort_folder(request, callbacks, on_features=listen)
    started = time.perf_counter()
    paths = sorted((item.path for item in ranking.items), key=str)
    scores = {item.path: item.score for item in ranking.items}
    raws = {item.path: item.raw for item in ranking.items}
    missing = [p for p in paths if p not in facts]
    if missing:
        facts.update(_cached_facts(request, missing, callbacks.warn))
    unknown = [p for p in paths if p not in facts]
    skipped = list(ranking.skipped)
    facts_read = 0
    if unknown:
        found, failed = _read_facts(unknown, request.max_pixels, workers)
        facts_read = len(found)
        facts.update(found)
        _store_facts(request, found, callbacks.warn)
        for item in failed:
            callbacks.skip(item)
        skipped.extend(failed)
        paths = [p for p in paths if p in facts]
    if not paths:
        raise NoImagesRankedError(f"none of the photos in {request.folder} could be grouped")
    embeddings = np.stack([pooled[p] for p in paths]).astype(np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings /= np.where(norms > 0, norms, 1.0)
    return FolderFeatures(
        paths=paths,
        scores=np.array([scores[p] for p in paths], dtype=np.float64),
        embeddings=embeddings,
        hashes=np.array([facts[p].phash for p in paths], dtype=np.uint64),
        captured=[facts[p].captured for p in paths],
        raws=[raws[p] for p in paths],
        skipped=skipped,
        prompt=ranking.prompt,
        scorer=ranking.scorer,
        seconds=ranking.seconds + time.perf_counter() - started,
        from_cache=ranking.from_cache,
        facts_read=facts_read,
    )


def cull_features(
    features: FolderFeatures, options: GroupingOptions | None = None, *, keep: int = 1
) -> Culling:
    """Group the photos and mark the best ``keep`` of each group."""
    if keep < 1:
        raise UsageError("--keep must be at least 1")
    options = options or GroupingOptions()
    started = time.perf_counter()
    labels = group_photos(
        comparable_times(features.captured), features.hashes, features.embeddings, options
    )
    # Best first inside a group; ties by path so the output never depends on luck.
    order = sorted(
        range(len(features.paths)),
        key=lambda i: (int(labels[i]), -features.scores[i], str(features.paths[i])),
    )
    photos: list[CulledPhoto] = []
    rank = 0
    previous = -1
    for i in order:
        group = int(labels[i])
        rank = rank + 1 if group == previous else 1
        previous = group
        photos.append(
            CulledPhoto(
                group=group + 1,
                rank_in_group=rank,
                keep=rank <= keep,
                score=float(features.scores[i]),
                path=features.paths[i],
                captured=features.captured[i],
                raw=features.raws[i] if features.raws else None,
            )
        )
    return Culling(
        photos=photos,
        groups=int(labels.max()) + 1 if labels.size else 0,
        features=features,
        options=options,
        keep=keep,
        seconds=time.perf_counter() - started,
    )


def cull_folder(
    request: SortRequest,
    options: GroupingOptions | None = None,
    *,
    keep: int = 1,
    callbacks: SortCallbacks | None = None,
) -> Culling:
    """:func:`collect_features` then :func:`cull_features`."""
    if keep < 1:
        raise UsageError("--keep must be at least 1")
    return cull_features(collect_features(request, callbacks), options, keep=keep)


def _cached_facts(
    request: SortRequest, paths: list[Path], warn: Callable[[str], None]
) -> dict[Path, PhotoFacts]:
    """Hashes and capture times stored by an earlier run (features served from the cache)."""
    from imgrank.features.cache import FileKey
    from imgrank.sorter import _open_cache

    cache = _open_cache(request, warn)
    if cache is None:
        return {}
    keys: dict[str, Path] = {}
    try:
        for path in paths:
            try:
                keys[FileKey.of(path).path] = path
            except OSError:
                continue
        with cache:
            stored = cache.get_facts_many([FileKey.of(p) for p in keys.values()])
    except Exception as exc:  # noqa: BLE001 - a cache problem costs a re-read, not the run
        warn(f"cannot read photo hashes from the embedding cache: {exc}")
        return {}
    return {keys[path]: facts for path, facts in stored.items() if path in keys}


def _read_facts(
    paths: list[Path], max_pixels: int, workers: int | None
) -> tuple[dict[Path, PhotoFacts], list[SkippedFile]]:
    """Open photos only for their hash and capture time (a small, draft decode)."""
    from imgrank.features.stream import default_workers
    from imgrank.images.decode import open_image

    def read(path: Path) -> PhotoFacts:
        return photo_facts(open_image(path, min_side=FACTS_MIN_SIDE, max_pixels=max_pixels))

    found: dict[Path, PhotoFacts] = {}
    failed: list[SkippedFile] = []
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        for path, future in [(p, pool.submit(read, p)) for p in paths]:
            try:
                found[path] = future.result()
            except ImageDecodeError as exc:
                failed.append(SkippedFile(path, f"cannot be grouped: {exc.reason}"))
            except Exception as exc:  # noqa: BLE001 - one bad file must never stop the run
                failed.append(SkippedFile(path, f"cannot be grouped: {type(exc).__name__}: {exc}"))
    return found, failed


def _store_facts(
    request: SortRequest, found: dict[Path, PhotoFacts], warn: Callable[[str], None]
) -> None:
    """Keep freshly read hashes in the cache, so the next cull opens no photo."""
    from imgrank.features.cache import FileKey
    from imgrank.sorter import _open_cache

    if not found:
        return
    cache = _open_cache(request, warn)
    if cache is None:
        return
    try:
        with cache:
            for path, facts in found.items():
                try:
                    cache.put_facts(FileKey.of(path), facts)
                except OSError:
                    continue
    except Exception as exc:  # noqa: BLE001 - the hashes are re-read next time
        warn(f"cannot store photo hashes in the embedding cache: {exc}")
