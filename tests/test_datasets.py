"""Label tables and rated folders: what is read, what is skipped, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from imgrank.errors import DataError
from imgrank.training.datasets import (
    load_labels,
    rating_from_xmp,
    read_label_table,
    read_rated_folder,
    read_rating,
    write_label_table,
)

SHARED_TABLE = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "reference"
    / "official-configs"
    / "example-count-df.head.tsv"
)


def _image(path: Path, shade: int = 128, **save: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (shade, shade, shade)).save(path, **save)
    return path


def _xmp(rating: str, *, element: bool = False) -> str:
    body = (
        f"<rdf:Description rdf:about='' xmlns:xmp='http://ns.adobe.com/xap/1.0/'>"
        f"<xmp:Rating>{rating}</xmp:Rating></rdf:Description>"
        if element
        else f"<rdf:Description rdf:about='' xmlns:xmp='http://ns.adobe.com/xap/1.0/' "
        f"xmp:Rating='{rating}'/>"
    )
    return (
        "<?xpacket begin='\ufeff' id='W5M0MpCehiHzreSzNTczkc9d'?>"
        "<x:xmpmeta xmlns:x='adobe:ns:meta/'>"
        "<rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>"
        f"{body}</rdf:RDF></x:xmpmeta><?xpacket end='w'?>"
    )


# --- label tables ----------------------------------------------------------------


def test_authors_table_columns_relative_paths_and_extra_columns(tmp_path: Path) -> None:
    _image(tmp_path / "imgs" / "a.jpg")
    _image(tmp_path / "imgs" / "b.jpg")
    table = tmp_path / "labels.tsv"
    table.write_text(
        "filepath\ttitle\tcname\tvalue\tsample_weights_by_class\n"
        "imgs/a.jpg\tRank the numbers of horse.\thorse\t3\t0.1\n"
        "imgs/b.jpg\tRank the numbers of horse.\thorse\t1\t0.2\n"
    )
    labels = read_label_table(table)
    assert [r.value for r in labels.rows] == [3.0, 1.0]
    assert labels.rows[0].path == (tmp_path / "imgs" / "a.jpg").resolve()
    assert labels.rows[0].prompt == "Rank the numbers of horse."
    assert labels.rows[0].group == "horse"
    assert labels.rows[0].line == 2
    assert labels.bad == []


def test_csv_with_alternative_names_and_relative_to_table_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    _image(data / "x.png")
    (data / "t.csv").write_text('Path,Prompt,Group,Value\nx.png,"sharp, crisp photo",g1,2.5\n')
    monkeypatch.chdir(tmp_path)  # the path must resolve against the table's folder, not here
    labels = load_labels(Path("data/t.csv"))
    assert len(labels) == 1
    assert labels.rows[0].prompt == "sharp, crisp photo"
    assert labels.rows[0].value == 2.5


def test_bad_rows_are_reported_with_line_numbers_and_skipped(tmp_path: Path) -> None:
    for name in ("ok1.jpg", "ok2.jpg", "ok3.jpg"):
        _image(tmp_path / name)
    (tmp_path / "folder.jpg").mkdir()
    table = tmp_path / "t.tsv"
    table.write_text(
        "filepath\ttitle\tcname\tvalue\n"
        "ok1.jpg\tp\tg\t1\n"  # line 2
        "missing.jpg\tp\tg\t2\n"  # line 3: no such file
        "ok2.jpg\tp\tg\tlots\n"  # line 4: not a number
        "\n"  # line 5: blank, silently ignored
        "ok3.jpg\tp\tg\n"  # line 6: too few columns
        "folder.jpg\tp\tg\t3\n"  # line 7: a folder
        "ok3.jpg\tp\tg\tnan\n"  # line 8: not a finite number
        "ok2.jpg\tp\tg\t4\n"  # line 9
    )
    labels = read_label_table(table)
    assert [r.line for r in labels.rows] == [2, 9]
    described = {b.line: b.describe() for b in labels.bad}
    assert set(described) == {3, 4, 6, 7, 8}
    assert "missing.jpg" in described[3] and "does not exist" in described[3]
    assert "'lots' is not a number" in described[4]
    assert "column" in described[6]
    assert "folder" in described[7]
    assert described[3].startswith("line 3: ")


def test_table_without_prompt_column_needs_prompt(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    table = tmp_path / "t.csv"
    table.write_text("path,value\na.jpg,1\n")
    with pytest.raises(DataError, match="--prompt"):
        read_label_table(table)
    labels = read_label_table(table, prompt="sharpness")
    assert labels.rows[0].prompt == "sharpness" and labels.rows[0].group == "sharpness"


def test_header_without_value_column_is_explained(tmp_path: Path) -> None:
    table = tmp_path / "t.tsv"
    table.write_text("filepath\ttitle\tscore\nx.jpg\tp\t1\n")
    with pytest.raises(DataError, match="no value column"):
        read_label_table(table)


def test_too_few_rows_per_group_is_an_error_naming_the_group(tmp_path: Path) -> None:
    for i in range(4):
        _image(tmp_path / f"{i}.jpg")
    table = tmp_path / "t.tsv"
    table.write_text(
        "filepath\ttitle\tcname\tvalue\n"
        "0.jpg\tcount\tcats\t1\n1.jpg\tcount\tcats\t2\n2.jpg\tcount\tcats\t3\n"
        "3.jpg\tcount\tdogs\t1\n"
    )
    labels = read_label_table(table)
    labels.require_rows_per_group(1, purpose="evaluation")
    with pytest.raises(DataError, match=r"at least 2 .*'dogs' has 1\."):
        labels.require_rows_per_group(2, purpose="evaluation")


def test_authors_example_table_reads_but_its_files_are_missing() -> None:
    if not SHARED_TABLE.is_file():
        pytest.skip(f"the shared reference folder is not here ({SHARED_TABLE})")
    labels = read_label_table(SHARED_TABLE)
    # Their paths point to a COCO copy on the authors' machine: every row is reported.
    assert len(labels) == 0 and len(labels.bad) == 19
    with pytest.raises(DataError, match="no usable row.*line 2"):
        labels.require_rows_per_group(2, purpose="training")


def test_write_label_table_round_trips_and_never_overwrites(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    source = tmp_path / "src.tsv"
    source.write_text("filepath\ttitle\tcname\tvalue\na.jpg\tp\tg\t1\nb.jpg\tp\tg\t2.5\n")
    labels = read_label_table(source)
    copy = tmp_path / "copy.tsv"
    write_label_table(copy, labels.rows)
    assert [(r.path, r.value) for r in read_label_table(copy).rows] == [
        (r.path, r.value) for r in labels.rows
    ]
    before = copy.read_bytes()
    with pytest.raises(DataError, match="never overwrites"):
        write_label_table(copy, labels.rows)
    assert copy.read_bytes() == before


# --- ratings -----------------------------------------------------------------


def test_xmp_rating_attribute_element_and_namespace() -> None:
    assert rating_from_xmp(_xmp("4")) == 4.0
    assert rating_from_xmp(_xmp("2", element=True)) == 2.0
    # MicrosoftPhoto:Rating is a percentage in another namespace: not stars.
    microsoft = (
        "<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF "
        "xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'><rdf:Description "
        "xmlns:MicrosoftPhoto='http://ns.microsoft.com/photo/1.0/' MicrosoftPhoto:Rating='75'/>"
        "</rdf:RDF></x:xmpmeta>"
    )
    assert rating_from_xmp(microsoft) is None
    # Not well-formed (cut short) but the rating is still plainly there.
    assert rating_from_xmp(_xmp("3")[:-40].encode()) == 3.0
    with pytest.raises(ValueError, match="not a number"):
        rating_from_xmp(_xmp("five"))


def test_xmp_with_entities_is_refused() -> None:
    bomb = "<!DOCTYPE x [<!ENTITY a 'aaaa'>]>" + _xmp("&a;")
    assert rating_from_xmp(bomb) is None


def test_rated_folder_reads_embedded_xmp_sidecars_and_exif(tmp_path: Path) -> None:
    folder = tmp_path / "rated"
    # embedded XMP in a JPEG (as Lightroom and digiKam write it into the file)
    _image(folder / "embedded.jpg", 10, xmp=_xmp("5").encode())
    # embedded XMP in a PNG iTXt chunk
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", _xmp("1", element=True))
    _image(folder / "embedded.png", 20, pnginfo=info)
    # darktable / digiKam sidecar: photo.jpg.xmp
    _image(folder / "dt.jpg", 30)
    (folder / "dt.jpg.xmp").write_text(_xmp("3"))
    # Lightroom sidecar: photo.xmp, in a sub-folder
    _image(folder / "sub" / "lr.jpg", 40)
    (folder / "sub" / "lr.xmp").write_text(_xmp("2", element=True))
    # the EXIF Rating tag (Windows, cameras)
    exif = Image.Exif()
    exif[0x4746] = 4
    _image(folder / "exif.jpg", 50, exif=exif)
    # only RatingPercent (Windows writes both; 50% is 3 stars)
    exif_pct = Image.Exif()
    exif_pct[0x4749] = 50
    _image(folder / "pct.jpg", 60, exif=exif_pct)
    # a sidecar wins over the embedded rating (raw workflows edit the sidecar)
    _image(folder / "both.jpg", 70, xmp=_xmp("1").encode())
    (folder / "both.jpg.xmp").write_text(_xmp("4"))
    # zero stars is a rating, not "unrated"
    _image(folder / "zero.jpg", 80, xmp=_xmp("0").encode())
    # unrated, rejected, out of range, and not an image
    _image(folder / "plain1.jpg", 90)
    _image(folder / "plain2.png", 100)
    _image(folder / "rejected.jpg", 110, xmp=_xmp("-1").encode())
    _image(folder / "odd.jpg", 120, xmp=_xmp("7").encode())
    (folder / "text.jpg").write_text("not a jpeg")

    labels = read_rated_folder(folder, prompt="photos I like")
    found = {row.path.name: row.value for row in labels.rows}
    assert found == {
        "embedded.jpg": 5.0,
        "embedded.png": 1.0,
        "dt.jpg": 3.0,
        "lr.jpg": 2.0,
        "exif.jpg": 4.0,
        "pct.jpg": 3.0,
        "both.jpg": 4.0,
        "zero.jpg": 0.0,
    }
    assert labels.unrated == 2
    reasons = {Path(b.path).name: b.reason for b in labels.bad}
    assert "rejected" in reasons["rejected.jpg"]
    assert "not 0-5" in reasons["odd.jpg"]
    assert "not an image" in reasons["text.jpg"]
    assert {row.prompt for row in labels.rows} == {"photos I like"}
    assert len(labels.groups()) == 1
    assert read_rating(folder / "dt.jpg") == (3.0, "sidecar")
    assert read_rating(folder / "embedded.jpg") == (5.0, "xmp")
    assert read_rating(folder / "exif.jpg") == (4.0, "exif")
    summary = labels.summary()
    assert summary["kind"] == "rated-folder" and summary["unrated"] == 2


def test_rated_folder_needs_a_prompt_and_some_ratings(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    with pytest.raises(DataError, match="--prompt"):
        load_labels(tmp_path)
    labels = load_labels(tmp_path, prompt="quality")
    assert labels.unrated == 1
    with pytest.raises(DataError, match=r"no rated photo found \(1 unrated\)"):
        labels.require_rows_per_group(2, purpose="training")


def test_failed_images_become_bad_rows_with_their_line(tmp_path: Path) -> None:
    _image(tmp_path / "a.jpg")
    _image(tmp_path / "b.jpg")
    table = tmp_path / "t.tsv"
    table.write_text("filepath\ttitle\tcname\tvalue\na.jpg\tp\tg\t1\nb.jpg\tp\tg\t2\n")
    labels = read_label_table(table)
    kept = labels.without({(tmp_path / "b.jpg").resolve(): "cannot decode: truncated"})
    assert [r.path.name for r in kept.rows] == ["a.jpg"]
    assert kept.bad[0].describe().startswith("line 3: ") and "truncated" in kept.bad[0].reason


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_labels(tmp_path / "nope.tsv")


def test_labels_too_large_for_training_are_bad_rows(tmp_path: Path) -> None:
    """Issue 17 item 14: 1e300 trained to Infinity, with exit 0 and non-standard JSON."""
    for name in ("a.jpg", "b.jpg"):
        _image(tmp_path / name)
    table = tmp_path / "t.tsv"
    table.write_text("filepath\ttitle\tcname\tvalue\na.jpg\tp\tg\t1e300\nb.jpg\tp\tg\t-3\n")
    labels = read_label_table(table)
    assert [r.line for r in labels.rows] == [3]
    (bad,) = [b.describe() for b in labels.bad]
    assert bad.startswith("line 2: ") and "'1e300' is out of range" in bad
