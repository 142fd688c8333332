"""Renaming photos into rank order without ever losing or overwriting one.

The work happens in three separate phases:

1. **Plan** (:func:`plan_renames`): every new name is computed and checked
   before anything changes: absolute paths; names compared case-folded (so a
   plan is also safe on case-insensitive file systems); length and character
   checks; no two files mapped to one name; no target that already exists
   outside the plan; chains (a->b, b->c) ordered, and cycles (a->b, b->a)
   broken with a temporary name in the same folder.
2. **Apply** (:func:`apply_plan`): a journal (:mod:`imgrank.journal`) is
   fsynced before the first rename; each rename refuses to replace an existing
   path (``renameat2(RENAME_NOREPLACE)`` on Linux, ``os.link`` + ``os.unlink``
   elsewhere) and re-checks the file's identity (inode, size, mtime) first.
   On any error the renames already done are reversed before the error is
   raised, and the message says so.
3. **Undo / recover** (:func:`undo`, :func:`recover`): a finished run is put
   back (refusing when a file was moved, deleted or replaced since); an
   interrupted run is rolled back (or forward) by finding each file by inode
   at the few names it can have.

Re-sorting a renamed folder replaces the old rank prefix instead of stacking
a new one: the journals remember each file's name before imgrank touched it
(its "original name"), and without journals (a folder copied from elsewhere)
a folder in which every photo already carries a distinct rank prefix in the
template's form is recognised as such.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import string
import sys
import unicodedata
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from imgrank.errors import UnsafeOperationError, UsageError
from imgrank.journal import (
    FileIdentity,
    JournalError,
    JournalWriter,
    Position,
    RunRecord,
    StepRecord,
    check_no_unfinished_run,
    find_run,
    identity_or_none,
    is_in_progress,
    list_runs,
    new_run_id,
    reopen,
    temp_name,
    unfinished_runs,
)
from imgrank.ranking import RankedImage

#: ``<rank>_<original name>``, the rank zero-padded to the width the folder needs.
DEFAULT_TEMPLATE = "{rank}_{stem}{ext}"
TEMPLATE_FIELDS = ("rank", "score", "stem", "ext")

#: Used when the file system does not say (POSIX NAME_MAX and PATH_MAX on Linux).
_DEFAULT_NAME_MAX = 255
_DEFAULT_PATH_MAX = 4096


class RenameFailedError(UnsafeOperationError):
    """A rename run stopped on an error; what was done has been reversed."""


class RenameInterruptedError(RenameFailedError):
    """A rename run was interrupted with Ctrl-C; what was done has been reversed."""

    exit_code = 130


# --------------------------------------------------------------------------- templates


_SCORE_PATTERN = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"


@dataclass(frozen=True)
class NameTemplate:
    """A ``--name-template`` such as ``{rank}_{stem}{ext}``, validated.

    Fields: ``{rank}`` (zero-padded to the width the ranking needs unless a
    format spec such as ``{rank:05d}`` is given), ``{score}`` (four decimals
    unless a spec is given), ``{stem}`` and ``{ext}`` (the original name
    without and with only its extension, ``.jpg`` including the dot).
    """

    text: str

    @classmethod
    def parse(cls, text: str) -> NameTemplate:
        """Check a template and return it.

        Raises:
            UsageError: unknown fields, bad braces, a path separator, a
                control character, or no ``{ext}`` (a photo that loses its
                extension is no longer recognised as a photo).
        """
        try:
            pieces = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise UsageError(f"--name-template {text!r} is not a valid template: {exc}") from None
        names = set()
        for literal, name, _spec, conversion in pieces:
            _check_template_literal(text, literal)
            if name is None:
                continue
            if name not in TEMPLATE_FIELDS:
                shown = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
                raise UsageError(
                    f"--name-template {text!r}: unknown field {{{name}}}; the fields are {shown}"
                )
            if conversion is not None:
                raise UsageError(
                    f"--name-template {text!r}: conversions such as !r are not supported"
                )
            names.add(name)
        if "ext" not in names:
            raise UsageError(
                f"--name-template {text!r} drops the file extension; add {{ext}} "
                '(e.g. "{rank}_{stem}{ext}") so the photos stay recognisable'
            )
        template = cls(text)
        try:
            template.render(rank=1, width=1, score=0.5, stem="photo", ext=".jpg")
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--name-template {text!r}: {exc}") from None
        return template

    @property
    def fields(self) -> set[str]:
        """The field names the template uses."""
        return {name for _, name, _, _ in string.Formatter().parse(self.text) if name}

    def render(self, *, rank: int, width: int, score: float, stem: str, ext: str) -> str:
        """The new name of one file."""
        out = []
        for literal, name, spec, _conversion in string.Formatter().parse(self.text):
            out.append(literal)
            if name == "rank":
                out.append(format(rank, spec) if spec else f"{rank:0{width}d}")
            elif name == "score":
                out.append(format(score, spec) if spec else f"{score:.4f}")
            elif name == "stem":
                out.append(format(stem, spec))
            elif name == "ext":
                out.append(format(ext, spec))
        return "".join(out)

    def match(self, name: str) -> tuple[int | None, str] | None:
        """If ``name`` looks like this template's output, its rank and original name.

        Only templates with both ``{stem}`` and ``{ext}`` can give the
        original name back; for others this returns None.
        """
        if not {"stem", "ext"} <= self.fields:
            return None
        pattern = []
        seen: set[str] = set()
        for literal, field_name, _spec, _conversion in string.Formatter().parse(self.text):
            pattern.append(re.escape(literal))
            if field_name is None:
                continue
            if field_name in seen:
                pattern.append(f"(?P={field_name})")
                continue
            seen.add(field_name)
            group = {
                "rank": r"\d+",
                "score": _SCORE_PATTERN,
                "stem": r".+?",
                "ext": r"(?:\.[^.]*)?",
            }[field_name]
            pattern.append(f"(?P<{field_name}>{group})")
        found = re.fullmatch("".join(pattern), name, flags=re.DOTALL)
        if found is None:
            return None
        stem, ext = found.group("stem"), found.group("ext")
        original = stem + ext
        # The original must split back into the same stem and extension.
        if _split_name(original) != (stem, ext):
            return None
        rank = int(found.group("rank")) if "rank" in seen else None
        return rank, original


def _check_template_literal(text: str, literal: str) -> None:
    for sep in filter(None, (os.sep, os.altsep, "/")):
        if sep in literal:
            raise UsageError(
                f"--name-template {text!r} contains {sep!r}: it names a file in the same "
                "folder, not a path"
            )
    if any(unicodedata.category(ch) == "Cc" for ch in literal):
        raise UsageError(f"--name-template {text!r} contains a control character")


def _split_name(name: str) -> tuple[str, str]:
    """``("IMG_1", ".jpg")`` for ``IMG_1.jpg``, as :class:`pathlib.Path` splits it."""
    ext = Path(name).suffix
    return (name[: -len(ext)] if ext else name), ext


# --------------------------------------------------------------------------- no-overwrite rename

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


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class PlannedRename:
    """One file that gets a new name.

    Attributes:
        source: Absolute path now.
        target: Absolute path after the run.
        rank: The file's rank (1 = first).
        score: The file's score.
        original_name: The name before any imgrank rank prefix.
        identity: The file's identity at planning time (re-checked before moving it).
    """

    source: Path
    target: Path
    rank: int
    score: float
    original_name: str
    identity: FileIdentity


@dataclass(frozen=True)
class Move:
    """One rename call: step ``step``'s file from ``source`` to ``target``.

    ``to`` says which of the file's names ``target`` is.
    """

    step: int
    source: Path
    target: Path
    to: Position


@dataclass
class RenamePlan:
    """Every rename of one run, checked, in a safe order.

    Attributes:
        run_id: Id the journal will carry.
        template: The name template.
        renames: Files that get a new name, in rank order.
        unchanged: Files whose name already is the planned one.
        moves: The rename calls in execution order (more than ``renames``
            when cycles need a temporary name).
    """

    run_id: str
    template: str
    renames: list[PlannedRename] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        """Nothing to rename (e.g. the folder is already in this order)."""
        return not self.renames

    def steps(self) -> list[StepRecord]:
        """The journal records of this plan."""
        return [
            StepRecord(
                index=i,
                source=r.source,
                target=r.target,
                temp=r.source.parent / temp_name(self.run_id, i),
                identity=r.identity,
                original_name=r.original_name,
            )
            for i, r in enumerate(self.renames)
        ]


def _name_key(name: str) -> str:
    """How names are compared: NFC-normalised and case-folded.

    Stricter than any common file system (ext4 is case-sensitive, APFS and
    NTFS are not and may normalise Unicode), so a plan that passes is safe on
    all of them, and on the drive the folder is copied to next.
    """
    return unicodedata.normalize("NFC", name).casefold()


def _path_key(path: Path) -> tuple[str, str]:
    return str(path.parent), _name_key(path.name)


def _absolute(path: Path) -> Path:
    # abspath, not resolve(): a symlink is renamed as the link it is, in the folder it is in.
    return Path(os.path.abspath(os.fspath(path)))


def _limits(folder: Path) -> tuple[int, int]:
    def conf(name: str, default: int) -> int:
        try:
            value = os.pathconf(folder, name)
        except (OSError, ValueError, AttributeError):
            return default
        return value if value and value > 0 else default

    return conf("PC_NAME_MAX", _DEFAULT_NAME_MAX), conf("PC_PATH_MAX", _DEFAULT_PATH_MAX)


def _check_target_name(source: Path, name: str, limits: tuple[int, int]) -> None:
    name_max, path_max = limits
    if name in ("", ".", ".."):
        raise UnsafeOperationError(
            f"the new name of {source} would be {name!r}, which is not a file name"
        )
    if "\0" in name or "/" in name or (os.sep in name) or (os.altsep and os.altsep in name):
        raise UnsafeOperationError(
            f"the new name of {source} would contain a path separator: {name!r}"
        )
    if name.startswith("."):
        raise UnsafeOperationError(
            f"the new name of {source} would start with a dot ({name!r}), which hides the file; "
            "choose a --name-template that starts with something else"
        )
    size = len(os.fsencode(name))
    if size > name_max:
        raise UnsafeOperationError(
            f"the new name of {source} would be {size} bytes long, more than the {name_max} "
            "this file system allows; nothing was renamed. Use a shorter --name-template "
            '(e.g. "{rank}{ext}") or shorten that file\'s name'
        )
    full = len(os.fsencode(source.parent / name))
    if full >= path_max:
        raise UnsafeOperationError(
            f"the new path of {source} would be {full} bytes long, more than the {path_max} "
            "this system allows; nothing was renamed"
        )


def _lineage(directory: Path | None) -> dict[tuple[str, int, int], str]:
    """``(path, dev, inode) -> original name`` for files an applied, not undone run renamed."""
    runs = list_runs(directory)
    undone = {r.undoes for r in runs if r.kind == "undo" and r.outcome == "applied"}
    known: dict[tuple[str, int, int], str] = {}
    for run in runs:  # oldest first: later runs override
        if run.kind != "sort" or run.outcome != "applied" or run.run_id in undone:
            continue
        for step in run.steps:
            known[(str(step.target), step.identity.dev, step.identity.ino)] = step.original_name
    return known


def _original_names(
    paths: list[Path],
    identities: list[FileIdentity],
    template: NameTemplate,
    count: int,
    directory: Path | None,
) -> list[str]:
    """The name each file had before imgrank prefixed it (its own name if never)."""
    lineage = _lineage(directory)
    originals: list[str | None] = [
        lineage.get((str(p), ident.dev, ident.ino))
        for p, ident in zip(paths, identities, strict=True)
    ]
    if "rank" not in template.fields:
        return [o if o is not None else p.name for o, p in zip(originals, paths, strict=True)]
    # Without a journal: a folder whose every (unknown) photo carries a distinct
    # rank prefix in the template's form, no larger than the ranking, was sorted before.
    by_folder: dict[Path, list[int]] = defaultdict(list)
    for i, (path, original) in enumerate(zip(paths, originals, strict=True)):
        if original is None:
            by_folder[path.parent].append(i)
    for indices in by_folder.values():
        parsed = [template.match(paths[i].name) for i in indices]
        if any(p is None or p[0] is None for p in parsed):
            continue
        ranks = [p[0] for p in parsed if p is not None]
        if len(set(ranks)) == len(ranks) and all(r is not None and 1 <= r <= count for r in ranks):
            for i, p in zip(indices, parsed, strict=True):
                assert p is not None
                originals[i] = p[1]
    return [o if o is not None else p.name for o, p in zip(originals, paths, strict=True)]


def plan_renames(
    items: list[RankedImage],
    *,
    template: str | NameTemplate = DEFAULT_TEMPLATE,
    journal_dir: Path | None = None,
) -> RenamePlan:
    """Plan renaming ``items`` into rank order; nothing is changed.

    Args:
        items: The ranking (rank 1 first), e.g. ``Ranking.items``.
        template: The new-name template (see :class:`NameTemplate`).
        journal_dir: Where journals are (default :func:`imgrank.paths.journal_dir`).

    Returns:
        The plan; empty when every file already has its planned name.

    Raises:
        UsageError: the template is invalid.
        UnsafeOperationError: the plan would map two files to one name, use a
            name that exists outside the plan, a too long name, a missing file...
            Nothing has been changed.
    """
    tmpl = template if isinstance(template, NameTemplate) else NameTemplate.parse(template)
    plan = RenamePlan(run_id=new_run_id(), template=tmpl.text)
    if not items:
        return plan

    paths = [_absolute(item.path) for item in items]
    identities: list[FileIdentity] = []
    seen_paths: dict[Path, int] = {}
    seen_inodes: dict[tuple[int, int], Path] = {}
    for path in paths:
        if path in seen_paths:
            raise UnsafeOperationError(f"{path} is in the ranking twice; nothing was renamed")
        seen_paths[path] = len(identities)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise UnsafeOperationError(
                f"{path} no longer exists (moved or deleted after the scan); nothing was renamed. "
                "Run the sort again."
            ) from None
        except OSError as exc:
            raise UnsafeOperationError(
                f"cannot examine {path}: {exc.strerror or exc}; nothing was renamed"
            ) from None
        if stat.S_ISDIR(info.st_mode):
            raise UnsafeOperationError(f"{path} is a folder, not a photo; nothing was renamed")
        inode = (info.st_dev, info.st_ino)
        if inode in seen_inodes:
            raise UnsafeOperationError(
                f"{seen_inodes[inode]} and {path} are the same file (hard links); imgrank renames "
                "each file once, so remove one of the two names from the folder first. "
                "Nothing was renamed."
            )
        seen_inodes[inode] = path
        identities.append(FileIdentity(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))

    count = max(item.rank for item in items)
    width = len(str(count))
    originals = _original_names(paths, identities, tmpl, count, journal_dir)

    limits_by_folder: dict[Path, tuple[int, int]] = {}
    targets: list[Path] = []
    owner_of_target: dict[tuple[str, str], Path] = {}
    for item, path, original in zip(items, paths, originals, strict=True):
        stem, ext = _split_name(original)
        name = tmpl.render(rank=item.rank, width=width, score=float(item.score), stem=stem, ext=ext)
        if path.parent not in limits_by_folder:
            limits_by_folder[path.parent] = _limits(path.parent)
        _check_target_name(path, name, limits_by_folder[path.parent])
        target = path.parent / name
        key = _path_key(target)
        if key in owner_of_target:
            raise UnsafeOperationError(
                f"{owner_of_target[key]} and {path} would both be named {name!r} "
                "(names are compared ignoring case); nothing was renamed. Use a --name-template "
                "with {rank} so every name is different."
            )
        owner_of_target[key] = path
        targets.append(target)

    moving = [i for i, (p, t) in enumerate(zip(paths, targets, strict=True)) if p != t]
    plan.unchanged = [paths[i] for i in range(len(paths)) if paths[i] == targets[i]]
    plan.renames = [
        PlannedRename(
            source=paths[i],
            target=targets[i],
            rank=items[i].rank,
            score=float(items[i].score),
            original_name=originals[i],
            identity=identities[i],
        )
        for i in moving
    ]
    if not plan.renames:
        return plan

    steps = plan.steps()
    listings = _listings({s.source.parent for s in steps})
    leaving: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in steps:
        leaving[_path_key(s.source)].add(s.source.name)
    for s in steps:
        key = _path_key(s.target)
        staying = listings[s.target.parent].get(key[1], set()) - leaving.get(key, set())
        if staying:
            other = sorted(staying)[0]
            raise UnsafeOperationError(
                f"{s.source.name} would be renamed to {s.target.name}, but "
                f"{s.target.parent / other} "
                "already exists and is not part of this sort; imgrank never overwrites a file. "
                "Nothing was renamed. Move that file away, or choose another --name-template."
            )
        if _name_key(s.temp.name) in listings[s.temp.parent]:
            raise UnsafeOperationError(
                f"{s.temp} already exists; nothing was renamed. Remove it and try again."
            )
    plan.moves = order_moves([(s.index, s.source, s.target, s.temp) for s in steps], to="target")
    return plan


def _listings(folders: Iterable[Path]) -> dict[Path, dict[str, set[str]]]:
    """Each folder's entry names grouped by :func:`_name_key`."""
    out: dict[Path, dict[str, set[str]]] = {}
    for folder in folders:
        grouped: dict[str, set[str]] = defaultdict(set)
        try:
            names = os.listdir(folder)
        except OSError as exc:
            raise UnsafeOperationError(
                f"cannot list {folder}: {exc.strerror or exc}; nothing was renamed"
            ) from None
        for name in names:
            grouped[_name_key(name)].add(name)
        out[folder] = grouped
    return out


