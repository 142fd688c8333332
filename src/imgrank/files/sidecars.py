"""Writing XMP sidecars next to photos, journaled and undoable like renames.

The reusable entry points, for ``sort --xmp`` and any other command that marks
photos (culling, for one):

1. :func:`plan_sidecars` takes ``(photo, {field: value})`` pairs, reads each
   sidecar once and computes its new bytes (:mod:`imgrank.files.xmp`); nothing
   is written. Sidecars that cannot be edited safely are listed in
   ``plan.refused`` with the reason, and left alone.
2. :func:`apply_sidecar_plan` writes the plan as one run of the rename journal
   (:mod:`imgrank.files.journal`): the old and new contents are first stored,
   fsynced, in a content-addressed blob folder beside the journals, then the
   journal (every sidecar's path and the SHA-256 of its old and new content),
   and only then is each sidecar written: into a temporary file in the same
   folder, fsynced, and moved over the sidecar (or into a free name, for a new
   sidecar) after checking that the sidecar still holds what was read. A
   sidecar changed since is never overwritten; the run stops and puts back
   what it wrote.
3. ``imgrank undo`` (:func:`undo_sidecar_run`) gives every sidecar its earlier
   bytes back and removes the ones the run created, refusing (changing
   nothing) when one was changed since; ``imgrank recover``
   (:func:`settle_sidecars`) settles a run killed half-way by looking at what
   each sidecar holds now.

Every XMP operation runs on the calling thread: XMP toolkits are not generally
thread-safe, and a few kB per photo is not worth a pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imgrank.errors import UnsafeOperationError
from imgrank.files.atomic import fsync_folder, move_into_place, write_file
from imgrank.files.journal import (
    JournalError,
    JournalWriter,
    RunRecord,
    SidecarRecord,
    check_no_unfinished_run,
    new_run_id,
    temp_name,
)
from imgrank.files.xmp import MAX_PACKET_BYTES, Field, XmpError, read_fields, set_fields

#: ``file``: ``IMG_1.CR2.xmp`` (darktable, digiKam);
#: ``stem``: ``IMG_1.xmp`` (Lightroom, Capture One).
SidecarNaming = Literal["file", "stem"]
SIDECAR_NAMINGS: tuple[str, ...] = ("file", "stem")


class SidecarWriteError(UnsafeOperationError):
    """A sidecar run stopped on an error; what it wrote has been put back."""


def sidecar_for(photo: Path, naming: str = "file") -> Path:
    """The sidecar of ``photo``: an existing one (``.xmp`` or ``.XMP``), else ``.xmp``."""
    if naming not in SIDECAR_NAMINGS:
        raise ValueError(f"naming must be one of {SIDECAR_NAMINGS}, not {naming!r}")
    base = photo.name if naming == "file" else photo.stem
    for suffix in (".xmp", ".XMP"):
        candidate = photo.with_name(base + suffix)
        if os.path.lexists(candidate):
            return candidate
    return photo.with_name(base + ".xmp")


def _sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def blob_dir(journal_dir: Path | None = None) -> Path:
    """Where sidecar contents are kept, by SHA-256, for undo and recovery."""
    from imgrank.paths import journal_dir as default_journal_dir

    return (journal_dir or default_journal_dir()) / "blobs"


def _store_blob(directory: Path, data: bytes) -> str:
    """Keep ``data`` under its SHA-256 (once), fsynced; returns the hash."""
    digest = hashlib.sha256(data).hexdigest()
    target = directory / digest
    if target.exists() and _sha(target.read_bytes()) == digest:
        return digest
    directory.mkdir(parents=True, exist_ok=True)
    # imgrank's own store, where a name means its content: a damaged copy may be replaced.
    write_file(target, data, replace=True)
    return digest


def _load_blob(directory: Path, digest: str) -> bytes:
    try:
        data = (directory / digest).read_bytes()
    except OSError as exc:
        raise JournalError(
            f"the saved sidecar content {directory / digest} cannot be read: {exc.strerror or exc}"
        ) from None
    if _sha(data) != digest:
        raise JournalError(f"the saved sidecar content {directory / digest} is damaged")
    return data


def _read_sidecar(path: Path) -> bytes | None:
    """A sidecar's bytes, None when there is none.

    Raises:
        XmpError: it is a link, not a regular file, too large or unreadable.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise XmpError(f"cannot examine it: {exc.strerror or exc}") from None
    if stat.S_ISLNK(info.st_mode):
        raise XmpError("it is a symbolic link; imgrank does not write through links")
    if not stat.S_ISREG(info.st_mode):
        raise XmpError("it is not a regular file")
    if info.st_size > MAX_PACKET_BYTES:
        raise XmpError(f"{info.st_size:,} bytes is too large for an XMP sidecar")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise XmpError(f"cannot read it: {exc.strerror or exc}") from None


