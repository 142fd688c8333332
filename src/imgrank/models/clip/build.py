"""Building a backbone fast: shapes on the meta device, weights assigned, image tower lazy.

:func:`load_backbone` is the one function that turns a
:class:`~imgrank.models.clip.config.BackboneSpec` into a
:class:`~imgrank.models.clip.towers.Backbone`. torch and open_clip are imported
inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from imgrank.errors import ModelError
from imgrank.models.clip.config import (
    CLIP_CONFIG_KEYS,
    BackboneSpec,
    default_preprocess,
    resolve_model_config,
)
from imgrank.models.clip.towers import Backbone, configure_image_tower
from imgrank.models.clip.weights import (
    WEIGHT_SUFFIXES,
    WeightsFile,
    check_clip_keys,
    download_pretrained,
    load_clip_weights,
    weights_identity,
)
from imgrank.models.device import resolve_device

#: Seed of random weights (``--pretrained none``); each tower draws from its own stream.
RANDOM_SEED = 0


def build_clip(config: dict[str, Any]) -> Any:
    """Build an open_clip CLIP (random weights) from a config dict."""
    from open_clip.model import CLIP, CustomTextCLIP

    kwargs = {k: config[k] for k in CLIP_CONFIG_KEYS if k in config}
    text_cfg = config.get("text_cfg", {})
    custom = config.get("custom_text", False) or "hf_model_name" in text_cfg
    try:
        return (CustomTextCLIP if custom else CLIP)(**kwargs)
    except Exception as exc:  # noqa: BLE001 - bad user config
        raise ModelError(f"cannot build the model from its config: {exc}") from None


def random_weights_id() -> str:
    """The weights identity of ``--pretrained none``: the seeding scheme is part of it."""
    return f"random:seed{RANDOM_SEED}:per-tower"


def load_backbone(
    spec: BackboneSpec,
    *,
    device: str = "auto",
    warn: Any = None,
    lazy_image_tower: bool = False,
    precision: str | None = None,
) -> Backbone:
    """Build the model a spec names and load its weights onto a device.

    Start-up is kept short because a sort of a cached folder is mostly start-up:

    * the model is first built on PyTorch's ``meta`` device (shapes only, no
      memory, no random initialisation) and the weights are then assigned in
      place, instead of initialising 150 M random numbers only to overwrite them;
    * weights are read lazily (safetensors slices, or a memory-mapped ``.pt``),
      so a tower that is not built is never read from disk;
    * with ``lazy_image_tower`` the image tower is only built on its first
      forward pass: a re-sort served from the embedding cache runs the text
      tower only.

    Random weights (``--pretrained none``) are seeded per tower, so they are
    the same in every run whichever towers a run builds (the embedding cache
    relies on it).

    Args:
        spec: model and weights.
        device: ``auto|cpu|cuda|cuda:N|mps``.
        warn: called with a message for things the user must know (random weights).
        lazy_image_tower: build the image tower on first use instead of now.
            Code that reads the image tower's parameters directly (export,
            training) must leave this off.
        precision: ``fp32``; ``fp16`` (both towers); ``bf16`` (the image tower in
            bfloat16, the text tower in float32, so a prompt's features do not
            depend on it); or None/``auto`` for half precision on CUDA (twice
            the throughput, the same ranking) and float32 elsewhere.

    Raises:
        ModelError: unknown model, unreadable or mismatched weights.
        WeightsUnavailableError: a pretrained tag that is not cached and cannot be downloaded.
    """
    import torch

    device = resolve_device(device)
    precision = build_precision(precision, device)
    half = precision == "fp16"
    image_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    name, config = resolve_model_config(spec)
    preprocess = spec.preprocess or default_preprocess(config)
    weights: WeightsFile | None = None
    if spec.is_random:
        # The seeding scheme is part of the weights' identity (cached features).
        weights_id = random_weights_id()
        if warn is not None:
            warn(
                "--pretrained none: the backbone has RANDOM weights, so the ranking is "
                "meaningless (use this only for tests and benchmarks)"
            )
    else:
        candidate = Path(spec.pretrained).expanduser()
        if candidate.is_file():
            weights_path = candidate
        elif candidate.suffix in WEIGHT_SUFFIXES or os.sep in spec.pretrained:
            raise ModelError(f"weights file {candidate} does not exist")
        else:
            weights_path = download_pretrained(spec.model, spec.pretrained)
        weights_id = weights_identity(weights_path)
        weights = WeightsFile(weights_path)

    model = _build_structure(config)
    if model is None or (weights is None and not _towers_buildable(model, config)):
        model = _build_eagerly(config, weights)  # rare configs: pay for initialisation
    else:
        if weights is not None:
            check_clip_keys(_shapes_of(model), weights.shapes, source=str(weights.path))
        _materialize_text(model, config, weights)
        if not lazy_image_tower:
            _materialize_visual(model, config, weights)
    model.eval().requires_grad_(False)
    visual = model._modules.pop("visual")
    if half:
        model = model.half()
    visual = visual.to(image_dtype)
    model = model.to(device)
    model._modules["visual"] = visual
    configure_image_tower(visual)  # an attribute: set now, also on a tower built later
    if _has_meta(visual):

        def build_on_first_use(module: Any, _args: Any) -> None:
            handle.remove()
            with torch.inference_mode(False):
                _materialize_visual(model, config, weights)
                module.eval().requires_grad_(False)
                module.to(device=device, dtype=image_dtype)
            if weights is not None:
                weights.release()

        handle = visual.register_forward_pre_hook(build_on_first_use)
    else:
        visual.to(device)
        if weights is not None:
            weights.release()
    return Backbone(
        model,
        name=name,
        pretrained=spec.pretrained,
        config=config,
        preprocess=preprocess,
        device=device,
        weights_id=weights_id,
        precision=precision,
    )


def build_precision(precision: str | None, device: str) -> str:
    """``fp32``, ``fp16`` or ``bf16`` for a resolved torch device (``auto``: fp16 on CUDA)."""
    if precision in (None, "auto"):
        return "fp16" if device.startswith("cuda") else "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise ModelError(f"unknown precision {precision!r}: expected auto, fp32, bf16 or fp16")
    return precision


def image_tower_built(backbone: Backbone) -> bool:
    """Whether the image tower holds real weights (False until a lazy tower's first use)."""
    return not _has_meta(backbone.model.visual)


def _build_structure(config: dict[str, Any]) -> Any:
    """The model's modules with shapes only (meta device), or None if that is not possible."""
    import torch

    try:
        with torch.device("meta"):
            return build_clip(config)
    except ModelError:
        raise
    except Exception:  # noqa: BLE001 - e.g. a timm trunk that calls .item() while building
        return None


def _towers_buildable(model: Any, config: dict[str, Any]) -> bool:
    """Random weights tower by tower are supported for CLIP with open_clip's own text tower."""
    from open_clip.model import CLIP

    return type(model) is CLIP


def _build_eagerly(config: dict[str, Any], weights: WeightsFile | None) -> Any:
    """The plain way: build with initialisation, then load weights (all towers, seeded)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = build_clip(config)
    if weights is not None:
        load_clip_weights(model, weights.load(), source=str(weights.path))
    return model


def _seeded(offset: int) -> Any:
    """A context in which torch's CPU generator is seeded for one tower."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def context() -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED + offset)
            yield

    return context()


def _materialize_text(model: Any, config: dict[str, Any], weights: WeightsFile | None) -> None:
    """Give the text tower, ``logit_scale`` (and ``logit_bias``) real tensors."""
    import torch

    if weights is not None:
        state = weights.load(exclude="visual.")
        model.load_state_dict(state, strict=False, assign=True)
    else:
        from open_clip.model import _build_text_tower

        with _seeded(1):
            text = _build_text_tower(
                config["embed_dim"], config["text_cfg"], config.get("quick_gelu", False), None
            )
        # CLIP holds the text tower's parts at its top level under the same names.
        result = model.load_state_dict(text.state_dict(keep_vars=True), strict=False, assign=True)
        if result.unexpected_keys:
            raise ModelError(
                f"cannot build random text weights for this config: {result.unexpected_keys[:4]}"
            )
        scale = float(config.get("init_logit_scale", math.log(1 / 0.07)))
        shape = model.logit_scale.shape
        model.logit_scale = torch.nn.Parameter(torch.full(shape, scale))
        if getattr(model, "logit_bias", None) is not None:
            bias = float(config.get("init_logit_bias", 0.0))
            model.logit_bias = torch.nn.Parameter(torch.full(shape, bias))
    if isinstance(getattr(model, "attn_mask", None), torch.Tensor) and model.attn_mask.is_meta:
        # A non-persistent buffer: in no weights file. The causal mask, as open_clip builds it.
        length = model.attn_mask.shape[0]
        model.attn_mask = torch.full((length, length), float("-inf")).triu_(1)
    leftover = [n for n, t in _named_tensors(model) if t.is_meta and not n.startswith("visual.")]
    if leftover:
        raise ModelError(f"cannot build the text tower of this model: {', '.join(leftover[:4])}")


def _materialize_visual(model: Any, config: dict[str, Any], weights: WeightsFile | None) -> None:
    """Give the image tower real tensors (weights from the file, or seeded random ones)."""
    from open_clip.model import _build_vision_tower

    def fresh() -> Any:
        with _seeded(2):
            return _build_vision_tower(
                config["embed_dim"], config["vision_cfg"], config.get("quick_gelu", False), None
            )

    if weights is not None:
        model.visual.load_state_dict(weights.load("visual."), strict=True, assign=True)
        if _has_meta(model.visual):
            # Buffers that are not saved in weights files (rare): take a fresh tower's.
            _adopt(model.visual, fresh(), only_meta=True)
    else:
        _adopt(model.visual, fresh(), only_meta=False)


def _adopt(target: Any, source: Any, *, only_meta: bool) -> None:
    """Move ``source``'s parameters and buffers into the same-shaped module ``target``."""
    pairs = zip(target.named_modules(), source.named_modules(), strict=True)
    for (target_name, target_module), (source_name, source_module) in pairs:
        if target_name != source_name or type(target_module) is not type(source_module):
            raise ModelError(f"internal error: tower layouts differ at {target_name!r}")
        for table in ("_parameters", "_buffers"):
            mine, theirs = getattr(target_module, table), getattr(source_module, table)
            for key, tensor in theirs.items():
                current = mine.get(key)
                if not only_meta or (current is not None and current.is_meta):
                    mine[key] = tensor


def _named_tensors(module: Any) -> list[tuple[str, Any]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _has_meta(module: Any) -> bool:
    return any(t.is_meta for _name, t in _named_tensors(module))


def _shapes_of(model: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
