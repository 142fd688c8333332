"""Model folders: save/load, importing the authors' checkpoints, and `imgrank adapter`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from imgrank.cli import app
from imgrank.errors import AdapterMismatchError, ModelError, OutputWriteError, UnsafeOperationError
from imgrank.models.adapter import AdapterConfig, RankingAdapter
from imgrank.models.authors import import_authors_checkpoint, read_authors_config, shipped_config
from imgrank.models.checkpoints import (
    ADAPTER_FILE,
    BACKBONE_FILE,
    CONFIG_FILE,
    adapter_token_widths,
    load_adapter,
    load_model_folder,
    save_model_folder,
)
from imgrank.models.clip.config import BackboneSpec, PreprocessConfig

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
TINY_MODEL = Path(__file__).parent / "data" / "tiny-clip.json"
runner = CliRunner()


def reference(name: str) -> Path:
    folder = REFERENCE / name
    if not folder.is_dir():
        pytest.skip(f"reference folder {folder} is absent (CI provides ../shared beside the clone)")
    return folder


def authors_state(name: str) -> dict[str, torch.Tensor]:
    state = torch.load(reference(name) / "checkpoint.pt", map_location="cpu", weights_only=True)
    return state["state_dict"]


def write_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    torch.save({"epoch": 1, "name": "test", "state_dict": state}, path)
    return path


def tiny_adapter(**overrides: Any) -> RankingAdapter:
    values: dict[str, Any] = dict(
        d_model=32, num_layers=1, n_head=4, num_learnable_text_tokens=2, n_reg_tokens=3
    )
    values.update(overrides)
    torch.manual_seed(0)
    return RankingAdapter(AdapterConfig(**values)).eval()


# --- importing the authors' checkpoints ------------------------------------------------------


@pytest.mark.parametrize("name", ["vit_tiny", "convnext_tiny"])
def test_import_makes_a_self_contained_folder(name: str, tmp_path: Path) -> None:
    ref = reference(name)
    folder = import_authors_checkpoint(
        ref / "checkpoint.pt", ref / "config.json", tmp_path / "model"
    )
    assert sorted(p.name for p in folder.path.iterdir()) == [
        ADAPTER_FILE,
        BACKBONE_FILE,
        CONFIG_FILE,
    ]
    # The authors' preprocessing, verbatim prompts, their config inline, weights kept inside.
    assert folder.backbone_spec.preprocess == PreprocessConfig(
        image_size=64, resize_mode="squash", interpolation="bilinear"
    )
    assert folder.prompt_format == "{}" and folder.format_prompt("image quality") == "image quality"
    model_config = json.loads((ref / "config.json").read_text())["model_config"]
    assert folder.backbone_spec.model_config == {
        k: v for k, v in model_config.items() if k not in ("adapter_cfg", "misc_cfg")
    }
    assert folder.backbone_weights == folder.path / BACKBONE_FILE
    assert folder.adapter_config == AdapterConfig(**model_config["adapter_cfg"])
    # Every tensor of the checkpoint lands in the folder unchanged.
    original = {k.removeprefix("module."): v for k, v in authors_state(name).items()}
    adapter = load_adapter(folder)
    for key, value in adapter.state_dict().items():
        assert torch.equal(value, original["adapter." + key]), key
    backbone = load_file(str(folder.path / BACKBONE_FILE))
    assert set(backbone) == {k for k in original if not k.startswith("adapter.")}
    assert all(torch.equal(backbone[k], original[k]) for k in backbone)
    # Nothing is left behind beside the folder.
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_import_lists_the_mismatched_keys(tmp_path: Path) -> None:
    state = dict(authors_state("vit_tiny"))
    del state["module.adapter.reg_tokens"]
    state["module.adapter.extra_head.weight"] = torch.zeros(2)
    state["module.visual.proj"] = torch.zeros(96, 32)
    checkpoint = write_checkpoint(tmp_path / "edited.pt", state)
    with pytest.raises(AdapterMismatchError) as info:
        import_authors_checkpoint(
            checkpoint, reference("vit_tiny") / "config.json", tmp_path / "out"
        )
    message = str(info.value)
    assert "missing: adapter.reg_tokens" in message
    assert "unexpected: adapter.extra_head.weight" in message
    assert "visual.proj (96, 32) (expected (96, 64))" in message
    assert not (tmp_path / "out").exists()


def test_import_with_the_wrong_config_says_so(tmp_path: Path) -> None:
    convnext = reference("convnext_tiny")
    with pytest.raises(AdapterMismatchError, match=r"unexpected: visual\.trunk\..*--config"):
        import_authors_checkpoint(
            convnext / "checkpoint.pt", reference("vit_tiny") / "config.json", tmp_path / "out"
        )


class NotATensor:
    """Unpickling this would run code from the file; weights_only loading must refuse it."""


def test_a_checkpoint_holding_objects_is_refused_not_unpickled(tmp_path: Path) -> None:
    checkpoint = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": NotATensor()}, checkpoint)
    with pytest.raises(ModelError, match="pickled code is refused"):
        import_authors_checkpoint(
            checkpoint, reference("vit_tiny") / "config.json", tmp_path / "out"
        )


def test_import_never_writes_into_an_existing_folder(tmp_path: Path) -> None:
    ref = reference("vit_tiny")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UnsafeOperationError, match="never overwrites"):
        import_authors_checkpoint(ref / "checkpoint.pt", ref / "config.json", out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_failed_write_leaves_no_partial_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imgrank.models.checkpoints as checkpoints

    def full_disk(tensors: Any, path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "_save_tensors", full_disk)
    # A message naming the folder (no traceback), and no half-written folder.
    with pytest.raises(OutputWriteError, match="out: No space left on device"):
        save_model_folder(
            tmp_path / "out", tiny_adapter(), BackboneSpec(model=str(TINY_MODEL), pretrained="none")
        )
    assert list(tmp_path.iterdir()) == []


# --- the released checkpoints' config ----------------------------------------------------------


def test_the_released_config_ships_with_the_package() -> None:
    config = shipped_config("convnext_large_d_320")
    assert config == shipped_config("convnext_large_d_320-adapter.json")
    official = REFERENCE / "official-configs" / "convnext_large_d_320-adapter.json"
    if official.is_file():
        assert config == json.loads(official.read_text())
    name, same = read_authors_config("convnext_large_d_320-adapter")
    assert name == "convnext_large_d_320" and same == config
    # 320 px -> 10x10 tokens of width 768, text width 768: the adapter's width.
    assert adapter_token_widths(config) == (768, 768)
    assert AdapterConfig(**config["adapter_cfg"]).d_model == 768


def test_stock_open_clip_convnext_is_refused_for_adapters() -> None:
    """open_clip's own convnext_large_d_320 has an MLP head: it would give no token grid."""
    import open_clip

    stock = open_clip.get_model_config("convnext_large_d_320")
    with pytest.raises(AdapterMismatchError, match="timm_proj='mlp'"):
        adapter_token_widths(stock)


