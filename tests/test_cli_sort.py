"""`imgrank sort` end to end: in-process CLI runs and real console-script subprocesses."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PHOTOS, run_with_stderr_on_a_tty, tiny_args
from typer.testing import CliRunner

from imgrank.cli import app

runner = CliRunner()
IMGRANK = shutil.which("imgrank") or str(Path(sys.executable).parent / "imgrank")


def sort(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["sort", *args, *tiny_args()], catch_exceptions=False)


def rows(stdout: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(stdout)))


# --- outputs ----------------------------------------------------------------------------------


def test_csv_ranks_every_photo_best_first(photo_dir: Path) -> None:
    result = sort(str(photo_dir), "--by", "image quality")
    assert result.exit_code == 0, result.stderr
    table = rows(result.stdout)
    assert [r["rank"] for r in table] == ["1", "2", "3", "4"]
    scores = [float(r["score"]) for r in table]
    assert scores == sorted(scores, reverse=True)
    assert sorted(Path(r["path"]).name for r in table) == sorted(p.name for p in PHOTOS.glob("*.jpg"))
    assert "RANDOM weights" in result.stderr  # --pretrained none is loud


def test_ascending_and_top(photo_dir: Path) -> None:
    best_first = rows(sort(str(photo_dir), "--by", "image quality").stdout)
    worst_first = rows(sort(str(photo_dir), "--by", "image quality", "--ascending").stdout)
    assert [r["path"] for r in worst_first] == [r["path"] for r in reversed(best_first)]
    top2 = rows(sort(str(photo_dir), "--by", "image quality", "--top", "2").stdout)
    assert [r["path"] for r in top2] == [r["path"] for r in best_first[:2]]


def test_jsonl_and_paths_formats_agree_with_csv(photo_dir: Path) -> None:
    table = rows(sort(str(photo_dir), "--by", "sharpness").stdout)
    jsonl = [json.loads(line) for line in sort(str(photo_dir), "--by", "sharpness", "--format", "jsonl").stdout.splitlines()]
    assert [(o["rank"], o["path"]) for o in jsonl] == [(int(r["rank"]), r["path"]) for r in table]
    # Two runs (the second served from the cache): equal up to float noise and CSV rounding.
    assert [o["score"] for o in jsonl] == pytest.approx([float(r["score"]) for r in table], abs=2e-6)
    paths = sort(str(photo_dir), "--by", "sharpness", "--format", "paths").stdout.splitlines()
    assert paths == [r["path"] for r in table]
    null = sort(str(photo_dir), "--by", "sharpness", "--format", "paths", "-0").stdout_bytes
    assert null.split(b"\0")[:-1] == [p.encode() for p in paths] and null.endswith(b"\0")


def test_against_changes_the_phrasing(photo_dir: Path) -> None:
    result = sort(str(photo_dir), "--by", "a sharp photo", "--against", "a blurry photo", "--format", "jsonl")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 4


def test_output_file_is_never_overwritten_without_force(photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ranking.csv"
    out.write_text("precious\n")
    result = sort(str(photo_dir), "--by", "image quality", "-o", str(out))
    assert result.exit_code != 0 and "already exists" in result.stderr
    assert out.read_text() == "precious\n"
    result = sort(str(photo_dir), "--by", "image quality", "-o", str(out), "--force")
    assert result.exit_code == 0 and len(rows(out.read_text())) == 4


def test_link_and_copy_write_rank_ordered_names(photo_dir: Path, tmp_path: Path) -> None:
    links, copies = tmp_path / "links", tmp_path / "copies"
    result = sort(str(photo_dir), "--by", "image quality", "--link", str(links), "--copy", str(copies))
    assert result.exit_code == 0, result.stderr
    order = [Path(r["path"]).name for r in rows(result.stdout)]
    assert sorted(os.listdir(links)) == [".imgrank-output"] + [f"{i:04d}_{name}" for i, name in enumerate(order, 1)]
    for i, name in enumerate(order, 1):
        link = links / f"{i:04d}_{name}"
        assert link.is_symlink() and link.resolve() == (photo_dir / name).resolve()
        assert (copies / f"{i:04d}_{name}").read_bytes() == (photo_dir / name).read_bytes()


def test_link_refuses_to_overwrite_existing_files(photo_dir: Path, tmp_path: Path) -> None:
    links = tmp_path / "links"
    links.mkdir()
    order = [Path(r["path"]).name for r in rows(sort(str(photo_dir), "--by", "image quality").stdout)]
    squatter = links / f"0001_{order[0]}"
    squatter.write_text("mine")
    result = sort(str(photo_dir), "--by", "image quality", "--link", str(links))
    assert result.exit_code == 6 and "imgrank did not write" in " ".join(result.stderr.split())
    assert squatter.read_text() == "mine" and os.listdir(links) == [squatter.name]


def test_output_folder_inside_scanned_folder_is_excluded(photo_dir: Path) -> None:
    ranked = photo_dir / "ranked"
    result = sort(str(photo_dir), "--by", "image quality", "--copy", str(ranked))
    assert result.exit_code == 0, result.stderr
    assert sorted(Path(r["path"]).name for r in rows(result.stdout)) == sorted(
        p.name for p in PHOTOS.glob("*.jpg")
    )
    assert len(os.listdir(ranked)) == 5  # four copies and imgrank's output marker


# --- bad input and exit codes ----------------------------------------------------------------------


def test_broken_files_are_skipped_named_and_listed(photo_dir: Path, tmp_path: Path) -> None:
    (photo_dir / "empty.jpg").write_bytes(b"")
    (photo_dir / "notes.jpg").write_text("not a photo")
    errors = tmp_path / "errors.csv"
    result = sort(str(photo_dir), "--by", "image quality", "--errors", str(errors), "--quiet")
    assert result.exit_code == 0
    assert len(rows(result.stdout)) == 4
    assert "empty.jpg" in result.stderr and "notes.jpg" in result.stderr
    listed = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(errors.open())}
    assert set(listed) == {"empty.jpg", "notes.jpg"}
    assert "empty" in listed["empty.jpg"] and "not an image" in listed["notes.jpg"]


def test_exit_codes_when_nothing_can_be_ranked(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = sort(str(empty), "--by", "image quality")
    assert result.exit_code == 3 and "no image files found" in result.stderr
    (empty / "broken.jpg").write_bytes(b"garbage")
    result = sort(str(empty), "--by", "image quality")
    assert result.exit_code == 3 and "could be read" in result.stderr and "broken.jpg" in result.stderr
    result = sort(str(tmp_path / "nope"), "--by", "image quality")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert result.stdout == ""


def test_bad_option_values_are_usage_errors(photo_dir: Path) -> None:
    assert sort(str(photo_dir), "--by", "x", "--format", "xml").exit_code == 2
    assert sort(str(photo_dir), "--by", "x", "-0").exit_code == 2
    assert sort(str(photo_dir), "--by", "x", "--top", "0").exit_code == 2


def test_offline_without_weights_is_one_clear_message(photo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import imgrank.models.clip.weights

    monkeypatch.setattr(imgrank.models.clip.weights, "_reachable", lambda cfg, timeout=5.0: False)
    result = runner.invoke(app, ["sort", str(photo_dir), "--by", "image quality", "--device", "cpu"])
    assert result.exit_code == 4
    assert "not in" in result.stderr and "--pretrained FILE" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_local_weights_files_load_and_reproduce(photo_dir: Path, tmp_path: Path, tiny_model: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from imgrank.models.clip.build import load_backbone
    from imgrank.models.clip.config import BackboneSpec

    torch.manual_seed(0)
    model = load_backbone(BackboneSpec(model=str(tiny_model), pretrained="none"), device="cpu").model
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pt")

    def run(weights: Path) -> str:
        return runner.invoke(
            app,
            ["sort", str(photo_dir), "--by", "image quality", "--model", str(tiny_model),
             "--pretrained", str(weights), "--device", "cpu"],
        ).stdout

    first = run(tmp_path / "w.safetensors")
    assert len(rows(first)) == 4
    assert run(tmp_path / "w.pt") == first

    bad = {k: v for k, v in state.items() if not k.startswith("visual.proj")}
    save_file(bad, tmp_path / "bad.safetensors")
    result = runner.invoke(
        app,
        ["sort", str(photo_dir), "--by", "q", "--model", str(tiny_model),
         "--pretrained", str(tmp_path / "bad.safetensors"), "--device", "cpu"],
    )
    assert result.exit_code == 4 and "missing: visual.proj" in result.stderr


# --- the console script, for real ---------------------------------------------------------------


def run_script(*args: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([IMGRANK, *args], capture_output=True, timeout=300, check=False, **kwargs)  # type: ignore[call-overload]


def test_console_script_pipes_data_only_to_stdout(photo_dir: Path) -> None:
    done = run_script("sort", str(photo_dir), "--by", "image quality", *tiny_args())
    assert done.returncode == 0, done.stderr
    table = rows(done.stdout.decode())
    assert len(table) == 4
    # stderr is not a terminal here: no progress bar or summary, only the random-weights warning.
    assert b"scored" not in done.stderr and b"RANDOM" in done.stderr
    quiet = run_script("sort", str(photo_dir), "--by", "image quality", "--quiet", *tiny_args())
    assert quiet.stderr == b""
    # The second run is served from the cache: the same order, scores up to float noise.
    again = rows(quiet.stdout.decode())
    assert [r["path"] for r in again] == [r["path"] for r in table]
    assert [float(r["score"]) for r in again] == pytest.approx(
        [float(r["score"]) for r in table], abs=2e-6
    )


def test_console_script_writes_non_utf8_names_back_exactly(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    raw = os.fsencode(folder) + b"/\xff\xfe-holiday.jpg"
    shutil.copy(PHOTOS / "coffee.jpg", raw)
    shutil.copy(PHOTOS / "rocket.jpg", folder / "rocket.jpg")
    done = run_script("sort", str(folder), "--by", "image quality", "--format", "paths", "-0", *tiny_args())
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split(b"\0")[:-1]) == sorted([raw, os.fsencode(folder / "rocket.jpg")])
    as_csv = run_script("sort", str(folder), "--by", "image quality", *tiny_args())
    assert raw in as_csv.stdout


def test_importing_the_cli_does_not_import_torch() -> None:
    code = (
        "import sys, imgrank.cli, imgrank.cli.sort_cmd; "
        "heavy = [m for m in ('torch', 'open_clip', 'onnxruntime') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert run_script("--help").returncode == 0
    assert b"--by" in run_script("sort", "--help").stdout


def test_missing_torch_is_one_message_not_a_traceback(photo_dir: Path, tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "torch.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(shim)}
    done = run_script("sort", str(photo_dir), "--by", "image quality", *tiny_args(), env=env)
    assert done.returncode == 4
    assert b"torch is not installed" in done.stderr and b"--runtime onnx" in done.stderr
    assert b"Traceback" not in done.stderr


def test_summary_on_a_terminal_says_what_came_from_the_cache(photo_dir: Path) -> None:
    """With stderr on a terminal: progress and a summary; the re-sort is served from the cache."""
    def sort_on_a_tty(prompt: str) -> str:
        stdout, terminal = run_with_stderr_on_a_tty(["sort", str(photo_dir), "--by", prompt, *tiny_args()])
        assert len(rows(stdout.decode())) == 4  # the data still goes to stdout only
        return terminal

    first = sort_on_a_tty("image quality")
    assert "scored 4 image(s) (0 from the embedding cache)" in " ".join(first.split())
    second = sort_on_a_tty("sharpness")
    assert "scored 4 image(s) (4 from the embedding cache)" in " ".join(second.split())


def test_a_failed_run_leaves_output_files_as_they_were(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.jpg").write_bytes(b"garbage")
    fresh, kept, errors = tmp_path / "new.csv", tmp_path / "kept.csv", tmp_path / "errors.csv"
    kept.write_text("an earlier ranking\n")
    for out, extra in ((fresh, []), (kept, ["--force"])):
        result = sort(str(broken), "--by", "x", "-o", str(out), "--errors", str(errors), "--force", *extra)
        assert result.exit_code == 3
        # The skipped files are listed even though nothing was ranked...
        assert [Path(r["path"]).name for r in csv.DictReader(errors.open())] == ["bad.jpg"]
    # ...but no empty ranking appears, and the one --force would replace is intact.
    assert not fresh.exists()
    assert kept.read_text() == "an earlier ranking\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "errors.csv", "kept.csv"]


def test_max_pixels_governs_the_limit_above_pillows_own_cap(
    photo_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 190 MP panorama: above Pillow's 179 MP cap, below the documented 200 MP default."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    Image.new("L", (19_000, 10_000), 128).save(photo_dir / "panorama.jpg", quality=50)
    from test_bad_inputs import bomb_png

    (photo_dir / "bomb.png").write_bytes(bomb_png())  # claims 2.5 gigapixels
    for limit in ([], ["--max-pixels", "300000000"]):
        result = sort(str(photo_dir), "--by", "x", *limit)
        assert result.exit_code == 0, result.stderr
        assert "panorama.jpg" in {Path(r["path"]).name for r in rows(result.stdout)}, limit
        assert "bomb.png: refused as a decompression bomb" in " ".join(result.stderr.split())
    lower = sort(str(photo_dir), "--by", "x", "--max-pixels", "100000000", "--no-cache")
    assert "panorama.jpg" not in {Path(r["path"]).name for r in rows(lower.stdout)}
    assert "more than the limit of 100,000,000" in " ".join(lower.stderr.split())
