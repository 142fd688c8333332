"""--link / --copy destinations (issue 16, items 1-3): checked first, never mixed, skipped by scans."""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path

import pytest
from conftest import PHOTOS, run_with_stderr_on_a_tty, tiny_args
from typer.testing import CliRunner

from imgrank.cli import app
from imgrank.files.output_folder import MARKER

runner = CliRunner()


def sort(*args: str, model: list[str] | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["sort", *args, *(model or tiny_args())], catch_exceptions=False)


def order(stdout: str) -> list[str]:
    return [Path(r["path"]).name for r in csv.DictReader(io.StringIO(stdout))]


def photos_in(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n != MARKER)


def test_a_folder_holding_other_files_is_refused_before_any_model_work(
    photo_dir: Path, tmp_path: Path
) -> None:
    for option in ("--link", "--copy"):
        out = tmp_path / f"out{option}"
        out.mkdir()
        (out / "holiday.jpg").write_bytes(b"the user's own photo")
        # A model that cannot load: had the run started model work it would fail with exit 4.
        broken_model = ["--model", str(tmp_path / "missing.json"), "--pretrained", "none"]
        result = sort(str(photo_dir), "--by", "x", option, str(out), model=broken_model)
        assert result.exit_code == 6, result.stderr
        message = " ".join(result.stderr.split())
        assert "imgrank did not write" in message and "holiday.jpg" in message and "mix" in message
        assert result.stdout == ""  # no ranking printed for a run that fails
        assert os.listdir(out) == ["holiday.jpg"]
        assert (out / "holiday.jpg").read_bytes() == b"the user's own photo"
        # --force does not change that: the folder is not imgrank's.
        assert sort(str(photo_dir), "--by", "x", option, str(out), "--force").exit_code == 6
        assert os.listdir(out) == ["holiday.jpg"]


def test_an_earlier_output_is_replaced_only_with_force_and_then_holds_exactly_the_new_ranking(
    photo_dir: Path, tmp_path: Path
) -> None:
    for option in ("--link", "--copy"):
        out = tmp_path / f"best{option}"
        first = sort(str(photo_dir), "--by", "image quality", option, str(out))
        assert first.exit_code == 0, first.stderr
        assert len(photos_in(out)) == 4
        again = sort(str(photo_dir), "--by", "sharpness", "--top", "2", option, str(out))
        assert again.exit_code == 6 and "--force" in again.stderr
        assert again.stdout == "" and len(photos_in(out)) == 4
        forced = sort(str(photo_dir), "--by", "sharpness", "--top", "2", option, str(out), "--force")
        assert forced.exit_code == 0, forced.stderr
        ranked = order(forced.stdout)
        assert photos_in(out) == [f"{i:04d}_{name}" for i, name in enumerate(ranked, 1)]
        # Files the user added to an imgrank output folder are never removed, even with --force.
        (out / "notes.txt").write_text("mine")
        refused = sort(str(photo_dir), "--by", "x", option, str(out), "--force")
        assert refused.exit_code == 6 and "notes.txt" in refused.stderr
        assert (out / "notes.txt").read_text() == "mine" and len(photos_in(out)) == 3


def test_an_output_of_the_other_kind_is_refused(photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "best"
    assert sort(str(photo_dir), "--by", "x", "--link", str(out)).exit_code == 0
    refused = sort(str(photo_dir), "--by", "x", "--copy", str(out), "--force")
    assert refused.exit_code == 6 and "--link output" in refused.stderr
    assert all((out / n).is_symlink() for n in photos_in(out))


def test_the_scanned_folder_cannot_be_the_output_folder(photo_dir: Path) -> None:
    for option in ("--link", "--copy"):
        result = sort(str(photo_dir), "--by", "x", option, str(photo_dir))
        assert result.exit_code == 2
        assert "is the folder being sorted" in result.stderr
        assert "no image files found" not in result.stderr
    assert sorted(os.listdir(photo_dir)) == sorted(p.name for p in PHOTOS.glob("*.jpg"))


def test_copies_inside_the_scanned_folder_are_not_ranked_by_the_next_sort(photo_dir: Path) -> None:
    from imgrank.sorter import SortRequest, sort_folder

    best = photo_dir / "best"
    assert sort(str(photo_dir), "--by", "x", "--copy", str(best)).exit_code == 0
    assert len(photos_in(best)) == 4
    request = SortRequest(
        folder=photo_dir, prompt="x", model=tiny_args()[1], pretrained="none", device="cpu"
    )
    ranking = sort_folder(request)
    assert sorted(i.path.name for i in ranking.items) == sorted(p.name for p in PHOTOS.glob("*.jpg"))
    assert ranking.skipped_outputs == [best]
    # Sorting the output folder itself, named explicitly, still works.
    assert len(order(sort(str(best), "--by", "x").stdout)) == 4
    # A folder holding nothing but an output folder says why nothing was found.
    only_outputs = photo_dir.parent / "only"
    only_outputs.mkdir()
    shutil.move(str(best), only_outputs / "best")
    nothing = sort(str(only_outputs), "--by", "x")
    assert nothing.exit_code == 3
    assert "1 folder(s) written by imgrank --link/--copy not scanned" in " ".join(nothing.stderr.split())


@pytest.mark.slow  # a console-script subprocess on a pseudo-terminal
def test_the_summary_counts_skipped_output_folders(photo_dir: Path) -> None:
    assert sort(str(photo_dir), "--by", "x", "--link", str(photo_dir / "links")).exit_code == 0
    stdout, terminal = run_with_stderr_on_a_tty(["sort", str(photo_dir), "--by", "x", *tiny_args()])
    assert len(order(stdout.decode())) == 4
    summary = " ".join(terminal.split())
    assert "skipped 0 file(s) and 1 imgrank output folder(s)" in summary
