"""A loaded backbone and its forwards: each tower's forward is written once.

:func:`image_tower_forward` and :func:`text_tower_forward` serve the torch
runtime (:class:`Backbone`) and the ONNX export alike, so the two cannot
drift apart. The image tower is configured once, when it is built
(:func:`configure_image_tower`), and never changed per call.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imgrank.models.clip.config import PreprocessConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

    from imgrank.features.cache import PromptFeatures
    from imgrank.models.scoring import FeatureBatch


@dataclass
class ImageFeatures:
    """Features of a batch of images.

    Attributes:
        pooled: (N, E) projected embeddings, not normalised (zero-shot scoring).
        tokens: (N, P, D) visual tokens for the adapter, or None when not asked for.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None = None


@dataclass
class TextFeatures:
    """Features of a batch of prompts.

    Attributes:
        pooled: (N, E) projected embeddings, not normalised.
        tokens: (N, L, D) all context positions after ``ln_final``, not projected.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor


class Backbone:
    """A frozen open_clip model on a device, with its tokenizer and preprocessing."""

    def __init__(
        self,
        model: Any,
        *,
        name: str,
        pretrained: str,
        config: dict[str, Any],
        preprocess: PreprocessConfig,
        device: str,
        weights_id: str,
        precision: str = "fp32",
    ) -> None:
        self.model = model
        self.name = name
        self.pretrained = pretrained
        self.config = config
        self.preprocess = preprocess
        self.device = device
        self.weights_id = weights_id
        #: ``fp32``, ``fp16`` (both towers) or ``bf16`` (the image tower only).
        self.precision = precision
        self._tokenizer: Any = None

    @property
    def dtype(self) -> torch.dtype:
        """The image tower's number format (pixels are cast to it)."""
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)

    @property
    def fingerprint(self) -> str:
        """Identifies the features produced: architecture + weights + preprocessing + precision."""
        return features_fingerprint(
            self.config, self.weights_id, self.preprocess, precision=self.precision
        )

    @property
    def text_fingerprint(self) -> str:
        """Identifies this backbone's text features: the prompt cache's key."""
        return text_features_fingerprint(
            self.config, self.weights_id, text_dtype_name(self.precision)
        )

    def prompt_features(self, texts: list[str], *, tokens: bool = False) -> list[PromptFeatures]:
        """Text features as the prompt cache stores them (float32 numpy, one per text)."""
        from imgrank.features.cache import PromptFeatures

        features = self.encode_text(texts)
        scale = min(float(self.model.logit_scale.float().exp().item()), 100.0)
        pooled = features.pooled.float().cpu().numpy()
        grid = features.tokens.float().cpu().numpy() if tokens else None
        return [
            PromptFeatures(pooled[i], scale, None if grid is None else grid[i])
            for i in range(len(texts))
        ]

    @property
    def context_length(self) -> int:
        return int(self.config.get("text_cfg", {}).get("context_length", 77))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (N, context_length) with open_clip's tokenizer for this text tower."""
        if self._tokenizer is None:
            import open_clip

            hf_name = self.config.get("text_cfg", {}).get("hf_tokenizer_name")
            if hf_name:
                self._tokenizer = open_clip.get_tokenizer(self.name)
            else:
                self._tokenizer = open_clip.tokenizer.SimpleTokenizer(
                    context_length=self.context_length
                )
        return self._tokenizer(texts)

    def encode_images(self, pixels: torch.Tensor, *, tokens: bool = False) -> ImageFeatures:
        """The image tower on normalised pixels (N, 3, S, S): :func:`image_tower_forward`."""
        import torch

        pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
        with torch.inference_mode():
            pooled, grid = image_tower_forward(self.model.visual, pixels, tokens=tokens)
        return ImageFeatures(pooled=pooled, tokens=grid)

    def encode_pixels(self, pixels: np.ndarray, *, tokens: bool = False) -> FeatureBatch:
        """Pipeline entry point: numpy pixels (N, 3, S, S) in, numpy features out.

        Features are returned as float32 numpy arrays on the CPU so that the
        cache, the scorers and the ONNX path share one runtime-agnostic format.
        """
        import torch

        from imgrank.models.scoring import FeatureBatch

        # Pixels decoded on the device (imgrank.images.gpu_decode) arrive as a tensor there.
        tensor = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(pixels)
        features = self.encode_images(tensor, tokens=tokens)
        return FeatureBatch(
            pooled=features.pooled.float().cpu().numpy(),
            tokens=None if features.tokens is None else features.tokens.float().cpu().numpy(),
        )

    def encode_token_ids(self, ids: torch.Tensor) -> TextFeatures:
        """Run the text tower on token ids: pooled embedding and per-position tokens."""
        import torch

        with torch.inference_mode():
            pooled, tokens = text_tower_forward(self.model, ids.to(self.device))
        return TextFeatures(pooled=pooled, tokens=tokens)

    def encode_text(self, texts: list[str]) -> TextFeatures:
        """Tokenize and encode prompts."""
        return self.encode_token_ids(self.tokenize(texts))


