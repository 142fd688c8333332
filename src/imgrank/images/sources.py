"""Where the photos of a run come from: a folder, a list of paths, or object storage.

A run's inputs are *sources*: a local :class:`~pathlib.Path`, or a URI string
(``s3://bucket/key.jpg``, ``gs://...``, ``hdfs://...``, ``file:///...``)
that pyarrow's file systems read. URIs stay strings because ``Path`` would
fold ``s3://`` into ``s3:/``; every writer prints a source with ``str()``.

* :func:`list_sources` lists a folder, a single file or a URI prefix;
* :func:`read_path_list` reads ``--paths-from FILE``: a text file (one path
  per line), or a CSV / Parquet file with a ``path`` column (what DuckDB,
  pandas or a Ray job writes);
* :func:`open_source` opens a URI for reading, so the one decode function
  (:func:`imgrank.images.decode.open_image`) reads object storage too.

pyarrow is imported only when a URI or a CSV/Parquet list is given: a local
sort never imports it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from imgrank.errors import UsageError
from imgrank.images.decode import DEFAULT_MAX_FILE_MB, find_images, supported_extensions
from imgrank.images.uri import filesystem as _filesystem
from imgrank.images.uri import is_uri, open_source
from imgrank.images.uri import require_pyarrow as _require_pyarrow

#: A local path or a URI string.
Source = Path | str

__all__ = ["Source", "is_uri", "list_sources", "open_source", "read_path_list", "source_name"]

def _uri_prefix(uri: str, fs_path: str) -> str:
    """What goes before pyarrow's in-file-system path to make a URI again.

    ``s3://bucket/dir`` -> ``s3://``; ``hdfs://host:8020/dir`` -> ``hdfs://host:8020``;
    ``file:///tmp/dir`` -> ``file://``.
    """
    whole, inner = uri.split("?", 1)[0].rstrip("/"), fs_path.rstrip("/")
    if inner and whole.endswith(inner):
        return whole[: len(whole) - len(inner)]
    return uri.split("://", 1)[0] + "://"


def list_sources(
    source: Source,
    *,
    recursive: bool = True,
    include_hidden: bool = False,
    exclude: list[Path] | tuple[Path, ...] = (),
    on_skip: Callable[[Source, str], None] | None = None,
    on_output_folder: Callable[[Path], None] | None = None,
    max_file_mb: int | None = DEFAULT_MAX_FILE_MB,
) -> list[Source]:
    """The image files of a folder, a single file, or a URI prefix, sorted.

    Local folders are scanned by :func:`imgrank.images.decode.find_images`
    (the local engine's own listing); URIs are listed through pyarrow.

    Raises:
        UsageError: the source does not exist or cannot be listed.
    """
    if not is_uri(source):
        folder = Path(source)
        if not folder.exists():
            raise UsageError(f"{folder} does not exist")
        return list(
            find_images(
                folder,
                recursive=recursive,
                include_hidden=include_hidden,
                exclude=exclude,
                on_skip=on_skip,
                on_output_folder=on_output_folder,
                max_file_mb=max_file_mb,
            )
        )
    uri = str(source)
    fs, root = _filesystem(uri)
    import pyarrow.fs

    prefix = _uri_prefix(uri, root)
    try:
        info = fs.get_file_info(root)
        if info.type == pyarrow.fs.FileType.NotFound:
            raise UsageError(f"{uri} does not exist")
        if info.type == pyarrow.fs.FileType.File:
            return [uri]
        entries = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=recursive))
    except OSError as exc:
        raise UsageError(f"cannot list {uri}: {exc}") from None
    extensions = supported_extensions()
    found: list[Source] = []
    for entry in entries:
        if entry.type != pyarrow.fs.FileType.File:
            continue
        relative = entry.path[len(root.rstrip("/")) + 1 :]
        if not include_hidden and any(part.startswith(".") for part in relative.split("/")):
            continue
        if os.path.splitext(entry.path)[1].lower() in extensions:
            found.append(prefix + entry.path)
    return sorted(found, key=str)


def read_path_list(list_file: Path) -> list[Source]:
    """The sources named in ``--paths-from FILE``, in the file's order, duplicates dropped.

    ``.csv`` and ``.parquet`` files are read with pyarrow and must have a
    ``path`` column; any other file is text with one path or URI per line
    (blank lines and lines starting with ``#`` are ignored). Relative paths
    are taken relative to the list file's folder, so a list travels with
    its photos.

    Raises:
        UsageError: the file cannot be read or has no ``path`` column.
    """
    if not list_file.is_file():
        raise UsageError(f"--paths-from {list_file}: no such file")
    suffix = list_file.suffix.lower()
    if suffix in (".csv", ".parquet", ".pq"):
        entries = _path_column(list_file, parquet=suffix != ".csv")
    else:
        try:
            with open(list_file, encoding="utf-8", errors="surrogateescape") as stream:
                lines = stream.read().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read {list_file}: {exc.strerror or exc}") from None
        entries = [line.strip() for line in lines]
        entries = [e for e in entries if e and not e.startswith("#")]
    base = list_file.absolute().parent
    seen: set[str] = set()
    sources: list[Source] = []
    for entry in entries:
        if is_uri(entry):
            item: Source = entry
        else:
            path = Path(entry).expanduser()
            item = path if path.is_absolute() else base / path
        if str(item) not in seen:
            seen.add(str(item))
            sources.append(item)
    return sources


def _path_column(list_file: Path, *, parquet: bool) -> list[str]:
    _require_pyarrow(f"--paths-from {list_file}")
    import pyarrow
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if parquet:
            table = pyarrow.parquet.read_table(list_file)
        else:
            table = pyarrow.csv.read_csv(list_file)
    except (OSError, pyarrow.ArrowInvalid) as exc:
        raise UsageError(f"cannot read {list_file}: {exc}") from None
    if "path" not in table.column_names:
        raise UsageError(
            f"{list_file} has no 'path' column (its columns: {', '.join(table.column_names)})"
        )
    return [str(value) for value in table.column("path").to_pylist() if value]


def missing_local_files(sources: list[Source]) -> list[tuple[Source, str]]:
    """The local entries of a path list that are not usable files, with a reason each."""
    problems: list[tuple[Source, str]] = []
    for source in sources:
        if is_uri(source):
            continue  # checked when read: a listing call per object would cost a round trip
        path = Path(source)
        if not path.exists():
            problems.append((source, "listed in --paths-from but does not exist"))
        elif not path.is_file():
            problems.append((source, "listed in --paths-from but is not a file"))
    return problems


def source_name(source: Source) -> str:
    """The file name of a source (for reports and rank-ordered names)."""
    return str(source).rstrip("/").rsplit("/", 1)[-1] if is_uri(source) else Path(source).name
