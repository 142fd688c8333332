"""Scorers: turn image features into one number per image (higher = more of the prompt).

Every scorer has the same small interface, :class:`Scorer`, so the pipeline,
the cache and the writers do not care which one runs:

* :class:`ZeroShotScorer` (no adapter): CLIP similarity against an antonym
  pair built from the prompt, the CLIP-IQA idea. ``"image quality"`` becomes
  ``"a photo of high image quality."`` vs ``"a photo of low image quality."``
  and the score is the softmax probability of the positive phrasing. Ranking
  by plain similarity to the words would favour photos that *look like* the
  words (e.g. pictures of text) instead of photos that *have* the quality.
* the adapter scorer (``imgrank.models.adapter_scoring``) for a trained ranking-aware adapter.

Scores are computed once per run for the prompt (text features are encoded
in the constructor), then per batch of images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from imgrank.features.cache import PromptFeatures
    from imgrank.models.clip.towers import Backbone

#: Templates of the zero-shot antonym pair; ``{}`` is the prompt. Documented in docs/cli.md.
POSITIVE_TEMPLATE = "a photo of high {}."
NEGATIVE_TEMPLATE = "a photo of low {}."


@dataclass
class FeatureBatch:
    """Image features of one batch, as numpy arrays (runtime-agnostic: torch or ONNX).

    Attributes:
        pooled: (N, E) float32 projected embeddings, not normalised (zero-shot scoring).
        tokens: (N, P, D) visual tokens for the adapter, or None when not computed.
    """

    pooled: np.ndarray
    tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.pooled.shape[0])


class Scorer(Protocol):
    """What the pipeline needs from a scorer."""

    #: Short description shown in summaries and reports, e.g. ``zero-shot CLIP``.
    name: str
    #: True when the scorer reads visual tokens (adapters), False for pooled embeddings.
    needs_tokens: bool

    def score(self, batch: FeatureBatch) -> np.ndarray:
        """(N,) float scores for the batch, higher meaning more of what was asked.

        A scorer may also carry ``cache_key`` (a string): then
        :func:`imgrank.features.pipeline.score_images` keeps its scores in the
        embedding cache under that key and does not score a file again while it is
        unchanged. Adapters do (their forward is a cached re-sort's whole cost);
        zero-shot and heads cost a dot product and do not.
        """
        ...


def antonym_pair(prompt: str, against: str | None = None) -> tuple[str, str]:
    """The positive and negative phrasings for zero-shot scoring.

    With ``against`` both texts are used verbatim: ``--by "a sharp photo"
    --against "a blurry photo"``.
    """
    prompt = prompt.strip()
    if against is not None:
        return prompt, against.strip()
    return POSITIVE_TEMPLATE.format(prompt), NEGATIVE_TEMPLATE.format(prompt)


def _l2_normalize(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32, copy=False)
    norms = np.linalg.norm(array, axis=-1, keepdims=True)
    return array / np.maximum(norms, 1e-12)


class ZeroShotScorer:
    """CLIP-IQA style scoring with an antonym pair; needs no training.

    The score of an image is the softmax probability, over the two phrasings,
    of the positive one: ``softmax(scale * [cos(img, pos), cos(img, neg)])[0]``.
    """

    needs_tokens = False

    def __init__(
        self, text_pooled: np.ndarray, logit_scale: float, positive: str, negative: str
    ) -> None:
        """Args:
        text_pooled: (2, E) embeddings of the positive and negative phrasings.
        logit_scale: CLIP's temperature, ``exp(logit_scale)`` (capped at 100 as CLIP does).
        positive: the positive phrasing (for display).
        negative: the negative phrasing (for display).
        """
        self.positive, self.negative = positive, negative
        self.name = f'zero-shot CLIP ("{positive}" vs "{negative}")'
        self._text = _l2_normalize(np.asarray(text_pooled, dtype=np.float32))
        self._logit_scale = float(logit_scale)

    @classmethod
    def for_backbone(
        cls, backbone: Backbone, prompt: str, against: str | None = None
    ) -> ZeroShotScorer:
        """Encode the antonym pair once with the backbone's text tower."""
        positive, negative = antonym_pair(prompt, against)
        text = backbone.encode_text([positive, negative])
        scale = min(float(backbone.model.logit_scale.exp().item()), 100.0)
        return cls(text.pooled.float().cpu().numpy(), scale, positive, negative)

    @classmethod
    def from_prompt_features(
        cls, features: Sequence[PromptFeatures], positive: str, negative: str
    ) -> ZeroShotScorer:
        """From the two phrasings' features (the prompt cache's form, any text tower)."""
        pooled = np.stack([np.asarray(f.pooled, dtype=np.float32).reshape(-1) for f in features])
        return cls(pooled, features[0].logit_scale, positive, negative)

    def score(self, batch: FeatureBatch) -> np.ndarray:
        logits = self._logit_scale * (_l2_normalize(batch.pooled) @ self._text.T)  # (N, 2)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return (probs[:, 0] / probs.sum(axis=1)).astype(np.float64)


class SimilarityScorer:
    """Ranks by likeness to example photos (``imgrank sort --like PHOTO``), as image
    search tools do: the cosine similarity (-1 .. 1) between an image's embedding and
    the mean of the examples' normalised embeddings."""

    needs_tokens = False

    def __init__(self, examples: np.ndarray, names: list[str]) -> None:
        """Args:
        examples: (K, E) pooled embeddings of the example photos.
        names: their file names (for display).
        """
        centre = _l2_normalize(np.asarray(examples, dtype=np.float32)).mean(axis=0)
        self._centre = _l2_normalize(centre[None, :])[0]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        self.name = f"likeness to {shown}"

    def score(self, batch: FeatureBatch) -> np.ndarray:
        return (_l2_normalize(batch.pooled) @ self._centre).astype(np.float64)


class WeightedScorer:
    """``--by`` and ``--like`` together: ``(1 - weight) * by + weight * (1 + cos) / 2``.

    The zero-shot score is a probability (0 .. 1); the likeness is mapped from
    -1 .. 1 to the same range, so ``weight`` says how much each counts.
    """

    needs_tokens = False

    def __init__(self, by: Scorer, like: SimilarityScorer, weight: float) -> None:
        self._by, self._like, self._weight = by, like, float(weight)
        self.name = f"{by.name} and {like.name} (weight {weight:g})"

    def score(self, batch: FeatureBatch) -> np.ndarray:
        likeness = (1.0 + self._like.score(batch)) / 2.0
        return (1.0 - self._weight) * self._by.score(batch) + self._weight * likeness