def order_moves(entries: list[tuple[int, Path, Path, Path]], *, to: Position) -> list[Move]:
    """Order renames so that no rename needs a name another file still holds.

    Each entry is ``(step, current path, wanted path, temporary path)``. A
    file waits until the file holding its wanted name (compared by
    :func:`_name_key`) has moved away; when every remaining file waits on
    another (a cycle, or a change of case only), one of them first moves to
    its temporary name. Deterministic: ties are broken by step number.

    Args:
        entries: The files to move.
        to: What the wanted names are (``target`` for a run, ``source`` when putting back).
    """
    current = {step: cur for step, cur, _want, _tmp in entries}
    want = {step: w for step, _cur, w, _tmp in entries}
    temps = {step: t for step, _cur, _want, t in entries}
    occupants: dict[tuple[str, str], set[int]] = defaultdict(set)
    waiters: dict[tuple[str, str], list[int]] = defaultdict(list)
    for step in sorted(current):
        occupants[_path_key(current[step])].add(step)
        waiters[_path_key(want[step])].append(step)

    moves: list[Move] = []
    remaining = set(current)
    at_source = set(current)  # still holding the name it started with

    def blocked(step: int) -> bool:
        return bool(occupants.get(_path_key(want[step])))

    ready = deque(sorted(s for s in remaining if not blocked(s)))
    queued = set(ready)

    def enqueue(step: int) -> None:
        if step in remaining and step not in queued:
            ready.append(step)
            queued.add(step)

    def leave(step: int) -> None:
        key = _path_key(current[step])
        occupants[key].discard(step)
        at_source.discard(step)
        if not occupants[key]:
            for waiter in waiters.get(key, []):
                enqueue(waiter)

    while remaining:
        while ready:
            step = ready.popleft()
            queued.discard(step)
            if step not in remaining or blocked(step):
                continue
            moves.append(Move(step, current[step], want[step], to))
            remaining.discard(step)
            if step in at_source:
                leave(step)
            current[step] = want[step]
        if not remaining:
            break
        # Every remaining file waits on one still at its starting name: follow
        # the chain of waits from the smallest step until it repeats (a cycle).
        step = min(remaining)
        visited: list[int] = []
        while step not in visited:
            visited.append(step)
            step = min(occupants[_path_key(want[step])])
        moves.append(Move(step, current[step], temps[step], "temp"))
        leave(step)
        current[step] = temps[step]
        if not blocked(step):
            enqueue(step)
    return moves


