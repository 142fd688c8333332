"""Planning renames into rank order: every new name computed and checked first.

Names are compared case-folded (safe on case-insensitive file systems);
length and character checks; no two files mapped to one name; no target
that exists outside the plan; chains ordered and cycles broken with a
temporary name in the same folder. Nothing on disk changes here.
"""

from __future__ import annotations

import os
import stat
import unicodedata
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imgrank.errors import UnsafeOperationError
from imgrank.files.journal import (
    FileIdentity,
    Position,
    StepRecord,
    list_runs,
    new_run_id,
    temp_name,
)
from imgrank.files.name_template import DEFAULT_TEMPLATE, NameTemplate, split_name
from imgrank.ranking import RankedImage

#: Used when the file system does not say (POSIX NAME_MAX and PATH_MAX on Linux).
_DEFAULT_NAME_MAX = 255
_DEFAULT_PATH_MAX = 4096



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
    #: Ranked files left with their names, and why (a link, a file outside the
    #: folder, the target of a link): see :func:`files_to_keep`.
    kept: list[tuple[Path, str]] = field(default_factory=list)

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


def name_key(name: str) -> str:
    """How names are compared: NFC-normalised and case-folded.

    Stricter than any common file system (ext4 is case-sensitive, APFS and
    NTFS are not and may normalise Unicode), so a plan that passes is safe on
    all of them, and on the drive the folder is copied to next.
    """
    return unicodedata.normalize("NFC", name).casefold()


def path_key(path: Path) -> tuple[str, str]:
    return str(path.parent), name_key(path.name)


def absolute_path(path: Path) -> Path:
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
    undos = {r.undoes: r for r in runs if r.kind == "undo" and r.outcome == "applied"}
    known: dict[tuple[str, int, int], str] = {}
    for run in runs:  # oldest first: later runs override
        if run.kind != "sort" or run.outcome != "applied":
            continue
        undo = undos.get(run.run_id)
        # An undo with --skip-changed left some files under the names this run gave them.
        kept = None if undo is None else {item["path"] for item in undo.skipped}
        for step in run.steps:
            if kept is not None and str(step.target) not in kept:
                continue
            known[(str(step.target), step.identity.dev, step.identity.ino)] = step.original_name
    return known


def names_before_renames(paths: list[Path], directory: Path | None = None) -> dict[Path, str]:
    """The name each of ``paths`` had before imgrank renamed it, for those an applied
    (not undone) run renamed; a file never renamed is left out.

    Ties in a ranking are ordered by this name, which a rename does not change, so
    re-sorting a renamed folder by the same prompt renames nothing.
    """
    lineage = _lineage(directory)
    if not lineage:
        return {}
    names: dict[Path, str] = {}
    for path in paths:
        absolute = absolute_path(path)
        try:
            info = os.lstat(absolute)
        except OSError:
            continue
        original = lineage.get((str(absolute), info.st_dev, info.st_ino))
        if original is not None:
            names[path] = original
    return names


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


def _physically_inside(path: Path, folder_real: str, folder_abs: str) -> bool:
    """Whether ``path``'s folder is reached from the scanned folder without a symbolic link."""
    parent = os.path.dirname(os.fspath(path))
    relative = os.path.relpath(parent, folder_abs)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return False
    expected = os.path.normpath(os.path.join(folder_real, relative))
    return os.path.realpath(parent) == expected


def _link_targets(folder: Path) -> set[tuple[int, int]]:
    """(device, inode) of every file a symbolic link inside ``folder`` points to.

    Every sub-folder is looked at, hidden ones and earlier ``--link`` folders
    included; links are not followed into other folders.
    """
    targets: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in files + dirs:
            entry = os.path.join(root, name)
            if not os.path.islink(entry):
                continue
            try:
                info = os.stat(entry)
            except OSError:
                continue  # already dangling: nothing imgrank does can break it
            if stat.S_ISREG(info.st_mode):
                targets.add((info.st_dev, info.st_ino))
    return targets


