"""The HTML contact sheet: structure, escaping, thumbnails, size, and never overwriting."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import sys
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import tiny_args
from PIL import Image
from typer.testing import CliRunner

from imgrank.cli import app
from imgrank.errors import UnsafeOperationError, UsageError
from imgrank.ranking import Ranking, SkippedFile, rank_scores
from imgrank.report.html import (
    THUMBNAIL_SIZE,
    display_text,
    format_score,
    histogram_svg,
    is_imgrank_report,
    write_report,
)

PHOTOS = Path(__file__).parent / "data" / "photos"


class ReportParser(HTMLParser):
    """Collects the tiles, the skipped-files rows and the order of the sections."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tiles: list[dict[str, object]] = []
        self.skipped_rows: list[list[str]] = []
        self.sections: list[str] = []
        self.h1 = ""
        self.facts: dict[str, str] = {}
        self._tile: dict[str, object] | None = None
        self._field: str | None = None
        self._in_skipped = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._in_h1 = False
        self._dt: str | None = None
        self._capture: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "ol" and "grid" in classes:
            self.sections.append("grid")
        if tag == "section" and a.get("id") == "skipped":
            self.sections.append("skipped")
            self._in_skipped = True
        if tag == "svg":
            self.sections.append("histogram")
        if tag == "h1":
            self._in_h1 = True
        if tag in ("dt", "dd"):
            self._capture = []
        if tag == "li" and "tile" in classes:
            self._tile = {"rank": int(a["data-rank"]), "score": float(a["data-score"])}
        elif self._tile is not None:
            if tag == "a":
                self._tile["href"] = a["href"]
            elif tag == "img":
                self._tile["src"] = a["src"]
                self._tile["size"] = (int(a["width"]), int(a["height"]))
            elif "placeholder" in classes:
                self._field = "placeholder"
            elif "score" in classes:
                self._field = "score_text"
            elif "name" in classes:
                self._field = "name"
                self._tile["title"] = a.get("title")
        if self._in_skipped and tag == "tr":
            self._row = []
        if self._row is not None and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "li" and self._tile is not None:
            self.tiles.append(self._tile)
            self._tile = None
        if tag == "span":
            self._field = None
        if tag == "h1":
            self._in_h1 = False
        if tag == "dt" and self._capture is not None:
            self._dt = "".join(self._capture)
        if tag == "dd" and self._capture is not None and self._dt is not None:
            self.facts[self._dt] = "".join(self._capture)
        if tag in ("dt", "dd"):
            self._capture = None
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        if tag == "tr" and self._row:
            self.skipped_rows.append(self._row)
            self._row = None
        if tag == "section":
            self._in_skipped = False

    def handle_data(self, data: str) -> None:
        if self._tile is not None and self._field is not None:
            self._tile[self._field] = str(self._tile.get(self._field, "")) + data
        if self._in_h1:
            self.h1 += data
        if self._capture is not None:
            self._capture.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def decode_data_uri(src: str) -> Image.Image:
    header, payload = src.split(",", 1)
    assert header in ("data:image/webp;base64", "data:image/jpeg;base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    copies = []
    for photo in sorted(PHOTOS.glob("*.jpg")):
        copies.append(Path(shutil.copy(photo, folder / photo.name)))
    return copies


def make_ranking(paths: list[Path], **kwargs: object) -> Ranking:
    scored = [(path, 0.1 + 0.05 * index) for index, path in enumerate(paths)]
    items = rank_scores(
        scored, ascending=bool(kwargs.pop("ascending", False)), top=kwargs.pop("top", None)
    )  # type: ignore[arg-type]
    return Ranking(items=items, prompt="image quality", scorer="zero-shot (ViT-B-32)", **kwargs)  # type: ignore[arg-type]


def test_every_ranked_file_appears_once_in_rank_order_with_its_score(
    photos: list[Path], tmp_path: Path
) -> None:
    ranking = make_ranking(photos)
    out = write_report(ranking, tmp_path / "ranking.html")
    report = parse(out)

    assert [t["rank"] for t in report.tiles] == [1, 2, 3, 4]
    assert [t["href"] for t in report.tiles] == [
        item.path.absolute().as_uri() for item in ranking.items
    ]
    assert [t["score"] for t in report.tiles] == [item.score for item in ranking.items]
    assert [t["score_text"] for t in report.tiles] == [
        "0.250000",
        "0.200000",
        "0.150000",
        "0.100000",
    ]
    assert [t["name"] for t in report.tiles] == [item.path.name for item in ranking.items]
    # Highest score first: the last photo got the highest score.
    assert report.tiles[0]["name"] == photos[-1].name


def test_header_shows_prompt_scorer_order_and_a_histogram_of_the_scores(
    photos: list[Path], tmp_path: Path
) -> None:
    ranking = make_ranking(photos)
    ranking.seconds = 2.5
    html_text = write_report(ranking, tmp_path / "r.html").read_text(encoding="utf-8")
    report = parse(tmp_path / "r.html")

    assert report.h1 == "image quality"
    assert report.facts["Scorer"] == "zero-shot (ViT-B-32)"
    assert report.facts["Order"] == "highest score first"
    assert report.facts["Shown"] == "4 images"
    assert report.facts["Time"] == "2.5 s"
    assert report.sections[:2] == ["histogram", "grid"]
    counts = [int(n) for n in re.findall(r": (\d+) images?</title></rect>", html_text)]
    assert sum(counts) == 4


def test_top_and_ascending_are_reported_and_kept_in_order(
    photos: list[Path], tmp_path: Path
) -> None:
    ranking = make_ranking(photos, ascending=True, top=2)
    report = parse(write_report(ranking, tmp_path / "r.html", ascending=True, top=2))

    assert report.facts["Order"] == "lowest score first"
    assert report.facts["Shown"] == "2 images (--top 2)"
    assert [t["score"] for t in report.tiles] == sorted(t["score"] for t in report.tiles)  # type: ignore[type-var]
    assert [t["name"] for t in report.tiles] == [photos[0].name, photos[1].name]


def test_order_is_inferred_from_the_scores_when_not_given(
    photos: list[Path], tmp_path: Path
) -> None:
    report = parse(write_report(make_ranking(photos, ascending=True), tmp_path / "r.html"))
    assert report.facts["Order"] == "lowest score first"


def test_thumbnails_are_small_decodable_and_upright(tmp_path: Path) -> None:
    # A 300x150 landscape stored with EXIF orientation 6 ("rotate 90"): viewers show it portrait.
    sideways = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (300, 150), (200, 30, 30)).save(sideways, exif=exif)
    photo = Path(shutil.copy(PHOTOS / "coffee.jpg", tmp_path / "coffee.jpg"))
    ranking = make_ranking([sideways, photo])
    report = parse(write_report(ranking, tmp_path / "r.html"))

    sizes = {}
    for tile in report.tiles:
        image = decode_data_uri(str(tile["src"]))
        image.load()
        assert image.size == tile["size"]
        assert max(image.size) == THUMBNAIL_SIZE
        sizes[tile["name"]] = image.size
    assert sizes["sideways.jpg"] == (80, 160)  # upright: taller than wide
    assert sizes["coffee.jpg"] == (160, 107)  # 600x400 keeps its aspect ratio


