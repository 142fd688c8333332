"""A quick look at the top and bottom of a ranking, in the terminal.

Terminals that show images inline get small thumbnails: the kitty graphics
protocol (kitty, Ghostty) or the iTerm2 inline-image protocol (iTerm2,
WezTerm). Everywhere else, and whenever the output is not a terminal (a pipe,
a file, a CI log), the preview is a plain listing with no escape code at all;
even file names are cleaned of control characters, so a name cannot smuggle
an escape sequence into the output.

Terminal multiplexers (tmux, screen) get the plain listing: they drop or
garble image escapes unless specially configured. ``IMGRANK_PREVIEW`` (one of
``kitty``, ``iterm``, ``plain``) overrides the detection, but never turns
images on when the output is not a terminal.
"""

from __future__ import annotations

import base64
import io
import os
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, TextIO

from imgrank.errors import ImageDecodeError, UsageError
from imgrank.images.decode import DEFAULT_MAX_PIXELS
from imgrank.ranking import RankedImage, Ranking
from imgrank.report.html import display_text, format_score, make_thumbnail

ImageProtocol = Literal["kitty", "iterm", "plain"]
PROTOCOLS: tuple[str, ...] = ("kitty", "iterm", "plain")

#: Environment variable that forces a protocol (for terminals we do not recognise).
OVERRIDE_VARIABLE = "IMGRANK_PREVIEW"

#: Height of a preview image in terminal rows.
DEFAULT_ROWS = 5

#: Thumbnail pixels: enough for a few rows of a high-DPI terminal, cheap to send.
PREVIEW_PIXELS = 192

_KITTY_CHUNK = 4096  # the kitty protocol takes base64 payloads in chunks of at most 4096 bytes
_ESC = "\x1b"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or not a real file
        return False


def detect_protocol(stream: TextIO, environ: Mapping[str, str] | None = None) -> ImageProtocol:
    """The inline-image protocol to use on ``stream``; ``plain`` unless it is a capable terminal.

    Args:
        stream: where the preview goes (a pipe or file always gets ``plain``).
        environ: the environment to inspect (default: ``os.environ``).
    """
    if not _is_terminal(stream):
        return "plain"
    env = os.environ if environ is None else environ
    forced = env.get(OVERRIDE_VARIABLE, "").strip().lower()
    if forced in PROTOCOLS:
        return forced  # type: ignore[return-value]
    term = env.get("TERM", "")
    program = env.get("TERM_PROGRAM", "")
    if term == "dumb" or env.get("TMUX") or term.startswith(("screen", "tmux")):
        return "plain"
    if env.get("KITTY_WINDOW_ID") or term == "xterm-kitty":
        return "kitty"
    if program.lower() == "ghostty" or term == "xterm-ghostty":
        return "kitty"
    if program in ("iTerm.app", "WezTerm") or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm"
    return "plain"


def printable(text: str) -> str:
    """``text`` with control characters shown as ``\\xNN`` (no escape code can get through)."""
    text = display_text(text)
    if text.isprintable():
        return text
    return "".join(
        ch
        if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp")
        else f"\\x{ord(ch):02x}"
        if ord(ch) < 0x100
        else f"\\u{ord(ch):04x}"
        for ch in text
    )


def preview_sections(
    items: list[RankedImage], count: int
) -> tuple[list[RankedImage], int, list[RankedImage]]:
    """Split ``items`` into the first ``count``, how many are left out, and the last ``count``.

    When the ranking is short enough, everything is in the first part and the
    others are empty (no image is listed twice).
    """
    if count < 1:
        raise UsageError(f"--preview needs a number of images of 1 or more, not {count}")
    if len(items) <= 2 * count:
        return list(items), 0, []
    return items[:count], len(items) - 2 * count, items[-count:]


