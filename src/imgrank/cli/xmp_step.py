"""The ``--xmp`` step of ``imgrank sort``: show the sidecar plan, and write it with ``--apply``.

The logic lives in :mod:`imgrank.files.xmp_marks` (what to write) and
:mod:`imgrank.files.sidecars` (writing it safely); this module checks the
options and prints. The plan goes to stdout, summaries to stderr.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rich.markup import escape

from imgrank.cli.common import StdoutSink, err_console, warn
from imgrank.errors import UsageError
from imgrank.files.xmp_marks import LABEL_COLOURS, XMP_MODES, RatingScale
from imgrank.ranking import RankedImage


@dataclass(frozen=True)
class XmpOptions:
    """The checked ``--xmp*`` options."""

    mode: str
    scale: RatingScale
    top: int | None
    label: str
    naming: str


def check_xmp_options(
    mode: str | None, scale: str | None, top: int | None, label: str | None, naming: str
) -> XmpOptions | None:
    """Check the ``--xmp*`` options before any work; None without ``--xmp``.

    Raises:
        UsageError: an inconsistent or unknown value.
    """
    from imgrank.files.sidecars import SIDECAR_NAMINGS

    if mode is None:
        given = [
            name
            for name, value in (("--xmp-scale", scale), ("--xmp-top", top), ("--xmp-label", label))
            if value is not None
        ]
        if given or naming != "file":
            raise UsageError(f"{(given or ['--xmp-sidecar'])[0]} only applies with --xmp")
        return None
    try:
        import lxml  # noqa: F401  (checked now, not after minutes of ranking)
    except ModuleNotFoundError:
        raise UsageError(
            "--xmp needs lxml, which imgrank reads and writes XMP sidecars with: pip install lxml"
        ) from None
    if mode not in XMP_MODES:
        raise UsageError(f"--xmp must be one of {', '.join(XMP_MODES)}, not {mode!r}")
    if naming not in SIDECAR_NAMINGS:
        raise UsageError(
            f"--xmp-sidecar must be one of {', '.join(SIDECAR_NAMINGS)}, not {naming!r}"
        )
    if scale is not None and mode != "rating":
        raise UsageError("--xmp-scale applies to --xmp rating; use --xmp-top for label and pick")
    if top is not None and mode == "rating":
        raise UsageError("--xmp-top applies to --xmp label and pick; use --xmp-scale for rating")
    if top is not None and top < 1:
        raise UsageError("--xmp-top must be at least 1")
    if label is not None and mode != "label":
        raise UsageError("--xmp-label applies to --xmp label")
    colour = label or "Green"
    if colour not in LABEL_COLOURS:
        raise UsageError(f"--xmp-label must be one of {', '.join(LABEL_COLOURS)}, not {colour!r}")
    return XmpOptions(mode, RatingScale.parse(scale), top, colour, naming)


def _shown(path: Path, folder: Path) -> str:
    try:
        return os.path.relpath(path, os.path.abspath(folder))
    except ValueError:
        return str(path)


def xmp_after_sort(
    items: list[RankedImage],
    folder: Path,
    options: XmpOptions,
    *,
    prompt: str,
    apply: bool,
    out: StdoutSink,
    quiet: bool = False,
) -> None:
    """Print what would be written to each sidecar (file: field old -> new), then maybe write it.

    The listing goes through ``out``: a reader of stdout that goes away
    (``| head -1``) does not keep ``--apply`` from writing the sidecars.

    Raises:
        UnsafeOperationError: two photos would share a sidecar with different values,
            or a write failed (what was written has been put back).
    """
    from imgrank.files.xmp_marks import xmp_writes

    writes = xmp_writes(
        items, options.mode, scale=options.scale, top=options.top, label=options.label
    )
    write_sidecars(
        writes, folder, naming=options.naming, prompt=prompt, apply=apply, out=out, quiet=quiet
    )


def write_sidecars(
    writes: list[tuple[Path, dict[str, str]]],
    folder: Path,
    *,
    naming: str,
    prompt: str,
    apply: bool,
    out: StdoutSink,
    quiet: bool = False,
) -> None:
    """Print the sidecar plan of ``writes`` (file: field old -> new), then maybe write it.

    Shared by ``sort --xmp`` and ``cull --xmp pick``.

    Raises:
        UnsafeOperationError: as :func:`xmp_after_sort`.
    """
    from imgrank.files.sidecars import apply_sidecar_plan, plan_sidecars

    plan = plan_sidecars(writes, naming=naming)

    def show_plan(stream: BinaryIO) -> None:
        for change in plan.changes:
            parts = [
                f"{f} {change.before.get(f) if change.before.get(f) is not None else '-'} -> {v}"
                for f, v in change.after.items()
            ]
            created = " (new sidecar)" if change.old is None else ""
            line = f"{_shown(change.path, folder)}: {', '.join(parts)}{created}"
            stream.write(line.encode("utf-8", "surrogateescape") + b"\n")

    out.write(show_plan)
    for sidecar, reason in plan.refused:
        warn(f"left {sidecar} alone: {reason}", quiet=False)
    new = sum(1 for c in plan.changes if c.old is None)
    if plan.is_empty:
        if not quiet:
            err_console.print(
                f"nothing to write: {len(plan.unchanged)} sidecar(s) already hold these values"
            )
        return
    if not apply:
        if not quiet:
            err_console.print(
                f"would write {len(plan.changes)} XMP sidecar(s), {new} of them new (nothing "
                "changed); add --apply to write them"
            )
        return
    result = apply_sidecar_plan(plan, folder=folder, prompt=prompt)
    if not quiet:
        err_console.print(
            f"wrote {result.written} XMP sidecar(s), {result.created} of them new "
            f"(run {escape(str(result.run_id))}); `imgrank undo --last` puts them back"
        )
