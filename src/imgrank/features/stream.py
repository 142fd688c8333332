"""The feature stream: files in, batches of image features out, through the cache.

:func:`iter_features` is the one way features leave a set of files. Sorting,
training, evaluation (and the engines and commands built on them) consume it;
what they do with the features is theirs. For one run, in order:

1. Every file is stat'ed and looked up in the embedding cache (when one is
   given) in chunks; hits are yielded straight from the stored features, so a
   re-sort of an unchanged folder decodes nothing and runs no image tower.
2. The misses are decoded in a thread pool (Pillow releases the GIL while it
   decodes and resizes) while the caller's thread runs the image tower on the
   previous batch. The number of images in flight is bounded, so memory does
   not grow with the size of the folder.
3. Each encoded batch is yielded and its features are queued for the cache,
   which commits every few hundred images.

Decoding is :func:`imgrank.images.decode.load_pixels` (JPEGs at reduced DCT
scale, see there); the image tower is whatever follows :class:`ImageEncoder`
(the torch backbone or an onnxruntime session), so this module never imports
torch. The pieces are public for engines that place them elsewhere (the Ray
engine decodes with :func:`~imgrank.images.decode.load_pixels` in CPU tasks and
calls ``encode_pixels`` in GPU actors): :func:`decode_batches` and
:func:`cache_fingerprint` are the same functions the local stream uses.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from imgrank.errors import CacheError, ImageDecodeError, ModelError
from imgrank.images.decode import DECODE_VERSION, DEFAULT_MAX_PIXELS, load_pixels_and_facts
from imgrank.images.facts import PhotoFacts
from imgrank.models.scoring import FeatureBatch
from imgrank.ranking import SkippedFile

if TYPE_CHECKING:
    from imgrank.features.cache import EmbeddingCache, FileKey
    from imgrank.models.clip.config import PreprocessConfig

DEFAULT_BATCH_SIZE = 32

#: Files stat'ed and looked up in the cache per query.
LOOKUP_CHUNK = 256

#: How much nicer than the model the decode threads are (Linux). The model's
#: OpenMP threads wait for each other at every operation, so a decode thread
#: preempting one of them stalls all; at a lower priority decoding fills the
#: model's idle moments instead (7 % faster on an idle 2-core machine).
DECODE_NICENESS = 5


class ImageEncoder(Protocol):
    """An image tower: the torch backbone's encoder or an ONNX session's.

    Optional extras the stream uses when present: ``description`` (a short
    text for ``imgrank cache info``) and ``provides_tokens`` (False when the
    encoder cannot output visual tokens, so the cache stores pooled embeddings only).
    """

    preprocess: PreprocessConfig

    @property
    def fingerprint(self) -> str:
        """Identifies the features produced (architecture, weights, preprocessing)."""
        ...

    def encode_pixels(self, pixels: np.ndarray, *, tokens: bool = False) -> FeatureBatch:
        """Features of normalised pixels (N, 3, S, S), as float32 numpy arrays."""
        ...


def default_workers() -> int:
    """Decode threads: one per core (decoding and the model share the machine)."""
    return max(1, os.cpu_count() or 1)


def _lower_decode_priority() -> None:
    """Thread-pool initializer: make this decode thread nicer than the model's threads."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere the priority call would apply to the whole process
    try:
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), current + DECODE_NICENESS)
    except OSError:
        pass  # not allowed here (a sandbox): decoding at normal priority still works


@dataclass
class PipelineStats:
    """Where a run's time went; filled in by :func:`iter_features` when passed.

    Attributes:
        cache_hits: images served from the cache.
        cache_misses: images that had to be decoded and encoded.
        skipped: files left out (unreadable, gone, not an image).
        lookup_seconds: wall time of stat calls and cache reads.
        decode_cpu_seconds: CPU time spent decoding, summed over the decode threads.
        wait_seconds: wall time the stream waited for decoded pixels
            (large means decoding, not the model, limits the run).
        encode_seconds: wall time in the image tower.
        score_seconds: wall time in the scorer (filled by sorting's consumer).
        store_seconds: wall time writing features to the cache.
    """

    cache_hits: int = 0
    cache_misses: int = 0
    skipped: int = 0
    lookup_seconds: float = 0.0
    decode_cpu_seconds: float = 0.0
    wait_seconds: float = 0.0
    encode_seconds: float = 0.0
    score_seconds: float = 0.0
    store_seconds: float = 0.0