def kitty_image(png: bytes, rows: int) -> str:
    """A kitty graphics-protocol sequence that shows ``png`` at the cursor, ``rows`` high.

    ``q=2`` silences the terminal's replies, which would otherwise arrive on
    stdin as if typed.
    """
    payload = base64.standard_b64encode(png).decode("ascii")
    chunks = [payload[i : i + _KITTY_CHUNK] for i in range(0, len(payload), _KITTY_CHUNK)] or [""]
    parts = []
    for index, chunk in enumerate(chunks):
        more = 1 if index < len(chunks) - 1 else 0
        keys = f"a=T,f=100,q=2,r={rows},m={more}" if index == 0 else f"m={more}"
        parts.append(f"{_ESC}_G{keys};{chunk}{_ESC}\\")
    return "".join(parts)


def iterm_image(data: bytes, rows: int) -> str:
    """An iTerm2 inline-image sequence that shows ``data`` at the cursor, ``rows`` high."""
    payload = base64.standard_b64encode(data).decode("ascii")
    return (
        f"{_ESC}]1337;File=inline=1;size={len(data)};height={rows};"
        f"preserveAspectRatio=1:{payload}\a"
    )


def _png_thumbnail(path: Path, max_pixels: int) -> bytes:
    image = make_thumbnail(path, PREVIEW_PIXELS, max_pixels=max_pixels)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=False)
    return buffer.getvalue()


def _line(item: RankedImage, rank_width: int) -> str:
    return (
        f"  #{item.rank:<{rank_width}}  {format_score(item.score):>10}  {printable(str(item.path))}"
    )


def render_preview(
    ranking: Ranking,
    count: int,
    *,
    protocol: ImageProtocol = "plain",
    rows: int = DEFAULT_ROWS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> str:
    """The preview of the first and last ``count`` images, as text to write.

    Args:
        ranking: the run.
        count: how many images to show at each end.
        protocol: ``plain`` (text only, safe anywhere), ``kitty`` or ``iterm``.
        rows: image height in terminal rows (image protocols only).
        max_pixels: decompression-bomb guard for the originals.

    Raises:
        UsageError: ``count`` is less than 1.
    """
    first, hidden, last = preview_sections(ranking.items, count)
    if protocol not in PROTOCOLS:
        raise UsageError(
            f"unknown preview protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}"
        )
    total = len(ranking.items)
    rank_width = len(str(max((item.rank for item in ranking.items), default=1)))
    prompt = printable(ranking.prompt)
    lines: list[str] = []
    if not ranking.items:
        lines.append(f'No image was ranked for "{prompt}".')
    elif last:
        lines.append(f'First {len(first)} of {total} for "{prompt}":')
    else:
        lines.append(f'All {total} for "{prompt}":')

    def show(item: RankedImage) -> None:
        if protocol != "plain":
            try:
                png = _png_thumbnail(item.path, max_pixels)
            except ImageDecodeError as exc:
                lines.append(_line(item, rank_width) + f"  (no preview: {printable(exc.reason)})")
                return
            except Exception as exc:  # noqa: BLE001 - a preview must never sink the run
                lines.append(_line(item, rank_width) + f"  (no preview: {type(exc).__name__})")
                return
            image = kitty_image(png, rows) if protocol == "kitty" else iterm_image(png, rows)
            lines.append("  " + image)
        lines.append(_line(item, rank_width))

    for item in first:
        show(item)
    if last:
        lines.append(f"  ... {hidden} more ...")
        lines.append(f"Last {len(last)}:")
        for item in last:
            show(item)
    if ranking.skipped:
        skipped = len(ranking.skipped)
        lines.append(f"({skipped} file{'s' if skipped != 1 else ''} skipped)")
    return "\n".join(lines) + "\n"


def write_preview(
    ranking: Ranking,
    count: int,
    stream: TextIO,
    *,
    environ: Mapping[str, str] | None = None,
    rows: int = DEFAULT_ROWS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageProtocol:
    """Write the preview to ``stream``, with images only if it is a capable terminal.

    Returns:
        The protocol used (``plain`` for pipes, files and other terminals).
    """
    protocol = detect_protocol(stream, environ)
    stream.write(
        render_preview(ranking, count, protocol=protocol, rows=rows, max_pixels=max_pixels)
    )
    stream.flush()
    return protocol
