"""The embedding cache: image features kept in SQLite so a re-sort decodes nothing.

One entry holds what the scorers need for one image file under one model:

* the pooled embedding (float32) that zero-shot scoring reads, and
* the visual tokens (float16 unless a value does not fit) that adapters read.

Beside them, the ``prompts`` table keeps each prompt's text features per text
tower (:class:`PromptFeatures`, read through :mod:`imgrank.features.prompts`), so a
re-sort by a prompt used before runs no text tower at all.

Entries are keyed on the file's absolute path and checked against its size,
``mtime_ns`` and inode number: a file that changed, or another file that took
its name (two photos that swapped names keep their sizes and mtimes, but not
their inodes), is a miss and is embedded again (its entry is replaced). Why the
inode and not the change time or the device: docs/safety.md, "The embedding
cache". Each model is a row of its own, identified by a fingerprint of the
encoder (architecture + weights identity) and of the preprocessing, so features
of different models or input sizes never mix.

Concurrency and robustness, because several ``imgrank sort`` processes may
share one cache and any of them may be killed:

* WAL journal mode: readers never wait for a writer and a killed writer leaves
  the database intact (at worst its last, uncommitted rows are lost);
* a busy timeout, and ``BEGIN IMMEDIATE`` for every write so that two writers
  queue instead of failing half way through a transaction;
* rows are buffered in memory and written in one short transaction every
  ``commit_every`` images (or every ``commit_seconds``), so an interrupted run
  keeps what it finished and the write lock is held for milliseconds;
* a schema-version table, and a file that is not an imgrank cache (garbage, a
  truncated file, another program's database, an older schema) is moved aside,
  never deleted, and a new cache is started, with a warning.

The cache holds only re-creatable data: deleting it costs time, never photos.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgrank.errors import CacheError, UnsafeOperationError
from imgrank.images.facts import FACTS_VERSION, CaptureTime, PhotoFacts

#: Version of the table layout below. A file with a higher version was written
#: by a newer imgrank and is left alone; an older one this module knows how to
#: upgrade (``MIGRATIONS``) is upgraded in place, anything older is moved aside.
#: 1: entries keyed on path, size, mtime_ns.
#: 2: entries also carry the inode (version 1 served a file the features of
#:    another that had swapped names with it).
#: 3: a ``prompts`` table: each prompt's text features per text tower, so a
#:    re-sort by a prompt used before runs no text tower (an additive step:
#:    every entry of version 2 stays valid).
SCHEMA_VERSION = 3

#: SQLite ``application_id`` marking a file as an imgrank cache ("IMGR").
APPLICATION_ID = 0x494D4752

#: Rows written per transaction: small enough that an interrupted run keeps
#: most of its work, large enough that commits cost nothing next to the model.
DEFAULT_COMMIT_EVERY = 256

#: Also commit when this many seconds passed since the last commit (slow models).
DEFAULT_COMMIT_SECONDS = 30.0

#: How long a writer waits for another process's write transaction.
DEFAULT_BUSY_TIMEOUT = 30.0

#: Rows per lookup query (well under SQLite's limit on bound parameters).
LOOKUP_CHUNK = 256

_SQLITE_MAGIC = b"SQLite format 3\x00"

# A prompt's text features under one text tower (schema version 3). ``text`` is
# the exact string fed to the tower (after the zero-shot antonym templates or an
# adapter's prompt format), ``fingerprint`` the tower's identity
# (imgrank.models.clip.towers.text_features_fingerprint, or an ONNX export's text
# graph). Tokens are every context position after ln_final, stored only when an
# adapter asked for them (77 x 512 float32 is 158 KB, a zero-shot sort needs none).
_PROMPTS_TABLE = """
    CREATE TABLE IF NOT EXISTS prompts (
        fingerprint TEXT NOT NULL,
        text TEXT NOT NULL,
        pooled BLOB NOT NULL,
        logit_scale REAL NOT NULL,
        tokens BLOB,
        token_count INTEGER,
        token_dim INTEGER,
        created_at REAL NOT NULL,
        PRIMARY KEY (fingerprint, text)
    )
    """

_U64 = (1 << 64) - 1

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS schema_version (
        version INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS models (
        id INTEGER PRIMARY KEY,
        fingerprint TEXT NOT NULL UNIQUE,
        description TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_used_at REAL NOT NULL
    )
    """,
    # One row per (model, file). The path is stored as the file system's bytes
    # (os.fsencode) so names that are not valid UTF-8 are cached like any other.
    """
    CREATE TABLE IF NOT EXISTS entries (
        id INTEGER PRIMARY KEY,
        model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
        path BLOB NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        pooled BLOB NOT NULL,
        tokens BLOB,
        token_count INTEGER,
        token_dim INTEGER,
        tokens_dtype TEXT,
        created_at REAL NOT NULL,
        UNIQUE (model_id, path)
    )
    """,
    # What culling needs besides features (imgrank.images.facts): the perceptual hash and
    # the capture time, one row per file version whatever the model. Added within schema
    # version 2 without bumping it: CREATE IF NOT EXISTS adds it to an existing cache and
    # an older imgrank ignores it.
    """
    CREATE TABLE IF NOT EXISTS photo_facts (
        path BLOB PRIMARY KEY,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        version TEXT NOT NULL,
        phash INTEGER NOT NULL,
        captured_local REAL,
        offset_minutes INTEGER,
        created_at REAL NOT NULL
    )
    """,
    _PROMPTS_TABLE,
    # Scores of scorers whose forward is the cost of a re-sort (ranking adapters): one row
    # per (scorer, file version). ``scorer`` is the scorer's fingerprint, which covers the
    # image features (model row), the adapter's files and the exact prompt
    # (imgrank.models.ranking_model); the file's size, mtime and inode are checked as for
    # entries. Added within schema version 3, as photo_facts was within 2: an imgrank
    # that does not know it ignores it.
    """
    CREATE TABLE IF NOT EXISTS scores (
        scorer TEXT NOT NULL,
        path BLOB NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        score REAL NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (scorer, path)
    )
    """,
)


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    # Version 1 entries carry no inode, so none of them can be trusted not to be
    # the features of a file that swapped names with this one: drop them (they
    # are re-created by the next sort) and keep the models.
    conn.execute("ALTER TABLE entries ADD COLUMN inode INTEGER NOT NULL DEFAULT -1")
    conn.execute("DELETE FROM entries")


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    # Additive: a new table. Image entries do not depend on it, so all are kept.
    conn.execute(_PROMPTS_TABLE)


