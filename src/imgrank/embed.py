"""``imgrank embed`` as a library call: photos -> a features dataset (:mod:`imgrank.features.parquet`).

Re-running into an existing dataset embeds only the photos that are new or
changed (size or modification time) since they were stored; the rows of a
changed photo are replaced, rows of photos no longer listed are kept.
Both engines run the local engine's decode and the model's ``encode_pixels``:
the local engine through :func:`imgrank.features.stream.decode_batches`, the
ray engine through :func:`imgrank.engines.ray.embed_on_ray`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from imgrank.errors import ModelError, NoImagesRankedError, UsageError
from imgrank.features.parquet import (
    SHARD_ROWS,
    DatasetInfo,
    drop_rows,
    features_table,
    is_dataset,
    read_info,
    source_key,
    stored_keys,
    write_info,
    write_shard,
)
from imgrank.images.sources import Source, is_uri
from imgrank.ranking import SkippedFile
from imgrank.sorter import SortCallbacks, SortRequest, list_inputs


@dataclass
class EmbedResult:
    """What one ``embed`` run did."""

    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    model: str = ""


def check_destination(out: Path) -> None:
    """Refuse, before any work, a destination that is not a dataset and not empty.

    Raises:
        UsageError: ``out`` is a file, or a folder holding other files.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the dataset")
    if out.is_dir() and not is_dataset(out) and any(out.iterdir()):
        raise UsageError(
            f"--out {out} is a folder with other files and no _imgrank-features.json; "
            "give an empty or new folder, or a dataset written by imgrank embed"
        )


def embed(
    request: SortRequest,
    out: Path,
    *,
    tokens: bool = False,
    callbacks: SortCallbacks | None = None,
) -> EmbedResult:
    """Embed the photos a request names into the dataset ``out`` (created if needed).

    Raises:
        UsageError: bad source or destination, or a dataset of another model.
        NoImagesRankedError: nothing could be embedded and nothing was stored before.
        ModelError: the model cannot be loaded or cannot output tokens.
    """
    callbacks = callbacks or SortCallbacks()
    started = time.perf_counter()
    check_destination(out)
    existing = read_info(out) if is_dataset(out) else None
    if existing is not None and tokens and not existing.tokens:
        raise UsageError(
            f"{out} stores pooled embeddings only; embed with --tokens into a new folder"
        )
    want_tokens = tokens or (existing is not None and existing.tokens)
    result = EmbedResult()

    def on_skip(item: SkippedFile) -> None:
        result.skipped.append(item)
        callbacks.skip(item)

    sources = list_inputs(request, on_skip)
    from imgrank.models.loading import load_model

    model = load_model(request.selection(automatic=False), warn=callbacks.warn)
    encoder = model.image_encoder
    probe = _probe(encoder, want_tokens)
    info = DatasetInfo.for_encoder(encoder, probe[0], probe[1])
    result.model = info.model
    if existing is not None and existing.fingerprint != info.fingerprint:
        raise UsageError(
            f"{out} holds features of {existing.model}; this run uses {info.model}. "
            "Embed into a new folder, or pass the dataset's --model/--pretrained."
        )
    out.mkdir(parents=True, exist_ok=True)
    if existing is None:
        write_info(out, info)  # before any shard: a folder with shards always says what they are

    stored = stored_keys(out)
    todo: list[tuple[str, int, int]] = []
    for source in sources:
        key = source_key(source)
        if isinstance(key, str):
            on_skip(SkippedFile(source, key))  # type: ignore[arg-type]
        elif stored.get(key[0]) == (key[1], key[2]):
            result.unchanged += 1
        else:
            todo.append(key)
    changed = {path for path, _s, _m in todo if path in stored}
    if not todo:
        if not stored:
            raise NoImagesRankedError(f"no image could be embedded into {out} (see above)")
        result.seconds = time.perf_counter() - started
        return result

    todo_sources: list[Source] = [p if is_uri(p) else Path(p) for p, _s, _m in todo]
    sizes = np.asarray([s for _p, s, _m in todo], dtype=np.int64)
    mtimes = np.asarray([m for _p, _s, m in todo], dtype=np.int64)
    skipped_before = len(result.skipped)
    if request.engine == "ray":
        from imgrank.engines.ray import embed_on_ray

        result.shards = embed_on_ray(
            request,
            todo_sources,
            sizes,
            mtimes,
            out,
            preprocess=encoder.preprocess,
            embed_dim=info.embed_dim,
            token_shape=info.token_shape,
            on_skip=on_skip,
            callbacks=callbacks,
        )
    else:
        result.shards = _embed_locally(
            request, encoder, todo_sources, sizes, mtimes, out, want_tokens, on_skip, callbacks
        )
    failed = {str(item.path) for item in result.skipped[skipped_before:]}
    embedded = [path for path, _s, _m in todo if path not in failed]
    result.replaced = sum(1 for path in embedded if path in changed)
    result.added = len(embedded) - result.replaced
    # The new rows are in place: drop the old rows of the photos embedded again.
    drop_rows(out, {path for path in embedded if path in changed}, keep=set(result.shards))
    if not embedded and not stored:
        raise NoImagesRankedError(
            f"none of the {len(todo)} image files could be embedded into {out} (see above)"
        )
    result.seconds = time.perf_counter() - started
    return result


