"""A real browser opens the HTML report: every thumbnail decodes, and it looks like a report.

Runs headless Chromium (Debian package ``chromium``; ``.ci/run`` installs it).
Skipped, with the reason, only where no Chromium can be found.
``IMGRANK_CHROMIUM`` may name the browser binary.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from imgrank.ranking import Ranking, SkippedFile, rank_scores
from imgrank.report.html import write_report

PHOTOS = Path(__file__).parent / "data" / "photos"


def find_chromium() -> str | None:
    """The Chromium (or Chrome) binary to drive, if any."""
    override = os.environ.get("IMGRANK_CHROMIUM")
    if override:
        return shutil.which(override) or (override if Path(override).is_file() else None)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = find_chromium()

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="headless Chromium is not installed (Debian: apt-get install chromium), "
        "so the real-browser check of the HTML report cannot run",
    ),
]

#: Appended to a copy of the report. When the page has loaded, every image is drawn on a
#: canvas and a pixel read back: that forces a full decode, synchronously (so the DOM dump
#: cannot come before the answer), and throws or reads nothing for a broken image.
CHECK_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const canvas = document.createElement("canvas");
  const context = canvas.getContext("2d", {willReadFrequently: true});
  const images = [...document.images];
  const broken = [];
  for (const image of images) {
    let ok = image.complete && image.naturalWidth > 0 && image.naturalHeight > 0;
    if (ok) {
      try {
        canvas.width = image.naturalWidth;
        canvas.height = image.naturalHeight;
        context.drawImage(image, 0, 0);
        const x = image.naturalWidth >> 1, y = image.naturalHeight >> 1;
        ok = context.getImageData(x, y, 1, 1).data[3] === 255;  // photos are opaque
      } catch (error) {
        ok = false;
      }
    }
    if (!ok) broken.push(image.alt);
  }
  const tiles = [...document.querySelectorAll("li.tile")].map((tile) => ({
    rank: Number(tile.dataset.rank),
    placeholder: tile.querySelector(".placeholder") !== null,
    href: tile.querySelector("a") ? tile.querySelector("a").href : null,
  }));
  const out = document.createElement("pre");
  out.id = "imgrank-check";
  out.textContent = JSON.stringify({images: images.length, broken, tiles});
  document.body.append(out);
});
</script>
"""


def chromium(args: list[str], profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium once with a fresh profile and nothing that reaches the network."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, timeout=timeout, check=False)


def browser_check(report: Path, tmp_path: Path, *, text: str | None = None) -> dict:
    """Load ``report`` (or ``text`` in its place) in Chromium; return what the check saw."""
    checked = report.with_name("checked-" + report.name)
    text = report.read_text(encoding="utf-8") if text is None else text
    checked.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    result = chromium(
        ["--virtual-time-budget=60000", "--dump-dom", checked.as_uri()], tmp_path / "profile-dom"
    )
    dom = result.stdout.decode("utf-8", "replace")
    found = re.search(r'<pre id="imgrank-check">(.*?)</pre>', dom, re.S)
    assert found, (
        f"Chromium did not run the check (exit {result.returncode}):\n"
        + result.stderr.decode("utf-8", "replace")[-3000:]
    )
    return json.loads(html.unescape(found.group(1)))


@pytest.fixture
def mixed_folder(tmp_path: Path) -> tuple[list[Path], Path]:
    """Real photos, an HTML-hostile name, a non-UTF-8 name (where possible) and a broken file."""
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = [Path(shutil.copy(p, folder / p.name)) for p in sorted(PHOTOS.glob("*.jpg"))]
    paths.append(Path(shutil.copy(PHOTOS / "chelsea.jpg", folder / '<b>cat<\\b> & "friends".jpg')))
    if sys.platform.startswith("linux"):
        raw = os.fsencode(folder) + b"/caf\xe9.jpg"
        try:
            shutil.copy(PHOTOS / "coffee.jpg", raw)
            paths.append(Path(os.fsdecode(raw)))
        except OSError:
            pass  # a file system that refuses such names: the rest of the test still stands
    broken = folder / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    paths.append(broken)
    return paths, broken


def make_report(paths: list[Path], destination: Path, *, ascending: bool = False) -> Ranking:
    scored = [(path, 0.05 * index) for index, path in enumerate(paths)]
    ranking = Ranking(
        items=rank_scores(scored, ascending=ascending),
        skipped=[SkippedFile(destination.parent / "empty.png", "empty file (0 bytes)")],
        prompt="a sharp, well exposed photo",
        scorer="zero-shot (tiny test model)",
        seconds=1.5,
    )
    write_report(ranking, destination, ascending=ascending)
    return ranking


def test_every_thumbnail_decodes_in_a_real_browser(
    mixed_folder: tuple[list[Path], Path], tmp_path: Path
) -> None:
    paths, broken = mixed_folder
    report = tmp_path / "ranking.html"
    ranking = make_report(paths, report)

    seen = browser_check(report, tmp_path)

    assert seen["broken"] == []
    assert seen["images"] == len(paths) - 1  # all but the broken file have a thumbnail
    assert [tile["rank"] for tile in seen["tiles"]] == list(range(1, len(paths) + 1))
    placeholders = [t for t in seen["tiles"] if t["placeholder"]]
    assert len(placeholders) == 1
    broken_rank = next(item.rank for item in ranking.items if item.path == broken)
    assert placeholders[0]["rank"] == broken_rank
    # The browser resolves each link to the original file, byte for byte.
    assert [t["href"] for t in seen["tiles"]] == [i.path.absolute().as_uri() for i in ranking.items]


def test_the_check_notices_a_broken_thumbnail(tmp_path: Path) -> None:
    # Guards the test above: a corrupted image in the page must be reported.
    photo = Path(shutil.copy(PHOTOS / "rocket.jpg", tmp_path / "rocket.jpg"))
    report = tmp_path / "ranking.html"
    make_report([photo], report)
    text = report.read_text(encoding="utf-8")
    start = text.index(";base64,") + len(";base64,")
    corrupted = (
        text[:start] + "UklGRiQAAABXRUJQVlA4IBgAAAAwAQCdASoBAAEAAQAcJaACdLoB" + text[start:][60:]
    )

    seen = browser_check(report, tmp_path, text=corrupted)

    assert seen["images"] == 1
    assert seen["broken"] == ["rocket.jpg"]


def test_screenshot_shows_the_photos(mixed_folder: tuple[list[Path], Path], tmp_path: Path) -> None:
    paths, _broken = mixed_folder
    report = tmp_path / "ranking.html"
    make_report(paths, report, ascending=True)
    shot = tmp_path / "report.png"

    result = chromium(
        ["--hide-scrollbars", "--window-size=1280,900", f"--screenshot={shot}", report.as_uri()],
        tmp_path / "profile-shot",
    )

    assert shot.is_file(), result.stderr.decode("utf-8", "replace")[-3000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 900)
        rgb = image.convert("RGB")
        # Text and flat colours give a few hundred colours; photographs give thousands.
        assert len(rgb.getcolors(maxcolors=1 << 20) or []) > 5000


@pytest.mark.slow
def test_a_5000_photo_report_loads_and_decodes(tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    sources = [p.resolve() for p in sorted(PHOTOS.glob("*.jpg"))]
    paths = []
    for index in range(5000):
        link = folder / f"{index:05d}.jpg"
        link.symlink_to(sources[index % len(sources)])
        paths.append(link)
    report = tmp_path / "ranking.html"
    make_report(paths, report)

    seen = browser_check(report, tmp_path)

    assert seen["images"] == 5000
    assert seen["broken"] == []