@dataclass
class SidecarChange:
    """One sidecar a plan writes.

    Attributes:
        path: Absolute path of the sidecar.
        photos: The photos it describes (two for a shared ``IMG_1.xmp``).
        old: Its bytes when planned (None: it does not exist yet).
        new: Its bytes after the write.
        before: Each field's value when planned (None: absent).
        after: Each field's new value.
    """

    path: Path
    photos: list[Path]
    old: bytes | None
    new: bytes
    before: dict[Field, str | None]
    after: dict[Field, str]


@dataclass
class SidecarPlan:
    """Every sidecar write of one run, computed and checked, nothing written yet."""

    run_id: str
    changes: list[SidecarChange] = field(default_factory=list)
    #: Sidecars that already hold every value (nothing to write).
    unchanged: list[Path] = field(default_factory=list)
    #: ``(sidecar, reason)`` for sidecars that cannot be edited safely; left alone.
    refused: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.changes


def plan_sidecars(
    writes: Iterable[tuple[Path, dict[str, str]]], *, naming: str = "file"
) -> SidecarPlan:
    """Plan setting XMP fields in the sidecars of some photos; nothing is written.

    Args:
        writes: ``(photo, {"xmp:Rating": "5", ...})`` pairs. Field names are
            ``prefix:Name`` with a prefix of :data:`imgrank.files.xmp.NAMESPACES`.
        naming: ``file`` (``IMG_1.CR2.xmp``) or ``stem`` (``IMG_1.xmp``).

    Raises:
        UsageError: an unknown field name.
        UnsafeOperationError: two photos that share a sidecar (``stem`` naming)
            would get different values in it. Nothing is written.
    """
    from imgrank.errors import UsageError

    wanted: dict[Path, tuple[list[Path], dict[Field, str]]] = {}
    for photo, fields in writes:
        try:
            values = {Field.parse(name): str(value) for name, value in fields.items()}
        except XmpError as exc:
            raise UsageError(str(exc)) from None
        photo = Path(os.path.abspath(photo))
        sidecar = sidecar_for(photo, naming)
        if sidecar in wanted:
            photos, earlier = wanted[sidecar]
            if earlier != values:
                raise UnsafeOperationError(
                    f"{photos[0].name} and {photo.name} share the sidecar {sidecar} but would get "
                    "different values in it; nothing was written. Use --xmp-sidecar file "
                    "(one sidecar per file), or rank the pair as one photo (--raw-pairs pair)."
                )
            photos.append(photo)
            continue
        wanted[sidecar] = ([photo], values)

    plan = SidecarPlan(run_id=new_run_id())
    for sidecar, (photos, values) in wanted.items():
        try:
            old = _read_sidecar(sidecar)
            before = read_fields(old, list(values))
            new = set_fields(old, values)
        except XmpError as exc:
            plan.refused.append((sidecar, str(exc)))
            continue
        if new == old:
            plan.unchanged.append(sidecar)
            continue
        plan.changes.append(SidecarChange(sidecar, photos, old, new, before, values))
    return plan


@dataclass
class SidecarResult:
    """What one sidecar run did: its id (for ``imgrank undo``), journal, and counts."""

    run_id: str | None
    journal: Path | None
    written: int
    created: int = 0


