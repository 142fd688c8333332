"""imgrank: sort photos by what a sentence asks for.

The library never prints or exits; :mod:`imgrank.cli` turns library errors
(:class:`imgrank.errors.ImgrankError`) into one clear message and an exit code.
Heavy dependencies (torch, open_clip, onnxruntime) are imported inside the
functions that need them so that ``imgrank --help`` stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: The public API (docs/api.md), imported on first use so ``import imgrank`` stays cheap.
_PUBLIC = {
    "sort_folder": "imgrank.api",
    "load_model": "imgrank.api",
    "Model": "imgrank.api",
    "ImgrankWarning": "imgrank.api",
    "Ranking": "imgrank.ranking",
    "RankedImage": "imgrank.ranking",
    "SkippedFile": "imgrank.ranking",
    "ImgrankError": "imgrank.errors",
}

__all__ = [
    "__version__",
    "sort_folder",
    "load_model",
    "Model",
    "ImgrankWarning",
    "Ranking",
    "RankedImage",
    "SkippedFile",
    "ImgrankError",
]

if TYPE_CHECKING:
    from imgrank.api import ImgrankWarning, Model, load_model, sort_folder
    from imgrank.errors import ImgrankError
    from imgrank.ranking import RankedImage, Ranking, SkippedFile


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imgrank' has no attribute {name!r}")
