"""ONNX export and the onnxruntime path: tokenizer ids, torch parity, safety, no torch import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTOS, SHARED, TINY_MODEL
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from imgrank.cli import app
from imgrank.errors import ModelError, UnsafeOperationError, UsageError
from imgrank.features.pipeline import score_images
from imgrank.models.clip.build import load_backbone
from imgrank.models.clip.config import BackboneSpec
from imgrank.models.onnx_export import (
    TOKENIZER_PROBES,
    build_clip_tokenizer,
    export_backbone,
    relative_drift,
)
from imgrank.models.onnx_runtime import (
    IMAGE_FILE,
    MANIFEST_NAME,
    ClipTokenizer,
    OnnxModel,
    check_external_data,
    clean_text,
    resolve_providers,
    zero_shot_scorer,
)
from imgrank.models.scoring import ZeroShotScorer
from imgrank.ranking import rank_scores

runner = CliRunner()
REFERENCE = SHARED / "reference" / "vit_tiny"


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_backbone():  # type: ignore[no-untyped-def]
    return load_backbone(BackboneSpec(model=str(TINY_MODEL), pretrained="none"), device="cpu")


@pytest.fixture(scope="module")
def tiny_export(tiny_backbone, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("export") / "tiny-onnx"
    export_backbone(tiny_backbone, out)
    return out


@pytest.fixture(scope="module")
def clip_tokenizers(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """(ours read back from tokenizer.json, open_clip's SimpleTokenizer)."""
    from open_clip.tokenizer import SimpleTokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_clip_tokenizer(77).save(str(path))
    return ClipTokenizer(path, 77), SimpleTokenizer(context_length=77)


@pytest.fixture
def many_photos(tmp_path: Path) -> Path:
    """The four real photos plus crops, flips and tints of them: 16 distinct images."""
    from PIL import Image, ImageEnhance, ImageOps

    folder = tmp_path / "many"
    folder.mkdir()
    for photo in sorted(PHOTOS.glob("*.jpg")):
        with Image.open(photo) as image:
            image = image.convert("RGB")
            w, h = image.size
            variants = {
                "orig": image,
                "crop": image.crop((w // 4, h // 4, w * 3 // 4, h * 3 // 4)),
                "flip": ImageOps.mirror(image),
                "dark": ImageEnhance.Brightness(image).enhance(0.4),
            }
            for name, variant in variants.items():
                variant.save(folder / f"{photo.stem}-{name}.png")
    return folder


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_json_gives_open_clip_ids_on_probe_texts(clip_tokenizers) -> None:  # type: ignore[no-untyped-def]
    ours, theirs = clip_tokenizers
    probes = list(TOKENIZER_PROBES)
    expected = theirs(probes).numpy()
    got = ours(probes)
    assert got.shape == (len(probes), 77) and got.dtype == np.int64
    for text, a, b in zip(probes, got, expected, strict=True):
        assert a.tolist() == b.tolist(), text
    # The long text is truncated with the end token last, and short ones are padded with 0.
    long_row = got[probes.index("word " * 120)]
    assert long_row[0] == 49406 and long_row[-1] == 49407 and (long_row != 0).all()
    assert got[probes.index("image quality")][4:].tolist() == [0] * 73


# Assigned characters only (Python's Unicode tables): open_clip's `regex` module and the Rust
# regex engine of `tokenizers` follow different Unicode versions, so they may classify code
# points that no version of Python's unicodedata knows differently. Such text is not a prompt.
_ASSIGNED = st.characters(blacklist_categories=("Cn", "Co", "Cs"))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.text(alphabet=_ASSIGNED, max_size=60)
    | st.from_regex(r"[A-Za-z0-9 ,.'!?\t\n-]{0,80}", fullmatch=True)
)
def test_tokenizer_json_matches_open_clip_on_random_text(clip_tokenizers, text: str) -> None:  # type: ignore[no-untyped-def]
    ours, theirs = clip_tokenizers
    assume(not _engines_classify_differently(text, theirs))
    assert ours([text])[0].tolist() == theirs([text])[0].tolist()


def _engines_classify_differently(text: str, theirs) -> bool:  # type: ignore[no-untyped-def]
    """Whether the two regex engines split the same cleaned text into different words.

    tokenizers splits with Oniguruma, open_clip with the ``regex`` module; their Unicode
    tables differ for letters added in recent Unicode versions (``':\u0558'``, which ftfy
    makes of the mojibake ``':\xd5\x98'``, is one word for Oniguruma and two for ``regex``).
    Only such examples are set aside: when the cleaning itself differs, or the words are the
    same, the ids must match.
    """
    import regex
    from tokenizers import pre_tokenizers

    from imgrank.models.onnx_runtime import clean_text

    tokenizer = build_clip_tokenizer(77)
    ours_clean = tokenizer.normalizer.normalize_str(clean_text(text))
    theirs_clean = theirs.clean_fn(text)
    if ours_clean != theirs_clean:
        return False
    ours_words = [w for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str(ours_clean)]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    theirs_words = [
        byte_level.pre_tokenize_str(word)[0][0] for word in regex.findall(theirs.pat, theirs_clean)
    ]
    return ours_words != theirs_words


def test_the_engine_check_sets_aside_only_unicode_table_differences(clip_tokenizers) -> None:  # type: ignore[no-untyped-def]
    _ours, theirs = clip_tokenizers
    assert _engines_classify_differently(":\u0558", theirs)
    assert not _engines_classify_differently("a photo, of: X!", theirs)


def test_tokenizer_json_alone_needs_no_python_cleaning_for_plain_text(
    clip_tokenizers, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Programs that only read tokenizer.json (no ftfy step) get the same ids on ordinary text."""
    from tokenizers import Tokenizer

    _ours, theirs = clip_tokenizers
    path = tmp_path / "tokenizer.json"
    build_clip_tokenizer(77).save(str(path))
    raw = Tokenizer.from_file(str(path))
    for text in [
        "Image Quality",
        "  a   PHOTO\tof high\nquality. ",
        "don't “stop” ‘now’",
        "Café 42%",
    ]:
        assert raw.encode(text).ids == theirs([text])[0].tolist(), text


def test_clean_text_matches_open_clip_cleaning() -> None:
    from open_clip.tokenizer import _clean_lower

    for text in ["  Hello   WORLD ", "&amp;lt;b&amp;gt;", "ΣΑΣ", "ﬁne ＡＢＣ", "“x”"]:
        assert clean_text(text) == _clean_lower(text)


# --- export and parity ------------------------------------------------------------------------


def test_export_writes_checked_graphs_with_a_manifest(tiny_export: Path, tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    names = sorted(p.name for p in tiny_export.iterdir())
    assert names == ["image_encoder.onnx", MANIFEST_NAME, "text_encoder.onnx", "tokenizer.json"]
    manifest = json.loads((tiny_export / MANIFEST_NAME).read_text())
    assert manifest["preprocess"] == tiny_backbone.preprocess.to_dict()
    assert manifest["context_length"] == 77 and manifest["image_tokens"] is True
    assert 0 < max(manifest["parity"]["drift"].values()) <= 1e-4
    assert manifest["adapter"] is None
    # No work folder is left beside the export.
    assert [p.name for p in tiny_export.parent.iterdir()] == [tiny_export.name]


def test_onnx_features_match_torch_for_any_batch_size(tiny_export: Path, tiny_backbone) -> None:  # type: ignore[no-untyped-def]
    import torch

    encoder = OnnxModel(tiny_export, providers="cpu").image_encoder()
    assert encoder.preprocess == tiny_backbone.preprocess
    rng = np.random.default_rng(1)
    for batch in (1, 5):
        pixels = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        ours = encoder.encode_pixels(pixels, tokens=True)
        theirs = tiny_backbone.encode_pixels(pixels, tokens=True)
        assert ours.pooled.shape == (batch, 32) and ours.tokens.shape == (batch, 16, 32)
        assert relative_drift(ours.pooled, theirs.pooled) < 1e-5
        assert relative_drift(ours.tokens, theirs.tokens) < 1e-5
        assert encoder.encode_pixels(pixels).tokens is None
    del torch


def test_zero_shot_scores_and_order_match_torch(
    tiny_export: Path, tiny_backbone, many_photos: Path
) -> None:  # type: ignore[no-untyped-def]
    paths = sorted(many_photos.iterdir())
    model = OnnxModel(tiny_export, providers="cpu")
    for prompt, against in [("image quality", None), ("a sharp photo", "a blurry photo")]:
        torch_scorer = ZeroShotScorer.for_backbone(tiny_backbone, prompt, against)
        onnx_scorer = zero_shot_scorer(model, prompt, against)
        assert onnx_scorer.name == torch_scorer.name
        torch_scores = score_images(paths, tiny_backbone, torch_scorer, batch_size=5, workers=1)
        onnx_scores = score_images(
            paths, model.image_encoder(), onnx_scorer, batch_size=5, workers=1
        )
        a = np.array([s for _p, s in torch_scores])
        b = np.array([s for _p, s in onnx_scores])
        assert len(a) == 16 and np.ptp(a) > 1e-3  # the test only means something if scores differ
        assert np.max(np.abs(a - b)) < 1e-3
        assert [r.path for r in rank_scores(torch_scores)] == [
            r.path for r in rank_scores(onnx_scores)
        ]


def test_fingerprint_names_the_onnx_graph_and_preprocessing(
    tiny_export: Path, tiny_backbone, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    import shutil

    first = OnnxModel(tiny_export).image_encoder().fingerprint
    assert first == OnnxModel(tiny_export).image_encoder().fingerprint  # stable
    assert first != tiny_backbone.fingerprint  # never mixed with torch features in the cache
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["preprocess"]["resize_mode"] = "squash"
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    squashed = OnnxModel(copy).image_encoder()
    assert squashed.preprocess.resize_mode == "squash"
    assert squashed.fingerprint != first


def test_export_refuses_drift_beyond_tolerance_and_leaves_nothing(
    tiny_backbone, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "strict"
    with pytest.raises(ModelError) as info:
        export_backbone(tiny_backbone, out, tolerance=1e-12)
    message = str(info.value)
    assert "drifts from torch by" in message and "refusing" in message and "limit 1e-12" in message
    assert list(tmp_path.iterdir()) == []


def test_export_never_writes_into_a_folder_with_files(tiny_backbone, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOperationError, match="not empty"):
        export_backbone(tiny_backbone, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    export_backbone(tiny_backbone, empty)  # an empty folder is fine
    assert (empty / MANIFEST_NAME).is_file()


def test_cli_export_writes_a_folder_and_refuses_a_busy_one(tmp_path: Path) -> None:
    out = tmp_path / "cli-onnx"
    args = ["export", "--out", str(out), "--model", str(TINY_MODEL), "--pretrained", "none"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "exported 4 files" in result.stderr and "--runtime onnx" in result.stderr
    assert (out / IMAGE_FILE).is_file()
    again = runner.invoke(app, args, catch_exceptions=False)
    assert again.exit_code == UnsafeOperationError.exit_code
    assert "not empty" in again.stderr


# --- loading safety and providers -------------------------------------------------------------


def _resave_with_external_data(source: Path, target: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(source))
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )


def test_external_data_inside_the_folder_loads(tiny_export: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "ext"
    shutil.copytree(tiny_export, folder)
    (folder / IMAGE_FILE).unlink()
    _resave_with_external_data(tiny_export / IMAGE_FILE, folder / IMAGE_FILE, "image.weights")
    assert check_external_data(folder / IMAGE_FILE) == [(folder / "image.weights").resolve()]
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ours = OnnxModel(folder).image_encoder().encode_pixels(pixels)
    reference = OnnxModel(tiny_export).image_encoder().encode_pixels(pixels)
    np.testing.assert_allclose(ours.pooled, reference.pooled, rtol=0, atol=1e-6)


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_external_data_leaving_the_folder_is_refused(
    tiny_export: Path, tmp_path: Path, escape: str
) -> None:
    import shutil

    import onnx

    folder = tmp_path / "model"
    shutil.copytree(tiny_export, folder)
    outside = tmp_path / "outside.bin"
    graph = folder / IMAGE_FILE
    _resave_with_external_data(tiny_export / IMAGE_FILE, graph, "weights.bin")
    (folder / "weights.bin").rename(outside)
    if escape == "symlink":
        (folder / "weights.bin").symlink_to(outside)
    else:
        location = "../outside.bin" if escape == "dotdot" else str(outside)
        model = onnx.load(str(graph), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        graph.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="outside|not a path relative"):
        check_external_data(graph)
    pixels = np.zeros((1, 3, 32, 32), dtype=np.float32)
    with pytest.raises(ModelError, match="refusing"):
        OnnxModel(folder).image_encoder().encode_pixels(pixels)


def test_manifest_paths_leaving_the_folder_are_refused(tiny_export: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_export, folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["files"]["image"]["path"] = "../../etc/passwd"
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="outside"):
        OnnxModel(folder)


def test_a_folder_that_is_not_an_export_gets_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not an imgrank ONNX export.*imgrank export"):
        OnnxModel(tmp_path)
    with pytest.raises(ModelError, match="no such folder"):
        OnnxModel(tmp_path / "missing")


def test_providers_auto_cpu_and_unknown() -> None:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    expected = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available
        else ["CPUExecutionProvider"]
    )
    assert resolve_providers(None) == expected
    assert resolve_providers("auto") == expected
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers("CPUExecutionProvider, cpu") == ["CPUExecutionProvider"]
    with pytest.raises(UsageError, match="does not offer NoSuchExecutionProvider"):
        resolve_providers("NoSuchExecutionProvider")
    if "CUDAExecutionProvider" not in available:
        with pytest.raises(UsageError, match=r"imgrank\[gpu\]"):
            resolve_providers("cuda")


# --- adapters ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The authors' vit_tiny checkpoint imported as an imgrank model folder."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference vectors not found at {REFERENCE}")
    from imgrank.models.authors import import_authors_checkpoint

    out = tmp_path_factory.mktemp("adapter") / "vit_tiny"
    import_authors_checkpoint(REFERENCE / "checkpoint.pt", REFERENCE / "config.json", out)
    return out


@pytest.fixture(scope="module")
def adapter_export(reference_adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported through the CLI: without --model/--pretrained the folder's own backbone is used."""
    out = tmp_path_factory.mktemp("adapter-export") / "vit_tiny-onnx"
    result = runner.invoke(app, ["export", "--out", str(out), "--adapter", str(reference_adapter)])
    assert result.exit_code == 0, result.stderr
    return out


def test_adapter_export_reproduces_the_authors_reference_outputs(adapter_export: Path) -> None:
    """Each ONNX graph, fed the reference inputs, gives the authors' outputs (1e-5 absolute)."""
    from safetensors.numpy import load_file

    inputs = load_file(str(REFERENCE / "inputs.safetensors"))
    outputs = load_file(str(REFERENCE / "outputs.safetensors"))
    prompts = json.loads((REFERENCE / "config.json").read_text())["prompts"]
    model = OnnxModel(adapter_export, providers="cpu")
    assert model.preprocess.resize_mode == "squash" and model.preprocess.image_size == 64
    ids = model.tokenizer(prompts)
    assert (ids == inputs["text_ids"]).all()
    _pooled, text_tokens = model.encode_text(prompts)
    np.testing.assert_allclose(text_tokens, outputs["text_tokens"], rtol=0, atol=1e-5)
    features = model.image_encoder().encode_pixels(inputs["images"], tokens=True)
    np.testing.assert_allclose(features.tokens, outputs["image_tokens"], rtol=0, atol=1e-5)
    # One prompt per image here (the head also takes one prompt for the whole batch).
    (scores,) = model.session("adapter").run(
        ["scores"], {"image_tokens": outputs["image_tokens"], "text_tokens": outputs["text_tokens"]}
    )
    np.testing.assert_allclose(scores, outputs["adapter_logits"].reshape(-1), rtol=0, atol=1e-5)
    manifest = json.loads((adapter_export / MANIFEST_NAME).read_text())
    assert manifest["adapter"]["variant"] == "full" and manifest["adapter"]["name"] == "vit_tiny"


def test_adapter_scores_and_order_match_the_torch_sort(
    adapter_export: Path, reference_adapter: Path, many_photos: Path
) -> None:
    common = [str(many_photos), "--by", "Rank the numbers of horse.", "--format", "jsonl"]
    torch_run = runner.invoke(
        app, ["sort", *common, "--adapter", str(reference_adapter), "--device", "cpu"]
    )
    onnx_run = runner.invoke(
        app, ["sort", *common, "--onnx", str(adapter_export), "--providers", "cpu"]
    )
    assert torch_run.exit_code == 0, torch_run.stderr
    assert onnx_run.exit_code == 0, onnx_run.stderr
    torch_rows = [json.loads(line) for line in torch_run.stdout.splitlines()]
    onnx_rows = [json.loads(line) for line in onnx_run.stdout.splitlines()]
    assert len(torch_rows) == 16
    assert [r["path"] for r in onnx_rows] == [r["path"] for r in torch_rows]
    torch_scores = np.array([r["score"] for r in torch_rows])
    assert np.ptp(torch_scores) > 1e-3
    assert np.max(np.abs(torch_scores - np.array([r["score"] for r in onnx_rows]))) < 1e-3


# --- imgrank sort --runtime onnx --------------------------------------------------------------


def test_sort_runtime_onnx_matches_torch_end_to_end(tiny_export: Path, many_photos: Path) -> None:
    common = [str(many_photos), "--by", "image quality", "--format", "jsonl"]
    torch_run = runner.invoke(
        app,
        ["sort", *common, "--model", str(TINY_MODEL), "--pretrained", "none", "--device", "cpu"],
    )
    onnx_run = runner.invoke(
        app, ["sort", *common, "--runtime", "onnx", "--onnx", str(tiny_export)]
    )
    assert torch_run.exit_code == 0 and onnx_run.exit_code == 0, onnx_run.stderr
    a = [json.loads(line) for line in torch_run.stdout.splitlines()]
    b = [json.loads(line) for line in onnx_run.stdout.splitlines()]
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert max(abs(x["score"] - y["score"]) for x, y in zip(a, b, strict=True)) < 1e-3
    assert "RANDOM weights" in onnx_run.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--runtime", "onnx"], "needs --onnx DIR"),
        (["--runtime", "tensorflow"], "'tensorflow' is not one of"),  # refused by the choice
        (["--runtime", "torch", "--onnx", "{export}"], "--onnx DIR is for --runtime onnx"),
        (["--providers", "cpu"], "--providers is for --runtime onnx"),
        (["--onnx", "{export}", "--model", "ViT-B-16"], "--model only apply to --runtime torch"),
        (["--onnx", "{export}", "--device", "cuda"], "--device only apply to --runtime torch"),
        (["--onnx", "{export}", "--providers", "nosuch"], "does not offer nosuch"),
    ],
)
def test_sort_refuses_runtime_options_that_do_not_fit(
    tiny_export: Path, photo_dir: Path, extra: list[str], message: str
) -> None:
    args = ["sort", str(photo_dir), "--by", "image quality"]
    args += [a.replace("{export}", str(tiny_export)) for a in extra]
    result = runner.invoke(app, args)
    assert result.exit_code == UsageError.exit_code, result.stderr
    assert message in result.stderr


def test_sort_with_an_adapter_export_refuses_against(adapter_export: Path, photo_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            "sort",
            str(photo_dir),
            "--by",
            "sharp",
            "--against",
            "blurry",
            "--onnx",
            str(adapter_export),
        ],
    )
    assert result.exit_code == UsageError.exit_code
    assert "--against is for zero-shot" in result.stderr


