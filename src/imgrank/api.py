"""imgrank as a Python library: sort a folder, or load a model and score images.

:func:`sort_folder` is ``imgrank sort`` without the command line: it returns
the :class:`~imgrank.ranking.Ranking` the CLI prints, with the same scores
and order for the same options. :func:`load_model` loads a backbone (and an
adapter) once; :meth:`Model.score` then scores lists of files or of
already-decoded PIL images, for notebooks and other programs.

Like the rest of the library, nothing here prints, exits or changes
process-wide state (torch's thread count is yours to set). Warnings (random
weights, an adapter used with another backbone) go to ``on_warning`` when
given, else to Python's :mod:`warnings` as :class:`ImgrankWarning`. Errors are
:class:`~imgrank.errors.ImgrankError` subclasses whose message names the file.
Documented with runnable examples in docs/api.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgrank.errors import ImageDecodeError, UsageError
from imgrank.features.pipeline import DEFAULT_BATCH_SIZE
from imgrank.images.decode import DEFAULT_MAX_PIXELS
from imgrank.models.clip.config import DEFAULT_MODEL, DEFAULT_PRETRAINED
from imgrank.ranking import Ranking

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from imgrank.models.ranking_model import RankingModel
    from imgrank.models.scoring import Scorer

class ImgrankWarning(UserWarning):
    """Something a user of the library should know (random weights, a mismatched backbone)."""


def _warner(on_warning: Callable[[str], None] | None) -> Callable[[str], None]:
    if on_warning is not None:
        return on_warning
    return lambda message: warnings.warn(message, ImgrankWarning, stacklevel=3)


def sort_folder(
    folder: str | Path,
    by: str,
    *,
    against: str | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    adapter: str | Path | None = None,
    device: str = "auto",
    runtime: str = "auto",
    precision: str = "auto",
    top: int | None = None,
    ascending: bool = False,
    cache: bool | str | Path = True,
    recursive: bool = True,
    include_hidden: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_warning: Callable[[str], None] | None = None,
) -> Ranking:
    """Rank the photos of ``folder`` by how well they match ``by``, as ``imgrank sort`` does.

    Args:
        folder: The folder to scan (sub-folders too unless ``recursive=False``).
        by: What to sort by, e.g. ``"image quality"``.
        against: Zero-shot only: the negative phrasing (both are then used verbatim).
        model: open_clip model name or config JSON (default ``ViT-B-32``; with an
            adapter, the adapter's own backbone).
        pretrained: Weights tag, a weights file, or ``"none"`` (random weights).
        adapter: A ranking-adapter model folder to score with.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        runtime: ``auto`` (on a CPU with onnxruntime installed, the model exported
            once to ONNX and reused; see docs/performance.md), ``torch`` or ``onnx``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (torch).
        top: Keep only the first ``top`` images.
        ascending: Lowest score first.
        cache: True for the default embedding cache, False for none, or a cache file.
        recursive, include_hidden, batch_size, workers, max_pixels: As the CLI options.
        on_warning: Called with each warning (default: :mod:`warnings`).

    Returns:
        The ranking: ``ranking.items`` (``rank``, ``score``, ``path``, best first
        unless ``ascending``) and ``ranking.skipped`` (``path``, ``reason``).

    Raises:
        UsageError: the folder does not exist or the options do not fit together.
        NoImagesRankedError: no image could be ranked.
        ModelError: the model cannot be loaded.
    """
    from imgrank.sorter import SortCallbacks, SortRequest
    from imgrank.sorter import sort_folder as run_sort

    if isinstance(cache, bool):
        cache_file, use_cache = None, cache
    else:
        cache_file, use_cache = Path(cache).expanduser(), True
    request = SortRequest(
        folder=Path(folder).expanduser(),
        prompt=by,
        against=against,
        model=model or DEFAULT_MODEL,
        pretrained=pretrained or DEFAULT_PRETRAINED,
        device=device,
        runtime=runtime,
        precision=precision,
        batch_size=batch_size,
        workers=workers,
        recursive=recursive,
        include_hidden=include_hidden,
        ascending=ascending,
        top=top,
        max_pixels=max_pixels,
        cache=cache_file,
        use_cache=use_cache,
        adapter=None if adapter is None else Path(adapter).expanduser(),
        # With an adapter, only what the caller gave overrides the folder's backbone.
        model_given=model is not None,
        pretrained_given=pretrained is not None,
    )
    return run_sort(request, SortCallbacks(warn=_warner(on_warning)))


@dataclass
class Model:
    """A loaded model (zero-shot CLIP, an adapter or a head) that scores images by any prompt.

    Load it with :func:`load_model`; :meth:`score` encodes the prompt and the
    images, so one loaded model serves many prompts and image lists. It wraps
    the loader's :class:`~imgrank.models.ranking_model.RankingModel`, the one
    ``imgrank sort`` uses.

    Attributes:
        ranking_model: What scores: its image encoder and its scorers.
        max_pixels: Files larger than this are refused (decompression bombs).
    """

    ranking_model: RankingModel
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def name(self) -> str:
        """What scores, e.g. ``zero-shot CLIP`` or ``ranking adapter my-model (full)``."""
        return self.ranking_model.name

    def scorer(self, by: str, against: str | None = None) -> Scorer:
        """The scorer for one prompt (its text is encoded once), as ``imgrank sort`` builds it."""
        return self.ranking_model.scorer(by, against)

    def score(
        self,
        images: Iterable[str | Path | Image.Image],
        by: str,
        *,
        against: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> np.ndarray:
        """Score images by ``by``: one float per image, in the order given (higher = more).

        Files are decoded exactly as ``imgrank sort`` decodes them, so a file
        gets the score the sort gives it. PIL images are taken as they are
        (converted to RGB; EXIF orientation is the caller's, as Pillow leaves it).

        Raises:
            ImageDecodeError: a file cannot be read or decoded (the message names it).
            UsageError: an empty prompt, or ``against`` with an adapter.
        """
        import numpy as np

        from imgrank.images.decode import load_pixels, pixels_for_model

        if batch_size < 1:
            raise UsageError("batch_size must be at least 1")
        scorer = self.scorer(by, against)
        encoder = self.ranking_model.image_encoder
        preprocess = self.ranking_model.preprocess
        scores: list[np.ndarray] = []
        batch: list[np.ndarray] = []

        def flush() -> None:
            features = encoder.encode_pixels(np.stack(batch), tokens=scorer.needs_tokens)
            scores.append(np.asarray(scorer.score(features), dtype=np.float64))
            batch.clear()

        for image in images:
            if isinstance(image, (str, Path)):
                # imgrank's one decode: the pixels the sort feeds the model.
                batch.append(load_pixels(Path(image), preprocess, max_pixels=self.max_pixels))
            elif hasattr(image, "mode") and hasattr(image, "size"):
                batch.append(pixels_for_model(image, preprocess))
            else:
                raise ImageDecodeError(
                    repr(image), "not a file path or a PIL image; cannot score it"
                )
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float64)

    def rank(
        self,
        images: Sequence[str | Path],
        by: str,
        *,
        against: str | None = None,
        ascending: bool = False,
        top: int | None = None,
    ) -> list[Any]:
        """Score files and order them as ``imgrank sort`` does (``rank``, ``score``, ``path``)."""
        from imgrank.ranking import rank_scores

        paths = [Path(p) for p in images]
        scores = self.score(paths, by, against=against)
        return rank_scores(
            list(zip(paths, scores.tolist(), strict=True)), ascending=ascending, top=top
        )


def load_model(
    model: str | None = None,
    pretrained: str | None = None,
    *,
    adapter: str | Path | None = None,
    onnx: str | Path | None = None,
    device: str = "auto",
    runtime: str = "auto",
    precision: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_warning: Callable[[str], None] | None = None,
) -> Model:
    """Load a model once, to score images with :meth:`Model.score`.

    The same loader as ``imgrank sort`` (:func:`imgrank.models.loading.load_model`).

    Args:
        model: open_clip model name or config JSON (default ``ViT-B-32``; with an
            adapter, the adapter's own backbone).
        pretrained: Weights tag, a weights file, or ``"none"`` (random weights).
        adapter: An imgrank model folder (a ranking adapter or an imported head).
        onnx: A folder written by ``imgrank export``, run with onnxruntime (no torch).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (torch).
        runtime: ``auto`` (an automatic ONNX export on a CPU with onnxruntime
            installed, else torch), ``torch`` or ``onnx`` (with ``onnx``).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (torch).
        max_pixels: Files larger than this are refused (decompression bombs).
        on_warning: Called with each warning (default: :mod:`warnings`).

    Raises:
        UsageError: options that do not fit together.
        ModelError: the model or folder cannot be loaded.
    """
    from imgrank.models.loading import load_model as load_ranking_model
    from imgrank.models.selection import ModelSelection

    by_folder = adapter is not None or onnx is not None
    selection = ModelSelection(
        # Without a folder the defaults name the backbone; with one, only what was given.
        model=model if by_folder else (model or DEFAULT_MODEL),
        pretrained=pretrained if by_folder else (pretrained or DEFAULT_PRETRAINED),
        adapter=None if adapter is None else Path(adapter).expanduser(),
        onnx=None if onnx is None else Path(onnx).expanduser(),
        device=None if onnx is not None else device,
        runtime=runtime,
        precision=None if onnx is not None else precision,
    )
    ranking_model = load_ranking_model(selection, warn=_warner(on_warning))
    return Model(ranking_model, max_pixels=max_pixels)
