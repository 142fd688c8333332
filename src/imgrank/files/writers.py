"""Writers for a ranking: CSV, JSON lines, plain paths, rank-ordered links or copies.

Paths are written exactly as they are on disk: Python decodes undecodable
bytes of file names with ``surrogateescape``, and the text writers encode them
back the same way, so a non-UTF-8 name survives ``imgrank sort | xargs``.
(In JSON lines such a name appears as ``\\udcXX`` escapes, which decode back to
the same string, since JSON text must be Unicode.)

No writer overwrites or deletes a file imgrank did not write: output files go
through :mod:`imgrank.files.atomic` (written whole, moved into place without
replacing), copies are opened with ``O_EXCL`` and links created by ``symlink``
(which refuses existing paths), and every destination is checked before the
first one is written (``--force`` replaces only an earlier imgrank output
folder's entries: :mod:`imgrank.files.output_folder`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import stat
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, Protocol

from imgrank.errors import OutputWriteError, UnsafeOperationError
from imgrank.ranking import RankedImage, SkippedFile

if TYPE_CHECKING:
    from imgrank.culler import CulledPhoto


class HasPath(Protocol):
    @property
    def path(self) -> Path: ...

OutputFormat = Literal["csv", "jsonl", "paths"]
FORMATS: tuple[str, ...] = ("csv", "jsonl", "paths")


def format_score(score: float) -> str:
    """Scores as text: six decimals are enough to order and compare them."""
    return f"{score:.6f}"


def _text_stream(stream: BinaryIO) -> io.TextIOWrapper:
    # surrogateescape turns the escaped bytes of non-UTF-8 names back into those bytes.
    return io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="", write_through=True)


def write_csv(items: Iterable[RankedImage], stream: BinaryIO) -> None:
    """``rank,score,path`` with a header row; rank 1 is the first row."""
    text = _text_stream(stream)
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["rank", "score", "path"])
    for item in items:
        writer.writerow([item.rank, format_score(item.score), str(item.path)])
    text.flush()
    text.detach()


def write_jsonl(items: Iterable[RankedImage], stream: BinaryIO) -> None:
    """One JSON object per line: ``{"rank": 1, "score": 0.93, "path": "..."}``.

    A RAW+JPEG pair ranked as one photo also names its RAW file: ``"raw": "IMG_1.CR2"``.
    """
    for item in items:
        record: dict[str, object] = {"rank": item.rank, "score": item.score, "path": str(item.path)}
        if item.raw is not None:
            record["raw"] = str(item.raw)
        line = json.dumps(record)
        stream.write(line.encode("ascii") + b"\n")
    stream.flush()


def write_paths(items: Iterable[HasPath], stream: BinaryIO, *, null: bool = False) -> None:
    """Only the paths, one per line (or NUL-separated for ``xargs -0``), as raw bytes."""
    separator = b"\0" if null else b"\n"
    for item in items:
        stream.write(os.fsencode(item.path) + separator)
    stream.flush()


def write_ranking(
    items: list[RankedImage], stream: BinaryIO, fmt: str = "csv", *, null: bool = False
) -> None:
    """Write ``items`` to a binary stream in one of :data:`FORMATS`."""
    if fmt == "csv":
        write_csv(items, stream)
    elif fmt == "jsonl":
        write_jsonl(items, stream)
    elif fmt == "paths":
        write_paths(items, stream, null=null)
    else:
        raise ValueError(f"unknown format {fmt!r}")


#: (device, inode) pairs of files an output must never replace: the run's own inputs.
Identities = Collection[tuple[int, int]]


def output_replace(force: bool, protected: Identities = ()) -> bool | Callable[[Path], bool]:
    """The ``replace`` policy of :mod:`imgrank.files.atomic` for ``--output``/``--errors``.

    Without ``force`` nothing is replaced. ``--force`` replaces only a regular
    file that is not a photo: never a device, FIFO or socket, never a symbolic
    link (it would be the link that is replaced, not what it points to),
    never a file with an image extension, and never one of ``protected`` (the
    run's inputs, also through a hard link). The atomic writer asks this both
    before the work and again just before the replace.
    """
    if not force:
        return False

    def may_replace(path: Path) -> bool:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return True
        check_replaceable(path, info, protected)
        return True

    return may_replace


def _is_photo_name(path: Path) -> bool:
    from imgrank.images.decode import BASE_EXTENSIONS, HEIF_EXTENSIONS, supported_extensions

    return path.suffix.lower() in BASE_EXTENSIONS | HEIF_EXTENSIONS | supported_extensions()


def check_replaceable(path: Path, info: os.stat_result, protected: Identities = ()) -> None:
    """What ``--force`` may replace: a regular file that is neither a photo nor an input.

    Raises:
        UnsafeOperationError: ``path`` (as ``info`` describes it) must be left alone.
    """
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeOperationError(
            f"{path} is a symbolic link; --force replaces only regular files, never a link "
            "(nor what it points to): remove the link or give another name"
        )
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeOperationError(
            f"{path} is not a regular file (a device, FIFO or socket); imgrank never "
            "replaces it, even with --force"
        )
    if _is_photo_name(path):
        raise UnsafeOperationError(
            f"{path} has an image file's name; --force never replaces a photo with "
            "imgrank's output: give another name"
        )
    if (info.st_dev, info.st_ino) in protected:
        raise UnsafeOperationError(
            f"{path} is one of the photos of this run (the same file, by a hard link); "
            "--force never replaces an input: give another name"
        )


def identities(paths: Iterable[Path]) -> set[tuple[int, int]]:
    """(device, inode) of each path that still exists (for ``protected``)."""
    found: set[tuple[int, int]] = set()
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue
        found.add((info.st_dev, info.st_ino))
    return found


def write_culling(
    photos: list[CulledPhoto], stream: BinaryIO, fmt: str = "csv", *, null: bool = False
) -> None:
    """Write a culling (``imgrank cull``) in one of :data:`FORMATS`.

    CSV: ``group,rank_in_group,keep,score,path`` (keep is 1 or 0); JSON lines: the same
    keys, keep as true/false, plus ``captured`` (seconds, camera clock) when known and
    ``raw`` for a RAW+JPEG pair; paths: the paths in the same order.
    """
    if fmt == "csv":
        text = _text_stream(stream)
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["group", "rank_in_group", "keep", "score", "path"])
        for photo in photos:
            writer.writerow(
                [
                    photo.group,
                    photo.rank_in_group,
                    int(photo.keep),
                    format_score(photo.score),
                    str(photo.path),
                ]
            )
        text.flush()
        text.detach()
    elif fmt == "jsonl":
        for photo in photos:
            record: dict[str, object] = {
                "group": photo.group,
                "rank_in_group": photo.rank_in_group,
                "keep": photo.keep,
                "score": photo.score,
                "path": str(photo.path),
            }
            if photo.captured is not None:
                record["captured"] = photo.captured.local
            if photo.raw is not None:
                record["raw"] = str(photo.raw)
            stream.write(json.dumps(record).encode("ascii") + b"\n")
        stream.flush()
    elif fmt == "paths":
        write_paths(photos, stream, null=null)
    else:
        raise ValueError(f"unknown format {fmt!r}")


def write_errors_csv(skipped: Iterable[SkippedFile], stream: BinaryIO) -> None:
    """The skipped files as CSV ``path,reason`` (for ``--errors FILE``)."""
    text = _text_stream(stream)
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "reason"])
    for item in skipped:
        writer.writerow([str(item.path), item.reason])
    text.flush()
    text.detach()


def rank_prefix_width(count: int) -> int:
    """Digits of the rank prefix: at least 4 (``0001_``), more for huge folders."""
    return max(4, len(str(count)))


def ranked_names(items: list[RankedImage]) -> list[str]:
    """``0001_<original name>`` for each item, the rank zero-padded to a common width."""
    width = rank_prefix_width(max((item.rank for item in items), default=0))
    return [f"{item.rank:0{width}d}_{item.path.name}" for item in items]


def _copy_new(source: Path, target: Path) -> None:
    """Copy ``source`` to the new file ``target`` (refused if it exists), timestamps included.

    The bytes go to a temporary name beside ``target``, are fsynced, and only
    then get the name (without replacing anything): a copy cut short at any
    step, the last write, the flush at close or the fsync included (a full
    disk, Ctrl-C), is removed and never appears under a photo's name.

    Raises:
        UnsafeOperationError: ``target`` exists or appeared meanwhile.
        OutputWriteError: the copy could not be written (nothing is left behind).
        OSError: ``source`` cannot be read.
    """
    from imgrank.files.atomic import atomic_file

    with open(source, "rb") as src, atomic_file(target) as dst:
        shutil.copyfileobj(src, dst, length=1024 * 1024)
        dst.flush()  # before the times are set: a later write would change the mtime
        shutil.copystat(source, dst.fileno())  # times and mode travel with the rename


def materialize(
    items: list[RankedImage],
    out_dir: Path,
    *,
    mode: Literal["link", "copy"],
    force: bool = False,
) -> list[Path]:
    """Write rank-ordered symlinks or copies of the originals into ``out_dir``.

    The folder must be new, empty, or an earlier imgrank output of the same
    kind (replaced only with ``force``): see :mod:`imgrank.files.output_folder`.
    Each target is created in a way that fails if the name appeared meanwhile,
    so nothing imgrank did not write is ever replaced.

    A RAW+JPEG pair gets a link (or copy) for each of its two files, with the same rank.

    Returns:
        The created paths, in rank order.

    Raises:
        UnsafeOperationError: the folder holds something else, or a target cannot be written.
    """
    from imgrank.files.output_folder import check_output_folder, prepare_output_folder

    items = [row for item in items for row in item.expanded()]
    destination = check_output_folder(out_dir, mode, force=force)
    names = ranked_names(items)
    prepare_output_folder(destination, names)
    targets = [out_dir / name for name in names]
    created: list[Path] = []
    for item, target in zip(items, targets, strict=True):
        source = item.path.absolute()
        try:
            if mode == "link":
                os.symlink(source, target)  # fails with FileExistsError on an existing name
            else:
                _copy_new(source, target)
        except (FileExistsError, UnsafeOperationError):
            raise UnsafeOperationError(
                f"{target} appeared while imgrank was writing; it was left untouched "
                f"({len(created)} of {len(items)} {mode}s written)"
            ) from None
        except OutputWriteError as exc:
            raise OutputWriteError(
                f"{exc} ({len(created)} of {len(items)} copies written, none cut short; "
                "originals untouched)"
            ) from None
        except OSError as exc:
            raise OutputWriteError(
                f"cannot {mode} {source} to {target}: {exc.strerror or exc} "
                f"({len(created)} of {len(items)} written; originals untouched)"
            ) from None
        created.append(target)
    return created
