"""A model ready to rank: what :func:`imgrank.models.loading.load_model` returns.

A :class:`RankingModel` bundles an image encoder (for the feature stream), a
text encoder, an optional head (a ranking adapter, or a linear/MLP head, as a
torch module or an onnxruntime session behind one callable), the
preprocessing and the cache fingerprint. :meth:`RankingModel.scorer` turns a
prompt into a :class:`~imgrank.models.scoring.Scorer`, whatever the kind of
model and the runtime:

==============  ===========================================  ==============================
kind            scores                                       reads
==============  ===========================================  ==============================
``zero-shot``   CLIP similarity to an antonym pair           pooled embedding, prompt
``adapter``     the ranking-aware adapter's regression head  visual tokens, prompt tokens
``linear-head`` ``head(normalize(pooled))`` (LAION format)   pooled embedding only
``mlp-head``    the same with the improved predictor's MLP   pooled embedding only
==============  ===========================================  ==============================

The torch backbone is built lazily: a re-sort whose photos are all in the
embedding cache (:meth:`RankingModel.fully_cached`) scores without building
the image tower, and without importing open_clip: a prompt's text features
come from the prompt cache (:mod:`imgrank.features.prompts`) when it was used
before, else from the open_clip-free text tower
(:mod:`imgrank.models.clip.light_text`). A zero-shot or head re-sort by a
prompt used before imports no torch at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgrank.errors import UsageError
from imgrank.models.clip.config import BackboneSpec, PreprocessConfig
from imgrank.models.scoring import FeatureBatch, Scorer, ZeroShotScorer, antonym_pair

if TYPE_CHECKING:
    from imgrank.features.cache import EmbeddingCache, PromptFeatures
    from imgrank.models.checkpoints import ModelFolder
    from imgrank.models.clip.towers import Backbone
    from imgrank.models.onnx_runtime import OnnxModel

Warn = Callable[[str], None]

#: Kinds of model (see the module doc).
KINDS = ("zero-shot", "adapter", "linear-head", "mlp-head")
HEAD_KINDS = ("linear-head", "mlp-head")


class HeadScorer:
    """Scores the pooled embedding with a head; the prompt's words are not read.

    ``head`` maps L2-normalised pooled embeddings (N, E) float32 to (N,)
    scores: the head in numpy (:func:`imgrank.models.heads.numpy_head_callable`)
    or the exported graph's onnxruntime session.
    """

    needs_tokens = False

    def __init__(self, head: Callable[[np.ndarray], np.ndarray], name: str) -> None:
        self._head = head
        self.name = name

    def score(self, batch: FeatureBatch) -> np.ndarray:
        pooled = np.asarray(batch.pooled, dtype=np.float32)
        norms = np.linalg.norm(pooled, axis=-1, keepdims=True)
        normalized = pooled / np.maximum(norms, 1e-12)
        return np.asarray(self._head(np.ascontiguousarray(normalized)), np.float64).reshape(-1)


class RankingModel:
    """A loaded model (see the module doc); :func:`~imgrank.models.loading.load_model` builds it.

    Attributes:
        kind: ``zero-shot``, ``adapter``, ``linear-head`` or ``mlp-head``.
        runtime: ``torch`` or ``onnx``.
        name: What scores, for summaries and reports (e.g. ``zero-shot CLIP``,
            ``ranking adapter my-model (full)``, ``linear head aesthetic``).
        folder: The model folder, for adapters and heads loaded with torch.
    """

    kind: str
    runtime: str
    name: str
    folder: ModelFolder | None = None

    @property
    def image_encoder(self) -> Any:
        """The image tower for :func:`imgrank.features.stream.iter_features`.

        It follows :class:`imgrank.features.stream.ImageEncoder`: ``preprocess``,
        ``fingerprint`` and ``encode_pixels(pixels, tokens=...)`` (numpy in,
        :class:`~imgrank.models.scoring.FeatureBatch` out), which is also the
        per-batch function an engine running the tower elsewhere calls.
        """
        raise NotImplementedError

    @property
    def preprocess(self) -> PreprocessConfig:
        """How pixels are prepared for this model's image tower."""
        return self.image_encoder.preprocess

    @property
    def fingerprint(self) -> str:
        """The embedding cache's key for this model's features (encoder, preprocessing, decode)."""
        from imgrank.features.stream import cache_fingerprint

        return cache_fingerprint(self.image_encoder)

    @property
    def needs_tokens(self) -> bool:
        """Whether scoring reads visual tokens (adapters) rather than pooled embeddings."""
        return self.kind == "adapter"

    def fully_cached(self, paths: Sequence[Path], cache: EmbeddingCache) -> bool:
        """Whether every path is cached for this model, checked without building the backbone.

        With visual tokens for adapters. False whenever the check itself would
        cost a build. When True, pass ``images_cached=True`` to :meth:`scorer`.
        """
        return False

    def prepare_image_encoder(
        self, paths: Sequence[Path], cache: EmbeddingCache | None
    ) -> None:
        """Start loading the image tower in the background when ``paths`` need encoding.

        Loading then overlaps with encoding the prompt and decoding the first photos
        (onnxruntime; a no-op on torch, whose image tower is built on first use).
        """

    def scorer(
        self,
        prompt: str,
        against: str | None = None,
        *,
        images_cached: bool = False,
        cache: EmbeddingCache | None = None,
    ) -> Scorer:
        """The scorer for a prompt.

        Args:
            prompt: What to sort by (``--by``). Zero-shot scoring phrases it as an
                antonym pair; an adapter reads it (through its folder's prompt
                format); a head ignores its words (it only names the ranking).
            against: Zero-shot only: the negative phrasing, both used verbatim.
            images_cached: The caller checked :meth:`fully_cached`: the image
                tower will not run, so it (and, where possible, open_clip) is
                not loaded.
            cache: The run's embedding cache: the prompt's text features are
                read from it when stored there, else computed and stored (a
                cache that fails costs a warning through its own warning hook).

        Raises:
            UsageError: an empty prompt, or ``against`` for a model that is not zero-shot.
            ModelError: the backbone or head cannot be loaded.
        """
        if not prompt.strip():
            raise UsageError('--by needs a non-empty prompt, e.g. --by "image quality"')
        if against is not None and self.kind != "zero-shot":
            what = (
                "this export's adapter"
                if self.runtime == "onnx"
                else f"a {self.kind.replace('-', ' ')}"
            )
            if self.kind in HEAD_KINDS:
                raise UsageError(
                    f"--against is for zero-shot scoring; {what} ignores the prompt's words"
                )
            raise UsageError(f"--against is for zero-shot scoring; {what} reads --by as it is")
        return self._scorer(prompt, against, images_cached, cache)

    def _scorer(
        self,
        prompt: str,
        against: str | None,
        images_cached: bool,
        cache: EmbeddingCache | None,
    ) -> Scorer:
        raise NotImplementedError

    def backbone(self) -> Backbone:
        """The torch backbone (loaded now if it was not): for training and export."""
        raise UsageError(f"the {self.runtime} runtime has no torch backbone")


