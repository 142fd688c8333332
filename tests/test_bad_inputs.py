"""`imgrank sort` over a folder full of bad inputs: each is named with a reason, none is fatal.

The sort runs in a real subprocess (the console's real stderr encoding, as a
user sees it) on the tiny random-weight model; a small wrapper deletes or
changes two files between the scan and the decoding, as another program might.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from conftest import PHOTOS, tiny_args

# Runs `imgrank sort`, disturbing two files after the scan found them and before they are decoded.
_SORT_WITH_A_RACE = r"""
import sys
import imgrank.images.sources as sources

real_find = sources.find_images

def find_then_disturb(*args, **kwargs):
    found = list(real_find(*args, **kwargs))
    for path in found:
        if path.name == "deleted-after-scan.jpg":
            path.unlink()
        elif path.name == "changed-after-scan.jpg":
            path.write_bytes(b"overwritten by another program: not an image any more")
    return found

sources.find_images = find_then_disturb
from imgrank.cli import main
sys.argv = ["imgrank", *sys.argv[1:]]
main()
"""

NON_UTF8_GOOD = os.fsdecode(b"good-\xff\xfe.jpg")
NON_UTF8_BAD = os.fsdecode(b"bad-\xe9t\xe9.jpg")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (2.5 gigapixels by default)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def run_sort(folder: Path, errors: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            _SORT_WITH_A_RACE,
            "sort",
            str(folder),
            "--by",
            "image quality",
            *tiny_args(),
            "--errors",
            str(errors),
        ],
        capture_output=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "400"},  # one line per skipped file, however long the path
    )


def test_every_bad_input_is_named_with_a_reason_and_the_good_ones_are_ranked(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    good = sorted(PHOTOS.glob("*.jpg"))
    for photo in good:
        shutil.copy(photo, folder / photo.name)
    shutil.copy(good[0], folder / NON_UTF8_GOOD)  # a good photo with a name that is not UTF-8
    shutil.copy(good[1], folder / "deleted-after-scan.jpg")
    shutil.copy(good[2], folder / "changed-after-scan.jpg")
    jpeg = good[0].read_bytes()

    expected = {  # file name -> part of the reason a user must see
        "empty.jpg": "empty file",
        "truncated.jpg": "truncated",
        "text.jpg": "not an image",
        "bomb.png": "decompression",
        NON_UTF8_BAD: "not an image",
        "dangling.jpg": "broken symbolic link",
        "loop-a.jpg": "symbolic link",
        "loop-b.jpg": "symbolic link",
        "fifo.jpg": "not a regular file",
        "deleted-after-scan.jpg": "disappeared",
        "changed-after-scan.jpg": "not an image",
    }
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "text.jpg").write_text("these are my holiday notes, not a photo\n")
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / NON_UTF8_BAD).write_bytes(b"GIF89a but not really")
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop-a.jpg").symlink_to(folder / "loop-b.jpg")
    (folder / "loop-b.jpg").symlink_to(folder / "loop-a.jpg")
    os.mkfifo(folder / "fifo.jpg")  # reading it would block forever
    (folder / "sub").mkdir()
    (folder / "sub" / "back-to-top").symlink_to(folder, target_is_directory=True)  # a folder loop

    errors = tmp_path / "errors.csv"
    result = run_sort(folder, errors)
    stderr = result.stderr.decode("utf-8", "backslashreplace")
    assert result.returncode == 0, stderr

    # The good photos, each exactly once (the folder loop is not followed twice).
    ranked = list(csv.DictReader(io.StringIO(result.stdout.decode("utf-8", "surrogateescape"))))
    ranked_names = sorted(Path(row["path"]).name for row in ranked)
    assert ranked_names == sorted([p.name for p in good] + [NON_UTF8_GOOD])
    assert [int(row["rank"]) for row in ranked] == list(range(1, len(ranked) + 1))

    # Every bad input named with its reason in --errors FILE (names byte for byte)...
    rows = list(csv.DictReader(io.StringIO(errors.read_bytes().decode("utf-8", "surrogateescape"))))
    reasons = {Path(row["path"]).name: row["reason"] for row in rows}
    assert set(reasons) == set(expected), reasons
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert os.fsencode(NON_UTF8_BAD) in errors.read_bytes()

    # ...and on stderr, one "skipped:" line each, with the same reason.
    skipped_lines = [line for line in stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped_lines) == len(expected), stderr
    for name, fragment in expected.items():
        # Bytes that are not UTF-8 are shown escaped; the ASCII start of the name identifies it.
        label = name if name.isascii() else name.encode("ascii", "ignore").decode()[:4]
        assert any(label in line and fragment in line for line in skipped_lines), (name, stderr)


def test_an_unreadable_file_is_named_and_skipped(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip(
            "running as root: chmod 000 does not stop root from reading a file, so this "
            "environment cannot make an unreadable file"
        )
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(sorted(PHOTOS.glob("*.jpg"))[0], folder / "ok.jpg")
    locked = folder / "locked.jpg"
    shutil.copy(sorted(PHOTOS.glob("*.jpg"))[1], locked)
    locked.chmod(0)
    try:
        errors = tmp_path / "errors.csv"
        result = run_sort(folder, errors)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert b"ok.jpg" in result.stdout and b"locked.jpg" not in result.stdout
        assert "locked.jpg,permission denied" in errors.read_text()
    finally:
        locked.chmod(0o644)
