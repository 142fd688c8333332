"""The prompt cache and warm re-sorts (issue 15): a re-sort by a prompt used before runs no
text tower, and a re-sort of a cached folder imports neither open_clip nor torchvision (nor
torch, for zero-shot and heads).

* each text's features are stored under the text tower's fingerprint, which is computed
  without building anything and equals the built backbone's;
* the open_clip-free tower gives the per-position tokens adapters read (1e-5 of open_clip's);
* a version-2 cache gains the prompt table and keeps its entries; ``cache clear`` clears it;
* a prompt table that cannot be read costs a warning, never the sort.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from safetensors.torch import save_file

from imgrank.features.cache import EmbeddingCache, FileKey, PromptFeatures
from imgrank.models.clip.build import load_backbone
from imgrank.models.clip.config import BackboneSpec
from imgrank.models.clip.light_text import light_text_encoder, text_identity

TEXTS = ["a photo of high image quality.", "a photo of low image quality.", "grain"]


def _weights_file(folder: Path) -> Path:
    """Random but trained-looking weights for the tiny model, saved as a file (seeded)."""
    torch.manual_seed(3)
    spec = BackboneSpec(model=str(TINY_MODEL), pretrained="none")
    model = load_backbone(spec, device="cpu").model
    noisy = {k: v + 0.02 * torch.randn_like(v) for k, v in model.state_dict().items()}
    state = {k: v.contiguous() for k, v in noisy.items()}
    path = folder / "tiny.safetensors"
    save_file(state, path)
    return path


# ------------------------------------------------------------------- text towers


@pytest.mark.parametrize("inline", [False, True], ids=["config-json", "adapter-inline-config"])
def test_light_tower_tokens_and_text_fingerprint_match_the_backbone(
    tmp_path: Path, inline: bool
) -> None:
    weights = _weights_file(tmp_path)
    spec = BackboneSpec(model=str(TINY_MODEL), pretrained=str(weights))
    if inline:  # how an adapter folder names its backbone
        spec = BackboneSpec(
            model="tiny", pretrained=str(weights), model_config=json.loads(TINY_MODEL.read_text())
        )
    light = light_text_encoder(spec, "cpu")
    assert light is not None
    backbone = load_backbone(spec, device="cpu", lazy_image_tower=True)
    ours = light.prompt_features(TEXTS, tokens=True)
    theirs = backbone.prompt_features(TEXTS, tokens=True)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.tokens is not None and reference.tokens is not None
        assert mine.tokens.shape == reference.tokens.shape == (77, 32)  # every position
        assert np.abs(mine.tokens - reference.tokens).max() < 1e-5
        assert np.abs(mine.pooled - reference.pooled).max() < 1e-5
        assert mine.logit_scale == pytest.approx(reference.logit_scale)
    # One key, whoever computes it, and computable before anything is built.
    assert light.text_fingerprint == backbone.text_fingerprint == text_identity(spec, "cpu")
    # The text key ignores the image side: another preprocessing shares the prompt's entry.
    assert light.fingerprint == backbone.fingerprint
    assert text_identity(BackboneSpec(model=str(TINY_MODEL), pretrained="none"), "cpu") == (
        load_backbone(
            BackboneSpec(model=str(TINY_MODEL), pretrained="none"), device="cpu"
        ).text_fingerprint
    )
    assert text_identity(spec, "cpu", "fp16") != text_identity(spec, "cpu")  # another format


# ------------------------------------------------------------------- the table


def test_prompt_entries_round_trip_and_clear_removes_them(tmp_path: Path) -> None:
    with EmbeddingCache.open(tmp_path / "cache.sqlite3") as cache:
        features = PromptFeatures(np.arange(4, dtype=np.float32), 50.0, np.ones((3, 2), np.float32))
        cache.put_prompt("text:a", "a photo of high quality.", features)
        back = cache.get_prompt("text:a", "a photo of high quality.")
        assert back is not None and back.logit_scale == 50.0 and back.tokens is not None
        assert np.array_equal(back.pooled, features.pooled)
        assert np.array_equal(back.tokens, features.tokens)
        assert cache.get_prompt("text:b", "a photo of high quality.") is None
        assert cache.get_prompt("text:a", "a photo of high quality") is None  # the exact text
        assert cache.summary().prompts == 1
        cache.clear()
        assert cache.get_prompt("text:a", "a photo of high quality.") is None
        assert cache.summary().prompts == 0


def test_a_version_2_cache_gains_the_prompt_table_and_keeps_its_entries(tmp_path: Path) -> None:
    db = tmp_path / "cache.sqlite3"
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"not really a photo")
    key = FileKey.of(photo)
    with EmbeddingCache.open(db) as cache:
        cache.put(cache.model_id("fp", "tiny"), key, np.ones(4, np.float32))
    conn = sqlite3.connect(db)  # what imgrank with cache layout 2 left behind
    conn.execute("DROP TABLE prompts")
    conn.execute("UPDATE schema_version SET version = 2")
    conn.commit()
    conn.close()
    warnings: list[str] = []
    with EmbeddingCache.open(db, on_warning=warnings.append) as cache:
        assert warnings == []  # upgraded in place, not moved aside
        assert cache.summary().schema_version == 3
        assert list(cache.get_many(cache.model_id("fp", "tiny"), [key])) == [key.path]
        cache.put_prompt("text:a", "x", PromptFeatures(np.ones(4, np.float32), 1.0))
        assert cache.get_prompt("text:a", "x") is not None


# ------------------------------------------------------------------- sorting

#: Runs the command line, then says which heavy packages the run imported.
_CHILD = (
    "import sys\n"
    "from imgrank.cli import main\n"
    "sys.argv = ['imgrank', *sys.argv[1:]]\n"
    "try:\n"
    "    main()\n"
    "finally:\n"
    "    heavy = ('torch', 'open_clip', 'torchvision')\n"
    "    print('IMPORTED', *[name for name in heavy if name in sys.modules], file=sys.stderr)\n"
)


def _sort(*args: object) -> tuple[dict[str, float], set[str]]:
    """`imgrank sort` in a fresh interpreter: its scores, and which of torch, open_clip and
    torchvision it imported."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, "sort", *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    last = [line for line in done.stderr.splitlines() if line.startswith("IMPORTED")][-1]
    scores = {row["path"]: float(row["score"]) for row in csv.DictReader(io.StringIO(done.stdout))}
    return scores, set(last.split()[1:])


