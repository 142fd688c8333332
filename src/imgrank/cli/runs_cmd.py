"""``imgrank runs``, ``imgrank undo``, ``imgrank recover``, and the rename step of ``sort``.

The logic lives in :mod:`imgrank.files.renaming` and :mod:`imgrank.files.journal`; this
module only turns options into calls and results into lines. Data (the run
list, the rename plan) goes to stdout; summaries go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO

import typer
from rich.markup import escape

from imgrank.cli.common import (
    InterruptGuard,
    StdoutSink,
    check_before_writing,
    done_so_far,
    err_console,
    handle_errors,
)
from imgrank.cli.options import JsonOption, QuietOption
from imgrank.errors import UsageError

if TYPE_CHECKING:
    from imgrank.files.journal import RunRecord
    from imgrank.ranking import RankedImage


def _state(run: RunRecord, undone_by: dict[str, str]) -> str:
    """One word (or two) saying where a run stands, for ``imgrank runs``."""
    from imgrank.files.journal import is_in_progress

    if not run.finished:
        return "in progress" if is_in_progress(run) else "UNFINISHED"
    if run.kind == "undo":
        return f"undo of {run.undoes}" if run.outcome == "applied" else f"undo {run.status}"
    if run.run_id in undone_by:
        return "undone"
    if run.status == "completed":
        return "applied"
    if run.status == "recovered":
        return {"applied": "recovered forward", "restored": "recovered back"}.get(
            str(run.outcome), "recovered, some files not in place"
        )
    return run.status.replace("_", " ") + ("" if run.outcome != "partial" else ", incomplete")


@handle_errors
def runs(
    as_json: JsonOption = False,
) -> None:
    """List past rename runs (oldest first) with their state.

    A run is `applied` (photos carry the new names; `imgrank undo RUN_ID`
    reverts it), `undone`, `rolled back` (an error stopped it and every name
    was put back), or UNFINISHED (interrupted: run `imgrank recover`).
    """
    from imgrank.files.journal import list_runs

    all_runs = list_runs()
    undone_by = {
        r.undoes: r.run_id for r in all_runs if r.kind == "undo" and r.outcome == "applied"
    }
    out = sys.stdout
    if as_json:
        for run in all_runs:
            record = {
                "run_id": run.run_id,
                "kind": run.kind,
                "created": run.created,
                "state": _state(run, undone_by),
                "status": run.status,
                "outcome": run.outcome,
                "files": len(run.steps) + len(run.sidecars),
                "folder": run.folder,
                "prompt": run.prompt,
                "undoes": run.undoes,
                "undone_by": undone_by.get(run.run_id),
                "journal": str(run.path),
                "problems": run.problems,
            }
            out.write(json.dumps(record) + "\n")
        return
    if not all_runs:
        err_console.print("no rename runs yet")
        return
    rows = [
        (
            run.run_id,
            run.created[:19].replace("T", " "),
            _state(run, undone_by),
            str(len(run.steps) + len(run.sidecars)),
            run.folder,
            run.prompt,
        )
        for run in all_runs
    ]
    header = ("RUN", "STARTED (UTC)", "STATE", "FILES", "FOLDER", "PROMPT")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        line = "  ".join([*cells, row[-1]])
        out.buffer.write(line.rstrip().encode("utf-8", "surrogateescape") + b"\n")
    out.flush()


@handle_errors
def undo(
    run_id: Annotated[
        str | None,
        typer.Argument(metavar="RUN_ID", help="The run to undo (see `imgrank runs`)."),
    ] = None,
    last: Annotated[
        bool, typer.Option("--last", help="Undo the latest rename run not yet undone.")
    ] = False,
    skip_changed: Annotated[
        bool,
        typer.Option(
            "--skip-changed",
            help="Undo every file that is unchanged; leave the ones moved, deleted, replaced or "
            "edited since as they are, and list them.",
        ),
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Give the photos of a rename run their names back.

    Refuses, changing nothing, when a file the run renamed was moved, deleted
    or replaced since (unless --skip-changed), or when an old name is now taken
    by another file.
    """
    from imgrank.files.renaming import undo as undo_run

    if last == (run_id is not None):
        raise UsageError("give either a RUN_ID or --last (see `imgrank runs`)")
    result = undo_run(run_id, skip_changed=skip_changed)
    if not quiet and result.sidecars:
        err_console.print(
            f"gave {result.sidecars} XMP sidecar(s) their earlier content back, removing the ones "
            f"imgrank had created (undo run {result.run_id})"
        )
    elif not quiet:
        err_console.print(
            f"restored the original names of {result.renamed} file(s) (undo run {result.run_id})"
        )
    if result.skipped:  # files left under their ranked names: shown even with --quiet
        err_console.print(
            f"left {len(result.skipped)} changed file(s) as they are (recorded in the journal):"
        )
        for line in result.skipped:
            err_console.print(f"  - {escape(line)}")


