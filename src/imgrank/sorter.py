"""The main job as a library call: folder + prompt -> :class:`imgrank.ranking.Ranking`.

The CLI's ``sort`` command parses options into a :class:`SortRequest`, calls
:func:`sort_folder` and hands the result to the writers. Keeping this here
(not in the CLI) lets tests, the report and other front ends reuse it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from imgrank.errors import NoImagesRankedError, UsageError
from imgrank.features.cache import EmbeddingCache
from imgrank.features.parquet import is_dataset
from imgrank.features.pipeline import (
    DEFAULT_BATCH_SIZE,
    FeatureListener,
    PipelineStats,
    score_images,
)
from imgrank.images.decode import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_PIXELS
from imgrank.images.raw import INSTALL_HINT, RAW_PAIR_MODES, pair_raw_files
from imgrank.images.sources import Source, is_uri
from imgrank.models.clip.config import DEFAULT_MODEL, DEFAULT_PRETRAINED
from imgrank.models.selection import ModelSelection
from imgrank.ranking import Ranking, SkippedFile, rank_scores, tied_paths

ENGINES = ("local", "ray")


@dataclass
class SortRequest:
    """Everything ``imgrank sort`` needs to know."""

    #: A folder, a single file, or a URI (``s3://``, ``file://``...) read through pyarrow.
    folder: Path | str
    prompt: str
    against: str | None = None
    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE
    workers: int | None = None
    recursive: bool = True
    include_hidden: bool = False
    exclude: list[Path] = field(default_factory=list)
    ascending: bool = False
    top: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Files above this many MiB are skipped with a reason (``--max-file-mb``).
    max_file_mb: int = DEFAULT_MAX_FILE_MB
    #: Embedding cache file (None: ``imgrank.paths.default_cache_db()``).
    cache: Path | None = None
    #: False (--no-cache): neither read nor write the embedding cache.
    use_cache: bool = True
    #: A ranking-adapter model folder: score with it instead of zero-shot CLIP.
    adapter: Path | None = None
    #: With an adapter, whether --model / --pretrained were given explicitly (otherwise
    #: the adapter's own backbone is used and ``model``/``pretrained`` are ignored).
    model_given: bool = False
    pretrained_given: bool = False
    #: ``auto``, ``torch``, ``onnx``, or None (= ``auto``): onnx when ``onnx`` is set, else
    #: the fastest correct path (imgrank.models.auto_export); see imgrank.models.selection.
    runtime: str | None = None
    #: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (torch); see imgrank.models.selection.
    precision: str | None = None
    #: A folder written by ``imgrank export``, for the onnx runtime.
    onnx: Path | None = None
    #: onnxruntime execution providers, comma-separated (None: CUDA if available, else CPU).
    providers: str | None = None
    #: ``pair``: a RAW with a same-stem JPEG twin is ranked once, through the twin;
    #: ``separate``: both are ranked as photos of their own (imgrank.images.raw).
    raw_pairs: str = "pair"
    #: ``--paths-from``: a text, CSV or Parquet file naming the photos (instead of ``folder``).
    paths_from: Path | None = None
    #: ``local`` (this process) or ``ray`` (Ray Data; see :mod:`imgrank.engines.ray`).
    engine: str = "local"
    #: The ray engine's encode actor pool (None: imgrank.engines.ray.RayOptions defaults).
    ray_actors: int | None = None
    ray_cpus_per_actor: float | None = None
    #: Keep only images scoring at least this (``--min-score``).
    min_score: float | None = None
    #: Example photos to rank by likeness to (``--like``), alone or with ``prompt``.
    like: list[Path] = field(default_factory=list)
    #: With both ``prompt`` and ``like``: how much the likeness counts (0 .. 1).
    like_weight: float = 0.5

    def selection(self, *, automatic: bool = True) -> ModelSelection:
        """The model part of the request, with only what the user gave (None: not given).

        Without a model folder or an export, ``model``/``pretrained`` always
        count (their defaults name the default backbone); with one, only when
        given explicitly, so the folder's own backbone applies otherwise.

        An unset runtime is ``auto`` (an automatic ONNX export may run the model,
        :mod:`imgrank.models.auto_export`) when ``automatic`` and the engine is
        local. Features that outlive the run in a dataset (``imgrank embed``, and
        sorting such a dataset) pass ``automatic=False``: they must be computed
        by the same runtime wherever the dataset is read. The ray engine's actors
        each load the model, and would each make the export on every node at once.
        """
        by_folder = self.adapter is not None or self.onnx is not None
        runtime = self.runtime
        if runtime is None and automatic and self.engine == "local":
            runtime = "auto"
        return ModelSelection(
            model=self.model if self.model_given or not by_folder else None,
            pretrained=self.pretrained if self.pretrained_given or not by_folder else None,
            adapter=self.adapter,
            runtime=runtime,
            onnx=self.onnx,
            providers=self.providers,
            device=self.device,
            precision=self.precision,
        )


@dataclass
class SortCallbacks:
    """Hooks for a front end: warnings, skipped files, and progress."""

    warn: Callable[[str], None] = lambda _message: None
    skip: Callable[[SkippedFile], None] = lambda _item: None
    #: Called once with the number of files found, before scoring starts.
    found: Callable[[int], None] = lambda _total: None
    #: Called with the number of files finished since the last call.
    advance: Callable[[int], None] = lambda _count: None
    #: News that is not a problem (a one-time automatic ONNX export being made).
    notice: Callable[[str], None] = lambda _message: None


def sort_folder(
    request: SortRequest,
    callbacks: SortCallbacks | None = None,
    *,
    on_features: FeatureListener | None = None,
) -> Ranking:
    """Find, score and order the images of a folder.

    ``on_features`` is told every scored image's embedding (and, when decoded in this
    run, its hash and capture time): ``imgrank cull`` groups with them.

    Raises:
        UsageError: the folder does not exist or the options are inconsistent.
        NoImagesRankedError: no image could be ranked.
        ModelError: the backbone cannot be loaded.
    """
    from imgrank.models.loading import load_model

    callbacks = callbacks or SortCallbacks()
    validate_request(request)
    resolved = request.selection().resolve()  # checks the model options before any work

    started = time.perf_counter()
    skipped: list[SkippedFile] = []

    def on_skip(item: SkippedFile) -> None:
        skipped.append(item)
        callbacks.skip(item)

    if request.paths_from is None and is_dataset(request.folder):
        return _rank_dataset(request, callbacks, started)
    skipped_outputs: list[Path] = []
    paths = list_inputs(request, on_skip, on_output_folder=skipped_outputs.append)
    raw_of: dict[Path, Path] = {}
    if not any(is_uri(path) for path in paths):  # RAW+JPEG pairs: local files only
        pairs = pair_raw_files(paths, mode=request.raw_pairs)  # type: ignore[arg-type]
        for raw in pairs.unreadable:  # listed once each, before any model is loaded
            on_skip(SkippedFile(raw, INSTALL_HINT))
        paths = list(pairs.photos)
        raw_of = pairs.raw_of
    if not paths:
        raise NoImagesRankedError(_nothing_found_message(request, skipped, skipped_outputs))
    if request.engine == "ray":
        from imgrank.engines.ray import rank_on_ray

        scored, scorer_name = rank_on_ray(request, paths, on_skip=on_skip, callbacks=callbacks)
        return _ranking(
            request, scored, skipped, scorer_name, started, from_cache=0, raw_of=raw_of,
            skipped_outputs=skipped_outputs, warn=callbacks.warn,
        )  # fmt: skip
    if any(is_uri(path) for path in paths):
        # The SQLite cache keys files by stat(); objects in a store have no such identity here.
        request = replace(request, use_cache=False)

    cache = _open_cache(request, callbacks.warn)
    try:
        model = load_model(resolved, warn=callbacks.warn, notice=callbacks.notice)
        _warn_untrained_prompt(request, callbacks.warn)
        # Every photo cached: score without building the image tower (and without
        # importing open_clip: 1.4 s of a 2.5 s re-sort). The cache also holds the
        # prompt's text features: a prompt used before runs no text tower.
        warm = cache is not None and model.fully_cached(paths, cache)  # type: ignore[arg-type]
        if not warm:
            model.prepare_image_encoder(paths, cache)  # type: ignore[arg-type]
        scorer = (
            model.scorer(request.prompt, request.against, images_cached=warm, cache=cache)
            if request.prompt.strip()
            else None  # --like alone: _with_likeness makes the scorer
        )
        if request.like:
            scorer = _with_likeness(request, model.image_encoder, scorer, cache, callbacks)
        callbacks.found(len(paths))
        stats = PipelineStats()
        scored = score_images(
            paths,  # type: ignore[arg-type]
            model.image_encoder,
            scorer,
            batch_size=request.batch_size,
            workers=request.workers,
            max_pixels=request.max_pixels,
            on_skip=on_skip,
            on_progress=callbacks.advance,
            cache=cache,
            on_warning=callbacks.warn,
            stats=stats,
            on_features=on_features,
        )
    finally:
        if cache is not None:
            cache.close()  # writes the features still buffered
    return _ranking(
        request, scored, skipped, scorer.name, started, from_cache=stats.cache_hits, raw_of=raw_of,
        skipped_outputs=skipped_outputs, warn=callbacks.warn,
    )  # fmt: skip


def validate_request(request: SortRequest) -> None:
    """Refuse inconsistent options before any work.

    Raises:
        UsageError: naming the option to change.
    """
    if not request.prompt.strip() and not request.like:
        raise UsageError(
            'give --by with a non-empty prompt (e.g. --by "image quality"), --like PHOTO, or both'
        )
    _check_like(request)
    if request.top is not None and request.top < 1:
        raise UsageError("--top must be at least 1")
    if request.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if request.workers is not None and request.workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {request.workers})")
    if request.cache is not None and not request.use_cache:
        raise UsageError("--cache and --no-cache contradict each other; give one of them")
    if request.raw_pairs not in RAW_PAIR_MODES:
        raise UsageError(
            f"--raw-pairs must be one of {', '.join(RAW_PAIR_MODES)}, not {request.raw_pairs!r}"
        )
    if request.engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, not {request.engine!r}")
    if request.engine == "ray" and request.cache is not None:
        raise UsageError(
            "--cache is the local engine's SQLite cache; with --engine ray store features "
            "once with `imgrank embed SRC --out DIR --engine ray` and sort DIR instead"
        )
    if request.ray_actors is not None and request.ray_actors < 1:
        raise UsageError("--ray-actors must be at least 1")
    if request.ray_cpus_per_actor is not None and request.ray_cpus_per_actor <= 0:
        raise UsageError("--ray-cpus-per-actor must be more than 0")


def list_inputs(
    request: SortRequest,
    on_skip: Callable[[SkippedFile], None],
    on_output_folder: Callable[[Path], None] | None = None,
) -> list[Source]:
    """The photos a request names: a folder's images, a URI's, or a ``--paths-from`` list.

    Raises:
        UsageError: the source does not exist or cannot be read.
    """
    from imgrank.images.sources import list_sources, missing_local_files, read_path_list

    if request.paths_from is not None:
        sources = read_path_list(request.paths_from)
        missing = dict(missing_local_files(sources))
        for source in sources:
            if source in missing:
                on_skip(SkippedFile(source, missing[source]))  # type: ignore[arg-type]
        return [source for source in sources if source not in missing]
    return list_sources(
        request.folder,
        recursive=request.recursive,
        include_hidden=request.include_hidden,
        exclude=request.exclude,
        on_skip=lambda path, reason: on_skip(SkippedFile(path, reason)),  # type: ignore[arg-type]
        on_output_folder=on_output_folder,
        max_file_mb=request.max_file_mb,
    )


def _ranking(
    request: SortRequest,
    scored: list[tuple[Source, float]],
    skipped: list[SkippedFile],
    scorer_name: str,
    started: float,
    *,
    from_cache: int,
    raw_of: dict[Path, Path] | None = None,
    skipped_outputs: list[Path] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Ranking:
    """Order the scores (the same on every engine) into the run's :class:`Ranking`."""
    if not scored:
        where = request.paths_from if request.paths_from is not None else request.folder
        raise NoImagesRankedError(
            f"none of the image files in {where} could be read "
            f"({len(skipped)} skipped; see the reasons above)"
        )
    if request.min_score is not None:
        kept = [(path, score) for path, score in scored if score >= request.min_score]
        if not kept:
            best = max(score for _path, score in scored)
            (warn or (lambda _message: None))(
                f"no image scored at least --min-score {request.min_score:g} "
                f"(the best scored {best:.4f}); the ranking is empty"
            )
        scored = kept
    tied = [path for path in tied_paths(scored) if not is_uri(path)]  # type: ignore[arg-type]
    if tied:  # ordered by the names they had before any imgrank rename: see rank_scores
        from imgrank.files.rename_plan import names_before_renames

        names = names_before_renames(tied)
    else:
        names = {}
    items = rank_scores(
        scored,  # type: ignore[arg-type]
        ascending=request.ascending,
        top=request.top,
        raw_of=raw_of,
        names=names,
    )
    return Ranking(
        items=items,
        skipped=skipped,
        prompt=request.prompt,
        scorer=scorer_name,
        seconds=time.perf_counter() - started,
        scored=len(scored),
        from_cache=from_cache,
        skipped_outputs=skipped_outputs or [],
    )