def test_unknown_config_names_list_the_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="convnext_large_d_320-adapter"):
        read_authors_config("ViT-Z-99")
    with pytest.raises(ModelError, match="does not exist"):
        read_authors_config(tmp_path / "missing.json")


# --- saving and loading -----------------------------------------------------------------------


def test_save_and_load_round_trip_with_a_tag(tmp_path: Path) -> None:
    adapter = tiny_adapter(d_model=512, n_head=8, variant="ranking-head")
    folder = save_model_folder(
        tmp_path / "trained",
        adapter,
        BackboneSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k"),
        prompt_format="a photo with {}",
        target_range=(1.0, 5.0),
        source={"trained_on": "koniq"},
    )
    # A tag is stored as a tag (no weights copied), the model by its open_clip name.
    assert sorted(p.name for p in folder.path.iterdir()) == [ADAPTER_FILE, CONFIG_FILE]
    data = json.loads((folder.path / CONFIG_FILE).read_text())
    assert data["backbone"] == {
        "model": "ViT-B-32",
        "model_config": None,
        "pretrained": "laion2b_s34b_b79k",
        "weights": None,
    }
    assert data["adapter"]["variant"] == "ranking-head"
    again = load_model_folder(tmp_path / "trained")
    assert again == folder
    assert again.backbone_spec.pretrained == "laion2b_s34b_b79k" and again.backbone_weights is None
    # open_clip's own preprocessing for ViT-B-32 is recorded (224 px, resize + centre crop).
    assert again.backbone_spec.preprocess.image_size == 224
    assert again.backbone_spec.preprocess.resize_mode == "crop"
    assert again.target_range == (1.0, 5.0)
    assert again.format_prompt("sharpness") == "a photo with sharpness"
    assert again.source == {"trained_on": "koniq"}
    reloaded = load_adapter(again)
    assert all(torch.equal(v, adapter.state_dict()[k]) for k, v in reloaded.state_dict().items())
    assert not reloaded.training


def test_a_backbone_of_another_width_is_refused_at_save(tmp_path: Path) -> None:
    with pytest.raises(AdapterMismatchError, match="does not fit an adapter of width 32"):
        save_model_folder(
            tmp_path / "bad",
            tiny_adapter(),
            BackboneSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k"),
        )
    assert not (tmp_path / "bad").exists()


