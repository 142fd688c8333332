"""`--help` is readable, options mean one thing everywhere, and docs/cli.md documents them all."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from imgrank.cli import app

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

def _every_command() -> list[tuple[str, ...]]:
    """Every command, as typed, read from the app itself so a new command cannot be missed."""
    group = typer.main.get_command(app)
    ctx = group.make_context("imgrank", ["--help"], resilient_parsing=True)
    paths: list[tuple[str, ...]] = []
    for name in sorted(group.list_commands(ctx)):  # type: ignore[attr-defined]
        command = group.get_command(ctx, name)  # type: ignore[attr-defined]
        if hasattr(command, "list_commands"):  # a group such as `cache` or `adapter`
            paths += [(name, sub) for sub in sorted(command.list_commands(ctx))]
        else:
            paths.append((name,))
    return paths


#: Every command, as typed.
COMMANDS = _every_command()


def _command(path: tuple[str, ...]):  # type: ignore[no-untyped-def]
    import click

    group = typer.main.get_command(app)
    command = group
    ctx = click.Context(group) if isinstance(group, click.Command) else None
    for name in path:
        command = command.get_command(ctx, name)  # type: ignore[union-attr]
    return command


def _long_options(path: tuple[str, ...]) -> set[str]:
    names: set[str] = set()
    for param in _command(path).params:
        if getattr(param, "param_type_name", "") != "option":
            continue
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("--"):
                names.add(name)
    return names


def _help(path: tuple[str, ...], columns: int = 80) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_at_80_columns_shows_every_option_whole_and_no_type_noise(
    path: tuple[str, ...],
) -> None:
    text = _help(path)
    assert max(len(line) for line in text.splitlines()) <= 80
    for noise in ("<bool>", "<str>", "<path>", "<int>", "<float>"):
        assert noise not in text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage  # "FOLDER", not "{FOLDER}"
    assert "…" not in text  # nothing cut off, e.g. "--include-hidd…"
    for name in _long_options(path):
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{name} not shown whole"


def test_sort_help_groups_options_lists_choices_and_fits_a_screenful_or_two() -> None:
    text = _help(("sort",))
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "imgrank sort [OPTIONS] [SRC]" in usage
    for panel in ("Ranking", "Model", "Input", "Output", "Renaming photos", "Embedding cache"):
        assert f"─ {panel} ─" in text
    assert "csv|jsonl|paths" in text  # --format lists its choices
    assert "torch|onnx" in text
    # Before the panels and metavars: 204 lines for 30 options, 6.8 per option.
    assert len(text.splitlines()) < 5 * len(_long_options(("sort",)))


def test_a_choice_option_refuses_a_typo_before_any_work(photo_dir: Path) -> None:
    result = runner.invoke(app, ["sort", str(photo_dir), "--by", "x", "--format", "xml"])
    assert result.exit_code == 2
    assert "xml" in result.output and "csv" in result.output


def test_shared_options_mean_the_same_in_every_command() -> None:
    """--model, --cache, --device ... carry one help text and metavar wherever they appear."""
    seen: dict[str, tuple[str | None, str | None]] = {}
    shared = {"--model", "--pretrained", "--adapter", "--device", "--cache", "--no-cache",
              "--workers", "--quiet", "--json", "--out", "--prompt"}
    for path in COMMANDS:
        for param in _command(path).params:
            for name in set(getattr(param, "opts", [])) & shared:
                if (name, path) == ("--out", ("embed",)):
                    continue  # an embed dataset may also be an earlier one, to add to
                described = (param.help, param.metavar)
                assert seen.setdefault(name, described) == described, f"{name} in {path}"
    assert shared <= set(seen)


def _doc_sections() -> dict[str, str]:
    """``## `imgrank ...` `` sections of docs/cli.md, by heading."""
    text = DOCS.read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.MULTILINE)
    return {part.splitlines()[0]: part for part in parts[1:] if part.startswith("`imgrank")}


def _section_of(path: tuple[str, ...], sections: dict[str, str]) -> str:
    for heading, body in sections.items():
        if re.search(rf"imgrank {path[0]}\b", heading):
            return body
    raise AssertionError(f"docs/cli.md has no section for imgrank {path[0]}")


def test_docs_cli_md_documents_every_option_and_no_other() -> None:
    sections = _doc_sections()
    missing = []
    for path in COMMANDS:
        body = _section_of(path, sections)
        missing += [f"imgrank {' '.join(path)} {name}" for name in sorted(_long_options(path))
                    if name != "--help" and name not in re.findall(r"--[a-z][a-z0-9-]*", body)]
    assert not missing, "not in docs/cli.md: " + ", ".join(missing)

    everywhere = set().union(*(_long_options(path) for path in COMMANDS))
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", DOCS.read_text(encoding="utf-8")))
    unknown = sorted(documented - everywhere - {"--help", "--version"})
    assert not unknown, "docs/cli.md names options no command has: " + ", ".join(unknown)


@pytest.mark.parametrize("path", [(), ("cache",), ("adapter",)], ids=["imgrank", "cache", "adapter"])
def test_group_help_has_no_type_noise_either(path: tuple[str, ...]) -> None:
    text = _help(path)
    assert "<bool>" not in text and "Usage:" in text
