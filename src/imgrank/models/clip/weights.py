"""Weights files and pretrained tags: read safely, found offline, identified for the cache.

``.pt``/``.bin`` files are only ever read with ``torch.load(weights_only=True)``
(no pickled code runs); ``.safetensors`` with safetensors. A pretrained tag is
downloaded once into the user's weights folder and found there afterwards
without any network access.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgrank.errors import ModelError, WeightsUnavailableError
from imgrank.versions import check_torch_load_is_safe

if TYPE_CHECKING:
    import torch

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")


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
        raise ModelError(_unreadable_weights_message(path, exc)) from None
    return _unwrap_state(state, path)


def _unreadable_weights_message(path: Path, exc: Exception) -> str:
    """Why a weights file was not loaded, in imgrank's words.

    torch's own message for a refused pickle tells the reader how to load the
    file anyway, running the code inside it; imgrank never passes that on.
    """
    import pickle

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        return (
            f"{path} holds Python objects besides tensors: loading it would run code from the "
            "file, and imgrank will not run it (pickled code is refused). If you trust where "
            "it came from, convert it once to a .safetensors file of plain tensors (see "
            "docs/safety.md, 'Model files') and give imgrank that file."
        )
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()  # no terminal colour codes
    first_line = plain.splitlines()[0] if plain else type(exc).__name__
    return (
        f"cannot load weights from {path}: {first_line} "
        "(only plain tensor checkpoints are accepted; pickled code is refused)"
    )


def _unwrap_state(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap a ``state_dict`` entry, check it holds tensors, strip ``module.`` prefixes."""
    import torch

    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a dict of tensors")
    return {strip_module(key): value for key, value in state.items()}


def strip_module(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


class WeightsFile:
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
                    names = {strip_module(k): k for k in handle.keys()}  # noqa: SIM118
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


def download_pretrained(model_name: str, tag: str) -> Path:
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
    open_clip's registry of tags (see :mod:`imgrank.models.clip.light_text`). Best effort:
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


def weights_identity(path: Path) -> str:
    """A weights file's identity in cache keys: name, size and modification time."""
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def check_clip_keys(
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
    check_clip_keys(own, {k: tuple(v.shape) for k, v in state.items()}, source=source)
    model.load_state_dict(state, strict=True)


def remembered_weights(model: str, tag: str) -> Path | None:
    """The file an earlier run resolved this pretrained tag to, if any (no open_clip import)."""
    from imgrank.paths import weights_dir

    memo = weights_dir() / "resolved.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        return None
    value = known.get(f"{model}|{tag}") if isinstance(known, dict) else None
    if not isinstance(value, str):
        return None
    path = Path(value)
    return path if path.is_file() else None
