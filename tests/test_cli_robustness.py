"""What a fault probe broke at the command line (issue 17), run as a user runs imgrank.

Real processes with real file descriptors: a pipe whose reader is already gone,
``/dev/full`` under stdout.
"""

from __future__ import annotations

import os
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
    assert len(list(links.iterdir())) == len(before)
    assert len(list(copies.iterdir())) == len(before)


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
    assert len(list(copies.iterdir())) == 4  # the side effect still happened
