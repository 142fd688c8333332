"""The frozen OpenCLIP backbone: building it, loading weights, extracting features.

A backbone is named by ``--model`` (an open_clip model name such as
``ViT-B-32``, or a path to an open_clip-style config JSON with ``embed_dim``,
``vision_cfg`` and ``text_cfg``) and ``--pretrained`` (an open_clip pretrained
tag, a local ``.safetensors``/``.pt``/``.bin`` weights file, or ``none``).

Two kinds of image features come out of one forward pass:

* the pooled, projected embedding that zero-shot CLIP scoring uses, and
* the grid of visual tokens the ranking-aware adapter consumes
  (see ``docs/adapter.md``; the extraction follows the authors' code).

torch and open_clip are imported inside functions so that importing this
module (and the CLI) stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from imgrank.errors import ModelError, UsageError, WeightsUnavailableError
from imgrank.versions import check_torch_load_is_safe

if TYPE_CHECKING:
    import numpy as np
    import torch

    from imgrank.models.scoring import FeatureBatch

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
_CLIP_CONFIG_KEYS = (
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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file without ever unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; ``.pt``/``.bin``/``.pth``
    files with ``torch.load(weights_only=True)``, which refuses pickles that
    would run code. A ``state_dict`` entry is unwrapped and DistributedDataParallel
    ``module.`` prefixes are removed.
    """
    import torch

    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            check_torch_load_is_safe(torch, path)
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad file for the user
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load weights from {path}: {first_line} "
            "(only plain tensor checkpoints are accepted; pickled code is refused)"
        ) from None
    return _unwrap_state(state, path)


