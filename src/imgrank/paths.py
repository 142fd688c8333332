"""Where imgrank keeps its files.

``IMGRANK_HOME`` overrides everything (tests always set it). Otherwise the
platform's user cache folder holds re-creatable data (downloaded weights, the
embedding cache) and the user data folder holds what must survive (rename
journals), both found with platformdirs.
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "imgrank"


def _home_override() -> Path | None:
    value = os.environ.get("IMGRANK_HOME")
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """Folder for re-creatable data: weights and the embedding cache."""
    home = _home_override()
    if home is not None:
        return home / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def data_dir() -> Path:
    """Folder for data that must not be lost: rename journals."""
    home = _home_override()
    if home is not None:
        return home / "data"
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def weights_dir() -> Path:
    """Where open_clip pretrained weights are downloaded to and reused from."""
    return cache_dir() / "weights"


def journal_dir() -> Path:
    """Where rename journals live (one JSON-lines file per run)."""
    return data_dir() / "journals"


def default_cache_db() -> Path:
    """The default embedding cache database."""
    return cache_dir() / "embeddings.sqlite3"
