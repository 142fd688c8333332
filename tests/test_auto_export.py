"""The default runtime: the model exported once to ONNX Runtime, reused, ranking as torch does.

The rest of the suite runs with ``IMGRANK_RUNTIME=torch`` (conftest); these tests
remove it to see what a user with the onnx extra installed gets by default.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL, tiny_args
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from imgrank.cli import app  # noqa: E402
from imgrank.errors import ModelError  # noqa: E402
from imgrank.models import auto_export  # noqa: E402
from imgrank.models.clip.config import BackboneSpec  # noqa: E402
from imgrank.models.selection import ModelSelection  # noqa: E402


@pytest.fixture
def automatic(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a user gets: no IMGRANK_RUNTIME, and (whatever this machine has) no GPU."""
    monkeypatch.delenv("IMGRANK_RUNTIME", raising=False)
    monkeypatch.setattr("imgrank.models.device.gpu_present", lambda: False)


def _sort(folder: Path, out: Path, *extra: str) -> tuple[dict[str, float], str]:
    result = CliRunner().invoke(
        app,
        ["sort", str(folder), "--by", "image quality", *tiny_args(), "-o", str(out), *extra],
    )
    assert result.exit_code == 0, result.output
    with out.open(newline="") as handle:
        scores = {Path(row["path"]).name: float(row["score"]) for row in csv.DictReader(handle)}
    return scores, result.output


def _exports(home: Path) -> list[Path]:
    folder = home / "cache" / "onnx"
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def test_default_sort_exports_once_then_reuses_and_ranks_as_torch(
    automatic: None, photo_dir: Path, tmp_path: Path, isolated_home: Path
) -> None:
    first, said = _sort(photo_dir, tmp_path / "a.csv")
    assert "exporting" in said and "ONNX" in said  # announced, once
    exports = _exports(isolated_home)
    assert len(exports) == 1 and (exports[0] / "imgrank-onnx.json").is_file()

    again, said_again = _sort(photo_dir, tmp_path / "b.csv", "--no-cache")
    assert "exporting" not in said_again
    assert _exports(isolated_home) == exports

    torch_scores, _ = _sort(photo_dir, tmp_path / "c.csv", "--runtime", "torch", "--no-cache")
    assert list(again) == list(torch_scores)  # the same order
    for name, score in torch_scores.items():
        assert again[name] == pytest.approx(score, abs=1e-4)
        assert first[name] == pytest.approx(score, abs=1e-4)