def files_to_keep(paths: list[Path], folder: Path) -> dict[Path, str]:
    """The ranked files a rename run must leave alone, with the reason shown to the user.

    The rule: renames touch only regular files physically inside the scanned
    folder; symbolic links are never renamed nor followed; a file that a link
    inside the folder points to keeps its name, so no rename leaves a link
    dangling that was not dangling before.
    """
    folder_abs = os.path.abspath(os.fspath(folder))
    folder_real = os.path.realpath(folder_abs)
    linked: set[tuple[int, int]] | None = None
    keep: dict[Path, str] = {}
    for path in paths:
        try:
            info = os.lstat(path)
        except OSError:
            continue  # reported by the planner
        if stat.S_ISLNK(info.st_mode):
            keep[path] = "a symbolic link (links are never renamed, nor what they point to)"
        elif not _physically_inside(path, folder_real, folder_abs):
            keep[path] = "reached through a symbolic link to a folder, so not inside the folder"
        else:
            if linked is None:
                linked = _link_targets(Path(folder_real))
            if (info.st_dev, info.st_ino) in linked:
                keep[path] = "a symbolic link in the folder points to it and would dangle"
    return keep


def plan_renames(
    items: list[RankedImage],
    *,
    template: str | NameTemplate = DEFAULT_TEMPLATE,
    journal_dir: Path | None = None,
    folder: Path | None = None,
) -> RenamePlan:
    """Plan renaming ``items`` into rank order; nothing is changed.

    Args:
        items: The ranking (rank 1 first), e.g. ``Ranking.items``; the RAW of a
            RAW+JPEG pair is renamed with its twin.
        template: The new-name template (see :class:`NameTemplate`).
        journal_dir: Where journals are (default :func:`imgrank.paths.journal_dir`).
        folder: The scanned folder: when given, the files :func:`files_to_keep`
            names keep their names (listed in ``plan.kept``).

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
    # A RAW+JPEG pair is renamed together: both files get the same rank prefix.
    items = [row for item in items for row in item.expanded()]
    count = max(item.rank for item in items)
    if folder is not None:
        keep = files_to_keep([absolute_path(item.path) for item in items], folder)
        plan.kept = list(keep.items())
        items = [item for item in items if absolute_path(item.path) not in keep]
        if not items:
            return plan

    paths = [absolute_path(item.path) for item in items]
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

    width = len(str(count))
    originals = _original_names(paths, identities, tmpl, count, journal_dir)

    limits_by_folder: dict[Path, tuple[int, int]] = {}
    targets: list[Path] = []
    owner_of_target: dict[tuple[str, str], Path] = {}
    for item, path, original in zip(items, paths, originals, strict=True):
        stem, ext = split_name(original)
        name = tmpl.render(rank=item.rank, width=width, score=float(item.score), stem=stem, ext=ext)
        if path.parent not in limits_by_folder:
            limits_by_folder[path.parent] = _limits(path.parent)
        _check_target_name(path, name, limits_by_folder[path.parent])
        target = path.parent / name
        key = path_key(target)
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
    listings = folder_listings({s.source.parent for s in steps})
    leaving: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in steps:
        leaving[path_key(s.source)].add(s.source.name)
    for s in steps:
        key = path_key(s.target)
        staying = listings[s.target.parent].get(key[1], set()) - leaving.get(key, set())
        if staying:
            other = sorted(staying)[0]
            raise UnsafeOperationError(
                f"{s.source.name} would be renamed to {s.target.name}, but "
                f"{s.target.parent / other} "
                "already exists and is not part of this sort; imgrank never overwrites a file. "
                "Nothing was renamed. Move that file away, or choose another --name-template."
            )
        if name_key(s.temp.name) in listings[s.temp.parent]:
            raise UnsafeOperationError(
                f"{s.temp} already exists; nothing was renamed. Remove it and try again."
            )
    plan.moves = order_moves([(s.index, s.source, s.target, s.temp) for s in steps], to="target")
    return plan


def folder_listings(folders: Iterable[Path]) -> dict[Path, dict[str, set[str]]]:
    """Each folder's entry names grouped by :func:`name_key`."""
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
            grouped[name_key(name)].add(name)
        out[folder] = grouped
    return out


