"""The ray engine: the local engine's decode, encode and score functions as Ray Data stages.

A run is one Ray Data pipeline, streamed (blocks flow through every stage at
once, so memory does not grow with the number of photos):

1. **list** (driver): the same listing as the local engine
   (:func:`imgrank.sorter.list_inputs`); only ``(index, source)`` travels.
2. **decode** (CPU tasks): :func:`imgrank.images.decode.load_pixels`
   per file, the local engine's decode; a file that cannot be used becomes a
   row with its reason (:func:`imgrank.features.stream.skip_reason`, the
   local engine's words) instead of failing the job.
3. **encode + score** (an actor pool): each actor loads the model once
   (:func:`imgrank.models.loading.load_model`, the one loader) and
   runs ``encoder.encode_pixels`` and ``scorer.score`` on each batch. Actors
   take a GPU each where the cluster has GPUs, CPUs otherwise.
4. **order** (driver): scores are *gathered*, not sorted in Ray. Every
   ranking ends in one file written by the driver, so every row passes the
   driver anyway; the driver already holds the source list it made, so only
   ``(index, score, reason)`` comes back (16 bytes and a usually empty string
   per image: 160 MB for 10 million), and sorting 10 million floats takes
   about a second, far less than a distributed sort's shuffle. The order is
   then made by :func:`imgrank.ranking.rank_scores`, as on the local engine.

``ray`` is imported only inside these functions: the rest of imgrank never
imports it. Library calls never start Ray themselves (process-wide state);
the CLI calls :func:`connect` first, tests use one session fixture.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgrank.errors import ModelError, UsageError
from imgrank.images.sources import Source, is_uri
from imgrank.ranking import SkippedFile

if TYPE_CHECKING:
    import ray.data

    from imgrank.models.clip.config import PreprocessConfig
    from imgrank.sorter import SortCallbacks, SortRequest

#: Rows per input block: enough blocks for every decode CPU, few enough for Ray's bookkeeping.
MAX_BLOCK_ROWS = 1024
MIN_BLOCK_ROWS = 8
#: Bytes a decode task reserves: a 24 MP photo decodes to ~72 MB of RGB, plus a batch of inputs.
DECODE_MEMORY = 200 * 1024 * 1024


def require_ray() -> None:
    """Raise a clear error when the ``ray`` extra is not installed."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ModuleNotFoundError:
        raise UsageError("--engine ray needs Ray Data: pip install 'imgrank[ray]'") from None


def connect(address: str | None = None, *, quiet: bool = True) -> None:
    """Start Ray on this machine (``address`` None) or join a cluster (``auto``, ``HOST:PORT``).

    For the CLI (it changes process-wide state): silences Ray's own progress
    bars and log lines, since imgrank shows its own progress.

    Raises:
        UsageError: ray is not installed or the cluster cannot be reached.
    """
    require_ray()
    import logging

    import ray
    import ray.data

    if not ray.is_initialized():
        try:
            ray.init(
                # "local": a new instance here, never one a `ray start` left behind
                address=address or "local",
                include_dashboard=False,
                log_to_driver=not quiet,
                logging_level=logging.ERROR if quiet else logging.INFO,
            )
        except (ConnectionError, ValueError, RuntimeError) as exc:
            where = address or "this machine"
            raise UsageError(f"cannot start or join Ray at {where}: {exc}") from None
    quiet_data_context()
    if quiet:
        # "progress bars disabled" and per-dataset "execution finished" lines.
        logging.getLogger("ray.data").setLevel(logging.ERROR)


