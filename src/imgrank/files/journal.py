"""Rename journals: the durable record that makes every rename undoable and recoverable.

One run of renames (``imgrank sort --rename --apply``, ``imgrank undo``)
writes one JSON-lines file in :func:`imgrank.paths.journal_dir`. Before the
first file is touched the journal holds, fsynced to disk:

* a ``header`` line: run id, kind, folder, prompt, imgrank version, template;
* one ``step`` line per file that will move: its source, target and
  temporary name, and its identity (device, inode, size, mtime);
* a ``begin`` line, which says the plan above is complete.

While the run goes on, each completed rename appends a ``moved`` line, and the
run closes with an ``end`` line (status, where the files ended up, problems).
Each append is fsynced. A journal without ``end`` belongs to a run that was
interrupted (Ctrl-C, ``kill -9``, power loss): :func:`check_no_unfinished_run`
makes every writing command refuse to start until ``imgrank recover`` has
settled it.

Recovery never trusts the ``moved`` lines alone (a rename can reach the disk
while the line recording it does not): it looks for each file by inode at the
few names it can have (source, temporary, target). A journal cut in the
middle of a line (power loss during an append) still parses: the partial last
line is ignored.

The process that writes a journal holds an exclusive ``flock`` on it until the
run ends, so another imgrank process can tell a live run from an interrupted
one (the kernel drops the lock when a process dies, even by SIGKILL).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from imgrank import __version__
from imgrank.errors import UnfinishedRunError, UnsafeOperationError
from imgrank.files.atomic import fsync_folder

try:  # POSIX only; on other systems a live run cannot be told from an interrupted one.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: Version of the journal format, written in every header.
FORMAT_VERSION = 1

#: Temporary names start with a dot (hidden, so scans skip them) and this prefix.
TEMP_PREFIX = ".imgrank-"

JOURNAL_SUFFIX = ".jsonl"

#: ``sort``: renames into rank order; ``xmp``: XMP sidecar writes (``sort --xmp``);
#: ``cull``: ``cull --move-rejects`` moving photos into another folder;
#: ``undo``: puts back what a ``sort``, ``xmp`` or ``cull`` run did.
RunKind = Literal["sort", "undo", "xmp", "cull"]
#: Where a run's files ended up: ``applied`` (at their targets), ``restored``
#: (back at their sources) or ``partial`` (some could not be put either way).
Outcome = Literal["applied", "restored", "partial"]
Position = Literal["source", "temp", "target"]


class JournalError(UnsafeOperationError):
    """A journal file cannot be written or read."""


@dataclass(frozen=True)
class FileIdentity:
    """What tells one file from another: device and inode, plus size and mtime.

    Device and inode survive a rename; size and mtime change when the file is
    edited, so all four together say "the very file we planned to move, unchanged".
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        """Identity of the directory entry ``path`` itself (a symlink is not followed).

        Raises:
            OSError: ``path`` does not exist or cannot be examined.
        """
        info = os.lstat(path)
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)

    def same_inode(self, other: FileIdentity) -> bool:
        """Same file (device and inode), whatever happened to its content since."""
        return self.dev == other.dev and self.ino == other.ino


def identity_or_none(path: Path) -> FileIdentity | None:
    """:meth:`FileIdentity.of`, or None when nothing (or nothing readable) is there."""
    try:
        return FileIdentity.of(path)
    except OSError:
        return None


def temp_name(run_id: str, index: int) -> str:
    """The temporary name a run uses for its step ``index`` (same folder as the file).

    Deterministic, so recovery knows where to look even for a temporary name
    it did not record, and short, so it fits every file system's name limit.
    """
    return f"{TEMP_PREFIX}{run_id}-{index}"


