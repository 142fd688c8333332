"""A self-contained HTML contact sheet of a ranking.

People judge a ranking by looking at it. :func:`write_report` writes one HTML
file that holds everything it shows: a grid of thumbnails in rank order (each
with its rank, score and file name, linking to the original through a
``file://`` address), the prompt and scorer in the header, a histogram of the
scores as inline SVG, and the files that were skipped with their reasons. No
script, no external style sheet or image, so the file can be mailed or opened
offline.

Size: thumbnails are at most :data:`THUMBNAIL_SIZE` pixels on their longer
side, encoded as WebP (JPEG where Pillow lacks WebP) at a modest quality,
which is about 3-4 KB per photo (4.7 KB with base64 and markup), so a folder of
5,000 photos gives a report of roughly 24 MB. Tiles use CSS
``content-visibility`` so the browser lays out only what is on screen.

File names: every name is HTML-escaped, and a name that is not valid UTF-8
(possible on Linux) is shown with replacement characters while its link keeps
the exact bytes (percent-encoded), so it still opens the right file.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imgrank import __version__
from imgrank.errors import ImageDecodeError, UnsafeOperationError, UsageError
from imgrank.images.decode import DEFAULT_MAX_PIXELS, open_image
from imgrank.ranking import RankedImage, Ranking

if TYPE_CHECKING:
    from PIL import Image

#: Longer side of a report thumbnail, in pixels (also its CSS size).
THUMBNAIL_SIZE = 160

#: WebP quality: at 160 px, 70 keeps faces and text readable at ~3 KB a photo.
THUMBNAIL_QUALITY = 70

#: Written into every report so that a later run may replace a report it wrote
#: itself, while any other file at that name is left alone.
GENERATOR_MARK = "imgrank-report"

_GENERATOR_META = f'<meta name="generator" content="{GENERATOR_MARK} {__version__}">'


@dataclass(frozen=True)
class Thumbnail:
    """An encoded thumbnail ready to embed, or the reason there is none."""

    data: bytes | None
    mime: str
    width: int
    height: int
    error: str | None = None


def display_text(text: str) -> str:
    """``text`` made safe to write as UTF-8: undecodable file-name bytes become U+FFFD.

    On POSIX, Python keeps the bytes of a file name that is not valid UTF-8 as
    lone surrogates (``surrogateescape``); writing those as UTF-8 would raise.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        return text.encode("utf-8", "replace").decode("utf-8")
    return raw.decode("utf-8", "replace")


def file_uri(path: Path) -> str:
    """The ``file://`` address of ``path``, exact even for non-UTF-8 names."""
    try:
        return path.absolute().as_uri()
    except ValueError:  # e.g. a relative Windows path with a drive only; no link then
        return ""


def format_score(score: float) -> str:
    """A score as the CSV output shows it (six decimals: zero-shot scores sit close together).

    Scientific notation when tiny or huge, so no score is shown as 0 or as a long row of digits.
    """
    if not math.isfinite(score):
        return str(score)
    magnitude = abs(score)
    if magnitude != 0 and (magnitude < 1e-4 or magnitude >= 1e6):
        return f"{score:.4e}"
    return f"{score:.6f}"


def webp_supported() -> bool:
    """Whether this Pillow can write WebP (nearly always; JPEG is the fallback)."""
    from PIL import features

    return bool(features.check("webp"))


