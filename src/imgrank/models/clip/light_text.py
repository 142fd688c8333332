"""Encode a prompt without importing open_clip: the warm re-sort's fast start.

A re-sort served entirely from the embedding cache needs only the text tower.
Importing open_clip costs 1.4 s on a 2-core machine (it imports torchvision,
which imports ``torch._dynamo``), more than everything else such a run does.
This module runs the standard CLIP text transformer as plain torch tensor
operations on the same state-dict keys, with open_clip's own tokenizer file
loaded on its own (it needs neither the open_clip package nor torchvision).

It covers the text towers of open_clip's ordinary CLIP configs only (causal
mask, argmax pooling, projection matrix), whether the config is named, a JSON
file or carried by an adapter folder. Anything else returns None from
:func:`light_text_encoder` and the caller builds the full backbone as usual;
``tests/test_text_only.py`` checks both towers agree, pooled embeddings and
the per-position tokens adapters read.

The features it produces are only used when the embedding cache already holds
every photo for the same encoder fingerprint (:func:`features_identity`),
computed here exactly as :attr:`imgrank.models.clip.towers.Backbone.fingerprint`
computes it; :class:`imgrank.models.ranking_model.TorchRankingModel` makes that
choice. A prompt used before is not encoded at all: its features come from the
prompt cache (:mod:`imgrank.features.prompts`) under :func:`text_identity`, the
text tower's fingerprint computed here without building anything.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgrank.models.clip.config import (
    BackboneSpec,
    PreprocessConfig,
    default_preprocess,
    named_model_config,
    open_clip_folder,
)
from imgrank.models.clip.towers import (
    features_fingerprint,
    text_dtype_name,
    text_features_fingerprint,
)
from imgrank.models.clip.weights import remembered_weights, weights_identity
from imgrank.models.device import cuda_possible

if TYPE_CHECKING:
    import numpy as np
    import torch

    from imgrank.features.cache import PromptFeatures

#: text_cfg keys the plain tower implements; any other key means a variant it does not.
_PLAIN_TEXT_KEYS = {
    "context_length",
    "vocab_size",
    "width",
    "heads",
    "layers",
    "output_tokens",
    "mlp_ratio",
}
#: Top-level config keys that change nothing in the text tower's forward.
_NEUTRAL_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}


_open_clip_folder = open_clip_folder
_named_config = named_model_config


def _tokenizer_module() -> Any:
    """open_clip's tokenizer.py as a stand-alone module (it has no package-relative imports)."""
    name = "imgrank._open_clip_tokenizer"
    if name in sys.modules:
        return sys.modules[name]
    folder = _open_clip_folder()
    if folder is None:
        return None
    spec = importlib.util.spec_from_file_location(name, folder / "tokenizer.py")
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class LightTextEncoder:
    """The text tower of a standard CLIP config, with the backbone's cache fingerprint."""

    def __init__(
        self,
        config: dict[str, Any],
        weights: Path,
        preprocess: PreprocessConfig,
    ) -> None:
        self.config = config
        self.weights = weights
        self.preprocess = preprocess
        self.weights_id = weights_identity(weights)
        self._tower: Any = None
        self._logit_scale: float | None = None

    @property
    def fingerprint(self) -> str:
        """Equal to ``Backbone.fingerprint`` for the same config, weights and preprocessing."""
        return features_fingerprint(self.config, self.weights_id, self.preprocess)

    @property
    def text_fingerprint(self) -> str:
        """Equal to ``Backbone.text_fingerprint`` of a float32 backbone: this tower runs float32."""
        return text_features_fingerprint(self.config, self.weights_id, "float32")

    def _build(self) -> None:
        from imgrank.models.clip.weights import WeightsFile

        state = WeightsFile(self.weights).load(exclude="visual.")
        self._tower = _PlainTextTower(self.config, state)
        self._logit_scale = min(float(state["logit_scale"].float().exp().item()), 100.0)

    def _run(self, texts: list[str], *, tokens: bool) -> tuple[Any, Any, float]:
        import torch

        if self._tower is None:
            self._build()
        tokenizer = _tokenizer_module().SimpleTokenizer(
            context_length=int(self.config["text_cfg"].get("context_length", 77))
        )
        with torch.inference_mode():
            pooled, grid = self._tower(tokenizer(texts), tokens=tokens)
        assert self._logit_scale is not None
        return pooled, grid, self._logit_scale

    def encode(self, texts: list[str]) -> tuple[np.ndarray, float]:
        """Pooled, projected text embeddings (N, E) as float32, and CLIP's temperature."""
        pooled, _grid, scale = self._run(texts, tokens=False)
        return pooled.float().numpy(), scale

    def prompt_features(self, texts: list[str], *, tokens: bool = False) -> list[PromptFeatures]:
        """Text features as the prompt cache stores them; ``tokens``: every context position."""
        from imgrank.features.cache import PromptFeatures

        pooled, grid, scale = self._run(texts, tokens=tokens)
        pooled_np = pooled.float().numpy()
        grid_np = None if grid is None else grid.float().numpy()
        return [
            PromptFeatures(pooled_np[i], scale, None if grid_np is None else grid_np[i])
            for i in range(len(texts))
        ]