#: ``{version: step}``: the step upgrades a file of that version to the next one,
#: inside the write transaction that opens the cache.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _migrate_1_to_2,
    2: _migrate_2_to_3,
}


@dataclass(frozen=True)
class FileKey:
    """What identifies one version of one file: absolute path, size, mtime, inode."""

    path: str
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path | str) -> FileKey:
        """Stat a file (following symbolic links).

        Raises:
            OSError: the file cannot be stat'ed (gone, no permission).
        """
        absolute = os.path.abspath(os.fspath(path))
        info = os.stat(absolute)
        return cls(absolute, int(info.st_size), int(info.st_mtime_ns), int(info.st_ino))

    def describes(self, info: os.stat_result) -> bool:
        """Whether ``info`` (a fresh stat of :attr:`path`) is still this version of this file."""
        return (info.st_size, info.st_mtime_ns, info.st_ino) == (
            self.size,
            self.mtime_ns,
            self.inode,
        )

    @property
    def blob(self) -> bytes:
        return os.fsencode(self.path)


@dataclass
class CachedFeatures:
    """Features read back from the cache, as float32 arrays."""

    pooled: np.ndarray
    tokens: np.ndarray | None = None


@dataclass
class PromptFeatures:
    """One text's features from a text tower, as the prompt cache stores them.

    Attributes:
        pooled: (E,) pooled, projected embedding, float32 (zero-shot scoring).
        logit_scale: CLIP's temperature ``exp(logit_scale)``, capped at 100.
        tokens: (L, D) every context position after ``ln_final``, float32
            (adapters), or None when they were not asked for.
    """

    pooled: np.ndarray
    logit_scale: float
    tokens: np.ndarray | None = None


@dataclass(frozen=True)
class ModelSummary:
    """One model's share of the cache, for ``imgrank cache info``."""

    fingerprint: str
    description: str
    entries: int
    payload_bytes: int
    last_used_at: float

    @property
    def bytes_per_entry(self) -> float:
        return self.payload_bytes / self.entries if self.entries else 0.0


@dataclass(frozen=True)
class CacheSummary:
    """What ``imgrank cache info`` shows."""

    path: Path
    disk_bytes: int
    entries: int
    schema_version: int
    models: list[ModelSummary] = field(default_factory=list)
    #: Texts whose text features are cached (all text towers together).
    prompts: int = 0


@dataclass(frozen=True)
class PruneResult:
    """What ``imgrank cache prune`` removed."""

    missing: int
    changed: int
    kept: int
    models_removed: int


def disk_usage(path: Path) -> int:
    """Bytes on disk of the database and its WAL and shared-memory side files."""
    total = 0
    for candidate in _side_files(path):
        try:
            total += candidate.stat().st_size
        except OSError:
            continue
    return total


def _side_files(path: Path) -> list[Path]:
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm")]


def _unique_aside_name(path: Path, label: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}.{label}-{stamp}")
    counter = 2
    while any(p.exists() or p.is_symlink() for p in _side_files(candidate)):
        candidate = path.with_name(f"{path.name}.{label}-{stamp}-{counter}")
        counter += 1
    return candidate


def _classify(path: Path) -> tuple[str, int | None]:
    """Tell what the file at ``path`` is, without changing it.

    Returns:
        ``("new", None)`` for a missing or empty file, ``("ours", version)`` for
        an imgrank cache, or ``("invalid", None)``/``("foreign", None)``/
        ``("old", version)`` with the reason encoded in the first item.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return "new", None
    except OSError as exc:
        raise CacheError(
            f"cannot read the embedding cache {path}: {exc.strerror or exc}. "
            "Fix its permissions, pick another file with --cache, or use --no-cache."
        ) from None
    if not head:
        return "new", None
    if head != _SQLITE_MAGIC:
        return "invalid", None
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return "invalid", None
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if app_id != APPLICATION_ID:
            return ("new", None) if not tables else ("foreign", None)
        if "schema_version" not in tables:
            return "foreign", None
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        version = int(row[0]) if row and row[0] is not None else 0
        if version < SCHEMA_VERSION and not _can_migrate(version):
            return "old", version
        return "ours", version
    except sqlite3.DatabaseError:
        return "invalid", None
    finally:
        conn.close()


def _marked_as_ours(path: Path) -> bool:
    """Whether the file's SQLite header carries imgrank's ``application_id``.

    The header (first 100 bytes) survives damage further in the file, so a
    truncated or corrupted imgrank cache is still recognised as one.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(100)
    except OSError:
        return False
    return (
        len(head) == 100
        and head.startswith(_SQLITE_MAGIC)
        and int.from_bytes(head[68:72], "big") == APPLICATION_ID
    )