def quiet_data_context() -> None:
    """No Ray Data progress bars (imgrank draws its own); keep rows in order where cheap."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


#: On a cluster without GPUs, the share of its CPUs the encode actors reserve; decode tasks
#: get the rest. A ViT-B-32 encode costs about 4x a 12 MP decode (docs/distributed.md).
ENCODE_CPU_SHARE = 2 / 3


@dataclass
class RayOptions:
    """Sizes of the ray engine's stages.

    Attributes:
        actors: encode actors (None: one per GPU; without GPUs, as many as fit in
            :data:`ENCODE_CPU_SHARE` of the cluster's CPUs, at least 1).
        cpus_per_actor: CPUs reserved by each encode actor, also its torch threads
            (None: 1 with GPUs, else ``min(4, cluster CPUs // 2)``, at least 1).
        gpus_per_actor: None: 1 where the cluster has GPUs, else 0.
        batch_size: images per encode call.
    """

    actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    batch_size: int = 32

    def resolved(self) -> RayOptions:
        """The options with the cluster's defaults filled in.

        Raises:
            UsageError: the encode actors would leave no CPU for decoding (Ray would wait forever).
        """
        import ray

        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        cpus = float(resources.get("CPU", 1))
        gpus_per_actor = self.gpus_per_actor
        if gpus_per_actor is None:
            gpus_per_actor = 1.0 if gpus else 0.0
        cpus_per_actor = self.cpus_per_actor
        if cpus_per_actor is None:
            cpus_per_actor = 1.0 if gpus_per_actor else float(max(1, min(4, int(cpus) // 2)))
        actors = self.actors
        if actors is None:
            if gpus_per_actor:
                actors = max(1, int(gpus // gpus_per_actor))
            else:
                actors = max(1, int(cpus * ENCODE_CPU_SHARE // cpus_per_actor))
        if actors * cpus_per_actor > cpus - 1:
            raise UsageError(
                f"{actors} encode actor(s) of {cpus_per_actor:g} CPU(s) leave no CPU of the "
                f"cluster's {cpus:g} for decoding; lower --ray-actors or --ray-cpus-per-actor"
            )
        return RayOptions(actors, cpus_per_actor, gpus_per_actor, self.batch_size)


@dataclass
class RayRunStats:
    """What a ray run did, for tests and the benchmark.

    Attributes:
        encode_nodes: images encoded per Ray node id.
        options: the stage sizes used.
    """

    encode_nodes: dict[str, int] = field(default_factory=dict)
    options: RayOptions | None = None


# --- stage 1: inputs --------------------------------------------------------------------------


def _encode_source(source: Source) -> bytes:
    # Bytes, not strings: a file name that is not UTF-8 must survive Arrow unchanged.
    return os.fsencode(str(source))


def _decode_source(raw: bytes) -> Source:
    text = os.fsdecode(bytes(raw))
    return text if is_uri(text) else Path(text)


def input_dataset(
    sources: list[Source], *, parallelism: int, extra: dict[str, np.ndarray] | None = None
) -> ray.data.Dataset:
    """The inputs as a dataset of ``index`` and ``source`` (bytes) in enough blocks to spread."""
    import pyarrow as pa
    import ray.data

    count = len(sources)
    rows = max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, -(-count // max(1, 4 * parallelism))))
    columns: dict[str, Any] = {
        "index": pa.array(np.arange(count, dtype=np.int64)),
        "source": pa.array([_encode_source(s) for s in sources], type=pa.binary()),
    }
    for name, values in (extra or {}).items():
        columns[name] = pa.array(values)
    table = pa.table(columns)
    blocks = [table.slice(start, rows) for start in range(0, count, rows)]
    return ray.data.from_arrow(blocks)


# --- stage 2: decode (CPU tasks) --------------------------------------------------------------


def decode_stage(
    batch: dict[str, np.ndarray], *, preprocess: PreprocessConfig, max_pixels: int
) -> dict[str, np.ndarray]:
    """Decode a batch of files with the local engine's decode; failures keep their reason."""
    from imgrank.features.stream import skip_reason
    from imgrank.images.decode import load_pixels

    count = len(batch["index"])
    size = preprocess.image_size
    pixels = np.zeros((count, 3, size, size), dtype=np.float32)
    reasons = np.full(count, "", dtype=object)
    for row, raw in enumerate(batch["source"]):
        try:
            pixels[row] = load_pixels(_decode_source(raw), preprocess, max_pixels=max_pixels)
        except Exception as exc:  # noqa: BLE001 - one bad file must never fail the job
            reasons[row] = skip_reason(exc) or "unreadable"
    out = {key: value for key, value in batch.items() if key != "source"}
    out.update({"source": batch["source"], "pixels": pixels, "reason": reasons})
    return out


# --- stage 3: encode + score (actor pool) -----------------------------------------------------


def _set_threads(cpus: float) -> None:
    """An actor's torch threads: the CPUs Ray reserved for it, not every core of the node."""
    try:
        import torch
    except ModuleNotFoundError:
        return
    torch.set_num_threads(max(1, int(cpus)))


class EncodeActor:
    """One model per actor, loaded once with the local loader; scores or features per batch."""

    def __init__(
        self,
        request: SortRequest,
        cpus: float,
        features: bool,
        tokens: bool,
        shapes: tuple[int, list[int] | None] | None = None,
    ) -> None:
        import ray

        from imgrank.models.loading import load_model

        _set_threads(cpus)
        model = load_model(request.selection())
        self.encoder, self.scorer = model.image_encoder, model.scorer(request.prompt, request.against)
        self.node = ray.get_runtime_context().get_node_id()
        self.features = features
        self.tokens = tokens
        #: (embedding size, token shape): every batch has the same columns, even one
        #: whose photos all failed to decode.
        self.shapes = shapes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from imgrank.models.scoring import FeatureBatch

        ok = np.asarray([not reason for reason in batch["reason"]], dtype=bool)
        count = len(ok)
        out = {key: value for key, value in batch.items() if key != "pixels"}
        out["node"] = np.full(count, self.node, dtype=object)
        if self.features:
            return self._features(batch, ok, out)
        del out["source"]  # the driver holds the sources; only index, score, reason go back
        scores = np.full(count, np.nan, dtype=np.float64)
        if ok.any():
            needs_tokens = self.scorer.needs_tokens
            encoded = self.encoder.encode_pixels(batch["pixels"][ok], tokens=needs_tokens)
            if not needs_tokens:
                encoded = FeatureBatch(pooled=encoded.pooled)
            result = np.asarray(self.scorer.score(encoded), dtype=np.float64).reshape(-1)
            if result.shape[0] != int(ok.sum()):
                raise ModelError(
                    f"the scorer returned {result.shape[0]} scores for {int(ok.sum())} images"
                )
            scores[ok] = result
        out["score"] = scores
        return out

    def _features(
        self, batch: dict[str, np.ndarray], ok: np.ndarray, out: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Pooled embeddings (and tokens) of the rows that decoded; failed rows keep zeros."""
        assert self.shapes is not None
        embed_dim, token_shape = self.shapes
        count = len(ok)
        pooled = np.zeros((count, embed_dim), dtype=np.float32)
        tokens = np.zeros((count, *(token_shape or [])), dtype=np.float32) if self.tokens else None
        if ok.any():
            encoded = self.encoder.encode_pixels(batch["pixels"][ok], tokens=self.tokens)
            pooled[ok] = encoded.pooled
            if tokens is not None:
                if encoded.tokens is None:
                    raise ModelError("this model cannot output visual tokens; embed without --tokens")
                tokens[ok] = encoded.tokens
        out["pooled"] = pooled
        if tokens is not None:
            out["tokens"] = tokens
        out["ok"] = ok
        return out


def encoded_dataset(
    request: SortRequest,
    sources: list[Source],
    options: RayOptions,
    *,
    preprocess: PreprocessConfig,
    features: bool = False,
    tokens: bool = False,
    extra: dict[str, np.ndarray] | None = None,
    shapes: tuple[int, list[int] | None] | None = None,
) -> ray.data.Dataset:
    """Stages 1-3 as one lazy dataset: rows of index, source, reason, node and score or features."""
    import ray
    import ray.data

    cpus = float(ray.cluster_resources().get("CPU", 1))
    dataset = input_dataset(sources, parallelism=int(cpus), extra=extra)
    dataset = dataset.map_batches(
        decode_stage,
        fn_kwargs={"preprocess": preprocess, "max_pixels": request.max_pixels},
        batch_size=options.batch_size,
        num_cpus=1,
        # A memory reservation for a camera-sized decode. Being an argument the encode actors
        # do not share, it also keeps Ray Data from fusing decoding into the actors, where
        # it would run serially between forward passes instead of in parallel tasks.
        memory=DECODE_MEMORY,
    )
    assert options.actors is not None and options.cpus_per_actor is not None
    return dataset.map_batches(
        EncodeActor,
        fn_constructor_kwargs={
            "request": request,
            "cpus": options.cpus_per_actor,
            "features": features,
            "tokens": tokens,
            "shapes": shapes,
        },
        batch_size=options.batch_size,
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor or None,
    )


def ray_options(request: SortRequest) -> RayOptions:
    """The request's stage sizes, with the cluster's defaults filled in."""
    return RayOptions(
        actors=request.ray_actors,
        cpus_per_actor=request.ray_cpus_per_actor,
        batch_size=request.batch_size,
    ).resolved()


def _require_session() -> None:
    require_ray()
    import ray

    if not ray.is_initialized():
        raise UsageError("Ray is not started: call imgrank.engines.ray.connect() first")


def _worker_request(request: SortRequest) -> SortRequest:
    """The request as actors load it: device ``auto`` means the GPU Ray gave the actor, if any."""
    from dataclasses import replace

    return replace(request, exclude=[], use_cache=False, cache=None)


# --- the sort ---------------------------------------------------------------------------------


def rank_on_ray(
    request: SortRequest,
    sources: list[Source],
    *,
    on_skip: Callable[[SkippedFile], None],
    callbacks: SortCallbacks,
    stats: RayRunStats | None = None,
) -> tuple[list[tuple[Source, float]], str]:
    """Score ``sources`` on the Ray cluster this process is connected to.

    Returns:
        ``(source, score)`` of every image scored, in input order, and the scorer's name.
        Skipped files go to ``on_skip`` in input order, with the local engine's reasons.
    """
    from imgrank.models.loading import load_model

    _require_session()
    stats = stats if stats is not None else RayRunStats()
    # The driver loads the model too (lazily: no image tower) for the preprocessing and
    # the scorer's name, and so a broken model fails here, before any cluster work.
    model = load_model(request.selection(), warn=callbacks.warn)
    encoder, scorer = model.image_encoder, model.scorer(request.prompt, request.against)
    options = ray_options(request)
    stats.options = options
    callbacks.found(len(sources))
    dataset = encoded_dataset(
        _worker_request(request), sources, options, preprocess=encoder.preprocess
    )
    scores = np.full(len(sources), np.nan, dtype=np.float64)
    reasons: dict[int, str] = {}
    for batch in _batches(dataset):
        for index, score, reason, node in zip(
            batch["index"], batch["score"], batch["reason"], batch["node"], strict=True
        ):
            if reason:
                reasons[int(index)] = str(reason)
            else:
                scores[int(index)] = float(score)
                stats.encode_nodes[str(node)] = stats.encode_nodes.get(str(node), 0) + 1
        callbacks.advance(len(batch["index"]))
    for index in sorted(reasons):  # input order, as the local engine reports them
        on_skip(SkippedFile(sources[index], reasons[index]))  # type: ignore[arg-type]
    scored = [(sources[i], float(scores[i])) for i in range(len(sources)) if i not in reasons]
    return scored, scorer.name


def _batches(dataset: ray.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
    """Stream a dataset's rows back to the driver, batch by batch, dropping the bulky columns."""
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy")


# --- embed: features into Parquet shards ------------------------------------------------------


def write_stage(batch: dict[str, np.ndarray], *, folder: str) -> dict[str, np.ndarray]:
    """Write the rows that decoded as one new shard of the dataset in ``folder``."""
    from imgrank.features.parquet import features_table, write_shard

    ok = np.asarray(batch["ok"], dtype=bool)
    shard = ""
    if ok.any():
        table = features_table(
            [os.fsdecode(bytes(raw)) for raw, good in zip(batch["source"], ok, strict=True) if good],
            batch["size"][ok],
            batch["mtime_ns"][ok],
            batch["pooled"][ok],
            batch["tokens"][ok] if "tokens" in batch else None,
        )
        shard = write_shard(Path(folder), table).name
    count = len(ok)
    return {
        "index": batch["index"],
        "reason": batch["reason"],
        "node": batch["node"],
        "shard": np.full(count, shard, dtype=object),
    }


def embed_on_ray(
    request: SortRequest,
    sources: list[Source],
    sizes: np.ndarray,
    mtimes_ns: np.ndarray,
    folder: Path,
    *,
    preprocess: PreprocessConfig,
    embed_dim: int,
    token_shape: list[int] | None,
    on_skip: Callable[[SkippedFile], None],
    callbacks: SortCallbacks,
    stats: RayRunStats | None = None,
) -> list[Path]:
    """Embed ``sources`` on the cluster into new shards of ``folder``; returns the shards written.

    The shards are written by the cluster's workers, so ``folder`` must be
    storage every node writes under the same name (a shared file system).
    """
    from imgrank.features.parquet import SHARD_ROWS

    _require_session()
    stats = stats if stats is not None else RayRunStats()
    options = ray_options(request)
    stats.options = options
    callbacks.found(len(sources))
    dataset = encoded_dataset(
        _worker_request(request),
        sources,
        options,
        preprocess=preprocess,
        features=True,
        tokens=token_shape is not None,
        extra={"size": sizes, "mtime_ns": mtimes_ns},
        shapes=(embed_dim, token_shape),
    )
    dataset = dataset.map_batches(
        write_stage, fn_kwargs={"folder": str(folder)}, batch_size=SHARD_ROWS, num_cpus=1
    )
    reasons: dict[int, str] = {}
    shards: set[str] = set()
    for batch in _batches(dataset):
        for index, reason, node, shard in zip(
            batch["index"], batch["reason"], batch["node"], batch["shard"], strict=True
        ):
            if reason:
                reasons[int(index)] = str(reason)
            else:
                stats.encode_nodes[str(node)] = stats.encode_nodes.get(str(node), 0) + 1
            if shard:
                shards.add(str(shard))
        callbacks.advance(len(batch["index"]))
    for index in sorted(reasons):
        on_skip(SkippedFile(sources[index], reasons[index]))  # type: ignore[arg-type]
    return [folder / name for name in sorted(shards)]


# --- sort a features dataset ------------------------------------------------------------------


class ScoreActor:
    """Scores stored features: the local loader's scorer, no image tower ever built."""

    def __init__(self, request: SortRequest, cpus: float, token_shape: list[int] | None) -> None:
        from imgrank.models.loading import load_model

        _set_threads(cpus)
        self.scorer = load_model(request.selection()).scorer(request.prompt, request.against)
        self.token_shape = token_shape

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from imgrank.features.parquet import batch_features
        from imgrank.models.scoring import FeatureBatch

        features = batch_features(batch, self.token_shape)
        if not self.scorer.needs_tokens:
            features = FeatureBatch(pooled=features.pooled)
        scores = np.asarray(self.scorer.score(features), dtype=np.float64).reshape(-1)
        return {"path": batch["path"], "score": scores}


def rank_dataset_on_ray(
    request: SortRequest,
    shards: list[Path],
    *,
    token_shape: list[int] | None,
    needs_tokens: bool,
    callbacks: SortCallbacks,
) -> list[tuple[str, float]]:
    """``(stored path, score)`` of every photo of a dataset's shards, scored on the cluster."""
    _require_session()
    import ray.data

    options = ray_options(request)
    columns = ["path", "pooled", *(["tokens"] if needs_tokens else [])]
    dataset = ray.data.read_parquet([str(s) for s in shards]).select_columns(columns)
    dataset = dataset.map_batches(
        ScoreActor,
        fn_constructor_kwargs={
            "request": _worker_request(request),
            "cpus": options.cpus_per_actor,
            "token_shape": token_shape if needs_tokens else None,
        },
        batch_size=options.batch_size,
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor or None,
    )
    scored: list[tuple[str, float]] = []
    for batch in _batches(dataset):
        scored.extend(zip((str(p) for p in batch["path"]), batch["score"].tolist(), strict=True))
        callbacks.advance(len(batch["path"]))
    return scored