# --------------------------------------------------------------------------- applying


@dataclass
class RunResult:
    """What one rename run did.

    Attributes:
        run_id: The run's id (for ``imgrank undo RUN_ID``); None if nothing had to move.
        journal: The journal file, None if nothing had to move.
        renamed: How many files got a new name.
    """

    run_id: str | None
    journal: Path | None
    renamed: int


def apply_plan(
    plan: RenamePlan,
    *,
    folder: Path,
    prompt: str = "",
    journal_dir: Path | None = None,
) -> RunResult:
    """Execute a plan: journal first, then each rename, reversed on any error.

    Args:
        plan: From :func:`plan_renames`.
        folder: The folder that was sorted (recorded in the journal).
        prompt: The ``--by`` text (recorded in the journal).
        journal_dir: Where journals are (default :func:`imgrank.paths.journal_dir`).

    Raises:
        UnfinishedRunError: an earlier run was interrupted; ``imgrank recover`` first.
        RenameFailedError: a rename failed (a file changed or a target appeared
            meanwhile...); every rename already done has been reversed.
    """
    check_no_unfinished_run(journal_dir)
    if plan.is_empty:
        return RunResult(None, None, 0)
    steps = plan.steps()
    writer = JournalWriter.create(
        run_id=plan.run_id,
        kind="sort",
        folder=_absolute(folder),
        steps=steps,
        prompt=prompt,
        template=plan.template,
        directory=journal_dir,
    )
    _execute(writer, steps, plan.moves)
    return RunResult(plan.run_id, writer.path, len(steps))