def test_the_cache_records_onnx_features_for_a_default_sort(
    automatic: None, photo_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "c.sqlite3"
    _sort(photo_dir, tmp_path / "a.csv", "--cache", str(cache))
    info = CliRunner().invoke(app, ["cache", "info", "--cache", str(cache)])
    assert info.exit_code == 0, info.output
    assert "ONNX" in info.output


@pytest.mark.parametrize(
    "forced",
    [
        ["--runtime", "torch"],
        ["--precision", "fp32"],
        ["--precision", "bf16"],
    ],
)
def test_a_forced_runtime_or_precision_makes_no_export(
    automatic: None, photo_dir: Path, tmp_path: Path, isolated_home: Path, forced: list[str]
) -> None:
    _, said = _sort(photo_dir, tmp_path / "a.csv", *forced)
    assert "exporting" not in said
    assert _exports(isolated_home) == []


def test_imgrank_runtime_torch_turns_it_off(
    automatic: None, monkeypatch: pytest.MonkeyPatch, photo_dir: Path, tmp_path: Path,
    isolated_home: Path,
) -> None:  # fmt: skip
    monkeypatch.setenv("IMGRANK_RUNTIME", "torch")
    _sort(photo_dir, tmp_path / "a.csv")
    assert _exports(isolated_home) == []


def test_a_gpu_keeps_torch(
    monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    monkeypatch.delenv("IMGRANK_RUNTIME", raising=False)
    monkeypatch.setattr("imgrank.models.device.gpu_present", lambda: True)
    resolved = ModelSelection(model=str(TINY_MODEL), pretrained="none", runtime="auto").resolve()
    assert resolved.automatic_runtime
    assert not auto_export.auto_onnx_applies(resolved)


def test_only_auto_may_export() -> None:
    for runtime, device, precision, expected in [
        ("auto", None, None, True),
        ("auto", "cpu", "auto", True),
        (None, None, None, False),  # training, eval, embed: torch unless told
        ("torch", None, None, False),
        ("auto", "cuda", None, False),
        ("auto", None, "fp16", False),
    ]:
        resolved = ModelSelection(runtime=runtime, device=device, precision=precision).resolve()
        assert resolved.automatic_runtime is expected, (runtime, device, precision)
        assert resolved.runtime == "torch"
    assert ModelSelection(runtime="auto", onnx=Path("x")).resolve().runtime == "onnx"


def test_a_failed_export_falls_back_to_torch_once_and_is_remembered(
    automatic: None, monkeypatch: pytest.MonkeyPatch, photo_dir: Path, tmp_path: Path,
    isolated_home: Path,
) -> None:  # fmt: skip
    calls = []

    def failing(*args: object, **kwargs: object) -> None:
        calls.append(1)
        raise ModelError("the image encoder drifts 3e-2 from torch")

    monkeypatch.setattr("imgrank.models.onnx_export.export_ranking_model", failing)
    scores, said = _sort(photo_dir, tmp_path / "a.csv")
    assert "could not export" in said and "drifts" in said and "PyTorch" in said
    assert len(scores) == 4
    failed = list((isolated_home / "cache" / "onnx").glob("*.failed"))
    assert len(failed) == 1 and "drifts" in json.loads(failed[0].read_text())["error"]

    _, said_again = _sort(photo_dir, tmp_path / "b.csv")
    assert calls == [1]  # not tried again
    assert "could not export" not in said_again


def test_a_damaged_export_is_made_again(
    automatic: None, photo_dir: Path, tmp_path: Path, isolated_home: Path
) -> None:
    _sort(photo_dir, tmp_path / "a.csv", "--no-cache")
    (export,) = _exports(isolated_home)
    (export / "image_encoder.onnx").write_bytes(b"not a graph")
    scores, said = _sort(photo_dir, tmp_path / "b.csv", "--no-cache")
    assert len(scores) == 4
    assert "unusable" in said or "exporting" in said
    scores_after, _ = _sort(photo_dir, tmp_path / "c.csv", "--no-cache")
    assert len(scores_after) == 4 and (export / "imgrank-onnx.json").is_file()


def test_the_export_key_follows_the_weights_and_the_precision_free_features(
    tmp_path: Path,
) -> None:
    random = BackboneSpec(model=str(TINY_MODEL), pretrained="none")
    assert auto_export.export_key(random, None) == auto_export.export_key(random, None)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\0" * 16)
    from_file = BackboneSpec(model=str(TINY_MODEL), pretrained=str(weights))
    key = auto_export.export_key(from_file, None)
    assert key is not None and key != auto_export.export_key(random, None)
    weights.write_bytes(b"\1" * 32)  # other weights in the same file: another export
    assert auto_export.export_key(from_file, None) != key


def test_default_api_sort_uses_the_export_and_agrees(
    automatic: None, photo_dir: Path, isolated_home: Path
) -> None:
    import imgrank

    default = imgrank.sort_folder(photo_dir, "image quality", model=str(TINY_MODEL),
                                  pretrained="none", cache=False)  # fmt: skip
    assert len(_exports(isolated_home)) == 1
    forced = imgrank.sort_folder(photo_dir, "image quality", model=str(TINY_MODEL),
                                 pretrained="none", cache=False, runtime="torch")  # fmt: skip
    assert [item.path for item in default.items] == [item.path for item in forced.items]
    np.testing.assert_allclose(
        [item.score for item in default.items], [item.score for item in forced.items], atol=1e-4
    )


def test_an_image_session_loaded_in_the_background_is_the_one_used(
    automatic: None, photo_dir: Path, tmp_path: Path, isolated_home: Path
) -> None:
    """A cold sort starts loading the image tower early; errors reach the caller as usual."""
    import shutil

    from imgrank.models.onnx_runtime import OnnxModel

    _sort(photo_dir, tmp_path / "a.csv", "--no-cache")
    (export,) = _exports(isolated_home)
    model = OnnxModel(export)
    model.start_session("image")
    model.start_session("image")  # once
    first = model.session("image")
    assert model.session("image") is first

    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    (broken / "text_encoder.onnx").write_bytes(b"not a graph")
    damaged = OnnxModel(broken)
    damaged.start_session("text")
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        damaged.session("text")


def test_a_full_disk_during_the_export_falls_back_to_torch_and_tries_again_later(
    automatic: None, monkeypatch: pytest.MonkeyPatch, photo_dir: Path, tmp_path: Path,
    isolated_home: Path,
) -> None:  # fmt: skip
    from imgrank.errors import OutputWriteError
    from imgrank.models import onnx_export

    real = onnx_export.export_ranking_model
    disk_full = [True]

    def export(*args: object, **kwargs: object) -> object:
        if disk_full[0]:
            raise OutputWriteError("cannot write image_encoder.onnx: No space left on device")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_export, "export_ranking_model", export)
    scores, said = _sort(photo_dir, tmp_path / "a.csv")
    assert len(scores) == 4
    assert "could not export" in said and "No space left" in said and "PyTorch" in said
    assert not list((isolated_home / "cache" / "onnx").glob("*.failed"))  # not remembered
    disk_full[0] = False
    _, said_again = _sort(photo_dir, tmp_path / "b.csv")
    assert "exporting" in said_again  # space freed: the next run exports
    assert len(_exports(isolated_home)) == 1


def test_cache_info_shows_the_automatic_exports(
    automatic: None, photo_dir: Path, tmp_path: Path, isolated_home: Path
) -> None:
    cache = tmp_path / "c.sqlite3"
    _sort(photo_dir, tmp_path / "a.csv", "--cache", str(cache))
    shown = CliRunner().invoke(app, ["cache", "info", "--cache", str(cache)])
    assert shown.exit_code == 0, shown.output
    assert "automatic ONNX exports: 1" in shown.output
    as_json = CliRunner().invoke(app, ["cache", "info", "--json", "--cache", str(cache)])
    record = json.loads(as_json.output)["onnx_exports"]
    assert record["count"] == 1 and record["disk_bytes"] > 0
    assert Path(record["folder"]) == isolated_home / "cache" / "onnx"
