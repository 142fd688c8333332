"""`imgrank sort --adapter`: end to end against the authors' pipeline, and its safety checks.

The expected scores are computed here without imgrank's image or backbone
code: Pillow + torchvision transforms as the authors' inference does
(``Resize((S, S))``, ``ToTensor``, OpenAI ``Normalize``), stock open_clip's
CLIP built from their config and loaded from their checkpoint, the tokens
taken as their code takes them, and the adapter (itself checked against their
reference vectors in test_adapter_reference.py).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from imgrank.cli import app
from imgrank.errors import AdapterMismatchError, ModelError
from imgrank.models.adapter import AdapterConfig, RankingAdapter
from imgrank.models.adapter_scoring import AdapterScorer
from imgrank.models.loading import backbone_for
from imgrank.models.clip.config import OPENAI_MEAN, OPENAI_STD, BackboneSpec
from imgrank.models.clip.towers import Backbone
from imgrank.models.checkpoints import load_model_folder, save_model_folder
from imgrank.models.scoring import FeatureBatch

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
TINY_MODEL = Path(__file__).parent / "data" / "tiny-clip.json"
PROMPT = "Rank the numbers of horse."
runner = CliRunner()


def reference(name: str) -> Path:
    folder = REFERENCE / name
    if not folder.is_dir():
        pytest.skip(f"reference folder {folder} is absent (CI provides ../shared beside the clone)")
    return folder


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both reference checkpoints imported with the command line, once for this module."""
    out = tmp_path_factory.mktemp("adapters")
    folders = {}
    for name in ("vit_tiny", "convnext_tiny"):
        ref = REFERENCE / name
        if not ref.is_dir():
            continue
        args = [
            "adapter",
            "import",
            str(ref / "checkpoint.pt"),
            "--config",
            str(ref / "config.json"),
        ]
        result = runner.invoke(app, [*args, "--out", str(out / name)])
        assert result.exit_code == 0, result.stderr
        folders[name] = out / name
    return folders


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Five images of different sizes and aspect ratios, PNG and JPEG.

    None is large enough for imgrank's reduced-size JPEG decoding to apply, so
    both pipelines see the same pixels.
    """
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(7)
    sizes = [(97, 61), (40, 120), (64, 64), (150, 110), (33, 90)]
    for index, (width, height) in enumerate(sizes):
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack(
            [x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1
        )
        noise = rng.normal(0, 20 * index, size=base.shape)
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        suffix = ".jpg" if index % 2 else ".png"
        Image.fromarray(pixels).save(folder / f"img{index}{suffix}", quality=95)
    return folder


def authors_scores(name: str, files: list[Path], prompt: str) -> dict[str, float]:
    """Scores from the authors' inference pipeline, without imgrank's backbone or image code."""
    import open_clip
    from open_clip.model import CLIP
    from torchvision import transforms

    ref = reference(name)
    config = json.loads((ref / "config.json").read_text())["model_config"]
    state = torch.load(ref / "checkpoint.pt", map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    clip = CLIP(
        embed_dim=config["embed_dim"], vision_cfg=config["vision_cfg"], text_cfg=config["text_cfg"]
    )
    clip.load_state_dict({k: v for k, v in state.items() if not k.startswith("adapter.")})
    clip.eval()
    adapter = RankingAdapter(AdapterConfig(**config["adapter_cfg"]))
    adapter.load_state_dict(
        {k[len("adapter.") :]: v for k, v in state.items() if k.startswith("adapter.")}
    )
    adapter.eval()

    size = config["vision_cfg"]["image_size"]
    transform = transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )
    pixels = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    ids = open_clip.get_tokenizer("ViT-B-32")([prompt])
    with torch.no_grad():
        if "timm_model_name" in config["vision_cfg"]:
            tokens = clip.visual(pixels).flatten(2).transpose(1, 2)  # (N, h*w, D), row-major
        else:
            _, patches = clip.visual(pixels)  # after ln_post, class token excluded
            tokens = patches @ clip.visual.proj
        text = clip.token_embedding(ids) + clip.positional_embedding
        text = clip.ln_final(clip.transformer(text, attn_mask=clip.attn_mask))
        scores = adapter(tokens, text.expand(len(files), -1, -1))[0].reshape(-1)
    return {str(f): float(s) for f, s in zip(files, scores, strict=True)}


def sort_csv(*args: str) -> list[dict[str, str]]:
    result = runner.invoke(app, ["sort", *args, "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


@pytest.mark.parametrize("name", ["vit_tiny", "convnext_tiny"])
def test_sort_with_an_imported_checkpoint_gives_the_authors_scores(
    name: str, imported: dict[str, Path], photos: Path
) -> None:
    reference(name)
    table = sort_csv(str(photos), "--by", PROMPT, "--adapter", str(imported[name]),
                     "--format", "csv", "--batch-size", "2")  # fmt: skip
    expected = authors_scores(name, sorted(photos.iterdir()), PROMPT)
    got = {row["path"]: float(row["score"]) for row in table}
    assert set(got) == set(expected)
    for path, score in expected.items():
        assert got[path] == pytest.approx(score, abs=1e-5), path  # the CSV keeps 6 decimals
    # Ranked best first; where the authors' scores are clearly apart, in their order.
    ranked = [row["path"] for row in table]
    assert [int(row["rank"]) for row in table] == list(range(1, len(table) + 1))
    for better, worse in zip(ranked, ranked[1:], strict=False):
        assert expected[better] > expected[worse] - 2e-5


def test_the_prompt_is_encoded_once_per_run(
    imported: dict[str, Path], photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference("vit_tiny")
    calls: list[int] = []
    original = Backbone.encode_token_ids

    def counting(self: Backbone, ids: torch.Tensor):  # type: ignore[no-untyped-def]
        calls.append(int(ids.shape[0]))
        return original(self, ids)

    monkeypatch.setattr(Backbone, "encode_token_ids", counting)
    table = sort_csv(
        str(photos), "--by", PROMPT, "--adapter", str(imported["vit_tiny"]), "--batch-size", "1"
    )
    assert len(table) == 5
    assert calls == [1]  # one prompt, encoded once, for five single-image batches


def test_a_different_backbone_is_refused(imported: dict[str, Path], photos: Path) -> None:
    reference("vit_tiny")
    adapter = str(imported["vit_tiny"])
    narrow = runner.invoke(app, ["sort", str(photos), "--by", PROMPT, "--adapter", adapter,
                                 "--model", str(TINY_MODEL), "--device", "cpu"])  # fmt: skip
    assert narrow.exit_code == 4
    assert "does not fit an adapter of width 64" in narrow.stderr
    other = runner.invoke(app, ["sort", str(photos), "--by", PROMPT, "--adapter", adapter,
                                "--model", str(reference("convnext_tiny") / "config.json"),
                                "--device", "cpu"])  # fmt: skip
    assert other.exit_code == 4
    assert "is not the backbone the adapter" in other.stderr
    assert "vision_cfg.timm_model_name='convnext_atto'" in other.stderr


def test_the_same_architecture_with_a_local_weights_file_is_accepted_with_a_warning(
    imported: dict[str, Path], photos: Path
) -> None:
    ref = reference("vit_tiny")
    adapter = str(imported["vit_tiny"])
    own = sort_csv(str(photos), "--by", PROMPT, "--adapter", adapter)
    same_weights = ["--model", str(ref / "config.json"), "--pretrained", str(ref / "checkpoint.pt")]
    result = runner.invoke(
        app, ["sort", str(photos), "--by", PROMPT, "--adapter", adapter, *same_weights]
    )
    assert result.exit_code == 0, result.stderr
    assert "only meaningful if these are the same backbone weights" in result.stderr
    assert list(csv.DictReader(io.StringIO(result.stdout))) == own


def test_against_is_refused_with_an_adapter(imported: dict[str, Path], photos: Path) -> None:
    reference("vit_tiny")
    adapter = str(imported["vit_tiny"])
    result = runner.invoke(
        app, ["sort", str(photos), "--by", "sharp", "--against", "blurry", "--adapter", adapter]
    )
    assert result.exit_code == 2
    assert "--against is for zero-shot scoring" in result.stderr


def test_another_pretrained_tag_is_refused_before_any_download(tmp_path: Path) -> None:
    adapter = RankingAdapter(
        AdapterConfig(d_model=512, num_layers=1, num_learnable_text_tokens=2, n_reg_tokens=2)
    )
    save_model_folder(
        tmp_path / "m", adapter, BackboneSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    )
    folder = load_model_folder(tmp_path / "m")
    spec, warnings = backbone_for(folder)
    assert (spec.model, spec.pretrained, warnings) == ("ViT-B-32", "laion2b_s34b_b79k", [])
    with pytest.raises(AdapterMismatchError, match="trained on the laion2b_s34b_b79k weights"):
        backbone_for(folder, pretrained="openai")
    with pytest.raises(AdapterMismatchError, match="is not the backbone"):
        backbone_for(folder, model="ViT-B-16")


class FakeText:
    """A text encoder returning fixed tokens, counting its calls."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens, self.calls = tokens, 0

    def encode_text(self, texts: list[str]):  # type: ignore[no-untyped-def]
        self.calls += 1
        assert texts == ["a photo with grain"]
        return type("Features", (), {"tokens": self.tokens})()


