"""What culling needs to know about a photo besides its embedding: a perceptual hash and
when it was taken.

Both come from the image the pipeline decodes for the model anyway (one decode per
photo), and both are stored in the embedding cache next to the features, so culling a
folder that was sorted before opens no photo at all.

* The hash is ``imagehash.phash``: the signs of the 8x8 lowest frequencies of a 32x32
  grey thumbnail's DCT, 64 bits. Frames of one burst (a small shift, a crop of a few
  per cent, another exposure, some blur) differ in a handful of bits, different scenes
  in about half of them (measured in ``benchmarks/bench_cull.py``). It needs no model,
  so it separates bursts even when the embedding cannot (random weights, a head).
* The capture time is EXIF ``DateTimeOriginal`` with ``SubSecTimeOriginal`` (bursts
  are several frames per second, and whole seconds would tie them) and
  ``OffsetTimeOriginal`` (or ``OffsetTime``) where the camera wrote one. Nothing else
  is trusted: ``DateTime`` is rewritten by editors and the file's mtime by copies.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

#: Changes whenever the hash or the time reading changes meaning: stored facts of another
#: version are not reused.
FACTS_VERSION = "phash8-v1"

#: Side (pixels) the image is box-reduced to before hashing; phash's own 32x32 resize
#: from a full-size decode costs several milliseconds and changes no bit that matters.
_HASH_INPUT_SIDE = 128

_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 36867
_OFFSET_TIME = 36880
_OFFSET_TIME_ORIGINAL = 36881
_SUBSEC_TIME_ORIGINAL = 37521

_DATETIME = re.compile(r"^\s*(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"^\s*([+-])(\d{2}):?(\d{2})\s*$")


@dataclass(frozen=True)
class CaptureTime:
    """When a photo was taken.

    Attributes:
        local: the camera clock's reading as seconds since 1970-01-01 00:00 of that
            clock (the zone is unknown unless ``offset_minutes`` is set).
        offset_minutes: the camera's offset from UTC, when it wrote one.
    """

    local: float
    offset_minutes: int | None = None

    @property
    def utc(self) -> float | None:
        """Seconds since the Unix epoch, when the offset is known."""
        if self.offset_minutes is None:
            return None
        return self.local - 60.0 * self.offset_minutes


@dataclass(frozen=True)
class PhotoFacts:
    """The perceptual hash (64 bits, as an unsigned int) and the capture time, if any."""

    phash: int
    captured: CaptureTime | None = None


def perceptual_hash(image: Image.Image) -> int:
    """``imagehash.phash`` of an upright RGB image as a 64-bit unsigned integer."""
    import imagehash

    factor = min(image.size) // _HASH_INPUT_SIDE
    small = image.reduce(factor) if factor > 1 else image
    bits = imagehash.phash(small).hash.reshape(-1)
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def capture_time(image: Image.Image) -> CaptureTime | None:
    """The EXIF capture time of an opened image, or None when it has none (or a bad one)."""
    try:
        exif = image.getexif()
        tags = exif.get_ifd(_EXIF_IFD)
    except Exception:  # noqa: BLE001 - a damaged EXIF block only costs the capture time
        return None
    return parse_capture_time(
        tags.get(_DATETIME_ORIGINAL),
        tags.get(_SUBSEC_TIME_ORIGINAL),
        tags.get(_OFFSET_TIME_ORIGINAL) or tags.get(_OFFSET_TIME),
    )


def parse_capture_time(
    datetime_original: object, subsec: object = None, offset: object = None
) -> CaptureTime | None:
    """Parse the three EXIF strings; None when the date is missing or not a real date.

    Cameras without a set clock write ``0000:00:00 00:00:00`` or blanks: no time.
    """
    match = _DATETIME.match(_text(datetime_original))
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups())
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        return None
    if year < 1900:
        return None
    try:
        local = float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))
    except (OverflowError, ValueError):
        return None
    digits = "".join(ch for ch in _text(subsec) if ch.isdigit())
    if digits:
        local += int(digits) / 10 ** len(digits)
    offset_minutes = None
    found = _OFFSET.match(_text(offset))
    if found is not None:
        sign = -1 if found.group(1) == "-" else 1
        hours, minutes = int(found.group(2)), int(found.group(3))
        if hours <= 14 and minutes < 60:
            offset_minutes = sign * (60 * hours + minutes)
    return CaptureTime(local, offset_minutes)


def photo_facts(image: Image.Image) -> PhotoFacts:
    """Hash and capture time of an image decoded by :func:`imgrank.images.decode.open_image`.

    ``open_image`` keeps the EXIF block of the file on the upright image it returns, so
    the facts come from the decode the model input is made from.
    """
    return PhotoFacts(perceptual_hash(image), capture_time(image))


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value).strip("\x00 ")
