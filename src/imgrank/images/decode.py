"""Finding image files and decoding them safely into model-ready pixels.

Everything that can go wrong with one file (unreadable, truncated, not an
image, a decompression bomb) raises :class:`ImageDecodeError` naming the file
and a one-line reason, so the pipeline skips it and goes on.

Preprocessing returns numpy arrays (not torch tensors) so the ONNX path can
run without torch.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from imgrank.errors import ImageDecodeError
from imgrank.images.raw import RAW_EXTENSIONS, is_raw, open_raw, raw_available

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from imgrank.images.facts import PhotoFacts
    from imgrank.models.clip.config import PreprocessConfig

#: Extensions read by Pillow out of the box (compared lower-cased).
BASE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
HEIF_EXTENSIONS = frozenset({".heic", ".heif"})

#: Refuse images above this many pixels (decompression-bomb guard). 200 MP
#: admits any camera and most stitched panoramas.
DEFAULT_MAX_PIXELS = 200_000_000

_heif_state: bool | None = None


def set_pillow_pixel_guard(max_pixels: int) -> None:
    """Make Pillow's own decompression-bomb guard refuse what ``max_pixels`` refuses, no less.

    Pillow refuses an image above twice ``PIL.Image.MAX_IMAGE_PIXELS`` (179 MP
    by default) before imgrank sees its size, so neither a 200 MP default nor a
    raised ``--max-pixels`` would hold without this. The limit is process-wide
    state: the CLI sets it from ``--max-pixels``; library code never calls this.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2  # Pillow errors above twice this


def heif_available() -> bool:
    """Register the HEIC/HEIF opener when the ``heif`` extra (pillow-heif) is installed."""
    global _heif_state
    if _heif_state is None:
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _heif_state = True
        except ImportError:
            _heif_state = False
    return _heif_state


#: Photo extensions read only with an optional extra: extension -> extra (``imgrank[extra]``).
#: Other format modules add their own rows (and a row to :data:`EXTRA_AVAILABLE`).
EXTRA_FORMATS: dict[str, str] = {extension: "heif" for extension in HEIF_EXTENSIONS}

#: Extra -> a function telling whether it is installed (and registering its reader).
EXTRA_AVAILABLE: dict[str, Callable[[], bool]] = {"heif": heif_available}


def supported_extensions() -> frozenset[str]:
    """Lower-case extensions imgrank reads on this installation."""
    readable = {ext for ext, extra in EXTRA_FORMATS.items() if EXTRA_AVAILABLE[extra]()}
    extensions = BASE_EXTENSIONS | readable
    return extensions | RAW_EXTENSIONS if raw_available() else extensions


def listed_extensions() -> frozenset[str]:
    """What a folder scan lists: the readable extensions, and RAW files in any case.

    A RAW file is listed even without the ``raw`` extra, so that it can travel with its
    JPEG twin or be reported as skipped with the hint to install the extra, rather than
    be silently ignored.
    """
    return supported_extensions() | RAW_EXTENSIONS


def missing_extra(path: Path) -> str | None:
    """The extra that would read ``path``, when it is a known photo format this
    installation cannot read; None otherwise (readable, or not a photo extension)."""
    extra = EXTRA_FORMATS.get(os.path.splitext(str(path))[1].lower())
    if extra is None or EXTRA_AVAILABLE[extra]():
        return None
    return extra


def needs_extra_reason(path: Path, extra: str) -> str:
    """The skip reason for a photo only an extra reads (the CLI shows it once per file)."""
    kind = os.path.splitext(str(path))[1].lstrip(".").upper()
    return f"{kind} photos need the {extra} extra: pip install 'imgrank[{extra}]'"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


#: Largest file imgrank reads by default (``--max-file-mb``). Decoding cost follows
#: the file, not the pixel count a header claims: a sparse 20 GB file with a JPEG
#: header kept a run busy for twenty minutes. Photos, RAW files and HEIFs are far
#: below this; a huge TIFF scan may need the option raised.
DEFAULT_MAX_FILE_MB = 2048


