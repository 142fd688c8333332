"""Scoring with a ranking-aware adapter (torch).

:class:`AdapterScorer` follows :class:`imgrank.models.scoring.Scorer`: it reads the
visual tokens of a batch and returns the adapter's regression score per image
(one forward per batch, no pairs, so sorting N images costs O(N)). The
prompt's text tokens are computed once (or read from the prompt cache), and so
is everything of the adapter that depends on the prompt alone
(:meth:`imgrank.models.adapter.RankingAdapter.prepare_text`): the
cross-attention's keys and values are not recomputed for every image.
:meth:`imgrank.models.ranking_model.RankingModel.scorer` builds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from imgrank.errors import AdapterMismatchError, ModelError

if TYPE_CHECKING:
    from imgrank.models.adapter import RankingAdapter
    from imgrank.models.checkpoints import ModelFolder
    from imgrank.models.clip.towers import TextFeatures
    from imgrank.models.scoring import FeatureBatch

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
    #: Set by :meth:`imgrank.models.ranking_model.RankingModel.scorer`: the key its
    #: scores are cached under (:func:`imgrank.models.ranking_model.score_cache_key`).
    cache_key: str | None = None

    def __init__(
        self,
        adapter: RankingAdapter,
        text_encoder: TextEncoder | None,
        prompt: str,
        *,
        prompt_format: str = "{}",
        name: str | None = None,
        text_tokens: np.ndarray | None = None,
    ) -> None:
        """Encode the prompt once.

        Args:
            adapter: The adapter (eval mode); it runs on its own device in float32.
            text_encoder: The backbone whose text tower the adapter was trained with
                (None when ``text_tokens`` are given).
            prompt: The user's prompt.
            prompt_format: ``{}`` is replaced by the prompt (``{}``: verbatim).
            name: Display name (default: the adapter's variant).
            text_tokens: (L, D) the formatted prompt's text tokens, already computed
                (the prompt cache's, or the open_clip-free tower's); then
                ``text_encoder`` is not used.
        """
        import torch

        if not prompt.strip():
            raise ModelError("the prompt is empty: say what to sort by, e.g. --by 'image quality'")
        self.adapter = adapter.eval()
        self.prompt = prompt_format.replace("{}", prompt)
        parameter = next(adapter.parameters())
        self._device, self._dtype = parameter.device, parameter.dtype
        if text_tokens is not None:
            tokens = torch.from_numpy(np.array(text_tokens, dtype=np.float32))[None]
        elif text_encoder is not None:
            tokens = text_encoder.encode_text([self.prompt]).tokens  # (1, L, D)
        else:
            raise ValueError("AdapterScorer needs a text encoder or the prompt's text tokens")
        self._text = tokens.detach().to(self._device, dtype=self._dtype).clone()
        width = adapter.config.d_model
        if self._text.ndim != 3 or self._text.shape[-1] != width:
            raise AdapterMismatchError(
                f"the text tower gives tokens {tuple(self._text.shape)}, but the adapter expects "
                f"width {width}: the backbone is not the one the adapter was trained on"
            )
        self.name = name or f"ranking adapter ({adapter.config.variant})"
        self._torch = torch
        with torch.inference_mode():
            self._prepared = adapter.prepare_text(self._text)

    def score(self, batch: FeatureBatch) -> np.ndarray:
        """(N,) regression scores of the batch, higher = more of the prompt."""
        if batch.tokens is None:
            raise ModelError("the adapter needs visual tokens, but the image encoder gave none")
        torch = self._torch
        tokens = torch.from_numpy(np.ascontiguousarray(batch.tokens)).to(
            self._device, dtype=self._dtype
        )
        with torch.inference_mode():
            scores = self.adapter.score_prepared(tokens, self._prepared)
        return scores.reshape(-1).double().cpu().numpy()


def untrained_prompt_warning(folder: ModelFolder, prompt: str) -> str | None:
    """A warning when ``prompt`` is not one the adapter was trained on (None if it is, or
    the folder does not say). Adapters can generalise, so this is a warning, not an error."""
    from imgrank.models.checkpoints import trained_prompts

    def normal(text: str) -> str:
        return " ".join(text.split()).casefold()

    known = trained_prompts(folder)
    if not known or normal(prompt) in {normal(p) for p in known}:
        return None
    shown = "; ".join(repr(p) for p in known[:5]) + (" ..." if len(known) > 5 else "")
    return (
        f"--by {prompt!r} is not a prompt {folder.path.name} was trained on ({shown}); an "
        "adapter may generalise to it, but check the ranking"
    )
