"""The open_clip-free text tower that lets a cached re-sort start in a second.

It must give the text features open_clip gives, carry the same cache
fingerprint as the full backbone, and be used only when every photo is cached.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from safetensors.torch import save_file

from imgrank.models.clip.build import load_backbone
from imgrank.models.clip.config import BackboneSpec
from imgrank.models.clip.light_text import light_text_encoder

TEXTS = ["a photo of high image quality.", "a photo of low image quality.", "Rank the numbers of horse."]


def _weights_file(config_path: Path, folder: Path, name: str = "w.safetensors") -> Path:
    """Random but trained-looking weights for a config, saved as a file (seeded)."""
    torch.manual_seed(1)
    model = load_backbone(BackboneSpec(model=str(config_path), pretrained="none"), device="cpu").model
    state = {k: (v + 0.02 * torch.randn_like(v)).contiguous() for k, v in model.state_dict().items()}
    path = folder / name
    save_file(state, path)
    return path


@pytest.fixture
def quick_gelu_model(tmp_path: Path) -> Path:
    config = json.loads(TINY_MODEL.read_text())
    config["quick_gelu"] = True
    config["text_cfg"]["layers"] = 2
    path = tmp_path / "tiny-quickgelu.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("variant", ["gelu", "quick_gelu"])
def test_light_tower_matches_open_clip(variant: str, tmp_path: Path, quick_gelu_model: Path) -> None:
    config_path = TINY_MODEL if variant == "gelu" else quick_gelu_model
    weights = _weights_file(config_path, tmp_path)
    spec = BackboneSpec(model=str(config_path), pretrained=str(weights))
    light = light_text_encoder(spec, "cpu")
    assert light is not None
    backbone = load_backbone(spec, device="cpu")
    pooled, scale = light.encode(TEXTS)
    expected = backbone.encode_text(TEXTS).pooled.numpy()
    assert np.abs(pooled - expected).max() < 1e-5
    assert scale == pytest.approx(min(float(backbone.model.logit_scale.exp()), 100.0))
    # Same cache key as the backbone: features the full path stored are found.
    assert light.fingerprint == backbone.fingerprint


def test_only_plain_configs_and_weight_files_qualify(tmp_path: Path) -> None:
    assert light_text_encoder(BackboneSpec(model=str(TINY_MODEL), pretrained="none"), "cpu") is None
    exotic = json.loads(TINY_MODEL.read_text())
    exotic["text_cfg"]["pool_type"] = "last"
    path = tmp_path / "exotic.json"
    path.write_text(json.dumps(exotic))
    weights = _weights_file(TINY_MODEL, tmp_path)
    assert light_text_encoder(BackboneSpec(model=str(path), pretrained=str(weights)), "cpu") is None
    # A pretrained tag never resolved on this machine: the full path downloads or explains.
    assert light_text_encoder(BackboneSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k"), "cpu") is None


def test_a_warm_model_builds_the_backbone_when_a_photo_needs_encoding(
    tmp_path: Path, photo_dir: Path
) -> None:
    from imgrank.features.cache import EmbeddingCache
    from imgrank.features.pipeline import score_images
    from imgrank.models.loading import load_model
    from imgrank.models.selection import ModelSelection

    weights = _weights_file(TINY_MODEL, tmp_path)
    spec = BackboneSpec(model=str(TINY_MODEL), pretrained=str(weights))
    selection = ModelSelection(model=spec.model, pretrained=spec.pretrained, device="cpu")
    paths = sorted(photo_dir.iterdir())
    with EmbeddingCache.open(tmp_path / "cache.sqlite3") as cache:
        cold = load_model(selection)
        assert not cold.fully_cached(paths, cache)
        score_images(paths, cold.image_encoder, cold.scorer("quality"), cache=cache)
        warm = load_model(selection)
        assert warm.fully_cached(paths, cache)
        warm.scorer("quality", images_cached=True)
        assert warm._backbone is None  # served by the light text tower
        # Same cache key as the backbone a cold run builds.
        assert warm.fingerprint == cold.fingerprint
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = warm.image_encoder.encode_pixels(pixels)  # a photo changed after the check
    expected = load_backbone(spec, device="cpu").encode_pixels(pixels)
    assert np.allclose(got.pooled, expected.pooled, atol=1e-6)


def _sort_in_process(folder: Path, prompt: str, weights: Path, *extra: str) -> tuple[str, bool]:
    """Run `imgrank sort` in a fresh interpreter; CSV output and whether open_clip was imported."""
    code = (
        "import sys\n"
        "from imgrank.cli import app\n"
        "try:\n"
        "    app(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n"
        "    print('OPEN_CLIP_IMPORTED' if 'open_clip' in sys.modules else 'NO_OPEN_CLIP', file=sys.stderr)\n"
    )
    args = ["sort", str(folder), "--by", prompt, "--model", str(TINY_MODEL),
            "--pretrained", str(weights), "--device", "cpu", *extra]  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout, "OPEN_CLIP_IMPORTED" in done.stderr


def _scores(table: str) -> dict[str, float]:
    return {row["path"]: float(row["score"]) for row in csv.DictReader(io.StringIO(table))}


def test_cached_resort_by_a_new_prompt_skips_open_clip_and_scores_the_same(
    photo_dir: Path, tmp_path: Path
) -> None:
    weights = _weights_file(TINY_MODEL, tmp_path)
    _first, imported = _sort_in_process(photo_dir, "image quality", weights)
    assert imported  # a cold run needs the image tower
    warm, imported = _sort_in_process(photo_dir, "sharpness", weights)
    assert not imported, "every photo was cached: the prompt should be encoded without open_clip"
    reference, _ = _sort_in_process(photo_dir, "sharpness", weights, "--no-cache")
    got, expected = _scores(warm), _scores(reference)
    assert set(got) == set(expected) and len(got) == 4
    for path, score in expected.items():
        assert got[path] == pytest.approx(score, abs=2e-6)
    # A changed photo is not in the cache: the full backbone runs again.
    (photo_dir / "coffee.jpg").write_bytes((photo_dir / "rocket.jpg").read_bytes())
    _changed, imported = _sort_in_process(photo_dir, "sharpness", weights)
    assert imported