def test_file_names_are_escaped(tmp_path: Path) -> None:
    nasty = tmp_path / "<script>alert(\"x\")<\\script> & 'q'.jpg"
    shutil.copy(PHOTOS / "chelsea.jpg", nasty)
    ranking = make_ranking([nasty])
    ranking.prompt = "<b>bold</b> & sharp"
    ranking.skipped = [SkippedFile(tmp_path / "<img src=x onerror=alert(1)>.png", "not <an> image")]
    out = write_report(ranking, tmp_path / "r.html")
    text = out.read_text(encoding="utf-8")

    assert "<script>" not in text and "<img src=x" not in text and "<b>bold" not in text
    report = parse(out)
    assert report.tiles[0]["name"] == nasty.name
    assert report.h1 == "<b>bold</b> & sharp"
    assert report.skipped_rows == [[str(ranking.skipped[0].path), "not <an> image"]]


@pytest.mark.skipif(
    sys.platform in ("win32", "darwin"), reason="needs a file system that stores raw bytes"
)
def test_non_utf8_file_name_is_shown_replaced_and_linked_exactly(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9 latin-1.jpg"
    try:
        shutil.copy(PHOTOS / "coffee.jpg", raw)
    except OSError as exc:
        pytest.skip(f"this file system refuses non-UTF-8 names: {exc}")
    path = Path(os.fsdecode(raw))
    ranking = make_ranking([path])
    ranking.skipped = [SkippedFile(path, "a reason naming " + str(path))]
    out = write_report(ranking, tmp_path / "r.html")

    report = parse(out)  # read_text(encoding="utf-8") would fail on a badly encoded report
    tile = report.tiles[0]
    assert tile["name"] == "caf\ufffd latin-1.jpg"
    assert "src" in tile  # the thumbnail was made from the oddly named file
    link = urllib.parse.urlparse(str(tile["href"]))
    assert urllib.parse.unquote_to_bytes(link.path) == raw
    assert display_text(str(path)).endswith("caf\ufffd latin-1.jpg")


def test_unreadable_images_get_a_placeholder_not_a_crash(
    photos: list[Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((PHOTOS / "rocket.jpg").read_bytes()[:2000])
    vanished = tmp_path / "vanished.jpg"  # ranked, then deleted before the report
    ranking = make_ranking([photos[0], broken, truncated, vanished])
    report = parse(write_report(ranking, tmp_path / "r.html"))

    by_name = {Path(str(t["name"])).name: t for t in report.tiles}
    assert "src" in by_name[photos[0].name]
    assert "not an image" in str(by_name["broken.jpg"]["placeholder"])
    assert "truncated" in str(by_name["truncated.jpg"]["placeholder"])
    assert "disappeared" in str(by_name["vanished.jpg"]["placeholder"])
    assert len(report.tiles) == 4  # still listed, with rank and score


def test_skipped_files_and_reasons_come_last(photos: list[Path], tmp_path: Path) -> None:
    ranking = make_ranking(photos)
    ranking.skipped = [
        SkippedFile(tmp_path / "a.png", "empty file (0 bytes)"),
        SkippedFile(tmp_path / "b.tif", "permission denied"),
    ]
    report = parse(write_report(ranking, tmp_path / "r.html"))

    assert report.sections[-1] == "skipped"
    assert report.skipped_rows == [
        [str(tmp_path / "a.png"), "empty file (0 bytes)"],
        [str(tmp_path / "b.tif"), "permission denied"],
    ]
    assert report.facts["Skipped"] == "2 files"


def test_names_are_shown_relative_to_the_common_folder(tmp_path: Path) -> None:
    (tmp_path / "photos" / "2023").mkdir(parents=True)
    (tmp_path / "photos" / "2024").mkdir()
    first = Path(shutil.copy(PHOTOS / "coffee.jpg", tmp_path / "photos" / "2023" / "x.jpg"))
    second = Path(shutil.copy(PHOTOS / "rocket.jpg", tmp_path / "photos" / "2024" / "x.jpg"))
    report = parse(write_report(make_ranking([first, second]), tmp_path / "r.html"))

    assert sorted(str(t["name"]) for t in report.tiles) == ["2023/x.jpg", "2024/x.jpg"]
    assert report.facts["Folder"] == str(tmp_path / "photos")


def test_an_empty_ranking_still_gives_a_valid_page(tmp_path: Path) -> None:
    ranking = Ranking(items=[], skipped=[SkippedFile(tmp_path / "x.jpg", "truncated file")])
    report = parse(write_report(ranking, tmp_path / "r.html"))
    assert report.tiles == []
    assert report.skipped_rows == [[str(tmp_path / "x.jpg"), "truncated file"]]


def test_histogram_copes_with_equal_and_non_finite_scores() -> None:
    svg = histogram_svg([0.5, 0.5, float("nan"), float("inf")])
    assert svg.count('class="bar"') == 1
    assert "0.500000 to 0.500000: 2 images" in svg
    assert "No finite scores" in histogram_svg([float("nan")])


def test_scores_are_shown_like_the_csv_and_never_as_zero() -> None:
    assert format_score(0.5693231) == "0.569323"  # what `imgrank sort` writes in its CSV
    assert format_score(-2.5) == "-2.500000"
    assert format_score(3e-7) == "3.0000e-07"
    assert format_score(0.0) == "0.000000"
    assert format_score(float("nan")) == "nan"


def test_progress_is_reported_for_every_thumbnail(photos: list[Path], tmp_path: Path) -> None:
    done: list[int] = []
    write_report(make_ranking(photos), tmp_path / "r.html", on_progress=done.append, workers=2)
    assert sum(done) == len(photos)


# --- never overwrite a user's file -------------------------------------------------------


def test_an_existing_file_that_is_not_a_report_is_left_alone(
    photos: list[Path], tmp_path: Path
) -> None:
    precious = tmp_path / "notes.html"
    precious.write_text("<html>my notes</html>", encoding="utf-8")
    with pytest.raises(UnsafeOperationError, match="not an imgrank report"):
        write_report(make_ranking(photos), precious)
    assert precious.read_text(encoding="utf-8") == "<html>my notes</html>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.html", "photos"]  # no temp file


def test_overwrite_replaces_any_file(photos: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "notes.html"
    target.write_text("old", encoding="utf-8")
    write_report(make_ranking(photos), target, overwrite=True)
    assert is_imgrank_report(target)


def test_a_previous_report_is_replaced(photos: list[Path], tmp_path: Path) -> None:
    target = tmp_path / "r.html"
    write_report(make_ranking(photos[:1]), target)
    write_report(make_ranking(photos), target)
    assert len(parse(target).tiles) == len(photos)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "r.html"]


def test_an_interrupted_report_leaves_the_previous_one_and_no_temporary_file(
    photos: list[Path], tmp_path: Path
) -> None:
    target = tmp_path / "r.html"
    write_report(make_ranking(photos[:1]), target)
    before = target.read_bytes()

    def interrupt(_count: int) -> None:
        raise KeyboardInterrupt

    paths = _many(tmp_path, 200)
    with pytest.raises(KeyboardInterrupt):
        write_report(make_ranking(paths), target, on_progress=interrupt)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many", "photos", "r.html"]


def test_report_gets_ordinary_permissions(photos: list[Path], tmp_path: Path) -> None:
    target = write_report(make_ranking(photos[:1]), tmp_path / "r.html")
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_bad_destinations_are_refused_with_a_clear_message(
    photos: list[Path], tmp_path: Path
) -> None:
    with pytest.raises(UsageError, match="is a folder"):
        write_report(make_ranking(photos), tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        write_report(make_ranking(photos), tmp_path / "missing" / "r.html")


# --- size for a large folder -------------------------------------------------------------

#: Bytes per tile the report may take: a 160 px WebP of a real photo is ~3 KB, ~4.3 KB in
#: base64, plus ~0.5 KB of markup. 6 KB a tile keeps 5,000 photos under 30 MB.
TILE_BUDGET = 6_000


def _many(tmp_path: Path, count: int) -> list[Path]:
    """``count`` distinct paths (symbolic links) to the four real photos, each decoded anew."""
    folder = tmp_path / "many"
    folder.mkdir()
    sources = sorted(PHOTOS.glob("*.jpg"))
    paths = []
    for index in range(count):
        link = folder / f"{index:05d}.jpg"
        link.symlink_to(sources[index % len(sources)].resolve())
        paths.append(link)
    return paths


def test_size_per_photo_stays_small(tmp_path: Path) -> None:
    paths = _many(tmp_path, 400)
    out = write_report(make_ranking(paths), tmp_path / "r.html")
    report = parse(out)
    assert len(report.tiles) == 400
    assert all("src" in t for t in report.tiles)
    assert out.stat().st_size / 400 < TILE_BUDGET


@pytest.mark.slow
def test_report_of_5000_photos_stays_under_30_mb(tmp_path: Path) -> None:
    paths = _many(tmp_path, 5000)
    out = write_report(make_ranking(paths), tmp_path / "r.html")
    report = parse(out)
    assert [t["rank"] for t in report.tiles] == list(range(1, 5001))
    assert all("src" in t for t in report.tiles)
    assert out.stat().st_size < 5000 * TILE_BUDGET


# --- imgrank sort --report ----------------------------------------------------------------


def _sort(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["sort", *args, *tiny_args()], catch_exceptions=False)


def test_sort_report_matches_the_ranking_on_stdout(photo_dir: Path, tmp_path: Path) -> None:
    (photo_dir / "broken.jpg").write_bytes(b"not a photo")
    target = tmp_path / "ranking.html"
    result = _sort(str(photo_dir), "--by", "image quality", "--report", str(target))
    assert result.exit_code == 0, result.stderr
    rows = [line.split(",", 2) for line in result.stdout.splitlines()[1:]]

    report = parse(target)
    assert [(t["rank"], t["href"]) for t in report.tiles] == [
        (int(rank), Path(path).absolute().as_uri()) for rank, _score, path in rows
    ]
    assert [round(float(t["score"]), 6) for t in report.tiles] == [float(s) for _, s, _ in rows]  # type: ignore[arg-type]
    assert report.h1 == "image quality"
    assert [Path(row[0]).name for row in report.skipped_rows] == ["broken.jpg"]


def test_sort_report_with_top_and_ascending(photo_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "worst.html"
    result = _sort(
        str(photo_dir), "--by", "q", "--top", "2", "--ascending", "--report", str(target)
    )
    assert result.exit_code == 0, result.stderr
    report = parse(target)
    assert report.facts["Order"] == "lowest score first"
    assert report.facts["Shown"] == "2 images (--top 2)"
    assert [t["rank"] for t in report.tiles] == [1, 2]
    scores = [float(line.split(",")[1]) for line in result.stdout.splitlines()[1:]]
    assert scores == sorted(scores)


def test_sort_refuses_to_overwrite_a_file_before_any_work(photo_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "notes.html"
    target.write_text("mine", encoding="utf-8")
    result = _sort(str(photo_dir), "--by", "q", "--report", str(target))
    assert result.exit_code == UnsafeOperationError.exit_code
    assert "not an imgrank report" in result.stderr
    assert result.stdout == ""  # refused before ranking anything
    assert target.read_text(encoding="utf-8") == "mine"
    forced = _sort(str(photo_dir), "--by", "q", "--report", str(target), "--force")
    assert forced.exit_code == 0, forced.stderr
    assert len(parse(target).tiles) == 4
