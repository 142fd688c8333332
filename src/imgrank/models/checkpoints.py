"""imgrank model folders: saving and loading adapters, importing the authors' checkpoints.

A model folder is self-describing and never needs unpickling::

    DIR/
      config.json            what the adapter is and what it runs on (below)
      adapter.safetensors    the adapter's state dict (the authors' keys, no prefix)
      backbone.safetensors   only when the backbone weights are kept in the folder

``config.json`` (``format_version`` 1)::

    {
      "format": "imgrank-adapter",
      "format_version": 1,
      "adapter": {...AdapterConfig fields, "variant": "full", ...},
      "backbone": {
        "model": "convnext_large_d_320",      # open_clip name (or a display name)
        "model_config": {...} | null,         # inline open_clip config; wins over the name
        "pretrained": "laion2b_..." | "none" | null,   # an open_clip tag, or random weights
        "weights": "backbone.safetensors" | null       # a file inside DIR
      },
      "preprocess": {"image_size": 320, "resize_mode": "squash",
                     "interpolation": "bilinear", "mean": [...], "std": [...]},
      "prompt_format": "{}",                  # how a prompt is turned into the text fed
      "target_range": [lo, hi] | null,        # targets seen in training, when known
      "source": {...}                         # provenance, informational only
    }

Exactly one of ``backbone.pretrained`` and ``backbone.weights`` is set.
Everything here is documented for users in ``docs/adapter.md``.

The small API the rest of imgrank uses: :class:`ModelFolder`,
:func:`load_model_folder`, :func:`save_model_folder`, :func:`load_adapter`,
:func:`import_authors_checkpoint`, :func:`shipped_config`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgrank.errors import AdapterMismatchError, ModelError
from imgrank.files.atomic import atomic_folder
from imgrank.models.clip.config import (
    OPENAI_MEAN,
    OPENAI_STD,
    RANDOM_WEIGHTS,
    BackboneSpec,
    PreprocessConfig,
)

if TYPE_CHECKING:
    import torch

    from imgrank.models.adapter import AdapterConfig, RankingAdapter

FORMAT_NAME = "imgrank-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
ADAPTER_FILE = "adapter.safetensors"
BACKBONE_FILE = "backbone.safetensors"

#: How prompts are fed to the text tower: ``{}`` is replaced by the user's prompt.
VERBATIM_PROMPT = "{}"

#: Model configs shipped inside the package (``imgrank/configs/NAME.json``).
_CONFIG_FOLDER = "configs"
#: The config of the authors' released checkpoints (object count, image quality, multi-task).
RELEASED_CONFIG = "convnext_large_d_320-adapter"

# Keys of an authors' model config that describe the adapter or their training,
# not the CLIP towers.
_NON_CLIP_KEYS = ("adapter_cfg", "misc_cfg")


@dataclass(frozen=True)
class ModelFolder:
    """A loaded ``config.json`` of an imgrank model folder.

    Attributes:
        path: The folder.
        adapter_config: Shape and variant of the adapter.
        backbone_spec: The backbone to build with :func:`imgrank.models.clip.build.load_backbone`:
            its ``pretrained`` is an open_clip tag, ``none``, or the absolute
            path of the weights file kept in the folder; ``preprocess`` is set.
        prompt_format: ``{}`` is replaced by the prompt (``{}`` alone = verbatim).
        target_range: ``(low, high)`` of the training targets, when known.
        source: Provenance (importer, checkpoint hash, training run), informational.
    """

    path: Path
    adapter_config: AdapterConfig
    backbone_spec: BackboneSpec
    prompt_format: str = VERBATIM_PROMPT
    target_range: tuple[float, float] | None = None
    source: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def variant(self) -> str:
        return self.adapter_config.variant

    @property
    def adapter_weights(self) -> Path:
        return self.path / ADAPTER_FILE

    @property
    def backbone_weights(self) -> Path | None:
        """The weights file kept in the folder, or None when the backbone is named by a tag."""
        candidate = Path(self.backbone_spec.pretrained)
        return candidate if candidate.is_absolute() and candidate.parent == self.path else None

    @property
    def kind(self) -> str:
        """``adapter`` (a ranking-aware adapter) or a head kind (``linear-head``, ``mlp-head``)."""
        return "adapter"

    @property
    def display_name(self) -> str:
        """What scores, as summaries and reports name it."""
        return f"ranking adapter {self.path.name} ({self.variant})"

    def describe_kind(self) -> str:
        """``the adapter`` or ``the linear head``: for messages."""
        return "the adapter" if self.kind == "adapter" else f"the {self.kind.replace('-', ' ')}"

    def format_prompt(self, prompt: str) -> str:
        """The text fed to the text tower for a user's prompt."""
        return self.prompt_format.replace("{}", prompt)


