"""What every command shares: the stderr console and error handling.

stdout carries data only; everything meant for a person (progress, summaries,
warnings, errors) goes to stderr through :data:`err_console`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from imgrank.errors import ImgrankError, ModelError

F = TypeVar("F", bound=Callable[..., Any])

#: Console for people: progress, summaries, warnings, errors. Never stdout.
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

#: Exit code for Ctrl-C, as shells report SIGINT.
EXIT_INTERRUPTED = 130


def error(message: str) -> None:
    """Print one error line to stderr (escaped so file names with [brackets] show as is)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}")


def warn(message: str, *, quiet: bool = False) -> None:
    """Print one warning line to stderr unless ``quiet``."""
    if quiet:
        return
    from rich.markup import escape

    err_console.print(f"[yellow]warning:[/] {escape(message)}")


#: What to install when an optional heavy dependency is missing.
_MISSING_MODULE_HINTS = {
    "torch": "install PyTorch (pip install torch torchvision), or sort with "
    "--runtime onnx --onnx DIR using a model exported by `imgrank export`",
    "torchvision": "pip install torchvision (open_clip needs it)",
    "open_clip": "pip install open_clip_torch",
    "onnxruntime": "pip install 'imgrank[onnx]' (or 'imgrank[gpu]' on an NVIDIA machine)",
    "onnx": "pip install 'imgrank[onnx]'",
    "tokenizers": "pip install 'imgrank[onnx]'",
    "lxml": "pip install lxml (imgrank reads and writes XMP sidecars with it)",
}


def handle_errors(func: F) -> F:
    """Turn library errors into one message and an exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ImgrankError as exc:
            error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except ModuleNotFoundError as exc:
            hint = _MISSING_MODULE_HINTS.get((exc.name or "").split(".")[0])
            if hint is None:
                raise
            error(f"{exc.name} is not installed: {hint}")
            raise typer.Exit(ModelError.exit_code) from None
        except KeyboardInterrupt:
            error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            # `imgrank sort ... | head` closes our stdout early; that is not an error.
            try:
                sys.stdout = None  # type: ignore[assignment]
            finally:
                raise typer.Exit(0) from None

    return wrapper  # type: ignore[return-value]


def option_given(ctx: typer.Context, parameter: str) -> bool:
    """Whether the user set an option (command line or environment), not Typer's default.

    Commands that take their backbone from a model folder use this to tell
    "the user asked for this model" from "this is the default model".
    """
    source = ctx.get_parameter_source(parameter)
    return source is not None and source.name != "DEFAULT"


def check_before_writing() -> None:
    """The unfinished-run guard: every command that writes files calls it first.

    Raises:
        UnfinishedRunError: an interrupted rename run must be recovered first.
    """
    from imgrank.files.journal import check_no_unfinished_run

    check_no_unfinished_run()