@dataclass
class DecodedBatch:
    """Pixels of the images of one batch that decoded, in input order.

    ``indices`` are the positions of the images in the sequence given to
    :func:`decode_batches`.
    """

    paths: list[Path]
    #: (N, 3, S, S) float32 numpy, or a torch tensor on the device (decode_batches(device=...)).
    pixels: Any
    indices: list[int] = field(default_factory=list)
    #: Hash and capture time of each image, from the same decode (``with_facts``).
    facts: list[PhotoFacts | None] = field(default_factory=list)


@dataclass
class IndexedFeatures:
    """One batch of the feature stream.

    Attributes:
        indices: Positions, in the ``paths`` given to :func:`iter_features`, of the rows.
        features: Their features (``tokens`` only when the stream was asked for them).
        from_cache: True when the batch was read from the embedding cache.
        facts: Each row's perceptual hash and capture time, when the stream was asked
            for them and the batch was decoded in this run (None for cache hits).
    """

    indices: list[int]
    features: FeatureBatch
    from_cache: bool = False
    facts: list[PhotoFacts | None] | None = None

    def __len__(self) -> int:
        return len(self.indices)


def skip_reason(exc: Exception) -> str:
    """Why a file whose decode raised ``exc`` is skipped: the same words on every engine."""
    if isinstance(exc, ImageDecodeError):
        return exc.reason
    return f"unexpected error: {type(exc).__name__}: {exc}"


#: Name prefix of the decode threads.
DECODE_THREAD_PREFIX = "imgrank-decode"

_busy_lock = threading.Lock()
_busy_decodes = 0


def decodes_running() -> int:
    """How many files the decode threads of this process are decoding right now.

    The CLI asks after a Ctrl-C: Python would wait for them at exit.
    """
    return _busy_decodes


def _count_decode(delta: int) -> None:
    global _busy_decodes
    with _busy_lock:
        _busy_decodes += delta


