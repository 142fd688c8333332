"""Renaming one file without ever replacing another.

``renameat2(RENAME_NOREPLACE)`` on Linux, ``renamex_np(RENAME_EXCL)`` on macOS,
and ``os.link`` + ``os.unlink`` where neither exists: the kernel refuses
the rename when the target name is taken, so no check-then-act race.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCL = 0x00000004  # macOS renamex_np
_renameat2_cache: list[Any] = []


def _renameat2() -> Any:
    """glibc's ``renameat2`` through ctypes, or None where it is missing."""
    if not _renameat2_cache:
        fn = None
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.renameat2
                fn.argtypes = [
                    ctypes.c_int,
                    ctypes.c_char_p,
                    ctypes.c_int,
                    ctypes.c_char_p,
                    ctypes.c_uint,
                ]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _renameat2_cache.append(fn)
    return _renameat2_cache[0]


def _renamex_np() -> Any:
    """macOS's ``renamex_np`` through ctypes, or None."""
    if sys.platform != "darwin":
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


#: errno values meaning "this kernel or file system cannot do a no-replace rename".
_UNSUPPORTED = {
    errno.EINVAL,
    errno.ENOSYS,
    getattr(errno, "ENOTSUP", -1),
    getattr(errno, "EOPNOTSUPP", -2),
}


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, failing if ``target`` exists: never a replacement.

    Uses ``renameat2(RENAME_NOREPLACE)`` on Linux and ``renamex_np(RENAME_EXCL)``
    on macOS, both atomic; Windows' own rename already refuses to replace.
    Elsewhere, or where the file system does not support those, a hard link
    to the new name followed by removing the old name (``link`` also refuses
    an existing target). A crash between the two leaves both names on one
    file, which recovery recognises by inode.

    Raises:
        FileExistsError: ``target`` exists (nothing was changed).
        OSError: the rename failed for another reason (nothing was changed).
    """
    import ctypes

    src, dst = os.fsencode(source), os.fsencode(target)
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _UNSUPPORTED:
            raise OSError(err, os.strerror(err), str(source), None, str(target))
    else:
        fn = _renamex_np()
        if fn is not None:
            if fn(src, dst, _RENAME_EXCL) == 0:
                return
            err = ctypes.get_errno()
            if err not in _UNSUPPORTED:
                raise OSError(err, os.strerror(err), str(source), None, str(target))
        elif os.name == "nt":  # pragma: no cover - Windows' rename never replaces
            os.rename(source, target)
            return
    _link_then_unlink(source, target)


def _link_then_unlink(source: Path, target: Path) -> None:
    """The portable no-replace rename: a second name (refused if taken), then drop the first."""
    os.link(source, target, follow_symlinks=False)
    try:
        os.unlink(source)
    except OSError:
        # Keep the state simple: back to one name, the original.
        with contextlib.suppress(OSError):
            if os.path.samestat(os.lstat(source), os.lstat(target)):
                os.unlink(target)
        raise
