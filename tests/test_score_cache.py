"""Adapter scores kept in the embedding cache: a re-sort by a prompt used before runs no adapter.

An adapter's forward is a cached re-sort's whole cost, so ``score_images`` keeps
its scores per file under a key covering the image features, the adapter and
the exact prompt (``RankingModel.scorer`` sets ``scorer.cache_key``).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from typer.testing import CliRunner

from imgrank.cli import app
from imgrank.errors import CacheError
from imgrank.features.cache import EmbeddingCache
from imgrank.features.pipeline import score_images
from imgrank.models.adapter import AdapterConfig, RankingAdapter
from imgrank.models.adapter_scoring import AdapterScorer
from imgrank.models.checkpoints import save_model_folder
from imgrank.models.clip.config import BackboneSpec
from imgrank.models.loading import load_model
from imgrank.models.selection import ModelSelection


def _adapter(folder: Path, seed: int = 5) -> Path:
    torch.manual_seed(seed)
    config = AdapterConfig(
        d_model=32, n_head=2, num_layers=1, num_learnable_text_tokens=2, n_reg_tokens=2
    )
    spec = BackboneSpec(model=str(TINY_MODEL), pretrained="none")
    save_model_folder(folder, RankingAdapter(config), spec)
    return folder


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return _adapter(tmp_path / "adapter")


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many images the torch adapter scored, batch by batch."""
    calls: list[int] = []
    real = AdapterScorer.score

    def counting(self: AdapterScorer, batch: object) -> object:
        scores = real(self, batch)  # type: ignore[arg-type]
        calls.append(len(scores))
        return scores

    monkeypatch.setattr(AdapterScorer, "score", counting)
    return calls


def _scores(folder: Path, photos: Path, cache: Path, prompt: str = "grain") -> dict[Path, float]:
    model = load_model(ModelSelection(adapter=folder, device="cpu"))
    paths = sorted(photos.iterdir())
    with EmbeddingCache.open(cache) as store:
        scorer = model.scorer(prompt, cache=store)
        return dict(score_images(paths, model.image_encoder, scorer, cache=store))


def test_a_resort_by_the_same_prompt_runs_no_adapter_and_gives_the_same_scores(
    adapter: Path, photo_dir: Path, tmp_path: Path, counted: list[int]
) -> None:
    cache = tmp_path / "c.sqlite3"
    first = _scores(adapter, photo_dir, cache)
    assert sum(counted) == 4
    again = _scores(adapter, photo_dir, cache)
    assert sum(counted) == 4  # nothing scored again
    assert again == first  # the very numbers (a cold run scores float32 tokens)
    other = _scores(adapter, photo_dir, cache, prompt="blur")
    assert sum(counted) == 8  # another prompt is another score
    assert other != first


def test_a_changed_photo_or_a_retrained_adapter_is_scored_again(
    adapter: Path, photo_dir: Path, tmp_path: Path, counted: list[int]
) -> None:
    cache = tmp_path / "c.sqlite3"
    _scores(adapter, photo_dir, cache)
    changed = sorted(photo_dir.iterdir())[0]
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    _scores(adapter, photo_dir, cache)
    assert counted == [4, 1]  # only the touched photo
    (adapter / "adapter.safetensors").unlink()
    retrained = _adapter(tmp_path / "retrained", seed=6)
    for name in ("adapter.safetensors",):
        os.replace(retrained / name, adapter / name)
    _scores(adapter, photo_dir, cache)
    assert counted == [4, 1, 4]  # new weights in the same folder: every photo again


def test_cull_does_not_take_scores_from_the_cache(
    adapter: Path, photo_dir: Path, tmp_path: Path, counted: list[int]
) -> None:
    """Culling groups by every photo's embedding, so each must pass through the stream."""
    cache = tmp_path / "c.sqlite3"
    _scores(adapter, photo_dir, cache)
    model = load_model(ModelSelection(adapter=adapter, device="cpu"))
    seen: list[Path] = []
    with EmbeddingCache.open(cache) as store:
        scorer = model.scorer("grain", cache=store)
        score_images(sorted(photo_dir.iterdir()), model.image_encoder, scorer, cache=store,
                     on_features=lambda paths, _pooled, _facts: seen.extend(paths))  # fmt: skip
    assert len(seen) == 4 and counted == [4, 4]


def test_an_unreadable_score_table_costs_a_warning_not_the_run(
    adapter: Path, photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "c.sqlite3"
    expected = _scores(adapter, photo_dir, cache)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise CacheError(f"cannot read the embedding cache {cache}: disk I/O error")

    monkeypatch.setattr(EmbeddingCache, "get_scores", broken)
    monkeypatch.setattr(EmbeddingCache, "put_scores", broken)
    model = load_model(ModelSelection(adapter=adapter, device="cpu"))
    warnings: list[str] = []
    with EmbeddingCache.open(cache) as store:
        scorer = model.scorer("grain", cache=store)
        got = dict(score_images(sorted(photo_dir.iterdir()), model.image_encoder, scorer,
                                cache=store, on_warning=warnings.append))  # fmt: skip
    assert set(got) == set(expected)
    assert any("scored again" in w for w in warnings)
    assert any("not cached" in w for w in warnings)


def test_cache_clear_and_prune_remove_scores(
    adapter: Path, photo_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "c.sqlite3"
    _scores(adapter, photo_dir, cache)

    def rows() -> int:
        with sqlite3.connect(cache) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    assert rows() == 4
    sorted(photo_dir.iterdir())[0].unlink()
    result = CliRunner().invoke(app, ["cache", "prune", "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    assert rows() == 3
    result = CliRunner().invoke(app, ["cache", "clear", "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    assert rows() == 0


def test_the_default_onnx_adapter_keeps_its_scores_too(
    adapter: Path, photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.delenv("IMGRANK_RUNTIME", raising=False)
    monkeypatch.setattr("imgrank.models.device.gpu_present", lambda: False)
    from imgrank.models.onnx_runtime import OnnxAdapterScorer

    model = load_model(ModelSelection(adapter=adapter, runtime="auto"))
    assert model.runtime == "onnx"
    cache = tmp_path / "c.sqlite3"
    paths = sorted(photo_dir.iterdir())
    runs = []
    for _ in range(2):
        with EmbeddingCache.open(cache) as store:
            scorer = model.scorer("grain", cache=store)
            assert isinstance(scorer, OnnxAdapterScorer) and scorer.cache_key
            runs.append(dict(score_images(paths, model.image_encoder, scorer, cache=store)))
        monkeypatch.setattr(OnnxAdapterScorer, "score", lambda *_a: pytest.fail("scored again"))
    assert runs[0] == runs[1] and len(runs[0]) == 4
