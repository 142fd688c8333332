"""``imgrank adapter``: import the authors' checkpoints, show what a model folder holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from imgrank.cli.common import check_before_writing, err_console, handle_errors
from imgrank.cli.help import ImgrankCommand, ImgrankGroup
from imgrank.cli.options import PANEL_MODEL, JsonOption, OutFolderOption

app = typer.Typer(
    name="adapter",
    help="Ranking-adapter model folders: import the paper's checkpoints, inspect a folder.",
    no_args_is_help=True,
    cls=ImgrankGroup,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)


@app.command("import", cls=ImgrankCommand)
@handle_errors
def import_checkpoint(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            metavar="CHECKPOINT",
            help="The authors' checkpoint (.pt with a state_dict; read with weights_only=True).",
            show_default=False,
        ),
    ],
    out: OutFolderOption,
    config: Annotated[
        str,
        typer.Option(
            "--config",
            "-c",
            metavar="NAME|JSON",
            help="Their model config JSON, or the name of a config shipped with imgrank "
            "(default: the one of their released checkpoints).",
            rich_help_panel=PANEL_MODEL,
        ),
    ] = "convnext_large_d_320-adapter",
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            metavar="TEXT",
            help="Backbone name to record (default: from the config file name).",
            rich_help_panel=PANEL_MODEL,
        ),
    ] = None,
) -> None:
    """Turn an authors' checkpoint into a self-contained imgrank model folder.

    The folder keeps the CLIP weights from the checkpoint, the adapter, the
    authors' model config and their preprocessing (squash-resize, OpenAI
    mean/std); prompts are passed verbatim. Use it with
    `imgrank sort PHOTOS --by PROMPT --adapter DIR`.

    Example:

        imgrank adapter import count.pt --out ~/models/count
    """
    from imgrank.models.checkpoints import import_authors_checkpoint

    check_before_writing()  # refuse while an interrupted rename run is unsettled

    with err_console.status(f"importing {escape(str(checkpoint))}"):
        folder = import_authors_checkpoint(checkpoint, config, out, model_name=name)
    err_console.print(
        f"imported {escape(str(checkpoint))} into {escape(str(folder.path))} "
        f"({folder.variant} adapter, backbone {escape(folder.backbone_spec.model)})"
    )
    typer.echo(str(folder.path))


@app.command("info", cls=ImgrankCommand)
@handle_errors
def info(
    folder: Annotated[
        Path,
        typer.Argument(metavar="DIR", help="An imgrank model folder.", show_default=False),
    ],
    as_json: JsonOption = False,
) -> None:
    """Show what a model folder holds: adapter, backbone, preprocessing, prompts, provenance."""
    from imgrank.models.checkpoints import (
        CONFIG_FILE,
        load_adapter,
        load_model_folder,
        trained_prompts,
    )

    model = load_model_folder(folder)
    if as_json:
        typer.echo((model.path / CONFIG_FILE).read_text(encoding="utf-8").rstrip("\n"))
        return
    adapter = load_adapter(model)  # also checks that the weights fit the config
    from imgrank.models.adapter import count_parameters

    cfg = model.adapter_config
    spec = model.backbone_spec
    preprocess = spec.preprocess
    weights = model.backbone_weights
    described_adapter = (
        f"{cfg.variant}: width {cfg.d_model}, {cfg.num_layers} layers, {cfg.n_head} heads, "
        f"{cfg.num_learnable_text_tokens} learnable text tokens, {cfg.n_reg_tokens} rank tokens, "
        f"{count_parameters(adapter):,} parameters"
    )
    if weights is not None:
        described_weights = f"{weights.name} in the folder ({_size(weights)})"
    else:
        described_weights = f"open_clip tag {spec.pretrained}"
    prompts = model.prompt_format
    targets = model.target_range
    rows: list[tuple[str, Any]] = [
        ("folder", model.path),
        ("adapter", described_adapter),
        ("backbone", spec.model + (" (config kept in the folder)" if spec.model_config else "")),
        ("weights", described_weights),
        ("preprocess", _describe_preprocess(preprocess) if preprocess else "open_clip default"),
        ("prompts", "verbatim" if prompts == "{}" else f"formatted as {prompts!r}"),
        (
            "targets",
            "unknown" if targets is None else f"{targets[0]:g} to {targets[1]:g} in training",
        ),
    ]
    trained_on = trained_prompts(model)
    if trained_on:
        rows.append(("trained on", "; ".join(repr(p) for p in trained_on)))
    validation = model.source.get("validation")
    if isinstance(validation, dict):
        figures = ", ".join(
            f"{name} {validation[name]:.3f}"
            for name in ("SRCC", "PLCC", "MAE")
            if isinstance(validation.get(name), (int, float))
        )
        chance = "" if validation.get("better_than_chance") else " (no better than chance)"
        rows.append(("validation", f"{figures} at epoch {validation.get('epoch')}{chance}"))
    if model.source:
        rows.append(("source", json.dumps(model.source, sort_keys=True)))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        typer.echo(f"{label:<{width}}  {value}")


def _size(path: Path) -> str:
    size = float(path.stat().st_size)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover - loop always returns


def _describe_preprocess(pp: Any) -> str:
    how = "squash-resize to" if pp.resize_mode == "squash" else "resize + centre-crop to"
    mean = ", ".join(f"{v:g}" for v in pp.mean)
    std = ", ".join(f"{v:g}" for v in pp.std)
    return f"{how} {pp.image_size}x{pp.image_size} ({pp.interpolation}), mean ({mean}), std ({std})"
