"""XMP sidecars: editing packets without losing anything, sort --xmp, undo, recovery after kill -9.

What is checked is what a photographer would see: exiftool (the reference reader of
XMP, as photo managers read it) reads the values imgrank wrote and every value that
was there before; undo gives back the very bytes; a killed run is settled by recover.
"""

from __future__ import annotations

import difflib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lxml", reason="lxml (imgrank's XMP library) is not installed")

from conftest import PHOTOS, tiny_args
from typer.testing import CliRunner

from imgrank.cli import app
from imgrank.errors import UnfinishedRunError, UnsafeOperationError
from imgrank.files import sidecars as sidecars_module
from imgrank.files.journal import check_no_unfinished_run, list_runs
from imgrank.files.sidecars import (
    SidecarWriteError,
    apply_sidecar_plan,
    plan_sidecars,
    sidecar_for,
)
from imgrank.files.xmp import Field, XmpError, read_fields, set_fields
from imgrank.files.xmp_marks import RatingScale, stars, xmp_writes
from imgrank.ranking import RankedImage

runner = CliRunner()
EXIFTOOL = shutil.which("exiftool")
needs_exiftool = pytest.mark.skipif(EXIFTOOL is None, reason="exiftool is not installed")

RATING = Field("xmp", "Rating")

#: A sidecar as darktable writes it: attributes on one Description, an edit history.
DARKTABLE = b"""<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:darktable="http://darktable.sf.net/"
   xmp:Rating="1"
   darktable:xmp_version="5"
   darktable:history_end="2">
   <dc:subject>
    <rdf:Bag>
     <rdf:li>holiday</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <darktable:history>
    <rdf:Seq>
     <rdf:li darktable:operation="exposure" darktable:enabled="1" darktable:params="0000"/>
     <rdf:li darktable:operation="crop" darktable:enabled="1" darktable:params="ffff"/>
    </rdf:Seq>
   </darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def exiftool(path: Path, *tags: str) -> dict[str, str]:
    out = subprocess.run(
        [EXIFTOOL, "-s", "-s", "-n", *[f"-{t}" for t in tags], str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def changed_lines(old: bytes, new: bytes) -> tuple[list[str], list[str]]:
    """Lines removed from and added to ``old``."""
    diff = list(difflib.ndiff(old.decode().splitlines(), new.decode().splitlines()))
    return [d[2:] for d in diff if d.startswith("- ")], [d[2:] for d in diff if d.startswith("+ ")]


# --- packets ---------------------------------------------------------------------------------


def test_an_attribute_rating_changes_in_place_and_every_other_byte_stays() -> None:
    new = set_fields(DARKTABLE, {RATING: "5", Field("imgrank", "Rating"): "5"})
    removed, added = changed_lines(DARKTABLE, new)
    assert removed == ['   xmp:Rating="1"']
    assert added[0] == '   xmp:Rating="5"'
    assert len(added) == 2 and 'imgrank:Rating="5"' in added[1]  # one new Description line
    assert read_fields(new, [RATING, Field("imgrank", "Rating")]) == {
        RATING: "5",
        Field("imgrank", "Rating"): "5",
    }


@needs_exiftool
def test_exiftool_sidecars_keep_their_other_tags(tmp_path: Path) -> None:
    photo = tmp_path / "p.jpg"
    shutil.copy(PHOTOS / "chelsea.jpg", photo)
    subprocess.run(
        [
            EXIFTOOL,
            "-q",
            "-overwrite_original",
            "-XMP:Rating=2",
            "-XMP-dc:Subject=cat",
            "-XMP-lr:HierarchicalSubject=animals|cat",
            "-XMP:Creator=Ann",
            str(photo),
        ],
        check=True,
    )
    sidecar = tmp_path / "p.jpg.xmp"
    subprocess.run([EXIFTOOL, "-q", "-o", str(sidecar), str(photo)], check=True)
    before = sidecar.read_bytes()
    sidecar.write_bytes(set_fields(before, {RATING: "4", Field("digiKam", "PickLabel"): "3"}))
    tags = exiftool(
        sidecar,
        "XMP:Rating",
        "XMP:PickLabel",
        "XMP:Subject",
        "XMP:HierarchicalSubject",
        "XMP:Creator",
    )
    assert tags == {
        "Rating": "4",
        "PickLabel": "3",
        "Subject": "cat",
        "HierarchicalSubject": "animals|cat",
        "Creator": "Ann",
    }
    removed, _ = changed_lines(before, sidecar.read_bytes())
    assert removed == ["  <xmp:Rating>2</xmp:Rating>"]  # exiftool's element form, edited in place


def test_a_new_packet_is_valid_xmp() -> None:
    packet = set_fields(None, {RATING: "3"})
    assert packet.startswith(b"<?xpacket begin=")
    assert read_fields(packet, [RATING]) == {RATING: "3"}


@pytest.mark.parametrize(
    "bad",
    [
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x:xmpmeta xmlns:x="adobe:ns:meta/"/>',
        b"this is not xml",
        b'<html xmlns="http://www.w3.org/1999/xhtml"/>',
    ],
)
def test_packets_that_are_not_safe_xmp_are_refused(bad: bytes) -> None:
    with pytest.raises(XmpError):
        set_fields(bad, {RATING: "3"})


# --- ratings ---------------------------------------------------------------------------------


def ranking(n: int, folder: Path = Path("/p")) -> list[RankedImage]:
    return [RankedImage(i + 1, 1.0 - i / n, folder / f"{i:02d}.jpg") for i in range(n)]


def test_quintiles_give_the_top_fifth_five_stars() -> None:
    given = stars(ranking(10), RatingScale.parse(None))
    assert [given[Path(f"/p/{i:02d}.jpg")] for i in range(10)] == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1]
    custom = stars(ranking(10), RatingScale.parse("percent:10,10,30,30,20"))
    assert [custom[Path(f"/p/{i:02d}.jpg")] for i in range(10)] == [5, 4, 3, 3, 3, 2, 2, 2, 1, 1]
    by_score = stars(ranking(10), RatingScale.parse("score:0.95,0.75,0.5,0.25"))
    assert [by_score[Path(f"/p/{i:02d}.jpg")] for i in range(10)] == [5, 4, 4, 3, 3, 3, 2, 2, 1, 1]


def test_pick_accepts_the_top_and_rejects_the_rest_for_both_files_of_a_pair() -> None:
    items = ranking(5)
    items[0] = RankedImage(1, items[0].score, items[0].path, raw=Path("/p/00.cr2"))
    writes = dict(xmp_writes(items, "pick", top=1))
    assert writes[Path("/p/00.jpg")] == writes[Path("/p/00.cr2")] == {"digiKam:PickLabel": "3"}
    assert writes[Path("/p/04.jpg")]["xmp:Rating"] == "-1"
    assert writes[Path("/p/04.jpg")]["digiKam:PickLabel"] == "1"
    labels = dict(xmp_writes(items, "label", top=2, label="Red"))
    assert set(labels) == {Path("/p/00.jpg"), Path("/p/00.cr2"), Path("/p/01.jpg")}


# --- files, journal, undo --------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.fixture
def shoot(tmp_path: Path) -> Path:
    folder = tmp_path / "shoot"
    folder.mkdir()
    for photo in sorted(PHOTOS.glob("*.jpg")):
        shutil.copy(photo, folder / photo.name)
    (folder / "chelsea.jpg.xmp").write_bytes(DARKTABLE)
    return folder


def sort(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["sort", *args, *tiny_args()], catch_exceptions=False)


@needs_exiftool
def test_sort_xmp_rating_dry_run_apply_exiftool_and_undo(shoot: Path) -> None:
    before = snapshot(shoot)
    dry = sort(str(shoot), "--by", "a cat", "--xmp", "rating")
    assert dry.exit_code == 0, dry.stderr
    assert snapshot(shoot) == before  # a dry run changes nothing
    assert "chelsea.jpg.xmp: xmp:Rating 1 -> " in dry.stdout
    assert dry.stdout.count("(new sidecar)") == 3

    applied = sort(str(shoot), "--by", "a cat", "--xmp", "rating", "--apply")
    assert applied.exit_code == 0, applied.stderr
    ratings = {p.name: exiftool(p, "XMP:Rating")["Rating"] for p in shoot.glob("*.xmp")}
    assert sorted(ratings.values()) == ["2", "3", "4", "5"]  # 4 photos: quintiles 5..2
    assert exiftool(shoot / "chelsea.jpg.xmp", "XMP:Subject")["Subject"] == "holiday"
    assert b'darktable:operation="crop"' in (shoot / "chelsea.jpg.xmp").read_bytes()
    for name in (n for n in before if n.endswith(".jpg")):  # photos are never written
        assert (shoot / name).read_bytes() == before[name]

    (run,) = list_runs()
    assert run.kind == "xmp" and len(run.sidecars) == 4
    listed = runner.invoke(app, ["runs"]).stdout
    assert run.run_id in listed and "applied" in listed

    undone = runner.invoke(app, ["undo", "--last"])
    assert undone.exit_code == 0, undone.stderr
    assert snapshot(shoot) == before  # byte-identical, and the created sidecars are gone


def test_sidecar_naming_and_existing_upper_case_sidecars(tmp_path: Path) -> None:
    photo = tmp_path / "IMG_1.CR2"
    assert sidecar_for(photo) == tmp_path / "IMG_1.CR2.xmp"
    assert sidecar_for(photo, "stem") == tmp_path / "IMG_1.xmp"
    (tmp_path / "IMG_1.XMP").write_bytes(DARKTABLE)
    assert sidecar_for(photo, "stem") == tmp_path / "IMG_1.XMP"
    pair = [(tmp_path / "IMG_1.JPG", {"xmp:Rating": "4"}), (photo, {"xmp:Rating": "4"})]
    plan = plan_sidecars(pair, naming="stem")
    assert [c.path for c in plan.changes] == [tmp_path / "IMG_1.XMP"]  # one shared sidecar
    assert len(plan_sidecars(pair).changes) == 2  # IMG_1.JPG.xmp and IMG_1.CR2.xmp
    with pytest.raises(UnsafeOperationError, match="share the sidecar"):
        plan_sidecars([pair[0], (photo, {"xmp:Rating": "2"})], naming="stem")


def test_a_sidecar_changed_since_it_was_read_is_never_overwritten(shoot: Path) -> None:
    photos = sorted(shoot.glob("*.jpg"))
    plan = plan_sidecars([(p, {"xmp:Rating": "3"}) for p in photos])
    edited = DARKTABLE.replace(b'xmp:Rating="1"', b'xmp:Rating="2"')
    (shoot / "chelsea.jpg.xmp").write_bytes(edited)  # the user rates it in darktable meanwhile
    before = snapshot(shoot)
    with pytest.raises(SidecarWriteError, match="changed since imgrank read it"):
        apply_sidecar_plan(plan, folder=shoot)
    assert snapshot(shoot) == before  # the one written first was taken back; the edit kept
    check_no_unfinished_run()  # the failed run is closed (rolled back)


def test_bad_sidecars_are_left_alone_and_named(shoot: Path) -> None:
    (shoot / "coffee.jpg.xmp").write_bytes(b"<not xmp")
    os.symlink(shoot / "chelsea.jpg.xmp", shoot / "rocket.jpg.xmp")
    plan = plan_sidecars([(p, {"xmp:Rating": "3"}) for p in sorted(shoot.glob("*.jpg"))])
    refused = {p.name: reason for p, reason in plan.refused}
    assert set(refused) == {"coffee.jpg.xmp", "rocket.jpg.xmp"}
    assert "symbolic link" in refused["rocket.jpg.xmp"]
    assert sorted(c.path.name for c in plan.changes) == ["astronaut.jpg.xmp", "chelsea.jpg.xmp"]


def test_undo_refuses_when_a_sidecar_was_edited_after_imgrank_wrote_it(shoot: Path) -> None:
    photos = sorted(shoot.glob("*.jpg"))
    apply_sidecar_plan(plan_sidecars([(p, {"xmp:Rating": "3"}) for p in photos]), folder=shoot)
    edited = (shoot / "coffee.jpg.xmp").read_bytes().replace(b'"3"', b'"1"', 1)
    (shoot / "coffee.jpg.xmp").write_bytes(edited)
    before = snapshot(shoot)
    result = runner.invoke(app, ["undo", "--last"])
    assert result.exit_code == 6
    assert "coffee.jpg.xmp was changed" in result.stderr
    assert snapshot(shoot) == before


# --- kill -9 and recover ---------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from imgrank.files import sidecars
    folder = Path(sys.argv[1])
    real_put = sidecars._put
    calls = []
    def dying_put(record, want, blobs):
        calls.append(record)
        if len(calls) == 3:
            # Half-way through the third sidecar: its temporary file is partly written.
            record.temp.write_bytes(b"<?xpacket begin")
            os.kill(os.getpid(), signal.SIGKILL)
        real_put(record, want, blobs)
    sidecars._put = dying_put
    photos = sorted(folder.glob("*.jpg"))
    plan = sidecars.plan_sidecars([(p, {"xmp:Rating": "4"}) for p in photos])
    sidecars.apply_sidecar_plan(plan, folder=folder)
    """
)


