"""The folders ``--link`` and ``--copy`` write: checked before any work, marked as imgrank's.

Two rankings must never mix in one folder (two ``0001_...`` files side by
side), and a later scan must not rank imgrank's own copies as photos. So:

* a destination is checked before any model work: it must be new, empty, or an
  earlier imgrank output of the same kind (replaced only with ``--force``, and
  then it holds exactly the new ranking); anything else is refused;
* every output folder carries a small marker file, :data:`MARKER`, listing the
  names imgrank wrote there. Scans skip sub-folders holding it, and ``--force``
  removes only the listed entries, so a file the user added is never deleted
  (such a folder is refused instead).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imgrank.errors import OutputWriteError, UnsafeOperationError, UsageError

OutputMode = Literal["link", "copy"]

#: Name of the marker file in every folder ``--link`` / ``--copy`` writes.
MARKER = ".imgrank-output"


@dataclass
class OutputFolder:
    """A checked destination: where, what kind, and what an earlier run left there."""

    folder: Path
    mode: OutputMode
    #: Entries of an earlier imgrank output of the same kind, removed before writing.
    previous: list[str] = field(default_factory=list)


def is_output_folder(folder: Path) -> bool:
    """Whether ``folder`` was written by ``--link`` or ``--copy`` (it holds the marker)."""
    return os.path.isfile(os.path.join(folder, MARKER))


def _read_marker(folder: Path) -> dict[str, object] | None:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8", errors="surrogateescape"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_ours(path: Path, mode: OutputMode) -> bool:
    """An entry the marker lists is removed only if it is still what imgrank made there."""
    if mode == "link":
        return path.is_symlink()
    return path.is_file() and not path.is_symlink()


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_output_folder(
    folder: Path, mode: OutputMode, *, force: bool = False, scanned: Path | None = None
) -> OutputFolder:
    """Decide, before any work, whether ``folder`` may receive a ranking's links or copies.

    Args:
        folder: the ``--link`` / ``--copy`` destination.
        mode: ``link`` or ``copy``.
        force: allow replacing an earlier imgrank output of the same kind.
        scanned: the folder being sorted (it cannot be its own output folder).

    Raises:
        UsageError: the destination is the scanned folder itself.
        UnsafeOperationError: the destination is a file, holds files imgrank
            did not write there, holds another kind of output, or holds an
            earlier output and ``force`` is False.
    """
    option = f"--{mode}"
    if scanned is not None and _same_folder(folder, scanned):
        raise UsageError(
            f"{option} {folder} is the folder being sorted; the {mode}s must go to another "
            f"folder, e.g. {option} {folder / 'ranked'}"
        )
    if not os.path.lexists(folder):
        return OutputFolder(folder, mode)
    if not folder.is_dir():
        raise UnsafeOperationError(f"{option} {folder} is not a folder; give a new or empty folder")
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        raise UnsafeOperationError(f"cannot list {option} folder {folder}: {exc.strerror or exc}") from None
    if not names:
        return OutputFolder(folder, mode)
    marker = _read_marker(folder) if MARKER in names else None
    if marker is None:
        raise UnsafeOperationError(
            f"{option} {folder} already holds {len(names)} file(s) imgrank did not write "
            f"({_listing(names)}); two rankings would mix. Choose a new or empty folder."
        )
    kind = marker.get("mode")
    if kind != mode:
        raise UnsafeOperationError(
            f"{option} {folder} holds an earlier imgrank --{kind} output, not --{mode}; "
            "choose another folder"
        )
    listed = marker.get("files")
    listed_names = {n for n in listed if isinstance(n, str)} if isinstance(listed, list) else set()
    previous = [n for n in names if n != MARKER]
    foreign = [n for n in previous if n not in listed_names or not _is_ours(folder / n, mode)]
    if foreign:
        raise UnsafeOperationError(
            f"{option} {folder} holds an earlier imgrank output and also files imgrank did not "
            f"write there ({_listing(foreign)}); imgrank will not mix rankings or remove those "
            "files. Choose a new or empty folder."
        )
    if not force:
        raise UnsafeOperationError(
            f"{option} {folder} holds an earlier imgrank ranking ({len(previous)} {mode}s); "
            "add --force to replace it with this one, or choose a new folder"
        )
    return OutputFolder(folder, mode, previous)


def prepare_output_folder(destination: OutputFolder, names: list[str]) -> None:
    """Create the folder, remove the earlier output's entries, and mark it for ``names``.

    The marker is written before the first new entry, so a run cut short still
    leaves a folder recognised as imgrank's (``--force`` can replace it).

    Raises:
        UnsafeOperationError: the destination exists and is not a folder.
        OutputWriteError: the folder cannot be created or written (read-only, full).
    """
    folder = destination.folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UnsafeOperationError(
            f"--{destination.mode} {folder} exists and is not a folder; name a new or empty folder"
        ) from None
    except OSError as exc:
        raise OutputWriteError(
            f"cannot create the --{destination.mode} folder {folder}: {exc.strerror or exc}"
        ) from None
    try:
        for name in destination.previous:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
        # The marker is imgrank's own file, rewritten in place whole.
        temporary = folder / f"{MARKER}.partial"
        temporary.write_text(
            json.dumps({"imgrank": "output", "mode": destination.mode, "files": names}),
            encoding="utf-8",
            errors="surrogateescape",
        )
        os.replace(temporary, folder / MARKER)
    except OSError as exc:
        raise OutputWriteError(
            f"cannot write into the --{destination.mode} folder {folder}: {exc.strerror or exc}"
        ) from None
