"""Camera RAW files: the preview and demosaic paths, orientation, pairs, broken and unreadable RAWs.

The DNGs are made from the real test photos (tests/dngmaker.py) and read back by
rawpy/LibRaw exactly as a camera's file would be.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTOS, tiny_args
from typer.testing import CliRunner

pytest.importorskip("rawpy", reason="the raw extra (rawpy) is not installed")
pytest.importorskip("pidng", reason="pidng (test dependency of the raw extra) is not installed")

from dngmaker import make_dng  # noqa: E402
from PIL import Image  # noqa: E402

from imgrank.cli import app  # noqa: E402
from imgrank.errors import ImageDecodeError  # noqa: E402
from imgrank.images import raw as raw_module  # noqa: E402
from imgrank.images.decode import find_images, open_image  # noqa: E402
from imgrank.images.raw import pair_raw_files  # noqa: E402

runner = CliRunner()
COFFEE = PHOTOS / "coffee.jpg"  # 600x400, landscape


def similarity(image: Image.Image, reference: Image.Image) -> float:
    """Pixel correlation after bringing the reference to the image's size."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64).ravel()
    b = np.asarray(reference.convert("RGB").resize(image.size), dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def test_dngs_made_for_the_tests_are_real_raws_rawpy_reads(tmp_path: Path) -> None:
    import rawpy

    plain = make_dng(COFFEE, tmp_path / "plain.dng")
    with_preview = make_dng(COFFEE, tmp_path / "preview.dng", preview_size=480)
    with rawpy.imread(str(plain)) as raw:
        assert (raw.sizes.width, raw.sizes.height) == (600, 400)
        assert raw.raw_pattern is not None  # a Bayer sensor image, not an RGB picture
        with pytest.raises(rawpy.LibRawNoThumbnailError):
            raw.extract_thumb()
    with rawpy.imread(str(with_preview)) as raw:
        assert raw.extract_thumb().format == rawpy.ThumbFormat.JPEG


def test_a_large_enough_preview_is_used_instead_of_demosaicing(tmp_path: Path) -> None:
    path = make_dng(COFFEE, tmp_path / "p.dng", preview_size=480)
    image = open_image(path, min_side=300)
    assert image.size == (480, 320)  # the preview's size; a half-size demosaic is 300x200
    # Like a JPEG, the preview is decoded at a reduced DCT scale that still covers min_side.
    assert open_image(path, min_side=64).size == (120, 80)
    assert similarity(image, Image.open(COFFEE)) > 0.95


def test_a_small_preview_or_none_means_a_half_size_demosaic(tmp_path: Path) -> None:
    small = make_dng(COFFEE, tmp_path / "small.dng", preview_size=100)  # 100x67 < 2 x 64
    plain = make_dng(COFFEE, tmp_path / "plain.dng")
    for path in (small, plain):
        image = open_image(path, min_side=128)
        assert image.size == (300, 200)
        assert image.mode == "RGB"
        # The sensor data demosaiced looks like the photo it was made from.
        assert similarity(image, Image.open(COFFEE)) > 0.9
    # No min_side (the reference path): always the sensor data, even with a big preview.
    big = make_dng(COFFEE, tmp_path / "big.dng", preview_size=480)
    assert open_image(big).size == (300, 200)


@pytest.mark.parametrize("preview_size", [None, 480])
def test_the_recorded_orientation_is_applied(tmp_path: Path, preview_size: int | None) -> None:
    path = make_dng(COFFEE, tmp_path / "rotated.dng", preview_size=preview_size, orientation=6)
    image = open_image(path, min_side=64)
    width, height = image.size
    assert height > width  # 90 degrees clockwise: the landscape photo stands upright
    upright = Image.open(COFFEE).transpose(Image.Transpose.ROTATE_270)
    assert similarity(image, upright) > 0.9
    assert similarity(image, Image.open(COFFEE).transpose(Image.Transpose.ROTATE_90)) < 0.5


@pytest.mark.parametrize("preview_size", [None, 100])
def test_a_truncated_raw_is_refused_with_a_reason(tmp_path: Path, preview_size: int | None) -> None:
    path = make_dng(COFFEE, tmp_path / "cut.dng", preview_size=preview_size)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        open_image(path, min_side=128)  # the 100 px preview is too small to stand in


def test_a_file_that_is_not_a_raw_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fake.cr2"
    path.write_bytes(b"not a raw file at all" * 100)
    with pytest.raises(ImageDecodeError, match="LibRaw"):
        open_image(path)


def test_pairing_rules(tmp_path: Path) -> None:
    names = [
        "IMG_1.CR2",
        "IMG_1.JPG",
        "IMG_2.NEF",
        "IMG_3.jpg",
        "sub/IMG_1.dng",
        "IMG_4.dng",
        "IMG_4.heic",
        "IMG_4.jpeg",
    ]
    paths = [tmp_path / n for n in names]
    paired = pair_raw_files(paths, can_decode=True)
    assert paired.raw_of == {
        tmp_path / "IMG_1.JPG": tmp_path / "IMG_1.CR2",
        tmp_path / "IMG_4.jpeg": tmp_path / "IMG_4.dng",
    }
    # Every file appears once: as a photo or as the RAW of one.
    assert sorted(paired.photos + list(paired.raw_of.values())) == sorted(paths)
    assert tmp_path / "sub/IMG_1.dng" in paired.photos  # another folder is another photo
    separate = pair_raw_files(paths, mode="separate", can_decode=True)
    assert separate.photos == paths and not separate.raw_of
    unreadable = pair_raw_files(paths, can_decode=False)
    assert unreadable.unreadable == [tmp_path / "IMG_2.NEF", tmp_path / "sub/IMG_1.dng"]


@pytest.fixture
def card_dump(tmp_path: Path) -> Path:
    """What a camera card looks like: RAWs with and without previews, a RAW+JPEG pair, a broken RAW."""
    folder = tmp_path / "card"
    folder.mkdir()
    make_dng(PHOTOS / "rocket.jpg", folder / "DSC_0001.dng", preview_size=480)
    make_dng(PHOTOS / "chelsea.jpg", folder / "DSC_0002.dng")
    make_dng(PHOTOS / "coffee.jpg", folder / "DSC_0003.dng", orientation=6)
    shutil.copy(PHOTOS / "astronaut.jpg", folder / "DSC_0004.jpg")
    make_dng(PHOTOS / "astronaut.jpg", folder / "DSC_0004.dng")
    broken = make_dng(PHOTOS / "coffee.jpg", folder / "DSC_0005.dng")
    broken.write_bytes(broken.read_bytes()[:5000])
    return folder


def sort(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["sort", *args, *tiny_args()], catch_exceptions=False)


def test_a_card_dump_sorts_every_usable_photo_once_and_names_the_broken_raw(
    card_dump: Path,
) -> None:
    result = sort(str(card_dump), "--by", "a rocket", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    names = sorted(Path(r["path"]).name for r in rows)
    assert names == ["DSC_0001.dng", "DSC_0002.dng", "DSC_0003.dng", "DSC_0004.jpg"]
    (pair,) = [r for r in rows if "raw" in r]
    assert Path(pair["path"]).name == "DSC_0004.jpg" and Path(pair["raw"]).name == "DSC_0004.dng"
    assert "DSC_0005.dng" in result.stderr and "truncated" in result.stderr

    separate = sort(
        str(card_dump), "--by", "a rocket", "--format", "jsonl", "--raw-pairs", "separate"
    )
    rows = [json.loads(line) for line in separate.stdout.splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == [
        *names[:3],
        "DSC_0004.dng",
        "DSC_0004.jpg",
    ]
    assert not any("raw" in r for r in rows)


def test_pairs_are_renamed_and_linked_together(card_dump: Path, tmp_path: Path) -> None:
    (card_dump / "DSC_0005.dng").unlink()
    links = tmp_path / "links"
    result = sort(
        str(card_dump),
        "--by",
        "a rocket",
        "--format",
        "jsonl",
        "--rename",
        "--apply",
        "--link",
        str(links),
    )
    assert result.exit_code == 0, result.stderr
    names = sorted(os.listdir(card_dump))
    jpeg = [n for n in names if n.endswith("DSC_0004.jpg")]
    assert len(jpeg) == 1 and jpeg[0][:5] != "DSC_0"
    assert jpeg[0].replace(".jpg", ".dng") in names  # the RAW got the same rank prefix
    # One link for each file of the pair (links are named 0001_<name>).
    assert sorted(n.split("_", 1)[1] for n in os.listdir(links) if n != ".imgrank-output") == names
    assert runner.invoke(app, ["undo", "--last"]).exit_code == 0
    assert "DSC_0004.dng" in os.listdir(card_dump) and "DSC_0004.jpg" in os.listdir(card_dump)


def test_without_the_extra_raws_are_listed_once_with_the_hint(
    card_dump: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(raw_module, "_raw_state", False)
    found = find_images(card_dump)
    assert sum(p.suffix == ".dng" for p in found) == 5  # listed, not silently ignored
    result = sort(str(card_dump), "--by", "a rocket", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    # The pair still ranks through its JPEG and keeps its RAW.
    assert [(Path(r["path"]).name, Path(r["raw"]).name) for r in rows] == [
        ("DSC_0004.jpg", "DSC_0004.dng")
    ]
    for name in ("DSC_0001.dng", "DSC_0002.dng", "DSC_0003.dng", "DSC_0005.dng"):
        assert result.stderr.count(name) == 1
    assert result.stderr.count("pip install 'imgrank[raw]'") == 4


def test_rank_scores_without_pairs_and_with_a_pair() -> None:
    from imgrank.ranking import rank_scores

    scored = [(Path("b.jpg"), 0.2), (Path("a.jpg"), 0.9)]
    assert [(r.path.name, r.raw) for r in rank_scores(scored)] == [("a.jpg", None), ("b.jpg", None)]
    paired = rank_scores(scored, raw_of={Path("b.jpg"): Path("b.cr2")})
    assert paired[1].files == (Path("b.jpg"), Path("b.cr2"))