def _rank_dataset(request: SortRequest, callbacks: SortCallbacks, started: float) -> Ranking:
    """Rank from the stored features of a dataset written by ``imgrank embed``: nothing decoded.

    Raises:
        ModelError: the dataset was embedded with another backbone or preprocessing.
        UsageError: the scorer needs visual tokens the dataset does not store.
    """
    from imgrank.errors import ModelError
    from imgrank.features.parquet import iter_stored, read_info, shard_files
    from imgrank.features.stream import cache_fingerprint, describe_encoder

    folder = Path(request.folder)
    info = read_info(folder)
    from imgrank.models.loading import load_model

    model = load_model(request.selection(automatic=False), warn=callbacks.warn)
    encoder = model.image_encoder
    scorer = model.scorer(request.prompt, request.against)  # no image tower is built
    if cache_fingerprint(encoder) != info.fingerprint:
        raise ModelError(
            f"{folder} holds features of {info.model}, but this sort's model is "
            f"{describe_encoder(encoder)}: give the --model/--pretrained it was embedded with "
            "(or an adapter trained on that backbone), or embed the photos again"
        )
    if scorer.needs_tokens and not info.tokens:
        raise UsageError(
            f"{folder} stores pooled embeddings only and {scorer.name} reads visual tokens: "
            "embed again with --tokens"
        )
    shards = shard_files(folder)
    callbacks.found(_stored_rows(shards))
    scores: dict[str, float] = {}  # later shards win should a photo be stored twice
    if request.engine == "ray":
        from imgrank.engines.ray import rank_dataset_on_ray

        scored = rank_dataset_on_ray(
            request,
            shards,
            token_shape=info.token_shape,
            needs_tokens=scorer.needs_tokens,
            callbacks=callbacks,
        )
        scores.update(scored)
    else:
        for paths, features in iter_stored(
            folder,
            batch_size=request.batch_size,
            tokens=scorer.needs_tokens,
            token_shape=info.token_shape,
        ):
            values = np.asarray(scorer.score(features), dtype=np.float64).reshape(-1)
            scores.update(zip(paths, values.tolist(), strict=True))
            callbacks.advance(len(paths))
    ranked = [(path if is_uri(path) else Path(path), score) for path, score in scores.items()]
    return _ranking(request, ranked, [], scorer.name, started, from_cache=len(ranked))