def _probe(encoder: object, tokens: bool) -> tuple[int, list[int] | None]:
    """The embedding size and token shape, from one blank image through the encoder."""
    preprocess = encoder.preprocess  # type: ignore[attr-defined]
    blank = np.zeros((1, 3, preprocess.image_size, preprocess.image_size), dtype=np.float32)
    features = encoder.encode_pixels(blank, tokens=tokens)  # type: ignore[attr-defined]
    if tokens and features.tokens is None:
        raise ModelError("this model cannot output visual tokens; embed without --tokens")
    shape = list(features.tokens.shape[1:]) if tokens else None
    return int(features.pooled.shape[1]), shape


def _embed_locally(
    request: SortRequest,
    encoder: object,
    sources: list[Source],
    sizes: np.ndarray,
    mtimes: np.ndarray,
    out: Path,
    tokens: bool,
    on_skip: Callable[[SkippedFile], None],
    callbacks: SortCallbacks,
) -> list[Path]:
    """The local engine: the pipeline's decode pool and the encoder, shards of SHARD_ROWS."""
    from imgrank.features.stream import decode_batches

    callbacks.found(len(sources))
    shards: list[Path] = []
    rows: list[int] = []
    pooled: list[np.ndarray] = []
    grids: list[np.ndarray] = []

    def flush() -> None:
        if not rows:
            return
        table = features_table(
            [str(sources[i]) for i in rows],
            sizes[rows],
            mtimes[rows],
            np.concatenate(pooled),
            np.concatenate(grids) if tokens else None,
        )
        shards.append(write_shard(out, table))
        rows.clear()
        pooled.clear()
        grids.clear()

    def skipped(item: SkippedFile) -> None:
        on_skip(item)
        callbacks.advance(1)

    for batch in decode_batches(
        sources,  # type: ignore[arg-type]
        encoder.preprocess,  # type: ignore[attr-defined]
        batch_size=request.batch_size,
        workers=request.workers,
        max_pixels=request.max_pixels,
        on_skip=skipped,
    ):
        features = encoder.encode_pixels(batch.pixels, tokens=tokens)  # type: ignore[attr-defined]
        rows.extend(batch.indices)
        pooled.append(features.pooled)
        if tokens:
            grids.append(features.tokens)
        callbacks.advance(len(batch.indices))
        if len(rows) >= SHARD_ROWS:
            flush()
    flush()
    return shards


def embed_request(request: SortRequest) -> SortRequest:
    """The request the loader needs for embedding: any prompt does, nothing is scored."""
    return replace(request, prompt=request.prompt or "image", use_cache=False, cache=None)