def apply_sidecar_plan(
    plan: SidecarPlan,
    *,
    folder: Path,
    prompt: str = "",
    journal_dir: Path | None = None,
) -> SidecarResult:
    """Write a plan's sidecars as one journaled run (see the module docstring).

    Raises:
        UnfinishedRunError: an earlier run was interrupted; ``imgrank recover`` first.
        JournalError: the journal or the saved contents cannot be written (nothing was).
        SidecarWriteError: a write failed or a sidecar changed since it was read;
            every sidecar already written has been given its earlier content back.
    """
    check_no_unfinished_run(journal_dir)
    if plan.is_empty:
        return SidecarResult(None, None, 0)
    blobs = blob_dir(journal_dir)
    try:
        for change in plan.changes:
            if change.old is not None:
                _store_blob(blobs, change.old)
            _store_blob(blobs, change.new)
    except OSError as exc:
        raise JournalError(
            f"cannot save the sidecars' contents in {blobs}: {exc.strerror or exc}. "
            "No sidecar was written."
        ) from None
    records = [
        SidecarRecord(
            index=i,
            path=change.path,
            photo=change.photos[0],
            temp=change.path.parent / temp_name(plan.run_id, i),
            old=_sha(change.old),
            new=_sha(change.new),
        )
        for i, change in enumerate(plan.changes)
    ]
    writer = JournalWriter.create(
        run_id=plan.run_id,
        kind="xmp",
        folder=Path(os.path.abspath(folder)),
        steps=[],
        prompt=prompt,
        directory=journal_dir,
        sidecars=records,
    )
    _execute(writer, records, blobs)
    created = sum(1 for change in plan.changes if change.old is None)
    return SidecarResult(plan.run_id, writer.path, len(records), created)


def _current(path: Path) -> str | None:
    """SHA-256 of what ``path`` holds now (None: nothing there).

    Raises:
        OSError: it cannot be read; XmpError: it is not a regular file.
    """
    return _sha(_read_sidecar(path))