def _identity_problem(path: Path, expected: FileIdentity, *, strict: bool) -> str | None:
    """Why the file at ``path`` is not the one we planned to move, or None if it is."""
    now = identity_or_none(path)
    if now is None:
        return f"{path} disappeared (moved or deleted by another program)"
    if not now.same_inode(expected):
        return f"{path} was replaced by a different file"
    if strict and (now.size, now.mtime_ns) != (expected.size, expected.mtime_ns):
        return f"{path} changed (its size or modification time) after imgrank planned the renames"
    return None


def _fsync_folders(folders: Iterable[Path]) -> None:
    from imgrank.journal import _fsync_dir

    for folder in set(folders):
        _fsync_dir(folder)


def _execute(writer: JournalWriter, steps: list[StepRecord], moves: list[Move]) -> None:
    """Run ``moves``; on any error or interruption put everything back, then raise."""
    done = 0
    try:
        for move in moves:
            step = steps[move.step]
            problem = _identity_problem(move.source, step.identity, strict=True)
            if problem is not None:
                raise RenameFailedError(problem)
            try:
                rename_noreplace(move.source, move.target)
            except FileExistsError:
                raise RenameFailedError(
                    f"{move.target} appeared after imgrank planned the renames (another program "
                    "created it); it was not overwritten"
                ) from None
            except OSError as exc:
                raise RenameFailedError(
                    f"cannot rename {move.source} to {move.target.name}: {exc.strerror or exc}"
                ) from None
            done += 1
            writer.record_moved(move.step, move.to)
        # Make the new names durable before the journal says the run is complete.
        _fsync_folders(s.source.parent for s in steps)
        writer.finish("completed", "applied")
    except BaseException as exc:
        problems = _settle(steps, "source", writer)
        if not problems:
            with contextlib.suppress(JournalError):
                writer.finish("rolled_back", "restored")
        # Otherwise the journal stays open: `imgrank recover` can try again once
        # whatever stood in the way is gone, and until then nothing else writes.
        writer.close()
        if isinstance(exc, (Exception, KeyboardInterrupt)):
            raise _failure(exc, done, len(moves), problems, writer.path) from None
        raise