@pytest.mark.parametrize("forward", [False, True])
def test_a_run_killed_half_way_is_settled_by_recover(shoot: Path, forward: bool) -> None:
    before = snapshot(shoot)
    child = subprocess.run([sys.executable, "-c", CHILD, str(shoot)], env=os.environ.copy())
    assert child.returncode == -signal.SIGKILL
    assert any(name.startswith(".imgrank-") for name in os.listdir(shoot))  # cut mid-write
    with pytest.raises(UnfinishedRunError, match="XMP sidecar"):
        check_no_unfinished_run()
    refused = sort(str(shoot), "--by", "x", "--xmp", "rating", "--apply")
    assert refused.exit_code == 6  # nothing writes until the run is settled

    result = runner.invoke(app, ["recover", *(["--forward"] if forward else [])])
    assert result.exit_code == 0, result.stderr
    if forward:
        assert not any(n.startswith(".imgrank-") for n in os.listdir(shoot))
        assert all(
            read_fields((shoot / f"{p}.xmp").read_bytes(), [RATING])[RATING] == "4"
            for p in before
            if p.endswith(".jpg")
        )
    else:
        assert snapshot(shoot) == before  # every sidecar as it was, the new ones gone
    check_no_unfinished_run()
    assert runner.invoke(app, ["recover"]).exit_code == 0  # safe to run again


