"""`imgrank cull` end to end: bursts made from the real photos, with and without EXIF times."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from conftest import PHOTOS, tiny_args
from PIL import Image, ImageEnhance, ImageFilter
from typer.testing import CliRunner

from imgrank.cli import app

runner = CliRunner()

# (scene photo, seconds after the start, crop per cent, brightness, blur) per frame,
# the scene the frame shows, and the burst it belongs to. The file names are shuffled
# against shooting order so that no name-order accident can pass for grouping.
SHOTS = [
    ("zz_1.jpg", "coffee", 0.0, 0, 1.0, False, 1),
    ("aa_2.jpg", "coffee", 0.3, 3, 1.15, False, 1),
    ("mm_3.jpg", "coffee", 0.6, 5, 0.9, True, 1),
    ("bb_4.jpg", "rocket", 6.0, 0, 1.0, False, 2),
    ("yy_5.jpg", "rocket", 6.2, 4, 1.2, False, 2),
    ("cc_6.jpg", "chelsea", 9.0, 0, 1.0, False, 3),  # a single photo
    ("xx_7.jpg", "coffee", 3609.0, 2, 1.05, False, 4),  # the coffee, again an hour later
    ("dd_8.jpg", "coffee", 3609.4, 4, 0.95, False, 4),
]
START = "2026:06:01 10:00:00"


def _exif(seconds: float, offset: str = "+02:00") -> bytes:
    exif = Image.Exif()
    ifd = exif.get_ifd(0x8769)
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    ifd[36867] = f"2026:06:01 {10 + hours:02d}:{minutes:02d}:{secs:02d}"
    ifd[37521] = f"{int(round((seconds - whole) * 100)):02d}"
    ifd[36881] = offset
    return exif.tobytes()


def make_shoot(folder: Path, *, times: bool = True) -> dict[str, int]:
    """Write the frames of SHOTS into ``folder``; returns name -> true burst."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, scene, when, crop, light, blur, _burst in SHOTS:
        image = Image.open(PHOTOS / f"{scene}.jpg").convert("RGB")
        w, h = image.size
        dx, dy = w * crop // 100, h * crop // 100
        image = image.crop((dx, dy // 2, w - dx // 2, h - dy))
        image = ImageEnhance.Brightness(image).enhance(light)
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(1.5))
        image = image.resize((image.width // 2, image.height // 2))
        extra = {"exif": _exif(when)} if times else {}
        image.save(folder / name, quality=90, **extra)
    return {name: burst for name, *_rest, burst in SHOTS}


def cull(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["cull", *args, *tiny_args()], catch_exceptions=False)


def sort(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["sort", *args, *tiny_args()], catch_exceptions=False)


def rows(stdout: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(stdout)))


def partition(table: list[dict[str, str]]) -> set[frozenset[str]]:
    groups: dict[str, set[str]] = {}
    for row in table:
        groups.setdefault(row["group"], set()).add(Path(row["path"]).name)
    return {frozenset(g) for g in groups.values()}


def names_by_burst(truth: dict[str, int]) -> set[frozenset[str]]:
    bursts: dict[int, set[str]] = {}
    for name, burst in truth.items():
        bursts.setdefault(burst, set()).add(name)
    return {frozenset(b) for b in bursts.values()}


@pytest.fixture
def shoot(tmp_path: Path) -> Path:
    folder = tmp_path / "shoot"
    make_shoot(folder)
    return folder


def test_bursts_with_capture_times_one_keeper_each_in_capture_order(shoot: Path) -> None:
    result = cull(str(shoot), "--by", "image quality")
    assert result.exit_code == 0, result.stderr
    table = rows(result.stdout)
    assert list(table[0]) == ["group", "rank_in_group", "keep", "score", "path"]
    truth = {name: burst for name, *_rest, burst in SHOTS}
    # Bursts as shot; the single photo is a group of one; the revisit is a group of its own.
    assert partition(table) == names_by_burst(truth)
    # Groups numbered in capture order (burst 1 first), whatever the file names say.
    first_of_group = {}
    for row in table:
        first_of_group.setdefault(row["group"], truth[Path(row["path"]).name])
    assert [first_of_group[g] for g in sorted(first_of_group, key=int)] == [1, 2, 3, 4]
    # Best first inside each group; exactly one keeper, the first.
    for group in first_of_group:
        members = [r for r in table if r["group"] == group]
        assert [int(r["rank_in_group"]) for r in members] == list(range(1, len(members) + 1))
        scores = [float(r["score"]) for r in members]
        assert scores == sorted(scores, reverse=True)
        assert [r["keep"] for r in members] == ["1"] + ["0"] * (len(members) - 1)


def test_without_capture_times_photos_group_by_look_alone(tmp_path: Path) -> None:
    folder = tmp_path / "no-exif"
    make_shoot(folder, times=False)
    result = cull(str(folder), "--by", "image quality")
    assert result.exit_code == 0, result.stderr
    scenes: dict[str, set[str]] = {}
    for name, scene, *_rest in SHOTS:
        scenes.setdefault(scene, set()).add(name)
    # No time tells the revisit apart: the five coffee frames are one group.
    assert partition(rows(result.stdout)) == {frozenset(s) for s in scenes.values()}


def test_keep_two_and_keepers_equal_the_best_of_each_group_under_sort(shoot: Path) -> None:
    culled = rows(cull(str(shoot), "--by", "a sharp photo", "--keep", "2").stdout)
    ranked = rows(sort(str(shoot), "--by", "a sharp photo").stdout)
    score = {r["path"]: float(r["score"]) for r in ranked}
    groups: dict[str, list[dict[str, str]]] = {}
    for row in culled:
        groups.setdefault(row["group"], []).append(row)
        assert float(row["score"]) == pytest.approx(score[row["path"]], abs=1e-6)
    for members in groups.values():
        kept = [r["path"] for r in members if r["keep"] == "1"]
        best = sorted((r["path"] for r in members), key=lambda p: -score[p])[:2]
        assert len(kept) == min(2, len(members))
        assert set(kept) == set(best)


def test_paths_jsonl_and_link_give_the_keepers(shoot: Path, tmp_path: Path) -> None:
    table = rows(cull(str(shoot), "--by", "image quality").stdout)
    keepers = [r["path"] for r in table if r["keep"] == "1"]
    paths = cull(str(shoot), "--by", "image quality", "--paths").stdout.splitlines()
    assert paths == keepers
    jsonl = cull(str(shoot), "--by", "image quality", "--format", "jsonl").stdout.splitlines()
    records = [json.loads(line) for line in jsonl]
    assert [(r["group"], r["keep"], r["path"]) for r in records] == [
        (int(r["group"]), r["keep"] == "1", r["path"]) for r in table
    ]
    assert all("captured" in r for r in records)
    links = tmp_path / "best"
    result = cull(str(shoot), "--by", "image quality", "--link", str(links))
    assert result.exit_code == 0, result.stderr
    made = sorted(p for p in links.iterdir() if not p.name.startswith("."))  # not the marker
    assert [os.readlink(p) for p in made] == [str(Path(k).absolute()) for k in keepers]


def test_move_rejects_then_undo_restores_every_file_byte_identical(
    shoot: Path, tmp_path: Path
) -> None:
    for photo in list(shoot.iterdir()):  # each photo has an XMP sidecar with its edits
        photo.with_name(photo.name + ".xmp").write_text(f"<x:xmpmeta>{photo.name}</x:xmpmeta>")
    before = {p.name: p.read_bytes() for p in shoot.iterdir()}
    rejects = tmp_path / "rejects"
    result = cull(str(shoot), "--by", "image quality", "--move-rejects", str(rejects))
    assert result.exit_code == 0, result.stderr
    table = rows(result.stdout)
    kept = {Path(r["path"]).name for r in table if r["keep"] == "1"}
    with_sidecars = kept | {name + ".xmp" for name in kept}  # sidecars go with their photos
    assert {p.name for p in shoot.iterdir()} == with_sidecars
    assert {p.name for p in rejects.iterdir()} == set(before) - with_sidecars
    # A second cull of the folder sees only the keepers (nothing was deleted, only moved).
    again = rows(cull(str(shoot), "--by", "image quality").stdout)
    assert {Path(r["path"]).name for r in again} == kept

    undo = runner.invoke(app, ["undo", "--last"], catch_exceptions=False)
    assert undo.exit_code == 0, undo.stderr
    assert {p.name: p.read_bytes() for p in shoot.iterdir()} == before
    assert list(rejects.iterdir()) == []


def test_move_rejects_refuses_an_occupied_name_before_moving_anything(
    shoot: Path, tmp_path: Path
) -> None:
    rejects = tmp_path / "rejects"
    rejects.mkdir()
    for photo in shoot.iterdir():  # every name taken, so whichever photos are rejects
        (rejects / photo.name).write_bytes(b"someone else's file")
    before = {p.name: p.read_bytes() for p in shoot.iterdir()}
    result = cull(str(shoot), "--by", "image quality", "--move-rejects", str(rejects))
    assert result.exit_code == 6
    assert "never overwrites" in result.stderr
    assert {p.name: p.read_bytes() for p in shoot.iterdir()} == before
    assert all(p.read_bytes() == b"someone else's file" for p in rejects.iterdir())


def test_grouped_report_one_row_per_group_keepers_marked(shoot: Path, tmp_path: Path) -> None:
    report = tmp_path / "cull.html"
    result = cull(str(shoot), "--by", "image quality", "--report", str(report))
    assert result.exit_code == 0, result.stderr
    text = report.read_text()
    assert text.count('<h2 class="burst"') == 4
    assert text.count('class="tile keep"') == 4
    assert text.count('class="tile reject"') == len(SHOTS) - 4


def test_culling_after_a_sort_decodes_nothing_and_regrouping_is_only_grouping(
    shoot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import TINY_MODEL

    from imgrank.culler import collect_features, cull_features
    from imgrank.grouping import GroupingOptions
    from imgrank.sorter import SortRequest

    cache = tmp_path / "cache.sqlite3"
    assert sort(str(shoot), "--by", "image quality", "--cache", str(cache)).exit_code == 0

    import imgrank.images.decode as decode

    def no_decoding(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a photo was decoded")

    monkeypatch.setattr(decode, "open_image", no_decoding)  # the one decode (load_pixels)
    request = SortRequest(
        folder=shoot, prompt="image quality", model=str(TINY_MODEL), pretrained="none",
        device="cpu", cache=cache,
    )
    features = collect_features(request)
    assert features.from_cache == len(SHOTS)
    assert features.facts_read == 0
    one = cull_features(features, GroupingOptions(gap=2.0))
    wide = cull_features(features, GroupingOptions(gap=7200.0))
    assert one.groups == 4
    assert wide.groups == 3  # an unlimited gap lets the revisit join its scene


def test_bad_options_are_refused_before_any_work(shoot: Path, tmp_path: Path) -> None:
    result = cull(str(shoot), "--by", "x", "--keep", "0")
    assert result.exit_code != 0
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = cull(str(shoot), "--by", "x", "--move-rejects", str(a_file))
    assert result.exit_code != 0
    assert "is a file" in result.stderr


def test_xmp_pick_accepts_the_keepers_and_rejects_the_rest_then_undo(shoot: Path) -> None:
    pytest.importorskip("lxml")
    from imgrank.files.xmp import Field, read_fields

    pick, rating = Field("digiKam", "PickLabel"), Field("xmp", "Rating")
    table = rows(cull(str(shoot), "--by", "image quality").stdout)
    dry = cull(str(shoot), "--by", "image quality", "--xmp", "pick")
    assert dry.exit_code == 0, dry.stderr
    assert not list(shoot.glob("*.xmp"))  # a dry run changes nothing
    assert len(dry.stdout.splitlines()) == len(SHOTS)
    result = cull(str(shoot), "--by", "image quality", "--xmp", "pick", "--apply")
    assert result.exit_code == 0, result.stderr
    for row in table:
        fields = read_fields(Path(row["path"] + ".xmp").read_bytes(), [pick, rating])
        if row["keep"] == "1":
            assert fields[pick] == "3"
        else:
            assert (fields[pick], fields[rating]) == ("1", "-1")
    undo = runner.invoke(app, ["undo", "--last"], catch_exceptions=False)
    assert undo.exit_code == 0, undo.stderr
    assert not list(shoot.glob("*.xmp"))
    refused = cull(str(shoot), "--by", "image quality", "--xmp", "rating")
    assert refused.exit_code == 2 and "pick" in refused.stderr