def _failure(
    exc: BaseException, done: int, total: int, problems: list[str], journal: Path
) -> RenameFailedError:
    if isinstance(exc, KeyboardInterrupt):
        head = f"interrupted at rename {done + 1} of {total}"
        cls: type[RenameFailedError] = RenameInterruptedError
    else:
        reason = str(exc) or type(exc).__name__
        head = f"renaming stopped at rename {done + 1} of {total}: {reason}"
        cls = RenameFailedError
    if not problems:
        return cls(
            f"{head}. The {done} rename(s) already made were reversed, so every photo has its "
            f"original name again; nothing was lost or overwritten. (Journal: {journal})"
        )
    listed = "\n".join(f"  - {p}" for p in problems)
    return cls(
        f"{head}. imgrank reversed what it could, but not every name could be put back; no file "
        f"was overwritten or deleted, and these are where they are now:\n{listed}\n"
        "Run `imgrank recover` to try again to put them back (or move them yourself, then "
        f"run it to close the run). (Journal: {journal})"
    )


def _locate(step: StepRecord) -> list[Position]:
    """Where the step's file is: the names among source, temp and target that hold its inode."""
    found: list[Position] = []
    for position in ("source", "temp", "target"):
        now = identity_or_none(step.position(position))  # type: ignore[arg-type]
        if now is not None and now.same_inode(step.identity):
            found.append(position)  # type: ignore[arg-type]
    return found


