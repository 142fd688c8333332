"""Linear and MLP heads (LAION aesthetic predictor formats) on the pooled CLIP embedding.

No real head can be downloaded here, so heads of the published shapes get
random weights; the backbone is the tiny test CLIP, built and run with
open_clip directly for the reference: score = head(normalize(encode_image(x))).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTOS, TINY_MODEL
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from imgrank.cli import app

runner = CliRunner()
WIDTH = 32  # the tiny model's embed_dim


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _mlp_state(width: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    widths = (width, 1024, 128, 64, 16, 1)
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:], strict=False), strict=True):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) * 0.1
        state[f"layers.{index}.bias"] = torch.randn(fan_out, generator=generator) * 0.1
    return state


def _linear_state(width: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in torch.nn.Linear(width, 1).state_dict().items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Backbone weights made by open_clip itself, head files, and PNG photos (no draft decoding)."""
    from open_clip.model import CLIP

    root = tmp_path_factory.mktemp("heads")
    config = json.loads(TINY_MODEL.read_text())
    torch.manual_seed(7)
    clip = CLIP(**{k: config[k] for k in ("embed_dim", "vision_cfg", "text_cfg")})
    weights = root / "clip.safetensors"
    save_file({k: v.contiguous().clone() for k, v in clip.state_dict().items()}, str(weights))
    torch.save(_linear_state(WIDTH, 1), root / "linear.pth")
    save_file(_mlp_state(WIDTH, 2), str(root / "mlp.safetensors"))
    photos = root / "photos"
    photos.mkdir()
    for path in sorted(PHOTOS.glob("*.jpg")):
        Image.open(path).convert("RGB").save(photos / f"{path.stem}.png")
    return {"root": root, "weights": weights, "photos": photos}


def _reference(world: dict[str, Path], head_state: dict[str, torch.Tensor]) -> dict[str, float]:
    """head(normalize(encode_image(x))) with open_clip's own model and transforms."""
    from open_clip.model import CLIP
    from open_clip.transform import image_transform
    from safetensors.torch import load_file

    from imgrank.models.heads import HeadConfig, build_head

    config = json.loads(TINY_MODEL.read_text())
    clip = CLIP(**{k: config[k] for k in ("embed_dim", "vision_cfg", "text_cfg")})
    clip.load_state_dict(load_file(str(world["weights"])))
    clip.eval()
    kind = "linear-head" if "weight" in head_state else "mlp-head"
    head = build_head(HeadConfig(kind, WIDTH))
    head.load_state_dict(head_state)
    preprocess = image_transform(config["vision_cfg"]["image_size"], is_train=False)
    out = {}
    with torch.no_grad():
        for path in sorted(world["photos"].iterdir()):
            pixels = preprocess(Image.open(path).convert("RGB"))[None]
            embedding = clip.encode_image(pixels)
            embedding = embedding / embedding.norm(dim=-1, keepdim=True)
            out[str(path)] = float(head(embedding).reshape(-1)[0])
    return out