def find_images(
    root: Path,
    *,
    recursive: bool = True,
    include_hidden: bool = False,
    exclude: list[Path] | tuple[Path, ...] = (),
    on_skip: Callable[[Path, str], None] | None = None,
    skip_outputs: bool = True,
    on_output_folder: Callable[[Path], None] | None = None,
    max_file_mb: int | None = DEFAULT_MAX_FILE_MB,
) -> list[Path]:
    """List the image files under ``root``, sorted, as paths under ``root``.

    Symbolic links to files and folders are followed, but a folder already
    visited (same device and inode) is never entered twice, so link loops end.
    Broken links, unreadable folders and files whose extension is supported
    but that are not regular files are reported through ``on_skip``.

    Args:
        root: folder to scan (a single file is returned as is if supported).
        recursive: descend into sub-folders.
        include_hidden: also consider names starting with a dot.
        exclude: folders not to scan (e.g. a ``--link`` output inside ``root``).
        on_skip: called with ``(path, reason)`` for each file that cannot be used,
            including photos in a format only a missing extra reads (``EXTRA_FORMATS``).
        skip_outputs: do not enter sub-folders that ``--link`` / ``--copy`` wrote
            (they hold :data:`imgrank.files.output_folder.MARKER`): their copies
            are not more photos to rank.
        on_output_folder: called with each output folder so skipped.
        max_file_mb: files larger than this many MiB are skipped (None: no cap).
    """
    from imgrank.files.output_folder import is_output_folder

    extensions = listed_extensions()
    max_bytes = None if max_file_mb is None else max_file_mb * 1024 * 1024
    skip = on_skip or (lambda _path, _reason: None)
    excluded = set()
    for folder in exclude:
        try:
            info = os.stat(folder)
            excluded.add((info.st_dev, info.st_ino))
        except OSError:
            continue

    if root.is_file():
        extra = missing_extra(root)
        if extra is not None:
            skip(root, needs_extra_reason(root, extra))
        return [root] if root.suffix.lower() in extensions else []

    found: list[Path] = []
    visited: set[tuple[int, int]] = set()

    def walk(folder: Path, top: bool = False) -> None:
        if skip_outputs and not top and is_output_folder(folder):
            if on_output_folder is not None:
                on_output_folder(folder)
            return
        try:
            info = os.stat(folder)
        except OSError as exc:
            skip(folder, f"cannot open folder: {exc.strerror or exc}")
            return
        key = (info.st_dev, info.st_ino)
        if key in visited or key in excluded:
            return  # a symlink loop, a folder reached twice, or an excluded output folder
        visited.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            skip(folder, f"cannot list folder: {exc.strerror or exc}")
            return
        subfolders = []
        for entry in entries:
            if not include_hidden and _is_hidden(entry.name):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                if recursive:
                    subfolders.append(path)
                continue
            if path.suffix.lower() not in extensions:
                extra = missing_extra(path)
                if extra is not None:  # a photo, not just another file: say why it is left out
                    skip(path, needs_extra_reason(path, extra))
                continue
            try:
                info = os.stat(path)
            except FileNotFoundError:
                skip(path, "broken symbolic link (its target does not exist)")
                continue
            except OSError as exc:
                skip(path, f"cannot read: {exc.strerror or exc}")
                continue
            if not stat.S_ISREG(info.st_mode):
                skip(path, "not a regular file")
                continue
            if max_bytes is not None and info.st_size > max_bytes:
                skip(
                    path,
                    f"{info.st_size / 1024**2:,.0f} MiB, larger than --max-file-mb {max_file_mb} "
                    "(raise it to read this file)",
                )
                continue
            found.append(path)
        for sub in subfolders:
            walk(sub)

    walk(root, top=True)
    return found