@dataclass(frozen=True)
class StepRecord:
    """One file a run moves: from ``source`` to ``target``, maybe through ``temp``.

    Attributes:
        index: Position of the step in the journal (0-based).
        source: Absolute path before the run.
        target: Absolute path after the run.
        temp: Temporary name in the same folder (used to break cycles).
        identity: The file's identity when the run was planned.
        original_name: The name the file had before any imgrank rank prefix;
            lets a later sort replace the prefix instead of stacking a new one.
    """

    index: int
    source: Path
    target: Path
    temp: Path
    identity: FileIdentity
    original_name: str

    def position(self, where: Position) -> Path:
        """The path of the file at ``where``."""
        return {"source": self.source, "temp": self.temp, "target": self.target}[where]

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "step",
            "index": self.index,
            "source": str(self.source),
            "target": str(self.target),
            "temp": str(self.temp),
            "dev": self.identity.dev,
            "inode": self.identity.ino,
            "size": self.identity.size,
            "mtime_ns": self.identity.mtime_ns,
            "original_name": self.original_name,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepRecord:
        return cls(
            index=int(data["index"]),
            source=Path(data["source"]),
            target=Path(data["target"]),
            temp=Path(data["temp"]),
            identity=FileIdentity(
                int(data["dev"]), int(data["inode"]), int(data["size"]), int(data["mtime_ns"])
            ),
            original_name=str(data.get("original_name") or Path(data["source"]).name),
        )


@dataclass(frozen=True)
class SidecarRecord:
    """One XMP sidecar a run writes: its content goes from ``old`` to ``new``.

    The contents are named by their SHA-256 (hex), and kept in the journal
    folder's blob store (:mod:`imgrank.files.sidecars`) before the run begins,
    so undo and recovery can always put either back byte for byte. None
    means "no file": a sidecar imgrank creates has ``old`` None; an undo
    that removes it has ``new`` None.

    Attributes:
        index: Position among the run's sidecars (0-based).
        path: Absolute path of the sidecar.
        photo: The photo it describes (for messages).
        temp: The temporary name the new content is written to first.
        old: SHA-256 of the content before the run, or None.
        new: SHA-256 of the content after the run, or None.
    """

    index: int
    path: Path
    photo: Path
    temp: Path
    old: str | None
    new: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "sidecar",
            "index": self.index,
            "path": str(self.path),
            "photo": str(self.photo),
            "temp": str(self.temp),
            "old": self.old,
            "new": self.new,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SidecarRecord:
        return cls(
            index=int(data["index"]),
            path=Path(data["path"]),
            photo=Path(data.get("photo") or data["path"]),
            temp=Path(data["temp"]),
            old=data.get("old"),
            new=data.get("new"),
        )


@dataclass
class RunRecord:
    """Everything a journal file says about one run.

    Attributes:
        run_id: Unique, sortable id (``YYYYmmdd-HHMMSS-xxxxxx``).
        path: The journal file.
        kind: ``sort`` (renames into rank order), ``cull`` (moves the rejects of
            ``imgrank cull --move-rejects`` into a folder) or ``undo`` (puts back a run's names).
        created: ISO-8601 time the run started (UTC).
        folder: The folder the run was about.
        prompt: The ``--by`` text (empty for undo runs).
        imgrank_version: Version that wrote the journal.
        template: The ``--name-template`` used (empty for undo runs).
        undoes: For an undo run, the id of the run it undoes.
        skipped: For an undo run with ``--skip-changed``: ``{"path", "reason"}`` of
            each file it left as it was (still under the name the sort gave it).
        pid: Process id of the writer (shown when the run is still in progress).
        steps: The planned file moves.
        begun: The plan was complete on disk (renames may have started).
        moved: ``(step index, position)`` for each rename recorded as done.
        sidecars: The planned XMP sidecar writes (``xmp`` runs and their undos).
        written: Indices of the sidecars recorded as written.
        end: The closing record, or None if the run never finished.
        damaged_lines: Lines that could not be parsed (a cut last line, typically).
    """

    run_id: str
    path: Path
    kind: RunKind
    created: str
    folder: str
    prompt: str = ""
    imgrank_version: str = ""
    template: str = ""
    undoes: str | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    pid: int | None = None
    steps: list[StepRecord] = field(default_factory=list)
    begun: bool = False
    moved: list[tuple[int, str]] = field(default_factory=list)
    sidecars: list[SidecarRecord] = field(default_factory=list)
    written: list[int] = field(default_factory=list)
    end: dict[str, Any] | None = None
    damaged_lines: int = 0

    @property
    def finished(self) -> bool:
        """The run closed (completed, rolled back or recovered)."""
        return self.end is not None

    @property
    def status(self) -> str:
        """``completed``, ``rolled_back``, ``recovered``, ``abandoned`` or ``unfinished``."""
        return str(self.end.get("status", "unknown")) if self.end else "unfinished"

    @property
    def outcome(self) -> str | None:
        """Where the files ended up (see :data:`Outcome`), None while unfinished."""
        return str(self.end.get("outcome")) if self.end else None

    @property
    def problems(self) -> list[str]:
        """What could not be done, one line per file, from the closing record."""
        return list(self.end.get("problems", [])) if self.end else []