def _import(world: dict[str, Path], file: str, out: str, *extra: str) -> Path:
    folder = world["root"] / out
    result = invoke(
        "adapter", "import", world["root"] / file, "--model", TINY_MODEL,
        "--pretrained", world["weights"], "--out", folder, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return folder


def _sorted_scores(*args: object) -> dict[str, float]:
    result = invoke("sort", *args)
    assert result.exit_code == 0, result.stderr
    return {row["path"]: float(row["score"]) for row in csv.DictReader(io.StringIO(result.stdout))}


@pytest.mark.parametrize(
    ("file", "state"),
    [
        ("linear.pth", lambda: _linear_state(WIDTH, 1)),
        ("mlp.safetensors", lambda: _mlp_state(WIDTH, 2)),
    ],
)
def test_imported_heads_score_like_open_clip_on_torch_and_onnxruntime(
    world: dict[str, Path],
    file: str,
    state,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    folder = _import(world, file, f"model-{file}")
    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == ("linear-head" if file.startswith("linear") else "mlp-head")
    expected = _reference(world, state())

    torch_scores = _sorted_scores(
        world["photos"], "--by", "aesthetics", "--adapter", folder, "--device", "cpu", "--no-cache"
    )
    assert set(torch_scores) == set(expected)
    for path, score in expected.items():
        assert torch_scores[path] == pytest.approx(score, abs=1e-4)

    export = tmp_path / "onnx"
    result = invoke("export", "--adapter", folder, "--out", export)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((export / "imgrank-onnx.json").read_text())
    assert (
        manifest["files"]["head"]["path"] == "head.onnx"
        and manifest["head"]["kind"] == config["kind"]
    )
    onnx_scores = _sorted_scores(
        world["photos"], "--by", "aesthetics", "--onnx", export, "--no-cache"
    )
    for path, score in expected.items():
        assert onnx_scores[path] == pytest.approx(score, abs=1e-4)


def test_a_head_names_itself_and_ignores_the_prompt(world: dict[str, Path]) -> None:
    from imgrank.sorter import SortRequest, sort_folder

    folder = _import(world, "linear.pth", "named")
    common = dict(folder=world["photos"], adapter=folder, device="cpu", use_cache=False)
    ranking = sort_folder(SortRequest(prompt="aesthetics", **common))  # type: ignore[arg-type]
    assert ranking.scorer.startswith("linear head named on ")
    assert ranking.prompt == "aesthetics"  # --by still names the ranking
    other = sort_folder(SortRequest(prompt="anything else", **common))  # type: ignore[arg-type]
    assert [i.score for i in other.items] == [i.score for i in ranking.items]
    refused = invoke(
        "sort",
        world["photos"],
        "--by",
        "a",
        "--against",
        "b",
        "--adapter",
        folder,
        "--device",
        "cpu",
    )
    assert refused.exit_code == 2 and "--against is for zero-shot" in refused.stderr


def test_a_cached_head_resort_is_served_from_the_cache(
    world: dict[str, Path], tmp_path: Path
) -> None:
    from imgrank.features.cache import EmbeddingCache
    from imgrank.features.pipeline import score_images
    from imgrank.models.loading import load_model
    from imgrank.models.selection import ModelSelection

    folder = _import(world, "mlp.safetensors", "cached")
    paths = sorted(world["photos"].iterdir())
    selection = ModelSelection(adapter=folder, device="cpu")
    with EmbeddingCache.open(tmp_path / "cache.sqlite3") as cache:
        cold = load_model(selection)
        first = score_images(paths, cold.image_encoder, cold.scorer("x"), cache=cache)
        warm = load_model(selection)
        assert warm.fully_cached(paths, cache)
        second = score_images(
            paths, warm.image_encoder, warm.scorer("x", images_cached=True), cache=cache
        )
    assert warm._backbone is None, "every photo cached: no backbone is built for a head"
    np.testing.assert_allclose([s for _p, s in second], [s for _p, s in first], atol=1e-6)


def test_eval_measures_a_head(world: dict[str, Path], tmp_path: Path) -> None:
    folder = _import(world, "linear.pth", "evaluated")
    table = tmp_path / "labels.tsv"
    rows = ["filepath\ttitle\tcname\tvalue"]
    rows += [f"{p}\taesthetics\tall\t{i}" for i, p in enumerate(sorted(world["photos"].iterdir()))]
    table.write_text("\n".join(rows) + "\n")
    result = invoke("eval", table, "--adapter", folder, "--device", "cpu", "--json", "--no-cache")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["scorer"] == "linear head evaluated"


def test_a_head_for_another_backbone_is_refused(world: dict[str, Path]) -> None:
    torch.save(_linear_state(64, 3), world["root"] / "wide.pth")
    result = invoke(
        "adapter", "import", world["root"] / "wide.pth", "--model", TINY_MODEL,
        "--pretrained", world["weights"], "--out", world["root"] / "wide",
    )  # fmt: skip
    assert result.exit_code == 4
    assert "32-wide image embeddings" in result.stderr and "64-wide" in result.stderr
    assert not (world["root"] / "wide").exists()


def test_kind_detection_and_forcing(world: dict[str, Path]) -> None:
    save_file({"fc.weight": torch.zeros(1, WIDTH)}, str(world["root"] / "odd.safetensors"))
    odd = invoke(
        "adapter", "import", world["root"] / "odd.safetensors", "--model", TINY_MODEL,
        "--pretrained", world["weights"], "--out", world["root"] / "odd",
    )  # fmt: skip
    assert odd.exit_code == 4 and "neither a linear head" in odd.stderr
    forced = invoke(
        "adapter", "import", world["root"] / "linear.pth", "--model", TINY_MODEL,
        "--pretrained", world["weights"], "--out", world["root"] / "forced", "--kind", "mlp-head",
    )  # fmt: skip
    assert forced.exit_code == 4 and "mlp-head" in forced.stderr
    forced_ok = _import(world, "linear.pth", "forced-ok", "--kind", "linear-head")
    assert json.loads((forced_ok / "config.json").read_text())["kind"] == "linear-head"
    info = invoke("adapter", "info", forced_ok)
    assert info.exit_code == 0, info.stderr
    assert "linear-head: reads the 32-wide normalised image embedding, 33 parameters" in info.stdout


def test_a_head_needs_its_backbone_named(world: dict[str, Path]) -> None:
    alone = invoke("adapter", "import", world["root"] / "linear.pth", "--out", world["root"] / "x")
    assert alone.exit_code == 2 and "--model and --pretrained" in alone.stderr
    half = invoke(
        "adapter",
        "import",
        world["root"] / "linear.pth",
        "--model",
        TINY_MODEL,
        "--out",
        world["root"] / "y",
    )
    assert half.exit_code == 2 and "--pretrained" in half.stderr


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_a_pickle_that_runs_code_is_refused(world: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({**_linear_state(WIDTH, 1), "payload": _RunsCodeWhenUnpickled(marker)}, evil)
    result = invoke(
        "adapter", "import", evil, "--model", TINY_MODEL, "--pretrained", world["weights"],
        "--out", tmp_path / "evil",
    )  # fmt: skip
    assert result.exit_code == 4 and not marker.exists()