def _put(record: SidecarRecord, want: str | None, blobs: Path) -> None:
    """Make ``record.path`` hold the content ``want`` (None: no file), never losing another.

    The caller has checked that the sidecar holds the run's other content.
    """
    if want is None:
        os.unlink(record.path)
        fsync_folder(record.path.parent)
        return
    data = _load_blob(blobs, want)
    existed = os.path.lexists(record.path)
    mode = 0o666  # a new sidecar: the umask decides, as for any file a Unix tool creates
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(os.stat(record.path).st_mode)  # an edited one keeps its mode
    # The journal's temporary name (not a random one), so recovery can clean it up.
    fd = os.open(record.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(record.temp)
        raise
    os.close(fd)
    try:
        # Replacing is atomic (the old bytes or the new, never half); a new sidecar never
        # replaces a file that appeared meanwhile.
        move_into_place(record.temp, record.path, replace=existed)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(record.temp)
        raise
    fsync_folder(record.path.parent)


def _describe(content: str | None) -> str:
    return "no sidecar" if content is None else "its earlier content"


def _execute(writer: JournalWriter, records: list[SidecarRecord], blobs: Path) -> None:
    """Write each sidecar; on any error put back those written, then raise."""
    done: list[SidecarRecord] = []
    try:
        for record in records:
            now = _current(record.path)
            if now != record.old:
                raise SidecarWriteError(
                    f"{record.path} changed since imgrank read it (another program wrote it); "
                    "imgrank does not overwrite it"
                )
            _put(record, record.new, blobs)
            done.append(record)
            writer.record_written(record.index)
    except BaseException as exc:
        problems = _roll_back(done, blobs)
        with contextlib.suppress(JournalError):
            writer.finish("rolled_back", "restored" if not problems else "partial", problems)
        if isinstance(exc, KeyboardInterrupt):
            head = f"interrupted at sidecar {len(done) + 1} of {len(records)}"
        elif isinstance(exc, XmpError):
            head = f"{record.path}: {exc}"
        elif isinstance(exc, OSError):
            head = f"writing {record.path} failed: {exc.strerror or exc}"
        else:
            head = str(exc)
        if problems:
            listed = "\n".join(f"  - {p}" for p in problems)
            raise SidecarWriteError(
                f"{head}. Not every sidecar could be put back; none was lost, their earlier "
                f"contents are kept in {blobs}:\n{listed}"
            ) from None
        raise SidecarWriteError(
            f"{head}. The {len(done)} sidecar(s) already written were given their earlier "
            "content back; nothing was lost."
        ) from None
    writer.finish("completed", "applied")


def _roll_back(done: list[SidecarRecord], blobs: Path) -> list[str]:
    problems = []
    for record in reversed(done):
        try:
            if _current(record.path) != record.new:
                problems.append(f"{record.path} changed again meanwhile; left as it is")
                continue
            _put(record, record.old, blobs)
        except (OSError, XmpError, JournalError) as exc:
            problems.append(f"{record.path}: {getattr(exc, 'strerror', None) or exc}")
    return problems


def settle_sidecars(
    run: RunRecord, *, forward: bool, writer: JournalWriter | None, journal_dir: Path | None = None
) -> list[str]:
    """Give each sidecar of an interrupted run its old (or, ``forward``, new) content.

    Trusts only what is on disk: a sidecar holding the run's old or new content
    is set to the wanted one; one holding anything else was changed by someone
    else and is left alone (reported). The run's leftover temporary files, which
    hold no one's only copy (the journal's blob store keeps both contents), are
    removed.

    Returns:
        One line per sidecar that could not be settled (empty: all settled).
    """
    blobs = blob_dir(journal_dir)
    problems = []
    for record in run.sidecars:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(record.temp)  # the run's own temporary name: never a user's file
        want = record.new if forward else record.old
        try:
            now = _current(record.path)
            if now == want:
                continue
            if now not in (record.old, record.new):
                problems.append(
                    f"{record.path} was changed by another program; left as it is (imgrank's "
                    f"saved copies of its earlier and new content are in {blobs})"
                )
                continue
            _put(record, want, blobs)
        except (OSError, XmpError, JournalError) as exc:
            problems.append(f"{record.path}: {getattr(exc, 'strerror', None) or exc}")
            continue
        if writer is not None and forward:
            with contextlib.suppress(JournalError):
                writer.record_written(record.index)
    return problems


def undo_sidecar_run(run: RunRecord, *, journal_dir: Path | None = None) -> SidecarResult:
    """Give every sidecar an ``xmp`` run wrote its earlier bytes back (new ones are removed).

    Raises:
        UnsafeOperationError: a sidecar was changed (or removed) since the run
            wrote it; nothing was changed.
        SidecarWriteError: a write failed midway; what was done was reversed.
    """
    problems = []
    for record in run.sidecars:
        try:
            now = _current(record.path)
        except (OSError, XmpError) as exc:
            problems.append(f"{record.path}: {getattr(exc, 'strerror', None) or exc}")
            continue
        if now != record.new:
            what = "was removed" if now is None else "was changed"
            problems.append(f"{record.path} {what} after imgrank wrote it")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise UnsafeOperationError(
            f"cannot undo run {run.run_id}: imgrank only puts back sidecars that still hold what "
            f"it wrote, so a later edit is never lost. Nothing was changed.\n{listed}"
        )
    new_id = new_run_id()
    records = [
        SidecarRecord(
            index=i,
            path=r.path,
            photo=r.photo,
            temp=r.path.parent / temp_name(new_id, i),
            old=r.new,
            new=r.old,
        )
        for i, r in enumerate(run.sidecars)
    ]
    writer = JournalWriter.create(
        run_id=new_id,
        kind="undo",
        folder=Path(run.folder),
        steps=[],
        prompt=run.prompt,
        undoes=run.run_id,
        directory=journal_dir,
        sidecars=records,
    )
    _execute(writer, records, blob_dir(journal_dir))
    return SidecarResult(new_id, writer.path, len(records))