def _close(warm: dict[str, float], cold: dict[str, float], tolerance: float) -> None:
    assert set(warm) == set(cold) and len(cold) == 4
    for path, score in cold.items():
        assert warm[path] == pytest.approx(score, abs=tolerance), path


def test_a_zero_shot_resort_by_a_used_prompt_imports_no_torch(
    photo_dir: Path, tmp_path: Path
) -> None:
    model = ["--model", TINY_MODEL, "--pretrained", _weights_file(tmp_path), "--device", "cpu"]
    cold, imported = _sort(photo_dir, "--by", "image quality", *model)
    assert imported == {"torch", "open_clip", "torchvision"}  # the image tower ran
    warm, imported = _sort(photo_dir, "--by", "image quality", *model)
    assert imported == set()
    _close(warm, cold, 1e-6)
    # A new prompt needs a text tower: the plain one, not open_clip's.
    new, imported = _sort(photo_dir, "--by", "sharpness", *model)
    assert imported == {"torch"}
    reference, _ = _sort(photo_dir, "--by", "sharpness", *model, "--no-cache")
    _close(new, reference, 1e-5)
    # ... and once used, it is served from the cache too.
    again, imported = _sort(photo_dir, "--by", "sharpness", *model)
    assert imported == set()
    _close(again, new, 1e-6)