def test_sort_runtime_onnx_runs_where_torch_cannot_be_imported(
    adapter_export: Path, reference_adapter: Path, many_photos: Path, tmp_path: Path
) -> None:
    """A real console-script run with torch, torchvision, open_clip and timm made unimportable."""
    shim = tmp_path / "no-torch"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import sys
            # A None entry makes `import torch` (and torch.anything) raise ImportError at once.
            for name in ("torch", "torchvision", "open_clip", "timm"):
                sys.modules[name] = None
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(shim)}
    script = Path(sys.executable).parent / "imgrank"
    blocked = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True
    )
    assert blocked.returncode != 0 and "halted" in blocked.stderr  # the shim really blocks torch
    args = [str(script), "sort", str(many_photos), "--by", "Rank the numbers of horse."]
    done = subprocess.run(
        [*args, "--runtime", "onnx", "--onnx", str(adapter_export), "--format", "jsonl"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["rank"] for r in rows] == list(range(1, 17))
    # The same command on the torch runtime fails under the shim: the test can tell the difference.
    torch_done = subprocess.run(
        [*args, "--adapter", str(reference_adapter), "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert torch_done.returncode == 4 and "torch is not installed" in torch_done.stderr


def test_cli_export_adapter_refuses_a_backbone_it_was_not_trained_on(
    reference_adapter: Path, tmp_path: Path
) -> None:
    out = tmp_path / "wrong"
    args = ["export", "--out", str(out), "--adapter", str(reference_adapter)]
    result = runner.invoke(app, [*args, "--model", str(TINY_MODEL)])
    assert result.exit_code == ModelError.exit_code
    assert "does not fit an adapter" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: m["files"].pop("image"),
        lambda m: m["files"].__setitem__("text", "text_encoder.onnx"),
        lambda m: m.__setitem__("preprocess", {"image_size": "large"}),
        lambda m: m.__setitem__("version", 99),
    ],
    ids=["no-image-graph", "text-entry-not-an-object", "bad-preprocess", "newer-format"],
)
def test_a_damaged_manifest_is_a_model_error_not_a_traceback(
    tiny_export: Path, tmp_path: Path, damage
) -> None:  # type: ignore[no-untyped-def]
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(tiny_export, folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    damage(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="export"):
        OnnxModel(folder).image_encoder().encode_pixels(np.zeros((1, 3, 32, 32), np.float32))


def _external(name: str, location: str):  # type: ignore[no-untyped-def]
    """A float tensor whose data onnxruntime would read from ``location``."""
    import onnx

    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=[1])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


@pytest.mark.parametrize("hiding_place", ["function body", "sparse attribute", "training info"])
def test_an_external_data_reference_hidden_outside_the_graph_is_refused(
    tmp_path: Path, hiding_place: str
) -> None:
    """Issue 17 item 8: a function-body constant reading ../secret.bin was opened by onnxruntime."""
    import onnx
    from onnx import helper

    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0\0\x80?")
    leak = _external("leak", "../secret.bin")
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    functions = []
    training = []
    if hiding_place == "function body":
        body = [
            helper.make_node("Constant", [], ["c"], value=leak),
            helper.make_node("Add", ["a", "c"], ["b"]),
        ]
        functions.append(
            helper.make_function("evil", "Leak", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
        )
        nodes = [helper.make_node("Leak", ["x"], ["y"], domain="evil")]
    elif hiding_place == "sparse attribute":
        sparse = helper.make_sparse_tensor(leak, _external("i", "../secret.bin"), [1])
        nodes = [
            helper.make_node("Constant", [], ["c"], sparse_value=sparse),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ]
    else:
        nodes = [helper.make_node("Identity", ["x"], ["y"])]
        init = helper.make_graph([], "init", [], [], initializer=[leak])
        training.append(onnx.TrainingInfoProto(initialization=init))
    graph = helper.make_graph(nodes, "g", [x], [y])
    model = helper.make_model(
        graph,
        functions=functions,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("evil", 1)],
    )
    model.training_info.extend(training)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match="points outside"):
        check_external_data(path)