def order_moves(entries: list[tuple[int, Path, Path, Path]], *, to: Position) -> list[Move]:
    """Order renames so that no rename needs a name another file still holds.

    Each entry is ``(step, current path, wanted path, temporary path)``. A
    file waits until the file holding its wanted name (compared by
    :func:`name_key`) has moved away; when every remaining file waits on
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
        occupants[path_key(current[step])].add(step)
        waiters[path_key(want[step])].append(step)

    moves: list[Move] = []
    remaining = set(current)
    at_source = set(current)  # still holding the name it started with

    def blocked(step: int) -> bool:
        return bool(occupants.get(path_key(want[step])))

    ready = deque(sorted(s for s in remaining if not blocked(s)))
    queued = set(ready)

    def enqueue(step: int) -> None:
        if step in remaining and step not in queued:
            ready.append(step)
            queued.add(step)

    def leave(step: int) -> None:
        key = path_key(current[step])
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
            step = min(occupants[path_key(want[step])])
        moves.append(Move(step, current[step], temps[step], "temp"))
        leave(step)
        current[step] = temps[step]
        if not blocked(step):
            enqueue(step)
    return moves



def describe_plan(plan: RenamePlan, base: Path) -> Iterator[tuple[str, str]]:
    """``(old, new)`` for each rename, relative to ``base`` where possible, in rank order."""
    root = absolute_path(base)
    if root.is_file():
        root = root.parent
    for item in plan.renames:
        try:
            old = str(item.source.relative_to(root))
            new = str(item.target.relative_to(root))
        except ValueError:
            old, new = str(item.source), str(item.target)
        yield old, new


def plan_moves(
    paths: list[Path],
    root: Path,
    destination: Path,
    *,
    scores: list[float] | None = None,
) -> RenamePlan:
    """Plan moving ``paths`` into ``destination``, keeping their place under ``root``.

    ``root/a/IMG_1.jpg`` goes to ``destination/a/IMG_1.jpg``, so photos of the same
    name in different sub-folders stay apart and the move is easy to read back. Used
    by ``imgrank cull --move-rejects``; the run goes through the same journal as a
    rename, so ``imgrank undo`` and ``imgrank recover`` put the photos back.

    Raises:
        UnsafeOperationError: a photo is gone or listed twice, or a target name exists
            already. Nothing has been changed.
    """
    plan = RenamePlan(run_id=new_run_id(), template="(move)")
    base = absolute_path(root)
    if base.is_file():
        base = base.parent
    out = absolute_path(destination)
    owner_of_target: dict[tuple[str, str], Path] = {}
    seen_inodes: dict[tuple[int, int], Path] = {}
    for index, path in enumerate(absolute_path(p) for p in paths):
        try:
            info = os.lstat(path)
        except OSError as exc:
            raise UnsafeOperationError(
                f"{path} cannot be moved ({exc.strerror or exc}: moved or deleted after the "
                "scan?); nothing was moved"
            ) from None
        inode = (info.st_dev, info.st_ino)
        if inode in seen_inodes:
            raise UnsafeOperationError(
                f"{seen_inodes[inode]} and {path} are the same file; nothing was moved"
            )
        seen_inodes[inode] = path
        try:
            relative = path.relative_to(base)
        except ValueError:
            relative = Path(path.name)
        target = out / relative
        key = path_key(target)
        if key in owner_of_target:
            raise UnsafeOperationError(
                f"{owner_of_target[key]} and {path} would both be moved to {target} (names are "
                "compared ignoring case); nothing was moved"
            )
        owner_of_target[key] = path
        if os.path.lexists(target):
            raise UnsafeOperationError(
                f"{target} already exists; imgrank never overwrites a file. Nothing was moved: "
                "choose an empty folder for --move-rejects."
            )
        plan.renames.append(
            PlannedRename(
                source=path,
                target=target,
                rank=index + 1,
                score=float(scores[index]) if scores is not None else 0.0,
                original_name=path.name,
                identity=FileIdentity(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns),
            )
        )
    steps = plan.steps()
    plan.moves = order_moves([(s.index, s.source, s.target, s.temp) for s in steps], to="target")
    return plan
