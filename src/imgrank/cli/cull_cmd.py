"""``imgrank cull``: group a shoot into bursts and keep the best shot of each."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from imgrank.cli.common import (
    StdoutSink,
    check_before_writing,
    err_console,
    handle_errors,
    option_given,
    prepare_torch,
    run_feedback,
)
from imgrank.cli.options import (
    AdapterOption,
    AgainstOption,
    BatchSizeOption,
    CacheOption,
    DeviceOption,
    ErrorsOption,
    IncludeHiddenOption,
    MaxPixelsOption,
    ModelOption,
    NoCacheOption,
    NullOption,
    OnnxOption,
    OutputFormat,
    OutputOption,
    Precision,
    PrecisionOption,
    PretrainedOption,
    ProvidersOption,
    QuietOption,
    RawPairs,
    RawPairsOption,
    RecursiveOption,
    Runtime,
    RuntimeOption,
    WorkersOption,
    XmpSidecar,
    XmpSidecarOption,
)
from imgrank.errors import UnsafeOperationError, UsageError
from imgrank.features.pipeline import DEFAULT_BATCH_SIZE
from imgrank.grouping import DEFAULT_GAP, DEFAULT_HASH_SURE
from imgrank.images.decode import DEFAULT_MAX_PIXELS
from imgrank.models.clip.config import DEFAULT_MODEL, DEFAULT_PRETRAINED


@handle_errors
def cull(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="Folder of photos (scanned recursively)."),
    by: str = typer.Option(..., "--by", "-b", metavar="TEXT", help='What to sort by, e.g. "image quality".'),
    against: AgainstOption = None,
    gap: float = typer.Option(
        DEFAULT_GAP,
        "--gap",
        metavar="SECONDS",
        min=0.0,
        help="Seconds between two shots that may still be one burst (EXIF capture times). "
        "Photos without a capture time are grouped by look alone.",
    ),
    hash_bits: int = typer.Option(
        DEFAULT_HASH_SURE,
        "--hash-bits",
        metavar="N",
        min=0,
        max=64,
        help="Perceptual-hash bits (of 64) under which two photos look alike for sure; "
        "lower splits more. See docs/cull.md.",
    ),
    keep: int = typer.Option(1, "--keep", metavar="N", min=1, help="Best photos kept per group."),
    fmt: OutputFormat = typer.Option(
        OutputFormat.csv,
        "--format",
        "-f",
        help="csv (columns group, rank_in_group, keep, score, path), jsonl, or paths only.",
    ),
    paths_only: bool = typer.Option(
        False, "--paths", help="Print only the keepers' paths, one per line (for pipelines)."
    ),
    output: OutputOption = None,
    null: NullOption = False,
    link: Path | None = typer.Option(
        None, "--link", metavar="DIR", help="Also create symlinks to the keepers (0001_name.jpg, ...) in DIR."
    ),
    copy: Path | None = typer.Option(
        None, "--copy", metavar="DIR", help="Also copy the keepers (0001_name.jpg, ...) into DIR."
    ),
    move_rejects: Path | None = typer.Option(
        None,
        "--move-rejects",
        metavar="DIR",
        help="Move every photo that is not kept into DIR (same sub-folders; same file "
        "system). Journalled: `imgrank undo --last` puts them back. Nothing is deleted.",
    ),
    report: Path | None = typer.Option(
        None,
        "--report",
        metavar="FILE",
        help="Also write an HTML contact sheet to FILE: one row per group, keepers marked.",
    ),
    xmp: str | None = typer.Option(
        None,
        "--xmp",
        metavar="pick",
        help="pick: show what XMP sidecars would get, keepers accepted and the others rejected "
        "(on stdout instead of the table); with --apply, write them. See docs/xmp.md.",
    ),
    apply: bool = typer.Option(
        False, "--apply", help="With --xmp: do write the sidecars (undo: `imgrank undo --last`)."
    ),
    xmp_sidecar: XmpSidecarOption = XmpSidecar.file,
    errors: ErrorsOption = None,
    force: bool = typer.Option(
        False, "--force", help="Allow --output/--errors/--report to replace an existing file."
    ),
    model: ModelOption = DEFAULT_MODEL,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    adapter: AdapterOption = None,
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = DEFAULT_BATCH_SIZE,
    workers: WorkersOption = None,
    recursive: RecursiveOption = True,
    include_hidden: IncludeHiddenOption = False,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    quiet: QuietOption = False,
    cache: CacheOption = None,
    no_cache: NoCacheOption = False,
    runtime: RuntimeOption = None,
    precision: PrecisionOption = None,
    onnx: OnnxOption = None,
    providers: ProvidersOption = None,
    raw_pairs: RawPairsOption = RawPairs.pair,
) -> None:
    """Group the photos of FOLDER into bursts and keep the best of each by --by.

    Photos taken within --gap seconds of each other (EXIF capture time) that look
    alike (perceptual hash, confirmed by the embedding) form a group; every photo is
    scored exactly as `imgrank sort` scores it and the best --keep of each group are
    the keepers. After a sort of the same folder, culling decodes nothing.

    Examples:

        imgrank cull ./shoot --by "a sharp, well exposed photo" > cull.csv

        imgrank cull ./shoot --by "image quality" --paths | xargs -d '\\n' cp -t ./best

        imgrank cull ./shoot --by "image quality" --move-rejects ./shoot-rejects
    """
    from imgrank.culler import collect_features, cull_features
    from imgrank.files.atomic import atomic_file, check_new_file
    from imgrank.files.writers import write_culling, write_errors_csv
    from imgrank.grouping import GroupingOptions
    from imgrank.sorter import SortRequest

    fmt = OutputFormat(fmt).value  # Typer refuses any other value before this runs
    if paths_only and fmt != "csv":
        raise UsageError("--paths prints the keepers' paths; it does not combine with --format")
    if null and fmt != "paths" and not paths_only:
        raise UsageError("--null only applies to --format paths or --paths")
    if xmp is not None and xmp != "pick":
        raise UsageError(
            f"cull writes --xmp pick (keepers accepted, the rest rejected), not {xmp!r}; "
            "ratings and labels by rank are `imgrank sort --xmp`"
        )
    if apply and xmp is None:
        raise UsageError("--apply only applies to --xmp pick")
    xmp_options = None
    if xmp is not None:
        from imgrank.cli.xmp_step import check_xmp_options

        xmp_options = check_xmp_options(xmp, None, None, None, XmpSidecar(xmp_sidecar).value)
    elif xmp_sidecar != "file":
        raise UsageError("--xmp-sidecar only applies with --xmp")
    targets = (link, copy, output, errors, report, move_rejects)
    if any(target is not None for target in targets) or apply:
        check_before_writing()  # no new files while an interrupted rename run is unsettled
    # Refused now, not after minutes of scoring.
    for target in (output, errors):
        if target is not None:
            check_new_file(target, replace=force)
    if report is not None:
        from imgrank.report.html import check_report_destination

        check_report_destination(report, overwrite=force)
    if move_rejects is not None:
        _check_move_destination(move_rejects, folder)
    options = GroupingOptions(gap=gap, hash_sure=hash_bits, hash_maybe=max(hash_bits, 22))
    request = SortRequest(
        folder=folder,
        prompt=by,
        against=against,
        model=model,
        pretrained=pretrained,
        device=device,
        batch_size=batch_size,
        workers=workers,
        recursive=recursive,
        include_hidden=include_hidden,
        exclude=[p for p in (link, copy, move_rejects) if p is not None],
        max_pixels=max_pixels,
        cache=cache,
        use_cache=not no_cache,
        adapter=adapter,
        model_given=option_given(ctx, "model"),
        pretrained_given=option_given(ctx, "pretrained"),
        runtime=None if runtime is None else Runtime(runtime).value,
        precision=None if precision is None else Precision(precision).value,
        onnx=onnx,
        providers=providers,
        raw_pairs=RawPairs(raw_pairs).value,
    )
    interactive = err_console.is_terminal and not quiet
    prepare_torch()
    feedback = run_feedback(quiet=quiet)
    skipped, callbacks = feedback.skipped, feedback.callbacks
    try:
        features = collect_features(request, callbacks, workers=workers)
    finally:
        if errors is not None:
            with atomic_file(errors, replace=force) as stream:
                write_errors_csv(skipped, stream)
    culling = cull_features(features, options, keep=keep)

    # A reader of stdout that goes away (| head) does not stop links, moves or sidecars.
    out = StdoutSink()
    if paths_only:
        shown, shown_fmt = culling.keepers, "paths"
    else:
        shown, shown_fmt = culling.photos, fmt
    if output is not None:
        with atomic_file(output, replace=force) as stream:
            write_culling(shown, stream, shown_fmt, null=null)
    elif xmp_options is None:  # with --xmp, stdout shows the sidecar plan
        out.write(lambda stream: write_culling(shown, stream, shown_fmt, null=null))
    if xmp_options is not None:
        # Before --move-rejects, so each reject's sidecar moves with it.
        from imgrank.cli.xmp_step import write_sidecars
        from imgrank.files.xmp_marks import pick_writes

        writes = pick_writes(_as_ranked(culling.keepers), _as_ranked(culling.rejects))
        write_sidecars(
            writes,
            folder,
            naming=xmp_options.naming,
            prompt=by,
            apply=apply,
            out=out,
            quiet=quiet,
        )

    keepers = _as_ranked(culling.keepers)
    if link is not None:
        from imgrank.files.writers import materialize

        materialize(keepers, link, mode="link")
    if copy is not None:
        from imgrank.files.writers import materialize

        materialize(keepers, copy, mode="copy")
    if report is not None:
        _write_report(culling, report, force=force, workers=workers, max_pixels=max_pixels)
        if interactive:
            err_console.print(f"report written to {escape(str(report))}")
    moved = 0
    if move_rejects is not None:
        moved = _move_rejects(culling, folder, move_rejects, prompt=by, quiet=quiet)
    out.finish("the sidecar plan" if xmp_options is not None else "the culling")
    if interactive:
        err_console.print(
            f"{len(culling.photos)} photo(s) in {culling.groups} group(s), "
            f"{len(culling.keepers)} kept"
            + (f", {moved} moved to {escape(str(move_rejects))}" if move_rejects else "")
            + f"; {features.from_cache} from the embedding cache, {len(features.skipped)} "
            f"skipped; {features.seconds:.1f} s scoring + {culling.seconds * 1000:.0f} ms "
            f"grouping with {escape(features.scorer)}"
        )


def _as_ranked(photos):  # type: ignore[no-untyped-def]
    """Keepers as a ranking (1, 2, ... in group order) for the link and copy writers."""
    from imgrank.ranking import RankedImage

    return [
        RankedImage(rank=i, score=p.score, path=p.path, raw=p.raw) for i, p in enumerate(photos, 1)
    ]


def _write_report(culling, report: Path, *, force: bool, workers, max_pixels: int) -> None:  # type: ignore[no-untyped-def]
    from imgrank.ranking import RankedImage, Ranking
    from imgrank.report.html import write_report

    features = culling.features
    ranking = Ranking(
        items=[
            RankedImage(rank=p.rank_in_group, score=p.score, path=p.path) for p in culling.photos
        ],
        skipped=features.skipped,
        prompt=features.prompt,
        scorer=features.scorer,
        seconds=features.seconds + culling.seconds,
        scored=len(culling.photos),
        from_cache=features.from_cache,
    )
    write_report(
        ranking,
        report,
        ascending=False,
        overwrite=force,
        workers=workers,
        max_pixels=max_pixels,
        groups=[(p.group, p.keep) for p in culling.photos],
    )


def _check_move_destination(destination: Path, folder: Path) -> None:
    """Refuse, before any work, a --move-rejects folder the photos cannot be moved into."""
    if destination.exists() and not destination.is_dir():
        raise UsageError(f"--move-rejects {destination} is a file; give a folder")
    existing = destination
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    try:
        same_disk = existing.stat().st_dev == folder.stat().st_dev
    except OSError as exc:
        reason = exc.strerror or exc
        raise UsageError(f"cannot use --move-rejects {destination}: {reason}") from None
    if not same_disk:
        raise UnsafeOperationError(
            f"--move-rejects {destination} is on another file system than {folder}: imgrank "
            "moves photos by renaming them (never by copying and deleting), so choose a "
            "folder on the same drive"
        )


def _sidecars_of(photo) -> list[Path]:  # type: ignore[no-untyped-def]
    """The XMP sidecars beside a photo (and its RAW twin) that exist."""
    found = []
    for path in (photo.path, photo.raw):
        if path is None:
            continue
        for base in (path.name, path.stem):
            for suffix in (".xmp", ".XMP"):
                candidate = path.with_name(base + suffix)
                if candidate.is_file() and candidate not in found:
                    found.append(candidate)
    return found


def _move_rejects(culling, folder: Path, destination: Path, *, prompt: str, quiet: bool) -> int:  # type: ignore[no-untyped-def]
    from imgrank.files.rename_plan import plan_moves
    from imgrank.files.renaming import apply_plan

    rejects = culling.rejects
    if not rejects:
        if not quiet:
            err_console.print("nothing to move: every photo is a keeper")
        return 0
    # A RAW+JPEG pair was judged as one photo and moves as one, with the XMP sidecars
    # that hold its edits and ratings (IMG_1.CR2.xmp, IMG_1.xmp): nothing is left behind.
    files: list[tuple[Path, float]] = []
    for photo in rejects:
        for path in (photo.path, photo.raw):
            if path is not None:
                files.append((path, photo.score))
        for sidecar in _sidecars_of(photo):
            if sidecar not in {f for f, _s in files}:
                files.append((sidecar, photo.score))
    plan = plan_moves(
        [path for path, _score in files], folder, destination, scores=[s for _p, s in files]
    )
    for target_folder in sorted({r.target.parent for r in plan.renames}):
        try:
            target_folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UnsafeOperationError(
                f"cannot create {target_folder}: {exc.strerror or exc}; nothing was moved"
            ) from None
    result = apply_plan(plan, folder=folder, prompt=prompt, kind="cull")
    if not quiet:
        err_console.print(
            f"moved {result.renamed} photo(s) that were not kept into {escape(str(destination))} "
            f"(run {result.run_id}); `imgrank undo --last` puts them back"
        )
    return result.renamed
