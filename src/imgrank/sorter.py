"""The main job as a library call: folder + prompt -> :class:`imgrank.ranking.Ranking`.

The CLI's ``sort`` command parses options into a :class:`SortRequest`, calls
:func:`sort_folder` and hands the result to the writers. Keeping this here
(not in the CLI) lets tests, the report and other front ends reuse it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imgrank.errors import NoImagesRankedError, UsageError
from imgrank.features.cache import EmbeddingCache
from imgrank.features.pipeline import DEFAULT_BATCH_SIZE, ImageEncoder, PipelineStats, score_images
from imgrank.images.decode import DEFAULT_MAX_PIXELS, find_images
from imgrank.images.raw import INSTALL_HINT, RAW_PAIR_MODES, pair_raw_files
from imgrank.models.backbone import DEFAULT_MODEL, DEFAULT_PRETRAINED, BackboneSpec
from imgrank.models.scoring import Scorer
from imgrank.ranking import Ranking, SkippedFile, rank_scores


@dataclass
class SortRequest:
    """Everything ``imgrank sort`` needs to know."""

    folder: Path
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
    #: ``torch``, ``onnx``, or None: onnx when ``onnx`` is set (imgrank.models.onnx_runtime.wants_onnx).
    runtime: str | None = None
    #: A folder written by ``imgrank export``, for the onnx runtime.
    onnx: Path | None = None
    #: onnxruntime execution providers, comma-separated (None: CUDA if available, else CPU).
    providers: str | None = None
    #: ``pair``: a RAW with a same-stem JPEG twin is ranked once, through the twin;
    #: ``separate``: both are ranked as photos of their own (imgrank.images.raw).
    raw_pairs: str = "pair"


@dataclass
class SortCallbacks:
    """Hooks for a front end: warnings, skipped files, and progress."""

    warn: Callable[[str], None] = lambda _message: None
    skip: Callable[[SkippedFile], None] = lambda _item: None
    #: Called once with the number of files found, before scoring starts.
    found: Callable[[int], None] = lambda _total: None
    #: Called with the number of files finished since the last call.
    advance: Callable[[int], None] = lambda _count: None


def sort_folder(request: SortRequest, callbacks: SortCallbacks | None = None) -> Ranking:
    """Find, score and order the images of a folder.

    Raises:
        UsageError: the folder does not exist or the options are inconsistent.
        NoImagesRankedError: no image could be ranked.
        ModelError: the backbone cannot be loaded.
    """
    from imgrank.models.onnx_runtime import wants_onnx

    callbacks = callbacks or SortCallbacks()
    if not request.prompt.strip():
        raise UsageError("--by needs a non-empty prompt, e.g. --by \"image quality\"")
    if not request.folder.exists():
        raise UsageError(f"{request.folder} does not exist")
    if request.top is not None and request.top < 1:
        raise UsageError("--top must be at least 1")
    if request.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if request.cache is not None and not request.use_cache:
        raise UsageError("--cache and --no-cache contradict each other; give one of them")
    if request.raw_pairs not in RAW_PAIR_MODES:
        raise UsageError(f"--raw-pairs must be one of {', '.join(RAW_PAIR_MODES)}, not {request.raw_pairs!r}")
    use_onnx = wants_onnx(request)  # checks the runtime options before any work

    started = time.perf_counter()
    skipped: list[SkippedFile] = []

    def on_skip(item: SkippedFile) -> None:
        skipped.append(item)
        callbacks.skip(item)

    paths = find_images(
        request.folder,
        recursive=request.recursive,
        include_hidden=request.include_hidden,
        exclude=request.exclude,
        on_skip=lambda path, reason: on_skip(SkippedFile(path, reason)),
    )
    pairs = pair_raw_files(paths, mode=request.raw_pairs)
    for raw in pairs.unreadable:  # listed once each, before any model is loaded
        on_skip(SkippedFile(raw, INSTALL_HINT))
    paths = pairs.photos
    if not paths:
        raise NoImagesRankedError(_nothing_found_message(request, skipped))

    scorer: Scorer
    encoder: ImageEncoder
    cache = _open_cache(request, callbacks.warn)
    try:
        encoder, scorer = _encoder_and_scorer(request, use_onnx, paths, cache, callbacks)
        callbacks.found(len(paths))
        stats = PipelineStats()
        scored = score_images(
            paths,
            encoder,
            scorer,
            batch_size=request.batch_size,
            workers=request.workers,
            max_pixels=request.max_pixels,
            on_skip=on_skip,
            on_progress=callbacks.advance,
            cache=cache,
            on_warning=callbacks.warn,
            stats=stats,
        )
    finally:
        if cache is not None:
            cache.close()  # writes the features still buffered
    if not scored:
        raise NoImagesRankedError(
            f"none of the {len(paths)} image files in {request.folder} could be read "
            f"({len(skipped)} skipped; see the reasons above)"
        )
    items = rank_scores(
        scored, ascending=request.ascending, top=request.top, raw_of=pairs.raw_of
    )
    return Ranking(
        items=items,
        skipped=skipped,
        prompt=request.prompt,
        scorer=scorer.name,
        seconds=time.perf_counter() - started,
        scored=len(scored),
        from_cache=stats.cache_hits,
    )


def _encoder_and_scorer(
    request: SortRequest,
    use_onnx: bool,
    paths: list[Path],
    cache: EmbeddingCache | None,
    callbacks: SortCallbacks,
) -> tuple[ImageEncoder, Scorer]:
    """The image encoder and scorer a request asks for, built as cheaply as possible."""
    from imgrank.models.backbone import load_backbone
    from imgrank.models.onnx_runtime import onnx_sort_setup
    from imgrank.models.scoring import ZeroShotScorer

    encoder: ImageEncoder
    scorer: Scorer
    if use_onnx:
        # onnxruntime end to end: nothing on this path imports torch.
        encoder, scorer = onnx_sort_setup(request, warn=callbacks.warn)
    elif request.adapter is not None:
        from imgrank.models.adapter_scoring import load_adapter_scoring

        if request.against is not None:
            raise UsageError("--against is for zero-shot scoring; an adapter reads --by as it is")
        backbone, scorer = load_adapter_scoring(
            request.adapter,
            request.prompt,
            model=request.model if request.model_given else None,
            pretrained=request.pretrained if request.pretrained_given else None,
            device=request.device,
            warn=callbacks.warn,
        )
        encoder = backbone
    else:
        spec = BackboneSpec(model=request.model, pretrained=request.pretrained)
        if cache is not None:
            # Every photo cached: encode the prompt without importing open_clip (1.4 s of a
            # 2.5 s re-sort); see imgrank.models.text_only.
            from imgrank.models.text_only import warm_zero_shot

            warm = warm_zero_shot(
                spec,
                request.prompt,
                request.against,
                paths,
                cache,
                device=request.device,
                warn=callbacks.warn,
            )
            if warm is not None:
                return warm
        backbone = load_backbone(
            spec,
            device=request.device,
            warn=callbacks.warn,
            # Built on first use: a re-sort served from the cache needs no image tower.
            lazy_image_tower=True,
        )
        scorer = ZeroShotScorer.for_backbone(backbone, request.prompt, request.against)
        encoder = backbone
    return encoder, scorer


def _nothing_found_message(request: SortRequest, skipped: list[SkippedFile]) -> str:
    from imgrank.images.decode import supported_extensions

    extensions = ", ".join(sorted(e.lstrip(".") for e in supported_extensions()))
    message = f"no image files found in {request.folder} (looked for {extensions}"
    if not request.recursive:
        message += "; sub-folders not scanned because of --no-recursive"
    if not request.include_hidden:
        message += "; hidden files skipped, --include-hidden to scan them"
    message += ")"
    if skipped:
        message += f"; {len(skipped)} file(s) could not be used (see above)"
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
