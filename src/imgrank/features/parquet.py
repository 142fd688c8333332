"""Features datasets: the features of many photos as Parquet shards, embedded once, ranked often.

``imgrank embed SRC --out DIR`` writes, into DIR:

* ``_imgrank-features.json``: what produced the features (model description,
  fingerprint, preprocessing, decode version, embedding size, whether visual
  tokens are stored and their shape);
* ``part-<time>-<id>.parquet`` shards with one row per photo: ``path``
  (string: an absolute local path or a URI), ``size`` and ``mtime_ns`` (int64,
  what the file was when embedded), ``pooled`` (fixed-size list of float32,
  the projected embedding) and, with ``--tokens``, ``tokens`` (fixed-size list
  of float32, the visual tokens flattened row-major from the shape in the
  metadata).

The shards are plain Parquet: ``pandas.read_parquet(DIR)``, DuckDB's
``read_parquet('DIR/*.parquet')`` and ``ray.data.read_parquet(DIR)`` read them
as they are. A dataset is the distributed counterpart of the SQLite embedding
cache (which stays the local default): any node can read it and nothing has
to be decoded again to rank by another prompt.

Shards are only ever added or rewritten whole (written beside, then renamed
into place), so an interrupted ``embed`` leaves every earlier shard intact.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgrank.errors import UsageError
from imgrank.images.sources import Source, is_uri

if TYPE_CHECKING:
    import pyarrow as pa

    from imgrank.features.stream import ImageEncoder
    from imgrank.models.scoring import FeatureBatch

#: The leading underscore keeps pyarrow, pandas and Ray from reading it as a shard.
METADATA_NAME = "_imgrank-features.json"
FORMAT_NAME = "imgrank-features"
FORMAT_VERSION = 1

#: Photos per shard: ~1 MB of pooled ViT-B-32 features; with tokens (~150 KB a photo) ~75 MB.
SHARD_ROWS = 512


@dataclass
class DatasetInfo:
    """The metadata file of a features dataset."""

    model: str
    #: The embedding cache's key: encoder weights + preprocessing + decode version.
    fingerprint: str
    preprocess: dict[str, Any]
    decode_version: str
    embed_dim: int
    tokens: bool = False
    token_shape: list[int] | None = None
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    created_by: str = field(default_factory=lambda: _imgrank_version())

    @classmethod
    def for_encoder(cls, encoder: ImageEncoder, embed_dim: int, token_shape: list[int] | None) -> DatasetInfo:
        from imgrank.features.stream import cache_fingerprint, describe_encoder
        from imgrank.images.decode import DECODE_VERSION

        return cls(
            model=describe_encoder(encoder),
            fingerprint=cache_fingerprint(encoder),
            preprocess=encoder.preprocess.to_dict(),
            decode_version=DECODE_VERSION,
            embed_dim=embed_dim,
            tokens=token_shape is not None,
            token_shape=token_shape,
        )


def _imgrank_version() -> str:
    from imgrank import __version__

    return f"imgrank {__version__}"


def is_dataset(folder: Source) -> bool:
    """Whether ``folder`` is a features dataset written by ``imgrank embed``."""
    return not is_uri(folder) and (Path(folder) / METADATA_NAME).is_file()


def read_info(folder: Path) -> DatasetInfo:
    """The dataset's metadata.

    Raises:
        UsageError: the metadata file is unreadable or from an unknown format version.
    """
    path = folder / METADATA_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} cannot be read as an imgrank features dataset: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise UsageError(f"{path} is not an imgrank features dataset")
    if data.get("version") != FORMAT_VERSION:
        raise UsageError(
            f"{path} is version {data.get('version')} of the features format; this imgrank "
            f"reads version {FORMAT_VERSION}. Embed into a new folder."
        )
    known = set(DatasetInfo.__dataclass_fields__)
    return DatasetInfo(**{key: value for key, value in data.items() if key in known})


def write_info(folder: Path, info: DatasetInfo) -> None:
    """Write the metadata file whole (imgrank's one atomic writer)."""
    from imgrank.files.atomic import write_file

    write_file(folder / METADATA_NAME, json.dumps(asdict(info), indent=2) + "\n", replace=True)


def shard_files(folder: Path) -> list[Path]:
    """The dataset's shards, oldest first (names start with the time they were written)."""
    return sorted(folder.glob("part-*.parquet"))


def new_shard_name() -> str:
    """A shard name that sorts by time and never collides across writers."""
    return f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"


def features_table(
    paths: list[str],
    sizes: np.ndarray,
    mtimes_ns: np.ndarray,
    pooled: np.ndarray,
    tokens: np.ndarray | None = None,
) -> pa.Table:
    """One shard's rows as an Arrow table (the format the module docstring describes)."""
    import pyarrow as pa

    pooled = np.ascontiguousarray(pooled, dtype=np.float32)
    columns: dict[str, Any] = {
        "path": pa.array(paths, type=pa.string()),
        "size": pa.array(np.asarray(sizes, dtype=np.int64)),
        "mtime_ns": pa.array(np.asarray(mtimes_ns, dtype=np.int64)),
        "pooled": pa.FixedSizeListArray.from_arrays(pa.array(pooled.reshape(-1)), pooled.shape[1]),
    }
    if tokens is not None:
        flat = np.ascontiguousarray(tokens, dtype=np.float32).reshape(len(paths), -1)
        columns["tokens"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    return pa.table(columns)


def write_shard(folder: Path, table: pa.Table) -> Path:
    """Write one new shard whole (imgrank's one atomic writer: a hidden name, then renamed)."""
    import pyarrow.parquet as pq

    from imgrank.files.atomic import atomic_file

    target = folder / new_shard_name()
    with atomic_file(target) as stream:
        pq.write_table(table, stream)
    return target


def stored_keys(folder: Path) -> dict[str, tuple[int, int]]:
    """``path -> (size, mtime_ns)`` of every photo stored (later shards win)."""
    import pyarrow.parquet as pq

    keys: dict[str, tuple[int, int]] = {}
    for shard in shard_files(folder):
        table = pq.read_table(shard, columns=["path", "size", "mtime_ns"])
        for path, size, mtime in zip(
            table.column("path").to_pylist(),
            table.column("size").to_pylist(),
            table.column("mtime_ns").to_pylist(),
            strict=True,
        ):
            keys[path] = (size, mtime)
    return keys


def drop_rows(folder: Path, paths: set[str], *, keep: set[Path]) -> None:
    """Remove the rows of ``paths`` from every shard but those in ``keep`` (rewritten whole).

    Called after the new features of changed photos are written, so the
    dataset never holds a photo twice; an interruption in between leaves both
    rows, and readers then take the one from the later shard.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not paths:
        return
    wanted = _string_set(paths)
    for shard in shard_files(folder):
        if shard in keep:
            continue
        table = pq.read_table(shard)
        stale = pc.is_in(table.column("path"), value_set=wanted)
        if not pc.any(stale).as_py():
            continue
        remaining = table.filter(pc.invert(stale))
        if remaining.num_rows:
            write_shard(folder, remaining)
        shard.unlink()


def _string_set(values: set[str]) -> pa.Array:
    import pyarrow as pa

    return pa.array(sorted(values), type=pa.string())


def iter_stored(
    folder: Path, *, batch_size: int, tokens: bool, token_shape: list[int] | None
) -> Iterator[tuple[list[str], FeatureBatch]]:
    """The stored features, shard by shard, in batches of at most ``batch_size`` photos."""
    import pyarrow.parquet as pq

    columns = ["path", "pooled", *(["tokens"] if tokens else [])]
    for shard in shard_files(folder):
        parquet = pq.ParquetFile(shard)
        for record_batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
            yield record_batch.column(0).to_pylist(), batch_features(
                {name: record_batch.column(i) for i, name in enumerate(columns)}, token_shape
            )


def batch_features(columns: dict[str, Any], token_shape: list[int] | None) -> FeatureBatch:
    """A :class:`FeatureBatch` from stored columns (Arrow fixed-size lists or numpy arrays)."""
    from imgrank.models.scoring import FeatureBatch

    pooled = _matrix(columns["pooled"])
    grid = None
    if "tokens" in columns and token_shape is not None:
        grid = _matrix(columns["tokens"]).reshape(len(pooled), *token_shape)
    return FeatureBatch(pooled=pooled, tokens=grid)


def _matrix(column: Any) -> np.ndarray:
    """(N, K) float32 from an Arrow fixed-size-list column or an (N, K) numpy array."""
    # Copies: Arrow's buffers are read-only, and torch wants to own what it wraps.
    if isinstance(column, np.ndarray):
        if column.dtype == object:  # Ray hands lists over as an array of arrays
            return np.stack(column).astype(np.float32)
        return np.array(column, dtype=np.float32)
    width = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.array(values.reshape(-1, width), dtype=np.float32)


def source_key(source: Source) -> tuple[str, int, int] | str:
    """``(stored path, size, mtime_ns)`` of a source, or the reason it cannot be stored."""
    if is_uri(source):
        return _uri_key(str(source))
    path = Path(source).absolute()
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not valid UTF-8, which a Parquet dataset cannot store"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "file disappeared before it could be read"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    return text, info.st_size, info.st_mtime_ns


def _uri_key(uri: str) -> tuple[str, int, int] | str:
    import pyarrow.fs

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(uri)
        info = fs.get_file_info(inner)
    except (OSError, ValueError) as exc:
        return f"cannot read: {exc}"
    if info.type == pyarrow.fs.FileType.NotFound:
        return "file disappeared before it could be read"
    return uri, int(info.size or 0), int(info.mtime_ns or 0)
