"""The public Python API (docs/api.md): the same ranking as `imgrank sort`, runnable docs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import TINY_MODEL, tiny_args
from typer.testing import CliRunner

import imgrank
from imgrank.cli import app

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"
TINY = {"model": str(TINY_MODEL), "pretrained": "none", "device": "cpu"}
runner = CliRunner()


def _quiet(message: str) -> None:
    """on_warning for tests: the random-weights warning is expected."""


def _cli_jsonl(*args: str) -> list[dict[str, object]]:
    result = runner.invoke(app, ["sort", *args, "--format", "jsonl", "--no-cache", *tiny_args()])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def _assert_same_ranking(cli: list[dict[str, object]], ranking: imgrank.Ranking) -> None:
    assert [Path(str(row["path"])) for row in cli] == [item.path for item in ranking.items]
    assert [row["rank"] for row in cli] == [item.rank for item in ranking.items]
    for row, item in zip(cli, ranking.items, strict=True):
        assert item.score == pytest.approx(float(row["score"]), abs=1e-6)  # type: ignore[arg-type]


def test_import_imgrank_is_cheap() -> None:
    code = (
        "import sys, imgrank; imgrank.sort_folder; imgrank.load_model; imgrank.Ranking; "
        "heavy = [m for m in ('torch', 'open_clip', 'onnxruntime') if m in sys.modules]; "
        "print(heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_sort_folder_gives_the_cli_ranking(photo_dir: Path) -> None:
    ranking = imgrank.sort_folder(photo_dir, "image quality", cache=False, on_warning=_quiet, **TINY)
    _assert_same_ranking(_cli_jsonl(str(photo_dir), "--by", "image quality"), ranking)
    assert len(ranking.items) == 4 and ranking.skipped == []

    worst = imgrank.sort_folder(
        photo_dir, "a sharp photo", against="a blurry photo", ascending=True, top=2,
        cache=False, on_warning=_quiet, **TINY,
    )
    _assert_same_ranking(
        _cli_jsonl(str(photo_dir), "--by", "a sharp photo", "--against", "a blurry photo",
                   "--ascending", "--top", "2"),
        worst,
    )


def test_sort_folder_with_an_adapter_gives_the_cli_ranking(photo_dir: Path, tmp_path: Path) -> None:
    import torch

    from imgrank.models.adapter import AdapterConfig, RankingAdapter
    from imgrank.models.clip.config import BackboneSpec
    from imgrank.models.checkpoints import save_model_folder

    torch.manual_seed(0)
    adapter = RankingAdapter(AdapterConfig(d_model=32, num_layers=1, n_head=4)).eval()
    folder = tmp_path / "adapter"
    save_model_folder(folder, adapter, BackboneSpec(model=str(TINY_MODEL), pretrained="none"))

    ranking = imgrank.sort_folder(
        photo_dir, "image quality", adapter=folder, device="cpu", cache=False, on_warning=_quiet
    )
    result = runner.invoke(
        app,
        ["sort", str(photo_dir), "--by", "image quality", "--adapter", str(folder),
         "--device", "cpu", "--no-cache", "--format", "jsonl"],
    )
    assert result.exit_code == 0, result.output
    _assert_same_ranking([json.loads(line) for line in result.stdout.splitlines()], ranking)
    assert "ranking adapter" in ranking.scorer

    model = imgrank.load_model(adapter=folder, device="cpu", on_warning=_quiet)
    scores = model.score([item.path for item in ranking.items], "image quality")
    assert scores.tolist() == pytest.approx([item.score for item in ranking.items], abs=1e-6)


def test_cache_is_true_false_or_a_file(photo_dir: Path, tmp_path: Path) -> None:
    from imgrank.paths import default_cache_db

    imgrank.sort_folder(photo_dir, "x", cache=False, on_warning=_quiet, **TINY)
    assert not default_cache_db().exists()
    own = tmp_path / "own.sqlite3"
    first = imgrank.sort_folder(photo_dir, "x", cache=own, on_warning=_quiet, **TINY)
    again = imgrank.sort_folder(photo_dir, "x", cache=own, on_warning=_quiet, **TINY)
    assert own.exists() and not default_cache_db().exists()
    assert (first.from_cache, again.from_cache) == (0, 4)
    imgrank.sort_folder(photo_dir, "x", on_warning=_quiet, **TINY)
    assert default_cache_db().exists()


def test_a_loaded_model_scores_files_as_the_sort_does_and_pictures_as_files(
    photo_dir: Path, tmp_path: Path
) -> None:
    from PIL import Image

    ranking = imgrank.sort_folder(photo_dir, "image quality", cache=False, on_warning=_quiet, **TINY)
    model = imgrank.load_model(str(TINY_MODEL), "none", device="cpu", on_warning=_quiet)
    paths = [item.path for item in ranking.items]
    scores = model.score(paths, "image quality", batch_size=3)  # other batches than the sort's
    assert scores.tolist() == pytest.approx([item.score for item in ranking.items], abs=1e-6)
    assert [item.path for item in model.rank(paths[::-1], "image quality")] == paths

    # A picture in memory scores as the same picture in a lossless file.
    pictures = [Image.open(p).convert("RGB").resize((96, 64)) for p in paths]
    files = []
    for index, picture in enumerate(pictures):
        files.append(tmp_path / f"{index}.png")
        picture.save(files[-1])
    assert model.score(pictures, "sharpness").tolist() == pytest.approx(
        model.score(files, "sharpness").tolist(), abs=1e-6
    )


def test_warnings_go_to_the_callback_or_the_warnings_module_never_to_stdout(
    photo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[str] = []
    imgrank.sort_folder(photo_dir, "x", cache=False, on_warning=seen.append, **TINY)
    assert any("RANDOM weights" in message for message in seen)
    with pytest.warns(imgrank.ImgrankWarning, match="RANDOM weights"):
        imgrank.load_model(str(TINY_MODEL), "none", device="cpu")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_bad_input_raises_errors_that_name_the_file(photo_dir: Path) -> None:
    from imgrank.errors import ImageDecodeError, UsageError

    with pytest.raises(UsageError, match="does not exist"):
        imgrank.sort_folder(photo_dir / "missing", "x", on_warning=_quiet, **TINY)
    broken = photo_dir / "broken.jpg"
    broken.write_bytes(b"not a photo")
    ranking = imgrank.sort_folder(photo_dir, "x", cache=False, on_warning=_quiet, **TINY)
    assert [s.path.name for s in ranking.skipped] == ["broken.jpg"]
    model = imgrank.load_model(str(TINY_MODEL), "none", device="cpu", on_warning=_quiet)
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        model.score([broken], "x")


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_docs_api_md_examples_run(
    photo_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import imgrank.api

    blocks = _python_blocks()
    assert len(blocks) >= 3
    # The documented defaults (ViT-B-32 with LAION weights) cannot be downloaded here:
    # a tiny random-weight model stands in for them.
    monkeypatch.setattr(imgrank.api, "DEFAULT_MODEL", str(TINY_MODEL))
    monkeypatch.setattr(imgrank.api, "DEFAULT_PRETRAINED", "none")
    monkeypatch.chdir(photo_dir.parent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", imgrank.ImgrankWarning)
        for block in blocks:
            exec(compile(block, str(DOCS), "exec"), {})  # noqa: S102 - our own documentation
    printed = capsys.readouterr().out
    assert len(printed.splitlines()) >= 10  # every example printed what it shows
