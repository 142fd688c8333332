"""The prompt cache: a prompt's text features, read from the embedding cache or computed once.

Every scorer that encodes text (zero-shot on torch or onnxruntime, adapters on
either) goes through :func:`prompt_features`. A re-sort by a prompt used
before then runs no text tower: for zero-shot scoring that means no torch and
no weights file at all. Entries are keyed on the text tower's fingerprint and
on the exact text fed to it (after the antonym templates or an adapter's prompt
format), so towers, weights and phrasings never mix.

The cache is a shortcut only: a prompt table that cannot be read or written
costs one warning and the text tower runs, never the sort.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from imgrank.features.cache import PromptFeatures

if TYPE_CHECKING:
    from imgrank.features.cache import EmbeddingCache


class TextTower(Protocol):
    """What :func:`prompt_features` needs from a text tower."""

    @property
    def text_fingerprint(self) -> str:
        """Identifies the features the tower computes (architecture, weights, number format)."""
        ...

    def prompt_features(self, texts: list[str], *, tokens: bool = False) -> list[PromptFeatures]:
        """The features of ``texts``, in order; ``tokens``: also every context position."""
        ...


def prompt_features(
    texts: Sequence[str],
    compute: Callable[..., list[PromptFeatures]],
    *,
    fingerprint: str,
    cache: EmbeddingCache | None,
    tokens: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[PromptFeatures]:
    """Features of ``texts``: from the cache when stored there, else computed and stored.

    Args:
        texts: the exact strings fed to the text tower.
        compute: the text tower, called as ``compute(missing_texts, tokens=tokens)``
            only for texts not found (so a tower that is expensive to build is
            built only then).
        fingerprint: the text tower's fingerprint (computed without building it
            where possible).
        cache: the run's embedding cache, or None (``--no-cache``).
        tokens: the caller needs the per-position text tokens (adapters); an entry
            stored without them counts as missing and is replaced.
        warn: told once when the prompt table cannot be read or written (default:
            the cache's own warning hook).
    """
    if warn is None and cache is not None:
        warn = cache.warn
    found: dict[str, PromptFeatures] = {}
    unique = list(dict.fromkeys(texts))
    if cache is not None:
        try:
            for text in unique:
                entry = cache.get_prompt(fingerprint, text)
                if entry is not None and (entry.tokens is not None or not tokens):
                    found[text] = entry
        except Exception as exc:  # noqa: BLE001 - CacheError, sqlite3, a malformed row: go on
            _tell(warn, f"{exc}; the prompt is encoded again and not cached this time")
            cache = None
    missing = [text for text in unique if text not in found]
    if missing:
        computed = compute(missing, tokens=tokens)
        for text, features in zip(missing, computed, strict=True):
            found[text] = features
        if cache is not None:
            try:
                for text in missing:
                    cache.put_prompt(fingerprint, text, found[text])
            except Exception as exc:  # noqa: BLE001 - a full disk or a lock costs the shortcut
                _tell(warn, f"{exc}; the prompt's text features were not cached")
    return [found[text] for text in texts]


def _tell(warn: Callable[[str], None] | None, message: str) -> None:
    if warn is not None:
        warn(message)
