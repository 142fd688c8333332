"""URIs: telling a URI from a local path, and reading one (pyarrow's file systems).

Kept apart from :mod:`imgrank.images.sources` (which lists inputs) so that the
one decode (:mod:`imgrank.images.decode`) can read object storage without the
two modules importing each other. pyarrow is imported only when a URI is read.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING

from imgrank.errors import ImageDecodeError, UsageError

if TYPE_CHECKING:
    import pyarrow

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_uri(value: object) -> bool:
    """Whether ``value`` is a URI string (``scheme://...``) rather than a local path."""
    return isinstance(value, str) and _URI.match(value) is not None


def require_pyarrow(what: str) -> None:
    try:
        import pyarrow  # noqa: F401
    except ModuleNotFoundError:
        raise UsageError(
            f"{what} needs pyarrow: pip install 'imgrank[ray]' (or pip install pyarrow)"
        ) from None


def filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """pyarrow's file system for a URI, and the path inside it."""
    require_pyarrow(f"reading {uri}")
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as exc:
        raise UsageError(f"cannot open {uri}: {exc}") from None


def open_source(uri: str) -> io.BytesIO:
    """The bytes of a URI, read whole through pyarrow (photos are a few MB).

    Raises:
        ImageDecodeError: the object cannot be read, with a reason naming why.
    """
    try:
        fs, path = filesystem(uri)
    except UsageError as exc:
        raise ImageDecodeError(uri, str(exc)) from None
    try:
        with fs.open_input_stream(path) as stream:
            return io.BytesIO(stream.read())
    except FileNotFoundError:
        raise ImageDecodeError(uri, "file disappeared before it could be read") from None
    except PermissionError:
        raise ImageDecodeError(uri, "permission denied") from None
    except OSError as exc:
        raise ImageDecodeError(uri, f"cannot read: {exc}") from None