def _unwrap_state(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap a ``state_dict`` entry, check it holds tensors, strip ``module.`` prefixes."""
    import torch

    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a dict of tensors")
    return {_strip_module(key): value for key, value in state.items()}


def _build_clip(config: dict[str, Any]) -> Any:
    """Build an open_clip CLIP (random weights) from a config dict."""
    from open_clip.model import CLIP, CustomTextCLIP

    kwargs = {k: config[k] for k in _CLIP_CONFIG_KEYS if k in config}
    text_cfg = config.get("text_cfg", {})
    custom = config.get("custom_text", False) or "hf_model_name" in text_cfg
    try:
        return (CustomTextCLIP if custom else CLIP)(**kwargs)
    except Exception as exc:  # noqa: BLE001 - bad user config
        raise ModelError(f"cannot build the model from its config: {exc}") from None


def _cached_pretrained(cfg: dict[str, Any], cache: Path) -> Path | None:
    """The local file of a pretrained config if an earlier run downloaded it."""
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import hf_hub_download

        model_id, filename = os.path.split(hub)
        names = [filename] if filename else []
        names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in dict.fromkeys(n for n in names if n):
            stem, _ = os.path.splitext(name)
            for candidate in dict.fromkeys([f"{stem}.safetensors", name]):
                try:
                    return Path(
                        hf_hub_download(
                            model_id, candidate, cache_dir=str(cache), local_files_only=True
                        )
                    )
                except Exception:  # noqa: BLE001 - not cached under this name
                    continue
        return None
    url = cfg.get("url", "")
    if url:
        target = cache / os.path.basename(url)
        return target if target.is_file() else None
    return None


def _reachable(cfg: dict[str, Any], timeout: float = 5.0) -> bool:
    """Whether the weights' host answers at all: fail in seconds offline, not minutes of retries."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(cfg["url"]).hostname if cfg.get("url") and not cfg.get("hf_hub") else None
    host = host or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _download_pretrained(model_name: str, tag: str) -> Path:
    """Return the local file of an open_clip pretrained tag, downloading it once.

    A file downloaded earlier is found in the cache without any network access,
    so imgrank works offline after the first run.
    """
    import logging

    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    from imgrank.paths import weights_dir

    cfg = get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        known = ", ".join(tags) if tags else "none are published"
        raise ModelError(
            f"{tag!r} is neither a pretrained tag of {model_name} nor an existing weights file "
            f"(tags for {model_name}: {known})"
        )
    cache = weights_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cached = _cached_pretrained(cfg, cache)
    if cached is not None:
        _remember_resolved(model_name, tag, cached)
        return cached
    offline_help = (
        f"the weights {model_name}/{tag} are not in {cache} and could not be downloaded "
        "({why}). Connect to the internet once so imgrank can fetch them (they are reused "
        "offline afterwards), or pass --pretrained FILE with a local .safetensors/.pt weights "
        "file (or --pretrained none for random weights, which rank meaninglessly)."
    )
    if not _reachable(cfg):
        raise WeightsUnavailableError(offline_help.format(why="no network connection"))
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry chatter is not for our users
    try:
        target = download_pretrained(cfg, cache_dir=str(cache))
    except Exception as exc:  # noqa: BLE001 - network, hub and file errors all mean "not here"
        raise WeightsUnavailableError(offline_help.format(why=type(exc).__name__)) from None
    finally:
        hub_logger.setLevel(level)
    if not target:
        raise WeightsUnavailableError(f"no download source is known for {model_name}/{tag}")
    _remember_resolved(model_name, tag, Path(target))
    return Path(target)


def _remember_resolved(model_name: str, tag: str, path: Path) -> None:
    """Note which file a pretrained tag resolved to (``weights/resolved.json``).

    A re-sort served from the embedding cache reads this instead of importing
    open_clip's registry of tags (see :mod:`imgrank.models.text_only`). Best effort:
    a memo that cannot be written only costs that shortcut.
    """
    from imgrank.errors import ImgrankError
    from imgrank.files.atomic import write_file
    from imgrank.paths import weights_dir

    memo = weights_dir() / "resolved.json"
    key, value = f"{model_name}|{tag}", str(path.absolute())
    try:
        known = json.loads(memo.read_text()) if memo.is_file() else {}
        if not isinstance(known, dict):
            known = {}
        if known.get(key) == value:
            return
        known[key] = value
        # imgrank's own file: replaced whole, never half-written.
        write_file(memo, json.dumps(known, indent=1, sort_keys=True), replace=True)
    except (OSError, ValueError, ImgrankError):
        return


def resolve_device(device: str = "auto") -> str:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a torch device string, checking it exists."""
    import torch

    device = device.lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is available here (use cpu or auto)")
        if ":" in device:
            index = device.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise UsageError(
                    f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)"
                )
        return device
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError("--device mps: Apple's MPS backend is not available here")
        return "mps"
    raise UsageError(f"--device {device}: expected auto, cpu, cuda, cuda:N or mps")


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
    ) -> None:
        self.model = model
        self.name = name
        self.pretrained = pretrained
        self.config = config
        self.preprocess = preprocess
        self.device = device
        self.weights_id = weights_id
        self._tokenizer: Any = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def is_timm_trunk(self) -> bool:
        return hasattr(self.model.visual, "trunk")

    @property
    def fingerprint(self) -> str:
        """Identifies the features this backbone produces: architecture + weights + preprocessing."""
        return features_fingerprint(self.config, self.weights_id, self.preprocess)

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
        """Run the image tower on normalised pixels (N, 3, S, S).

        With ``tokens=True`` also returns the adapter's visual tokens from the
        same forward pass: for a ViT, the patch tokens (class token excluded)
        after ``ln_post``, projected by ``visual.proj``; for a timm CNN trunk
        without pooling, the feature map flattened row-major to (N, h*w, D).
        """
        import torch

        visual = self.model.visual
        pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
        with torch.inference_mode():
            if self.is_timm_trunk:
                out = visual(pixels)
                if out.ndim == 4:  # (N, D, h, w): a trunk without pooling
                    grid = out.flatten(2).transpose(1, 2)  # (N, h*w, D), row-major
                    pooled = grid.mean(dim=1)
                else:
                    grid, pooled = None, out
                return ImageFeatures(pooled=pooled, tokens=grid if tokens else None)
            previous = visual.output_tokens
            visual.output_tokens = True
            try:
                pooled, patch_tokens = visual(pixels)
            finally:
                visual.output_tokens = previous
            if not tokens:
                return ImageFeatures(pooled=pooled)
            if visual.proj is not None:
                patch_tokens = patch_tokens @ visual.proj
            return ImageFeatures(pooled=pooled, tokens=patch_tokens)

    def encode_pixels(self, pixels: np.ndarray, *, tokens: bool = False) -> FeatureBatch:
        """Pipeline entry point: numpy pixels (N, 3, S, S) in, numpy features out.

        Features are returned as float32 numpy arrays on the CPU so that the
        cache, the scorers and the ONNX path share one runtime-agnostic format.
        """
        import torch

        from imgrank.models.scoring import FeatureBatch

        features = self.encode_images(torch.from_numpy(pixels), tokens=tokens)
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


def weights_identity(path: Path) -> str:
    """A weights file's identity in cache keys: name, size and modification time."""
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def features_fingerprint(
    config: dict[str, Any], weights_id: str, preprocess: PreprocessConfig
) -> str:
    """The embedding cache's key for a backbone: architecture + weights + preprocessing.

    Shared by :class:`Backbone` and the open_clip-free text path
    (:mod:`imgrank.models.text_only`), which must find the features a backbone stored.
    """
    blob = json.dumps(
        {"config": config, "weights": weights_id, "pp": preprocess.to_dict()}, sort_keys=True
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def load_backbone(
    spec: BackboneSpec,
    *,
    device: str = "auto",
    warn: Any = None,
    lazy_image_tower: bool = False,
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

    Raises:
        ModelError: unknown model, unreadable or mismatched weights.
        WeightsUnavailableError: a pretrained tag that is not cached and cannot be downloaded.
    """
    import torch

    _register_fast_exit()
    device = resolve_device(device)
    if device == "cpu":
        # Set before any tensor work so the thread pool starts at that size.
        torch.set_num_threads(cpu_threads_for_model())
    name, config = resolve_model_config(spec)
    preprocess = spec.preprocess or default_preprocess(config)
    weights: _WeightsFile | None = None
    if spec.is_random:
        # The seeding scheme is part of the weights' identity (cached features).
        weights_id = f"random:seed{_RANDOM_SEED}:per-tower"
        if warn is not None:
            warn(
                "--pretrained none: the backbone has RANDOM weights, so the ranking is "
                "meaningless (use this only for tests and benchmarks)"
            )
    else:
        candidate = Path(spec.pretrained).expanduser()
        if candidate.is_file():
            weights_path = candidate
        elif candidate.suffix in _WEIGHT_SUFFIXES or os.sep in spec.pretrained:
            raise ModelError(f"weights file {candidate} does not exist")
        else:
            weights_path = _download_pretrained(spec.model, spec.pretrained)
        weights_id = weights_identity(weights_path)
        weights = _WeightsFile(weights_path)

    model = _build_structure(config)
    if model is None or (weights is None and not _towers_buildable(model, config)):
        model = _build_eagerly(config, weights)  # rare configs: pay for initialisation
    else:
        if weights is not None:
            _check_clip_keys(_shapes_of(model), weights.shapes, source=str(weights.path))
        _materialize_text(model, config, weights)
        if not lazy_image_tower:
            _materialize_visual(model, config, weights)
    model.eval().requires_grad_(False)
    visual = model._modules.pop("visual")
    if device.startswith("cuda"):
        model = model.half()  # half precision on GPU: twice the throughput, same ranking
        visual = visual.half()
    model = model.to(device)
    model._modules["visual"] = visual
    if _has_meta(visual):

        def build_on_first_use(module: Any, _args: Any) -> None:
            handle.remove()
            with torch.inference_mode(False):
                _materialize_visual(model, config, weights)
                module.eval().requires_grad_(False)
                if device.startswith("cuda"):
                    module.half()
                module.to(device)
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
    )


_fast_exit_registered = False


def _register_fast_exit() -> None:
    """Spare the garbage collector's last pass over torch's objects when the process ends.

    With torch, torchvision and open_clip imported, ending the interpreter took
    about 0.9 s on the 2-core benchmark machine, a quarter of a cached re-sort;
    :func:`gc.freeze` at exit (after every ``atexit`` handler registered later,
    which run first) cuts it to under 0.2 s. Objects are still released by
    reference counting; only cyclic garbage is left to the operating system.
    """
    global _fast_exit_registered
    if not _fast_exit_registered:
        import atexit
        import gc

        atexit.register(gc.freeze)
        _fast_exit_registered = True


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_threads_for_model() -> int:
    """Intra-op threads for the model on the CPU: one per available core.

    The decode pool runs beside the model at a lower priority (see
    :mod:`imgrank.features.pipeline`), so it fills the model's idle moments instead of
    preempting its threads: PyTorch's OpenMP threads wait for each other at
    every operation, so one preempted thread stalls them all. On an idle 2-core
    machine 2 model threads sorted 64 photos of 12 MP 1.4x faster than 1.
    """
    return available_cores()


def image_tower_built(backbone: Backbone) -> bool:
    """Whether the image tower holds real weights (False until a lazy tower's first use)."""
    return not _has_meta(backbone.model.visual)


#: Seed of random weights (``--pretrained none``); each tower draws from its own stream.
_RANDOM_SEED = 0

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")


class _WeightsFile:
    """A weights file opened so that parts of it can be read without reading the rest.

    ``.safetensors`` files are read key by key; ``.pt``/``.bin``/``.pth``
    files are memory-mapped (``torch.load(mmap=True, weights_only=True)``).
    A legacy (non-zip) ``.pt`` file, or any
    file that fails this way, is read whole by :func:`read_state_dict`, whose
    checks and messages then apply. ``adapter.*`` keys are ignored.
    """

    def __init__(self, path: Path) -> None:
        import torch

        self.path = path
        self._tensors: dict[str, Any] | None = None
        self._safetensors_names: dict[str, str] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as handle:
                    names = {_strip_module(k): k for k in handle.keys()}  # noqa: SIM118
                    self.shapes = {
                        key: tuple(handle.get_slice(stored).get_shape())
                        for key, stored in names.items()
                    }
                self._safetensors_names = names
            else:
                check_torch_load_is_safe(torch, path)
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                self._tensors = _unwrap_state(state, path)
        except ModelError:
            raise
        except Exception:  # noqa: BLE001 - let the plain reader decide and word the error
            self._safetensors_names = None
            self._tensors = read_state_dict(path)
        if self._tensors is not None:
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        self.shapes = {k: v for k, v in self.shapes.items() if not k.startswith("adapter.")}

    def load(self, prefix: str = "", *, exclude: str | None = None) -> dict[str, Any]:
        """Tensors whose key starts with ``prefix`` (and not ``exclude``), prefix removed."""
        keys = [
            k
            for k in self.shapes
            if k.startswith(prefix) and not (exclude is not None and k.startswith(exclude))
        ]
        if self._safetensors_names is not None:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as handle:
                taken = {k: handle.get_tensor(self._safetensors_names[k]) for k in keys}
        else:
            assert self._tensors is not None
            # Memory-mapped tensors are used as they are (copy-on-write, like the
            # safetensors reader): pages are read on first use, and a tower that
            # is never built is never read.
            taken = {k: self._tensors[k] for k in keys}
        return {k[len(prefix) :]: v for k, v in taken.items()}

    def release(self) -> None:
        """Drop the memory map once every tower that needs it is built."""
        self._tensors = None


def _strip_module(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def _build_structure(config: dict[str, Any]) -> Any:
    """The model's modules with shapes only (meta device), or None if that is not possible."""
    import torch

    try:
        with torch.device("meta"):
            return _build_clip(config)
    except ModelError:
        raise
    except Exception:  # noqa: BLE001 - e.g. a timm trunk that calls .item() while building
        return None


def _towers_buildable(model: Any, config: dict[str, Any]) -> bool:
    """Random weights tower by tower are supported for CLIP with open_clip's own text tower."""
    from open_clip.model import CLIP

    return type(model) is CLIP


def _build_eagerly(config: dict[str, Any], weights: _WeightsFile | None) -> Any:
    """The plain way: build with initialisation, then load weights (all towers, seeded)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED)
        model = _build_clip(config)
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
            torch.manual_seed(_RANDOM_SEED + offset)
            yield

    return context()


def _materialize_text(model: Any, config: dict[str, Any], weights: _WeightsFile | None) -> None:
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


def _materialize_visual(model: Any, config: dict[str, Any], weights: _WeightsFile | None) -> None:
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


def _check_clip_keys(
    own: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]], *, source: str
) -> None:
    """Refuse weights that do not fit the model, listing the mismatched keys."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong_shape = sorted(
        f"{k} {given[k]} vs {own[k]}" for k in set(own) & set(given) if given[k] != own[k]
    )
    if missing or unexpected or wrong_shape:
        parts = []
        labelled = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        for label, keys in labelled:
            if keys:
                shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise ModelError(f"weights in {source} do not fit the model: " + "; ".join(parts))


def load_clip_weights(model: Any, state: dict[str, Any], *, source: str) -> None:
    """Load a CLIP state dict strictly, with a message listing mismatched keys."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_clip_keys(own, {k: tuple(v.shape) for k, v in state.items()}, source=source)
    model.load_state_dict(state, strict=True)
