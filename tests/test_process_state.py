"""The library leaves the process alone; the command line owns process-wide settings.

And one rule for ``--cache FILE --no-cache`` in every command that reads photos.
"""

from __future__ import annotations

import atexit
import gc
from pathlib import Path

import pytest
from conftest import TINY_MODEL, tiny_args
from typer.testing import CliRunner

from imgrank.cli import app
from imgrank.errors import UsageError

runner = CliRunner()


@pytest.fixture
def odd_thread_count():  # type: ignore[no-untyped-def]
    """A torch thread count nothing in imgrank would choose (one more than the cores)."""
    import torch

    from imgrank.models.device import available_cores

    before = torch.get_num_threads()
    odd = available_cores() + 1
    torch.set_num_threads(odd)
    try:
        yield odd
    finally:
        torch.set_num_threads(before)


def test_a_library_sort_leaves_threads_gc_and_exit_handlers_alone(
    photo_dir: Path, odd_thread_count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from imgrank.sorter import SortRequest, sort_folder

    registered: list[object] = []
    monkeypatch.setattr(atexit, "register", lambda func, *a, **k: registered.append(func))
    frozen, enabled = gc.get_freeze_count(), gc.isenabled()
    ranking = sort_folder(
        SortRequest(
            folder=photo_dir, prompt="x", model=str(TINY_MODEL), pretrained="none", device="cpu",
            use_cache=False,
        )
    )
    assert len(ranking.items) == 4
    assert torch.get_num_threads() == odd_thread_count
    assert gc.freeze not in registered  # imported modules may register their own cleanups
    assert gc.get_freeze_count() == frozen and gc.isenabled() == enabled


def test_the_command_line_sets_the_model_threads(photo_dir: Path, odd_thread_count: int) -> None:
    import torch

    from imgrank.models.device import cpu_threads_for_model

    result = runner.invoke(app, ["sort", str(photo_dir), "--by", "x", "--no-cache", *tiny_args()])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == cpu_threads_for_model()


@pytest.mark.parametrize("command", ["sort", "train", "eval"])
def test_cache_and_no_cache_together_is_a_usage_error_everywhere(
    command: str, photo_dir: Path, tmp_path: Path
) -> None:
    args = {
        "sort": ["sort", str(photo_dir), "--by", "x"],
        "train": ["train", str(photo_dir), "--prompt", "x", "--out", str(tmp_path / "m")],
        "eval": ["eval", str(photo_dir), "--prompt", "x"],
    }[command]
    cache = tmp_path / "c.sqlite3"
    result = runner.invoke(app, [*args, "--cache", str(cache), "--no-cache", *tiny_args()])
    assert result.exit_code == UsageError.exit_code, result.output
    assert "--cache and --no-cache contradict each other" in result.output
    assert not cache.exists() and not (tmp_path / "m").exists()
