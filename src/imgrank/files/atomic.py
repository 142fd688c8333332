"""Every file and folder imgrank creates is written whole, here.

One rule for the ranking (``-o``), ``--errors``, the HTML report, label
tables, model folders, ONNX exports and imgrank's own small state files:

* The content goes to a temporary name in the destination's own folder (so
  the final move never crosses file systems), is fsynced, and only then gets
  its real name. An interrupted or failed run leaves neither half a file nor
  an empty one, and a file being replaced stays intact until the new one is
  complete.
* The final move never replaces anything unless the caller allows it: a
  no-replace rename (``renameat2``/``renamex_np``, else a hard link), which
  the kernel refuses when the name was taken meanwhile.
* File systems without hard links or no-replace renames (FAT, exFAT, some
  network shares) get a checked plain rename instead: the name is looked up
  right before the move, which leaves only a window of microseconds for
  another program to take it, rather than failing the whole run.
* Files and folders are created with mode 0666/0777 and the process umask
  applies, like any Unix tool (``mkstemp``/``mkdtemp`` would make them private).

Failures become :class:`~imgrank.errors.ImgrankError` subclasses that name the
file: :class:`~imgrank.errors.UnsafeOperationError` when writing would replace
something, :class:`~imgrank.errors.OutputWriteError` when the disk says no
(full, read-only, permissions).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from imgrank.errors import OutputWriteError, UnsafeOperationError

#: May an existing destination be replaced? A flag, or a test of the file found there
#: (the HTML report replaces only an earlier imgrank report).
Replace = bool | Callable[[Path], bool]

#: Suffix of temporary names, so a leftover of a killed process is recognisable.
PARTIAL_SUFFIX = ".imgrank-partial"

#: errno values of a file system that has no hard links or no-replace renames
#: (FAT answers EPERM to link(2); others answer ENOTSUP, EOPNOTSUPP or ENOSYS).
_NO_LINKS = {
    errno.EPERM,
    errno.EMLINK,
    errno.ENOSYS,
    errno.EINVAL,
    getattr(errno, "ENOTSUP", errno.EPERM),
    getattr(errno, "EOPNOTSUPP", errno.EPERM),
}


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _may_replace(path: Path, replace: Replace) -> bool:
    return replace(path) if callable(replace) else bool(replace)


def check_new_file(path: Path, *, replace: Replace = False) -> None:
    """Refuse early (before minutes of work) an output file that cannot or must not be written.

    Raises:
        UnsafeOperationError: ``path`` is a folder, exists and may not be
            replaced, or its folder does not exist.
    """
    path = Path(path)
    if path.is_dir():
        raise UnsafeOperationError(f"{path} is a folder; give a file name")
    if _exists(path) and not _may_replace(path, replace):
        raise UnsafeOperationError(
            f"{path} already exists; imgrank never overwrites a file unless --force is given"
        )
    if not path.absolute().parent.is_dir():
        raise UnsafeOperationError(f"cannot write {path}: its folder does not exist")


def check_new_folder(path: Path, *, what: str = "the output folder") -> None:
    """Refuse a destination folder that exists and holds anything, or is not a folder.

    Raises:
        UnsafeOperationError: ``path`` is a file, a link, or a folder that is not empty.
    """
    path = Path(path).expanduser()
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UnsafeOperationError(
            f"{what} {path} exists and is not a folder; choose a new folder name"
        )
    if path.is_dir() and any(path.iterdir()):
        raise UnsafeOperationError(
            f"{what} {path} is not empty; imgrank never overwrites files: choose a new or "
            "empty folder, or remove that one yourself"
        )


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere reading it means setting it back at once
    os.umask(mask)
    return mask


def fsync_folder(folder: Path) -> None:
    """Make a folder's entries (a new or renamed file) durable, where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the data fsyncs still hold
    finally:
        os.close(fd)