# --- the prompt cache on onnxruntime ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["zero-shot", "adapter"])
def test_onnx_scorers_read_a_used_prompt_from_the_cache_without_the_text_session(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from imgrank.features.cache import EmbeddingCache
    from imgrank.models.onnx_runtime import OnnxAdapterScorer, zero_shot_scorer
    from imgrank.models.scoring import FeatureBatch

    folder = request.getfixturevalue("tiny_export" if kind == "zero-shot" else "adapter_export")
    pooled = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    batch = FeatureBatch(pooled=pooled)
    with EmbeddingCache.open(tmp_path / "cache.sqlite3") as cache:
        scorers = []
        for run in range(2):
            model = OnnxModel(folder, providers="cpu")
            if kind == "zero-shot":
                scorers.append(zero_shot_scorer(model, "image quality", cache=cache))
            else:
                scorers.append(OnnxAdapterScorer(model, "Rank the numbers of horse.", cache=cache))
            # The second run finds its texts under the text graph's fingerprint.
            assert ("text" in model._sessions) == (run == 0)
        assert cache.summary().prompts == (2 if kind == "zero-shot" else 1)
    if kind == "zero-shot":
        np.testing.assert_array_equal(scorers[0].score(batch), scorers[1].score(batch))
    else:  # the exact tokens back (float32 in the cache)
        np.testing.assert_array_equal(scorers[0]._text_tokens, scorers[1]._text_tokens)