def _settle(
    steps: list[StepRecord], want: Literal["source", "target"], writer: JournalWriter | None
) -> list[str]:
    """Move every file of a run to its ``want`` name, wherever it is now; never overwrites.

    Used to roll back a failed run, and by recovery in either direction. It
    trusts only the file system: each file is found by inode at its source,
    temporary or target name. Files that cannot be moved are left where they
    are and described in the returned list (empty when all went well).
    """
    problems: list[str] = []
    entries: dict[int, tuple[Path, Path]] = {}
    for step in steps:
        found = _locate(step)
        desired = step.position(want)
        if not found:
            problems.append(
                f"{step.source} (renamed to {step.target.name}) is at none of its names; "
                "something other than imgrank moved or deleted it"
            )
            continue
        if len(found) > 1:
            # A link-then-unlink rename cut between its halves: two names, one file.
            keep: Position = want if want in found else found[0]
            for extra in found:
                if extra != keep:
                    with contextlib.suppress(OSError):
                        if os.path.samestat(
                            os.lstat(step.position(extra)), os.lstat(step.position(keep))
                        ):
                            os.unlink(step.position(extra))
            found = [keep]
        if found[0] != want:
            entries[step.index] = (step.position(found[0]), desired)

    # A wanted name now held by a file outside the run blocks that file, and in
    # turn whatever wanted the name the blocked file keeps holding.
    # Names are compared by key: on a case-insensitive file system "A.jpg" is held by "a.jpg".
    current_names = {_path_key(cur) for cur, _ in entries.values()}
    changed = True
    while changed:
        changed = False
        for index, (cur, desired) in list(entries.items()):
            if os.path.lexists(desired) and _path_key(desired) not in current_names:
                problems.append(
                    f"{cur} could not get back its name {desired.name}: another file now has "
                    "that name"
                )
                del entries[index]
                changed = True
        current_names = {_path_key(cur) for cur, _ in entries.values()}

    by_index = {s.index: s for s in steps}
    moves = order_moves(
        [(i, cur, desired, by_index[i].temp) for i, (cur, desired) in sorted(entries.items())],
        to=want,
    )
    failed: set[int] = set()
    for move in moves:
        if move.step in failed:
            continue
        step = by_index[move.step]
        problem = _identity_problem(move.source, step.identity, strict=False)
        try:
            if problem is not None:
                raise OSError(problem)
            rename_noreplace(move.source, move.target)
        except OSError as exc:
            failed.add(move.step)
            found = _locate(step)
            where = step.position(found[0]) if found else "an unknown place"
            problems.append(
                f"{step.source.name} is at {where}; it could not be moved to {move.target.name}: "
                f"{exc.strerror or exc}"
            )
            continue
        if writer is not None:
            with contextlib.suppress(JournalError):
                writer.record_moved(move.step, move.to)
    _fsync_folders(s.source.parent for s in steps)
    return problems


