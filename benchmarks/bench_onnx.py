#!/usr/bin/env python3
"""onnxruntime vs torch for imgrank's image and text towers, measured in one run.

Exports a backbone (ViT-B-32 with random weights by default: throughput does
not depend on the weights, and no download is needed) with ``imgrank export``,
then times the same work on both runtimes in the same process, alternating
them so that load from other programs hits both alike:

* start-up: importing the runtime's packages in a fresh interpreter (what
  every ``imgrank sort`` pays before its first image);
* model load: ``load_backbone`` vs opening the ONNX folder and its sessions;
* the prompt pair through the text tower (zero-shot scoring, once per run);
* image batches through the image tower, pooled embeddings only (zero-shot)
  and with visual tokens (adapters), at several batch sizes.

It prints one table with the best time of each row on both runtimes and
their ratio (torch time / onnxruntime time: above 1 means onnxruntime is
faster). The best of several alternated runs, not the median, because on a
shared machine other programs only ever add time: the fastest run is the one
least disturbed. Both runtimes use every core (``--threads`` to change).

Usage::

    python benchmarks/bench_onnx.py [--model ViT-B-32] [--pretrained none]
        [--batch-sizes 1,8,32] [--repeats 5] [--threads N] [--export DIR]
        [--device cpu --providers cpu]

``--export DIR`` reuses (or creates) an export there instead of a temporary
folder. On an NVIDIA machine with the ``gpu`` extra, ``--device cuda
--providers cuda`` compares torch on CUDA (half precision, as ``imgrank sort``
runs it) with onnxruntime's CUDA provider (float32).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _best_alternated(
    torch_run: Callable[[], object], onnx_run: Callable[[], object], repeats: int, warmup: int = 1
) -> tuple[float, float]:
    """Best time of each, running them in turn so outside load hits both alike."""
    for _ in range(warmup):
        torch_run()
        onnx_run()
    torch_times, onnx_times = [], []
    for _ in range(repeats):
        torch_times.append(_seconds(torch_run))
        onnx_times.append(_seconds(onnx_run))
    return min(torch_times), min(onnx_times)


def _import_run(modules: str) -> Callable[[], object]:
    return lambda: subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--export", type=Path, default=None, help="export folder to reuse or create"
    )
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--providers", default="cpu", help="onnxruntime providers")
    args = parser.parse_args()

    import torch

    from imgrank.models.clip.build import load_backbone
    from imgrank.models.clip.config import BackboneSpec
    from imgrank.models.onnx_export import export_backbone
    from imgrank.models.onnx_runtime import MANIFEST_NAME, OnnxModel, zero_shot_scorer
    from imgrank.models.scoring import ZeroShotScorer

    torch.set_num_threads(args.threads)
    spec = BackboneSpec(model=args.model, pretrained=args.pretrained)
    with tempfile.TemporaryDirectory(prefix="imgrank-bench-onnx-") as scratch:
        folder = args.export or Path(scratch) / "export"
        if not (folder / MANIFEST_NAME).is_file():
            print(f"exporting {args.model} to {folder} ...", file=sys.stderr)
            started = time.perf_counter()
            export_backbone(load_backbone(spec, device="cpu"), folder)
            print(f"  export took {time.perf_counter() - started:.1f} s", file=sys.stderr)

        rows: list[tuple[str, float, float]] = []
        bare = min(_seconds(_import_run("sys")) for _ in range(args.repeats))
        torch_import, onnx_import = _best_alternated(
            _import_run("torch, open_clip"), _import_run("onnxruntime, tokenizers"), args.repeats
        )
        rows.append(("start-up: import the runtime", torch_import - bare, onnx_import - bare))

        def load_torch() -> object:
            return load_backbone(spec, device=args.device)

        def load_onnx() -> OnnxModel:
            model = OnnxModel(folder, providers=args.providers, intra_op_threads=args.threads)
            model.session("image")
            model.session("text")
            return model

        rows.append(
            ("model load (both towers)", *_best_alternated(load_torch, load_onnx, 2, warmup=0))
        )
        torch.set_num_threads(args.threads)  # load_backbone sets its own count on the CPU
        backbone = load_backbone(spec, device=args.device)
        torch.set_num_threads(args.threads)
        model = load_onnx()
        encoder = model.image_encoder()
        rows.append(
            (
                "prompt pair through the text tower",
                *_best_alternated(
                    lambda: ZeroShotScorer.for_backbone(backbone, "image quality"),
                    lambda: zero_shot_scorer(model, "image quality"),
                    args.repeats,
                ),
            )
        )
        size = backbone.preprocess.image_size
        rng = np.random.default_rng(0)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            for tokens in (False, True):
                label = f"{batch} image(s), {'pooled + tokens' if tokens else 'pooled'}"
                best = _best_alternated(
                    lambda: backbone.encode_pixels(pixels, tokens=tokens),  # noqa: B023
                    lambda: encoder.encode_pixels(pixels, tokens=tokens),  # noqa: B023
                    args.repeats,
                )
                rows.append((label, *best))

    providers = ", ".join(model.active_providers)
    print(
        f"# {args.model} ({args.pretrained}), torch {torch.__version__} on {backbone.device} "
        f"({backbone.dtype}), onnxruntime on {providers}, {args.threads} thread(s), "
        f"best of {args.repeats} alternated runs"
    )
    print()
    print("| work | torch | onnxruntime | torch / onnxruntime |")
    print("| --- | ---: | ---: | ---: |")
    for label, torch_s, onnx_s in rows:
        ratio = torch_s / onnx_s if onnx_s > 0 else float("inf")
        per_image = ""
        if "image(s)" in label:
            count = int(label.split()[0])
            per_image = f" ({count / torch_s:.1f} vs {count / onnx_s:.1f} img/s)"
        print(
            f"| {label}{per_image} | {torch_s * 1000:.0f} ms | {onnx_s * 1000:.0f} ms "
            f"| {ratio:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
