"""The image tower's forward, written once and configured once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from conftest import TINY_MODEL

from imgrank.models.clip.build import load_backbone
from imgrank.models.clip.config import BackboneSpec


def test_the_tower_is_configured_once_and_never_toggled() -> None:
    backbone = load_backbone(BackboneSpec(model=str(TINY_MODEL), pretrained="none"), device="cpu")
    visual = backbone.model.visual
    assert visual.output_tokens is True  # set when built, so no call has to flip it
    pixels = torch.randn(2, 3, 32, 32)
    plain = backbone.encode_images(pixels)
    with_tokens = backbone.encode_images(pixels, tokens=True)
    assert plain.tokens is None and with_tokens.tokens is not None
    assert torch.equal(plain.pooled, with_tokens.pooled)
    assert visual.output_tokens is True
    # The same pooled output as open_clip's own encode_image on a plain tower.
    visual.output_tokens = False
    try:
        with torch.inference_mode():
            expected = backbone.model.encode_image(pixels)
    finally:
        visual.output_tokens = True
    assert torch.allclose(plain.pooled, expected, atol=1e-6)


def test_a_resnet_tower_gives_pooled_features_and_no_tokens(tmp_path: Path) -> None:
    config = json.loads(TINY_MODEL.read_text())
    config["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8}
    path = tmp_path / "tiny-rn.json"
    path.write_text(json.dumps(config))
    backbone = load_backbone(BackboneSpec(model=str(path), pretrained="none"), device="cpu")
    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    features = backbone.encode_pixels(pixels, tokens=True)
    assert features.pooled.shape == (2, 32) and features.tokens is None
