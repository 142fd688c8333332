"""``imgrank sort``: rank the photos of a folder by a prompt."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from imgrank.cli.common import (
    StdoutSink,
    check_before_writing,
    err_console,
    handle_errors,
    option_given,
    prepare_torch,
    progress_bar,
    route_library_warnings,
    run_feedback,
)
from imgrank.cli.options import (
    PANEL_ENGINE,
    PANEL_INPUT,
    PANEL_OUTPUT,
    PANEL_RANKING,
    PANEL_RENAME,
    PANEL_XMP,
    AdapterOption,
    AgainstOption,
    BatchSizeOption,
    CacheOption,
    DeviceOption,
    Engine,
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
    XmpField,
    XmpSidecar,
    XmpSidecarOption,
    cache_choice,
)
from imgrank.errors import UsageError
from imgrank.features.pipeline import DEFAULT_BATCH_SIZE
from imgrank.images.decode import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_PIXELS

# These modules import torch only inside functions, so importing them here is cheap.
from imgrank.models.clip.config import DEFAULT_MODEL, DEFAULT_PRETRAINED

if TYPE_CHECKING:
    pass


#: Options only ``sort`` has, declared here; the shared ones come from :mod:`imgrank.cli.options`.
SourceArgument = Annotated[
    str | None,
    typer.Argument(
        metavar="SRC",
        help="Folder of photos to rank (scanned recursively), a features dataset written by "
        "`imgrank embed`, or a URI (s3://, gs://, hdfs://, file://) read through pyarrow.",
        show_default=False,
    ),
]
ByOption = Annotated[
    str | None,
    typer.Option(
        "--by",
        "-b",
        metavar="TEXT",
        help='What to sort by, e.g. "image quality" (or rank by --like photos, or both).',
        rich_help_panel=PANEL_RANKING,
    ),
]


@handle_errors
def sort(
    ctx: typer.Context,
    source: SourceArgument = None,
    by: ByOption = None,
    like: Annotated[
        list[Path] | None,
        typer.Option(
            "--like",
            metavar="PHOTO",
            help="Rank by likeness to this example photo (repeat for several: their mean); "
            "alone, or with --by as a weighted sum (--like-weight).",
            rich_help_panel=PANEL_RANKING,
        ),
    ] = None,
    like_weight: Annotated[
        float,
        typer.Option(
            "--like-weight",
            metavar="W",
            help="With --by and --like: how much the likeness counts, 0 to 1 "
            "(score = (1-W) x by-score + W x (1+cosine)/2).",
            rich_help_panel=PANEL_RANKING,
        ),
    ] = 0.5,
    min_score: Annotated[
        float | None,
        typer.Option(
            "--min-score",
            metavar="X",
            help="Keep only images scoring at least X.",
            rich_help_panel=PANEL_RANKING,
        ),
    ] = None,
    against: AgainstOption = None,
    top: Annotated[
        int | None,
        typer.Option(
            "--top", metavar="K", min=1, help="Keep only the first K images.",
            rich_help_panel=PANEL_RANKING,
        ),
    ] = None,
    ascending: Annotated[
        bool,
        typer.Option("--ascending", help="Lowest score first.", rich_help_panel=PANEL_RANKING),
    ] = False,
    model: ModelOption = DEFAULT_MODEL,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    adapter: AdapterOption = None,
    device: DeviceOption = "auto",
    runtime: RuntimeOption = None,
    precision: PrecisionOption = None,
    onnx: OnnxOption = None,
    providers: ProvidersOption = None,
    recursive: RecursiveOption = True,
    include_hidden: IncludeHiddenOption = False,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    max_file_mb: Annotated[
        int,
        typer.Option(
            "--max-file-mb",
            metavar="N",
            min=1,
            help="Skip files larger than N MiB (a 20 GB file with an image header would keep "
            "the run busy for minutes).",
            rich_help_panel=PANEL_INPUT,
        ),
    ] = DEFAULT_MAX_FILE_MB,
    raw_pairs: RawPairsOption = RawPairs.pair,
    fmt: Annotated[
        OutputFormat,
        typer.Option(
            "--format",
            "-f",
            help="csv (rank,score,path), jsonl, or paths only.",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = OutputFormat.csv,
    output: OutputOption = None,
    null: NullOption = False,
    errors: ErrorsOption = None,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            metavar="FILE",
            help="Also write an HTML contact sheet: thumbnails in rank order with scores, a "
            "score histogram, the skipped files (see docs/report.md).",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = None,
    preview: Annotated[
        int | None,
        typer.Option(
            "--preview",
            metavar="N",
            min=1,
            help="Show the first and last N images on stderr: inline pictures in kitty, "
            "Ghostty, iTerm2 and WezTerm, a plain list elsewhere.",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = None,
    link: Annotated[
        Path | None,
        typer.Option(
            "--link",
            metavar="DIR",
            help="Also create rank-ordered symlinks (0001_name.jpg, ...) in DIR.",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = None,
    copy: Annotated[
        Path | None,
        typer.Option(
            "--copy",
            metavar="DIR",
            help="Also create rank-ordered copies (0001_name.jpg, ...) in DIR.",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Allow --output/--errors/--report to replace an existing file, and "
            "--link/--copy to replace an earlier imgrank output folder of the same kind.",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = False,
    quiet: QuietOption = False,
    rename: Annotated[
        bool,
        typer.Option(
            "--rename",
            help="Show how the photos would be renamed into rank order (old -> new, on stdout "
            "instead of the ranking); changes nothing without --apply.",
            rich_help_panel=PANEL_RENAME,
        ),
    ] = False,
    apply: Annotated[
        bool,
        typer.Option(
            "--apply",
            help="With --rename: do rename the photos; with --xmp: do write the sidecars "
            "(undo either: `imgrank undo --last`).",
            rich_help_panel=PANEL_RENAME,
        ),
    ] = False,
    name_template: Annotated[
        str | None,
        typer.Option(
            "--name-template",
            metavar="TEMPLATE",
            help="With --rename: new names from {rank}, {score}, {stem}, {ext} "
            '(default "{rank}_{stem}{ext}"); see docs/safety.md.',
            rich_help_panel=PANEL_RENAME,
        ),
    ] = None,
    xmp: Annotated[
        XmpField | None,
        typer.Option(
            "--xmp",
            help="Show what XMP sidecars would get (file: field old -> new, on stdout instead "
            "of the ranking); with --apply, write them. rating: xmp:Rating 5..1 by quintile; "
            "label: xmp:Label for the top photos; pick: top accepted, the rest rejected "
            "(see docs/xmp.md).",
            rich_help_panel=PANEL_XMP,
        ),
    ] = None,
    xmp_scale: Annotated[
        str | None,
        typer.Option(
            "--xmp-scale",
            metavar="SCALE",
            help="With --xmp rating: quintiles (default), percent:P5,P4,P3,P2,P1 (shares for "
            "5..1 stars) or score:T5,T4,T3,T2 (lowest score for 5..2 stars).",
            rich_help_panel=PANEL_XMP,
        ),
    ] = None,
    xmp_top: Annotated[
        int | None,
        typer.Option(
            "--xmp-top",
            metavar="N",
            help="With --xmp label/pick: how many photos are the top (default: 20%).",
            rich_help_panel=PANEL_XMP,
        ),
    ] = None,
    xmp_label: Annotated[
        str | None,
        typer.Option(
            "--xmp-label",
            metavar="COLOUR",
            help="With --xmp label: Red, Yellow, Green (default), Blue or Purple.",
            rich_help_panel=PANEL_XMP,
        ),
    ] = None,
    xmp_sidecar: XmpSidecarOption = XmpSidecar.file,
    paths_from: Annotated[
        Path | None,
        typer.Option(
            "--paths-from",
            metavar="FILE",
            help="Rank the files named in FILE instead of a folder: a text file with one path "
            "or URI per line, or a CSV or Parquet file with a 'path' column.",
            rich_help_panel=PANEL_INPUT,
        ),
    ] = None,
    engine: Annotated[
        Engine,
        typer.Option(
            "--engine",
            help="local (this process) or ray (Ray Data: on this machine, or a cluster with "
            "--ray-address); see docs/distributed.md.",
            rich_help_panel=PANEL_ENGINE,
        ),
    ] = Engine.local,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            metavar="ADDRESS",
            help="With --engine ray: join a running cluster (auto, or HOST:PORT) instead of "
            "starting Ray on this machine.",
            rich_help_panel=PANEL_ENGINE,
        ),
    ] = None,
    ray_actors: Annotated[
        int | None,
        typer.Option(
            "--ray-actors",
            metavar="N",
            help="With --engine ray: encode actors, each loading the model once "
            "(default: one per GPU, else enough to use 2/3 of the CPUs).",
            rich_help_panel=PANEL_ENGINE,
        ),
    ] = None,
    ray_cpus_per_actor: Annotated[
        float | None,
        typer.Option(
            "--ray-cpus-per-actor",
            metavar="N",
            help="With --engine ray: CPUs each encode actor reserves and uses as torch threads "
            "(default: 1 with GPUs, else up to 4).",
            rich_help_panel=PANEL_ENGINE,
        ),
    ] = None,
    cache: CacheOption = None,
    no_cache: NoCacheOption = False,
    batch_size: BatchSizeOption = DEFAULT_BATCH_SIZE,
    workers: WorkersOption = None,
) -> None:
    """Rank the photos of SRC by how well they match --by, best first.

    The ranking goes to stdout (or --output) as CSV, JSON lines or plain paths;
    progress and a summary go to stderr when it is a terminal.

    Examples:

        imgrank sort ./photos --by "image quality" > ranking.csv

        imgrank sort ./photos --by "sharpness" --format paths --top 20 | xargs -d '\\n' ls -l

        imgrank sort s3://bucket/photos --by "image quality" --engine ray --ray-address auto
    """
    from imgrank.files.atomic import atomic_file, check_new_file
    from imgrank.files.writers import (
        identities,
        materialize,
        output_replace,
        write_errors_csv,
        write_ranking,
    )
    from imgrank.images.sources import is_uri
    from imgrank.sorter import SortRequest, sort_folder, validate_request

    route_library_warnings(quiet=quiet)
    fmt = OutputFormat(fmt).value  # the writers take the plain name
    if null and fmt != "paths":
        raise UsageError("--null only applies to --format paths")
    from imgrank.cli.runs_cmd import rename_after_sort, validate_rename_options
    from imgrank.cli.xmp_step import check_xmp_options, xmp_after_sort

    xmp_options = check_xmp_options(
        None if xmp is None else XmpField(xmp).value,
        xmp_scale,
        xmp_top,
        xmp_label,
        XmpSidecar(xmp_sidecar).value,
    )
    validate_rename_options(rename, apply, name_template, xmp=xmp_options is not None)
    _say_what_an_interrupted_run_hides()
    engine_name = Engine(engine).value
    folder = _source_argument(source, paths_from)
    if engine_name == "ray":
        local_only = [name for name, given in (("--rename", rename), ("--link", link is not None),
                      ("--copy", copy is not None), ("--xmp", xmp is not None)) if given]  # fmt: skip
        if local_only:
            raise UsageError(
                f"{', '.join(local_only)} change files on this machine, so they work with the "
                "local engine only; run without --engine ray, or write the ranking with "
                "--format paths -o FILE and act on it"
            )
    elif ray_address is not None or ray_actors is not None or ray_cpus_per_actor is not None:
        raise UsageError("--ray-address, --ray-actors and --ray-cpus-per-actor need --engine ray")
    from imgrank.features.parquet import is_dataset

    if rename and (paths_from is not None or is_uri(folder) or is_dataset(folder)):
        raise UsageError("--rename renames the photos of one local folder; give a folder as SRC")
    from imgrank.images.decode import set_pillow_pixel_guard

    set_pillow_pixel_guard(max_pixels)  # Pillow's own cap (179 MP) would otherwise win
    if any(target is not None for target in (link, copy, output, errors, report)):
        check_before_writing()  # no new files while an interrupted rename run is unsettled
    # --link / --copy destinations are judged now, before any model work: two rankings
    # must not mix in one folder, and the scanned folder cannot be its own output.
    if link is not None and copy is not None and _same_path(link, copy):
        raise UsageError("--link and --copy name the same folder; give each its own")
    from imgrank.files.output_folder import check_output_folder

    for destination, mode in ((link, "link"), (copy, "copy")):
        if destination is not None:
            check_output_folder(destination, mode, force=force, scanned=folder)  # type: ignore[arg-type]
    exclude = [p for p in (link, copy) if p is not None]
    if by is None and not like:
        raise UsageError('give --by TEXT (e.g. --by "image quality"), --like PHOTO, or both')
    if by is None and against is not None:
        raise UsageError("--against phrases the opposite of --by; give --by too")
    request = SortRequest(
        folder=folder,
        prompt=by or "",
        min_score=min_score,
        like=list(like or []),
        like_weight=like_weight,
        against=against,
        model=model,
        pretrained=pretrained,
        device=device,
        batch_size=batch_size,
        workers=workers,
        recursive=recursive,
        include_hidden=include_hidden,
        exclude=exclude,
        ascending=ascending,
        top=top,
        max_pixels=max_pixels,
        max_file_mb=max_file_mb,
        cache=cache_file if isinstance(cache_file := cache_choice(cache, no_cache), Path) else None,
        use_cache=cache_file is not False,
        adapter=adapter,
        model_given=option_given(ctx, "model"),
        pretrained_given=option_given(ctx, "pretrained"),
        runtime=None if runtime is None else Runtime(runtime).value,
        precision=None if precision is None else Precision(precision).value,
        onnx=onnx,
        providers=providers,
        raw_pairs=RawPairs(raw_pairs).value,
        paths_from=paths_from,
        engine=engine_name,
        ray_actors=ray_actors,
        ray_cpus_per_actor=ray_cpus_per_actor,
    )
    validate_request(request)
    # Output files that would be refused are refused now, not after minutes of work.
    for target in (output, errors):
        if target is not None:
            check_new_file(target, replace=output_replace(force))
    _refuse_one_file_for_two_outputs({"--output": output, "--errors": errors, "--report": report})
    if report is not None:
        from imgrank.report.html import check_report_destination

        check_report_destination(report, overwrite=force)
    # The process's thread count is the command line's to set (it imports nothing).
    prepare_torch()
    interactive = err_console.is_terminal and not quiet
    feedback = run_feedback(quiet=quiet, task="ranking")
    skipped, progress, callbacks = feedback.skipped, feedback.progress, feedback.callbacks

    # stdout is written through a sink: a reader that goes away (`| head -1`) must not
    # keep the renames, links and copies below from happening.
    out = StdoutSink()
    with ExitStack() as stack:
        if progress is not None:
            stack.enter_context(progress)
        try:
            if engine_name == "ray":  # after every check: starting Ray takes seconds
                from imgrank.engines.ray import connect

                connect(ray_address, quiet=True)
            ranking = sort_folder(request, callbacks)
        finally:
            if progress is not None:
                progress.stop()
            if errors is not None:
                # Written even when the run ends with no image ranked: that is when it matters most.
                inputs = identities(item.path for item in skipped)
                with atomic_file(errors, replace=output_replace(force, inputs)) as stream:
                    write_errors_csv(skipped, stream)
        if rename:  # first, so the ranking, links and copies name the files as they now are
            described = by or "like " + ", ".join(p.name for p in like or [])
            ranking.items = rename_after_sort(
                ranking.items,
                folder,
                prompt=described,
                template=name_template,
                apply=apply,
                out=out,
                quiet=quiet,
            )
        if xmp_options is not None:  # after renaming, so sidecars carry the photos' new names
            xmp_after_sort(
                ranking.items, folder, xmp_options, prompt=by or "", apply=apply, out=out, quiet=quiet
            )
        if output is not None:
            inputs = identities([item.path for item in ranking.items] + [s.path for s in skipped])
            with atomic_file(output, replace=output_replace(force, inputs)) as stream:
                write_ranking(ranking.items, stream, fmt, null=null)
        elif not rename and xmp_options is None:  # with --rename/--xmp, stdout shows the plan
            out.write(lambda stream: write_ranking(ranking.items, stream, fmt, null=null))
        if link is not None:
            materialize(ranking.items, link, mode="link", force=force)
        if copy is not None:
            materialize(ranking.items, copy, mode="copy", force=force)

    if report is not None:
        from imgrank.report.html import write_report

        bar = progress_bar(enabled=interactive)
        with bar or ExitStack():
            task = bar.add_task("report", total=len(ranking.items)) if bar else 0
            write_report(
                ranking,
                report,
                ascending=ascending,
                top=top,
                overwrite=force,
                workers=workers,
                max_pixels=max_pixels,
                on_progress=(lambda n: bar.advance(task, n)) if bar else None,
            )
        if interactive:
            err_console.print(f"report written to {escape(str(report))}")
    if preview is not None:  # asked for explicitly, so shown even with --quiet
        from imgrank.report.preview import write_preview

        write_preview(ranking, preview, sys.stderr, max_pixels=max_pixels)
    if interactive:
        outputs = len(ranking.skipped_outputs)
        err_console.print(
            f"scored {ranking.scored} image(s) ({ranking.from_cache} from the embedding cache), "
            f"skipped {len(ranking.skipped)} file(s)"
            + (f" and {outputs} imgrank output folder(s)" if outputs else "")
            + f" in {ranking.seconds:.1f} s with {escape(ranking.scorer)}"
        )
    out.finish("the rename plan" if rename else "the ranking")



def _source_argument(source: str | None, paths_from: Path | None) -> Path | str:
    """SRC as a local path, or as the URI string it is (``Path`` would fold ``s3://``)."""
    from imgrank.images.sources import is_uri

    if paths_from is not None:
        if source is not None:
            raise UsageError("give either SRC or --paths-from FILE, not both")
        return paths_from
    if source is None:
        raise UsageError("give the folder to sort (SRC), or --paths-from FILE")
    return source if is_uri(source) else Path(source)


def _say_what_an_interrupted_run_hides() -> None:
    """Photos parked under hidden temporary names are not scanned: say so (even with -q)."""
    from imgrank.files.renaming import parked_files

    for run, paths in parked_files():
        shown = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
        err_console.print(
            f"[yellow]warning:[/] an interrupted rename run ({escape(run.run_id)}, in "
            f"{escape(str(run.folder))}) left {len(paths)} photo(s) under hidden temporary "
            f"names, so they are not ranked: {escape(shown)}. Run `imgrank recover` to give "
            "them their names back."
        )


def _refuse_one_file_for_two_outputs(targets: dict[str, Path | None]) -> None:
    """``-o X --errors X``: the second write would replace the first (the ranking lost)."""
    seen: dict[str, str] = {}
    for option, target in targets.items():
        if target is None:
            continue
        key = os.path.normcase(os.path.realpath(target))
        if key in seen:
            raise UsageError(
                f"{seen[key]} and {option} name the same file {target}; give each its own file"
            )
        seen[key] = option


def _same_path(a: Path, b: Path) -> bool:
    return a.absolute().resolve() == b.absolute().resolve()


