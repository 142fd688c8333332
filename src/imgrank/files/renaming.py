"""Renaming photos into rank order without ever losing or overwriting one.

The work happens in three separate phases:

1. **Plan** (:func:`plan_renames`): every new name is computed and checked
   before anything changes: absolute paths; names compared case-folded (so a
   plan is also safe on case-insensitive file systems); length and character
   checks; no two files mapped to one name; no target that already exists
   outside the plan; chains (a->b, b->c) ordered, and cycles (a->b, b->a)
   broken with a temporary name in the same folder.
2. **Apply** (:func:`apply_plan`): a journal (:mod:`imgrank.files.journal`) is
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
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imgrank.errors import UnsafeOperationError
from imgrank.files.journal import (
    FileIdentity,
    JournalError,
    JournalWriter,
    Position,
    RunKind,
    RunRecord,
    StepRecord,
    check_no_unfinished_run,
    find_run,
    identity_or_none,
    is_in_progress,
    list_runs,
    locate,
    new_run_id,
    reopen,
    temp_name,
    unfinished_runs,
)
from imgrank.files.noreplace import rename_noreplace
from imgrank.files.rename_plan import (
    Move,
    RenamePlan,
    absolute_path,
    folder_listings,
    order_moves,
    path_key,
)


class RenameFailedError(UnsafeOperationError):
    """A rename run stopped on an error; what was done has been reversed."""


class RenameInterruptedError(RenameFailedError):
    """A rename run was interrupted with Ctrl-C; what was done has been reversed."""

    exit_code = 130


@dataclass
class RunResult:
    """What one rename run did.

    Attributes:
        run_id: The run's id (for ``imgrank undo RUN_ID``); None if nothing had to move.
        journal: The journal file, None if nothing had to move.
        renamed: How many files got a new name.
        sidecars: How many XMP sidecars were put back (undo of an ``xmp`` run).
        skipped: Undo with ``skip_changed``: each file left as it was, and why.
    """

    run_id: str | None
    journal: Path | None
    renamed: int
    sidecars: int = 0
    skipped: list[str] = field(default_factory=list)


def apply_plan(
    plan: RenamePlan,
    *,
    folder: Path,
    prompt: str = "",
    journal_dir: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    kind: RunKind = "sort",
) -> RunResult:
    """Execute a plan: journal first, then each rename, reversed on any error.

    Args:
        plan: From :func:`plan_renames`.
        folder: The folder that was sorted (recorded in the journal).
        prompt: The ``--by`` text (recorded in the journal).
        journal_dir: Where journals are (default :func:`imgrank.paths.journal_dir`).
        should_stop: Polled before the journal is written and before each rename
            (a front end holding Ctrl-C off sets it): when true, the run stops
            there and what was done is reversed, as for a KeyboardInterrupt.
            Once the last rename is made the run is completed regardless.
        kind: What the journal calls the run (``cull`` for ``--move-rejects``).

    Raises:
        UnfinishedRunError: an earlier run was interrupted; ``imgrank recover`` first.
        RenameFailedError: a rename failed (a file changed or a target appeared
            meanwhile...); every rename already done has been reversed.
    """
    check_no_unfinished_run(journal_dir)
    if plan.is_empty:
        return RunResult(None, None, 0)
    stop = should_stop or (lambda: False)
    if stop():
        raise RenameInterruptedError("interrupted before any photo was renamed; nothing changed")
    steps = plan.steps()
    writer = JournalWriter.create(
        run_id=plan.run_id,
        kind=kind,
        folder=absolute_path(folder),
        steps=steps,
        prompt=prompt,
        template=plan.template,
        directory=journal_dir,
    )
    _execute(writer, steps, plan.moves, stop)
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
    from imgrank.files.atomic import fsync_folder

    for folder in set(folders):
        fsync_folder(folder)


def _execute(
    writer: JournalWriter,
    steps: list[StepRecord],
    moves: list[Move],
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Run ``moves``; on any error or interruption put everything back, then raise."""
    done = 0
    try:
        for move in moves:
            if should_stop():
                raise KeyboardInterrupt
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
        # Make the new names durable before the journal says the run is complete (the
        # target folders too: --move-rejects moves files into another folder).
        _fsync_folders([*(s.source.parent for s in steps), *(s.target.parent for s in steps)])
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


def parked_files(directory: Path | None = None) -> list[tuple[RunRecord, list[Path]]]:
    """Files an interrupted rename run left under its hidden temporary names.

    Scans skip hidden names, so a plain sort or a ``--rename`` dry run would
    leave these photos out of the ranking without a word; the CLI says so.
    """
    parked: list[tuple[RunRecord, list[Path]]] = []
    for run in unfinished_runs(directory):
        if is_in_progress(run):
            continue
        paths = [step.temp for step in run.steps if "temp" in locate(step)]
        if paths:
            parked.append((run, paths))
    return parked


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
        found = locate(step)
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
    current_names = {path_key(cur) for cur, _ in entries.values()}
    changed = True
    while changed:
        changed = False
        for index, (cur, desired) in list(entries.items()):
            if os.path.lexists(desired) and path_key(desired) not in current_names:
                problems.append(
                    f"{cur} could not get back its name {desired.name}: another file now has "
                    "that name"
                )
                del entries[index]
                changed = True
        current_names = {path_key(cur) for cur, _ in entries.values()}

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
            found = locate(step)
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