def test_adapter_scorer_scores_tokens_with_the_regression_head() -> None:
    torch.manual_seed(3)
    adapter = RankingAdapter(
        AdapterConfig(
            d_model=16, num_layers=1, n_head=4, num_learnable_text_tokens=1, n_reg_tokens=2
        )
    ).eval()
    text = FakeText(torch.randn(1, 9, 16))
    scorer = AdapterScorer(adapter, text, "grain", prompt_format="a photo with {}")
    tokens = np.random.default_rng(0).normal(size=(3, 4, 16)).astype(np.float32)
    scores = scorer.score(FeatureBatch(pooled=np.zeros((3, 8), np.float32), tokens=tokens))
    with torch.no_grad():
        expected = adapter.score(torch.from_numpy(tokens), text.tokens).reshape(-1).numpy()
    assert scores.shape == (3,) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    scorer.score(FeatureBatch(pooled=np.zeros((1, 8), np.float32), tokens=tokens[:1]))
    assert text.calls == 1 and scorer.needs_tokens
    with pytest.raises(ModelError, match="needs visual tokens"):
        scorer.score(FeatureBatch(pooled=np.zeros((3, 8), np.float32)))


def test_a_cached_adapter_resort_builds_no_image_tower(
    imported: dict[str, Path], photos: Path, tmp_path: Path
) -> None:
    """A second sort with an adapter is served from the cache's visual tokens."""
    reference("vit_tiny")
    from imgrank.features.cache import EmbeddingCache
    from imgrank.features.pipeline import score_images
    from imgrank.models.clip.build import image_tower_built
    from imgrank.models.loading import load_model
    from imgrank.models.selection import ModelSelection

    paths = sorted(photos.iterdir())
    db = tmp_path / "cache.sqlite3"
    runs = []
    for _ in range(2):
        model = load_model(ModelSelection(adapter=imported["vit_tiny"], device="cpu"))
        scorer = model.scorer(PROMPT)
        with EmbeddingCache.open(db) as cache:
            runs.append(dict(score_images(paths, model.image_encoder, scorer, cache=cache)))
        runs.append(image_tower_built(model.backbone()))
    first, first_built, second, second_built = runs
    assert first_built and not second_built
    assert set(first) == set(second) == set(paths)
    for path in paths:  # tokens are cached in float16
        assert second[path] == pytest.approx(first[path], abs=1e-3)