def decode_batches(
    paths: Iterable[Path],
    preprocess: PreprocessConfig,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: bool = True,
    on_skip: Callable[[SkippedFile], None] | None = None,
    stats: PipelineStats | None = None,
    with_facts: bool = False,
    device: str | None = None,
    dtype: Any = None,
) -> Iterator[DecodedBatch]:
    """Decode images in a thread pool and yield them in input order, batch by batch.

    At most ``max(2 * batch_size, workers)`` images are decoded ahead of the
    consumer, so a folder of 100,000 photos needs no more memory than one of 100.
    The first batch holds only ``2 * workers`` images, so the model starts early.
    A file that cannot be used is reported through ``on_skip`` and left out.

    With ``device`` (a torch device, e.g. ``cuda``) the threads only read JPEG
    bytes and each batch is decoded on that device in ``dtype``, as a torch
    tensor there (:mod:`imgrank.images.gpu_decode`); other files are decoded
    in the threads on the CPU.
    """
    workers = workers or default_workers()
    in_flight_limit = max(2 * batch_size, workers)
    # The first batch is small so the model starts after a few decodes instead
    # of a whole batch's worth (about half a second of an idle model on 2 cores).
    wanted = max(1, min(batch_size, 2 * workers))

    def decode_with_facts(path: Path) -> tuple[np.ndarray, PhotoFacts | None]:
        _count_decode(+1)
        try:
            return load_pixels_and_facts(
                path, preprocess, draft=draft, max_pixels=max_pixels, facts=with_facts
            )
        finally:
            _count_decode(-1)

    def cpu_decode(path: Path) -> np.ndarray:
        return decode_with_facts(path)[0]

    if device is None:
        prepare: Callable[[Path], Any] = decode_with_facts
        assemble: Callable[[DecodedBatch], DecodedBatch] = _stack_on_cpu
    else:
        # The device decoder gives no facts (hashes, capture times): callers that
        # need them decode on the CPU (see iter_features).
        from functools import partial

        from imgrank.images import gpu_decode

        def prepare(path: Path) -> Any:
            return gpu_decode.prepare_for_device(path, cpu_decode, max_pixels), None

        assemble = partial(
            _assemble_on_device, preprocess=preprocess, device=device, dtype=dtype,
            cpu_decode=cpu_decode, on_skip=on_skip,
        )  # fmt: skip

    def decode(path: Path) -> tuple[Any, PhotoFacts | None, float]:
        started = time.thread_time()
        item, facts = prepare(path)
        return item, facts, time.thread_time() - started

    pending: deque[tuple[int, Path, Future[tuple[Any, PhotoFacts | None, float]]]] = deque()
    batch_indices: list[int] = []
    batch_paths: list[Path] = []
    batch_pixels: list[Any] = []
    batch_facts: list[PhotoFacts | None] = []
    source = enumerate(paths)
    # Not a `with` block: its exit waits for the decodes running, and one file can take
    # minutes (a huge TIFF, a sparse file with an image header). Ctrl-C must not wait.
    pool = ThreadPoolExecutor(
        max_workers=workers,
        thread_name_prefix=DECODE_THREAD_PREFIX,
        initializer=_lower_decode_priority,
    )
    finished = False

    def refill() -> None:
        while len(pending) < in_flight_limit:
            item = next(source, None)
            if item is None:
                return
            index, path = item
            pending.append((index, path, pool.submit(decode, path)))

    try:
        refill()
        while pending:
            index, path, future = pending.popleft()
            waited = time.perf_counter()
            try:
                pixels, facts, cpu_seconds = future.result()
            except Exception as exc:  # noqa: BLE001 - one bad file must never stop the run
                if on_skip is not None:
                    on_skip(SkippedFile(path, skip_reason(exc)))
            else:
                batch_indices.append(index)
                batch_paths.append(path)
                batch_pixels.append(pixels)
                batch_facts.append(facts)
                if stats is not None:
                    stats.decode_cpu_seconds += cpu_seconds
            if stats is not None:
                stats.wait_seconds += time.perf_counter() - waited
            refill()
            if len(batch_paths) == wanted:
                batch = assemble(
                    DecodedBatch(batch_paths, batch_pixels, batch_indices, batch_facts)
                )
                if batch.paths:
                    yield batch
                batch_indices, batch_paths, batch_pixels, batch_facts = [], [], [], []
                wanted = batch_size
        if batch_paths:
            batch = assemble(DecodedBatch(batch_paths, batch_pixels, batch_indices, batch_facts))
            if batch.paths:
                yield batch
        finished = True
    finally:
        # Interrupted (Ctrl-C, an error in the consumer): do not decode the rest, and
        # do not wait for the decodes still running (their results are dropped).
        for _index, _path, future in pending:
            future.cancel()
        pool.shutdown(wait=finished, cancel_futures=True)


def _stack_on_cpu(batch: DecodedBatch) -> DecodedBatch:
    batch.pixels = np.stack(batch.pixels)
    return batch


def _assemble_on_device(
    batch: DecodedBatch,
    *,
    preprocess: PreprocessConfig,
    device: str,
    dtype: Any,
    cpu_decode: Callable[[Path], np.ndarray],
    on_skip: Callable[[SkippedFile], None] | None,
) -> DecodedBatch:
    """Decode a batch's JPEG bytes on the device; files no decoder takes are skipped."""
    from imgrank.images.gpu_decode import device_batch

    pixels, kept, failures = device_batch(
        batch.pixels, preprocess, device=device, dtype=dtype, cpu_decode=cpu_decode
    )
    for position, reason in failures:
        if on_skip is not None:
            on_skip(SkippedFile(batch.paths[position], reason))
    return DecodedBatch(
        [batch.paths[i] for i in kept],
        pixels,
        [batch.indices[i] for i in kept],
        [batch.facts[i] for i in kept] if batch.facts else [],
    )


