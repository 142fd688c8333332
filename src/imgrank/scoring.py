"""Scorers: turn image features into one number per image (higher = more of the prompt).

Every scorer has the same small interface, :class:`Scorer`, so the pipeline,
the cache and the writers do not care which one runs:

* :class:`ZeroShotScorer` (no adapter): CLIP similarity against an antonym
  pair built from the prompt, the CLIP-IQA idea. ``"image quality"`` becomes
  ``"a photo of high image quality."`` vs ``"a photo of low image quality."``
  and the score is the softmax probability of the positive phrasing. Ranking
  by plain similarity to the words would favour photos that *look like* the
  words (e.g. pictures of text) instead of photos that *have* the quality.
* the adapter scorer (``imgrank.adapter_scoring``) for a trained ranking-aware adapter.

Scores are computed once per run for the prompt (text features are encoded
in the constructor), then per batch of images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from imgrank.backbone import Backbone, ImageFeatures

#: Templates of the zero-shot antonym pair; ``{}`` is the prompt. Documented in docs/cli.md.
POSITIVE_TEMPLATE = "a photo of high {}."
NEGATIVE_TEMPLATE = "a photo of low {}."


class Scorer(Protocol):
    """What the pipeline needs from a scorer."""

    #: Short description shown in summaries and reports, e.g. ``zero-shot CLIP``.
    name: str
    #: True when the scorer reads visual tokens (adapters), False for pooled embeddings.
    needs_tokens: bool

    def score(self, features: ImageFeatures) -> list[float]:
        """One score per image of the batch, higher meaning more of what was asked."""
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


def zero_shot_scores(
    image_pooled: torch.Tensor, text_pooled: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Probability of the positive text (row 0 of ``text_pooled``) for each image.

    Args:
        image_pooled: (N, E) image embeddings (any scale).
        text_pooled: (2, E) embeddings of the positive and negative phrasings.
        logit_scale: CLIP's learned temperature (exp of ``logit_scale``).
    """
    import torch.nn.functional as F

    image = F.normalize(image_pooled.float(), dim=-1)
    text = F.normalize(text_pooled.float(), dim=-1)
    logits = logit_scale * image @ text.T  # (N, 2)
    return logits.softmax(dim=-1)[:, 0]


class ZeroShotScorer:
    """CLIP-IQA style scoring with an antonym pair; needs no training."""

    needs_tokens = False

    def __init__(self, backbone: Backbone, prompt: str, against: str | None = None) -> None:
        import torch

        self.positive, self.negative = antonym_pair(prompt, against)
        self.name = f'zero-shot CLIP ("{self.positive}" vs "{self.negative}")'
        text = backbone.encode_text([self.positive, self.negative])
        self._text = text.pooled.float()
        with torch.no_grad():
            self._logit_scale = float(backbone.model.logit_scale.exp().clamp(max=100).item())

    def score(self, features: ImageFeatures) -> list[float]:
        text = self._text.to(features.pooled.device)
        return zero_shot_scores(features.pooled, text, self._logit_scale).cpu().tolist()