def new_run_id() -> str:
    """A unique id that sorts by start time: ``20250101-120000-a1b2c3``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _encode(record: dict[str, Any]) -> bytes:
    # ensure_ascii keeps non-UTF-8 names (surrogate escapes) representable; they
    # decode back to the same str, hence the same bytes on disk.
    return (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")


class JournalWriter:
    """Appends to one run's journal, fsyncing each record, holding the run's lock."""

    def __init__(self, path: Path, fd: int, run_id: str) -> None:
        self.path = path
        self.run_id = run_id
        self._fd: int | None = fd

    @classmethod
    def create(
        cls,
        *,
        run_id: str,
        kind: RunKind,
        folder: Path,
        steps: list[StepRecord],
        prompt: str = "",
        template: str = "",
        undoes: str | None = None,
        skipped: list[dict[str, str]] | None = None,
        directory: Path | None = None,
        sidecars: list[SidecarRecord] | None = None,
    ) -> JournalWriter:
        """Write the header, every step and ``begin``, fsynced, before anything moves.

        Raises:
            JournalError: the journal folder or file cannot be written.
        """
        from imgrank.paths import journal_dir

        directory = directory or journal_dir()
        path = directory / f"{run_id}{JOURNAL_SUFFIX}"
        header = {
            "type": "header",
            "format": FORMAT_VERSION,
            "run_id": run_id,
            "kind": kind,
            "created": _now(),
            "folder": str(folder),
            "prompt": prompt,
            "template": template,
            "undoes": undoes,
            "imgrank_version": __version__,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "steps": len(steps),
            "sidecars": len(sidecars or []),
            "skipped": skipped or [],
        }
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except OSError as exc:
            raise JournalError(
                f"cannot create the rename journal {path}: {exc.strerror or exc}. "
                "Nothing was renamed; imgrank renames files only after their journal is "
                "safely on disk."
            ) from None
        writer = cls(path, fd, run_id)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            payload = _encode(header) + b"".join(_encode(s.to_json()) for s in steps)
            payload += b"".join(_encode(s.to_json()) for s in sidecars or [])
            payload += _encode({"type": "begin"})
            writer._write(payload)
        except BaseException:
            writer.close()
            with contextlib.suppress(OSError):
                os.unlink(path)  # imgrank's own file: no rename has happened yet
            raise
        # The journal's own directory entry must survive a power loss too.
        fsync_folder(directory)
        return writer

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            raise JournalError(f"the journal {self.path} is already closed")
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError as exc:
            raise JournalError(
                f"cannot write the rename journal {self.path}: {exc.strerror or exc}"
            ) from None

    def record_moved(self, step: int, position: Position) -> None:
        """Record that step ``step``'s file now sits at ``position``."""
        self._write(_encode({"type": "moved", "step": step, "to": position}))

    def record_written(self, sidecar: int) -> None:
        """Record that sidecar ``sidecar`` now holds its ``new`` content."""
        self._write(_encode({"type": "written", "sidecar": sidecar}))

    def finish(self, status: str, outcome: Outcome, problems: list[str] | None = None) -> None:
        """Close the run: after this line the journal no longer blocks other commands."""
        self._write(
            _encode(
                {
                    "type": "end",
                    "status": status,
                    "outcome": outcome,
                    "problems": list(problems or []),
                    "finished": _now(),
                }
            )
        )
        self.close()

    def close(self) -> None:
        """Release the lock and the file (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


@contextlib.contextmanager
def reopen(run: RunRecord) -> Iterator[JournalWriter]:
    """Append to an unfinished run's journal (for recovery), holding its lock.

    Raises:
        UnsafeOperationError: another live imgrank process holds the run.
    """
    try:
        fd = os.open(run.path, os.O_WRONLY | os.O_APPEND)
    except OSError as exc:
        raise JournalError(
            f"cannot open the rename journal {run.path}: {exc.strerror or exc}"
        ) from None
    writer = JournalWriter(run.path, fd, run.run_id)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _in_progress_error(run) from None
        if not _ends_with_newline(run.path):
            # A record cut by a crash would glue onto the next one; start a fresh line.
            writer._write(b"\n")
        yield writer
    finally:
        writer.close()


def _ends_with_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return True
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) == b"\n"
    except OSError:
        return True


def read_run(path: Path) -> RunRecord:
    """Parse one journal file, tolerating damaged lines (a cut last line above all).

    Raises:
        JournalError: the file cannot be read or has no readable header.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise JournalError(
            f"cannot read the rename journal {path}: {exc.strerror or exc}"
        ) from None
    run: RunRecord | None = None
    damaged = 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("ascii"))
            kind = record["type"]
        except (ValueError, UnicodeDecodeError, TypeError, KeyError):
            damaged += 1
            continue
        if kind == "header":
            run = RunRecord(
                run_id=str(record["run_id"]),
                path=path,
                kind=record.get("kind", "sort"),
                created=str(record.get("created", "")),
                folder=str(record.get("folder", "")),
                prompt=str(record.get("prompt") or ""),
                imgrank_version=str(record.get("imgrank_version", "")),
                template=str(record.get("template") or ""),
                undoes=record.get("undoes"),
                skipped=[
                    {"path": str(item.get("path", "")), "reason": str(item.get("reason", ""))}
                    for item in record.get("skipped") or []
                    if isinstance(item, dict)
                ],
                pid=record.get("pid"),
            )
        elif run is None:
            damaged += 1
        elif kind == "step":
            try:
                run.steps.append(StepRecord.from_json(record))
            except (KeyError, ValueError, TypeError):
                damaged += 1
        elif kind == "sidecar":
            try:
                run.sidecars.append(SidecarRecord.from_json(record))
            except (KeyError, ValueError, TypeError):
                damaged += 1
        elif kind == "written":
            try:
                run.written.append(int(record["sidecar"]))
            except (KeyError, ValueError, TypeError):
                damaged += 1
        elif kind == "begin":
            run.begun = True
        elif kind == "moved":
            try:
                run.moved.append((int(record["step"]), str(record["to"])))
            except (KeyError, ValueError, TypeError):
                damaged += 1
        elif kind == "end":
            run.end = record
    if run is None:
        raise JournalError(f"{path} is not a readable imgrank journal (no header line)")
    run.damaged_lines = damaged
    return run