# --------------------------------------------------------------------------- undo


def _undone_by(runs: list[RunRecord]) -> dict[str, str]:
    return {
        r.undoes: r.run_id for r in runs if r.kind == "undo" and r.outcome == "applied" and r.undoes
    }


def undo(run_id: str | None = None, *, journal_dir: Path | None = None) -> RunResult:
    """Give the files of a finished run their names back.

    Args:
        run_id: The run (a unique prefix is enough); None for the latest
            rename run that has not been undone.
        journal_dir: Where journals are (default :func:`imgrank.paths.journal_dir`).

    Raises:
        UnfinishedRunError: an interrupted run must be recovered first.
        UnsafeOperationError: the run cannot be undone (a file was moved,
            deleted or replaced since, an old name is taken...); nothing changed.
        RenameFailedError: a rename failed midway; what was done was reversed.
    """
    check_no_unfinished_run(journal_dir)
    runs = list_runs(journal_dir)
    undone = _undone_by(runs)
    if run_id is None:
        candidates = [
            r
            for r in runs
            if r.kind == "sort" and r.outcome == "applied" and r.run_id not in undone
        ]
        if not candidates:
            raise UnsafeOperationError(
                "there is no rename run left to undo (`imgrank runs` lists past runs)"
            )
        run = candidates[-1]
    else:
        run = find_run(run_id, journal_dir)
        if run.kind != "sort":
            raise UnsafeOperationError(
                f"run {run.run_id} is itself an undo (of {run.undoes}); sort the folder again "
                "instead"
            )
        if run.run_id in undone:
            raise UnsafeOperationError(
                f"run {run.run_id} was already undone (by run {undone[run.run_id]})"
            )
        if run.outcome != "applied":
            raise UnsafeOperationError(
                f"run {run.run_id} did not rename anything in the end "
                f"(it was {run.status.replace('_', ' ')}); "
                "there is nothing to undo"
            )

    problems = []
    identities: list[FileIdentity] = []
    renamed_again: dict[str, int] = defaultdict(int)
    for step in run.steps:
        now = identity_or_none(step.target)
        if now is None:
            later = _later_mover(runs, run, step)
            if later is not None:
                renamed_again[later] += 1
            else:
                problems.append(f"{step.target} no longer exists: it was moved or deleted since")
        elif now != step.identity:
            # Size and mtime too, not only the inode: a file deleted and re-created
            # at once often gets the same inode number back.
            problems.append(
                f"{step.target} is not the file imgrank renamed: it was replaced or modified "
                "since (its inode, size or modification time differ)"
            )
        else:
            identities.append(now)
    for later, count in renamed_again.items():
        problems.insert(
            0,
            f"{count} of its file(s) were renamed again by the later run {later}; "
            f"undo that one first (`imgrank undo {later}`)",
        )
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise UnsafeOperationError(
            f"cannot undo run {run.run_id}: imgrank only renames back files it can be sure are the "
            f"ones it renamed. Nothing was changed.\n{listed}"
        )

    new_id = new_run_id()
    steps = [
        StepRecord(
            index=i,
            source=old.target,
            target=old.source,
            temp=old.target.parent / temp_name(new_id, i),
            identity=ident,
            original_name=old.original_name,
        )
        for i, (old, ident) in enumerate(zip(run.steps, identities, strict=True))
    ]
    listings = _listings({s.source.parent for s in steps})
    leaving: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in steps:
        leaving[_path_key(s.source)].add(s.source.name)
    taken = []
    for s in steps:
        key = _path_key(s.target)
        if listings[s.target.parent].get(key[1], set()) - leaving.get(key, set()):
            taken.append(f"{s.target.name} (for {s.source.name}) is now taken by another file")
    if taken:
        listed = "\n".join(f"  - {p}" for p in taken)
        raise UnsafeOperationError(
            f"cannot undo run {run.run_id} without overwriting files; nothing was changed. "
            f"Move these away and try again:\n{listed}"
        )
    moves = order_moves([(s.index, s.source, s.target, s.temp) for s in steps], to="target")
    writer = JournalWriter.create(
        run_id=new_id,
        kind="undo",
        folder=Path(run.folder),
        steps=steps,
        prompt=run.prompt,
        template=run.template,
        undoes=run.run_id,
        directory=journal_dir,
    )
    _execute(writer, steps, moves)
    return RunResult(new_id, writer.path, len(steps))


