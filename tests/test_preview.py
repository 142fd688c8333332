"""The terminal preview: images only on capable terminals, never escape codes into a pipe."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
from conftest import tiny_args
from PIL import Image
from typer.testing import CliRunner

from imgrank.cli import app
from imgrank.errors import UsageError
from imgrank.ranking import Ranking, SkippedFile, rank_scores
from imgrank.report.preview import (
    detect_protocol,
    iterm_image,
    kitty_image,
    preview_sections,
    printable,
    render_preview,
    write_preview,
)

PHOTOS = Path(__file__).parent / "data" / "photos"
KITTY_ENV = {"TERM": "xterm-kitty", "KITTY_WINDOW_ID": "1"}


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def ranking(tmp_path: Path) -> Ranking:
    paths = [Path(shutil.copy(p, tmp_path / p.name)) for p in sorted(PHOTOS.glob("*.jpg"))]
    scored = [(path, 0.9 - 0.1 * i) for i, path in enumerate(paths)]
    return Ranking(items=rank_scores(scored), prompt="image quality", scorer="zero-shot")


def long_ranking(count: int) -> Ranking:
    scored = [(Path(f"/photos/{i:03d}.jpg"), 1.0 - i / 1000) for i in range(count)]
    return Ranking(items=rank_scores(scored), prompt="sharpness")


# --- which protocol -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TERM": "xterm-kitty"}, "kitty"),
        ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "3"}, "kitty"),
        ({"TERM": "xterm-ghostty", "TERM_PROGRAM": "ghostty"}, "kitty"),
        ({"TERM": "xterm-256color", "TERM_PROGRAM": "iTerm.app"}, "iterm"),
        ({"TERM": "xterm-256color", "TERM_PROGRAM": "WezTerm"}, "iterm"),
        ({"TERM": "xterm-256color", "LC_TERMINAL": "iTerm2"}, "iterm"),
        ({"TERM": "xterm-256color"}, "plain"),
        ({"TERM": "dumb"}, "plain"),
        ({"TERM": "tmux-256color", "KITTY_WINDOW_ID": "1"}, "plain"),
        ({"TERM": "screen", "TERM_PROGRAM": "iTerm.app"}, "plain"),
        ({"TERM": "xterm-kitty", "TMUX": "/tmp/tmux-0/default,1,0"}, "plain"),
        ({"TERM": "xterm-256color", "IMGRANK_PREVIEW": "kitty"}, "kitty"),
        ({"TERM": "xterm-kitty", "IMGRANK_PREVIEW": "plain"}, "plain"),
        ({}, "plain"),
    ],
)
def test_protocol_on_a_terminal_follows_the_environment(env: dict[str, str], expected: str) -> None:
    assert detect_protocol(FakeTerminal(), env) == expected


def test_a_pipe_or_file_never_gets_an_image_protocol(tmp_path: Path) -> None:
    forced = {**KITTY_ENV, "IMGRANK_PREVIEW": "kitty"}
    assert detect_protocol(io.StringIO(), forced) == "plain"
    with open(tmp_path / "out.txt", "w", encoding="utf-8") as handle:
        assert detect_protocol(handle, forced) == "plain"
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as pipe:
        assert detect_protocol(pipe, forced) == "plain"
    os.close(read_end)


def test_a_closed_stream_counts_as_not_a_terminal() -> None:
    stream = io.StringIO()
    stream.close()
    assert detect_protocol(stream, KITTY_ENV) == "plain"


def test_write_preview_into_a_pipe_has_no_escape_codes(ranking: Ranking) -> None:
    out = io.StringIO()
    used = write_preview(ranking, 2, out, environ={**KITTY_ENV, "IMGRANK_PREVIEW": "iterm"})
    assert used == "plain"
    assert "\x1b" not in out.getvalue() and "\a" not in out.getvalue()
    assert "#1" in out.getvalue()


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_a_real_terminal_gets_images(ranking: Ranking) -> None:
    master, slave = os.openpty()
    received = bytearray()

    def drain() -> None:
        # A pseudo-terminal buffers only a few KB: read while the preview is written.
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO once the terminal side is closed (Linux)
                return
            if not data:
                return
            received.extend(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with os.fdopen(slave, "w", encoding="utf-8", closefd=True) as terminal:
        used = write_preview(ranking, 1, terminal, environ=KITTY_ENV)
    reader.join(timeout=20)
    os.close(master)
    assert used == "kitty"
    assert received.count(b"\x1b_Ga=T,f=100") == 2
    assert b"#4" in received


# --- what is listed -----------------------------------------------------------------------


def test_first_and_last_n_with_the_gap_counted() -> None:
    text = render_preview(long_ranking(50), 3)
    lines = text.splitlines()
    assert lines[0] == 'First 3 of 50 for "sharpness":'
    ranks = [int(m) for m in re.findall(r"^\s+#(\d+)\s", text, re.M)]
    assert ranks == [1, 2, 3, 48, 49, 50]
    assert "  ... 44 more ..." in lines
    assert "Last 3:" in lines
    assert "/photos/000.jpg" in lines[1] and "1.000000" in lines[1]


def test_a_short_ranking_is_listed_once_in_full() -> None:
    text = render_preview(long_ranking(5), 3)
    assert text.splitlines()[0] == 'All 5 for "sharpness":'
    assert [int(m) for m in re.findall(r"#(\d+)", text)] == [1, 2, 3, 4, 5]
    assert "more" not in text


def test_sections_never_repeat_an_image() -> None:
    items = long_ranking(7).items
    for count in range(1, 9):
        first, hidden, last = preview_sections(items, count)
        shown = [item.rank for item in first + last]
        assert len(shown) == len(set(shown))
        assert len(shown) + hidden == 7


def test_skipped_files_are_counted_and_empty_rankings_explained() -> None:
    ranking = Ranking(items=[], skipped=[SkippedFile(Path("a.jpg"), "bad")], prompt="x")
    text = render_preview(ranking, 2)
    assert 'No image was ranked for "x".' in text
    assert "(1 file skipped)" in text


def test_count_must_be_positive() -> None:
    with pytest.raises(UsageError, match="--preview"):
        render_preview(long_ranking(3), 0)


def test_control_characters_in_names_cannot_reach_the_terminal() -> None:
    evil = Path("/photos/red\x1b[31m\x07title\x1b]0;pwned\x07\n.jpg")
    ranking = Ranking(items=rank_scores([(evil, 1.0)]), prompt="bad\x1b[2Jprompt")
    text = render_preview(ranking, 1)
    assert "\x1b" not in text and "\x07" not in text
    assert "red\\x1b[31m\\x07title" in text
    assert text.count("\n") == 2  # the header and one line: the name's newline is escaped
    assert printable("caf\udce9.jpg") == "caf\ufffd.jpg"  # a non-UTF-8 byte, shown replaced


# --- image protocols ----------------------------------------------------------------------


def _kitty_payload(text: str) -> list[tuple[str, str]]:
    return re.findall(r"\x1b_G([^;]*);([^\x1b]*)\x1b\\", text)


def test_kitty_sequences_carry_a_decodable_png_in_chunks(ranking: Ranking) -> None:
    text = render_preview(ranking, 1, protocol="kitty", rows=4)
    images = text.split("\n")
    sequences = [line for line in images if "\x1b_G" in line]
    assert len(sequences) == 2  # first and last
    for line in sequences:
        parts = _kitty_payload(line)
        keys = [k for k, _ in parts]
        assert keys[0].startswith("a=T,f=100,q=2,r=4,")
        assert all(k == "m=1" for k in keys[1:-1]) and keys[-1].endswith("m=0")
        assert all(len(chunk) <= 4096 for _, chunk in parts)
        png = base64.b64decode("".join(chunk for _, chunk in parts))
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG"
            assert max(image.size) <= 192


def test_iterm_sequence_states_the_size_it_carries(ranking: Ranking) -> None:
    text = render_preview(ranking, 1, protocol="iterm")
    found = re.findall(
        r"\x1b\]1337;File=inline=1;size=(\d+);height=5;preserveAspectRatio=1:([^\a]*)\a", text
    )
    assert len(found) == 2
    for size, payload in found:
        data = base64.b64decode(payload)
        assert len(data) == int(size)
        Image.open(io.BytesIO(data)).verify()


def test_small_payloads_are_one_kitty_chunk() -> None:
    assert kitty_image(b"\x89PNG", 3) == "\x1b_Ga=T,f=100,q=2,r=3,m=0;iVBORw==\x1b\\"
    assert (
        iterm_image(b"ab", 2)
        == "\x1b]1337;File=inline=1;size=2;height=2;preserveAspectRatio=1:YWI=\a"
    )


def test_an_unreadable_image_is_listed_without_a_picture(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    ranking = Ranking(items=rank_scores([(broken, 0.5)]), prompt="q")
    text = render_preview(ranking, 1, protocol="kitty")
    assert "\x1b" not in text
    assert "broken.jpg  (no preview: not an image Pillow can read)" in text


def test_unknown_protocol_is_refused() -> None:
    with pytest.raises(UsageError, match="protocol"):
        render_preview(long_ranking(2), 1, protocol="sixel")  # type: ignore[arg-type]


# --- imgrank sort --preview ---------------------------------------------------------------


def test_sort_preview_goes_to_stderr_as_plain_text(photo_dir: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "sort",
            str(photo_dir),
            "--by",
            "image quality",
            "--preview",
            "1",
            "--quiet",
            *tiny_args(),
        ],
        catch_exceptions=False,
        env={"TERM": "xterm-kitty", "KITTY_WINDOW_ID": "1"},
    )
    assert result.exit_code == 0, result.stderr
    assert "First 1 of 4" in result.stderr and "Last 1:" in result.stderr
    assert "\x1b" not in result.stderr and "\x1b" not in result.stdout
    first = result.stdout.splitlines()[1].split(",", 2)[2]
    assert first in result.stderr  # the preview names the same best photo as the ranking
    bad = CliRunner().invoke(
        app, ["sort", str(photo_dir), "--by", "q", "--preview", "0", *tiny_args()]
    )
    assert bad.exit_code == 2
