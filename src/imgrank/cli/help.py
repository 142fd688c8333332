"""How ``imgrank COMMAND --help`` reads: the command class every command is registered with.

Typer labels every parameter with its Python type (``<bool>`` after each
flag, ``<path>`` after an argument) and braces required arguments in the
usage line (``{FOLDER}``). Flags take no value and an argument's metavar
already says what it is, so these labels only crowd an 80-column terminal;
this class drops them and leaves everything else (panels, choices,
defaults) to Typer. Options declare their own metavars (:mod:`imgrank.cli.options`).
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand, TyperGroup


def _no_type_label(*_args: Any, **_kwargs: Any) -> None:
    return None


def _drop_type_labels(command: Any, ctx: Any) -> None:
    # Duck-typed: recent Typer versions bring their own copy of click's classes.
    for param in command.get_params(ctx):
        kind = getattr(param, "param_type_name", "")
        if kind == "option" and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # a flag takes no value: nothing to label
        elif kind == "argument" and hasattr(param, "display_type_rich"):
            # The argument's metavar (FOLDER, LABELS) already names what it takes.
            param.display_type_rich = _no_type_label  # type: ignore[method-assign]
        elif kind == "argument" and not isinstance(param.type, _Unlabelled):
            # Typer before 0.29 labels an argument with its type's metavar instead.
            param.type = _Unlabelled(param.type)


class _Unlabelled:
    """A parameter type that converts as the one it wraps but has no metavar to show.

    Only help text reads metavars; a command printing its help exits right after.
    """

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def get_metavar(self, *_args: Any, **_kwargs: Any) -> str:
        return ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped(*args, **kwargs)


class ImgrankGroup(TyperGroup):
    """``imgrank``, ``imgrank cache``, ``imgrank adapter``: the same tidy help as the commands."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _drop_type_labels(self, ctx)
        super().format_help(ctx, formatter)


class ImgrankCommand(TyperCommand):
    """A Typer command whose help shows no type labels for flags and arguments."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _drop_type_labels(self, ctx)
        super().format_help(ctx, formatter)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        # "imgrank sort [OPTIONS] FOLDER", not "{FOLDER}": the usual Unix notation.
        pieces: list[Any] = super().collect_usage_pieces(ctx)
        return [
            piece[1:-1] if piece.startswith("{") and piece.endswith("}") else piece
            for piece in pieces
        ]
