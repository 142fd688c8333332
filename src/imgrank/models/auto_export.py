"""The fastest correct runtime by default: the model exported once to ONNX Runtime, then reused.

On the CPU, onnxruntime runs CLIP's towers about 1.6x faster than PyTorch in
float32 (fused attention, LayerNorm and GELU kernels) and ranks the same way
(Spearman 1.000 against float32 torch on the benchmark photos; every export
is checked against torch to a relative drift of 1e-4 before it is used). It
needs neither torch nor open_clip at sorting time, which also shortens every
start. So when the user forces nothing (no ``--runtime``, ``--precision``
or GPU ``--device``), onnxruntime is installed and no GPU is present, a sort
runs on an export of the very model it would have run with torch:

* made once, by :func:`imgrank.models.onnx_export.export_ranking_model` (the
  path ``imgrank export`` takes, with the same parity checks), into
  ``<user cache>/onnx/<key>/``;
* keyed by everything that changes the graphs: the backbone's feature
  fingerprint (architecture, weights, preprocessing), the model folder's files
  for an adapter or a head, the export format and imgrank's version; all of it
  computed without importing torch or open_clip;
* announced once (``notice``); an export that fails (an architecture the
  exporter cannot trace, drift, a full disk) is remembered in ``<key>.failed``
  so later runs go straight to torch, with one warning saying why.

A GPU stays with torch (half precision and GPU JPEG decoding). The rule is in
:func:`auto_onnx_applies`; ``IMGRANK_RUNTIME=torch`` in the environment turns
the automatic export off everywhere (the test suite does that, and tests the
automatic path on purpose).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from imgrank import __version__
from imgrank.errors import ImgrankError, OutputWriteError
from imgrank.paths import cache_dir

if TYPE_CHECKING:
    from imgrank.models.checkpoints import ModelFolder
    from imgrank.models.clip.config import BackboneSpec
    from imgrank.models.ranking_model import OnnxRankingModel, TorchRankingModel
    from imgrank.models.selection import ResolvedSelection

#: Bump when what an automatic export holds changes, so old ones are made again.
AUTO_EXPORT_VERSION = 1

#: ``IMGRANK_RUNTIME=torch`` keeps every run on PyTorch unless told otherwise.
RUNTIME_ENV = "IMGRANK_RUNTIME"

Notify = Callable[[str], None]


def exports_dir() -> Path:
    """Where automatic exports live: ``onnx/`` in the user cache folder (re-creatable)."""
    return cache_dir() / "onnx"


def exports_on_disk() -> tuple[int, int]:
    """How many automatic exports the user cache holds, and their bytes (``cache info``)."""
    folder = exports_dir()
    count = total = 0
    if not folder.is_dir():
        return 0, 0
    for export in folder.iterdir():
        if not export.is_dir():
            continue
        count += 1
        for file in export.iterdir():
            with contextlib.suppress(OSError):
                total += file.stat().st_size
    return count, total


def onnx_export_possible() -> bool:
    """onnxruntime (to run) and onnx (to export) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def auto_onnx_applies(resolved: ResolvedSelection) -> bool:
    """Whether this run may use an automatic export instead of torch (see the module doc)."""
    if os.environ.get(RUNTIME_ENV, "").strip().lower() == "torch":
        return False
    if not resolved.automatic_runtime:
        return False
    from imgrank.models.device import gpu_present

    return not gpu_present() and onnx_export_possible()