def _later_mover(runs: list[RunRecord], run: RunRecord, step: StepRecord) -> str | None:
    """The id of a later, still applied run that renamed this file again, if any."""
    undone = _undone_by(runs)
    later = False
    for other in runs:
        if other.run_id == run.run_id:
            later = True
            continue
        if not later or other.outcome != "applied" or other.run_id in undone:
            continue
        for s in other.steps:
            if s.source == step.target and s.identity.same_inode(step.identity):
                return other.run_id
    return None


# --------------------------------------------------------------------------- recovery


@dataclass
class RecoveryReport:
    """What ``imgrank recover`` did for one interrupted run.

    Attributes:
        run_id: The run.
        folder: Its folder.
        direction: ``back`` (original names) or ``forward`` (finished).
        files: Files the run covers.
        problems: Files that could not be put in place, with where they are.
        started: Whether any rename had been started (False: the journal was
            written but nothing had moved yet).
    """

    run_id: str
    folder: str
    direction: Literal["back", "forward"]
    files: int
    problems: list[str]
    started: bool


def recover(*, forward: bool = False, journal_dir: Path | None = None) -> list[RecoveryReport]:
    """Settle every interrupted run: roll it back (default) or finish it (``forward``).

    Each file is found by inode at its source, temporary or target name and
    moved, without ever overwriting, to its original name (or its new one).
    Safe to run again if it is itself interrupted.

    Raises:
        UnsafeOperationError: another imgrank process is renaming right now.
    """
    reports = []
    runs = unfinished_runs(journal_dir)
    for run in runs:
        if is_in_progress(run):
            raise UnsafeOperationError(
                f"run {run.run_id} is still in progress in another imgrank process "
                f"(pid {run.pid}); "
                "wait for it to finish"
            )
    # Roll back newest first (a later run may have started from an earlier one's
    # names); finish forward oldest first.
    for run in runs if forward else list(reversed(runs)):
        with reopen(run) as writer:
            if not run.begun:
                writer.finish("abandoned", "restored")
                reports.append(
                    RecoveryReport(run.run_id, run.folder, "back", len(run.steps), [], False)
                )
                continue
            want: Literal["source", "target"] = "target" if forward else "source"
            problems = _settle(run.steps, want, writer)
            outcome = ("applied" if forward else "restored") if not problems else "partial"
            writer.finish("recovered", outcome, problems)
            reports.append(
                RecoveryReport(
                    run.run_id,
                    run.folder,
                    "forward" if forward else "back",
                    len(run.steps),
                    problems,
                    True,
                )
            )
    return reports


def describe_plan(plan: RenamePlan, base: Path) -> Iterator[tuple[str, str]]:
    """``(old, new)`` for each rename, relative to ``base`` where possible, in rank order."""
    root = _absolute(base)
    if root.is_file():
        root = root.parent
    for item in plan.renames:
        try:
            old = str(item.source.relative_to(root))
            new = str(item.target.relative_to(root))
        except ValueError:
            old, new = str(item.source), str(item.target)
        yield old, new