def test_a_local_weights_file_is_copied_into_the_folder(tmp_path: Path) -> None:
    from imgrank.models.clip.build import build_clip

    config = json.loads(TINY_MODEL.read_text())
    torch.manual_seed(0)
    clip = build_clip(config)
    weights = tmp_path / "tiny.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in clip.state_dict().items()}}, weights)
    before = weights.read_bytes()
    folder = save_model_folder(
        tmp_path / "model",
        tiny_adapter(),
        BackboneSpec(model=str(TINY_MODEL), pretrained=str(weights)),
    )
    assert weights.read_bytes() == before
    assert folder.backbone_weights == folder.path / BACKBONE_FILE
    assert folder.backbone_spec.model_config == config  # a config file is kept inline
    assert folder.backbone_spec.model == "tiny-clip"
    kept = load_file(str(folder.path / BACKBONE_FILE))
    assert all(torch.equal(kept[k], v) for k, v in clip.state_dict().items())


def make_folder(tmp_path: Path) -> Path:
    save_model_folder(
        tmp_path / "model", tiny_adapter(), BackboneSpec(model=str(TINY_MODEL), pretrained="none")
    )
    return tmp_path / "model"


def edit_config(folder: Path, **changes: Any) -> None:
    data = json.loads((folder / CONFIG_FILE).read_text())
    for dotted, value in changes.items():
        target = data
        *parents, last = dotted.split("__")
        for key in parents:
            target = target[key]
        target[last] = value
    (folder / CONFIG_FILE).write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"format_version": 3}, "format version 3 is not supported"),
        ({"kind": "linear-head"}, "lacks 'head'"),
        ({"kind": "something"}, "unknown kind"),
        (
            {"backbone__pretrained": None, "backbone__weights": "../elsewhere.safetensors"},
            "inside the folder",
        ),
        ({"backbone__pretrained": None, "backbone__weights": "backbone.pt"}, r"\.safetensors file"),
        ({"backbone__pretrained": "/tmp/weights.pt"}, "must be an open_clip tag"),
        ({"backbone__weights": "backbone.safetensors"}, "exactly one"),
        ({"prompt_format": "no placeholder"}, "exactly once"),
        ({"adapter__cross_attn_method": "something-else"}, "not implemented"),
        # Issue 17 item 14: a zero std gave NaN for every score.
        ({"preprocess__std": [0, 0, 0]}, r"std must be positive"),
        ({"preprocess__mean": [0.5, float("nan"), 0.5]}, r"mean must be three finite numbers"),
        ({"preprocess__std": [0.2, 0.2]}, r"std must be three finite numbers"),
    ],
)
def test_folders_that_could_mislead_or_unpickle_are_refused(
    tmp_path: Path, changes: dict[str, Any], words: str
) -> None:
    folder = make_folder(tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(ModelError, match=words):
        load_model_folder(folder)


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is not an imgrank model folder"):
        load_model_folder(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        load_model_folder(tmp_path / "nowhere")


def test_adapter_weights_that_do_not_fit_list_the_keys(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    edit_config(folder, adapter__n_reg_tokens=7)
    with pytest.raises(AdapterMismatchError, match=r"reg_tokens \(3, 32\) \(expected \(7, 32\)\)"):
        load_adapter(folder)


# --- the command line ------------------------------------------------------------------------


def test_cli_import_then_info(tmp_path: Path) -> None:
    ref = reference("convnext_tiny")
    out = tmp_path / "count"
    result = runner.invoke(
        app,
        [
            "adapter",
            "import",
            str(ref / "checkpoint.pt"),
            "--config",
            str(ref / "config.json"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out.resolve())
    info = runner.invoke(app, ["adapter", "info", str(out)])
    assert info.exit_code == 0, info.stderr
    lines = dict(line.split(None, 1) for line in info.stdout.splitlines())
    assert lines["adapter"].startswith(
        "full: width 64, 2 layers, 8 heads, 4 learnable text tokens, 4 rank tokens"
    )
    assert lines["backbone"] == "convnext_tiny (config kept in the folder)"
    assert lines["weights"].startswith("backbone.safetensors in the folder")
    assert lines["preprocess"].startswith("squash-resize to 64x64 (bilinear)")
    assert lines["prompts"] == "verbatim"
    raw = runner.invoke(app, ["adapter", "info", str(out), "--json"])
    assert json.loads(raw.stdout)["backbone"]["weights"] == BACKBONE_FILE


def test_cli_import_mismatch_exits_with_the_model_error_code(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "adapter",
            "import",
            str(reference("vit_tiny") / "checkpoint.pt"),
            "--out",
            str(tmp_path / "x"),
        ],
    )
    # Without --config the released checkpoints' config is assumed; this tiny one does not fit it.
    assert result.exit_code == 4
    assert "does not match the model config convnext_large_d_320-adapter" in result.stderr
    assert "Traceback" not in result.stderr
