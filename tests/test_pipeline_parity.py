"""The fast path must not move rankings.

The pipeline decodes JPEGs at reduced DCT scale (draft mode) in a thread pool
and batches them; the reference here is the straightforward path a reader can
check by eye: open each file, decode it at full size, the same preprocessing
(``resize_for_model`` + ``to_normalized_array``), one image at a time. The
issue's bar is a Spearman correlation of at least 0.999 between the two;
embeddings are also compared image by image, which is the stricter check.

Photo-like inputs: the four real photos, varied (crops, mirror, exposure,
blur), upscaled to several sizes with sensor-like grain so that each DCT
scale (1/2, 1/4, 1/8) is exercised, plus a large PNG (no draft decoding) and
a JPEG whose EXIF orientation says "rotate".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from imgrank.features.pipeline import score_images
from imgrank.images.decode import open_image, resize_for_model, to_normalized_array
from imgrank.models.scoring import FeatureBatch, ZeroShotScorer

PHOTOS = Path(__file__).parent / "data" / "photos"

#: A small random-weight ViT with a 112 px input: cheap, and its 2x draft
#: target (224 px) makes photos of 1000-2400 px decode at 1/2, 1/4 and 1/8 scale.
MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 112, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

#: (width, height) of the generated photos, cycled; the comment is the draft scale at 2x112 px.
SIZES = [
    (1600, 1200),  # 1/4
    (1200, 1600),  # 1/4
    (2400, 1800),  # 1/8
    (1000, 750),  # 1/2
    (1800, 1350),  # 1/4
]


def make_photos(folder: Path, variants: int) -> list[Path]:
    """``variants`` photo-like JPEGs per real photo, a large PNG and an EXIF-rotated JPEG."""
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    rng = np.random.default_rng(0)
    # One field of sensor-like grain (luminance plus weaker per-channel noise), cut
    # at a random place for each photo: drawing fresh noise per photo costs seconds.
    shape = (1800 + 64, 2400 + 64)
    grain = rng.normal(0, 4, (*shape, 1)) + rng.normal(0, 2, (*shape, 3))
    grain = grain.astype(np.float32)
    paths: list[Path] = []
    for i, source in enumerate(sorted(PHOTOS.glob("*.jpg"))):
        base = Image.open(source).convert("RGB")
        for j in range(variants):
            image = ImageOps.mirror(base) if j % 2 else base
            w, h = image.size
            c = 0.012 * j
            image = image.crop(
                (int(w * c), int(h * c * 0.5), int(w * (1 - c / 2)), int(h * (1 - c)))
            )
            image = ImageEnhance.Brightness(image).enhance(0.55 + 0.05 * j)
            image = ImageEnhance.Contrast(image).enhance(0.8 + 0.05 * ((i + j) % 5))
            if j in (3, 6, 11):
                image = image.filter(ImageFilter.GaussianBlur(1.5 + j / 3))
            size = SIZES[(i + j) % len(SIZES)]
            image = image.resize(size, Image.Resampling.BICUBIC)
            top, left = rng.integers(0, 64, 2)
            pixels = np.asarray(image, dtype=np.float32)
            pixels += grain[top : top + size[1], left : left + size[0]]
            out = folder / f"{source.stem}-{j}.jpg"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, quality=90)
            paths.append(out)

    big_png = folder / "big.png"
    ImageOps.autocontrast(Image.open(paths[0])).save(big_png)  # unlike any JPEG here
    rotated = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate 90 degrees
    turned = Image.open(paths[1]).transpose(Image.Transpose.ROTATE_90)
    turned.save(rotated, quality=92, exif=exif)
    return [*paths, big_png, rotated]


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """18 photos: every draft scale, a PNG and a rotated JPEG (fast enough for every run)."""
    return make_photos(tmp_path_factory.mktemp("parity-photos"), variants=4)


@pytest.fixture(scope="module")
def large_photo_set(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """62 photos: enough that Spearman measures the pipeline, not a near-tie or two.

    With random weights, zero-shot scores crowd together (a spread of about 1e-2
    against decode differences of about 1e-4), so among 18 photos one swapped
    near-tie alone costs 0.0025 of Spearman; among 62 it costs 0.00005.
    """
    return make_photos(tmp_path_factory.mktemp("parity-photos-large"), variants=15)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory):
    from imgrank.models.clip.build import load_backbone
    from imgrank.models.clip.config import BackboneSpec

    config = tmp_path_factory.mktemp("parity-model") / "vit-112.json"
    config.write_text(json.dumps(MODEL_CONFIG))
    return load_backbone(BackboneSpec(model=str(config), pretrained="none"), device="cpu")


class Recorder:
    """A scorer that keeps the features it is given (and scores with an inner scorer)."""

    name = "recorder"

    def __init__(self, inner: ZeroShotScorer | None = None, *, tokens: bool = False) -> None:
        self.inner = inner
        self.needs_tokens = tokens
        self.pooled: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []

    def score(self, batch: FeatureBatch) -> np.ndarray:
        self.pooled.append(batch.pooled)
        if batch.tokens is not None:
            self.tokens.append(batch.tokens)
        if self.inner is not None:
            return self.inner.score(batch)
        return np.zeros(len(batch))


def reference_features(paths: list[Path], backbone) -> tuple[np.ndarray, np.ndarray]:
    """The straightforward path: full decode, same preprocessing, one image at a time."""
    pooled, tokens = [], []
    for path in paths:
        image = open_image(path)  # no draft: every pixel decoded
        pixels = to_normalized_array(
            resize_for_model(image, backbone.preprocess), backbone.preprocess
        )
        features = backbone.encode_pixels(pixels[None], tokens=True)
        pooled.append(features.pooled[0])
        tokens.append(features.tokens[0])
    return np.stack(pooled), np.stack(tokens)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1)
    b = b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _fast_features(
    paths: list[Path], backbone, monkeypatch: pytest.MonkeyPatch
) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[int, int]]]:
    """Features through the real pipeline, and the size each photo was decoded at."""
    decoded: dict[str, tuple[int, int]] = {}

    def spying_open(path: Path, **kwargs):
        image = open_image(path, **kwargs)
        decoded[path.name] = image.size
        return image

    monkeypatch.setattr("imgrank.images.decode.open_image", spying_open)
    fast = Recorder(tokens=True)
    result = score_images(paths, backbone, fast, batch_size=8, workers=2)
    assert [path for path, _score in result] == paths
    return np.concatenate(fast.pooled), np.concatenate(fast.tokens), decoded


def _assert_rankings_agree(fast: np.ndarray, ref: np.ndarray, backbone) -> None:
    """Spearman >= 0.999 by zero-shot prompts, and along the directions that spread
    these photos the most (what a prompt that matters for them would do)."""
    for prompt in ("image quality", "sharpness", "brightness"):
        scorer = ZeroShotScorer.for_backbone(backbone, prompt)
        rho = spearmanr(scorer.score(FeatureBatch(fast)), scorer.score(FeatureBatch(ref)))
        assert rho.statistic >= 0.999, (prompt, rho.statistic)
    _u, _s, directions = np.linalg.svd(ref - ref.mean(0), full_matrices=False)
    for direction in directions[:3]:
        assert spearmanr(fast @ direction, ref @ direction).statistic >= 0.999


@pytest.mark.parametrize("resize_mode", ["crop", "squash"])
def test_fast_path_gives_the_features_of_a_full_decode(
    photo_set: list[Path], backbone, resize_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone.preprocess = dataclasses.replace(backbone.preprocess, resize_mode=resize_mode)
    ref_pooled, ref_tokens = reference_features(photo_set, backbone)
    fast_pooled, fast_tokens, decoded = _fast_features(photo_set, backbone, monkeypatch)

    # The test is void unless the fast path really drafted: check the decoded sizes.
    sizes = list(decoded.values())
    assert sizes.count((300, 225)) >= 3, "2400x1800 JPEGs must decode at 1/8"
    assert sizes.count((400, 300)) >= 3, "1600x1200 JPEGs must decode at 1/4"
    assert sizes.count((500, 375)) >= 3, "1000x750 JPEGs must decode at 1/2"
    assert decoded["big.png"] == (1600, 1200), "PNGs have no draft mode"
    # Stored as 1600x1200 with "rotate" in EXIF: decoded at 1/4 and turned upright.
    assert decoded["rotated.jpg"] == (300, 400)

    # Photo by photo, the features are practically those of the full decode.
    assert _cosines(fast_pooled, ref_pooled).min() >= 0.9999
    # Visual tokens describe 16x16 px patches, so they move more than the pooled embedding.
    assert _cosines(fast_tokens, ref_tokens).min() >= 0.999
    # Ranked along the direction that spreads these photos the most, nothing moves.
    _u, _s, directions = np.linalg.svd(ref_pooled - ref_pooled.mean(0), full_matrices=False)
    assert spearmanr(fast_pooled @ directions[0], ref_pooled @ directions[0]).statistic == 1.0


@pytest.mark.slow  # 62 photos decoded in full twice: ~20 s of CPU
@pytest.mark.parametrize("resize_mode", ["crop", "squash"])
def test_rankings_do_not_move(
    large_photo_set: list[Path], backbone, resize_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone.preprocess = dataclasses.replace(backbone.preprocess, resize_mode=resize_mode)
    ref_pooled, _ref_tokens = reference_features(large_photo_set, backbone)
    fast_pooled, _fast_tokens, _decoded = _fast_features(large_photo_set, backbone, monkeypatch)
    assert _cosines(fast_pooled, ref_pooled).min() >= 0.9999
    _assert_rankings_agree(fast_pooled, ref_pooled, backbone)


def test_scores_from_the_pipeline_match_scoring_the_reference_features(
    photo_set: list[Path], backbone
) -> None:
    """The batching, threading and reordering add nothing: same scores as a one-by-one loop."""
    backbone.preprocess = dataclasses.replace(backbone.preprocess, resize_mode="crop")
    scorer = ZeroShotScorer.for_backbone(backbone, "image quality")
    full = score_images(photo_set, backbone, scorer, draft=False, batch_size=7, workers=3)
    ref_pooled, _tokens = reference_features(photo_set, backbone)
    np.testing.assert_allclose(
        [score for _path, score in full],
        scorer.score(FeatureBatch(ref_pooled)),
        rtol=1e-5,
        atol=1e-6,
    )
