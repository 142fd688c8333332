"""The ranking-adapter authors' files: their model configs and their released checkpoints.

The authors release a ``.pt`` checkpoint (CLIP and the adapter in one
``state_dict``) and a model config JSON (open_clip's keys plus ``adapter_cfg``
and ``misc_cfg``). :func:`import_authors_checkpoint` turns the pair into an
imgrank model folder (:mod:`imgrank.models.checkpoints`); the config of their
released checkpoints ships with imgrank (``imgrank/configs``).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from imgrank.errors import AdapterMismatchError, ModelError
from imgrank.models.checkpoints import (
    ModelFolder,
    _mismatches,
    _sha256,
    _shapes,
    check_backbone_fits,
    clip_config,
    save_model_folder,
)
from imgrank.models.clip.config import (
    OPENAI_MEAN,
    OPENAI_STD,
    RANDOM_WEIGHTS,
    BackboneSpec,
    PreprocessConfig,
)

#: Model configs shipped inside the package (``imgrank/configs/NAME.json``).
_CONFIG_FOLDER = "configs"

#: The config of the authors' released checkpoints (object count, image quality, multi-task).
RELEASED_CONFIG = "convnext_large_d_320-adapter"


def shipped_configs() -> list[str]:
    """Names of the model configs shipped with imgrank (without ``.json``)."""
    folder = resources.files("imgrank") / _CONFIG_FOLDER
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def shipped_config(name: str) -> dict[str, Any]:
    """A model config shipped with imgrank, e.g. ``convnext_large_d_320-adapter``.

    ``convnext_large_d_320`` (without ``-adapter``) is accepted too.

    Raises:
        ModelError: no such shipped config.
    """
    stem = name[: -len(".json")] if name.endswith(".json") else name
    for candidate in (stem, f"{stem}-adapter"):
        resource = resources.files("imgrank") / _CONFIG_FOLDER / f"{candidate}.json"
        if resource.is_file():
            return json.loads(resource.read_text(encoding="utf-8"))
    raise ModelError(
        f"{name!r} is neither an existing config file nor a config shipped with imgrank "
        f"(shipped: {', '.join(shipped_configs())})"
    )


def read_authors_config(config: str | Path) -> tuple[str, dict[str, Any]]:
    """Read an authors' model config: a JSON file, or the name of a shipped one.

    A reference folder's ``config.json`` (the config under ``model_config``) is accepted.

    Returns:
        ``(architecture_name, config)``; the name is the file name without
        ``-adapter.json`` (``convnext_large_d_320-adapter.json`` -> ``convnext_large_d_320``).

    Raises:
        ModelError: unreadable, or lacking the keys a model needs.
    """
    path = Path(config).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"model config {path} cannot be read: {exc}") from None
        label = str(path)
        stem = path.stem
        if stem == "config" and path.parent.name:
            stem = path.parent.name  # a reference folder: name it after the folder
    else:
        if path.parent != Path("."):  # a path, not a bare name: the file is just missing
            raise ModelError(f"model config {path} does not exist")
        data = shipped_config(str(config))
        label = f"shipped config {config}"
        stem = str(config)[: -len(".json")] if str(config).endswith(".json") else str(config)
    if isinstance(data, dict) and "model_config" in data and "embed_dim" not in data:
        data = data["model_config"]
    if not isinstance(data, dict):
        raise ModelError(f"{label} is not a JSON object")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg", "adapter_cfg") if k not in data]
    if missing:
        raise ModelError(
            f"{label} lacks {', '.join(missing)}: it is not a ranking-adapter model config "
            f"(the authors' configs have embed_dim, vision_cfg, text_cfg and adapter_cfg)"
        )
    name = stem[: -len("-adapter")] if stem.endswith("-adapter") else stem
    return name, data


def _authors_preprocess(config: dict[str, Any]) -> PreprocessConfig:
    # The authors' inference transform: Resize((S, S)) on a PIL image (bilinear,
    # antialiased), ToTensor, OpenAI mean/std. No crop.
    size = config["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return PreprocessConfig(
        image_size=int(size),
        resize_mode="squash",
        interpolation="bilinear",
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
    )


def _clip_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the CLIP a config builds, without allocating its weights."""
    import torch

    from imgrank.models.clip.build import build_clip

    with torch.device("meta"):
        model = build_clip(clip_config(config))
    return _shapes(model)


def import_authors_checkpoint(
    checkpoint: str | Path,
    config: str | Path = RELEASED_CONFIG,
    out: str | Path = "",
    *,
    model_name: str | None = None,
) -> ModelFolder:
    """Turn an authors' checkpoint and model config into a self-contained model folder.

    The checkpoint is a ``.pt`` dict with a ``state_dict`` (keys possibly
    prefixed ``module.``) holding CLIP and the adapter; it is read with
    ``torch.load(weights_only=True)``. The folder keeps the CLIP weights
    (``backbone.safetensors``), the adapter weights, the authors' config
    inline, their preprocessing (squash-resize to the config's image size,
    bilinear, OpenAI mean/std) and verbatim prompts.

    Args:
        checkpoint: The authors' ``.pt`` file.
        config: Their model config JSON, or the name of a config shipped with
            imgrank (default: the one of their released checkpoints).
        out: The folder to create (must not exist or be empty).
        model_name: Name recorded for the backbone (default: from the config file name).

    Raises:
        ModelError: unreadable files.
        AdapterMismatchError: the checkpoint does not match the config; every
            missing, unexpected or mis-shaped key is listed.
        UnsafeOperationError: ``out`` exists and is not empty.
    """
    from imgrank.models.adapter import AdapterConfig, RankingAdapter
    from imgrank.models.clip.weights import read_state_dict

    if not str(out):
        raise ModelError("no output folder given")
    checkpoint = Path(checkpoint).expanduser()
    name, model_config = read_authors_config(config)
    adapter_config = AdapterConfig(**model_config["adapter_cfg"])
    check_backbone_fits(model_config, adapter_config, what=f"the backbone of {config}")

    state = read_state_dict(checkpoint)  # weights_only=True; `module.` stripped
    prefix = "adapter."
    adapter_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    clip_state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    adapter = RankingAdapter(adapter_config)
    problems = [f"CLIP keys {p}" for p in _mismatches(_clip_shapes(model_config), clip_state)]
    problems += [
        f"adapter keys {p}" for p in _mismatches(_shapes(adapter), adapter_state, prefix=prefix)
    ]
    if problems:
        raise AdapterMismatchError(
            f"{checkpoint} does not match the model config {config}: "
            + "; ".join(problems)
            + ". Pass the config the checkpoint was trained with (--config)."
        )
    adapter.load_state_dict(adapter_state, strict=True)
    spec = BackboneSpec(
        model=model_name or name,
        pretrained=RANDOM_WEIGHTS,  # replaced by backbone_weights below
        preprocess=_authors_preprocess(model_config),
        model_config=clip_config(model_config),
    )
    source = {
        "imported_from": "authors-checkpoint",
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": _sha256(checkpoint),
        "config": Path(str(config)).name,
        "misc_cfg": model_config.get("misc_cfg", {}),
    }
    return save_model_folder(out, adapter, spec, source=source, backbone_weights=clip_state)
