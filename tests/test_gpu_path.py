"""The GPU path of the feature stream, run on the CPU (no GPU here; the code is the same).

``decode_batches(..., device=...)`` reads JPEG bytes in the decode threads and
decodes each batch with ``torchvision.io.decode_jpeg`` on that device; anything
else goes through the CPU decoder. ``score_images`` picks it when the encoder
runs on CUDA; the tests force it with ``decode_device="cpu"``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from PIL import Image

from imgrank.features.pipeline import score_images
from imgrank.features.stream import decode_batches
from imgrank.images.decode import load_pixels
from imgrank.models.clip.build import load_backbone
from imgrank.models.clip.config import BackboneSpec, PreprocessConfig
from imgrank.models.scoring import ZeroShotScorer

REPO = Path(__file__).resolve().parents[1]


def _photo(path: Path, size: tuple[int, int], seed: int, **save: object) -> Path:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x * y) % 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, **save)
    return path


@pytest.fixture
def mixed(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "mixed"
    folder.mkdir()
    paths = [
        _photo(folder / "wide.jpg", (400, 260), 1, quality=92),
        _photo(folder / "tall.jpeg", (180, 300), 2, quality=90),
        _photo(folder / "lossless.png", (300, 300), 3),
        _photo(folder / "square.jpg", (256, 256), 4, quality=95),
    ]
    cmyk = folder / "cmyk.jpg"
    Image.open(paths[0]).convert("CMYK").save(cmyk, quality=92)
    broken = folder / "broken.jpg"
    broken.write_bytes(paths[0].read_bytes()[:300])  # a JPEG cut short
    return [*paths, cmyk, broken]


@pytest.mark.parametrize("mode", ["crop", "squash"])
def test_device_decoding_gives_the_cpu_pixels(mixed: list[Path], mode: str) -> None:
    preprocess = PreprocessConfig(image_size=64, resize_mode=mode)  # type: ignore[arg-type]
    skipped: list[str] = []
    batches = list(
        decode_batches(
            mixed, preprocess, batch_size=3, workers=2, device="cpu", dtype=torch.float32,
            on_skip=lambda item: skipped.append(f"{item.path.name}: {item.reason}"),
        )
    )  # fmt: skip
    assert all(isinstance(b.pixels, torch.Tensor) for b in batches)
    got = {
        path.name: pixels for b in batches for path, pixels in zip(b.paths, b.pixels, strict=True)
    }
    assert sorted(got) == ["cmyk.jpg", "lossless.png", "square.jpg", "tall.jpeg", "wide.jpg"]
    assert len(skipped) == 1 and skipped[0].startswith("broken.jpg: ")  # named, with a reason
    for path in mixed[:-1]:
        expected = load_pixels(path, preprocess, draft=False)
        difference = np.abs(got[path.name].numpy() - expected)
        # Pillow and torch resize with slightly different kernels: a few 8-bit steps at most.
        assert difference.mean() < 0.02 and np.quantile(difference, 0.99) < 0.1, path.name


def test_scores_from_the_device_path_match_the_cpu_path(mixed: list[Path]) -> None:
    backbone = load_backbone(BackboneSpec(model=str(TINY_MODEL), pretrained="none"), device="cpu")
    scorer = ZeroShotScorer.for_backbone(backbone, "image quality")
    plain = dict(score_images(mixed, backbone, scorer, draft=False))
    device = dict(score_images(mixed, backbone, scorer, draft=False, decode_device="cpu"))
    assert set(plain) == set(device) and len(plain) == 5
    for path, score in plain.items():
        assert device[path] == pytest.approx(score, abs=2e-3), path.name


@pytest.mark.slow
def test_bench_gpu_runs_in_one_command_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--device", "cpu",
         "--photos", "3", "--size", "320x240", "--models", str(TINY_MODEL), "--rounds", "1",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("| tiny-clip |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert all(float(cell.rstrip("x")) > 0 for cell in cells[1:])


def test_a_loaded_models_encoder_tells_the_stream_its_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream decodes on the GPU for the encoder ``imgrank sort`` passes it, when on CUDA."""
    from imgrank.features.stream import device_decoding
    from imgrank.models.loading import load_model
    from imgrank.models.selection import ModelSelection

    model = load_model(ModelSelection(model=str(TINY_MODEL), pretrained="none", device="cpu"))
    encoder = model.image_encoder
    assert device_decoding(encoder) is None  # the CPU: the decode threads' draft path
    backbone = model.backbone()
    monkeypatch.setattr(backbone, "device", "cuda:0")
    assert device_decoding(encoder) == ("cuda:0", torch.float32)


def test_a_cached_run_keeps_the_device_decoder_and_caches(
    mixed: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caching no longer sends a GPU run back to CPU decoding (the device decoder gives no
    hashes or capture times; the cache keeps entries without them and cull reads them)."""
    from imgrank.features import stream
    from imgrank.features.cache import open_cache
    from imgrank.features.stream import PipelineStats

    on_device = []
    real = stream._assemble_on_device

    def counting(*args: object, **kwargs: object) -> object:
        on_device.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stream, "_assemble_on_device", counting)

    backbone = load_backbone(BackboneSpec(model=str(TINY_MODEL), pretrained="none"), device="cpu")
    scorer = ZeroShotScorer.for_backbone(backbone, "image quality")
    plain = dict(score_images(mixed, backbone, scorer, draft=False))
    with open_cache(tmp_path / "c.sqlite3") as cache:
        first = dict(score_images(mixed, backbone, scorer, draft=False, cache=cache,
                                  decode_device="cpu"))  # fmt: skip
    stats = PipelineStats()
    with open_cache(tmp_path / "c.sqlite3") as cache:
        again = dict(score_images(mixed, backbone, scorer, cache=cache, stats=stats))
    assert on_device  # the cached run decoded on the device
    assert stats.cache_hits == 5 and set(again) == set(plain)
    for path, score in plain.items():
        assert first[path] == pytest.approx(score, abs=2e-3), path.name
        assert again[path] == pytest.approx(first[path], abs=1e-6), path.name
