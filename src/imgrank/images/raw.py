"""Camera RAW files: finding them, pairing them with their JPEG twins, decoding them.

Decoding needs the ``raw`` extra (rawpy, whose wheels bundle LibRaw). Ranking
looks at a photo at the model's input size (224 px for most models), so a RAW
is decoded the cheapest way that still gives enough pixels:

* the camera's embedded preview JPEG, when its shorter side is at least
  ``min_side`` (twice the model input) and it has the sensor image's aspect
  ratio (no letterbox bars): no demosaicing at all;
* otherwise LibRaw demosaics at half size (each 2x2 Bayer block becomes one
  pixel), with the camera's white balance.

Either way the orientation the RAW records is applied, so the photo is upright.

Pairing (:func:`pair_raw_files`) needs no extra: a RAW with a JPEG (or HEIF,
PNG, TIFF) twin of the same stem in the same folder is the same photo, so by
default it is ranked once, through the twin, and travels with it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from imgrank.errors import ImageDecodeError

if TYPE_CHECKING:
    from PIL import Image

#: RAW formats LibRaw reads (compared lower-cased). The issue's list (dng, cr2, cr3, nef,
#: arw, raf, orf, rw2, pef, srw) plus the other common makers' and older models' formats.
RAW_EXTENSIONS = frozenset(
    {
        ".dng",
        ".cr2",
        ".cr3",
        ".crw",
        ".nef",
        ".nrw",
        ".arw",
        ".srf",
        ".sr2",
        ".raf",
        ".orf",
        ".rw2",
        ".pef",
        ".srw",
        ".3fr",
        ".erf",
        ".kdc",
        ".mef",
        ".mos",
        ".mrw",
        ".rwl",
        ".iiq",
        ".x3f",
    }
)

#: What ``--raw-pairs`` accepts: rank a RAW+JPEG pair once (``pair``) or as two photos.
RAW_PAIR_MODES = ("pair", "separate")

#: The message for a RAW that cannot be read because the extra is missing.
INSTALL_HINT = "a camera RAW file; install the raw extra to rank it: pip install 'imgrank[raw]'"

#: A preview whose aspect ratio differs more than this from the sensor image's is
#: letterboxed or cropped (some cameras store a 16:9 preview of a 3:2 photo).
_ASPECT_TOLERANCE = 0.03

_raw_state: bool | None = None


def is_raw(path: Path) -> bool:
    """True for a file whose extension is a camera RAW format."""
    return path.suffix.lower() in RAW_EXTENSIONS


def raw_available() -> bool:
    """True when the ``raw`` extra (rawpy) is installed."""
    global _raw_state
    if _raw_state is None:
        try:
            import rawpy  # noqa: F401

            _raw_state = True
        except ImportError:
            _raw_state = False
    return _raw_state


@dataclass
class RawPairs:
    """The photos to rank after pairing, and which RAW belongs to which twin.

    Attributes:
        photos: The files to rank, in the order found.
        raw_of: For each twin that stands for a pair, its RAW file.
        unreadable: RAW files without a twin that this installation cannot decode.
    """

    photos: list[Path]
    raw_of: dict[Path, Path] = field(default_factory=dict)
    unreadable: list[Path] = field(default_factory=list)


#: Twin formats in order of preference when a RAW has more than one (IMG_1.JPG and IMG_1.HEIC).
_TWIN_PREFERENCE = (".jpg", ".jpeg", ".heic", ".heif", ".tif", ".tiff", ".png", ".webp")


def pair_raw_files(
    paths: Iterable[Path], *, mode: str = "pair", can_decode: bool | None = None
) -> RawPairs:
    """Group RAW files with their same-stem twins in the same folder.

    Args:
        paths: Image files as :func:`imgrank.images.decode.find_images` lists them.
        mode: ``pair`` (a RAW with a twin is ranked through the twin) or
            ``separate`` (every file is a photo of its own).
        can_decode: whether RAW files can be decoded (default: is rawpy installed).

    Returns:
        The photos to rank; RAWs with no twin (or every RAW, with ``separate``)
        are among them when they can be decoded and in ``unreadable`` otherwise.
    """
    if mode not in RAW_PAIR_MODES:
        raise ValueError(f"mode must be one of {RAW_PAIR_MODES}, not {mode!r}")
    paths = list(paths)
    if not any(os.path.splitext(path)[1].lower() in RAW_EXTENSIONS for path in paths):
        # The common case, and the only one a folder of 100,000 JPEGs should pay for: no RAW
        # file, nothing to pair (this loop costs 0.05 s there; the pairing below 2 s).
        return RawPairs(photos=paths)
    can_decode = raw_available() if can_decode is None else can_decode
    twins: dict[tuple[Path, str], list[Path]] = {}
    for path in paths:
        if not is_raw(path) and path.suffix.lower() in _TWIN_PREFERENCE:
            twins.setdefault((path.parent, path.stem), []).append(path)
    result = RawPairs(photos=[])
    paired_raws: set[Path] = set()
    if mode == "pair":
        for path in paths:
            if not is_raw(path):
                continue
            candidates = twins.get((path.parent, path.stem))
            if not candidates:
                continue
            twin = min(candidates, key=lambda p: (_TWIN_PREFERENCE.index(p.suffix.lower()), p.name))
            if twin in result.raw_of:
                continue  # IMG_1.CR2 and IMG_1.DNG: the first stays with the JPEG, the other alone
            result.raw_of[twin] = path
            paired_raws.add(path)
    for path in paths:
        if path in paired_raws:
            continue
        if is_raw(path) and not can_decode:
            result.unreadable.append(path)
            continue
        result.photos.append(path)
    return result


def _raw_error(path: Path, exc: BaseException) -> ImageDecodeError:
    """A one-line reason for a LibRaw failure."""
    import rawpy

    detail = exc.args[0] if exc.args else type(exc).__name__
    if isinstance(detail, bytes):
        detail = detail.decode("utf-8", "replace")
    if isinstance(exc, rawpy.LibRawFileUnsupportedError):
        return ImageDecodeError(path, "not a RAW format LibRaw can read (unsupported or damaged)")
    if isinstance(exc, rawpy.LibRawIOError):
        return ImageDecodeError(path, "cannot decode RAW: the file ends early (truncated)")
    if isinstance(exc, MemoryError | rawpy.LibRawTooBigError | rawpy.LibRawMemoryError):
        return ImageDecodeError(path, "not enough memory to decode the RAW data")
    return ImageDecodeError(path, f"cannot decode RAW: {detail}")


# LibRaw's flip codes -> the PIL transposition that makes the image upright.
_FLIP_TO_TRANSPOSE = {3: "ROTATE_180", 5: "ROTATE_90", 6: "ROTATE_270"}


def _upright(image: Image.Image, flip: int) -> Image.Image:
    from PIL import Image as PILImage

    name = _FLIP_TO_TRANSPOSE.get(flip)
    if name is None:
        return image
    return image.transpose(getattr(PILImage.Transpose, name))


def _preview(
    raw: object, path: Path, min_side: int, sensor_size: tuple[int, int], max_pixels: int
) -> Image.Image | None:
    """The embedded preview, upright, when it is big enough and shows the whole frame."""
    import io

    import rawpy
    from PIL import Image, ImageOps

    try:
        thumb = raw.extract_thumb()  # type: ignore[attr-defined]
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
        return None
    except rawpy.LibRawError:
        return None  # a damaged preview: the sensor data may still be fine
    if thumb.format == rawpy.ThumbFormat.JPEG:
        try:
            image = Image.open(io.BytesIO(thumb.data))
        except OSError:
            return None
    else:
        image = Image.fromarray(thumb.data)
    width, height = image.size
    if min(width, height) < min_side or width * height > max_pixels:
        return None
    sensor_w, sensor_h = sensor_size
    if (
        sensor_w
        and sensor_h
        and abs(width / height - sensor_w / sensor_h) > _ASPECT_TOLERANCE * (sensor_w / sensor_h)
    ):
        return None
    try:
        if image.format == "JPEG":
            image.draft("RGB", (min_side, min_side))
        image.load()
        # A preview that records its own orientation says it; most store the sensor's
        # orientation and leave it to the RAW's flip, which LibRaw reports.
        orientation = image.getexif().get(0x0112, 1)
        if orientation not in (None, 1):
            upright = ImageOps.exif_transpose(image)
        else:
            upright = _upright(image, raw.sizes.flip)  # type: ignore[attr-defined]
        return upright.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        return None  # the preview is damaged: demosaic the sensor data instead


def open_raw(path: Path, *, min_side: int | None, max_pixels: int) -> Image.Image:
    """Decode one RAW file as upright 8-bit RGB (see the module docstring for how).

    Args:
        path: The RAW file.
        min_side: Use the embedded preview when both its sides are at least this
            long; None always demosaics (the reference path, no shortcuts).
        max_pixels: Refuse larger sensor images (a decompression-bomb guard).

    Raises:
        ImageDecodeError: the extra is missing, or the file cannot be decoded.
    """
    if not raw_available():
        raise ImageDecodeError(path, INSTALL_HINT)
    import rawpy
    from PIL import Image

    try:
        raw = rawpy.imread(str(path))
    except FileNotFoundError:
        raise ImageDecodeError(path, "file disappeared before it could be read") from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except (rawpy.LibRawError, OSError, ValueError, MemoryError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, rawpy.LibRawError):
            raise ImageDecodeError(path, f"cannot read: {exc.strerror or exc}") from None
        raise _raw_error(path, exc) from None
    with raw:
        sizes = raw.sizes
        if sizes.width * sizes.height > max_pixels:
            raise ImageDecodeError(
                path,
                f"{sizes.width}x{sizes.height} = {sizes.width * sizes.height:,} pixels is more "
                f"than the limit of {max_pixels:,} (a decompression-bomb guard)",
            )
        if min_side:
            preview = _preview(raw, path, min_side, (sizes.width, sizes.height), max_pixels)
            if preview is not None:
                return preview
        try:
            # half_size: one pixel per 2x2 Bayer block, 4x fewer pixels and no interpolation;
            # LibRaw applies the recorded orientation itself.
            array = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
        except (rawpy.LibRawError, MemoryError, ValueError) as exc:
            raise _raw_error(path, exc) from None
    return Image.fromarray(array).convert("RGB")