# ---------------------------------------------------------------------------
# shipped configs and the authors' config files


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


def clip_config(config: dict[str, Any]) -> dict[str, Any]:
    """The open_clip part of an authors' model config (``adapter_cfg``/``misc_cfg`` dropped)."""
    return {k: v for k, v in config.items() if k not in _NON_CLIP_KEYS}


def adapter_token_widths(config: dict[str, Any]) -> tuple[int, int]:
    """Widths of the image tokens and text tokens a backbone config produces for the adapter.

    Raises:
        AdapterMismatchError: the image tower pools its features into one vector
            (a timm trunk with pooling or a projection head), so it has no token grid.
    """
    vision = config.get("vision_cfg", {})
    embed_dim = int(config["embed_dim"])
    if "timm_model_name" in vision:
        pool, proj = vision.get("timm_pool", "avg"), vision.get("timm_proj", "linear")
        if pool or proj:
            raise AdapterMismatchError(
                f"the image tower {vision['timm_model_name']} has timm_pool={pool!r} and "
                f"timm_proj={proj!r}, so it returns one pooled vector, not the token grid the "
                'adapter reads; the authors\' configs use timm_pool "" and timm_proj "" '
                "(use their config, e.g. the shipped convnext_large_d_320-adapter)"
            )
    elif "hf_model_name" in config.get("text_cfg", {}):
        raise AdapterMismatchError(
            "adapters run on open_clip's own text towers, not Hugging Face ones"
        )
    text_width = int(config.get("text_cfg", {}).get("width", 512))
    return embed_dim, text_width


def check_backbone_fits(
    config: dict[str, Any], adapter_config: AdapterConfig, *, what: str
) -> None:
    """Refuse a backbone whose tokens do not have the adapter's width.

    Raises:
        AdapterMismatchError: naming ``what`` (the backbone as the user called it).
    """
    image_width, text_width = adapter_token_widths(config)
    width = adapter_config.d_model
    problems = []
    if image_width != width:
        problems.append(f"its image tokens are {image_width} wide")
    if text_width != width:
        problems.append(f"its text tokens are {text_width} wide")
    if problems:
        raise AdapterMismatchError(
            f"{what} does not fit an adapter of width {width}: " + " and ".join(problems)
        )


def check_folder_fits(folder: ModelFolder, config: dict[str, Any], *, what: str) -> None:
    """Refuse a backbone config whose features do not fit the folder's adapter or head.

    Raises:
        AdapterMismatchError: naming ``what`` (the backbone as the user called it).
    """
    check_backbone_fits(config, folder.adapter_config, what=what)


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


# ---------------------------------------------------------------------------
# state-dict checks


def _mismatches(
    expected: dict[str, tuple[int, ...]], state: dict[str, Any], prefix: str = ""
) -> list[str]:
    """Human-readable differences between the keys/shapes a module needs and a state dict."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{prefix}{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != expected[k]
    )
    for label, keys in (
        ("missing", [prefix + k for k in missing]),
        ("unexpected", [prefix + k for k in unexpected]),
        ("wrong shape", shapes),
    ):
        if keys:
            shown = ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")
            problems.append(f"{label}: {shown}")
    return problems


def _shapes(module: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _clip_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the CLIP a config builds, without allocating its weights."""
    import torch

    from imgrank.models.clip.build import build_clip

    with torch.device("meta"):
        model = build_clip(clip_config(config))
    return _shapes(model)


def load_adapter_state(module: RankingAdapter, state: dict[str, Any], *, source: str) -> None:
    """Load an adapter state dict strictly; the error lists every mismatched key."""
    problems = _mismatches(_shapes(module), state)
    if problems:
        raise AdapterMismatchError(
            f"the adapter weights in {source} do not fit its config "
            f"(variant {module.config.variant}, d_model {module.config.d_model}): "
            + "; ".join(problems)
        )
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------
# reading a folder


