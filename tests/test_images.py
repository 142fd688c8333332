"""Finding and decoding images: every odd kind of file a photo folder holds."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrank.errors import ImageDecodeError
from imgrank.images.decode import find_images, load_pixels, open_image, resize_for_model
from imgrank.models.clip.config import PreprocessConfig

CROP = PreprocessConfig(image_size=32, resize_mode="crop")
SQUASH = PreprocessConfig(image_size=32, resize_mode="squash", interpolation="bilinear")


def _save(path: Path, image: Image.Image, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


def _half_red_half_blue(width: int = 64, height: int = 48) -> Image.Image:
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(array)


# --- finding files -----------------------------------------------------------------------------


def test_find_images_filters_extensions_any_case_and_recurses(tmp_path: Path) -> None:
    image = _half_red_half_blue()
    for name in ("a.JPG", "b.jpeg", "c.Png", "d.webp", "e.bmp", "f.TIF", "g.tiff", "h.gif"):
        _save(tmp_path / name, image)
    (tmp_path / "notes.txt").write_text("not a photo")
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "deep.jpg", image)

    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.JPG", "b.jpeg", "c.Png", "d.webp", "e.bmp", "f.TIF", "g.tiff", "h.gif", "sub/deep.jpg"]
    flat = [p.name for p in find_images(tmp_path, recursive=False)]
    assert "deep.jpg" not in flat and len(flat) == 8


def test_hidden_files_and_folders_skipped_unless_asked(tmp_path: Path) -> None:
    image = _half_red_half_blue()
    _save(tmp_path / ".hidden.jpg", image)
    (tmp_path / ".thumbnails").mkdir()
    _save(tmp_path / ".thumbnails" / "t.jpg", image)
    _save(tmp_path / "visible.jpg", image)
    assert [p.name for p in find_images(tmp_path)] == ["visible.jpg"]
    assert len(find_images(tmp_path, include_hidden=True)) == 3


def test_symlink_loop_terminates_and_dangling_link_is_reported(tmp_path: Path) -> None:
    _save(tmp_path / "real.jpg", _half_red_half_blue())
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path, tmp_path / "sub" / "loop")  # sub/loop -> .. -> sub/loop ...
    os.symlink(tmp_path / "missing.jpg", tmp_path / "dangling.jpg")
    skipped: list[tuple[Path, str]] = []
    found = find_images(tmp_path, on_skip=lambda p, r: skipped.append((p, r)))
    assert [p.name for p in found] == ["real.jpg"]
    assert [(p.name, "broken symbolic link" in r) for p, r in skipped] == [("dangling.jpg", True)]


def test_excluded_output_folder_is_not_scanned(tmp_path: Path) -> None:
    _save(tmp_path / "a.jpg", _half_red_half_blue())
    (tmp_path / "ranked").mkdir()
    _save(tmp_path / "ranked" / "0001_a.jpg", _half_red_half_blue())
    found = find_images(tmp_path, exclude=[tmp_path / "ranked"])
    assert [p.name for p in found] == ["a.jpg"]


def test_non_utf8_file_name_is_found_and_decoded(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg"  # Latin-1 byte, invalid UTF-8
    with open(raw, "wb") as handle:
        _half_red_half_blue().save(handle, format="JPEG")
    (found,) = find_images(tmp_path)
    assert os.fsencode(found) == raw
    assert load_pixels(found, CROP).shape == (3, 32, 32)


# --- decoding -------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored landscape (64x48) with "rotate 90" in EXIF: shown (and ranked) as portrait.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "rotated.jpg", _half_red_half_blue(), exif=exif.tobytes())
    assert open_image(path).size == (48, 64)


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("CMYK", lambda: _half_red_half_blue().convert("CMYK")),
        ("L", lambda: _half_red_half_blue().convert("L")),
        ("P", lambda: _half_red_half_blue().convert("P")),
        ("RGBA", lambda: _half_red_half_blue().convert("RGBA")),
        ("LA", lambda: _half_red_half_blue().convert("LA")),
    ],
)
def test_modes_convert_to_rgb(tmp_path: Path, mode: str, make: object) -> None:
    image = make()  # type: ignore[operator]
    suffix = ".jpg" if mode in ("CMYK", "L") else ".png"
    path = _save(tmp_path / f"img{suffix}", image)
    decoded = open_image(path)
    assert decoded.mode == "RGB" and decoded.size == (64, 48)
    if mode in ("CMYK", "P", "RGBA"):
        left, right = decoded.getpixel((5, 5)), decoded.getpixel((60, 5))
        assert left[0] > 200 and left[2] < 60  # red stays red
        assert right[2] > 200 and right[0] < 60  # blue stays blue


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    path = _save(tmp_path / "clear.png", image)
    assert open_image(path).getpixel((3, 3)) == (255, 255, 255)


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    array = np.full((20, 20), 32768, dtype=np.uint16)  # mid grey in 16 bits
    path = _save(tmp_path / "deep.png", Image.fromarray(array))
    value = open_image(path).getpixel((5, 5))
    assert 120 <= value[0] <= 135, value  # clipping would give 255


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (20, 20), color) for color in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    red, green, _ = open_image(path).getpixel((10, 10))
    assert red > 200 and green < 60


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def _png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims a huge image: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is a text file, not a JPEG\n" * 4, "not an image"),
        ("bomb.png", _png_header_claiming(60_000, 60_000), "decompression bomb"),
    ],
)
def test_broken_files_raise_a_named_reason(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as info:
        load_pixels(path, CROP)
    assert reason in info.value.reason
    assert name in str(info.value)


def test_truncated_jpeg_is_reported(tmp_path: Path) -> None:
    full = tmp_path / "full.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(full, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_pixels(cut, CROP)


def test_pixel_cap_is_configurable(tmp_path: Path) -> None:
    path = _save(tmp_path / "big.png", Image.new("RGB", (100, 100)))
    with pytest.raises(ImageDecodeError, match="limit"):
        load_pixels(path, CROP, max_pixels=5_000)


# --- preprocessing --------------------------------------------------------------------------


def test_squash_and_crop_resize_modes() -> None:
    wide = _half_red_half_blue(200, 100)
    squashed = resize_for_model(wide, SQUASH)
    cropped = resize_for_model(wide, CROP)
    assert squashed.size == cropped.size == (32, 32)
    # Squash keeps both halves side by side; a centre crop of a 2:1 image keeps both too,
    # but only the middle: its leftmost column is red only because the crop starts at 1/4.
    assert squashed.getpixel((0, 16))[0] > 200 and squashed.getpixel((31, 16))[2] > 200
    assert cropped.getpixel((0, 16))[0] > 200 and cropped.getpixel((31, 16))[2] > 200


def test_load_pixels_is_normalised_like_torchvision(tmp_path: Path) -> None:
    torchvision_transforms = pytest.importorskip("torchvision.transforms")
    path = tmp_path / "photo.png"
    noise = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    config = PreprocessConfig(image_size=32, resize_mode="squash", interpolation="bilinear")
    reference = torchvision_transforms.Compose(
        [
            torchvision_transforms.Resize((32, 32)),
            torchvision_transforms.ToTensor(),
            torchvision_transforms.Normalize(config.mean, config.std),
        ]
    )(Image.open(path).convert("RGB"))
    ours = load_pixels(path, config, draft=False)
    assert np.abs(ours - reference.numpy()).max() < 1e-5


def test_heic_is_read_when_the_heif_extra_is_installed(tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif", reason="the heif extra (pillow-heif) is not installed")
    pillow_heif.register_heif_opener()
    _save(tmp_path / "phone.HEIC", _half_red_half_blue())
    (found,) = find_images(tmp_path)
    assert found.name == "phone.HEIC"
    assert load_pixels(found, CROP).shape == (3, 32, 32)


def test_sixteen_bit_greyscale_is_converted_without_a_float_copy_of_the_picture() -> None:
    """Issue 17 item 14: a 70 KB 16-bit PNG cost ~600 MB (~30 bytes a pixel) to decode."""
    import tracemalloc

    from PIL import Image

    from imgrank.images.decode import _to_rgb

    width, height = 4000, 3000
    values = (np.arange(width * height, dtype=np.uint32) % 65536).astype(np.uint16)
    image = Image.frombytes("I;16", (width, height), values.tobytes())
    image.load()
    tracemalloc.start()
    try:
        rgb = _to_rgb(image)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The 16-bit pixels once (2 bytes), their 8-bit result (1 byte), bands of rows: about 4
    # bytes a pixel here; the float64 conversion took 17.
    assert peak / (width * height) < 6, f"{peak / (width * height):.1f} bytes a pixel"
    grey = np.asarray(rgb)[..., 0].ravel()
    np.testing.assert_array_equal(grey, (values.astype(np.float64) / 257.0).astype(np.uint8))


# --- photos only an extra reads (issue 16, item 6) -------------------------------------------


def test_photos_only_a_missing_extra_reads_are_listed_as_skipped_with_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from imgrank.cli import app
    from imgrank.images import decode

    monkeypatch.setitem(decode.EXTRA_AVAILABLE, "heif", lambda: False)  # as without pillow-heif
    # The table is what other formats extend: a made-up one behaves the same.
    monkeypatch.setitem(decode.EXTRA_FORMATS, ".xyz", "madeup")
    monkeypatch.setitem(decode.EXTRA_AVAILABLE, "madeup", lambda: False)
    folder = tmp_path / "phone"
    folder.mkdir()
    for name in ("IMG_0001.HEIC", "IMG_0002.heif", "scan.xyz", "notes.txt"):
        (folder / name).write_bytes(b"\0" * 64)
    skipped: list[tuple[str, str]] = []
    assert decode.find_images(folder, on_skip=lambda p, r: skipped.append((p.name, r))) == []
    assert skipped == [
        ("IMG_0001.HEIC", "HEIC photos need the heif extra: pip install 'imgrank[heif]'"),
        ("IMG_0002.heif", "HEIF photos need the heif extra: pip install 'imgrank[heif]'"),
        ("scan.xyz", "XYZ photos need the madeup extra: pip install 'imgrank[madeup]'"),
    ]  # each once, and notes.txt (not a photo format) not at all
    result = CliRunner().invoke(app, ["sort", str(folder), "--by", "x", "--errors", str(tmp_path / "e.csv")])
    assert result.exit_code == 3
    message = " ".join(result.stderr.split())
    assert message.count("IMG_0001.HEIC") == 1
    assert "To read them: pip install 'imgrank[heif]' 'imgrank[madeup]'" in message
    assert len((tmp_path / "e.csv").read_text().splitlines()) == 4  # header + 3 photos
    with pytest.raises(ImageDecodeError, match=r"imgrank\[heif\]"):
        load_pixels(folder / "IMG_0001.HEIC", CROP)
