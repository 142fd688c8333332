"""Decoding JPEGs on the model's device, in batches: the GPU path of the feature stream.

On a CUDA machine the CPU becomes the bottleneck: a 12 MP JPEG costs about
35 ms of CPU even with DCT scaling, while the GPU runs ViT-B-32 on hundreds of
images a second. So when the image tower runs on CUDA the decode threads only
read the files' bytes, and :func:`device_batch` decodes each batch with
``torchvision.io.decode_jpeg(..., device="cuda")`` (nvJPEG), then resizes,
crops and normalises on the GPU. Whatever nvJPEG cannot take (other formats,
CMYK or oversized JPEGs, a decode failure) is decoded by the CPU path
(:func:`imgrank.images.decode.load_pixels`) and copied from pinned
memory without blocking.

The functions take the device as an argument, so the tests run this very code
with ``device="cpu"`` (torchvision decodes on the CPU then).

torch and torchvision are imported inside functions: only a run that decodes
on a device pays for them.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgrank.errors import ImageDecodeError

if TYPE_CHECKING:
    import torch

    from imgrank.models.clip.config import PreprocessConfig

JPEG_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})


@dataclass
class Prepared:
    """One file made ready by a decode thread: JPEG bytes for the device, or CPU pixels."""

    path: Path
    jpeg: bytes | None = None
    pixels: np.ndarray | None = None


def jpeg_bytes_for_device(path: Path, max_pixels: int) -> bytes | None:
    """The file's bytes when the device decoder can take it, else None (decode on the CPU).

    Only baseline colour or grey JPEGs within the pixel cap qualify: CMYK and
    YCCK files, and anything that needs the CPU path's checks (decompression
    bombs, broken headers), go to the CPU path, which reports problems by name.
    """
    from PIL import Image

    if path.suffix.lower() not in JPEG_SUFFIXES:
        return None
    try:
        data = path.read_bytes()
        if not data.startswith(b"\xff\xd8"):
            return None
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
            if image.mode not in ("RGB", "L") or width * height > max_pixels:
                return None
    except Exception:  # noqa: BLE001 - the CPU path reads it again and words the error
        return None
    return data


def prepare_for_device(
    path: Path, cpu_decode: Callable[[Path], np.ndarray], max_pixels: int
) -> Prepared:
    """Run in a decode thread: read a JPEG's bytes, or decode anything else on the CPU.

    Raises:
        ImageDecodeError: a file the CPU path cannot use either.
    """
    data = jpeg_bytes_for_device(path, max_pixels)
    if data is not None:
        return Prepared(path, jpeg=data)
    return Prepared(path, pixels=cpu_decode(path))


def device_batch(
    items: list[Prepared],
    preprocess: PreprocessConfig,
    *,
    device: str,
    dtype: Any,
    cpu_decode: Callable[[Path], np.ndarray],
) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Decode a batch on ``device``: ``(pixels (N, 3, S, S), kept positions, failures)``.

    JPEG bytes are decoded together in one ``decode_jpeg`` call; if the batch
    call fails, each file is tried alone on the device and then on the CPU.
    ``failures`` lists ``(position, reason)`` of files no path could decode.
    """
    import torch

    decoded: dict[int, torch.Tensor] = {}
    failures: list[tuple[int, str]] = []
    jpegs = [i for i, item in enumerate(items) if item.jpeg is not None]
    if jpegs:
        images = _decode_jpegs([items[i].jpeg for i in jpegs], device)  # type: ignore[misc]
        for position, image in zip(jpegs, images, strict=True):
            if image is None:  # the device could not decode it: the CPU path decides
                try:
                    pixels = cpu_decode(items[position].path)
                except ImageDecodeError as exc:
                    failures.append((position, exc.reason))
                    continue
                decoded[position] = _to_device(pixels, device, dtype)
            else:
                decoded[position] = _resize_normalize(image, preprocess, dtype)
    for position, item in enumerate(items):
        if item.pixels is not None:
            decoded[position] = _to_device(item.pixels, device, dtype)
    kept = sorted(decoded)
    if not kept:
        size = preprocess.image_size
        return torch.empty((0, 3, size, size), device=device, dtype=dtype), [], failures
    return torch.stack([decoded[i] for i in kept]), kept, failures


def _decode_jpegs(blobs: list[bytes], device: str) -> list[Any]:
    """uint8 (3, H, W) images on ``device``, None where one could not be decoded."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    def tensor(blob: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8)

    mode = ImageReadMode.RGB
    try:
        return list(
            decode_jpeg(
                [tensor(b) for b in blobs], mode=mode, device=device, apply_exif_orientation=True
            )
        )
    except Exception:  # noqa: BLE001 - one bad file fails the whole batch call: go one by one
        pass
    out: list[Any] = []
    for blob in blobs:
        try:
            out.append(
                decode_jpeg(tensor(blob), mode=mode, device=device, apply_exif_orientation=True)
            )
        except Exception:  # noqa: BLE001 - left to the CPU path
            out.append(None)
    return out


def _to_device(pixels: np.ndarray, device: str, dtype: Any) -> torch.Tensor:
    """CPU-decoded pixels onto the device: from pinned memory, without blocking, on CUDA."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(pixels))
    if device.startswith("cuda"):
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True).to(dtype)


def _resize_normalize(
    image: torch.Tensor, preprocess: PreprocessConfig, dtype: Any
) -> torch.Tensor:
    """A uint8 (3, H, W) image as the model's normalised (3, S, S) input, on its device.

    The same geometry as :func:`imgrank.images.decode.resize_for_model`
    (``squash``: to S x S; ``crop``: shorter side to S, then the centre),
    antialiased like Pillow's resize.
    """
    import torch
    import torch.nn.functional as F

    size = preprocess.image_size
    _channels, height, width = image.shape
    if preprocess.resize_mode == "squash":
        new_h, new_w = size, size
    elif width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    pixels = image[None].float()
    if (new_h, new_w) != (height, width):
        mode = "bilinear" if preprocess.interpolation == "bilinear" else "bicubic"
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode=mode, antialias=True)
        pixels = pixels.clamp_(0, 255).round_()  # Pillow's result is 8-bit
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    pixels = pixels[0, :, top : top + size, left : left + size] / 255.0
    mean = torch.tensor(preprocess.mean, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(preprocess.std, device=pixels.device).view(3, 1, 1)
    return ((pixels - mean) / std).to(dtype)