def move_into_place(source: Path, destination: Path, *, replace: Replace = False) -> None:
    """Give ``source`` (a file or folder) the name ``destination``, replacing only if allowed.

    Without permission to replace, the move is refused by the kernel when the
    name is taken (no check-then-act race), except on file systems that can
    do neither no-replace renames nor hard links, where the name is checked
    immediately before a plain rename.

    Raises:
        UnsafeOperationError: ``destination`` exists and may not be replaced.
        OSError: the move failed for another reason (``source`` is left as it was).
    """
    from imgrank.files.noreplace import rename_noreplace

    if _exists(destination):
        if not _may_replace(destination, replace):
            raise UnsafeOperationError(
                f"{destination} appeared while imgrank was writing it; it was left untouched"
            )
        os.replace(source, destination)
        return
    try:
        rename_noreplace(source, destination)
    except FileExistsError:
        raise UnsafeOperationError(
            f"{destination} appeared while imgrank was writing it; it was left untouched"
        ) from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # No hard links here (FAT, exFAT, some shares): the best that remains.
        if _exists(destination):
            raise UnsafeOperationError(
                f"{destination} appeared while imgrank was writing it; it was left untouched"
            ) from None
        os.rename(source, destination)


def _temporary_name(destination: Path) -> Path:
    return destination.with_name(f".{destination.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


@contextlib.contextmanager
def atomic_file(path: Path | str, *, replace: Replace = False) -> Iterator[BinaryIO]:
    """Yield a binary stream whose content becomes the file ``path`` when the block succeeds.

    Args:
        path: The file to create.
        replace: Whether an existing file there may be replaced (or a test of it).

    Raises:
        UnsafeOperationError: ``path`` exists (and may not be replaced), is a
            folder, or its folder does not exist.
        OutputWriteError: the file cannot be written (disk full, permissions,
            read-only file system); nothing was left behind.
    """
    path = Path(path)
    check_new_file(path, replace=replace)
    while True:
        temporary = _temporary_name(path)
        try:
            # 0o666: the umask decides, as for any file a Unix tool creates.
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputWriteError(f"cannot write {path}: {_describe(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        move_into_place(temporary, path, replace=replace)
        fsync_folder(path.absolute().parent)
    except OSError as exc:
        raise OutputWriteError(f"cannot write {path}: {_describe(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)  # gone already when the move succeeded


def write_file(path: Path | str, data: bytes | str, *, replace: Replace = False) -> None:
    """Write ``data`` (text is UTF-8) to the new file ``path`` at once (see :func:`atomic_file`)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(path, replace=replace) as stream:
        stream.write(payload)


@contextlib.contextmanager
def atomic_folder(path: Path | str, *, what: str = "the output folder") -> Iterator[Path]:
    """Yield a fresh folder beside ``path`` that becomes ``path`` when the block succeeds.

    ``path`` must not exist or be an empty folder. The files written into the
    yielded folder are fsynced before it gets its name, so a model folder or an
    export is either complete under its name or not there at all. If the block
    fails, the temporary folder (holding only what the block wrote) is removed;
    if only the final move fails, the finished files are kept and named.

    Raises:
        UnsafeOperationError: ``path`` holds something.
        OutputWriteError: the folder cannot be created or written.
    """
    out = Path(path).expanduser().absolute()
    check_new_folder(out, what=what)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot create {out.parent}: {_describe(exc)}") from None
    while True:
        work = _temporary_name(out)
        try:
            os.mkdir(work, 0o777)  # the umask applies, unlike mkdtemp's 0700
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputWriteError(f"cannot write {out}: {_describe(exc)}") from None
    try:
        yield work
        # Some writers (safetensors) create private files; the folder's files get
        # the permissions the user's umask gives, like the folder itself.
        umask = current_umask()
        for child in work.rglob("*"):
            if child.is_symlink():
                continue
            if child.is_dir():
                os.chmod(child, 0o777 & ~umask)
            elif child.is_file():
                os.chmod(child, 0o666 & ~umask)
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_folder(work)
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise OutputWriteError(f"cannot write {out}: {_describe(exc)}") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        if out.is_dir() and not out.is_symlink():
            out.rmdir()  # empty (checked above); fails if something appeared meanwhile
        move_into_place(work, out)
    except (OSError, UnsafeOperationError) as exc:
        reason = _describe(exc) if isinstance(exc, OSError) else str(exc)
        raise UnsafeOperationError(
            f"cannot move the finished folder into {out} ({reason}); nothing there was "
            f"replaced, and the finished files are in {work}"
        ) from None
    fsync_folder(out.parent)