def _is_default_location(path: Path) -> bool:
    from imgrank.paths import default_cache_db

    return path == default_cache_db().expanduser().absolute()


_IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif"}
)


def _refuse_to_displace(path: Path, kind: str) -> None:
    """Moving aside is for imgrank's own files: never a photo, never another program's file.

    Raises:
        UnsafeOperationError: the file may belong to the user.
    """
    from imgrank.images.decode import supported_extensions

    if path.suffix.lower() in _IMAGE_SUFFIXES | supported_extensions():
        raise UnsafeOperationError(
            f"--cache {path} is an image file, not an imgrank embedding cache; it was left "
            "untouched. Name a file such as embeddings.sqlite3, or use --no-cache."
        )
    if _is_default_location(path) or _marked_as_ours(path):
        return
    raise UnsafeOperationError(
        f"--cache {path} is not an imgrank embedding cache ({_REASONS[kind]}); it was left "
        "untouched. Name a new file or an existing imgrank cache, or use --no-cache."
    )


_REASONS = {
    "invalid": "it is not a valid SQLite database (damaged or not a cache at all)",
    "foreign": "it is a database written by another program",
    "old": "it was written by an older imgrank with another layout",
}


class EmbeddingCache:
    """An open embedding cache. Use :func:`open_cache` or :meth:`EmbeddingCache.open`.

    Not thread-safe: one cache object per thread (the pipeline reads and writes
    it from the main thread only).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        commit_every: int = DEFAULT_COMMIT_EVERY,
        commit_seconds: float = DEFAULT_COMMIT_SECONDS,
        on_warning: Callable[[str], None] | None = None,
    ) -> None:
        self._conn = conn
        self.path = path
        self.commit_every = max(1, commit_every)
        self.commit_seconds = commit_seconds
        self._warn = on_warning or _default_warning
        self._pending: list[tuple[object, ...]] = []
        #: handle returned by model_id() -> (fingerprint, description). Reads and
        #: writes go by fingerprint, never by a stored row id: ``cache prune`` in
        #: another process may delete a model row while this run uses it, and
        #: SQLite may then hand the same id to another model.
        self._models: dict[int, tuple[str, str]] = {}
        self._pending_facts: list[tuple[object, ...]] = []
        self._last_commit = time.monotonic()
        self._write_failures = 0
        self._closed = False
        #: Set when SQLite reported the file corrupt during this run. A cache opened
        #: by :meth:`open` (a sort) is then moved aside when it is closed, so the
        #: next run starts a new one instead of warning about it every time.
        self.damaged = False
        self._move_aside_when_damaged = False

    # ----------------------------------------------------------------- opening

    @classmethod
    def open(
        cls,
        path: Path | str,
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        commit_every: int = DEFAULT_COMMIT_EVERY,
        commit_seconds: float = DEFAULT_COMMIT_SECONDS,
        on_warning: Callable[[str], None] | None = None,
    ) -> EmbeddingCache:
        """Open (or create) the cache at ``path``.

        A file that is not a usable imgrank cache is moved aside (renamed to
        ``<name>.broken-<time>``, ``.foreign-...`` or ``.old-...``) and a new
        cache is created in its place; ``on_warning`` is told where it went.
        That happens only where it cannot displace a user's file: at the
        default cache location, or for a file whose header marks it as an
        imgrank cache (an older or damaged one); never for a file with an
        image extension.

        Raises:
            CacheError: the folder cannot be written, or the file comes from a
                newer imgrank (left untouched).
            UnsafeOperationError: ``path`` (named by the user) holds something
                that is not an imgrank cache; it is left untouched.
        """
        path = Path(path).expanduser().absolute()
        warn = on_warning or _default_warning
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"cannot create the folder of the embedding cache {path}: "
                f"{exc.strerror or exc}. Pick another file with --cache, or use --no-cache."
            ) from None
        if path.is_dir():
            raise CacheError(
                f"--cache {path} is a folder; give a file name such as "
                f"{path / 'embeddings.sqlite3'}"
            )

        kind, version = _classify(path)
        if kind == "ours" and version is not None and version > SCHEMA_VERSION:
            raise CacheError(
                f"the embedding cache {path} was written by a newer imgrank (schema version "
                f"{version}, this one reads {SCHEMA_VERSION}). Upgrade imgrank, pick another file "
                "with --cache, or use --no-cache."
            )
        if kind in _REASONS:
            _refuse_to_displace(path, kind)
            aside = _move_aside(
                path, "old" if kind == "old" else ("foreign" if kind == "foreign" else "broken")
            )
            warn(
                f"the embedding cache {path} could not be used: {_REASONS[kind]}. It was moved "
                f"to {aside} (not deleted) and a new cache was started; the old file only held "
                "re-creatable features, delete it when you like."
            )

        try:
            conn = _connect(path, busy_timeout)
        except sqlite3.DatabaseError as exc:  # e.g. a new file in a read-only folder
            raise CacheError(
                f"cannot open the embedding cache {path}: {exc}. Pick another file with "
                "--cache, or use --no-cache."
            ) from None
        try:
            _initialise(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise CacheError(
                f"cannot initialise the embedding cache {path}: {exc}. Pick another file with "
                "--cache, or use --no-cache."
            ) from None
        cache = cls(
            conn,
            path,
            commit_every=commit_every,
            commit_seconds=commit_seconds,
            on_warning=on_warning,
        )
        cache._move_aside_when_damaged = True
        return cache

    def __enter__(self) -> EmbeddingCache:
        return self

    def warn(self, message: str) -> None:
        """Tell the user something through the cache's warning hook (``on_warning``)."""
        self._warn(message)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Write what is buffered and close the database (safe to call twice)."""
        if self._closed:
            return
        try:
            self.flush()
        except CacheError:
            if not self.damaged:
                raise
        finally:
            self._closed = True
            self._conn.close()
            if self.damaged and self._move_aside_when_damaged:
                self._set_aside_damaged_file()

    def _note_damage(self, exc: sqlite3.DatabaseError) -> None:
        if _is_damage(exc):
            self.damaged = True

    def _set_aside_damaged_file(self) -> None:
        try:
            aside = _move_aside(self.path, "broken")
        except CacheError as exc:
            self._warn(str(exc))
            return
        self._warn(
            f"the embedding cache {self.path} is damaged; it was moved to {aside} (not "
            "deleted) and the next run starts a new cache. It only held re-creatable "
            "features: delete it when you like."
        )

    # ------------------------------------------------------------------ models

    def model_id(self, fingerprint: str, description: str) -> int:
        """A handle for a model (marking it used now, when it is in the cache).

        The handle is the model's row id at this moment; :meth:`get_many` and
        :meth:`put` resolve it by fingerprint each time, so they stay right if
        the row is deleted (``cache prune``) and re-created meanwhile. A model
        not in the cache yet is not written here but with its first entries
        (:meth:`flush`), under a stand-in handle below zero until then: a run
        that caches nothing (it failed, or was stopped) leaves no empty model row.
        """
        with self._write():
            row = self._conn.execute(
                "SELECT id FROM models WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
            if row is not None:
                self._conn.execute(
                    "UPDATE models SET last_used_at = ?, description = ? WHERE id = ?",
                    (time.time(), description, int(row[0])),
                )
        model = int(row[0]) if row is not None else -1 - len(self._models)
        self._models[model] = (fingerprint, description)
        return model

    def _register(self, fingerprint: str, description: str) -> int:
        """The model's current row id, (re-)creating the row; inside a write transaction."""
        now = time.time()
        self._conn.execute(
            "INSERT OR IGNORE INTO models (fingerprint, description, created_at, last_used_at)"
            " VALUES (?, ?, ?, ?)",
            (fingerprint, description, now, now),
        )
        self._conn.execute(
            "UPDATE models SET last_used_at = ?, description = ? WHERE fingerprint = ?",
            (now, description, fingerprint),
        )
        row = self._conn.execute(
            "SELECT id FROM models WHERE fingerprint = ?", (fingerprint,)
        ).fetchone()
        return int(row[0])

    def _fingerprint(self, model_id: int) -> str:
        try:
            return self._models[model_id][0]
        except KeyError:
            raise ValueError(f"unknown model handle {model_id}; use model_id() first") from None

    # ------------------------------------------------------------ read & write

    def get_many(
        self, model_id: int, keys: list[FileKey], *, tokens: bool = False
    ) -> dict[str, CachedFeatures]:
        """Cached features of the files in ``keys`` that are present and unchanged.

        Args:
            model_id: from :meth:`model_id`.
            keys: the files, as stat'ed now.
            tokens: the caller needs visual tokens; an entry stored without them is a miss.

        Returns:
            ``{absolute path: features}`` for the hits only.
        """
        wanted = {key.blob: key for key in keys}
        found: dict[str, CachedFeatures] = {}
        fingerprint = self._fingerprint(model_id)
        columns = "e.path, e.size, e.mtime_ns, e.inode, e.pooled" + (
            ", e.tokens, e.token_count, e.token_dim, e.tokens_dtype" if tokens else ""
        )
        blobs = list(wanted)
        for start in range(0, len(blobs), LOOKUP_CHUNK):
            chunk = blobs[start : start + LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            try:
                # One statement, one snapshot: the model row and its entries agree.
                rows = self._conn.execute(
                    f"SELECT {columns} FROM entries e JOIN models m ON m.id = e.model_id"
                    f" WHERE m.fingerprint = ? AND e.path IN ({marks})",
                    (fingerprint, *chunk),
                ).fetchall()
            except sqlite3.DatabaseError as exc:
                self._note_damage(exc)
                raise CacheError(f"cannot read the embedding cache {self.path}: {exc}") from None
            for row in rows:
                key = wanted.get(bytes(row[0]))
                if key is None or (row[1], row[2], row[3]) != (key.size, key.mtime_ns, key.inode):
                    continue  # the file changed, or another file took its name
                pooled = np.frombuffer(row[4], dtype=np.float32)
                features = CachedFeatures(pooled=pooled)
                if tokens:
                    if row[5] is None:
                        continue
                    dtype = np.float16 if row[8] == "float16" else np.float32
                    grid = np.frombuffer(row[5], dtype=dtype).reshape(int(row[6]), int(row[7]))
                    features.tokens = grid.astype(np.float32)
                found[key.path] = features
        return found

    def put(
        self,
        model_id: int,
        key: FileKey,
        pooled: np.ndarray,
        tokens: np.ndarray | None = None,
    ) -> None:
        """Queue one image's features; written with the next commit.

        Args:
            model_id: from :meth:`model_id`.
            key: the file as it was stat'ed BEFORE it was decoded (so a file
                changed while it was read is re-embedded next time).
            pooled: (E,) embedding; stored as float32.
            tokens: (P, D) visual tokens or None; stored as float16 unless a
                value would overflow it.
        """
        self._fingerprint(model_id)  # an unknown handle fails here, not at the commit
        pooled_blob = np.ascontiguousarray(pooled, dtype=np.float32).tobytes()
        tokens_blob: bytes | None = None
        count = dim = None
        dtype_name = None
        if tokens is not None:
            grid = np.asarray(tokens)
            count, dim = int(grid.shape[0]), int(grid.shape[1])
            half = grid.astype(np.float16)
            if np.isfinite(half).all() or not np.isfinite(grid).all():
                tokens_blob, dtype_name = half.tobytes(), "float16"
            else:  # values beyond float16's range: keep them exact rather than infinite
                tokens_blob = np.ascontiguousarray(grid, dtype=np.float32).tobytes()
                dtype_name = "float32"
        self._pending.append(
            (
                model_id,
                key.blob,
                key.size,
                key.mtime_ns,
                key.inode,
                pooled_blob,
                tokens_blob,
                count,
                dim,
                dtype_name,
                time.time(),
            )
        )
        if (
            len(self._pending) >= self.commit_every
            or time.monotonic() - self._last_commit >= self.commit_seconds
        ):
            self.flush()

    def get_prompt(self, fingerprint: str, text: str) -> PromptFeatures | None:
        """The features stored for ``text`` under a text tower's fingerprint, if any.

        Raises:
            CacheError: the table cannot be read (damaged, or locked too long).
        """
        try:
            row = self._conn.execute(
                "SELECT pooled, logit_scale, tokens, token_count, token_dim FROM prompts"
                " WHERE fingerprint = ? AND text = ?",
                (fingerprint, text),
            ).fetchone()
        except sqlite3.DatabaseError as exc:
            self._note_damage(exc)
            raise CacheError(f"cannot read the prompt cache in {self.path}: {exc}") from None
        if row is None:
            return None
        try:
            pooled = np.frombuffer(row[0], dtype=np.float32).copy()
            tokens = None
            if row[2] is not None:
                tokens = np.frombuffer(row[2], dtype=np.float32).reshape(int(row[3]), int(row[4]))
            return PromptFeatures(pooled, float(row[1]), None if tokens is None else tokens.copy())
        except (TypeError, ValueError) as exc:  # a row of the wrong shape: damaged, not ours
            raise CacheError(f"a prompt entry in {self.path} is malformed: {exc}") from None

    def put_prompt(self, fingerprint: str, text: str, features: PromptFeatures) -> None:
        """Store one text's features now, in one short transaction (float32: exact).

        Not buffered like image entries: a run stores one or two texts, and a
        later run must find them even if this one is killed mid-sort.

        Raises:
            CacheError: the table cannot be written (damaged, full disk, locked too long).
        """
        tokens = None
        if features.tokens is not None:
            tokens = np.ascontiguousarray(features.tokens, dtype=np.float32)
            if tokens.ndim != 2:
                raise ValueError(f"prompt tokens must be (L, D), not {tokens.shape}")
        row = (
            fingerprint,
            text,
            np.ascontiguousarray(features.pooled, dtype=np.float32).reshape(-1).tobytes(),
            float(features.logit_scale),
            None if tokens is None else tokens.tobytes(),
            None if tokens is None else int(tokens.shape[0]),
            None if tokens is None else int(tokens.shape[1]),
            time.time(),
        )
        try:
            with self._write():
                self._conn.execute(
                    "INSERT OR REPLACE INTO prompts (fingerprint, text, pooled, logit_scale,"
                    " tokens, token_count, token_dim, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
        except sqlite3.DatabaseError as exc:
            self._note_damage(exc)
            raise CacheError(f"cannot write the prompt cache in {self.path}: {exc}") from None

    def get_scores(self, scorer: str, keys: list[FileKey]) -> dict[str, float]:
        """Stored scores of ``scorer`` for the files in ``keys`` that are unchanged.

        Returns:
            ``{absolute path: score}`` for the hits only.

        Raises:
            CacheError: the table cannot be read.
        """
        if not self._has_table("scores"):
            return {}  # a cache opened for upkeep that predates the table
        return {
            key.path: float(score)
            for key, (score,) in self._unchanged_rows(
                "SELECT path, size, mtime_ns, inode, score FROM scores"
                " WHERE scorer = ? AND path IN ({marks})",
                (scorer,),
                keys,
            )
        }

    def put_scores(self, scorer: str, scored: list[tuple[FileKey, float]]) -> None:
        """Store scores of ``scorer`` now, in one transaction per chunk of rows.

        Raises:
            CacheError: the table cannot be written (damaged, full disk, locked too long).
        """
        now = time.time()
        rows = [
            (scorer, key.blob, key.size, key.mtime_ns, key.inode, float(score), now)
            for key, score in scored
        ]
        try:
            for start in range(0, len(rows), 4096):
                with self._write():
                    self._conn.executemany(
                        "INSERT OR REPLACE INTO scores"
                        " (scorer, path, size, mtime_ns, inode, score, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        rows[start : start + 4096],
                    )
        except sqlite3.DatabaseError as exc:
            self._note_damage(exc)
            raise CacheError(f"cannot write the score cache in {self.path}: {exc}") from None

    def get_facts_many(self, keys: list[FileKey]) -> dict[str, PhotoFacts]:
        """Stored hashes and capture times of the files in ``keys`` that are unchanged.

        Returns:
            ``{absolute path: facts}`` for the hits only.
        """
        found: dict[str, PhotoFacts] = {}
        for key, (phash, local, offset) in self._unchanged_rows(
            "SELECT path, size, mtime_ns, inode, phash, captured_local, offset_minutes"
            " FROM photo_facts WHERE version = ? AND path IN ({marks})",
            (FACTS_VERSION,),
            keys,
        ):
            captured = None if local is None else CaptureTime(float(local), offset)
            found[key.path] = PhotoFacts(int(phash) & _U64, captured)
        return found

    def _unchanged_rows(
        self, select: str, params: tuple[object, ...], keys: list[FileKey]
    ) -> Iterator[tuple[FileKey, list[object]]]:
        """Rows of a table keyed by file whose file is unchanged: ``(key, other columns)``.

        ``select`` reads ``path, size, mtime_ns, inode`` first and ends with
        ``path IN ({marks})``; ``params`` are bound before the paths.

        Raises:
            CacheError: the table cannot be read.
        """
        wanted = {key.blob: key for key in keys}
        blobs = list(wanted)
        for start in range(0, len(blobs), LOOKUP_CHUNK):
            chunk = blobs[start : start + LOOKUP_CHUNK]
            try:
                rows = self._conn.execute(
                    select.format(marks=",".join("?" * len(chunk))), (*params, *chunk)
                ).fetchall()
            except sqlite3.DatabaseError as exc:
                self._note_damage(exc)
                raise CacheError(f"cannot read the embedding cache {self.path}: {exc}") from None
            for blob, size, mtime_ns, inode, *rest in rows:
                key = wanted.get(bytes(blob))
                if key is None or (size, mtime_ns, inode) != (key.size, key.mtime_ns, key.inode):
                    continue  # changed, or another file took the name
                yield key, rest

    def put_facts(self, key: FileKey, facts: PhotoFacts) -> None:
        """Queue one file's hash and capture time; written with the next commit."""
        captured = facts.captured
        self._pending_facts.append(
            (
                key.blob,
                key.size,
                key.mtime_ns,
                key.inode,
                FACTS_VERSION,
                # SQLite integers are signed 64-bit: store the hash's bits as one.
                facts.phash - (1 << 64) if facts.phash >= 1 << 63 else facts.phash,
                None if captured is None else captured.local,
                None if captured is None else captured.offset_minutes,
                time.time(),
            )
        )
        if len(self._pending_facts) >= self.commit_every:
            self.flush()

    def flush(self) -> int:
        """Write the queued entries in one transaction; returns how many were written.

        When the database stays locked by another process beyond the busy
        timeout, the entries are dropped with a warning (they are computed again
        next time) instead of failing the run.

        Raises:
            CacheError: the database file is damaged.
        """
        self._last_commit = time.monotonic()
        if not self._pending and not self._pending_facts:
            return 0
        rows, self._pending = self._pending, []
        facts, self._pending_facts = self._pending_facts, []
        try:
            with self._write():
                # Row ids are looked up in the transaction that writes the entries: a
                # model row another process pruned meanwhile is re-created, never lost.
                current = {
                    handle: self._register(*self._models[handle])
                    for handle in {int(row[0]) for row in rows}  # type: ignore[call-overload]
                }
                rows = [(current[int(row[0])], *row[1:]) for row in rows]  # type: ignore[call-overload]
                self._conn.executemany(
                    "INSERT OR REPLACE INTO entries"
                    " (model_id, path, size, mtime_ns, inode, pooled, tokens,"
                    " token_count, token_dim, tokens_dtype, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                if facts:  # (a cache opened for upkeep may predate the table)
                    self._conn.executemany(
                        "INSERT OR REPLACE INTO photo_facts"
                        " (path, size, mtime_ns, inode, version, phash, captured_local,"
                        " offset_minutes, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        facts,
                    )
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise CacheError(f"cannot write the embedding cache {self.path}: {exc}") from None
            self._write_failures += 1
            if self._write_failures == 1:
                self._warn(
                    f"the embedding cache {self.path} stayed locked by another process; "
                    f"{len(rows)} image(s) were not cached and will be embedded again next time"
                )
            return 0
        except sqlite3.DatabaseError as exc:
            self._note_damage(exc)
            raise CacheError(
                f"cannot write the embedding cache {self.path}: {exc}. "
                "`imgrank cache clear` or --no-cache works around it."
            ) from None
        return len(rows)

    # --------------------------------------------------------------- upkeep

    def summary(self) -> CacheSummary:
        """Entries, size on disk and models (for ``imgrank cache info``)."""
        with self._damage_as_error():
            return self._summary()

    def _summary(self) -> CacheSummary:
        self.flush()
        models = [
            ModelSummary(
                fingerprint=row[0],
                description=row[1],
                entries=int(row[2]),
                payload_bytes=int(row[3] or 0),
                last_used_at=float(row[4]),
            )
            for row in self._conn.execute(
                "SELECT m.fingerprint, m.description, COUNT(e.id),"
                " SUM(LENGTH(e.pooled) + COALESCE(LENGTH(e.tokens), 0)), m.last_used_at"
                " FROM models m LEFT JOIN entries e ON e.model_id = m.id"
                " GROUP BY m.id ORDER BY m.last_used_at DESC"
            )
        ]
        version = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        prompts = 0
        if self._has_table("prompts"):
            prompts = int(self._conn.execute("SELECT COUNT(*) FROM prompts").fetchone()[0])
        return CacheSummary(
            path=self.path,
            disk_bytes=disk_usage(self.path),
            entries=sum(m.entries for m in models),
            schema_version=int(version or 0),
            models=models,
            prompts=prompts,
        )

    def prune(self, *, on_progress: Callable[[int], None] | None = None) -> PruneResult:
        """Drop the entries of files that no longer exist or changed (see :meth:`_prune`).

        Raises:
            CacheError: the file is damaged.
        """
        with self._damage_as_error():
            return self._prune(on_progress=on_progress)

    def _prune(self, *, on_progress: Callable[[int], None] | None = None) -> PruneResult:
        """Drop the entries of files that no longer exist or changed since they were cached.

        Only "not found" counts as gone: files on a disk that is not mounted
        right now look gone too, so mount it first. Any other error (no
        permission) keeps the entry.
        """
        self.flush()
        missing = changed = kept = 0
        last_id = 0
        while True:
            rows = self._conn.execute(
                "SELECT id, path, size, mtime_ns, inode FROM entries"
                " WHERE id > ? ORDER BY id LIMIT 512",
                (last_id,),
            ).fetchall()
            if not rows:
                break
            last_id = int(rows[-1][0])
            doomed: list[tuple[int]] = []
            for entry_id, blob, size, mtime_ns, inode in rows:
                try:
                    info = os.stat(os.fsdecode(bytes(blob)))
                except FileNotFoundError:
                    missing += 1
                    doomed.append((int(entry_id),))
                    continue
                except OSError:
                    kept += 1
                    continue
                if (info.st_size, info.st_mtime_ns, info.st_ino) != (size, mtime_ns, inode):
                    changed += 1
                    doomed.append((int(entry_id),))
                else:
                    kept += 1
            if doomed:
                with self._write():
                    self._conn.executemany("DELETE FROM entries WHERE id = ?", doomed)
            if on_progress is not None:
                on_progress(len(rows))
        self._prune_facts()
        self._prune_scores()
        with self._write():
            models_removed = self._conn.execute(
                "DELETE FROM models WHERE id NOT IN (SELECT DISTINCT model_id FROM entries)"
            ).rowcount
        self._reclaim()
        return PruneResult(
            missing=missing, changed=changed, kept=kept, models_removed=models_removed
        )

    def _prune_facts(self) -> None:
        """Drop the stored hashes and times of files gone or changed (as :meth:`prune`)."""
        if self._has_facts_table():  # (absent from a cache written before photo facts)
            self._prune_changed_files("photo_facts", ("path",))

    def _prune_scores(self) -> None:
        """Drop the stored adapter scores of files gone or changed (as :meth:`prune`)."""
        if self._has_table("scores"):
            self._prune_changed_files("scores", ("scorer", "path"))

    def _prune_changed_files(self, table: str, primary_key: tuple[str, ...]) -> None:
        """Drop the rows of ``table`` whose file is gone or changed; ``primary_key`` ends
        with ``path``. Only "not found" counts as gone (as for entries)."""
        columns = ", ".join(primary_key)
        marks = ", ".join("?" * len(primary_key))
        last: tuple[object, ...] = (*([""] * (len(primary_key) - 1)), b"")
        while True:
            rows = self._conn.execute(
                f"SELECT {columns}, size, mtime_ns, inode FROM {table}"
                f" WHERE ({columns}) > ({marks}) ORDER BY {columns} LIMIT 512",
                last,
            ).fetchall()
            if not rows:
                return
            width = len(primary_key)
            last = tuple(rows[-1][:width])
            doomed: list[tuple[object, ...]] = []
            for row in rows:
                size, mtime_ns, inode = row[width:]
                try:
                    info = os.stat(os.fsdecode(bytes(row[width - 1])))
                except FileNotFoundError:
                    doomed.append(tuple(row[:width]))
                    continue
                except OSError:
                    continue
                if (info.st_size, info.st_mtime_ns, info.st_ino) != (size, mtime_ns, inode):
                    doomed.append(tuple(row[:width]))
            if doomed:
                where = " AND ".join(f"{name} = ?" for name in primary_key)
                with self._write():
                    self._conn.executemany(f"DELETE FROM {table} WHERE {where}", doomed)

    def clear(self) -> int:
        """Remove every entry and model; returns the number of entries removed."""
        with self._damage_as_error():
            return self._clear()

    def _clear(self) -> int:
        self.flush()
        with self._write():
            removed = self._conn.execute("DELETE FROM entries").rowcount
            self._conn.execute("DELETE FROM models")
            if self._has_facts_table():
                self._conn.execute("DELETE FROM photo_facts")
            if self._has_table("prompts"):
                self._conn.execute("DELETE FROM prompts")
            if self._has_table("scores"):
                self._conn.execute("DELETE FROM scores")
        self._reclaim()
        return int(removed)

    def _has_facts_table(self) -> bool:
        return self._has_table("photo_facts")

    def _has_table(self, name: str) -> bool:
        return (
            self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
            ).fetchone()
            is not None
        )

    def integrity_check(self) -> list[str]:
        """SQLite's full integrity check: ``["ok"]`` when the file is sound."""
        try:
            return [str(row[0]) for row in self._conn.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as exc:
            return [str(exc)]

    @contextlib.contextmanager
    def _damage_as_error(self) -> Iterator[None]:
        """SQLite errors of the upkeep commands as one message that says what to do."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if _is_damage(exc):
                raise CacheError(
                    f"the embedding cache {self.path} is damaged ({exc}). It only holds "
                    "re-creatable features: the next `imgrank sort` with it moves it aside and "
                    "starts a new one, or delete it yourself."
                ) from None
            raise CacheError(f"cannot use the embedding cache {self.path}: {exc}") from None

    # ------------------------------------------------------------- internals

    def _write(self) -> _WriteTransaction:
        return _WriteTransaction(self._conn)

    def _reclaim(self) -> None:
        """Give freed pages back to the file system (the file uses incremental vacuum)."""
        try:
            # The pragma frees one page per step of its statement, and execute() steps a
            # statement without result columns once: a prune that emptied megabytes gave
            # back 4 KB. executescript() steps each statement to its end.
            self._conn.executescript("PRAGMA incremental_vacuum;")
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError:
            pass  # another process is busy with the file; the space is reused later anyway


class _WriteTransaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any error.

    IMMEDIATE takes the write lock up front, so a second writer waits (busy
    timeout) at BEGIN instead of failing later with a deadlock.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        elif self._conn.in_transaction:
            self._conn.execute("ROLLBACK")


def _default_warning(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """Whether SQLite says the file itself is corrupt (not locked, not full)."""
    name = getattr(exc, "sqlite_errorname", "")
    if name:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    text = str(exc).lower()
    # "Could not decode to UTF-8 column ...": Python's sqlite3 met text in a column imgrank
    # only ever fills with integers or blobs; only damaged pages read that way.
    return "malformed" in text or "not a database" in text or "could not decode" in text


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; every write says BEGIN IMMEDIATE itself.
    conn = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    return conn


def _initialise(conn: sqlite3.Connection) -> None:
    """Create the tables (once, under the write lock) and set the connection's pragmas."""
    # auto_vacuum must be chosen before the first table exists; on an existing
    # file this is a no-op.
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    _retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
    # The cache is re-creatable: NORMAL keeps the file consistent after a crash
    # and only risks the last transactions on power loss.
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    with _WriteTransaction(conn):
        _upgrade(conn)
        for statement in _SCHEMA:
            conn.execute(statement)
        if conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")


def _can_migrate(version: int) -> bool:
    return all(step in MIGRATIONS for step in range(version, SCHEMA_VERSION))


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring an older cache up to ``SCHEMA_VERSION``, inside the caller's write transaction.

    Two processes opening an old cache at once are serialised by the write
    lock; the second finds the current version and does nothing.
    """
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
    ).fetchone()
    if not has_table:
        return
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    version = int(row[0]) if row and row[0] is not None else SCHEMA_VERSION
    while version < SCHEMA_VERSION:
        MIGRATIONS[version](conn)
        version += 1
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))


def _retry_busy(action: Callable[[], object], attempts: int = 50) -> object:
    """Run ``action``, retrying briefly when SQLite answers busy without waiting.

    Switching to WAL needs an exclusive lock for a moment and SQLite does not
    always call the busy handler for it, so two processes creating the cache at
    the same instant could otherwise fail.
    """
    for attempt in range(attempts):
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    return None


def _move_aside(path: Path, label: str) -> Path:
    from imgrank.errors import UnsafeOperationError
    from imgrank.files.atomic import move_into_place

    aside = _unique_aside_name(path, label)
    try:
        for source, target in zip(_side_files(path), _side_files(aside), strict=True):
            if source.exists():
                move_into_place(source, target)  # never replaces (the name carries a stamp)
    except UnsafeOperationError as exc:
        raise CacheError(
            f"the embedding cache {path} is not usable and could not be moved aside ({exc}). "
            "Move or delete it yourself, pick another file with --cache, or use --no-cache."
        ) from None
    except OSError as exc:
        raise CacheError(
            f"the embedding cache {path} is not usable and could not be moved aside "
            f"({exc.strerror or exc}). Move or delete it yourself, pick another file with "
            "--cache, or use --no-cache."
        ) from None
    return aside


def open_cache(
    path: Path | str | None = None, *, on_warning: Callable[[str], None] | None = None
) -> EmbeddingCache:
    """Open the cache at ``path``, or the default one (``imgrank.paths.default_cache_db()``)."""
    if path is None:
        from imgrank.paths import default_cache_db

        path = default_cache_db()
    return EmbeddingCache.open(path, on_warning=on_warning)


def open_existing(path: Path | str) -> EmbeddingCache | None:
    """Open a cache for upkeep commands without creating or moving anything.

    Returns:
        None when there is no cache at ``path``.

    Raises:
        CacheError: the file exists but is not an imgrank cache this version can read.
    """
    path = Path(path).expanduser().absolute()
    kind, version = _classify(path)
    if kind == "new":
        return None
    if kind != "ours":
        raise CacheError(
            f"{path} is not an imgrank embedding cache this version can use: "
            f"{_REASONS.get(kind, 'unknown layout')}. The next `imgrank sort` with this cache "
            "moves it aside and starts a new one."
        )
    if version is not None and version > SCHEMA_VERSION:
        raise CacheError(
            f"the embedding cache {path} was written by a newer imgrank (schema version {version})"
        )
    conn = _connect(path, DEFAULT_BUSY_TIMEOUT)
    conn.execute("PRAGMA foreign_keys = ON")
    if version is not None and version < SCHEMA_VERSION:
        try:
            with _WriteTransaction(conn):
                _upgrade(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise CacheError(f"cannot upgrade the embedding cache {path}: {exc}") from None
    return EmbeddingCache(conn, path)