def device_decoding(encoder: ImageEncoder) -> tuple[str, Any] | None:
    """``(device, dtype)`` to decode on for an encoder that runs on CUDA, else None.

    A GPU decodes JPEGs (nvJPEG) far faster than the CPU threads could feed it;
    on the CPU the threads' draft decoding is the fast path.
    """
    device = getattr(encoder, "device", None)
    if isinstance(device, str) and device.startswith("cuda") and hasattr(encoder, "dtype"):
        return device, encoder.dtype
    return None


def cache_fingerprint(encoder: ImageEncoder) -> str:
    """The cache's model key: encoder fingerprint + preprocessing + decoding version."""
    parts = (encoder.fingerprint, encoder.preprocess.fingerprint(), DECODE_VERSION)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def describe_encoder(encoder: ImageEncoder) -> str:
    """A short human description of an encoder for ``imgrank cache info``."""
    explicit = getattr(encoder, "description", None)
    if isinstance(explicit, str) and explicit:
        base = explicit
    else:
        name = getattr(encoder, "name", None)
        pretrained = getattr(encoder, "pretrained", None)
        if isinstance(name, str):
            base = name + (f" / {pretrained}" if isinstance(pretrained, str) else "")
        else:
            base = type(encoder).__name__
    pp = encoder.preprocess
    return f"{base}, {pp.image_size}px {pp.resize_mode}"


class CacheSession:
    """One run's use of one cache for one encoder; turns cache failures into warnings.

    A cache that cannot be read or written (damaged mid-run, a full disk) must
    not fail a run that can go on without it: the first failure is reported
    and the rest of the run goes on uncached.
    """

    def __init__(
        self, cache: EmbeddingCache, encoder: ImageEncoder, warn: Callable[[str], None]
    ) -> None:
        self.cache: EmbeddingCache | None = cache
        self._warn = warn
        self.model_id = -1
        try:
            self.model_id = cache.model_id(cache_fingerprint(encoder), describe_encoder(encoder))
        except CacheError as exc:
            self._disable(exc)
        except Exception as exc:  # noqa: BLE001 - sqlite3 errors: the cache is unusable
            self._disable(CacheError(f"cannot use the embedding cache {cache.path}: {exc}"))

    @property
    def active(self) -> bool:
        return self.cache is not None

    def _disable(self, exc: Exception) -> None:
        self._warn(f"{exc}; going on without the cache for this run")
        self.cache = None

    def get_many(self, keys: list[FileKey], *, tokens: bool) -> dict[str, Any]:
        if self.cache is None or not keys:
            return {}
        try:
            return self.cache.get_many(self.model_id, keys, tokens=tokens)
        except Exception as exc:  # noqa: BLE001 - CacheError or sqlite3 errors alike
            self._disable(exc)
            return {}

    def put(self, key: FileKey, pooled: np.ndarray, tokens: np.ndarray | None) -> None:
        if self.cache is None:
            return
        try:
            self.cache.put(self.model_id, key, pooled, tokens)
        except Exception as exc:  # noqa: BLE001
            self._disable(exc)

    def put_facts(self, key: FileKey, facts: PhotoFacts) -> None:
        if self.cache is None:
            return
        try:
            self.cache.put_facts(key, facts)
        except Exception as exc:  # noqa: BLE001
            self._disable(exc)

    def flush(self) -> None:
        if self.cache is None:
            return
        try:
            self.cache.flush()
        except Exception as exc:  # noqa: BLE001
            self._disable(exc)


