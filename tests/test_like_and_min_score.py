"""`--min-score` and `--like PHOTO` (issue 16, item 14)."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest
from conftest import PHOTOS, tiny_args
from typer.testing import CliRunner

from imgrank.cli import app

runner = CliRunner()


def sort(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["sort", *args, *tiny_args()], catch_exceptions=False)


def table(stdout: str) -> list[tuple[str, float]]:
    return [(Path(r["path"]).name, float(r["score"])) for r in csv.DictReader(io.StringIO(stdout))]


def test_min_score_keeps_only_images_scoring_at_least_x(photo_dir: Path) -> None:
    full = table(sort(str(photo_dir), "--by", "image quality").stdout)
    scores = sorted(score for _name, score in full)
    threshold = (scores[1] + scores[2]) / 2  # between the second and third lowest
    kept = sort(str(photo_dir), "--by", "image quality", "--min-score", f"{threshold:.6f}")
    assert kept.exit_code == 0, kept.stderr
    assert table(kept.stdout) == [(n, s) for n, s in full if s >= threshold]
    assert len(table(kept.stdout)) == 2
    # With --ascending the same images, lowest first; with --top, at most K of them.
    ascending = table(sort(str(photo_dir), "--by", "image quality", "--ascending",
                           "--min-score", f"{threshold:.6f}").stdout)  # fmt: skip
    assert ascending == list(reversed(table(kept.stdout)))
    none = sort(str(photo_dir), "--by", "image quality", "--min-score", "2")
    assert none.exit_code == 0 and table(none.stdout) == []
    assert "no image scored at least --min-score 2" in " ".join(none.stderr.split())


def test_like_alone_ranks_the_example_and_its_copy_first(photo_dir: Path, tmp_path: Path) -> None:
    example = tmp_path / "example.jpg"
    shutil.copy(PHOTOS / "chelsea.jpg", example)
    shutil.copy(PHOTOS / "chelsea.jpg", photo_dir / "chelsea-copy.jpg")
    result = sort(str(photo_dir), "--like", str(example))
    assert result.exit_code == 0, result.stderr
    ranked = table(result.stdout)
    assert {name for name, _ in ranked[:2]} == {"chelsea.jpg", "chelsea-copy.jpg"}
    assert ranked[0][1] == pytest.approx(1.0, abs=1e-4)  # cosine similarity to itself
    assert all(-1.0 - 1e-6 <= score <= 1.0 + 1e-6 for _, score in ranked)


def test_like_with_by_is_the_weighted_sum(photo_dir: Path, tmp_path: Path) -> None:
    example = tmp_path / "example.jpg"
    shutil.copy(PHOTOS / "rocket.jpg", example)
    by = dict(table(sort(str(photo_dir), "--by", "image quality").stdout))
    like = dict(table(sort(str(photo_dir), "--like", str(example)).stdout))
    for weight in ("0", "0.3", "1"):
        both = sort(str(photo_dir), "--by", "image quality", "--like", str(example),
                    "--like-weight", weight)  # fmt: skip
        assert both.exit_code == 0, both.stderr
        w = float(weight)
        for name, score in table(both.stdout):
            expected = (1 - w) * by[name] + w * (1 + like[name]) / 2
            assert score == pytest.approx(expected, abs=2e-6), (weight, name)
    # Several examples: their mean; both photos score alike against it.
    two = sort(str(photo_dir), "--like", str(photo_dir / "rocket.jpg"), "--like",
               str(photo_dir / "coffee.jpg"))  # fmt: skip
    scores = dict(table(two.stdout))
    assert scores["rocket.jpg"] == pytest.approx(scores["coffee.jpg"], abs=1e-4)


def test_like_and_by_mistakes_are_refused_before_any_work(photo_dir: Path, tmp_path: Path) -> None:
    assert "--like PHOTO" in sort(str(photo_dir)).stderr  # neither --by nor --like
    missing = sort(str(photo_dir), "--like", str(tmp_path / "nope.jpg"))
    assert missing.exit_code == 2 and "nope.jpg: no such photo" in missing.stderr
    weight = sort(str(photo_dir), "--by", "x", "--like", str(photo_dir / "coffee.jpg"),
                  "--like-weight", "1.5")  # fmt: skip
    assert weight.exit_code == 2 and "--like-weight" in weight.stderr
