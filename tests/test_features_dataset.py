"""`imgrank embed` + `imgrank sort DATASET`: the local ranking from stored features, either engine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import PHOTOS, TINY_MODEL, tiny_args
from typer.testing import CliRunner

from imgrank.cli import app

pytest.importorskip("pyarrow")
runner = CliRunner()
REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def cli(*args: str, model: list[str] | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [*args, *(tiny_args() if model is None else model)])


def ranking(stdout: str) -> list[tuple[str, float]]:
    rows = [json.loads(line) for line in stdout.splitlines()]
    return [(Path(r["path"]).name, r["score"]) for r in rows]


def assert_same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [name for name, _ in got] == [name for name, _ in want]  # order identical
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def variant(source: Path, target: Path, crop: int) -> None:
    """A photo of its own (a crop of ``source``): no two photos tie in a ranking."""
    from PIL import Image

    with Image.open(source) as image:
        image.crop((crop, crop, image.width - crop, image.height - crop)).save(target, quality=90)


@pytest.fixture
def mixed_dir(photo_dir: Path) -> Path:
    (photo_dir / "broken.jpg").write_bytes(b"not a jpeg")
    return photo_dir


def test_sorting_a_dataset_gives_the_folder_ranking_and_embed_adds_only_new_files(
    mixed_dir: Path, tmp_path: Path
) -> None:
    import pandas as pd

    dataset = tmp_path / "features"
    first = cli("embed", str(mixed_dir), "--out", str(dataset))
    assert first.exit_code == 0, first.stderr
    assert "4 photo(s) added, 0 replaced" in first.stderr
    assert "broken.jpg: not an image Pillow can read" in first.stderr
    for prompt in ("image quality", "a cat"):  # embed once, rank by many prompts
        stored = cli("sort", str(dataset), "--by", prompt, "--format", "jsonl")
        assert stored.exit_code == 0, stored.stderr
        folder = cli("sort", str(mixed_dir), "--by", prompt, "--format", "jsonl", "--no-cache")
        assert_same_ranking(ranking(stored.stdout), ranking(folder.stdout))

    # Readable as plain Parquet: pandas needs nothing of imgrank.
    table = pd.read_parquet(dataset)
    assert sorted(table.columns) == ["mtime_ns", "path", "pooled", "size"]
    assert sorted(Path(p).name for p in table["path"]) == sorted(p.name for p in PHOTOS.glob("*.jpg"))
    assert all(Path(p).is_absolute() for p in table["path"])
    assert len(table["pooled"][0]) == 32

    # A changed photo and a new one: only those two are embedded again.
    coffee = mixed_dir / "coffee.jpg"
    variant(PHOTOS / "coffee.jpg", coffee, crop=40)  # other pixels and size under the old name
    variant(PHOTOS / "chelsea.jpg", mixed_dir / "new.jpg", crop=60)
    again = cli("embed", str(mixed_dir), "--out", str(dataset))
    assert again.exit_code == 0, again.stderr
    assert "1 photo(s) added, 1 replaced (changed since stored), 3 unchanged" in again.stderr
    table = pd.read_parquet(dataset)
    assert len(table) == 5 and table["path"].is_unique  # the old coffee row is gone
    assert int(table.loc[table["path"] == str(coffee.absolute()), "size"].iloc[0]) == os.path.getsize(coffee)
    stored = cli("sort", str(dataset), "--by", "image quality", "--format", "jsonl")
    folder = cli("sort", str(mixed_dir), "--by", "image quality", "--format", "jsonl", "--no-cache")
    assert_same_ranking(ranking(stored.stdout), ranking(folder.stdout))
    assert "0 photo(s) added, 0 replaced" in cli("embed", str(mixed_dir), "--out", str(dataset)).stderr


def test_a_dataset_of_another_model_is_refused(photo_dir: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "features"
    assert cli("embed", str(photo_dir), "--out", str(dataset)).exit_code == 0
    other = tmp_path / "other-clip.json"
    config = json.loads(TINY_MODEL.read_text())
    config["vision_cfg"]["layers"] = 2
    other.write_text(json.dumps(config))
    other_model = ["--model", str(other), "--pretrained", "none", "--device", "cpu"]
    refused = cli("sort", str(dataset), "--by", "x", model=other_model)
    assert refused.exit_code == 4
    assert "holds features of" in refused.stderr and "embed the photos again" in refused.stderr
    mixed = cli("embed", str(photo_dir), "--out", str(dataset), model=other_model)
    assert mixed.exit_code == 2 and "Embed into a new folder" in mixed.stderr


def test_embed_refuses_a_folder_that_is_not_a_dataset(photo_dir: Path, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = cli("embed", str(photo_dir), "--out", str(busy))
    assert result.exit_code == 2 and "no _imgrank-features.json" in result.stderr
    assert sorted(os.listdir(busy)) == ["notes.txt"]


def test_an_adapter_ranks_a_dataset_embedded_with_its_backbone_and_tokens(
    photo_dir: Path, tmp_path: Path
) -> None:
    reference = REFERENCE / "vit_tiny"
    if not reference.is_dir():
        pytest.skip(f"{reference} is absent (CI provides ../shared beside the clone)")
    adapter = tmp_path / "adapter"
    imported = runner.invoke(app, ["adapter", "import", str(reference / "checkpoint.pt"),
                                   "--config", str(reference / "config.json"), "--out", str(adapter)])  # fmt: skip
    assert imported.exit_code == 0, imported.stderr
    with_adapter = ["--adapter", str(adapter), "--device", "cpu"]
    pooled_only = tmp_path / "pooled"
    assert cli("embed", str(photo_dir), "--out", str(pooled_only), model=with_adapter).exit_code == 0
    needs_tokens = cli("sort", str(pooled_only), "--by", "x", model=with_adapter)
    assert needs_tokens.exit_code == 2 and "embed again with --tokens" in needs_tokens.stderr

    dataset = tmp_path / "tokens"
    done = cli("embed", str(photo_dir), "--out", str(dataset), "--tokens", model=with_adapter)
    assert done.exit_code == 0, done.stderr
    prompt = "Rank the numbers of horse."
    stored = cli("sort", str(dataset), "--by", prompt, "--format", "jsonl", model=with_adapter)
    assert stored.exit_code == 0, stored.stderr
    folder = cli("sort", str(photo_dir), "--by", prompt, "--format", "jsonl", "--no-cache",
                 model=with_adapter)  # fmt: skip
    assert_same_ranking(ranking(stored.stdout), ranking(folder.stdout))
    # The tiny zero-shot model is another backbone: refused, not silently mis-scored.
    assert cli("sort", str(dataset), "--by", "x").exit_code == 4


@pytest.mark.slow
def test_ray_embed_and_ray_sort_give_the_local_ranking(ray_session, mixed_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dataset = tmp_path / "features"
    embedded = cli("embed", str(mixed_dir), "--out", str(dataset), "--engine", "ray",
                   "--tokens", "--batch-size", "2")  # fmt: skip
    assert embedded.exit_code == 0, embedded.stderr
    assert "4 photo(s) added" in embedded.stderr
    assert "broken.jpg: not an image Pillow can read" in embedded.stderr
    folder = cli("sort", str(mixed_dir), "--by", "image quality", "--format", "jsonl", "--no-cache")
    for engine in ("ray", "local"):
        stored = cli("sort", str(dataset), "--by", "image quality", "--format", "jsonl",
                     "--engine", engine)  # fmt: skip
        assert stored.exit_code == 0, stored.stderr
        assert_same_ranking(ranking(stored.stdout), ranking(folder.stdout))
    variant(PHOTOS / "coffee.jpg", mixed_dir / "again.jpg", crop=30)
    more = cli("embed", str(mixed_dir), "--out", str(dataset), "--engine", "ray")
    assert "1 photo(s) added, 0 replaced (changed since stored), 4 unchanged" in more.stderr
