"""What a fault probe broke at the command line (issue 17), run as a user runs imgrank.

Real processes with real file descriptors: a pipe whose reader is already gone,
``/dev/full`` under stdout.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_args

SRC = Path(__file__).resolve().parents[1] / "src"


def _imgrank(args: list[str], *, stdout: int, cwd: Path | None = None):
    command = [sys.executable, "-c", "from imgrank.cli import main; main()", *args]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        command, stdout=stdout, stderr=subprocess.PIPE, env=env, cwd=cwd, timeout=180
    )


def _closed_pipe() -> int:
    """The write end of a pipe whose reader has gone, as with `| head -1` once head exits."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def test_renames_links_and_copies_happen_when_stdout_closes_early(
    photo_dir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """`sort --rename --apply --link L --copy C | head -1` does all three, exit 0, no noise."""
    before = sorted(p.name for p in photo_dir.iterdir())
    links, copies = tmp_path / "links", tmp_path / "copies"
    stdout = _closed_pipe()
    try:
        result = _imgrank(
            [
                "sort", str(photo_dir), "--by", "image quality", *tiny_args(tiny_model),
                "--rename", "--apply", "--link", str(links), "--copy", str(copies),
            ],  # fmt: skip
            stdout=stdout,
        )
    finally:
        os.close(stdout)
    assert result.returncode == 0, result.stderr.decode()
    assert b"Traceback" not in result.stderr and b"Exception ignored" not in result.stderr
    after = sorted(p.name for p in photo_dir.iterdir())
    assert after != before and all(name[0].isdigit() for name in after), after
    marker = ".imgrank-output"  # imgrank's own marker of an output folder
    assert len([p for p in links.iterdir() if p.name != marker]) == len(before)
    assert len([p for p in copies.iterdir() if p.name != marker]) == len(before)


@pytest.mark.slow  # one more interpreter importing torch
def test_pure_output_into_a_closed_pipe_is_a_quiet_exit(
    photo_dir: Path, tiny_model: Path
) -> None:
    stdout = _closed_pipe()
    try:
        result = _imgrank(
            ["sort", str(photo_dir), "--by", "q", "-q", *tiny_args(tiny_model)], stdout=stdout
        )
    finally:
        os.close(stdout)
    assert (result.returncode, result.stderr) == (0, b"")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
@pytest.mark.slow  # one more interpreter importing torch
def test_a_full_disk_under_stdout_is_one_message_after_the_side_effects(
    photo_dir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    copies = tmp_path / "copies"
    with open("/dev/full", "wb") as full:
        result = _imgrank(
            ["sort", str(photo_dir), "--by", "q", *tiny_args(tiny_model), "--copy", str(copies)],
            stdout=full.fileno(),
        )
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "error: cannot write the ranking to stdout: No space left on device"
    )
    copied = [p for p in copies.iterdir() if p.name != ".imgrank-output"]
    assert len(copied) == 4  # the side effect still happened


# --- item 3: what --force may replace ----------------------------------------------------------


def _sort_in_process(*args: str):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from imgrank.cli import app

    return CliRunner().invoke(app, ["sort", *args, *tiny_args()], catch_exceptions=False)