def export_key(spec: BackboneSpec, folder: ModelFolder | None) -> str | None:
    """The automatic export's name for a model; None when it cannot be known cheaply.

    None (the run stays on torch) for a pretrained tag never downloaded here, a
    config only open_clip can read, or a Hugging Face tokenizer (not exported).
    """
    from imgrank.models.checkpoints import folder_identity
    from imgrank.models.clip.light_text import config_without_open_clip, features_identity
    from imgrank.models.onnx_runtime import DEFAULT_OPSET, FORMAT_VERSION

    config = config_without_open_clip(spec)
    identity = features_identity(spec)
    if config is None or identity is None:
        return None
    if config.get("text_cfg", {}).get("hf_tokenizer_name"):
        return None
    blob = json.dumps(
        {
            "features": identity[0],
            "folder": None if folder is None else folder_identity(folder),
            "format": FORMAT_VERSION,
            "opset": DEFAULT_OPSET,
            "auto": AUTO_EXPORT_VERSION,
            "imgrank": __version__,
        },
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def automatic_onnx_model(
    torch_model: TorchRankingModel,
    *,
    warn: Notify | None = None,
    notice: Notify | None = None,
) -> OnnxRankingModel | None:
    """The export of this model on onnxruntime, made now if needed; None: use torch.

    Args:
        torch_model: The model the run would use with torch (nothing of it is
            loaded unless the export must be made now).
        warn: Told once why an export failed (the run then goes on with torch).
        notice: Told when an export is being made (it takes a while, once).
    """
    from imgrank.models.onnx_runtime import MANIFEST_NAME, OnnxModel
    from imgrank.models.ranking_model import OnnxRankingModel

    key = export_key(torch_model.spec, torch_model.folder)
    if key is None:
        return None
    target = exports_dir() / key
    failed = exports_dir() / f"{key}.failed"
    if failed.is_file():
        return None  # an earlier run tried and warned; torch it is
    if (target / MANIFEST_NAME).is_file() and not _intact(target):
        # Files changed since the export (truncated, edited, a disk error): make it again.
        if warn is not None:
            warn(f"the automatic ONNX export {target} was changed on disk; exporting it again")
        _remove_export(target)
    exported = (target / MANIFEST_NAME).is_file()
    if not exported and not _export(torch_model, target, failed, warn, notice):
        return None
    try:
        return OnnxRankingModel(OnnxModel(target))
    except ImgrankError as exc:
        # A damaged export (files removed by hand, a disk error): set it aside and use torch;
        # the next run exports again.
        _remove_export(target)
        if warn is not None:
            warn(f"the automatic ONNX export {target} is unusable ({exc}); sorting with PyTorch")
        return None


def _export(
    torch_model: TorchRankingModel,
    target: Path,
    failed: Path,
    warn: Notify | None,
    notice: Notify | None,
) -> bool:
    from imgrank.models.onnx_export import export_ranking_model
    from imgrank.models.onnx_runtime import MANIFEST_NAME

    spec, folder = torch_model.spec, torch_model.folder
    what = spec.model if folder is None else f"{folder.path.name} on {spec.model}"
    if notice is not None:
        notice(
            f"exporting {what} to ONNX Runtime once for faster sorts (about a minute); "
            f"kept in {target}"
        )
    started = time.monotonic()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a half-made folder cannot exist (atomic), but an emptied one may
            _remove_export(target)
        export_ranking_model(torch_model, target)
    except (ImgrankError, OSError) as exc:
        if (target / MANIFEST_NAME).is_file():
            return True  # another imgrank finished the same export first
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, ImgrankError) and not isinstance(exc, OutputWriteError):
            # A model the exporter cannot handle stays that way: remember, do not retry.
            with contextlib.suppress(OSError):
                failed.write_text(json.dumps({"error": reason, "imgrank": __version__}) + "\n")
        if warn is not None:
            warn(f"could not export {what} to ONNX Runtime ({reason}); sorting with PyTorch")
        return False
    _stamp(target)
    if notice is not None:
        notice(f"exported in {time.monotonic() - started:.0f} s")
    return True


#: Sizes and modification times of an automatic export's files, written after the export.
STAMP_NAME = "auto-export.json"


def _file_stamps(folder: Path) -> dict[str, list[int]]:
    return {
        path.name: [path.stat().st_size, path.stat().st_mtime_ns]
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != STAMP_NAME
    }


def _stamp(folder: Path) -> None:
    """Record the export's files so a later run notices one that changed (without hashing
    hundreds of megabytes at every start). A stamp that cannot be written only costs that."""
    with contextlib.suppress(OSError):
        (folder / STAMP_NAME).write_text(json.dumps(_file_stamps(folder), sort_keys=True) + "\n")


def _intact(folder: Path) -> bool:
    """Whether the export's files are those its stamp recorded (no stamp: trusted as is)."""
    try:
        recorded = json.loads((folder / STAMP_NAME).read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    try:
        return bool(recorded == _file_stamps(folder))
    except OSError:
        return False


def _remove_export(folder: Path) -> None:
    """Remove a damaged export: imgrank made it and makes it again (nothing of the user's)."""
    shutil.rmtree(folder, ignore_errors=True)
