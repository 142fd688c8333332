"""``imgrank adapter``: import the authors' checkpoints, show what a model folder holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from imgrank.cli.common import check_before_writing, err_console, handle_errors
from imgrank.cli.help import ImgrankCommand, ImgrankGroup
from imgrank.cli.options import (
    PANEL_MODEL,
    JsonOption,
    ModelOption,
    OutFolderOption,
    PretrainedOption,
)

app = typer.Typer(
    name="adapter",
    help="Model folders: import the paper's adapter checkpoints or LAION aesthetic heads, "
    "inspect a folder.",
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
            help="The authors' adapter checkpoint (.pt with a state_dict), or a LAION aesthetic "
            "head (.pth/.pt/.safetensors); read with weights_only=True.",
            show_default=False,
        ),
    ],
    out: OutFolderOption,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            metavar="NAME|JSON",
            help="Adapters: their model config JSON, or the name of a config shipped with "
            "imgrank (default: convnext_large_d_320-adapter, their released checkpoints').",
            rich_help_panel=PANEL_MODEL,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            metavar="TEXT",
            help="Adapters: backbone name to record (default: from the config file name).",
            rich_help_panel=PANEL_MODEL,
        ),
    ] = None,
    # Heads only; the shared options keep their one meaning (a head's backbone).
    model: ModelOption = None,  # type: ignore[assignment]
    pretrained: PretrainedOption = None,  # type: ignore[assignment]
    kind: Annotated[
        str | None,
        typer.Option(
            "--kind",
            metavar="KIND",
            help="Heads: linear-head or mlp-head (default: detected from the file's keys).",
            rich_help_panel=PANEL_MODEL,
        ),
    ] = None,
) -> None:
    """Turn an authors' adapter checkpoint or a LAION head into an imgrank model folder.

    An adapter checkpoint becomes a self-contained folder: the CLIP weights from
    the checkpoint, the adapter, the authors' model config and their
    preprocessing (squash-resize, OpenAI mean/std); prompts are passed verbatim.

    A LAION aesthetic predictor (a linear head, keys weight/bias, or the improved
    predictor's MLP, keys layers.0/2/4/6/7) needs --model and --pretrained: the
    backbone whose embeddings it was trained on. A head whose input width is not
    that backbone's is refused. It scores the image alone: --by only names the
    ranking. See docs/adapter.md.

    Use the folder with `imgrank sort PHOTOS --by PROMPT --adapter DIR`.

    Examples:

        imgrank adapter import count.pt --out ~/models/count

        imgrank adapter import aesthetic.pth -m ViT-L-14 --pretrained openai --out ~/aesthetic
    """
    from imgrank.errors import UsageError
    from imgrank.models.authors import import_authors_checkpoint
    from imgrank.models.checkpoints import import_head, looks_like_head

    check_before_writing()  # refuse while an interrupted rename run is unsettled

    head_options = [
        flag
        for flag, value in (("--model", model), ("--pretrained", pretrained), ("--kind", kind))
        if value is not None
    ]
    if head_options:
        mixed = [flag for flag, value in (("--config", config), ("--name", name)) if value]
        if mixed:
            raise UsageError(
                f"{', '.join(mixed)} apply to the authors' adapter checkpoints, "
                f"{', '.join(head_options)} to heads: give one kind of options"
            )
        if model is None or pretrained is None:
            raise UsageError(
                "a head is trained on one backbone's embeddings: say which with both --model "
                "and --pretrained (e.g. --model ViT-L-14 --pretrained openai)"
            )
        if kind is not None and kind not in ("linear-head", "mlp-head"):
            raise UsageError(f"--kind must be linear-head or mlp-head, not {kind!r}")
        with err_console.status(f"importing {escape(str(checkpoint))}"):
            folder = import_head(checkpoint, out, model=model, pretrained=pretrained, kind=kind)
        err_console.print(
            f"imported {escape(str(checkpoint))} into {escape(str(folder.path))} "
            f"({folder.head.label if folder.head else folder.kind} on backbone "
            f"{escape(folder.backbone_spec.model)})"
        )
        typer.echo(str(folder.path))
        return
    if looks_like_head(checkpoint):
        raise UsageError(
            f"{checkpoint} holds a linear/MLP head, not an adapter checkpoint: say which backbone "
            "it was trained on with --model and --pretrained (e.g. --model ViT-L-14 "
            "--pretrained openai)"
        )
    with err_console.status(f"importing {escape(str(checkpoint))}"):
        folder = import_authors_checkpoint(
            checkpoint, config or "convnext_large_d_320-adapter", out, model_name=name
        )
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
    """Show what a model folder holds: adapter or head, backbone, preprocessing, provenance."""
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
    from imgrank.models.adapter import count_parameters

    if model.head is not None:
        from imgrank.models.checkpoints import load_head

        head = load_head(model)  # also checks that the weights fit the config
        label, described_adapter = "head", (
            f"{model.head.kind}: reads the {model.head.input_dim}-wide normalised image "
            f"embedding, {count_parameters(head):,} parameters; the prompt's words are not read"
        )
    else:
        adapter = load_adapter(model)  # also checks that the weights fit the config
        cfg = model.adapter_config
        assert cfg is not None
        label, described_adapter = "adapter", (
            f"{cfg.variant}: width {cfg.d_model}, {cfg.num_layers} layers, {cfg.n_head} heads, "
            f"{cfg.num_learnable_text_tokens} learnable text tokens, {cfg.n_reg_tokens} rank "
            f"tokens, {count_parameters(adapter):,} parameters"
        )
    spec = model.backbone_spec
    preprocess = spec.preprocess
    weights = model.backbone_weights
    if weights is not None:
        described_weights = f"{weights.name} in the folder ({_size(weights)})"
    else:
        described_weights = f"open_clip tag {spec.pretrained}"
    prompts = model.prompt_format
    targets = model.target_range
    rows: list[tuple[str, Any]] = [
        ("folder", model.path),
        (label, described_adapter),
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
