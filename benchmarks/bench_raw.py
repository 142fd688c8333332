#!/usr/bin/env python3
"""Decoding camera RAW files for ranking: embedded preview vs half-size demosaic, one run.

Makes a 24 MP DNG (6000x4000, 16-bit RGGB, like a current APS-C camera) from one of
the test photos, once with a 1620x1080 embedded preview JPEG (the size Canon and Sony
cameras embed) and once without, and times ``imgrank.images.decode.open_image`` on
both as ``imgrank sort`` calls it for ViT-B-32 (``min_side`` = twice the 224 px input):

* ``preview``: the DNG with a preview, decoded from the preview (no demosaicing);
* ``demosaic``: the DNG without one, demosaiced by LibRaw at half size (the baseline);
* ``jpeg 24 MP``: the same picture as a 6000x4000 JPEG through Pillow's draft mode,
  for comparison with what a JPEG shoot costs.

The rows alternate, and each row's best time over ``--repeats`` runs is printed with
its speed-up over the baseline (baseline time / row time): on a shared machine other
programs only ever add time, so the fastest run is the least disturbed one.

Usage::

    python benchmarks/bench_raw.py [--repeats 5] [--photo tests/data/photos/rocket.jpg]

Needs the ``raw`` extra and pidng (the tests' DNG writer).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--photo", type=Path, default=ROOT / "tests/data/photos/rocket.jpg")
    args = parser.parse_args()

    from dngmaker import make_dng
    from PIL import Image

    from imgrank.images.decode import open_image

    min_side = 2 * 224
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        big = base / "big.jpg"
        Image.open(args.photo).convert("RGB").resize((6000, 4000), Image.BICUBIC).save(big, quality=92)
        started = time.perf_counter()
        with_preview = make_dng(big, base / "preview.dng", preview_size=1620)
        without = make_dng(big, base / "plain.dng")
        print(f"made two 6000x4000 DNGs ({without.stat().st_size / 1e6:.0f} MB each) "
              f"in {time.perf_counter() - started:.1f} s")
        rows = {"demosaic": without, "preview": with_preview, "jpeg 24 MP": big}
        best = {name: float("inf") for name in rows}
        sizes = {}
        for _ in range(args.repeats):
            for name, path in rows.items():
                started = time.perf_counter()
                image = open_image(path, min_side=min_side)
                best[name] = min(best[name], time.perf_counter() - started)
                sizes[name] = image.size
        baseline = best["demosaic"]
        print(f"{'path':<12} {'best s':>8} {'speed-up':>9}  decoded size")
        for name in rows:
            print(f"{name:<12} {best[name]:>8.3f} {baseline / best[name]:>8.1f}x  "
                  f"{sizes[name][0]}x{sizes[name][1]}")


if __name__ == "__main__":
    main()