def _state(path: Path) -> tuple[object, ...]:
    """What a path is and holds, without following a link or opening a device or FIFO."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISREG(info.st_mode):
        return ("file", info.st_ino, path.read_bytes())
    return ("special", info.st_mode, info.st_rdev, info.st_ino)


@pytest.mark.parametrize("option", ["-o", "--errors"])
@pytest.mark.parametrize("kind", ["device", "fifo", "symlink", "photo"])
def test_force_never_replaces_a_device_fifo_symlink_or_photo(
    photo_dir: Path, tmp_path: Path, option: str, kind: str
) -> None:
    elsewhere = tmp_path / "elsewhere.csv"
    elsewhere.write_text("someone's table\n")
    if kind == "device":
        if os.geteuid() != 0:
            pytest.skip("creating a device node needs root")
        target = tmp_path / "null-device"
        os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    elif kind == "fifo":
        target = tmp_path / "fifo"
        os.mkfifo(target)
    elif kind == "symlink":
        target = tmp_path / "link.csv"
        target.symlink_to(elsewhere)
    else:
        target = sorted(photo_dir.glob("*.jpg"))[0]  # a photo of the very ranking
    before = _state(target)
    result = _sort_in_process(str(photo_dir), "--by", "q", option, str(target), "--force")
    assert result.exit_code == 6, result.output
    assert str(target) in result.stderr and "Traceback" not in result.output
    assert _state(target) == before
    assert elsewhere.read_text() == "someone's table\n"
    if kind == "symlink":
        assert "symbolic link" in result.stderr


def test_force_never_replaces_an_input_reached_by_a_hard_link(photo_dir: Path) -> None:
    photo = sorted(photo_dir.glob("*.jpg"))[0]
    alias = photo_dir.parent / "ranking.csv"
    os.link(photo, alias)  # the same file as a ranked photo, under a name that is not a photo's
    before = photo.read_bytes()
    result = _sort_in_process(str(photo_dir), "--by", "q", "-o", str(alias), "--force")
    assert result.exit_code == 6, result.output
    assert "one of the photos of this run" in result.stderr
    assert photo.read_bytes() == before and alias.stat().st_ino == photo.stat().st_ino


def test_force_still_replaces_an_earlier_output_file(photo_dir: Path, tmp_path: Path) -> None:
    earlier = tmp_path / "ranking.csv"
    earlier.write_text("an earlier ranking\n")
    result = _sort_in_process(str(photo_dir), "--by", "q", "-o", str(earlier), "--force")
    assert result.exit_code == 0, result.output
    assert earlier.read_text().startswith("rank,score,path\n")


def test_one_file_for_two_outputs_is_refused_before_any_work(
    photo_dir: Path, tmp_path: Path
) -> None:
    """Issue 17 item 14: `-o X --errors X` wrote the errors over the ranking."""
    target = tmp_path / "out.csv"
    result = _sort_in_process(
        str(photo_dir), "--by", "q", "-o", str(target), "--errors", str(target)
    )
    assert result.exit_code == 2, result.output
    assert "name the same file" in result.stderr and not target.exists()


# --- item 11: one clear line and an exit code instead of a traceback ---------------------------


@pytest.fixture
def read_only_folder(tmp_path: Path):  # type: ignore[no-untyped-def]
    """An empty read-only file system (a tmpfs mounted ro); skipped where mounting is not allowed."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _one_clean_error(result, code: int) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    return last


def test_a_new_cache_file_in_a_read_only_folder_costs_the_cache_not_the_sort(
    photo_dir: Path, read_only_folder: Path
) -> None:
    result = _sort_in_process(
        str(photo_dir), "--by", "q", "--cache", str(read_only_folder / "cache.sqlite3")
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 5
    assert "Going on without the cache" in result.stderr or "without the cache" in result.stderr


@pytest.mark.parametrize("option", ["--copy", "--link"])
@pytest.mark.parametrize("where", ["read-only folder", "existing file", "/proc"])
def test_link_and_copy_destinations_that_cannot_work_are_one_message(
    photo_dir: Path, tmp_path: Path, read_only_folder: Path, option: str, where: str
) -> None:
    if where == "read-only folder":
        target = read_only_folder
    elif where == "existing file":
        target = tmp_path / "a-file"
        target.write_text("mine")
    else:
        target = Path("/proc/imgrank-test")
    result = _sort_in_process(str(photo_dir), "--by", "q", option, str(target))
    last = _one_clean_error(result, 1 if where != "existing file" else 6)
    assert str(target) in last
    if where == "existing file":
        assert target.read_text() == "mine"


@pytest.mark.parametrize("command", ["sort", "train"])
def test_workers_below_one_is_a_usage_error(photo_dir: Path, tmp_path: Path, command: str) -> None:
    from typer.testing import CliRunner

    from imgrank.cli import app

    args = (
        ["sort", str(photo_dir), "--by", "q"]
        if command == "sort"
        else ["train", str(photo_dir), "--out", str(tmp_path / "m")]
    )
    result = CliRunner().invoke(app, [*args, "--workers", "-1", *tiny_args()])
    assert result.exit_code == 2, result.output
    assert "--workers" in result.output and "Traceback" not in result.output


# --- item 14: library warnings under -q --------------------------------------------------------


def _photo_with_a_broken_exif_tag(folder: Path) -> None:
    """A real photo whose EXIF orientation tag points past the end: Pillow warns about it."""
    import struct

    data = (folder / "chelsea.jpg").read_bytes()
    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1000, 5000) + b"\0" * 4
    exif = b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd
    segment = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    (folder / "odd-exif.jpg").write_bytes(data[:2] + segment + data[2:])