def all_cached(
    paths: Sequence[Path], encoder: ImageEncoder, cache: EmbeddingCache, *, tokens: bool = False
) -> bool:
    """Whether every file is in ``cache``, unchanged, for this encoder's features
    (with visual tokens when ``tokens``: adapters read them).

    Used before anything heavy is loaded: when it holds, a run can be served
    without building the image tower (see :meth:`RankingModel.scorer`'s
    ``images_cached``). Any problem (a vanished file, a cache error) answers
    False, and the normal stream then reports it.
    """
    from imgrank.features.cache import FileKey

    try:
        keys = [FileKey.of(path) for path in paths]
        model_id = cache.model_id(cache_fingerprint(encoder), describe_encoder(encoder))
        for start in range(0, len(keys), LOOKUP_CHUNK):
            chunk = keys[start : start + LOOKUP_CHUNK]
            if len(cache.get_many(model_id, chunk, tokens=tokens)) != len(chunk):
                return False
    except Exception:  # noqa: BLE001 - the stream itself reports what went wrong
        return False
    return True


def iter_features(
    paths: Sequence[Path],
    encoder: ImageEncoder,
    *,
    tokens: bool = False,
    cache: EmbeddingCache | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: bool = True,
    on_skip: Callable[[SkippedFile], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    stats: PipelineStats | None = None,
    facts: bool = False,
    decode_device: str | None = None,
) -> Iterator[IndexedFeatures]:
    """Yield the features of every usable file of ``paths``, batch by batch.

    Cache hits come first (in chunks, in input order), then the misses as the
    decode pool and the image tower produce them. Every index of ``paths``
    appears in exactly one batch or in one ``on_skip`` call.

    Args:
        paths: image files, in any order.
        encoder: the image tower (``RankingModel.image_encoder``). With a cache
            it only runs on misses, so a lazily built tower is never built
            when everything is cached.
        tokens: also yield visual tokens (adapters, training). Tokens are
            computed for the cache whenever the encoder has them, so a later
            adapter run is served from the cache too.
        cache: an open embedding cache, or None to compute everything. The
            caller closes it (closing writes what is still buffered).
        batch_size: images per forward pass (and per batch of cache hits).
        workers: decode threads (default: one per core).
        max_pixels: decompression-bomb guard.
        draft: decode JPEGs at reduced DCT scale (False: full decode, for reference runs).
        on_skip: called for each file left out, with the reason.
        on_warning: told about cache problems (the run goes on without it).
        stats: filled in with counts and timings when given.
        facts: also yield each decoded photo's perceptual hash and capture time
            (``imgrank cull``). They are computed from the same decode and stored in
            the cache whenever there is one, so culling after a sort decodes nothing.

    Close the generator (or exhaust it) to flush the cache writes of an
    interrupted run: ``with contextlib.closing(iter_features(...)) as stream``.
    """
    stats = stats if stats is not None else PipelineStats()
    warn = on_warning or (lambda _message: None)

    def skipped(item: SkippedFile) -> None:
        stats.skipped += 1
        if on_skip is not None:
            on_skip(item)

    session = CacheSession(cache, encoder, warn) if cache is not None else None
    keys: dict[int, FileKey] = {}
    misses: list[tuple[int, Path]] = []
    try:
        if session is not None and session.active:
            yield from _cache_hits(paths, session, tokens, keys, misses, skipped, stats, batch_size)
        else:
            misses = list(enumerate(paths))
        stats.cache_misses += len(misses)

        caching = session is not None and session.active
        want_tokens = tokens or (caching and getattr(encoder, "provides_tokens", True))
        miss_indices = [index for index, _path in misses]
        # On CUDA (or with decode_device, as tests force it) JPEGs are decoded on the device.
        # The device decoder gives no facts (hash, capture time): a caller that needs them
        # (cull) decodes on the CPU. The cache only keeps facts it is given, and a cull
        # reads the missing ones itself, so a cached GPU sort stays on the GPU decoder.
        # (Asked only when photos need encoding: the question builds a lazy torch tower.)
        on_device = None if facts or not misses else (
            device_decoding(encoder)
            if decode_device is None
            else (decode_device, getattr(encoder, "dtype", None))
        )
        with_facts = facts or (caching and on_device is None)
        for batch in decode_batches(
            [path for _index, path in misses],
            encoder.preprocess,
            batch_size=batch_size,
            workers=workers,
            max_pixels=max_pixels,
            draft=draft,
            on_skip=skipped,
            stats=stats,
            with_facts=with_facts,
            device=None if on_device is None else on_device[0],
            dtype=None if on_device is None else on_device[1],
        ):
            indices = [miss_indices[i] for i in batch.indices]
            started = time.perf_counter()
            try:
                features = encoder.encode_pixels(batch.pixels, tokens=want_tokens)
            except ModelError:
                if tokens or not want_tokens:
                    raise
                # The encoder cannot output visual tokens: cache pooled embeddings only.
                want_tokens = False
                features = encoder.encode_pixels(batch.pixels, tokens=False)
            stats.encode_seconds += time.perf_counter() - started
            yield IndexedFeatures(
                indices,
                features if tokens else FeatureBatch(pooled=features.pooled),
                facts=batch.facts if facts else None,
            )
            # Cached once the consumer took the batch: a consumer interrupted while
            # handling it (Ctrl-C in a scorer) leaves it for the next run to redo.
            if session is not None and session.active:
                started = time.perf_counter()
                for row, (index, path) in enumerate(zip(indices, batch.paths, strict=True)):
                    key = keys.get(index)
                    if key is None or _changed_since(path, key):
                        continue  # changed while it was read: do not cache what we cannot trust
                    session.put(
                        key,
                        features.pooled[row],
                        None if features.tokens is None else features.tokens[row],
                    )
                    found = batch.facts[row] if batch.facts else None
                    if found is not None:
                        session.put_facts(key, found)
                stats.store_seconds += time.perf_counter() - started
    finally:
        if session is not None:
            # Also on Ctrl-C: an interrupted run keeps what it finished.
            started = time.perf_counter()
            session.flush()
            stats.store_seconds += time.perf_counter() - started


def _cache_hits(
    paths: Sequence[Path],
    session: CacheSession,
    tokens: bool,
    keys: dict[int, FileKey],
    misses: list[tuple[int, Path]],
    skipped: Callable[[SkippedFile], None],
    stats: PipelineStats,
    batch_size: int,
) -> Iterator[IndexedFeatures]:
    """Stat every file, yield the cache hits, and collect the misses as ``(index, path)``."""
    from imgrank.features.cache import FileKey

    for start in range(0, len(paths), LOOKUP_CHUNK):
        started = time.perf_counter()
        chunk: list[tuple[int, Path, FileKey]] = []
        for index in range(start, min(start + LOOKUP_CHUNK, len(paths))):
            path = paths[index]
            try:
                key = FileKey.of(path)
            except FileNotFoundError:
                skipped(SkippedFile(path, "file disappeared before it could be read"))
                continue
            except OSError as exc:
                skipped(SkippedFile(path, f"cannot read: {exc.strerror or exc}"))
                continue
            keys[index] = key
            chunk.append((index, path, key))
        found = session.get_many([key for _i, _p, key in chunk], tokens=tokens)
        stats.lookup_seconds += time.perf_counter() - started
        hit_indices: list[int] = []
        pooled: list[np.ndarray] = []
        grids: list[np.ndarray] = []
        for index, path, key in chunk:
            features = found.get(key.path)
            if features is None or (tokens and features.tokens is None):
                misses.append((index, path))
                continue
            hit_indices.append(index)
            pooled.append(features.pooled)
            if tokens:
                grids.append(features.tokens)
        stats.cache_hits += len(hit_indices)
        # Yielded in model-sized batches: an adapter's memory grows with the batch.
        for first in range(0, len(hit_indices), batch_size):
            last = first + batch_size
            yield IndexedFeatures(
                hit_indices[first:last],
                FeatureBatch(
                    pooled=np.stack(pooled[first:last]),
                    tokens=np.stack(grids[first:last]) if tokens else None,
                ),
                from_cache=True,
            )


def _changed_since(path: Path, key: FileKey) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return True
    return not key.describes(info)
