"""``imgrank export``: write the backbone (and an adapter) as ONNX for ``sort --runtime onnx``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from imgrank.cli.common import (
    check_before_writing,
    err_console,
    handle_errors,
    option_given,
    prepare_torch,
    warn,
)
from imgrank.cli.options import (
    PANEL_OUTPUT,
    AdapterOption,
    ModelOption,
    OutFolderOption,
    PretrainedOption,
    QuietOption,
)
from imgrank.models.clip.config import DEFAULT_MODEL, DEFAULT_PRETRAINED


@handle_errors
def export(
    ctx: typer.Context,
    out: OutFolderOption,
    model: ModelOption = DEFAULT_MODEL,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    adapter: AdapterOption = None,
    opset: Annotated[
        int,
        typer.Option(
            "--opset", metavar="N", help="ONNX operator set version.", rich_help_panel=PANEL_OUTPUT
        ),
    ] = 17,
    quiet: QuietOption = False,
) -> None:
    """Export the model to ONNX so `imgrank sort --runtime onnx --onnx DIR` runs without torch.

    Writes the image encoder, the text encoder, the adapter's scoring head
    (with --adapter), the tokenizer and the preprocessing settings to --out.
    Every graph passes onnx.checker and is compared with torch on random
    inputs; an export drifting more than 1e-4 relative is refused (exit code 4)
    and nothing is written.

    Examples:

        imgrank export --out ./vit-b-32-onnx

        imgrank export --out ./quality-onnx --adapter ./my-quality-adapter
    """
    from imgrank.models.loading import export_model

    check_before_writing()  # refuse while an interrupted rename run is unsettled
    prepare_torch()

    def progress(step: str) -> None:
        if not quiet:
            err_console.print(f"exporting {escape(step)}...")

    if adapter is not None:
        # With an adapter, --model/--pretrained count only when typed: the folder names
        # its own backbone.
        model_arg = model if option_given(ctx, "model") else None
        pretrained_arg = pretrained if option_given(ctx, "pretrained") else None
    else:
        model_arg, pretrained_arg = model, pretrained
    result = export_model(
        out,
        model=model_arg,
        pretrained=pretrained_arg,
        adapter_dir=adapter,
        opset=opset,
        warn=lambda message: warn(message, quiet=quiet),
        progress=progress,
    )
    if not quiet:
        worst = max(result.drift.values(), default=0.0)
        err_console.print(
            f"exported {len(result.files)} files to {escape(str(result.folder))} "
            f"(largest drift from torch {worst:.1e} relative); sort with "
            f"`imgrank sort FOLDER --by ... --runtime onnx --onnx {escape(str(result.folder))}`"
        )