def undo(
    run_id: str | None = None,
    *,
    skip_changed: bool = False,
    journal_dir: Path | None = None,
) -> RunResult:
    """Give the files of a finished run their names back (or, for an ``xmp`` run, its
    sidecars their earlier content: :func:`imgrank.files.sidecars.undo_sidecar_run`).

    Args:
        run_id: The run (a unique prefix is enough); None for the latest
            rename run that has not been undone.
        skip_changed: Undo every file that is still the one the run renamed and
            leave the others (moved, deleted, replaced or edited since) as they
            are, listed in the result and in the undo's journal. Without it, any
            such file refuses the whole undo.
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
            if r.kind != "undo" and r.outcome == "applied" and r.run_id not in undone
        ]
        if not candidates:
            raise UnsafeOperationError(
                "there is no rename run left to undo (`imgrank runs` lists past runs)"
            )
        run = candidates[-1]
    else:
        run = find_run(run_id, journal_dir)
        if run.kind == "undo":
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

    if run.kind == "xmp":
        from imgrank.files.sidecars import undo_sidecar_run

        result = undo_sidecar_run(run, journal_dir=journal_dir)
        return RunResult(result.run_id, result.journal, 0, sidecars=result.written)

    problems: list[str] = []
    changed: list[dict[str, str]] = []  # files --skip-changed leaves as they are
    kept: list[tuple[StepRecord, FileIdentity]] = []
    renamed_again: dict[str, int] = defaultdict(int)
    for step in run.steps:
        now = identity_or_none(step.target)
        reason = None
        if now is None:
            later = _later_mover(runs, run, step)
            if later is not None:
                renamed_again[later] += 1
                continue
            reason = "no longer exists: it was moved or deleted since"
        elif now != step.identity:
            # Size and mtime too, not only the inode: a file deleted and re-created
            # at once often gets the same inode number back.
            reason = (
                "is not the file imgrank renamed: it was replaced or modified since "
                "(its inode, size or modification time differ)"
            )
        if reason is None:
            assert now is not None
            kept.append((step, now))
        else:
            problems.append(f"{step.target} {reason}")
            changed.append({"path": str(step.target), "reason": reason})
    later_runs = [
        f"{count} of its file(s) were renamed again by the later run {later}; "
        f"undo that one first (`imgrank undo {later}`)"
        for later, count in renamed_again.items()
    ]
    if later_runs or (problems and not skip_changed) or not kept:
        listed = "\n".join(f"  - {p}" for p in later_runs + problems)
        hint = ""
        if problems and not later_runs and kept:
            hint = (
                f" `imgrank undo {run.run_id} --skip-changed` renames back the "
                f"{len(kept)} unchanged file(s) and leaves these as they are."
            )
        raise UnsafeOperationError(
            f"cannot undo run {run.run_id}: imgrank only renames back files it can be sure are the "
            f"ones it renamed. Nothing was changed.{hint}\n{listed}"
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
        for i, (old, ident) in enumerate(kept)
    ]
    # Sources and targets may be in different folders (a --move-rejects run).
    listings = folder_listings({s.source.parent for s in steps} | {s.target.parent for s in steps})
    leaving: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in steps:
        leaving[path_key(s.source)].add(s.source.name)
    taken = []
    for s in steps:
        key = path_key(s.target)
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
        skipped=changed,
        directory=journal_dir,
    )
    _execute(writer, steps, moves)
    return RunResult(new_id, writer.path, len(steps), skipped=problems)


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
        sidecars: How many of ``files`` are XMP sidecars (an ``xmp`` run or its undo).
    """

    run_id: str
    folder: str
    direction: Literal["back", "forward"]
    files: int
    problems: list[str]
    started: bool
    sidecars: int = 0


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
                    RecoveryReport(
                        run.run_id,
                        run.folder,
                        "back",
                        len(run.steps) + len(run.sidecars),
                        [],
                        False,
                        len(run.sidecars),
                    )
                )
                continue
            want: Literal["source", "target"] = "target" if forward else "source"
            problems = _settle(run.steps, want, writer) if run.steps else []
            if run.sidecars:
                from imgrank.files.sidecars import settle_sidecars

                problems += settle_sidecars(
                    run, forward=forward, writer=writer, journal_dir=journal_dir
                )
            outcome = ("applied" if forward else "restored") if not problems else "partial"
            writer.finish("recovered", outcome, problems)
            reports.append(
                RecoveryReport(
                    run.run_id,
                    run.folder,
                    "forward" if forward else "back",
                    len(run.steps) + len(run.sidecars),
                    problems,
                    True,
                    len(run.sidecars),
                )
            )
    return reports
