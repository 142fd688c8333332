"""Loading a model: one function from a :class:`ModelSelection` to a :class:`RankingModel`.

:func:`load_model` is the only place that decides which backbone runs (the
default model, the one the user named, or the one a model folder was trained
on), which head scores and on which runtime. Every command and the Python API
go through it, so they choose and check models the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgrank.errors import AdapterMismatchError
from imgrank.models.clip.config import BackboneSpec
from imgrank.models.ranking_model import OnnxRankingModel, RankingModel, TorchRankingModel
from imgrank.models.selection import ModelSelection, ResolvedSelection

if TYPE_CHECKING:
    from imgrank.models.checkpoints import ModelFolder
    from imgrank.models.onnx_export import ExportResult


def load_model(
    selection: ModelSelection | ResolvedSelection,
    *,
    warn: Callable[[str], None] | None = None,
    notice: Callable[[str], None] | None = None,
) -> RankingModel:
    """The ranking model a selection names, ready to score (heavy parts load on first need).

    * ``onnx`` set: the export's graphs on onnxruntime (no torch); its kind is
      the export's (zero-shot, adapter or head).
    * ``adapter`` set: the model folder (adapter or head) on the backbone it
      names, or on ``model``/``pretrained`` after checking they fit it.
    * otherwise zero-shot CLIP on ``model``/``pretrained`` (defaults: ViT-B-32, LAION-2B).

    With ``runtime="auto"`` and nothing else forcing torch, the same model runs
    on onnxruntime from an export made once (:mod:`imgrank.models.auto_export`).

    Args:
        selection: What the user asked for (checked here if not resolved yet).
        warn: Called with messages the user must see (random weights, weights
            that may not match a folder, a GPU provider that did not start).

    Raises:
        UsageError: inconsistent options (exit code 2).
        ModelError: unreadable folders or weights (exit code 4);
            AdapterMismatchError when a backbone does not fit a folder.
    """
    resolved = selection.resolve() if isinstance(selection, ModelSelection) else selection
    chosen = resolved.selection
    if resolved.runtime == "onnx":
        return _load_onnx(resolved, warn)
    if chosen.adapter is None:
        spec = resolved.default_backbone()
        if spec.is_random and warn is not None:
            _warn_random(warn)
        zero_shot = TorchRankingModel(
            spec, device=resolved.device, precision=resolved.precision, warn=None
        )
        return _automatic(resolved, zero_shot, warn, notice) or zero_shot
    from imgrank.models.checkpoints import load_model_folder

    folder = load_model_folder(chosen.adapter)
    spec, warnings = backbone_for(folder, model=chosen.model, pretrained=chosen.pretrained)
    if warn is not None:
        for message in warnings:
            warn(message)
        if spec.is_random:
            _warn_random(warn)
    with_folder = TorchRankingModel(
        spec,
        kind=folder.kind,
        name=folder.display_name,
        folder=folder,
        device=resolved.device,
        precision=resolved.precision,
        warn=None,
    )
    return _automatic(resolved, with_folder, warn, notice) or with_folder


def _automatic(
    resolved: ResolvedSelection,
    torch_model: TorchRankingModel,
    warn: Callable[[str], None] | None,
    notice: Callable[[str], None] | None,
) -> RankingModel | None:
    """The automatic ONNX export of this model when it applies (else None: torch)."""
    from imgrank.models.auto_export import auto_onnx_applies, automatic_onnx_model

    if not auto_onnx_applies(resolved):
        return None
    return automatic_onnx_model(torch_model, warn=warn, notice=notice)


def _warn_random(warn: Callable[[str], None]) -> None:
    warn(
        "--pretrained none: the backbone has RANDOM weights, so the ranking is "
        "meaningless (use this only for tests and benchmarks)"
    )


def _load_onnx(resolved: ResolvedSelection, warn: Callable[[str], None] | None) -> RankingModel:
    from imgrank.models.onnx_runtime import OnnxModel

    chosen = resolved.selection
    assert chosen.onnx is not None
    onnx = OnnxModel(chosen.onnx, providers=chosen.providers)
    model = OnnxRankingModel(onnx)
    if warn is not None:
        if str(onnx.manifest["model"].get("pretrained", "")).lower() == "none":
            warn(
                f"{onnx.folder} was exported with RANDOM weights (--pretrained none), so the "
                "ranking is meaningless (use it only for tests and benchmarks)"
            )
        wanted = onnx.requested_providers[0]
        active = onnx.active_providers
        if wanted not in active:
            warn(f"onnxruntime could not start {wanted}; running on {', '.join(active)}")
    return model


# Config keys that change training behaviour only (dropout, drop-path, whether
# timm fetched its own ImageNet weights, whether tokens are returned): two
# configs differing only in these build towers that compute the same features.
_TRAINING_ONLY_KEYS = frozenset(
    {"output_tokens", "timm_drop", "timm_drop_path", "timm_model_pretrained", "patch_dropout"}
)


def _normalized(config: Any) -> Any:
    """A config with the training-only keys removed, for comparing architectures."""
    if isinstance(config, dict):
        return {k: _normalized(v) for k, v in config.items() if k not in _TRAINING_ONLY_KEYS}
    if isinstance(config, (list, tuple)):
        return [_normalized(v) for v in config]
    return config


def _differences(expected: Any, got: Any, path: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(got, dict):
        out = []
        for key in sorted(set(expected) | set(got)):
            where = f"{path}.{key}" if path else key
            if key not in got:
                out.append(f"{where} missing (expected {expected[key]!r})")
            elif key not in expected:
                out.append(f"{where}={got[key]!r} (the adapter's backbone has none)")
            else:
                out += _differences(expected[key], got[key], where)
        return out
    return [] if expected == got else [f"{path}={got!r} (expected {expected!r})"]


def backbone_for(
    folder: ModelFolder, *, model: str | None = None, pretrained: str | None = None
) -> tuple[BackboneSpec, list[str]]:
    """The backbone to run a model folder on, and warnings the user must see.

    Without ``model``/``pretrained`` this is the folder's own backbone. With
    them, the given architecture must be the one the adapter (or head) was
    trained on (same towers, token widths included) or
    :class:`AdapterMismatchError` is raised: features of another backbone would
    give confident, meaningless scores.
    Other weights for the same architecture are accepted with a warning,
    except another open_clip tag than the folder's, which is refused.

    Raises:
        AdapterMismatchError: another architecture, another pretrained tag, or
            token widths that differ from the adapter's.
    """
    from imgrank.models.checkpoints import check_folder_fits, clip_config
    from imgrank.models.clip.config import RANDOM_WEIGHTS, resolve_model_config

    own = folder.backbone_spec
    _, own_config = resolve_model_config(own)
    warnings: list[str] = []
    spec = own
    if model is not None:
        name, config = resolve_model_config(BackboneSpec(model=model, pretrained=RANDOM_WEIGHTS))
        check_folder_fits(folder, config, what=f"--model {model}")
        diffs = _differences(_normalized(clip_config(own_config)), _normalized(clip_config(config)))
        if diffs:
            shown = "; ".join(diffs[:6]) + (f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else "")
            raise AdapterMismatchError(
                f"--model {model} is not the backbone {folder.describe_kind()} in {folder.path} "
                "was trained on "
                f"({own.model}): {shown}. Leave --model out to use the folder's own backbone."
            )
    if pretrained is not None and pretrained != own.pretrained:
        is_file = Path(pretrained).expanduser().is_file()
        if pretrained.lower() == RANDOM_WEIGHTS:
            pass  # load_model itself warns that random weights rank meaninglessly
        elif not is_file and folder.backbone_weights is None and not own.is_random:
            raise AdapterMismatchError(
                f"--pretrained {pretrained}: {folder.describe_kind()} in {folder.path} "
                "was trained on the "
                f"{own.pretrained} weights of {own.model}; other weights give meaningless scores. "
                "Leave --pretrained out, or pass a local file of those same weights."
            )
        else:
            warnings.append(
                f"--pretrained {pretrained}: scores are only meaningful if these are the same "
                f"backbone weights {folder.describe_kind()} in {folder.path} was trained on"
            )
        spec = replace(spec, pretrained=pretrained)
    check_folder_fits(folder, own_config, what=f"the backbone of {folder.path}")
    return spec, warnings


def export_model(
    out: Path,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    adapter_dir: Path | None = None,
    opset: int | None = None,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """``imgrank export``: load the model as ``imgrank sort`` would, on the CPU in float32,
    and export it (:func:`imgrank.models.onnx_export.export_ranking_model`).

    Args:
        out: A new or empty folder.
        model: open_clip name or config JSON; None: the default model, or with
            ``adapter_dir`` the folder's own backbone (when given it must be the
            architecture the adapter was trained on).
        pretrained: Weights tag or file; None as for ``model``.
        adapter_dir: An imgrank model folder whose adapter (or linear/MLP head)
            is exported too; its backbone and preprocessing are used unless overridden.
        opset: ONNX operator set (None: the exporter's default).
        warn: Called with messages the user must see (random weights...).
        progress: Called with a short line before each step.
    """
    from imgrank.models.onnx_export import DEFAULT_OPSET, check_export_folder, export_ranking_model

    check_export_folder(out)  # refuse a busy --out before minutes of loading
    selection = ModelSelection(
        model=model, pretrained=pretrained, adapter=adapter_dir, device="cpu", precision="fp32"
    )
    ranking = load_model(selection, warn=warn)
    assert isinstance(ranking, TorchRankingModel)
    return export_ranking_model(
        ranking, out, opset=DEFAULT_OPSET if opset is None else opset, progress=progress
    )