def test_a_damaged_prompt_table_costs_a_warning_not_the_sort(
    photo_dir: Path, tmp_path: Path
) -> None:
    from imgrank.sorter import SortCallbacks, SortRequest, sort_folder

    db = tmp_path / "cache.sqlite3"
    request = SortRequest(
        folder=photo_dir,
        prompt="image quality",
        model=str(TINY_MODEL),
        pretrained=str(_weights_file(tmp_path)),
        device="cpu",
        cache=db,
    )
    cold = sort_folder(request)
    conn = sqlite3.connect(db)  # a prompt table this imgrank cannot read
    conn.execute("DROP TABLE prompts")
    conn.execute("CREATE TABLE prompts (something TEXT)")
    conn.commit()
    conn.close()
    warnings: list[str] = []
    warm = sort_folder(request, SortCallbacks(warn=warnings.append))
    assert any("prompt" in message for message in warnings), warnings
    assert [i.path for i in warm.items] == [i.path for i in cold.items]
    assert [i.score for i in warm.items] == pytest.approx([i.score for i in cold.items], abs=1e-6)


def test_a_cached_head_resort_imports_no_torch(photo_dir: Path, tmp_path: Path) -> None:
    from imgrank.models.checkpoints import import_head

    rng = np.random.default_rng(0)
    head_file = tmp_path / "linear.safetensors"
    save_file(
        {
            "weight": torch.from_numpy(rng.standard_normal((1, 32)).astype(np.float32)),
            "bias": torch.zeros(1),
        },
        head_file,
    )
    folder = tmp_path / "head"
    import_head(head_file, folder, model=str(TINY_MODEL), pretrained=str(_weights_file(tmp_path)))
    cold, _ = _sort(photo_dir, "--by", "aesthetics", "--adapter", folder, "--device", "cpu")
    warm, imported = _sort(photo_dir, "--by", "aesthetics", "--adapter", folder, "--device", "cpu")
    assert imported == set()
    _close(warm, cold, 1e-6)


def test_a_cached_adapter_resort_skips_open_clip_and_scores_as_before(
    photo_dir: Path, tmp_path: Path
) -> None:
    from imgrank.features.stream import cache_fingerprint, describe_encoder
    from imgrank.models.adapter import AdapterConfig, RankingAdapter
    from imgrank.models.adapter_scoring import AdapterScorer
    from imgrank.models.checkpoints import load_adapter, save_model_folder

    torch.manual_seed(5)
    config = AdapterConfig(
        d_model=32, n_head=2, num_layers=2, num_learnable_text_tokens=2, n_reg_tokens=2
    )
    folder = tmp_path / "adapter"
    spec = BackboneSpec(model=str(TINY_MODEL), pretrained=str(_weights_file(tmp_path)))
    saved = save_model_folder(folder, RankingAdapter(config), spec, prompt_format="a photo with {}")
    db = tmp_path / "cache.sqlite3"
    args = [photo_dir, "--adapter", folder, "--device", "cpu", "--cache", db]
    cold, imported = _sort(*args, "--by", "grain")
    assert "open_clip" in imported  # the image tower ran
    for prompt in ("grain", "blur"):  # a prompt used before, and a new one (the plain tower)
        warm, imported = _sort(*args, "--by", prompt)
        assert "open_clip" not in imported and "torchvision" not in imported, prompt
        # What the adapter scored before this change from the same cached tokens: open_clip's
        # text tower, and the adapter's full forward (text keys and values per image).
        backbone = load_backbone(saved.backbone_spec, device="cpu", lazy_image_tower=True)
        with EmbeddingCache.open(db) as cache:
            model = cache.model_id(cache_fingerprint(backbone), describe_encoder(backbone))
            keys = [FileKey.of(path) for path in sorted(photo_dir.iterdir())]
            found = cache.get_many(model, keys, tokens=True)
        scorer = AdapterScorer(
            load_adapter(saved), backbone, prompt, prompt_format=saved.prompt_format
        )
        tokens = torch.from_numpy(np.stack([found[k.path].tokens for k in keys]))
        with torch.inference_mode():
            reference = scorer.adapter.score(tokens, scorer._text).reshape(-1).tolist()
        expected = dict(zip([k.path for k in keys], reference, strict=True))
        assert set(warm) == set(expected) == set(cold)
        if prompt == "grain":
            # Scored before by the same adapter and prompt: the cold run's scores, from the
            # score cache (the cold run scored float32 tokens; the cache keeps float16).
            assert warm == cold
            continue
        for path, score in expected.items():
            assert warm[path] == pytest.approx(score, abs=1e-5), (prompt, path)

