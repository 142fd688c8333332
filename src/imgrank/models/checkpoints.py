"""imgrank model folders: saving and loading adapters and heads, importing heads.

A model folder is self-describing and never needs unpickling::

    DIR/
      config.json            what the adapter is and what it runs on (below)
      adapter.safetensors    the adapter's state dict (the authors' keys, no prefix)
      backbone.safetensors   only when the backbone weights are kept in the folder

``config.json`` (``format_version`` 1 for adapters, 2 for heads)::

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

A head folder (``format_version`` 2, written by ``imgrank adapter import FILE
--model M --pretrained P``) has ``"kind": "linear-head"`` or ``"mlp-head"``,
``"head": {"kind": ..., "input_dim": E}`` instead of ``"adapter"``, and
``head.safetensors`` instead of ``adapter.safetensors`` (see
:mod:`imgrank.models.heads`). Version 1 readers refuse it with "upgrade imgrank".
Everything here is documented for users in ``docs/adapter.md``.

The small API the rest of imgrank uses: :class:`ModelFolder`,
:func:`load_model_folder`, :func:`save_model_folder`, :func:`load_adapter`,
:func:`load_head`, :func:`import_head`. The authors' checkpoints are imported by
:mod:`imgrank.models.authors`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgrank.errors import AdapterMismatchError, ModelError
from imgrank.files.atomic import atomic_folder
from imgrank.models.clip.config import (
    BackboneSpec,
    PreprocessConfig,
)

if TYPE_CHECKING:
    import torch

    from imgrank.models.adapter import RankingAdapter
    from imgrank.models.adapter_config import AdapterConfig
    from imgrank.models.heads import HeadConfig

FORMAT_NAME = "imgrank-adapter"
FORMAT_VERSION = 1
#: Head folders need a reader that knows heads: older imgranks then say "upgrade".
HEAD_FORMAT_VERSION = 2
READABLE_VERSIONS = (FORMAT_VERSION, HEAD_FORMAT_VERSION)
HEAD_FILE = "head.safetensors"
CONFIG_FILE = "config.json"
ADAPTER_FILE = "adapter.safetensors"
BACKBONE_FILE = "backbone.safetensors"

#: How prompts are fed to the text tower: ``{}`` is replaced by the user's prompt.
VERBATIM_PROMPT = "{}"


# Keys of an authors' model config that describe the adapter or their training,
# not the CLIP towers.
_NON_CLIP_KEYS = ("adapter_cfg", "misc_cfg")


@dataclass(frozen=True)
class ModelFolder:
    """A loaded ``config.json`` of an imgrank model folder.

    Attributes:
        path: The folder.
        adapter_config: Shape and variant of the adapter (None in a head folder).
        backbone_spec: The backbone to build with :func:`imgrank.models.clip.build.load_backbone`:
            its ``pretrained`` is an open_clip tag, ``none``, or the absolute
            path of the weights file kept in the folder; ``preprocess`` is set.
        prompt_format: ``{}`` is replaced by the prompt (``{}`` alone = verbatim).
        target_range: ``(low, high)`` of the training targets, when known.
        source: Provenance (importer, checkpoint hash, training run), informational.
        kind: ``adapter``, or a head kind (``linear-head``, ``mlp-head``).
        head: What the head is, in a head folder.
    """

    path: Path
    adapter_config: AdapterConfig | None
    backbone_spec: BackboneSpec
    prompt_format: str = VERBATIM_PROMPT
    target_range: tuple[float, float] | None = None
    source: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    kind: str = "adapter"
    head: HeadConfig | None = None

    @property
    def variant(self) -> str:
        """The adapter's variant (``full``...), or the head's kind."""
        return self.adapter_config.variant if self.adapter_config is not None else self.kind

    @property
    def head_weights(self) -> Path:
        return self.path / HEAD_FILE

    @property
    def adapter_weights(self) -> Path:
        return self.path / ADAPTER_FILE

    @property
    def backbone_weights(self) -> Path | None:
        """The weights file kept in the folder, or None when the backbone is named by a tag."""
        candidate = Path(self.backbone_spec.pretrained)
        return candidate if candidate.is_absolute() and candidate.parent == self.path else None

    @property
    def display_name(self) -> str:
        """What scores, as summaries and reports name it."""
        if self.head is not None:
            return f"{self.head.label} {self.path.name}"
        return f"ranking adapter {self.path.name} ({self.variant})"

    def describe_kind(self) -> str:
        """``the adapter`` or ``the linear head``: for messages."""
        return "the adapter" if self.kind == "adapter" else f"the {self.kind.replace('-', ' ')}"

    def format_prompt(self, prompt: str) -> str:
        """The text fed to the text tower for a user's prompt."""
        return self.prompt_format.replace("{}", prompt)