def make_thumbnail(
    path: Path, size: int = THUMBNAIL_SIZE, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode ``path`` upright and shrink it to fit a ``size`` x ``size`` box.

    JPEGs are decoded in draft mode (DCT scaling) at no less than ``size``
    pixels a side, so a camera photo is never decoded at full size.

    Raises:
        ImageDecodeError: the file cannot be read or decoded.
    """
    from PIL import Image

    image = open_image(path, min_side=size, max_pixels=max_pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return image


def encode_thumbnail(image: Image.Image, *, use_webp: bool = True) -> tuple[bytes, str]:
    """Encode an RGB thumbnail compactly; returns ``(bytes, mime type)``."""
    buffer = io.BytesIO()
    if use_webp:
        # method=2: nearly the size of the slowest setting at a third of its time.
        image.save(buffer, "WEBP", quality=THUMBNAIL_QUALITY, method=2)
        return buffer.getvalue(), "image/webp"
    image.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY + 5, optimize=True)
    return buffer.getvalue(), "image/jpeg"


def thumbnail_for(
    path: Path,
    size: int = THUMBNAIL_SIZE,
    *,
    use_webp: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Thumbnail:
    """An embeddable thumbnail of ``path``; never raises (a failure is recorded in ``error``)."""
    try:
        image = make_thumbnail(path, size, max_pixels=max_pixels)
        data, mime = encode_thumbnail(image, use_webp=use_webp)
        return Thumbnail(data, mime, image.width, image.height)
    except ImageDecodeError as exc:
        return Thumbnail(None, "", 0, 0, exc.reason)
    except Exception as exc:  # noqa: BLE001 - a thumbnail must never sink the report
        return Thumbnail(None, "", 0, 0, f"{type(exc).__name__}: {exc}")


def _ordered_map(
    func: Callable[[Path], Thumbnail], paths: Iterable[Path], workers: int
) -> Iterator[Thumbnail]:
    """``map(func, paths)`` on a thread pool, in order, with a bounded number in flight.

    Pillow releases the GIL while it decodes, resizes and encodes, so threads
    scale; bounding the queue keeps memory flat however many photos there are.
    """
    limit = max(4, 4 * workers)
    source = iter(paths)
    pending: deque[Future[Thumbnail]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgrank-thumb")
    try:
        for path in source:
            pending.append(pool.submit(func, path))
            if len(pending) >= limit:
                break
        while pending:
            result = pending.popleft().result()
            following = next(source, None)
            if following is not None:
                pending.append(pool.submit(func, following))
            yield result
    finally:
        # On Ctrl-C or an error downstream, drop the queued thumbnails instead of
        # finishing them; only the few already running are waited for.
        pool.shutdown(wait=True, cancel_futures=True)


def _common_folder(paths: Sequence[Path]) -> Path | None:
    """The deepest folder holding every path, to show names relative to it."""
    if not paths:
        return None
    try:
        common = Path(os.path.commonpath([str(p.absolute()) for p in paths]))
    except ValueError:  # different drives on Windows
        return None
    if common == paths[0].absolute():  # one file (maybe listed several times)
        common = common.parent
    return common


def _shown_name(path: Path, common: Path | None) -> str:
    if common is not None:
        try:
            return str(path.absolute().relative_to(common))
        except ValueError:
            pass
    return path.name or str(path)


def _infer_ascending(items: Sequence[RankedImage]) -> bool:
    finite = [item.score for item in items if math.isfinite(item.score)]
    return len(finite) >= 2 and finite[0] < finite[-1]


def histogram_svg(scores: Sequence[float], *, width: int = 640, height: int = 140) -> str:
    """An inline SVG bar chart of ``scores`` (non-finite scores are left out).

    Bins: the square root of the count, between 5 and 40, as is customary for
    a quick look. Every bar has a tooltip with its range and count.
    """
    import numpy as np

    values = np.asarray([s for s in scores if math.isfinite(s)], dtype=np.float64)
    escape = html.escape
    if values.size == 0:
        return '<p class="empty">No finite scores to plot.</p>'
    low, high = float(values.min()), float(values.max())
    bins = int(min(40, max(5, math.ceil(math.sqrt(values.size)))))
    if high == low:
        bins = 1
        counts, edges = np.array([values.size]), np.array([low, high])
    else:
        counts, edges = np.histogram(values, bins=bins, range=(low, high))
    pad_left, pad_bottom, pad_top = 36, 22, 8
    plot_w, plot_h = width - pad_left - 8, height - pad_bottom - pad_top
    peak = int(counts.max())
    bar_w = plot_w / len(counts)
    parts = [
        f'<svg class="histogram" role="img" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>Histogram of {values.size} scores, from {escape(format_score(low))} "
        f"to {escape(format_score(high))}</title>",
        f'<line class="axis" x1="{pad_left}" y1="{pad_top + plot_h}" '
        f'x2="{pad_left + plot_w}" y2="{pad_top + plot_h}"/>',
    ]
    for index, count in enumerate(counts.tolist()):
        bar_h = plot_h * count / peak if peak else 0
        x = pad_left + index * bar_w
        y = pad_top + plot_h - bar_h
        tip = (
            f"{format_score(float(edges[index]))} to {format_score(float(edges[index + 1]))}: "
            f"{count} image{'s' if count != 1 else ''}"
        )
        parts.append(
            f'<rect class="bar" x="{x + 0.5:.2f}" y="{y:.2f}" width="{max(bar_w - 1, 0.5):.2f}" '
            f'height="{bar_h:.2f}"><title>{escape(tip)}</title></rect>'
        )
    label_y = pad_top + plot_h + 16
    parts += [
        f'<text x="{pad_left}" y="{label_y}" text-anchor="start">'
        f"{escape(format_score(low))}</text>",
        f'<text x="{pad_left + plot_w}" y="{label_y}" text-anchor="end">'
        f"{escape(format_score(high))}</text>",
        f'<text x="{pad_left - 6}" y="{pad_top + 10}" text-anchor="end">{peak}</text>',
        f'<text x="{pad_left - 6}" y="{pad_top + plot_h}" text-anchor="end">0</text>',
        "</svg>",
    ]
    return "".join(parts)


_STYLE = """
:root { color-scheme: light dark; --bg: #fafafa; --fg: #1d1d1f; --muted: #6b6b70;
  --tile: #ffffff; --line: #dedee3; --accent: #2f6fde; }
@media (prefers-color-scheme: dark) { :root { --bg: #161618; --fg: #ececf0;
  --muted: #a0a0a8; --tile: #222226; --line: #38383e; --accent: #7aa7ff; } }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px; background: var(--bg); color: var(--fg);
  font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { display: flex; flex-wrap: wrap; gap: 16px 40px; align-items: flex-end;
  margin-bottom: 24px; }
h1 { font-size: 22px; margin: 0 0 8px; overflow-wrap: anywhere; }
h2 { font-size: 18px; margin: 32px 0 8px; }
dl.facts { display: grid; grid-template-columns: auto 1fr; gap: 2px 12px; margin: 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
figure.histogram { margin: 0; }
figure.histogram figcaption { color: var(--muted); font-size: 12px; }
svg.histogram { max-width: 100%; height: auto; display: block; }
svg.histogram .bar { fill: var(--accent); }
svg.histogram .axis { stroke: var(--muted); }
svg.histogram text { fill: var(--muted); font-size: 11px; }
ol.grid { list-style: none; margin: 0; padding: 0; display: grid; gap: 12px;
  grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); }
li.tile { background: var(--tile); border: 1px solid var(--line); border-radius: 8px;
  padding: 8px; content-visibility: auto; contain-intrinsic-size: auto 226px; }
li.tile .thumb { display: flex; align-items: center; justify-content: center;
  height: 160px; text-decoration: none; }
li.tile img { max-width: 100%; max-height: 160px; display: block; }
li.tile .placeholder { display: flex; align-items: center; justify-content: center;
  text-align: center; width: 100%; height: 160px; border: 1px dashed var(--line);
  color: var(--muted); font-size: 12px; padding: 8px; overflow: hidden; }
li.tile .meta { display: flex; justify-content: space-between; margin-top: 6px;
  font-variant-numeric: tabular-nums; }
li.tile .rank { font-weight: 600; }
li.tile .score { color: var(--muted); }
li.tile .name { display: block; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; font-size: 12px; }
h2.burst { font-size: 15px; margin: 20px 0 8px; color: var(--muted); font-weight: 600; }
ol.grid.burst { grid-template-columns: repeat(auto-fill, minmax(150px, 180px)); }
li.tile.keep { border: 3px solid var(--accent); padding: 6px; }
li.tile .badge { color: var(--accent); font-weight: 700; }
li.tile.reject img { opacity: 0.55; }
table.skipped { border-collapse: collapse; }
table.skipped td, table.skipped th { text-align: left; padding: 4px 12px 4px 0;
  border-bottom: 1px solid var(--line); vertical-align: top; overflow-wrap: anywhere; }
footer { margin-top: 32px; color: var(--muted); font-size: 12px; }
""".strip()


def _tile(item: RankedImage, thumb: Thumbnail, shown: str, keep: bool | None = None) -> str:
    escape = html.escape
    name = escape(display_text(shown))
    full = escape(display_text(str(item.path.absolute())))
    score_text = escape(format_score(item.score))
    uri = file_uri(item.path)
    if thumb.data is not None:
        encoded = base64.b64encode(thumb.data).decode("ascii")
        picture = (
            f'<img src="data:{thumb.mime};base64,{encoded}" width="{thumb.width}" '
            f'height="{thumb.height}" alt="{name}" decoding="async">'
        )
    else:
        reason = escape(display_text(thumb.error or "no preview"))
        picture = f'<span class="placeholder">no preview: {reason}</span>'
    if uri:
        picture = f'<a class="thumb" href="{escape(uri)}" title="{full}">{picture}</a>'
    else:
        picture = f'<span class="thumb" title="{full}">{picture}</span>'
    # In a grouped sheet (imgrank cull) the keepers stand out and the others fade.
    css = "tile" if keep is None else ("tile keep" if keep else "tile reject")
    badge = '<span class="badge">keep</span>' if keep else ""
    return (
        f'<li class="{css}" id="rank-{item.rank}" data-rank="{item.rank}" '
        f'data-score="{escape(repr(float(item.score)))}">{picture}'
        f'<div class="meta"><span class="rank">#{item.rank}</span>{badge}'
        f'<span class="score">{score_text}</span></div>'
        f'<span class="name" title="{full}">{name}</span></li>\n'
    )


def render_report(
    ranking: Ranking,
    *,
    ascending: bool | None = None,
    top: int | None = None,
    thumbnail_size: int = THUMBNAIL_SIZE,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_progress: Callable[[int], None] | None = None,
    groups: Sequence[tuple[int, bool]] | None = None,
) -> Iterator[str]:
    """The report's HTML, piece by piece (thumbnails are made while it streams).

    Args:
        ranking: what to show; ``items`` in the order given (already ranked).
        ascending: whether the lowest score comes first; inferred from the
            scores when not given.
        top: the ``--top K`` the run was cut to, shown in the header.
        thumbnail_size: longer side of the thumbnails in pixels.
        workers: thumbnail threads (default: one per core).
        max_pixels: decompression-bomb guard for the originals.
        on_progress: called with the number of thumbnails finished since the last call.
        groups: ``(group, keep)`` for each item (``imgrank cull``): one row of tiles
            per group, in the order given, keepers marked; the rank is the rank in
            the group.
    """
    escape = html.escape
    items = ranking.items
    if groups is not None and len(groups) != len(items):
        raise ValueError("groups must give one (group, keep) pair per item")
    if ascending is None:
        ascending = _infer_ascending(items)
    common = _common_folder([item.path for item in items])
    prompt = display_text(ranking.prompt)
    facts = [
        ("Scorer", escape(display_text(ranking.scorer or "unknown"))),
        (
            "Order",
            "groups in capture order, best first in each"
            if groups is not None
            else ("lowest score first" if ascending else "highest score first"),
        ),
        (
            "Shown",
            f"{len(items):,} image{'s' if len(items) != 1 else ''}"
            + (f" (--top {top})" if top is not None else ""),
        ),
    ]
    if groups is not None:
        kept = sum(1 for _group, keep in groups if keep)
        facts.append(("Groups", f"{len({g for g, _k in groups}):,} ({kept:,} photos kept)"))
    if common is not None:
        facts.append(("Folder", escape(display_text(str(common)))))
    if ranking.skipped:
        count = len(ranking.skipped)
        facts.append(
            ("Skipped", f'<a href="#skipped">{count:,} file{"s" if count != 1 else ""}</a>')
        )
    if ranking.seconds:
        facts.append(("Time", f"{ranking.seconds:.1f} s"))
    facts.append(("Written", escape(time.strftime("%Y-%m-%d %H:%M"))))

    yield (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"{_GENERATOR_META}\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>imgrank: {escape(prompt) or 'ranking'}</title>\n"
        f"<style>\n{_STYLE}\n</style>\n</head>\n<body>\n<header>\n<div>\n"
        f'<h1 class="prompt">{escape(prompt) if prompt else "Ranking"}</h1>\n'
        '<dl class="facts">'
        + "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in facts)
        + "</dl>\n</div>\n"
        f'<figure class="histogram">{histogram_svg([item.score for item in items])}'
        "<figcaption>How the scores spread (point at a bar for its range)</figcaption></figure>\n"
        "</header>\n<main>\n"
    )

    if items:
        use_webp = webp_supported()

        def make(path: Path) -> Thumbnail:
            return thumbnail_for(path, thumbnail_size, use_webp=use_webp, max_pixels=max_pixels)

        thumbs = _ordered_map(make, (item.path for item in items), workers or os.cpu_count() or 1)
        if groups is None:
            yield '<ol class="grid">\n'
        sizes: dict[int, int] = {}
        for group, _keep in groups or ():
            sizes[group] = sizes.get(group, 0) + 1
        current: int | None = None
        for index, (item, thumb) in enumerate(zip(items, thumbs, strict=True)):
            keep = None
            if groups is not None:
                group, keep = groups[index]
                if group != current:
                    if current is not None:
                        yield "</ol>\n"
                    count = sizes[group]
                    yield (
                        f'<h2 class="burst" id="group-{group}">Group {group} '
                        f"({count} photo{'s' if count != 1 else ''})</h2>\n"
                        '<ol class="grid burst">\n'
                    )
                    current = group
            yield _tile(item, thumb, _shown_name(item.path, common), keep)
            if on_progress is not None:
                on_progress(1)
        yield "</ol>\n"
    else:
        yield '<p class="empty">No image was ranked.</p>\n'
    yield "</main>\n"

    if ranking.skipped:
        yield (
            f'<section id="skipped">\n<h2>Skipped files ({len(ranking.skipped):,})</h2>\n'
            '<table class="skipped">\n'
            "<thead><tr><th>File</th><th>Reason</th></tr></thead>\n<tbody>\n"
        )
        for skipped in ranking.skipped:
            yield (
                f"<tr><td>{escape(display_text(str(skipped.path)))}</td>"
                f"<td>{escape(display_text(skipped.reason))}</td></tr>\n"
            )
        yield "</tbody>\n</table>\n</section>\n"
    yield f"<footer>Written by imgrank {escape(__version__)}.</footer>\n</body>\n</html>\n"


def is_imgrank_report(path: Path) -> bool:
    """Whether ``path`` is a report imgrank wrote (the only file it may replace)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return f'content="{GENERATOR_MARK} '.encode("ascii") in head


def check_report_destination(destination: Path, *, overwrite: bool = False) -> None:
    """Refuse early (before any work) a report name that cannot or must not be written.

    Args:
        destination: the report file to be.
        overwrite: allow replacing an existing file that is not an imgrank report
            (``--force``); a previous imgrank report is always replaced.

    Raises:
        UsageError: the destination is a folder or its folder does not exist.
        UnsafeOperationError: the destination is another file and ``overwrite`` is off.
    """
    if destination.is_dir():
        raise UsageError(
            f"{destination} is a folder; give the report a file name, "
            f"e.g. {destination / 'ranking.html'}"
        )
    parent = destination.parent
    if not parent.is_dir():
        raise UsageError(
            f"cannot write the report {destination}: the folder {parent} does not exist; "
            "create it first"
        )
    if os.path.lexists(destination):
        from imgrank.files.writers import check_replaceable

        # Whatever is there must be a regular file that is not a photo, even for a report.
        check_replaceable(destination, os.lstat(destination))
    if not _may_replace(destination, overwrite=overwrite):
        raise UnsafeOperationError(
            f"{destination} already exists and is not an imgrank report; imgrank does not "
            "overwrite it: choose another name for --report, move that file away, or pass --force"
        )


def _may_replace(destination: Path, *, overwrite: bool) -> bool:
    """Whether ``destination`` is free, an earlier report, or (with ``overwrite``) a file."""
    if not (destination.exists() or destination.is_symlink()):
        return True
    if destination.is_dir():
        return False
    return overwrite or is_imgrank_report(destination)


def write_report(
    ranking: Ranking,
    destination: Path,
    *,
    ascending: bool | None = None,
    top: int | None = None,
    overwrite: bool = False,
    thumbnail_size: int = THUMBNAIL_SIZE,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_progress: Callable[[int], None] | None = None,
    groups: Sequence[tuple[int, bool]] | None = None,
) -> Path:
    """Write the HTML contact sheet of ``ranking`` to ``destination``.

    The file is written under a temporary name in the same folder and moved
    into place at the end, so an interrupted run never leaves half a report.
    An existing file is replaced only if it is itself an imgrank report, or
    when ``overwrite`` is set.

    Args:
        ranking: the run to show.
        destination: the ``.html`` file to write.
        ascending: whether the lowest score comes first (inferred when not given).
        top: the ``--top K`` the ranking was cut to, for the header.
        overwrite: also replace an existing file that is not an imgrank report.
        thumbnail_size: longer side of the thumbnails in pixels.
        workers: thumbnail threads (default: one per core).
        max_pixels: decompression-bomb guard for the originals.
        on_progress: called with the number of thumbnails finished since the last call.
        groups: ``(group, keep)`` per item, for the grouped sheet of ``imgrank cull``.

    Returns:
        The path written.

    Raises:
        UsageError: the destination is a folder or its folder does not exist.
        UnsafeOperationError: the destination exists, is not an imgrank report and
            ``overwrite`` is off.
        ImgrankError: the file cannot be written (disk full, permissions).
    """
    destination = Path(destination)
    check_report_destination(destination, overwrite=overwrite)
    chunks = render_report(
        ranking,
        ascending=ascending,
        top=top,
        thumbnail_size=thumbnail_size,
        workers=workers,
        max_pixels=max_pixels,
        on_progress=on_progress,
        groups=groups,
    )
    from imgrank.files.atomic import atomic_file

    try:
        # Written under a temporary name, moved into place at the end; an earlier
        # imgrank report (or, with overwrite, any file) may be replaced.
        with atomic_file(
            destination, replace=lambda found: _may_replace(found, overwrite=overwrite)
        ) as stream:
            text = io.TextIOWrapper(
                stream,
                encoding="utf-8",
                errors="replace",  # display_text already cleaned names; this is a last guard
                newline="\n",
            )
            for chunk in chunks:
                text.write(chunk)
            text.flush()
            text.detach()
    finally:
        chunks.close()  # stops the thumbnail threads now, not when garbage-collected
    return destination