@handle_errors
def recover(
    forward: Annotated[
        bool,
        typer.Option("--forward", help="Finish the interrupted run instead of rolling it back."),
    ] = False,
) -> None:
    """Settle a rename run that was interrupted (Ctrl-C, kill -9, power loss).

    By default every photo gets its original name back; with --forward the
    run is finished instead. Files are found by inode wherever the run left
    them, and no file is ever overwritten. Safe to run again.
    """
    from imgrank.files.renaming import recover as recover_runs

    reports = recover_runs(forward=forward)
    if not reports:
        err_console.print("nothing to recover: no rename run was interrupted")
        return
    failed = False
    for report in reports:
        folder = escape(report.folder)
        if not report.started:
            err_console.print(
                f"run {report.run_id} ({folder}): it stopped before any file was renamed; closed"
            )
        elif not report.problems:
            where = "their new names" if report.direction == "forward" else "their original names"
            if report.sidecars:
                where = "their new names and contents" if report.direction == "forward" else (
                    "their original names and contents"
                )
            err_console.print(
                f"run {report.run_id} ({folder}): all {report.files} file(s) have {where}"
            )
        else:
            failed = True
            err_console.print(
                f"[bold red]run {report.run_id} ({folder}):[/] not every file could be put in "
                "place; none was overwritten or deleted:"
            )
            for problem in report.problems:
                err_console.print(f"  - {escape(problem)}")
    if failed:
        raise typer.Exit(6)


def rename_after_sort(
    items: list[RankedImage],
    folder: Path,
    *,
    prompt: str,
    template: str | None,
    apply: bool,
    out: StdoutSink,
    quiet: bool = False,
) -> list[RankedImage]:
    """``sort --rename [--apply]``: print the plan (old -> new) on stdout, then maybe apply it.

    Returns:
        The ranking with each path as it is after this step (the new names
        when applied), so links, copies and the ranking file point at real files.

    Raises:
        UsageError: bad ``--name-template``.
        UnsafeOperationError: the plan is unsafe, or a rename failed (and was reversed).
    """
    from imgrank.files.name_template import DEFAULT_TEMPLATE
    from imgrank.files.rename_plan import describe_plan, plan_renames
    from imgrank.files.renaming import apply_plan
    from imgrank.ranking import RankedImage

    plan = plan_renames(items, template=template or DEFAULT_TEMPLATE, folder=folder)
    for path, reason in plan.kept:
        # Shown even with --quiet: a photo left out of the order is something to know.
        err_console.print(f"[yellow]kept its name:[/] {escape(str(path))}: {escape(reason)}")

    def show_plan(stream: BinaryIO) -> None:
        for old, new in describe_plan(plan, folder):
            stream.write(os.fsencode(old) + b" -> " + os.fsencode(new) + b"\n")

    # Through the sink: `| head -1` must not keep --apply from renaming.
    out.write(show_plan)
    if plan.is_empty:
        if not quiet:
            err_console.print(
                f"nothing to rename: all {len(plan.unchanged)} file(s) already have their names"
            )
        return items
    if not apply:
        if not quiet:
            err_console.print(
                f"would rename {len(plan.renames)} file(s) (nothing changed); "
                "add --apply to rename them"
            )
        return items
    # Ctrl-C is held off from the journal's first line to its last, and honoured at
    # the next clean point: before a rename (all reversed) or after the last one.
    with InterruptGuard() as guard:
        result = apply_plan(plan, folder=folder, prompt=prompt, should_stop=guard)
    done = (
        f"renamed {result.renamed} file(s) (run {result.run_id}); "
        "`imgrank undo --last` puts the old names back"
    )
    done_so_far.append(done)
    if guard.requested:
        raise KeyboardInterrupt  # reported with what was done, by handle_errors
    if not quiet:
        err_console.print(done)
    new_names = {r.source: r.target.name for r in plan.renames}

    def now(path: Path) -> Path:
        # Same folder, same style of path (relative stays relative), new name.
        return path.parent / new_names.get(Path(os.path.abspath(path)), path.name)

    return [
        RankedImage(i.rank, i.score, now(i.path), None if i.raw is None else now(i.raw))
        for i in items
    ]


def validate_rename_options(
    rename: bool, apply: bool, template: str | None, *, xmp: bool = False
) -> None:
    """Check ``--rename``/``--apply``/``--name-template`` before minutes of work; guard writes.

    Raises:
        UsageError: inconsistent options or a bad template.
        UnfinishedRunError: an interrupted run must be recovered before ``--apply``.
    """
    from imgrank.files.name_template import NameTemplate

    if apply and not (rename or xmp):
        raise UsageError(
            "--apply only applies to --rename or --xmp "
            "(imgrank sort DIR --by TEXT --rename --apply)"
        )
    if template is not None:
        if not rename:
            raise UsageError("--name-template only applies to --rename")
        NameTemplate.parse(template)
    if (rename or xmp) and apply:
        check_before_writing()