# ---------------------------------------------------------------------------
# what a backbone must be to carry a folder's adapter or head


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
    if folder.head is not None:
        from imgrank.models.heads import check_head_fits

        check_head_fits(config, folder.head, what=what)
    else:
        assert folder.adapter_config is not None
        check_backbone_fits(config, folder.adapter_config, what=what)


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


def folder_identity(folder: ModelFolder) -> list[tuple[str, int, int]]:
    """The model folder's files by name, size and modification time (no file is read).

    What keys things derived from a folder (its automatic ONNX export, cached
    adapter scores): retraining into the folder or replacing a file changes it.
    """
    found = []
    for path in sorted(folder.path.iterdir()):
        if path.is_file():
            stat = path.stat()
            found.append((path.name, stat.st_size, stat.st_mtime_ns))
    return found


def load_model_folder(path: str | Path) -> ModelFolder:
    """Read a model folder's ``config.json`` (no weights are loaded).

    Raises:
        ModelError: not a model folder, an unknown format version, or a config
            that names files outside the folder or formats that would need unpickling.
    """
    from imgrank.models.heads import HEAD_KINDS, HeadConfig

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
    if version not in READABLE_VERSIONS:
        raise _config_error(
            folder,
            f"format version {version!r} is not supported by this imgrank (it reads version "
            f"{' and '.join(map(str, READABLE_VERSIONS))}); upgrade imgrank",
        )
    try:
        kind = data.get("kind", "adapter")
        head: HeadConfig | None = None
        adapter_config: AdapterConfig | None = None
        if kind in HEAD_KINDS:
            head = HeadConfig.from_dict(data["head"])
            if head.kind != kind:
                raise TypeError(f"kind {kind!r} but head kind {head.kind!r}")
        elif kind == "adapter":
            # The torch-free configuration: reading a folder never imports torch.
            from imgrank.models.adapter_config import AdapterConfig

            adapter_config = AdapterConfig(**data["adapter"])
        else:
            raise TypeError(f"unknown kind {kind!r}")
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
    loaded = ModelFolder(
        path=folder,
        adapter_config=adapter_config,
        backbone_spec=spec,
        prompt_format=prompt_format,
        target_range=target_range,
        source=dict(data.get("source") or {}),
        kind=kind,
        head=head,
    )
    if inline is not None:
        check_folder_fits(loaded, inline, what=f"the backbone in {config_path}")
    return loaded


def load_adapter(folder: ModelFolder | str | Path, *, device: str = "cpu") -> RankingAdapter:
    """Build the folder's adapter and load ``adapter.safetensors`` into it (eval mode).

    Raises:
        ModelError: the weights file is missing or unreadable.
        AdapterMismatchError: the weights do not fit the config (keys listed).
    """
    from imgrank.models.adapter import RankingAdapter

    folder = _as_folder(folder)
    if folder.adapter_config is None:
        raise ModelError(f"{folder.path} holds a {folder.kind}, not a ranking adapter")
    weights = folder.adapter_weights
    state = _read_weights(weights, "torch")
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


def _backbone_entry(
    backbone: BackboneSpec,
    config: dict[str, Any],
    name: str,
    backbone_weights: dict[str, torch.Tensor] | None,
) -> tuple[dict[str, Any], PreprocessConfig, dict[str, torch.Tensor] | None]:
    """The ``backbone`` entry of config.json, the preprocessing, and weights to keep in the folder.

    An open_clip tag (or ``none``) is stored as is; a local weights file is
    read to be copied into the folder; a config given as a JSON path or inline
    is stored inline.
    """
    from imgrank.models.clip.config import default_preprocess
    from imgrank.models.clip.weights import read_state_dict

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
    return entry, preprocess, backbone_weights


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
    from imgrank.models.clip.config import resolve_model_config

    if prompt_format.count("{}") != 1:
        raise ModelError('prompt_format must contain "{}" exactly once')
    name, config = resolve_model_config(backbone)
    check_backbone_fits(config, adapter.config, what=f"the backbone {name}")
    entry, preprocess, backbone_weights = _backbone_entry(backbone, config, name, backbone_weights)
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
# heads (LAION aesthetic predictor formats)


def load_head(folder: ModelFolder | str | Path) -> torch.nn.Module:
    """Build the folder's head and load ``head.safetensors`` into it (float32, eval mode).

    Raises:
        ModelError: not a head folder, or a missing, unreadable or mis-shaped weights file.
    """
    from imgrank.models.heads import load_head_module

    folder = _head_folder(folder)
    assert folder.head is not None
    state = _read_weights(folder.head_weights, "torch")
    return load_head_module(folder.head, state, source=str(folder.head_weights))


