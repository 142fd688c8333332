"""``--precision``: the torch image tower's number format, and the cache keeping formats apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, tiny_args
from typer.testing import CliRunner

from imgrank.cli import app
from imgrank.errors import UsageError
from imgrank.models.clip.build import load_backbone
from imgrank.models.clip.config import BackboneSpec
from imgrank.models.selection import ModelSelection

SPEC = BackboneSpec(model=str(TINY_MODEL), pretrained="none")


def test_bf16_runs_the_image_tower_only_in_bfloat16_and_changes_the_fingerprint() -> None:
    fp32 = load_backbone(SPEC, device="cpu", precision="fp32")
    bf16 = load_backbone(SPEC, device="cpu", precision="bf16")
    assert next(bf16.model.visual.parameters()).dtype == torch.bfloat16
    assert next(bf16.model.transformer.parameters()).dtype == torch.float32  # text: float32
    assert bf16.fingerprint != fp32.fingerprint
    # float32 adds nothing to the fingerprint: caches written before precision counted stay valid
    assert fp32.fingerprint == load_backbone(SPEC, device="cpu").fingerprint
    pixels = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    a = fp32.encode_pixels(pixels).pooled
    b = bf16.encode_pixels(pixels).pooled
    assert b.dtype == np.float32
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99
    text_a = fp32.encode_text(["image quality"]).pooled
    text_b = bf16.encode_text(["image quality"]).pooled
    torch.testing.assert_close(text_a, text_b)  # the prompt's features do not depend on it


def test_an_unknown_precision_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="bf16"):
        ModelSelection(precision="int8").resolve()


def test_sorting_in_bf16_does_not_reuse_float32_features(photo_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "c.sqlite3"
    base = ["sort", str(photo_dir), "--by", "image quality", *tiny_args(), "--cache", str(cache)]
    for extra in ([], ["--precision", "bf16"], ["--precision", "bf16"]):
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 0, result.output
    info = CliRunner().invoke(app, ["cache", "info", "--cache", str(cache)])
    assert info.exit_code == 0, info.output
    # two models (float32 and bfloat16), four photos each: the second bf16 run hit the cache
    assert "entries: 8" in info.output