#: Rows converted at once from 16-bit and float greyscale (bounds the temporaries).
_BAND_ROWS = 256


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a photo viewer shows it.

    Transparent areas are composited onto white (what viewers and browsers
    show); 16-bit and float greyscale are scaled, not clipped; CMYK and
    palette images are converted by Pillow.
    """
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Scaled in bands of rows into one uint8 array: a float64 copy of the whole
        # picture (and its temporaries) cost ~30 bytes a pixel, 600 MB for a 70 KB PNG
        # of 20 megapixels that compresses well.
        array = np.asarray(image)
        grey = np.empty(array.shape, dtype=np.uint8)
        if mode == "F":
            low, high = float(np.nanmin(array)), float(np.nanmax(array))
            scale = 255.0 / (high - low) if high > low else 0.0
        for top in range(0, array.shape[0], _BAND_ROWS):
            band = array[top : top + _BAND_ROWS]
            if mode == "F":
                scaled = np.nan_to_num((band.astype(np.float64) - low) * scale)
                grey[top : top + _BAND_ROWS] = np.clip(scaled, 0, 255)
            else:  # 0..65535 -> 0..255, exactly floor(x / 257) as before
                grey[top : top + _BAND_ROWS] = np.clip(band, 0, 65535).astype(np.int32) // 257
        del array
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(
    path: Path | str,
    *,
    min_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Open and fully decode one image as upright 8-bit RGB.

    A camera RAW file is decoded by :func:`imgrank.images.raw.open_raw` (its
    embedded preview when at least ``min_side``, else a half-size demosaic).

    Args:
        path: the file.
        min_side: when set, a JPEG may be decoded at reduced size (DCT scaling,
            Pillow's draft mode) as long as both sides stay at least this many
            pixels; pass twice the model input size so that the antialiased
            resize that follows sees practically the same pixels.
        max_pixels: refuse larger images (decompression bombs).

    Raises:
        ImageDecodeError: the file cannot be read or is not a usable image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    from imgrank.images.uri import is_uri, open_source

    if not is_uri(path) and is_raw(path):
        return open_raw(path, min_side=min_side, max_pixels=max_pixels)
    extra = missing_extra(path)
    if extra is not None:  # e.g. a HEIC photo named in a label table, without the heif extra
        raise ImageDecodeError(path, needs_extra_reason(path, extra))
    # A URI (s3://, gs://, file://...) is read through pyarrow; the decode is the same.
    readable = open_source(path) if is_uri(path) else path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(readable)
    except FileNotFoundError:
        raise ImageDecodeError(path, "file disappeared before it could be read") from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except UnidentifiedImageError:
        size = readable.getbuffer().nbytes if isinstance(readable, io.BytesIO) else _size(path)
        reason = "empty file (0 bytes)" if size == 0 else "not an image Pillow can read"
        raise ImageDecodeError(path, reason) from None
    except Image.DecompressionBombError as exc:
        # Pillow's guard fired first: say it in the same terms as imgrank's own check.
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(claimed.group(1)):,} pixels" if claimed else "the image"
        reason = f"refused as a decompression bomb: {size} is more than the limit of {max_pixels:,}"
        pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        if pillow_limit < max_pixels:
            reason += (
                f" (here Pillow's own limit, {pillow_limit:,}, is the lower one: "
                "imgrank.images.decode.set_pillow_pixel_guard raises it)"
            )
        raise ImageDecodeError(path, reason) from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read: {exc.strerror or exc}") from None

    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(
                path,
                f"{width}x{height} = {width * height:,} pixels is more than the limit of "
                f"{max_pixels:,} (a decompression-bomb guard)",
            )
        try:
            if min_side and image.format == "JPEG":
                image.draft("RGB", (min_side, min_side))
            image.load()
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated: the first frame represents the file
            upright = ImageOps.exif_transpose(image)
            return _to_rgb(upright if upright is not None else image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            message = str(exc) or type(exc).__name__
            if "truncated" in message:
                message = "truncated file (the image data ends early)"
            raise ImageDecodeError(path, f"cannot decode: {message}") from None
        except MemoryError:
            raise ImageDecodeError(path, "not enough memory to decode") from None


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


_RESAMPLE = {"bicubic": 3, "bilinear": 2}  # PIL.Image.Resampling values


def resize_for_model(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Resize (and crop, in ``crop`` mode) an RGB image to the model's square input.

    Matches torchvision's transforms on PIL images: ``squash`` is
    ``Resize((S, S))``; ``crop`` is ``Resize(S)`` on the shorter side then
    ``CenterCrop(S)``, as open_clip's default preprocessing does.
    """
    size = config.image_size
    resample = _RESAMPLE.get(config.interpolation, 3)
    if config.resize_mode == "squash":
        return image.resize((size, size), resample=resample)
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample=resample)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_normalized_array(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """(3, S, S) float32 array: pixels scaled to [0, 1] and normalised per channel."""
    import numpy as np

    array = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    array = (array - mean) / std
    return np.ascontiguousarray(array.transpose(2, 0, 1))


#: JPEGs are decoded at the smallest DCT scale whose sides are at least this
#: many times the model input. 1 would be the bare minimum, but on the parity
#: test it moved close rankings (Spearman 0.998 against a full decode, pixel
#: differences 10x larger) while saving only ~5 ms of the ~35 ms a 12 MP photo
#: costs: the entropy decoding of the whole file dominates either way.
DRAFT_COVERAGE = 2

#: Bumped whenever decoding changes the pixels the model sees (draft scale,
#: orientation, colour handling): cached features of older versions are then
#: not reused. Part of every cache fingerprint.
DECODE_VERSION = f"draft-{DRAFT_COVERAGE}x-v1"
def pixels_for_model(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An already-decoded picture as the model's (3, S, S) input (any mode, made RGB)."""
    return to_normalized_array(resize_for_model(_to_rgb(image), config), config)


def load_pixels(
    path: Path,
    config: PreprocessConfig,
    *,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode one file into the model's normalised (3, S, S) float32 input.

    This is imgrank's one decode: the feature stream's decode pool, the Ray
    engine's CPU tasks and the report all call it, so every path feeds the
    model the same pixels (and :data:`DECODE_VERSION` describes them all).

    With ``draft`` a JPEG is decoded at the smallest DCT scale (1/2, 1/4 or
    1/8) whose both sides still cover :data:`DRAFT_COVERAGE` times the model
    input, so the antialiased resize that follows only shrinks a small image.
    Without it the file is decoded at full size (the reference path).

    Raises:
        ImageDecodeError: the file cannot be used.
    """
    return load_pixels_and_facts(path, config, draft=draft, max_pixels=max_pixels, facts=False)[0]


def load_pixels_and_facts(
    path: Path,
    config: PreprocessConfig,
    *,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    facts: bool = True,
) -> tuple[np.ndarray, PhotoFacts | None]:
    """:func:`load_pixels`, plus the photo's perceptual hash and capture time from the
    same decode (``imgrank cull`` groups with them; the cache keeps them).

    Facts that cannot be computed are None: they never cost the photo its score.

    Raises:
        ImageDecodeError: the file cannot be used.
    """
    from imgrank.images.facts import photo_facts

    min_side = DRAFT_COVERAGE * config.image_size if draft else None
    image = open_image(path, min_side=min_side, max_pixels=max_pixels)
    found: PhotoFacts | None = None
    if facts:
        try:
            found = photo_facts(image)
        except Exception:  # noqa: BLE001 - no hash for this photo; it is still scored
            found = None
    return to_normalized_array(resize_for_model(image, config), config), found


def iter_supported(paths: list[Path]) -> Iterator[Path]:
    """The paths whose extension this installation reads."""
    extensions = supported_extensions()
    return (p for p in paths if p.suffix.lower() in extensions)