def _config_error(path: Path, message: str) -> ModelError:
    return ModelError(f"{path / CONFIG_FILE}: {message}")


def load_model_folder(path: str | Path) -> ModelFolder:
    """Read a model folder's ``config.json`` (no weights are loaded).

    Raises:
        ModelError: not a model folder, an unknown format version, or a config
            that names files outside the folder or formats that would need unpickling.
    """
    from imgrank.models.adapter import AdapterConfig

    folder = Path(path).expanduser().resolve()
    config_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise ModelError(f"adapter folder {folder} does not exist")
    if not config_path.is_file():
        raise ModelError(
            f"{folder} is not an imgrank model folder (no {CONFIG_FILE}); create one with "
            "`imgrank adapter import` or `imgrank train`"
        )
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _config_error(folder, f"cannot be read: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise _config_error(folder, f'not an imgrank model config (no "format": "{FORMAT_NAME}")')
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise _config_error(
            folder,
            f"format version {version!r} is not supported by this imgrank (it reads version "
            f"{FORMAT_VERSION}); upgrade imgrank",
        )
    try:
        adapter_config = AdapterConfig(**data["adapter"])
        backbone = data["backbone"]
        preprocess = PreprocessConfig.from_dict(data["preprocess"])
    except KeyError as exc:
        raise _config_error(folder, f"lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise _config_error(folder, f"malformed: {exc}") from None
    if preprocess.resize_mode not in ("squash", "crop") or preprocess.interpolation not in (
        "bilinear",
        "bicubic",
    ):
        raise _config_error(folder, f"unsupported preprocessing {preprocess.to_dict()}")

    model = backbone.get("model")
    inline = backbone.get("model_config")
    if not model and not inline:
        raise _config_error(folder, "backbone names neither a model nor a model_config")
    weights, pretrained = backbone.get("weights"), backbone.get("pretrained")
    if bool(weights) == bool(pretrained):
        raise _config_error(folder, 'backbone needs exactly one of "pretrained" and "weights"')
    if weights:
        weights_path = (folder / weights).resolve()
        # The weights must be a safetensors file inside the folder: a config must
        # not make imgrank read (let alone unpickle) a file from elsewhere.
        if weights_path.parent != folder or weights_path.suffix != ".safetensors":
            raise _config_error(
                folder,
                f"backbone weights {weights!r} must be a .safetensors file inside the folder",
            )
        if not weights_path.is_file():
            raise ModelError(f"{weights_path} is missing: the model folder is incomplete")
        pretrained = str(weights_path)
    elif os.sep in str(pretrained) or str(pretrained).endswith(
        (".pt", ".bin", ".pth", ".safetensors")
    ):
        raise _config_error(
            folder,
            f"backbone pretrained {pretrained!r} must be an open_clip tag or 'none', not a file",
        )
    target_range = data.get("target_range")
    if target_range is not None:
        if not (isinstance(target_range, list) and len(target_range) == 2):
            raise _config_error(folder, "target_range must be [low, high] or null")
        target_range = (float(target_range[0]), float(target_range[1]))
    prompt_format = data.get("prompt_format", VERBATIM_PROMPT)
    if not isinstance(prompt_format, str) or prompt_format.count("{}") != 1:
        raise _config_error(folder, 'prompt_format must contain "{}" exactly once')
    spec = BackboneSpec(
        model=str(model or "inline"),
        pretrained=str(pretrained),
        preprocess=preprocess,
        model_config=inline,
    )
    if inline is not None:
        check_backbone_fits(inline, adapter_config, what=f"the backbone in {config_path}")
    return ModelFolder(
        path=folder,
        adapter_config=adapter_config,
        backbone_spec=spec,
        prompt_format=prompt_format,
        target_range=target_range,
        source=dict(data.get("source") or {}),
    )


def load_adapter(folder: ModelFolder | str | Path, *, device: str = "cpu") -> RankingAdapter:
    """Build the folder's adapter and load ``adapter.safetensors`` into it (eval mode).

    Raises:
        ModelError: the weights file is missing or unreadable.
        AdapterMismatchError: the weights do not fit the config (keys listed).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from imgrank.models.adapter import RankingAdapter

    if not isinstance(folder, ModelFolder):
        folder = load_model_folder(folder)
    weights = folder.adapter_weights
    if not weights.is_file():
        raise ModelError(f"{weights} is missing: the model folder is incomplete")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"cannot read {weights}: {exc}") from None
    adapter = RankingAdapter(folder.adapter_config)
    load_adapter_state(adapter, state, source=str(weights))
    return adapter.eval().to(device)


# ---------------------------------------------------------------------------
# writing a folder


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses views and shared storage: store plain contiguous copies.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(plain, str(path), metadata={"format": "pt"})


def trained_prompts(model: ModelFolder) -> list[str]:
    """The prompts the adapter was trained on, as ``imgrank train`` recorded them
    (empty for folders that do not say, such as imported checkpoints)."""
    prompts = model.source.get("prompts")
    if not isinstance(prompts, list):
        return []
    return [p for p in prompts if isinstance(p, str)]


def save_model_folder(
    out: str | Path,
    adapter: RankingAdapter,
    backbone: BackboneSpec,
    *,
    prompt_format: str = VERBATIM_PROMPT,
    target_range: tuple[float, float] | None = None,
    source: dict[str, Any] | None = None,
    backbone_weights: dict[str, torch.Tensor] | None = None,
    extra_files: dict[str, str] | None = None,
) -> ModelFolder:
    """Write a model folder and return it as :func:`load_model_folder` reads it back.

    Args:
        out: A folder that does not exist yet (or is empty).
        adapter: The trained adapter; its ``config`` is saved with it.
        backbone: The backbone the adapter's tokens came from. An open_clip tag
            (or ``none``) is stored as is; a local weights file is copied into
            the folder as ``backbone.safetensors`` so the folder stands alone;
            a config given as a JSON path or inline is stored inline. Its
            ``preprocess`` (open_clip's default for the model when None) is saved.
        prompt_format: ``{}`` is replaced by the prompt (``"{}"``: verbatim).
        target_range: ``(low, high)`` of the training targets, when known.
        source: Provenance to record (informational).
        backbone_weights: CLIP weights to keep in the folder instead of ``backbone.pretrained``.
        extra_files: More text files to write into the folder (name: content),
            part of the folder from the moment it appears under its name.

    Raises:
        UnsafeOperationError: ``out`` exists and is not empty.
        AdapterMismatchError: the backbone's tokens do not have the adapter's width.
    """
    from imgrank.models.clip.config import default_preprocess, resolve_model_config
    from imgrank.models.clip.weights import read_state_dict

    if prompt_format.count("{}") != 1:
        raise ModelError('prompt_format must contain "{}" exactly once')
    name, config = resolve_model_config(backbone)
    check_backbone_fits(config, adapter.config, what=f"the backbone {name}")
    preprocess = backbone.preprocess or default_preprocess(config)
    by_name = backbone.model_config is None and not Path(backbone.model).expanduser().is_file()
    entry: dict[str, Any] = {
        "model": Path(name).stem if not by_name else name,
        "model_config": None if by_name else clip_config(config),
        "pretrained": None,
        "weights": None,
    }
    if backbone_weights is None and not backbone.is_random:
        candidate = Path(backbone.pretrained).expanduser()
        if candidate.is_file():
            backbone_weights = read_state_dict(candidate)
    if backbone_weights is not None:
        entry["weights"] = BACKBONE_FILE
    else:
        entry["pretrained"] = backbone.pretrained
    data = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "adapter": adapter.config.to_dict(),
        "backbone": entry,
        "preprocess": preprocess.to_dict(),
        "prompt_format": prompt_format,
        "target_range": None
        if target_range is None
        else [float(target_range[0]), float(target_range[1])],
        "source": source or {},
    }
    out_path = Path(out)
    with atomic_folder(out_path) as tmp:
        _save_tensors(adapter.state_dict(), tmp / ADAPTER_FILE)
        if backbone_weights is not None:
            clip_only = {k: v for k, v in backbone_weights.items() if not k.startswith("adapter.")}
            _save_tensors(clip_only, tmp / BACKBONE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(content, encoding="utf-8")
    return load_model_folder(out_path)


# ---------------------------------------------------------------------------
# importing the authors' checkpoints


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
