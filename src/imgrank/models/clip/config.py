"""What a backbone is: an open_clip model name or config JSON, weights, preprocessing.

A backbone is named by ``--model`` (an open_clip model name such as
``ViT-B-32``, or a path to an open_clip-style config JSON with ``embed_dim``,
``vision_cfg`` and ``text_cfg``) and ``--pretrained`` (an open_clip pretrained
tag, a local ``.safetensors``/``.pt``/``.bin`` weights file, or ``none``).

Nothing here imports torch; open_clip only to look up a model name that is not a file.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from imgrank.errors import ModelError

#: The default backbone: ViT-B-32 is the cheapest of the well-trained CLIP
#: image towers (about 4.4 GFLOPs per 224 px image, 49 patch tokens), so a
#: 2-core laptop sorts hundreds of photos a minute, and LAION-2B weights give
#: it the best zero-shot quality of its size class.
DEFAULT_MODEL = "ViT-B-32"


DEFAULT_PRETRAINED = "laion2b_s34b_b79k"


#: The value of ``--pretrained`` that asks for random weights (tests, benchmarks).
RANDOM_WEIGHTS = "none"


OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


ResizeMode = Literal["crop", "squash", "shortest"]


# Keys of an open_clip model config that the CLIP constructors understand; the
# authors' configs carry more (``adapter_cfg``, ``misc_cfg``) that we drop here.
CLIP_CONFIG_KEYS = (
    "embed_dim",
    "vision_cfg",
    "text_cfg",
    "quick_gelu",
    "init_logit_scale",
    "init_logit_bias",
    "nonscalar_logit_scale",
)


@dataclass(frozen=True)
class PreprocessConfig:
    """How pixels are prepared for the image tower.

    Attributes:
        image_size: Side of the square model input, in pixels.
        resize_mode: ``crop`` resizes the shorter side to ``image_size`` and
            centre-crops (open_clip's default); ``squash`` resizes to exactly
            ``image_size`` x ``image_size`` without keeping the aspect ratio
            (the ranking-adapter authors' choice).
        interpolation: ``bicubic`` or ``bilinear`` (both antialiased).
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation standard deviation.
    """

    image_size: int = 224
    resize_mode: ResizeMode = "crop"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {k: data[k] for k in ("image_size", "resize_mode", "interpolation") if k in data}
        if "mean" in data:
            known["mean"] = tuple(float(v) for v in data["mean"])
        if "std" in data:
            known["std"] = tuple(float(v) for v in data["std"])
        for name in ("mean", "std"):
            values = known.get(name)
            if values is None:
                continue
            # A zero std divides every pixel by zero: every score would be NaN.
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise ValueError(f"{name} must be three finite numbers, not {list(values)}")
            if name == "std" and min(values) <= 0:
                raise ValueError(f"std must be positive, not {list(values)}")
        return cls(**known)

    def fingerprint(self) -> str:
        """A short stable hash: cached features are only valid for the same preprocessing."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class BackboneSpec:
    """What the user asked for: a model (name or config JSON) and its weights."""

    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    #: Overrides the preprocessing the model would otherwise imply (adapters do this).
    preprocess: PreprocessConfig | None = None
    #: Inline open_clip config; set when the config came from an adapter folder.
    model_config: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def is_random(self) -> bool:
        return self.pretrained.lower() == RANDOM_WEIGHTS


def open_clip_folder() -> Path | None:
    """open_clip's package folder, found without importing the package."""
    import importlib.util

    found = importlib.util.find_spec("open_clip")
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def named_model_config(name: str) -> dict[str, Any] | None:
    """open_clip's config for a model name, read from its JSON file without importing open_clip.

    Importing open_clip costs 1.4 s (it imports torchvision and ``torch._dynamo``);
    its registry holds exactly these files' contents. None when there is no such
    file (the caller then asks open_clip itself).
    """
    folder = open_clip_folder()
    if folder is None or not name or "/" in name or "\\" in name:
        return None
    try:
        config = json.loads((folder / "model_configs" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not all(
        key in config for key in ("embed_dim", "vision_cfg", "text_cfg")
    ):
        return None
    return config


def resolve_model_config(spec: BackboneSpec) -> tuple[str, dict[str, Any]]:
    """Return ``(display_name, open_clip_config)`` for a spec.

    Raises:
        ModelError: the name is neither a known open_clip model nor a readable JSON file.
    """
    if spec.model_config is not None:
        return spec.model, dict(spec.model_config)
    path = Path(spec.model).expanduser()
    if spec.model.endswith(".json") or path.is_file():
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"model config {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"model config {path} cannot be read: {exc}") from None
        if "model_config" in config and "embed_dim" not in config:
            config = config["model_config"]  # a reference folder's config.json
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
        if missing:
            raise ModelError(f"model config {path} lacks {', '.join(missing)}")
        return str(path), config

    # Read from open_clip's JSON file first: an adapter's named backbone is checked
    # before a cached re-sort could skip open_clip (1.4 s) altogether.
    config = named_model_config(spec.model)
    if config is not None:
        return spec.model, config

    import open_clip

    config = open_clip.get_model_config(spec.model)
    if config is None:
        import difflib

        close = difflib.get_close_matches(spec.model, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model {spec.model!r}: not an open_clip model name nor a config JSON file."
            f"{hint} `python -c 'import open_clip; print(open_clip.list_models())'` lists them."
        )
    return spec.model, config


def default_preprocess(config: dict[str, Any]) -> PreprocessConfig:
    """open_clip's own preprocessing for a model config (resize shorter side + centre crop)."""
    vision = config.get("vision_cfg", {})
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        size = int(size[0])
    pp = config.get("preprocess_cfg", {})
    mean = tuple(pp.get("mean", OPENAI_MEAN))
    std = tuple(pp.get("std", OPENAI_STD))
    interpolation = pp.get("interpolation", "bicubic")
    resize_mode = pp.get("resize_mode", "shortest")
    mode: ResizeMode = "squash" if resize_mode == "squash" else "crop"
    return PreprocessConfig(
        image_size=int(size), resize_mode=mode, interpolation=interpolation, mean=mean, std=std
    )
