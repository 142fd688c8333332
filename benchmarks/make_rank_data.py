#!/usr/bin/env python3
"""Generate the learning-to-rank benchmarks for ``imgrank train`` / ``imgrank eval``.

Two data sets, each with a ``train.tsv`` and a held-out ``test.tsv`` label
table in the ranking-adapter authors' format (filepath, title, cname, value):

* **counting**: synthetic images holding 1 to 8 objects; the prompt asks for
  the number of objects ("Rank the numbers of circles."), the value is the
  count. Two groups (circles and squares), each with its own prompt. The
  images are made so that counting is visible in the patch tokens of a
  *small random-weight* ViT (the only backbone available offline): every
  object is a large, high-contrast blob inside its own cell of the patch grid
  on a plain light background, so "how many patches hold an object" is the
  count. Colour, size, position within the cell and background shade vary.
* **sharpness**: real photos (``../shared/photos``) cropped at random and
  blurred to six levels; the value is the sharpness level (5 = untouched,
  0 = most blurred), one group per photo. The held-out split is a photo the
  training set never saw, so a model must learn blur, not the scenes. Crops
  are saved at the tiny model's input size (64 px), so no resize softens
  the blur before the model sees it.

It also writes ``tiny-vit.json``, an open_clip config of a tiny ViT (64 px
input, 16 px patches, so a 4x4 token grid) to pass as ``--model`` with
``--pretrained none``.

Usage::

    python benchmarks/make_rank_data.py OUT_DIR [--counting-train 480] [--counting-test 160]
        [--sharpness-crops 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = REPO.parent / "shared" / "photos"

#: A tiny ViT whose 16 px patches line up with the counting images' cells.
TINY_VIT = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 96, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}

#: Objects per counting group: (group name, prompt, shape).
COUNT_GROUPS = (
    ("circle", "Rank the numbers of circles.", "circle"),
    ("square", "Rank the numbers of squares.", "square"),
)
#: Sharpness levels: Gaussian blur radius (pixels at the saved size) per value, sharpest first.
BLUR_RADII = {5: 0.0, 4: 0.6, 3: 1.2, 2: 2.0, 1: 3.0, 0: 4.5}
SHARPNESS_PROMPT = "Rank the sharpness of the photo."


def _write_table(path: Path, rows: list[tuple[Path, str, str, float]]) -> None:
    """TSV in the authors' columns, paths relative to the table's folder."""
    lines = ["filepath\ttitle\tcname\tvalue"]
    for image, prompt, group, value in rows:
        lines.append(f"{image.relative_to(path.parent).as_posix()}\t{prompt}\t{group}\t{value:g}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def counting_image(
    count: int, shape: str, rng: random.Random, *, size: int = 64, cell: int = 16
) -> Image.Image:
    """An image with ``count`` blobs of one shape, each in its own grid cell."""
    grid = size // cell
    if not 1 <= count <= grid * grid:
        raise ValueError(f"count must be 1..{grid * grid} for a {grid}x{grid} grid")
    shade = rng.randint(215, 255)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for index in rng.sample(range(grid * grid), count):
        row, col = divmod(index, grid)
        side = rng.randint(int(cell * 0.55), int(cell * 0.8))
        left = col * cell + rng.randint(1, cell - side - 1)
        top = row * cell + rng.randint(1, cell - side - 1)
        # dark, saturated colours: high contrast against the light background
        colour = tuple(
            rng.randint(0, 90) if rng.random() < 0.7 else rng.randint(0, 160) for _ in range(3)
        )
        box = (left, top, left + side - 1, top + side - 1)
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    return image


def make_counting(out: Path, *, train: int, test: int, seed: int = 0, max_count: int = 8) -> None:
    """Write ``out/train.tsv``, ``out/test.tsv`` and their images (counts spread evenly)."""
    rng = random.Random(seed)
    for split, total in (("train", train), ("test", test)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        per_group = total // len(COUNT_GROUPS)
        for group, prompt, shape in COUNT_GROUPS:
            for i in range(per_group):
                count = 1 + i % max_count
                path = folder / f"{group}_{i:04d}_n{count}.png"
                counting_image(count, shape, rng).save(path)
                rows.append((path, prompt, group, float(count)))
        rng.shuffle(rows)
        _write_table(out / f"{split}.tsv", rows)


def make_sharpness(
    out: Path,
    photos: Path,
    *,
    crops: int = 40,
    size: int = 64,
    test_photo: str = "astronaut",
    seed: int = 0,
) -> None:
    """Random crops of each photo, each saved at every blur level; one photo held out."""
    rng = random.Random(seed)
    sources = sorted(photos.glob("*.jpg"))
    if not sources:
        raise SystemExit(f"no photos in {photos}")
    if test_photo not in {p.stem for p in sources}:
        raise SystemExit(
            f"--test-photo {test_photo}: not one of {', '.join(p.stem for p in sources)}"
        )
    tables: dict[str, list[tuple[Path, str, str, float]]] = {"train": [], "test": []}
    for source in sources:
        split = "test" if source.stem == test_photo else "train"
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as handle:
            photo = handle.convert("RGB")
        width, height = photo.size
        for c in range(crops):
            side = rng.randint(min(width, height) // 3, min(width, height) // 2)
            left, top = rng.randint(0, width - side), rng.randint(0, height - side)
            crop = photo.crop((left, top, left + side, top + side)).resize(
                (size, size), Image.Resampling.LANCZOS
            )
            for value, radius in BLUR_RADII.items():
                image = crop.filter(ImageFilter.GaussianBlur(radius)) if radius else crop
                path = folder / f"{source.stem}_{c:03d}_s{value}.jpg"
                image.save(path, quality=95)
                tables[split].append((path, SHARPNESS_PROMPT, source.stem, float(value)))
    for split, rows in tables.items():
        rng.shuffle(rows)
        _write_table(out / f"{split}.tsv", rows)


def write_tiny_config(out: Path) -> Path:
    path = out / "tiny-vit.json"
    path.write_text(json.dumps(TINY_VIT, indent=2) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to create (must not exist or be empty)")
    parser.add_argument("--counting-train", type=int, default=480)
    parser.add_argument("--counting-test", type=int, default=160)
    parser.add_argument("--sharpness-crops", type=int, default=40, help="crops per photo")
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS)
    parser.add_argument("--test-photo", default="astronaut")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"{args.out} exists and is not empty; choose a new folder", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    make_counting(
        args.out / "counting", train=args.counting_train, test=args.counting_test, seed=args.seed
    )
    if args.photos.is_dir():
        make_sharpness(
            args.out / "sharpness",
            args.photos,
            crops=args.sharpness_crops,
            test_photo=args.test_photo,
            seed=args.seed,
        )
    else:
        print(f"note: {args.photos} not found, sharpness benchmark skipped", file=sys.stderr)
    config = write_tiny_config(args.out)
    print(f"wrote {args.out} (model config: {config})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