def _stored_rows(shards: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(shard).metadata.num_rows for shard in shards)


def _warn_untrained_prompt(request: SortRequest, warn: Callable[[str], None]) -> None:
    """--adapter with a --by it was never trained on: a warning (adapters can generalise)."""
    if request.adapter is None or not request.prompt.strip():
        return
    from imgrank.models.adapter_scoring import untrained_prompt_warning
    from imgrank.models.checkpoints import load_model_folder

    message = untrained_prompt_warning(load_model_folder(request.adapter), request.prompt)
    if message is not None:
        warn(message)


def _check_like(request: SortRequest) -> None:
    """--like needs image files, a weight between 0 and 1, and the torch zero-shot path."""
    for example in request.like:
        if not example.is_file():
            raise UsageError(f"--like {example}: no such photo")
    if not 0.0 <= request.like_weight <= 1.0:
        raise UsageError(f"--like-weight must be between 0 and 1, not {request.like_weight:g}")
    if request.like and request.adapter is not None:
        raise UsageError("--like combines with zero-shot --by only, not with --adapter")
    if request.like and (request.runtime == "onnx" or request.onnx is not None):
        raise UsageError("--like needs the torch runtime (not --runtime onnx)")
    if request.like and request.paths_from is None and is_dataset(request.folder):
        raise UsageError("--like needs photos to compare, not a features dataset")
    if request.like and request.engine != "local":
        raise UsageError("--like runs on the local engine only (not --engine ray)")


