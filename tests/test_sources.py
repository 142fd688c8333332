"""Inputs beyond a folder: --paths-from (text, CSV, Parquet), file:// URIs; ray never imported."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PHOTOS, tiny_args
from typer.testing import CliRunner

from imgrank.cli import app
from imgrank.images.sources import is_uri, list_sources, read_path_list

runner = CliRunner()


def sort(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["sort", *args, *tiny_args(), "--no-cache"], catch_exceptions=False)


def scores(stdout: str) -> dict[str, float]:
    return {row["path"]: float(row["score"]) for row in map(json.loads, stdout.splitlines())}


def test_a_text_list_ranks_exactly_the_listed_files_and_reports_missing_ones(
    photo_dir: Path, tmp_path: Path
) -> None:
    listing = tmp_path / "list.txt"
    # Relative entries are relative to the list's folder; comments and blank lines are ignored.
    listing.write_text(
        f"# chosen photos\nphotos/coffee.jpg\n\n{photo_dir / 'rocket.jpg'}\nphotos/gone.jpg\n"
    )
    result = sort("--paths-from", str(listing), "--by", "image quality", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    got = scores(result.stdout)
    assert sorted(Path(p).name for p in got) == ["coffee.jpg", "rocket.jpg"]
    assert "gone.jpg: listed in --paths-from but does not exist" in result.stderr
    # Same scores as ranking the folder: the list changes which files, not how they score.
    folder_run = sort(str(photo_dir), "--by", "image quality", "--format", "jsonl")
    whole = {Path(p).name: s for p, s in scores(folder_run.stdout).items()}
    for path, score in got.items():
        assert score == pytest.approx(whole[Path(path).name], abs=1e-6)


def test_csv_and_parquet_lists_need_a_path_column(photo_dir: Path, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    paths = [str(p) for p in sorted(photo_dir.glob("*.jpg"))][:3]
    table = tmp_path / "rated.csv"
    with open(table, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["rating", "path"])
        writer.writerows([[i, p] for i, p in enumerate(paths)])
    pq.write_table(pa.table({"path": paths, "rating": [1, 2, 3]}), tmp_path / "rated.parquet")
    assert read_path_list(table) == [Path(p) for p in paths]
    assert read_path_list(tmp_path / "rated.parquet") == [Path(p) for p in paths]

    result = sort("--paths-from", str(tmp_path / "rated.parquet"), "--by", "x", "--format", "paths")
    assert result.exit_code == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == sorted(paths)

    pq.write_table(pa.table({"file": paths}), tmp_path / "wrong.parquet")
    refused = sort("--paths-from", str(tmp_path / "wrong.parquet"), "--by", "x")
    assert refused.exit_code == 2
    assert "has no 'path' column (its columns: file)" in refused.stderr


def test_src_and_paths_from_together_are_refused(photo_dir: Path, tmp_path: Path) -> None:
    listing = tmp_path / "l.txt"
    listing.write_text("x.jpg\n")
    result = sort(str(photo_dir), "--paths-from", str(listing), "--by", "x")
    assert result.exit_code == 2
    assert "either SRC or --paths-from" in result.stderr
    assert sort("--by", "x").exit_code == 2


def test_file_uris_are_listed_and_read_through_pyarrow(photo_dir: Path) -> None:
    pytest.importorskip("pyarrow")
    (photo_dir / "broken.jpg").write_bytes(b"not a jpeg")
    (photo_dir / ".hidden.jpg").write_bytes((PHOTOS / "coffee.jpg").read_bytes())
    uri = photo_dir.as_uri()
    listed = list_sources(uri)
    assert all(is_uri(s) and str(s).startswith("file:///") for s in listed)
    assert sorted(str(s).rsplit("/", 1)[1] for s in listed) == [
        "astronaut.jpg", "broken.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]  # fmt: skip

    by_uri = sort(uri, "--by", "image quality", "--format", "jsonl")
    assert by_uri.exit_code == 0, by_uri.stderr
    # The ranking names the photos as given (URIs), with the scores of the local folder.
    by_path = sort(str(photo_dir), "--by", "image quality", "--format", "jsonl")
    local = {Path(p).name: s for p, s in scores(by_path.stdout).items()}
    remote = scores(by_uri.stdout)
    assert all(p.startswith("file:///") for p in remote)
    assert {p.rsplit("/", 1)[1]: s for p, s in remote.items()} == pytest.approx(local, abs=1e-6)
    assert "broken.jpg: not an image Pillow can read" in by_uri.stderr


def test_a_missing_uri_is_one_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    result = sort((tmp_path / "nowhere").as_uri(), "--by", "x")
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_help_and_local_sorts_never_import_ray_or_pyarrow(photo_dir: Path) -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from imgrank.cli import app\n"
        f"args = {['sort', str(photo_dir), '--by', 'x', *tiny_args(), '--no-cache']!r}\n"
        "result = CliRunner().invoke(app, args)\n"
        "assert result.exit_code == 0, result.output\n"
        "print([m for m in ('ray', 'pyarrow') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    imgrank = shutil.which("imgrank") or str(Path(sys.executable).parent / "imgrank")
    helped = subprocess.run(
        [sys.executable, "-X", "importtime", imgrank, "sort", "--help"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert helped.returncode == 0
    assert "--engine" in helped.stdout and "--paths-from" in helped.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in helped.stderr.splitlines()}
    assert not {m for m in imported if m.split(".")[0] in ("ray", "pyarrow")}


def test_a_text_list_drops_duplicates_and_keeps_uris_as_given(tmp_path: Path) -> None:
    listing = tmp_path / "l.txt"
    listing.write_text("a.jpg\na.jpg\ns3://bucket/b.jpg\n")
    assert read_path_list(listing) == [tmp_path / "a.jpg", "s3://bucket/b.jpg"]
