"""``imgrank cache info|prune|clear``: look after the embedding cache.

The cache (see :mod:`imgrank.features.cache`) only holds re-creatable features of
photos; nothing here touches a photo. Data (the info table or JSON) goes to
stdout; summaries of what was removed go to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from imgrank.cli.common import err_console, handle_errors
from imgrank.cli.help import ImgrankCommand, ImgrankGroup
from imgrank.cli.options import CacheOption, JsonOption

if TYPE_CHECKING:
    from imgrank.features.cache import EmbeddingCache

app = typer.Typer(
    name="cache",
    help="The embedding cache that makes re-sorting a folder nearly free: info, prune, clear.",
    no_args_is_help=True,
    cls=ImgrankGroup,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)



def _path(cache: Path | None) -> Path:
    from imgrank.paths import default_cache_db

    return (cache or default_cache_db()).expanduser().absolute()


def _disk_usage(path: Path) -> int:
    from imgrank.features.cache import disk_usage

    return disk_usage(path)


def _open(path: Path) -> EmbeddingCache | None:
    from imgrank.features.cache import open_existing

    return open_existing(path)


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _freed(before: int, after: int) -> str:
    """What the cache files took on disk before and after, measured, not estimated."""
    return f"{_size(max(0, before - after))} freed (cache {_size(before)} -> {_size(after)})"


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds))


@app.command("info", cls=ImgrankCommand)
@handle_errors
def info(
    cache: CacheOption = None,
    as_json: JsonOption = False,
    check: Annotated[
        bool,
        typer.Option("--check", help="Also run SQLite's integrity check (reads the whole file)."),
    ] = False,
) -> None:
    """Show where the cache is, its size on disk, and its entries per model."""
    path = _path(cache)
    store = _open(path)
    if store is None:
        if as_json:
            print(json.dumps({"path": str(path), "exists": False, "entries": 0, "models": []}))
        else:
            print(f"no embedding cache at {path} yet (the first `imgrank sort` creates it)")
        return
    with store:
        summary = store.summary()
        integrity = store.integrity_check() if check else None
    from imgrank.models.auto_export import exports_dir, exports_on_disk

    exports, export_bytes = exports_on_disk()
    if as_json:
        record = {
            "path": str(summary.path),
            "exists": True,
            "disk_bytes": summary.disk_bytes,
            "entries": summary.entries,
            "schema_version": summary.schema_version,
            "prompts": summary.prompts,
            "onnx_exports": {
                "folder": str(exports_dir()),
                "count": exports,
                "disk_bytes": export_bytes,
            },
            "models": [
                {
                    "fingerprint": m.fingerprint,
                    "description": m.description,
                    "entries": m.entries,
                    "payload_bytes": m.payload_bytes,
                    "bytes_per_entry": round(m.bytes_per_entry, 1),
                    "last_used": _iso(m.last_used_at),
                }
                for m in summary.models
            ],
        }
        if integrity is not None:
            record["integrity"] = integrity
        print(json.dumps(record))
        return

    from rich.console import Console
    from rich.table import Table

    out = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    out.print(f"cache:   {escape(str(summary.path))}")
    out.print(f"on disk: {_size(summary.disk_bytes)}")
    out.print(f"entries: {summary.entries}")
    out.print(f"prompts: {summary.prompts}")
    if exports:
        # Not part of the cache file: models exported once for the default runtime
        # (docs/performance.md); deleting the folder is safe, the next sort remakes them.
        out.print(
            f"automatic ONNX exports: {exports}, {_size(export_bytes)} in "
            f"{escape(str(exports_dir()))}"
        )
    if integrity is not None:
        out.print(f"check:   {escape('; '.join(integrity[:5]))}")
    if summary.models:
        table = Table(show_edge=False, pad_edge=False)
        for column in ("model", "entries", "per image", "last used", "fingerprint"):
            table.add_column(
                column, justify="right" if column in ("entries", "per image") else "left"
            )
        for m in summary.models:
            table.add_row(
                escape(m.description),
                str(m.entries),
                _size(m.bytes_per_entry),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(m.last_used_at)),
                m.fingerprint,
            )
        out.print(table)


@app.command("prune", cls=ImgrankCommand)
@handle_errors
def prune(cache: CacheOption = None) -> None:
    """Remove entries of photos that were deleted, moved or changed since they were cached.

    Photos on a disk that is not mounted look deleted: mount it first.
    """
    path = _path(cache)
    before = _disk_usage(path)  # the files as they are, measured with nothing open
    store = _open(path)
    if store is None:
        err_console.print(f"no embedding cache at {escape(str(path))}: nothing to prune")
        return
    with store:
        result = store.prune()
    after = _disk_usage(path)
    err_console.print(
        f"pruned {result.missing} entr{'y' if result.missing == 1 else 'ies'} of missing files "
        f"and {result.changed} of changed files; kept {result.kept}; {_freed(before, after)}"
    )


@app.command("clear", cls=ImgrankCommand)
@handle_errors
def clear(cache: CacheOption = None) -> None:
    """Remove every entry and cached prompt (the next sort of a folder embeds its photos again)."""
    path = _path(cache)
    before = _disk_usage(path)  # the files as they are, measured with nothing open
    store = _open(path)
    if store is None:
        err_console.print(f"no embedding cache at {escape(str(path))}: nothing to clear")
        return
    with store:
        removed = store.clear()
    after = _disk_usage(path)
    err_console.print(
        f"cleared {removed} entr{'y' if removed == 1 else 'ies'}; {_freed(before, after)}"
    )
