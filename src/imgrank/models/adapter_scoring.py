"""Sorting with a ranking-aware adapter: the scorer and the backbone it runs on.

:class:`AdapterScorer` follows :class:`imgrank.models.scoring.Scorer`: it reads the
visual tokens of a batch and returns the adapter's regression score per image
(one forward per batch, no pairs, so sorting N images costs O(N)). The
prompt's text tokens are computed once, when the scorer is built.

:func:`load_adapter_scoring` builds both halves from a model folder: the
backbone the folder names (or the one the user asked for, after checking that
it is the architecture the adapter was trained on) and the scorer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from imgrank.errors import AdapterMismatchError, ModelError

if TYPE_CHECKING:
    from imgrank.models.adapter import RankingAdapter
    from imgrank.models.backbone import Backbone, BackboneSpec, TextFeatures
    from imgrank.models.checkpoints import ModelFolder
    from imgrank.models.scoring import FeatureBatch

# Config keys that change training behaviour only (dropout, drop-path, whether
# timm fetched its own ImageNet weights, whether tokens are returned): two
# configs differing only in these build towers that compute the same features.
_TRAINING_ONLY_KEYS = frozenset(
    {"output_tokens", "timm_drop", "timm_drop_path", "timm_model_pretrained", "patch_dropout"}
)


class TextEncoder(Protocol):
    """What the scorer needs to encode its prompt (the torch backbone has it)."""

    def encode_text(self, texts: list[str]) -> TextFeatures: ...


class AdapterScorer:
    """Scores images with a ranking-aware adapter's regression head.

    Attributes:
        name: Shown in summaries, e.g. ``ranking adapter convnext_large_d_320 (full)``.
        needs_tokens: Always True: the adapter reads visual tokens, not pooled embeddings.
        prompt: The text fed to the text tower (after the folder's prompt format).
    """

    needs_tokens = True

    def __init__(
        self,
        adapter: RankingAdapter,
        text_encoder: TextEncoder,
        prompt: str,
        *,
        prompt_format: str = "{}",
        name: str | None = None,
    ) -> None:
        """Encode the prompt once.

        Args:
            adapter: The adapter (eval mode); it runs on its own device in float32.
            text_encoder: The backbone whose text tower the adapter was trained with.
            prompt: The user's prompt.
            prompt_format: ``{}`` is replaced by the prompt (``{}``: verbatim).
            name: Display name (default: the adapter's variant).
        """
        import torch

        if not prompt.strip():
            raise ModelError("the prompt is empty: say what to sort by, e.g. --by 'image quality'")
        self.adapter = adapter.eval()
        self.prompt = prompt_format.replace("{}", prompt)
        parameter = next(adapter.parameters())
        self._device, self._dtype = parameter.device, parameter.dtype
        tokens = text_encoder.encode_text([self.prompt]).tokens  # (1, L, D)
        self._text = tokens.detach().to(self._device, dtype=self._dtype).clone()
        width = adapter.config.d_model
        if self._text.ndim != 3 or self._text.shape[-1] != width:
            raise AdapterMismatchError(
                f"the text tower gives tokens {tuple(self._text.shape)}, but the adapter expects "
                f"width {width}: the backbone is not the one the adapter was trained on"
            )
        self.name = name or f"ranking adapter ({adapter.config.variant})"
        self._torch = torch

    def score(self, batch: FeatureBatch) -> np.ndarray:
        """(N,) regression scores of the batch, higher = more of the prompt."""
        if batch.tokens is None:
            raise ModelError("the adapter needs visual tokens, but the image encoder gave none")
        torch = self._torch
        tokens = torch.from_numpy(np.ascontiguousarray(batch.tokens)).to(
            self._device, dtype=self._dtype
        )
        with torch.inference_mode():
            scores = self.adapter.score(tokens, self._text)
        return scores.reshape(-1).double().cpu().numpy()


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
    """The backbone to run a folder's adapter on, and warnings the user must see.

    Without ``model``/``pretrained`` this is the folder's own backbone. With
    them, the given architecture must be the one the adapter was trained on
    (same towers, token widths included) or :class:`AdapterMismatchError` is
    raised: tokens of another backbone would give confident, meaningless scores.
    Other weights for the same architecture are accepted with a warning,
    except another open_clip tag than the folder's, which is refused.

    Raises:
        AdapterMismatchError: another architecture, another pretrained tag, or
            token widths that differ from the adapter's.
    """
    from dataclasses import replace

    from imgrank.models.backbone import RANDOM_WEIGHTS, BackboneSpec, resolve_model_config
    from imgrank.models.checkpoints import check_backbone_fits, clip_config

    own = folder.backbone_spec
    _, own_config = resolve_model_config(own)
    warnings: list[str] = []
    spec = own
    if model is not None:
        name, config = resolve_model_config(BackboneSpec(model=model, pretrained=RANDOM_WEIGHTS))
        check_backbone_fits(config, folder.adapter_config, what=f"--model {model}")
        diffs = _differences(_normalized(clip_config(own_config)), _normalized(clip_config(config)))
        if diffs:
            shown = "; ".join(diffs[:6]) + (f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else "")
            raise AdapterMismatchError(
                f"--model {model} is not the backbone the adapter in {folder.path} was trained on "
                f"({own.model}): {shown}. Leave --model out to use the adapter's own backbone."
            )
    if pretrained is not None and pretrained != own.pretrained:
        is_file = Path(pretrained).expanduser().is_file()
        if pretrained.lower() == RANDOM_WEIGHTS:
            pass  # load_backbone itself warns that random weights rank meaninglessly
        elif not is_file and folder.backbone_weights is None and not own.is_random:
            raise AdapterMismatchError(
                f"--pretrained {pretrained}: the adapter in {folder.path} was trained on the "
                f"{own.pretrained} weights of {own.model}; other weights give meaningless scores. "
                "Leave --pretrained out, or pass a local file of those same weights."
            )
        else:
            warnings.append(
                f"--pretrained {pretrained}: scores are only meaningful if these are the same "
                f"backbone weights the adapter in {folder.path} was trained on"
            )
        spec = replace(spec, pretrained=pretrained)
    check_backbone_fits(own_config, folder.adapter_config, what=f"the backbone of {folder.path}")
    return spec, warnings


def load_adapter_scoring(
    folder: str | Path | ModelFolder,
    prompt: str,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    device: str = "auto",
    warn: Callable[[str], None] | None = None,
) -> tuple[Backbone, AdapterScorer]:
    """Build the backbone and the adapter scorer for ``imgrank sort --adapter DIR``.

    Args:
        folder: The model folder (or its path).
        prompt: The user's prompt (the folder's ``prompt_format`` is applied).
        model: ``--model`` when the user gave it explicitly, else None.
        pretrained: ``--pretrained`` when the user gave it explicitly, else None.
        device: ``auto|cpu|cuda|cuda:N|mps``.
        warn: Called with messages the user must see.

    Returns:
        ``(backbone, scorer)``: the backbone is the pipeline's image encoder and
        carries the folder's preprocessing.

    Raises:
        ModelError: unreadable folder or weights.
        AdapterMismatchError: a backbone the adapter was not trained on.
    """
    from imgrank.models.backbone import load_backbone
    from imgrank.models.checkpoints import ModelFolder, load_adapter, load_model_folder

    if not isinstance(folder, ModelFolder):
        folder = load_model_folder(folder)
    spec, warnings = backbone_for(folder, model=model, pretrained=pretrained)
    for message in warnings:
        if warn is not None:
            warn(message)
    # Built on first use: a re-sort served from the embedding cache needs no image tower.
    backbone = load_backbone(spec, device=device, warn=warn, lazy_image_tower=True)
    # The adapter stays in float32 even where the backbone runs in half precision:
    # it is small, and its LayerNorms and sums over tokens are precision-sensitive.
    adapter = load_adapter(folder, device=backbone.device)
    scorer = AdapterScorer(
        adapter,
        backbone,
        prompt,
        prompt_format=folder.prompt_format,
        name=f"ranking adapter {folder.path.name} ({folder.variant}) "
        f"on {folder.backbone_spec.model}",
    )
    return backbone, scorer