def _with_likeness(
    request: SortRequest,
    encoder: Any,
    by: Any,
    cache: EmbeddingCache | None,
    callbacks: SortCallbacks,
) -> Any:
    """The scorer for --like: the examples' embeddings, from the run's own encoder and cache."""
    from imgrank.errors import ImgrankError
    from imgrank.models.scoring import SimilarityScorer, WeightedScorer
    from imgrank.training.encoding import encode_images

    examples = encode_images(
        list(dict.fromkeys(request.like)),
        encoder,  # type: ignore[arg-type]
        tokens=False,
        batch_size=request.batch_size,
        workers=request.workers,
        cache=cache,
    )
    if examples.failed:
        path, reason = next(iter(examples.failed.items()))
        raise ImgrankError(f"--like {path}: {reason}")
    like = SimilarityScorer(examples.pooled, [p.name for p in request.like])
    if by is None:
        return like
    return WeightedScorer(by, like, request.like_weight)


def _nothing_found_message(
    request: SortRequest, skipped: list[SkippedFile], skipped_outputs: list[Path]
) -> str:
    from imgrank.images.decode import missing_extra, supported_extensions

    if request.paths_from is not None:
        return (
            f"--paths-from {request.paths_from} names no file that exists "
            f"({len(skipped)} listed file(s) missing; see above)"
        )
    extensions = ", ".join(sorted(e.lstrip(".") for e in supported_extensions()))
    message = f"no image files found in {request.folder} (looked for {extensions}"
    if not request.recursive:
        message += "; sub-folders not scanned because of --no-recursive"
    if not request.include_hidden:
        message += "; hidden files skipped, --include-hidden to scan them"
    message += ")"
    if skipped:
        message += f"; {len(skipped)} file(s) could not be used (see above)"
    extras = sorted({extra for item in skipped if (extra := missing_extra(item.path))})
    if extras:
        installs = " ".join(f"'imgrank[{extra}]'" for extra in extras)
        message += f". To read them: pip install {installs}"
    if skipped_outputs:
        message += (
            f"; {len(skipped_outputs)} folder(s) written by imgrank --link/--copy not scanned"
        )
    return message


def _open_cache(request: SortRequest, warn: Callable[[str], None]) -> EmbeddingCache | None:
    """The run's embedding cache; None with --no-cache or when it cannot be opened.

    A cache that cannot be opened (read-only folder, a file from a newer
    imgrank) costs speed, not the run: the sort goes on without it.
    """
    if not request.use_cache:
        return None
    from imgrank.errors import CacheError
    from imgrank.features.cache import open_cache

    try:
        return open_cache(request.cache, on_warning=warn)
    except CacheError as exc:
        warn(f"{exc} Going on without the cache.")
        return None