def load_head_arrays(folder: ModelFolder | str | Path) -> dict[str, Any]:
    """The folder's head weights as float32 numpy arrays (read without torch).

    Raises:
        ModelError: not a head folder, or a missing or unreadable weights file.
    """
    import numpy as np

    state = _read_weights(_head_folder(folder).head_weights, "numpy")
    return {key: np.asarray(value, dtype=np.float32) for key, value in state.items()}


def _as_folder(folder: ModelFolder | str | Path) -> ModelFolder:
    return folder if isinstance(folder, ModelFolder) else load_model_folder(folder)


def _head_folder(folder: ModelFolder | str | Path) -> ModelFolder:
    """The folder, read if given as a path, refused unless it holds a head."""
    folder = _as_folder(folder)
    if folder.head is None:
        raise ModelError(f"{folder.path} holds a ranking adapter, not a head")
    return folder


def _read_weights(weights: Path, framework: str) -> dict[str, Any]:
    """A model folder's safetensors file as torch tensors (on the CPU) or numpy arrays.

    Raises:
        ModelError: the file is missing or unreadable, naming it.
    """
    from safetensors import SafetensorError

    if not weights.is_file():
        raise ModelError(f"{weights} is missing: the model folder is incomplete")
    try:
        if framework == "torch":
            from safetensors.torch import load_file as load_torch

            return dict(load_torch(str(weights), device="cpu"))
        from safetensors.numpy import load_file as load_numpy

        return dict(load_numpy(str(weights)))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot read {weights}: {exc}") from None


def looks_like_head(path: str | Path) -> bool:
    """Whether a weights file's keys are a linear/MLP head's (read without loading its tensors)."""
    from imgrank.models.clip.weights import WeightsFile

    try:
        keys = set(WeightsFile(Path(path).expanduser()).shapes)
    except ModelError:
        return False  # the importer that runs next words the problem
    return bool(keys) and (keys == {"weight", "bias"} or all(k.startswith("layers.") for k in keys))


def import_head(
    head_file: str | Path,
    out: str | Path,
    *,
    model: str,
    pretrained: str,
    kind: str | None = None,
) -> ModelFolder:
    """Turn a LAION-format head file into a model folder on a named backbone.

    The head's kind is detected from its keys (``kind`` forces it); a head
    whose input width is not the backbone's embedding width is refused. The
    file is read with ``torch.load(weights_only=True)`` (or safetensors), so a
    pickle that would run code is refused.

    Args:
        head_file: ``.pth``/``.pt``/``.bin`` or ``.safetensors`` state dict.
        out: The folder to create (must not exist or be empty).
        model: The backbone the head was trained on (open_clip name or config JSON).
        pretrained: Its weights (an open_clip tag such as ``openai``, a local
            file, copied into the folder, or ``none``).
        kind: ``linear-head`` or ``mlp-head`` to skip detection.

    Raises:
        ModelError: unreadable files, or not a head of the published shapes.
        AdapterMismatchError: the head's input width is not the backbone's.
        UnsafeOperationError: ``out`` exists and is not empty.
    """
    from imgrank.models.clip.config import resolve_model_config
    from imgrank.models.clip.weights import read_state_dict
    from imgrank.models.heads import check_head_fits, detect_head, load_head_module

    head_file = Path(head_file).expanduser()
    state = read_state_dict(head_file)  # weights_only=True; `state_dict`/`module.` unwrapped
    head = detect_head(state, kind, source=str(head_file))
    backbone = BackboneSpec(model=model, pretrained=pretrained)
    name, config = resolve_model_config(backbone)
    check_head_fits(config, head, what=f"--model {model}")
    module = load_head_module(head, state, source=str(head_file))
    entry, preprocess, backbone_weights = _backbone_entry(backbone, config, name, None)
    data = {
        "format": FORMAT_NAME,
        "format_version": HEAD_FORMAT_VERSION,
        "kind": head.kind,
        "head": head.to_dict(),
        "backbone": entry,
        "preprocess": preprocess.to_dict(),
        "prompt_format": VERBATIM_PROMPT,
        "target_range": None,
        "source": {
            "imported_from": head.kind,
            "file": head_file.name,
            "sha256": _sha256(head_file),
        },
    }
    out_path = Path(out)
    with atomic_folder(out_path) as tmp:
        _save_tensors(module.state_dict(), tmp / HEAD_FILE)
        if backbone_weights is not None:
            clip_only = {k: v for k, v in backbone_weights.items() if not k.startswith("adapter.")}
            _save_tensors(clip_only, tmp / BACKBONE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return load_model_folder(out_path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