def config_without_open_clip(spec: BackboneSpec) -> dict[str, Any] | None:
    """The open_clip config a spec names, read without importing open_clip; None if unsure."""
    if spec.model_config is not None:
        return dict(spec.model_config)
    path = Path(spec.model).expanduser()
    if spec.model.endswith(".json") or path.is_file():
        from imgrank.errors import ModelError
        from imgrank.models.clip.config import resolve_model_config

        try:
            return resolve_model_config(spec)[1]  # reads the JSON; no open_clip import
        except ModelError:
            return None  # the full path reports the problem
    return _named_config(spec.model)


def features_identity(
    spec: BackboneSpec, precision: str = "fp32"
) -> tuple[str, PreprocessConfig] | None:
    """``(fingerprint, preprocess)`` the backbone of ``spec`` will have, without building it.

    Equal to :attr:`Backbone.fingerprint` and :attr:`Backbone.preprocess` once
    built, so a run whose photos are all cached can be served without
    importing open_clip. None when that cannot be known cheaply (a pretrained
    tag never resolved on this machine, a config only open_clip can read).
    """
    from imgrank.models.clip.build import random_weights_id

    config = config_without_open_clip(spec)
    if config is None:
        return None
    if spec.is_random:
        weights_id = random_weights_id()
    else:
        candidate = Path(spec.pretrained).expanduser()
        weights = (
            candidate if candidate.is_file() else remembered_weights(spec.model, spec.pretrained)
        )
        if weights is None:
            return None
        weights_id = weights_identity(weights)
    preprocess = spec.preprocess or default_preprocess(config)
    return features_fingerprint(config, weights_id, preprocess, precision=precision), preprocess


def _weights_file(spec: BackboneSpec) -> Path | None:
    """The weights file of a spec with weights, if it is on disk (no download, no open_clip)."""
    candidate = Path(spec.pretrained).expanduser()
    return candidate if candidate.is_file() else remembered_weights(spec.model, spec.pretrained)


def _text_dtype(device: str, precision: str | None) -> str | None:
    """The text tower's number format as :func:`imgrank.models.clip.build.load_backbone` picks it.

    None when only a built backbone can tell (an unknown device string).
    """
    from imgrank.models.clip.build import build_precision

    device = device.lower()
    if device == "auto":
        device = "cuda" if cuda_possible() else "cpu"
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        return None
    return text_dtype_name(build_precision(precision, device))


def text_identity(spec: BackboneSpec, device: str, precision: str | None = None) -> str | None:
    """The text fingerprint the backbone of ``spec`` will have, without building it.

    Equal to :attr:`imgrank.models.clip.towers.Backbone.text_fingerprint` once
    built (the prompt cache's key), and to the light tower's where that serves.
    None when it cannot be known cheaply (a pretrained tag never resolved on this
    machine, a config only open_clip can read); the caller then builds the backbone.
    """
    from imgrank.models.clip.build import random_weights_id

    config = config_without_open_clip(spec)
    dtype = _text_dtype(device, precision)
    if config is None or dtype is None:
        return None
    if spec.is_random:
        weights_id = random_weights_id()
    else:
        weights = _weights_file(spec)
        if weights is None:
            return None
        weights_id = weights_identity(weights)
    return text_features_fingerprint(config, weights_id, dtype)