def score_cache_key(features: str, scorer: dict[str, Any], text: str) -> str:
    """The key of an adapter's cached scores (:mod:`imgrank.features.pipeline`).

    An adapter's forward is a cached re-sort's whole cost (about 1.7 GFLOP per
    photo for ViT-B-32), so its scores are kept per file. The key covers what a
    score depends on: the image features (the embedding cache's model key), the
    adapter itself (its folder's files, or the exported graph) and the exact text
    fed to the text tower (the text tower is the backbone's, so the features key
    covers it).
    """
    import hashlib
    import json

    blob = json.dumps(
        {"features": features, "scorer": scorer, "text": text, "version": 1}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class TorchImageEncoder:
    """The backbone's image tower for the feature stream; the backbone is built on first need."""

    def __init__(self, model: TorchRankingModel) -> None:
        self._model = model
        self.name = model.spec.model
        self.pretrained = model.spec.pretrained

    @property
    def preprocess(self) -> PreprocessConfig:  # type: ignore[override]
        return self._model._identity()[1]

    @property
    def fingerprint(self) -> str:
        return self._model._identity()[0]

    @property
    def device(self) -> str:
        """The torch device the tower runs on: on CUDA the stream decodes JPEGs there too
        (:func:`imgrank.features.stream.device_decoding`). Asked only when photos need encoding."""
        return self._model.backbone().device

    @property
    def dtype(self) -> Any:
        """The image tower's torch dtype (pixels decoded on the device are made in it)."""
        return self._model.backbone().dtype

    def encode_pixels(self, pixels: np.ndarray, *, tokens: bool = False) -> FeatureBatch:
        """Features of normalised pixels (N, 3, S, S): the per-batch function engines call."""
        return self._model.backbone().encode_pixels(pixels, tokens=tokens)


class TorchRankingModel(RankingModel):
    """A ranking model on the torch runtime: an open_clip backbone and, maybe, a head."""

    runtime = "torch"

    def __init__(
        self,
        spec: BackboneSpec,
        *,
        kind: str = "zero-shot",
        name: str = "zero-shot CLIP",
        folder: ModelFolder | None = None,
        device: str = "auto",
        precision: str = "auto",
        warn: Warn | None = None,
    ) -> None:
        self.spec = spec
        self.kind = kind
        self.name = name
        self.folder = folder
        self.device = device
        self.precision = precision
        self._warn = warn
        self._backbone: Backbone | None = None
        self._head: Any = None
        self._adapter: Any = None
        self._cheap: tuple[str, PreprocessConfig] | None = None
        self._serve_cached = False
        self._encoder = TorchImageEncoder(self)

    @property
    def image_encoder(self) -> TorchImageEncoder:
        return self._encoder

    def backbone(self) -> Backbone:
        if self._backbone is None:
            from imgrank.models.clip.build import load_backbone

            # Built on first use: a re-sort served from the embedding cache needs no image tower.
            self._backbone = load_backbone(
                self.spec,
                device=self.device,
                warn=self._warn,
                lazy_image_tower=True,
                precision=self.precision,
            )
        return self._backbone

    def _identity(self) -> tuple[str, PreprocessConfig]:
        """The features' fingerprint and preprocessing (cheap for a run served from the cache)."""
        if self._backbone is None and self._serve_cached and self._cheap is not None:
            return self._cheap
        backbone = self.backbone()
        return backbone.fingerprint, backbone.preprocess

    def fully_cached(self, paths: Sequence[Path], cache: EmbeddingCache) -> bool:
        if self._backbone is not None:
            return False
        from imgrank.features.stream import all_cached
        from imgrank.models.clip.light_text import features_identity

        precision = self._cpu_precision()
        self._cheap = None if precision is None else features_identity(self.spec, precision)
        if self._cheap is None:
            return False
        self._serve_cached = True
        try:
            return all_cached(paths, self._encoder, cache, tokens=self.needs_tokens)
        finally:
            self._serve_cached = False

    def _cpu_precision(self) -> str | None:
        """The image tower's precision when it is known to run on the CPU, without torch.

        None when a GPU may take the run (``auto`` then means half precision):
        the cache check then waits for the backbone.
        """
        from imgrank.models.clip.build import build_precision
        from imgrank.models.device import cuda_possible

        device = self.device.lower()
        if device.startswith("cuda") or (device == "auto" and cuda_possible()):
            return None
        return build_precision(self.precision, "cpu")

    def _light_text(self) -> Any:
        from imgrank.models.clip.light_text import light_text_encoder

        return light_text_encoder(self.spec, self.device, self.precision)

    def _text_features(
        self, texts: list[str], *, tokens: bool, cache: EmbeddingCache | None
    ) -> list[PromptFeatures]:
        """Text features from the prompt cache, else from the cheapest tower that can compute them.

        The open_clip-free tower serves a run whose photos are all cached and no
        backbone is built; otherwise the backbone's own text tower runs. Both
        store under the same text fingerprint (they agree within 1e-5).
        """
        from imgrank.features.prompts import prompt_features
        from imgrank.models.clip.light_text import text_identity

        fingerprint = None
        if self._backbone is None:
            fingerprint = text_identity(self.spec, self.device, self.precision)
        if fingerprint is None:
            fingerprint = self.backbone().text_fingerprint

        def compute(missing: list[str], *, tokens: bool) -> list[PromptFeatures]:
            light = self._light_text() if self._serve_cached and self._backbone is None else None
            if light is not None:
                try:
                    return light.prompt_features(missing, tokens=tokens)
                except Exception:  # noqa: BLE001 - weights it cannot read: the full path explains
                    pass
            return self.backbone().prompt_features(missing, tokens=tokens)

        return prompt_features(texts, compute, fingerprint=fingerprint, cache=cache, tokens=tokens)

    def _scorer(
        self,
        prompt: str,
        against: str | None,
        images_cached: bool,
        cache: EmbeddingCache | None,
    ) -> Scorer:
        self._serve_cached = images_cached and self._cheap is not None
        if not self._serve_cached:
            # The image tower will run: a missing or mismatched backbone is reported now,
            # not mid-run (its image tower is still built only on first use).
            self.backbone()
        if self.kind == "zero-shot":
            positive, negative = antonym_pair(prompt, against)
            features = self._text_features([positive, negative], tokens=False, cache=cache)
            return ZeroShotScorer.from_prompt_features(features, positive, negative)
        if self.kind == "adapter":
            from imgrank.models.adapter_scoring import AdapterScorer
            from imgrank.models.checkpoints import load_adapter
            from imgrank.models.device import resolve_device

            assert self.folder is not None
            text = self.folder.prompt_format.replace("{}", prompt)
            (features,) = self._text_features([text], tokens=True, cache=cache)
            if self._adapter is None:
                # The adapter stays in float32 even where the backbone runs in half precision:
                # it is small, and its LayerNorms and sums over tokens are precision-sensitive.
                device = (
                    self._backbone.device
                    if self._backbone is not None
                    else resolve_device(self.device)
                )
                self._adapter = load_adapter(self.folder, device=device)
            scorer = AdapterScorer(
                self._adapter,
                None,
                prompt,
                prompt_format=self.folder.prompt_format,
                text_tokens=features.tokens,
                name=f"{self.name} on {self.folder.backbone_spec.model}",
            )
            from imgrank.models.checkpoints import folder_identity

            scorer.cache_key = score_cache_key(
                self.fingerprint, {"folder": folder_identity(self.folder)}, text
            )
            return scorer
        return self._head_scorer()

    def _head_scorer(self) -> Scorer:
        from imgrank.models.checkpoints import load_head_arrays
        from imgrank.models.heads import numpy_head_callable

        assert self.folder is not None and self.folder.head is not None
        if self._head is None:
            # numpy, not the torch module: a cached head re-sort then imports no torch at all.
            self._head = numpy_head_callable(
                self.folder.head,
                load_head_arrays(self.folder),
                source=str(self.folder.head_weights),
            )
        return HeadScorer(self._head, f"{self.name} on {self.folder.backbone_spec.model}")


class OnnxRankingModel(RankingModel):
    """A ranking model on onnxruntime, from a folder written by ``imgrank export`` (no torch)."""

    runtime = "onnx"

    def __init__(self, model: OnnxModel) -> None:
        self.onnx = model
        self._encoder = model.image_encoder()
        head = model.manifest.get("head") or {}
        if model.has_adapter:
            self.kind = "adapter"
            adapter = model.manifest.get("adapter") or {}
            name, variant = adapter.get("name", "adapter"), adapter.get("variant", "full")
            self.name = f"ranking adapter {name} ({variant})"
        elif model.has_head:
            self.kind = str(head.get("kind", "linear-head"))
            self.name = f"{self.kind.replace('-', ' ')} {head.get('name', 'head')}"
        else:
            self.kind = "zero-shot"
            self.name = "zero-shot CLIP"

    @property
    def image_encoder(self) -> Any:
        return self._encoder

    def prepare_image_encoder(
        self, paths: Sequence[Path], cache: EmbeddingCache | None
    ) -> None:
        # Only when photos will need encoding: the first chunk of the folder tells
        # (a re-sort of a cached folder loads no image session at all).
        from imgrank.features.stream import LOOKUP_CHUNK, all_cached

        head = paths[:LOOKUP_CHUNK]
        if cache is None or not all_cached(head, self._encoder, cache, tokens=self.needs_tokens):
            self.onnx.start_session("image")

    def _scorer(
        self,
        prompt: str,
        against: str | None,
        images_cached: bool,
        cache: EmbeddingCache | None,
    ) -> Scorer:
        from imgrank.models.onnx_runtime import OnnxAdapterScorer, zero_shot_scorer

        if self.kind == "zero-shot":
            return zero_shot_scorer(self.onnx, prompt, against, cache=cache)
        if self.kind == "adapter":
            scorer = OnnxAdapterScorer(self.onnx, prompt, cache=cache)
            graph = self.onnx.graphs["adapter"]
            stat = graph.path.stat()
            scorer.cache_key = score_cache_key(
                self.fingerprint,
                {"graph": graph.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
                scorer.prompt,
            )
            return scorer
        head = self.onnx.manifest.get("head") or {}
        backbone = head.get("backbone") or self.onnx.manifest["model"].get("name", "?")
        return HeadScorer(self.onnx.run_head, f"{self.name} on {backbone}, onnxruntime")