def test_library_warnings_are_silent_under_quiet_and_one_line_otherwise(
    photo_dir: Path,
) -> None:
    _photo_with_a_broken_exif_tag(photo_dir)
    loud = _sort_in_process(str(photo_dir), "--by", "q", "--no-cache")
    assert loud.exit_code == 0, loud.output
    lines = [line for line in loud.stderr.splitlines() if "Skipping tag" in line]
    assert lines and all(line.startswith("warning: ") for line in lines), loud.stderr
    assert ".py:" not in loud.stderr, "no Python source location, no source line"
    quiet = _sort_in_process(str(photo_dir), "--by", "q", "-q", "--no-cache")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "", "-q prints nothing on stderr but errors"


# --- item 10: what one file may cost, and the first Ctrl-C ------------------------------------


def test_a_huge_sparse_file_with_an_image_header_is_skipped_by_the_size_cap(
    photo_dir: Path,
) -> None:
    header = (photo_dir / "chelsea.jpg").read_bytes()[:4096]
    with open(photo_dir / "huge.jpg", "wb") as handle:
        handle.write(header)
        handle.truncate(3 * 1024**3)  # 3 GiB, sparse: no disk space used
    result = _sort_in_process(str(photo_dir), "--by", "q", "--no-cache")
    assert result.exit_code == 0, result.output
    assert "huge.jpg" not in result.stdout and result.stdout.count("\n") == 5
    assert "huge.jpg" in result.stderr and "--max-file-mb 2048" in result.stderr
    raised = _sort_in_process(str(photo_dir), "--by", "q", "--no-cache", "--max-file-mb", "4096")
    assert raised.exit_code == 0 and "huge.jpg" in raised.stdout, raised.output


def test_stopping_the_stream_does_not_wait_for_a_decode_that_takes_minutes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first Ctrl-C waited for the running decode (a `with` pool joins its threads)."""
    import threading
    import time

    from imgrank.features import stream
    from imgrank.models.clip.config import PreprocessConfig

    release = threading.Event()
    started = threading.Event()

    def slow_decode(path, *_args, **_kwargs):  # type: ignore[no-untyped-def]
        if path.name == "slow.jpg":
            started.set()
            release.wait(30)  # a 20 GB file being read
        import numpy as np

        return np.zeros((3, 8, 8), np.float32), None  # pixels, no facts

    # The stream's one decode call (pixels plus the hash and capture time cull uses).
    monkeypatch.setattr(stream, "load_pixels_and_facts", slow_decode)
    paths = [tmp_path / "fast.jpg", tmp_path / "slow.jpg"]
    batches = stream.decode_batches(paths, PreprocessConfig(image_size=8), batch_size=1, workers=2)
    next(batches)
    assert started.wait(10)
    assert stream.decodes_running() == 1
    begun = time.monotonic()
    batches.close()  # what a KeyboardInterrupt in the consumer does to the generator
    waited = time.monotonic() - begun
    release.set()
    assert waited < 5, f"closing the stream waited {waited:.1f} s for the decode"