def light_text_encoder(
    spec: BackboneSpec, device: str, precision: str | None = None
) -> LightTextEncoder | None:
    """A text encoder that avoids open_clip, when the spec allows one; else None.

    Only for float32 CPU runs of ordinary CLIP configs (named, a JSON file, or
    an adapter folder's) whose weights are a file already on disk (a local file,
    or a pretrained tag an earlier run downloaded).
    """
    if spec.is_random or _text_dtype(device, precision) != "float32":
        return None  # random text weights are drawn by open_clip's constructors
    if device.lower() not in ("auto", "cpu"):
        return None  # the plain tower runs on the CPU only
    config = config_without_open_clip(spec)
    if config is None or not set(config) <= _NEUTRAL_TOP_KEYS:
        return None
    if not set(config.get("text_cfg", {})) <= _PLAIN_TEXT_KEYS:
        return None
    weights = _weights_file(spec)
    folder = _open_clip_folder()
    if weights is None or folder is None or not (folder / "tokenizer.py").is_file():
        return None  # (the tokenizer itself is loaded only once the cache check passed)
    return LightTextEncoder(config, weights, spec.preprocess or default_preprocess(config))


class _PlainTextTower:
    """The CLIP text transformer as plain tensor operations on its state dict.

    No ``nn.Module`` is built: module constructors initialise their weights
    randomly (0.2 s for ViT-B-32's text tower, and on the meta device PyTorch
    even imports its compiler), only for the weights to be replaced.
    """

    def __init__(self, config: dict[str, Any], state: dict[str, Any]) -> None:
        import torch

        text = config["text_cfg"]
        self.width = int(text["width"])
        self.heads = int(text.get("heads", 8))
        self.layers = int(text["layers"])
        self.quick_gelu = bool(config.get("quick_gelu", False))
        self.state = {key: value.float() for key, value in state.items()}
        wanted = ["token_embedding.weight", "positional_embedding", "ln_final.weight",
                  "ln_final.bias", "text_projection"]  # fmt: skip
        for i in range(self.layers):
            prefix = f"transformer.resblocks.{i}."
            wanted += [prefix + name for name in _BLOCK_KEYS]
        missing = [key for key in wanted if key not in self.state]
        if missing:
            raise KeyError(f"weights lack {', '.join(missing[:4])}")
        context = self.state["positional_embedding"].shape[0]
        self.mask = torch.full((context, context), float("-inf")).triu_(1)

    def __call__(
        self, ids: torch.Tensor, *, tokens: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(pooled, tokens)``; tokens (every position after ``ln_final``) only if asked for."""
        import torch
        import torch.nn.functional as F

        w, width, heads = self.state, self.width, self.heads
        # With a causal mask no position sees the ones after it, so the padding after
        # the last end-of-text token cannot change the pooled output: drop it, unless
        # an adapter reads every position.
        length = ids.shape[1] if tokens else int(ids.argmax(dim=-1).max().item()) + 1
        ids = ids[:, :length]
        batch = ids.shape[0]
        mask = self.mask[:length, :length]
        x = F.embedding(ids, w["token_embedding.weight"]) + w["positional_embedding"][:length]
        for i in range(self.layers):
            p = f"transformer.resblocks.{i}."
            y = F.layer_norm(x, (width,), w[p + "ln_1.weight"], w[p + "ln_1.bias"])
            qkv = F.linear(y, w[p + "attn.in_proj_weight"], w[p + "attn.in_proj_bias"])
            q, k, v = (
                part.reshape(batch, length, heads, width // heads).transpose(1, 2)
                for part in qkv.split(width, dim=-1)
            )
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            attended = attended.transpose(1, 2).reshape(batch, length, width)
            x = x + F.linear(attended, w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"])
            y = F.layer_norm(x, (width,), w[p + "ln_2.weight"], w[p + "ln_2.bias"])
            y = F.linear(y, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])
            y = y * torch.sigmoid(1.702 * y) if self.quick_gelu else F.gelu(y)
            x = x + F.linear(y, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
        x = F.layer_norm(x, (width,), w["ln_final.weight"], w["ln_final.bias"])
        pooled = x[torch.arange(batch), ids.argmax(dim=-1)]  # at the end-of-text token
        return pooled @ w["text_projection"], (x if tokens else None)


_BLOCK_KEYS = (
    "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
    "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)  # fmt: skip
