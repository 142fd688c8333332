"""Make real DNG files from real photos for tests (pidng writes the TIFF/DNG structure).

The photo is mosaicked into an RGGB Bayer pattern at 16 bits, so LibRaw has real
sensor-like data to demosaic; optionally a JPEG preview goes in IFD 0 with the raw
image in a SubIFD, the layout cameras and Adobe's converter use.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pidng.core import DNGTags, Tag
from pidng.defs import CalibrationIlluminant, CFAPattern, DNGVersion, PhotometricInterpretation
from pidng.dng import DNG, Type, dngIFD, dngTag
from PIL import Image


def _bayer(rgb: np.ndarray) -> np.ndarray:
    """RGGB mosaic of an 8-bit RGB image, scaled to 16 bits (even width and height)."""
    height, width = (rgb.shape[0] // 2) * 2, (rgb.shape[1] // 2) * 2
    # The photo's sRGB values are made linear, as a sensor records light.
    linear = (rgb[:height, :width].astype(np.float64) / 255.0) ** 2.2
    rgb = np.round(linear * 65535).astype(np.uint16)
    mosaic = np.empty((height, width), dtype=np.uint16)
    mosaic[0::2, 0::2] = rgb[0::2, 0::2, 0]
    mosaic[0::2, 1::2] = rgb[0::2, 1::2, 1]
    mosaic[1::2, 0::2] = rgb[1::2, 0::2, 1]
    mosaic[1::2, 1::2] = rgb[1::2, 1::2, 2]
    return mosaic


#: XYZ (D65) -> linear sRGB, as DNG's ColorMatrix1: the "camera" sees in sRGB primaries.
_XYZ_TO_SRGB = [
    [32406, 10000],
    [-15372, 10000],
    [-4986, 10000],
    [-9689, 10000],
    [18758, 10000],
    [415, 10000],
    [557, 10000],
    [-2040, 10000],
    [10570, 10000],
]


def _raw_tags(width: int, height: int, orientation: int) -> list[dngTag]:
    tags = DNGTags()
    tags.set(Tag.ImageWidth, width)
    tags.set(Tag.ImageLength, height)
    tags.set(Tag.TileWidth, width)
    tags.set(Tag.TileLength, height)
    tags.set(Tag.BitsPerSample, 16)
    tags.set(Tag.SamplesPerPixel, 1)
    tags.set(Tag.PhotometricInterpretation, PhotometricInterpretation.Color_Filter_Array)
    tags.set(Tag.CFARepeatPatternDim, [2, 2])
    tags.set(Tag.CFAPattern, CFAPattern.RGGB)
    tags.set(Tag.BlackLevel, 0)
    tags.set(Tag.WhiteLevel, 65535)
    tags.set(Tag.ColorMatrix1, _XYZ_TO_SRGB)
    tags.set(Tag.CalibrationIlluminant1, CalibrationIlluminant.D65)
    tags.set(Tag.AsShotNeutral, [[1, 1], [1, 1], [1, 1]])
    tags.set(Tag.Orientation, orientation)
    tags.set(Tag.Make, "imgrank")
    tags.set(Tag.Model, "test camera")
    tags.set(Tag.UniqueCameraModel, "imgrank test camera")
    return tags.list()


def make_dng(
    photo: Path,
    target: Path,
    *,
    preview_size: int | None = None,
    orientation: int = 1,
) -> Path:
    """Write ``target`` as a DNG of ``photo``.

    Args:
        preview_size: longer side of an embedded JPEG preview (None: no preview).
        orientation: the TIFF/EXIF orientation the DNG records (1 upright, 6 = 90 CW).
    """
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    mosaic = _bayer(rgb)
    height, width = mosaic.shape
    dng = DNG()
    raw_strip = mosaic.tobytes()
    raw_ifd = dngIFD()
    raw_offsets = dngTag(Tag.TileOffsets, [0])
    raw_ifd.tags += [
        raw_offsets,
        dngTag(Tag.NewSubfileType, [0]),
        dngTag(Tag.TileByteCounts, [len(raw_strip)]),
        dngTag(Tag.Compression, [1]),
    ]
    common = [
        dngTag(Tag.DNGVersion, DNGVersion.V1_4),
        dngTag(Tag.DNGBackwardVersion, DNGVersion.V1_0),
        dngTag(Tag.Software, "imgrank tests"),
    ]
    if preview_size is None:
        raw_ifd.tags += common + _raw_tags(width, height, orientation)
        dng.IFDs.append(raw_ifd)
        dng.ImageDataStrips.append(raw_strip)
        offsets = [raw_offsets]
    else:
        raw_ifd.tags += [
            t
            for t in _raw_tags(width, height, orientation)
            if t.TagId
            not in (
                Tag.Orientation[0],
                Tag.Make[0],
                Tag.Model[0],
                Tag.UniqueCameraModel[0],
                Tag.ColorMatrix1[0],
                Tag.CalibrationIlluminant1[0],
                Tag.AsShotNeutral[0],
            )
        ]
        preview = Image.fromarray(rgb)
        preview.thumbnail((preview_size, preview_size))
        buffer = io.BytesIO()
        preview.save(buffer, "JPEG", quality=90)
        jpeg = buffer.getvalue()
        main = dngIFD()
        # pidng's own SubIFD tag type does not encode; a LONG tag carrying the IFD does.
        sub_ifd = dngTag((Tag.SubIFD[0], Type.Long), [0])
        sub_ifd.subIFD = raw_ifd
        jpeg_offset = dngTag(Tag.StripOffsets, [0])
        main.tags += common + [
            dngTag(Tag.NewSubfileType, [1]),
            dngTag(Tag.ImageWidth, [preview.width]),
            dngTag(Tag.ImageLength, [preview.height]),
            dngTag(Tag.BitsPerSample, [8, 8, 8]),
            dngTag(Tag.Compression, [7]),
            dngTag(Tag.PhotometricInterpretation, [6]),
            dngTag(Tag.SamplesPerPixel, [3]),
            dngTag(Tag.RowsPerStrip, [preview.height]),
            jpeg_offset,
            dngTag(Tag.StripByteCounts, [len(jpeg)]),
            dngTag(Tag.Orientation, [orientation]),
            dngTag(Tag.Make, "imgrank"),
            dngTag(Tag.Model, "test camera"),
            dngTag(Tag.UniqueCameraModel, "imgrank test camera"),
            dngTag(Tag.ColorMatrix1, _XYZ_TO_SRGB),
            dngTag(Tag.CalibrationIlluminant1, [21]),
            dngTag(Tag.AsShotNeutral, [[1, 1], [1, 1], [1, 1]]),
            sub_ifd,
        ]
        dng.IFDs.append(main)
        dng.ImageDataStrips += [jpeg, raw_strip]
        offsets = [jpeg_offset, raw_offsets]
    total = dng.dataLen()
    for i, tag in enumerate(offsets):
        tag.setValue([dng.StripOffsets[i]])
    buf = bytearray(total)
    dng.setBuffer(buf)
    dng.write()
    target.write_bytes(bytes(buf))
    return target