def configure_image_tower(visual: Any) -> None:
    """Set, once when the tower is built, what :func:`image_tower_forward` relies on.

    An open_clip ViT returns its patch tokens beside the pooled embedding when
    ``output_tokens`` is set; the pooled output is the same either way, so it
    is set for good instead of being toggled around each call (which a shared
    model, used from several threads or exported while in use, cannot afford).
    """
    if hasattr(visual, "output_tokens"):
        visual.output_tokens = True


def image_tower_forward(
    visual: Any, pixels: torch.Tensor, *, tokens: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The image tower: ``(pooled, tokens)`` for normalised pixels (N, 3, S, S).

    ``pooled`` is open_clip's projected image embedding (not normalised). With
    ``tokens`` the adapter's visual tokens come from the same forward pass: for
    a ViT, the patch tokens (class token excluded) after ``ln_post``, projected
    by ``visual.proj``; for a timm CNN trunk without pooling, the feature map
    flattened row-major to (N, h*w, D) (its mean is then the pooled output).
    Towers that pool internally (timm pooling heads, ResNets) give no tokens:
    ``None``. One function serves the torch runtime and the ONNX export.
    """
    if hasattr(visual, "trunk"):
        out = visual(pixels)
        if out.ndim == 4:  # (N, D, h, w): a trunk without pooling
            grid = out.flatten(2).transpose(1, 2)  # (N, h*w, D), row-major
            return grid.mean(dim=1), grid if tokens else None
        return out, None
    if not getattr(visual, "output_tokens", False):
        return visual(pixels), None
    pooled, patch_tokens = visual(pixels)
    if not tokens:
        return pooled, None
    if visual.proj is not None:
        patch_tokens = patch_tokens @ visual.proj
    return pooled, patch_tokens


def text_tower_forward(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The text tower of an open_clip CLIP: ``(pooled, tokens)`` for token ids (N, L).

    ``tokens`` are all context positions after ``ln_final``, not projected (the
    adapter's text tokens); ``pooled`` is open_clip's pooled, projected text
    embedding. One function serves the torch path and the ONNX export, so the
    two cannot drift apart.
    """
    import torch
    from open_clip.transformer import text_global_pool

    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(ids).to(cast_dtype)
    x = x + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    tokens = model.ln_final(x)  # (N, L, width)
    pooled = text_global_pool(
        tokens, ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
    )
    if model.text_projection is not None:
        if isinstance(model.text_projection, torch.nn.Linear):
            pooled = model.text_projection(pooled)
        else:
            pooled = pooled @ model.text_projection
    return pooled, tokens


def text_dtype_name(precision: str) -> str:
    """The text tower's number format for a resolved precision (``fp32``, ``fp16``, ``bf16``):
    half precision only with fp16, since bf16 is the image tower's alone."""
    return "float16" if precision == "fp16" else "float32"


def features_fingerprint(
    config: dict[str, Any],
    weights_id: str,
    preprocess: PreprocessConfig,
    *,
    precision: str = "fp32",
) -> str:
    """The embedding cache's key for a backbone: architecture + weights + preprocessing.

    Shared by :class:`Backbone` and the open_clip-free text path
    (:mod:`imgrank.models.clip.light_text`), which must find the features a backbone stored.
    The image tower's precision is part of it (features of two precisions never
    mix); float32 adds nothing, so caches written before precision counted stay valid.
    """
    identity: dict[str, Any] = {"config": config, "weights": weights_id, "pp": preprocess.to_dict()}
    if precision != "fp32":
        identity["precision"] = precision
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def text_features_fingerprint(config: dict[str, Any], weights_id: str, dtype: str) -> str:
    """The prompt cache's key for a text tower: its architecture, weights and number format.

    The image tower's config and the preprocessing are left out: text features
    do not depend on them, so every image setting shares a prompt's entry.
    Computed without building anything (:mod:`imgrank.models.clip.light_text`
    must find what a built backbone stored, and the other way round).
    """
    text_part = {key: value for key, value in config.items() if key != "vision_cfg"}
    blob = json.dumps(
        {"text": text_part, "weights": weights_id, "dtype": dtype}, sort_keys=True
    ).encode()
    return "text:" + hashlib.sha256(blob).hexdigest()[:20]