def test_the_writer_keeps_xmp_work_on_the_calling_thread(
    shoot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    seen = set()
    real = sidecars_module.set_fields

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.add(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(sidecars_module, "set_fields", spy)
    plan_sidecars([(p, {"xmp:Rating": "3"}) for p in sorted(shoot.glob("*.jpg"))])
    assert seen == {threading.get_ident()}


# --- train reads what imgrank and others wrote -----------------------------------------------


def test_train_reads_both_namings_and_leaves_out_imgranks_own_ratings(shoot: Path) -> None:
    from imgrank.training.datasets import read_rated_folder

    (shoot / "chelsea.jpg.xmp").unlink()
    photos = sorted(shoot.glob("*.jpg"))  # astronaut, chelsea, coffee, rocket
    apply_sidecar_plan(
        plan_sidecars([(p, {"xmp:Rating": "4", "imgrank:Rating": "4"}) for p in photos[:3]]),
        folder=shoot,
    )
    # The photographer changes one of imgrank's stars in darktable...
    coffee = shoot / "coffee.jpg.xmp"
    coffee.write_bytes(coffee.read_bytes().replace(b'xmp:Rating="4"', b'xmp:Rating="2"'))
    # ...and rates another in Lightroom, whose sidecar is named after the stem.
    (shoot / "rocket.xmp").write_bytes(set_fields(None, {RATING: "5"}))

    labels = read_rated_folder(shoot, prompt="keepers")
    assert {(r.path.name, r.value) for r in labels.rows} == {
        ("coffee.jpg", 2.0),
        ("rocket.jpg", 5.0),
    }
    assert labels.imgrank_rated == 2 and labels.unrated == 0
    everything = read_rated_folder(shoot, prompt="keepers", include_imgrank_ratings=True)
    assert len(everything.rows) == 4 and everything.imgrank_rated == 0


def test_train_sees_a_raw_jpeg_pair_once_rated_from_the_raw_sidecar(tmp_path: Path) -> None:
    from imgrank.training.datasets import read_rated_folder

    shutil.copy(PHOTOS / "coffee.jpg", tmp_path / "IMG_1.jpg")
    (tmp_path / "IMG_1.dng").write_bytes(b"raw data")  # its content is not read here
    (tmp_path / "IMG_1.dng.xmp").write_bytes(set_fields(None, {RATING: "3"}))
    labels = read_rated_folder(tmp_path, prompt="keepers")
    assert [(r.path.name, r.value) for r in labels.rows] == [("IMG_1.jpg", 3.0)]
    assert not labels.bad


@needs_exiftool
def test_pick_with_stem_sidecars_marks_a_raw_jpeg_pair_through_one_sidecar(shoot: Path) -> None:
    (shoot / "chelsea.jpg.xmp").unlink()
    (shoot / "coffee.dng").write_bytes(b"the RAW of coffee.jpg")  # paired, so never decoded
    result = sort(
        str(shoot), "--by", "a cup", "--xmp", "pick", "--xmp-top", "1",
        "--xmp-sidecar", "stem", "--apply",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    sidecars = sorted(p.name for p in shoot.glob("*.xmp"))
    assert sidecars == ["astronaut.xmp", "chelsea.xmp", "coffee.xmp", "rocket.xmp"]
    picks = {p.stem: exiftool(p, "XMP:PickLabel", "XMP:Rating") for p in shoot.glob("*.xmp")}
    accepted = [name for name, tags in picks.items() if tags["PickLabel"] == "3"]
    assert len(accepted) == 1 and "Rating" not in picks[accepted[0]]
    assert all(t == {"PickLabel": "1", "Rating": "-1"} for n, t in picks.items() if n not in accepted)
    assert runner.invoke(app, ["undo", "--last"]).exit_code == 0
    assert not list(shoot.glob("*.xmp"))