def journal_files(directory: Path | None = None) -> list[Path]:
    """The journal files, in name order (run ids start with their start time)."""
    from imgrank.paths import journal_dir

    directory = directory or journal_dir()
    try:
        names = sorted(p for p in directory.iterdir() if p.name.endswith(JOURNAL_SUFFIX))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise JournalError(
            f"cannot list the rename journals in {directory}: {exc.strerror or exc}"
        ) from None
    return names


def list_runs(directory: Path | None = None) -> list[RunRecord]:
    """Every run with a readable journal, oldest first."""
    runs = []
    for path in journal_files(directory):
        try:
            runs.append(read_run(path))
        except JournalError:
            continue  # a journal whose header never reached the disk: no rename happened
    # Run ids sort by the second only; the header's microsecond time orders runs
    # started within the same second.
    runs.sort(key=lambda run: (run.created, run.run_id))
    return runs


def find_run(run_id: str, directory: Path | None = None) -> RunRecord:
    """The run with this id (a unique prefix of it is enough).

    Raises:
        UnsafeOperationError: no run, or more than one, matches.
    """
    runs = list_runs(directory)
    exact = [r for r in runs if r.run_id == run_id]
    matches = exact or [r for r in runs if r.run_id.startswith(run_id)]
    if not matches:
        raise UnsafeOperationError(f"no rename run {run_id!r}; `imgrank runs` lists them")
    if len(matches) > 1:
        shown = ", ".join(r.run_id for r in matches[:5])
        raise UnsafeOperationError(
            f"{run_id!r} matches several runs ({shown}); give more of the id"
        )
    return matches[0]


