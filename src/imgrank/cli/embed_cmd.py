"""``imgrank embed``: store the features of many photos as a Parquet dataset, once."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from imgrank.cli.common import (
    check_before_writing,
    err_console,
    handle_errors,
    option_given,
    run_feedback,
)
from imgrank.cli.options import (
    PANEL_ENGINE,
    PANEL_INPUT,
    AdapterOption,
    BatchSizeOption,
    DeviceOption,
    Engine,
    ModelOption,
    PretrainedOption,
    QuietOption,
    WorkersOption,
)
from imgrank.errors import UsageError
from imgrank.features.pipeline import DEFAULT_BATCH_SIZE
from imgrank.images.decode import DEFAULT_MAX_PIXELS
from imgrank.models.clip.config import DEFAULT_MODEL, DEFAULT_PRETRAINED


@handle_errors
def embed(
    ctx: typer.Context,
    source: str | None = typer.Argument(
        None,
        metavar="SRC",
        help="Folder of photos, or a URI (s3://, gs://, hdfs://, file://) read through pyarrow.",
        show_default=False,
    ),
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="The dataset folder: new, empty, or written by imgrank embed before."
    ),
    paths_from: Path | None = typer.Option(
        None,
        "--paths-from", rich_help_panel=PANEL_INPUT, metavar="FILE",
        help="Embed the files named in FILE instead of SRC: one path or URI per line, or a "
        "CSV or Parquet file with a 'path' column.",
    ),
    tokens: bool = typer.Option(
        False,
        "--tokens",
        help="Also store the visual tokens, which adapters read (about 150 KB per photo "
        "with ViT-B-32, against 2 KB for the pooled embedding alone).",
    ),
    engine: Engine = typer.Option(  # noqa: B008
        Engine.local, "--engine", rich_help_panel=PANEL_ENGINE, help="local (this process) or ray (Ray Data)."
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", rich_help_panel=PANEL_ENGINE, metavar="ADDRESS", help="With --engine ray: join a running cluster (auto, HOST:PORT)."
    ),
    ray_actors: int | None = typer.Option(
        None, "--ray-actors", rich_help_panel=PANEL_ENGINE, metavar="N", help="With --engine ray: encode actors (default: one per GPU, "
        "else enough to use 2/3 of the CPUs).",
    ),
    ray_cpus_per_actor: float | None = typer.Option(
        None, "--ray-cpus-per-actor", rich_help_panel=PANEL_ENGINE, metavar="N", help="With --engine ray: CPUs per encode actor."
    ),
    model: ModelOption = DEFAULT_MODEL,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    adapter: AdapterOption = None,
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = DEFAULT_BATCH_SIZE,
    workers: WorkersOption = None,
    recursive: bool = typer.Option(True, "--recursive/--no-recursive", rich_help_panel=PANEL_INPUT, help="Scan sub-folders too."),
    include_hidden: bool = typer.Option(
        False, "--include-hidden", rich_help_panel=PANEL_INPUT, help="Also embed files and folders whose name starts with a dot."
    ),
    max_pixels: int = typer.Option(
        DEFAULT_MAX_PIXELS, "--max-pixels", rich_help_panel=PANEL_INPUT, metavar="N", help="Skip images larger than this (decompression bombs)."
    ),
    errors: Path | None = typer.Option(
        None, "--errors", metavar="FILE", help="Write the skipped files as CSV (path,reason) to FILE."
    ),
    force: bool = typer.Option(False, "--force", help="Allow --errors to replace an existing file."),
    quiet: QuietOption = False,
) -> None:
    """Store the features of the photos of SRC in the dataset --out, for sorting by any prompt.

    The dataset is Parquet shards (path, size, mtime_ns, pooled embedding, and
    visual tokens with --tokens) plus _imgrank-features.json naming the model
    and preprocessing. `imgrank sort DIR --by TEXT` then ranks from it without
    decoding a photo, on either engine. Running embed again adds only the new
    and changed photos. See docs/distributed.md.

    Examples:

        imgrank embed ./photos --out ./photos-features

        imgrank embed s3://bucket/photos --out /shared/features --engine ray --ray-address auto
    """
    from imgrank.cli.sort_cmd import _source_argument
    from imgrank.embed import check_destination, embed_request
    from imgrank.embed import embed as run_embed
    from imgrank.files.atomic import atomic_file, check_new_file
    from imgrank.files.writers import write_errors_csv
    from imgrank.sorter import SortRequest, validate_request

    folder = _source_argument(source, paths_from)
    if engine != "ray" and (ray_address or ray_actors is not None or ray_cpus_per_actor is not None):
        raise UsageError("--ray-address, --ray-actors and --ray-cpus-per-actor need --engine ray")
    check_before_writing()
    request = embed_request(
        SortRequest(
            folder=folder,
            prompt="image",
            model=model,
            pretrained=pretrained,
            device=device,
            batch_size=batch_size,
            workers=workers,
            recursive=recursive,
            include_hidden=include_hidden,
            max_pixels=max_pixels,
            adapter=adapter,
            model_given=option_given(ctx, "model"),
            pretrained_given=option_given(ctx, "pretrained"),
            paths_from=paths_from,
            engine=Engine(engine).value,
            ray_actors=ray_actors,
            ray_cpus_per_actor=ray_cpus_per_actor,
        )
    )
    validate_request(request)
    check_destination(out)
    if errors is not None:
        check_new_file(errors, replace=force)
    feedback = run_feedback(quiet=quiet, task="embedding")
    skipped, progress, callbacks = feedback.skipped, feedback.progress, feedback.callbacks
    try:
        if engine == "ray":
            from imgrank.engines.ray import connect

            connect(ray_address, quiet=True)
        if progress is not None:
            progress.start()
        result = run_embed(request, out, tokens=tokens, callbacks=callbacks)
    finally:
        if progress is not None:
            progress.stop()
        if errors is not None:
            with atomic_file(errors, replace=force) as stream:
                write_errors_csv(skipped, stream)
    if not quiet:
        err_console.print(
            f"{escape(str(out))}: {result.added} photo(s) added, {result.replaced} replaced "
            f"(changed since stored), {result.unchanged} unchanged, {len(result.skipped)} "
            f"skipped, in {result.seconds:.1f} s with {escape(result.model)}"
        )