def is_in_progress(run: RunRecord) -> bool:
    """True while a live process holds the run's lock (it is renaming right now)."""
    if run.finished or fcntl is None:
        return False
    try:
        fd = os.open(run.path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe lock
    return False


def unfinished_runs(directory: Path | None = None) -> list[RunRecord]:
    """Runs whose journal has no ``end`` record (interrupted, or still in progress)."""
    return [run for run in list_runs(directory) if not run.finished]


def _in_progress_error(run: RunRecord) -> UnsafeOperationError:
    return UnsafeOperationError(
        f"another imgrank process (pid {run.pid}) is renaming files in {run.folder} right now "
        f"(run {run.run_id}); wait for it to finish, then try again"
    )


def locate(step: StepRecord) -> list[Position]:
    """Where the step's file is: the names among source, temp and target that hold its inode."""
    found: list[Position] = []
    for position in ("source", "temp", "target"):
        now = identity_or_none(step.position(position))  # type: ignore[arg-type]
        if now is not None and now.same_inode(step.identity):
            found.append(position)  # type: ignore[arg-type]
    return found


def close_if_restored(run: RunRecord) -> bool:
    """Close an unfinished rename run in which every photo is back under its original name.

    A failed ``--apply`` that reversed every rename but could not write its
    closing line (a full disk, a journal that stopped being writable) stayed
    "interrupted" and blocked every writing command, though there was nothing
    to recover. A run whose journal records renames and whose every photo is
    back at its original name (checked by inode, and at none of its other
    names) is closed as rolled back here; any other state is left for
    ``imgrank recover``.

    Returns:
        Whether the run was closed.
    """
    if run.finished or run.sidecars or not run.steps or is_in_progress(run):
        return False
    if not run.moved:
        # No rename recorded: a run killed before its first rename, which `imgrank
        # recover` settles in either direction (--forward may still be wanted).
        return False
    if any(locate(step) != ["source"] for step in run.steps):
        return False
    try:
        with reopen(run) as writer:
            writer.finish("rolled_back", "restored")
    except (UnsafeOperationError, OSError):
        return False  # still not writable: the guard explains, `imgrank recover` settles it
    return True


def check_no_unfinished_run(directory: Path | None = None) -> None:
    """The guard every command that writes into a user's folders calls first.

    Raises:
        UnfinishedRunError: an interrupted run must be recovered first.
        UnsafeOperationError: another imgrank process is renaming right now.
    """
    for run in unfinished_runs(directory):
        if is_in_progress(run):
            raise _in_progress_error(run)
        if close_if_restored(run):
            continue  # rolled back completely, only its closing line was missing
        what = {"sort": "rename", "xmp": "XMP sidecar", "cull": "move-rejects"}.get(
            run.kind, "undo"
        )
        effect = (
            "some XMP sidecars may hold new values while others do not. Run `imgrank recover` "
            "to give every sidecar its earlier content back"
            if run.sidecars and not run.steps
            else "some photos may still carry temporary or new names. Run `imgrank recover` "
            "to put every file back under its original name"
        )
        raise UnfinishedRunError(
            f"an earlier {what} run ({run.run_id}, in {run.folder}, started {run.created[:19]}) "
            f"was interrupted before it finished, so {effect} "
            "(or `imgrank recover --forward` to finish the run) before imgrank changes "
            "anything else. "
            f"No file was lost; the journal is {run.path}."
        )
