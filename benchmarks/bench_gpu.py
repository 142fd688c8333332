"""Benchmark the GPU path of ``imgrank sort``: photos/s cold, against the plain loop and decoding.

    python benchmarks/bench_gpu.py                       # CUDA: ViT-B-32 and ViT-L-14, 128 photos
    python benchmarks/bench_gpu.py --device cpu --photos 4 --size 640x480 --models tests/data/tiny-clip.json

For each model, in the same run and alternating the order between rounds:

(a) **decode only**: the feature stream's decoding as ``imgrank sort`` runs it
    on that device (JPEG bytes read by the decode threads, decoded in batches by
    ``torchvision.io.decode_jpeg`` on the device, resized and normalised there),
    with no model: the rate the model can at best be fed at;
(b) **plain loop**: ``benchmarks/plain_loop.py`` on the device (open, open_clip's
    preprocess on the CPU, batches of 32, float32 ``encode_image``);
(c) **imgrank cold**: ``imgrank sort --device DEVICE`` with an empty cache
    (``--precision auto``: half precision on CUDA).

Weights are random (speed does not depend on their values), saved once to a
file that every side loads. Inputs are the grainy 12 MP JPEGs of
``bench_sort.py`` (made once into ``benchmarks/out/``). The whole command is
sized to finish in under 5 minutes on one GPU with 16 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_sort import Run, fresh, imgrank_command, machine, make_inputs, run  # noqa: E402

PROMPT = "image quality"


def make_weights(model: str, path: Path) -> Path:
    """Random weights for ``model`` (a name or a config JSON) saved as safetensors once."""
    if not path.exists():
        code = (
            "import sys, json, open_clip, torch; from pathlib import Path; "
            "from safetensors.torch import save_file; torch.manual_seed(0); name = sys.argv[2]\n"
            "if name.endswith('.json'):\n"
            "    open_clip.add_model_config(name); name = Path(name).stem\n"
            "m = open_clip.create_model(name, pretrained=None)\n"
            "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[1])"
        )
        partial = path.with_suffix(".partial")
        subprocess.run([sys.executable, "-c", code, str(partial), model], check=True)
        partial.rename(path)
    return path


def decode_only(folder: Path, model: str, device: str, batch_size: int) -> float:
    """Seconds to decode every photo of ``folder`` for ``model`` on ``device`` (no model run)."""
    import torch

    from imgrank.features.stream import decode_batches
    from imgrank.images.decode import find_images
    from imgrank.models.clip.config import BackboneSpec, default_preprocess, resolve_model_config

    _name, config = resolve_model_config(BackboneSpec(model=model, pretrained="none"))
    preprocess = default_preprocess(config)
    paths = find_images(folder)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32  # as --precision auto
    started = time.perf_counter()
    count = 0
    for batch in decode_batches(
        paths, preprocess, batch_size=batch_size, device=device, dtype=dtype
    ):
        count += len(batch.paths)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if count != len(paths):
        raise SystemExit(f"decoded {count} of {len(paths)} photos")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--photos", type=int, default=128)
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the photos")
    parser.add_argument("--models", default="ViT-B-32,ViT-L-14", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=HERE / "out")
    args = parser.parse_args()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        raise SystemExit(
            "no CUDA device here; pass --device cpu to exercise the same path on the CPU"
        )
    width, height = (int(v) for v in args.size.lower().split("x"))
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "IMGRANK_HOME": str(work / "home-gpu")}
    photos = make_inputs(
        work / f"gpu-photos-{args.photos}-{width}x{height}", args.photos, 0, (width, height)
    )
    folder = photos[0].parent
    out = work / "gpu-ranking.csv"
    load_before = os.getloadavg()[0]
    rows = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        tag = Path(model).stem if model.endswith(".json") else model
        weights = make_weights(model, work / f"{tag}-random.safetensors")
        cache = work / f"gpu-cache-{tag}.sqlite3"
        sort = [
            *imgrank_command(), "sort", str(folder), "--by", PROMPT, "--model", model,
            "--pretrained", str(weights), "--device", device, "--batch-size", str(args.batch_size),
            "--output", str(out), "--force", "--quiet",
        ]  # fmt: skip
        plain = [sys.executable, str(HERE / "plain_loop.py"), str(folder), PROMPT, str(out),
                 str(weights), model, device]  # fmt: skip
        results: dict[str, list[float]] = {"decode only": [], "plain loop": [], "imgrank cold": []}
        rss: list[Run] = []
        for round_index in range(args.rounds):
            order = list(results) if round_index % 2 == 0 else list(reversed(results))
            for kind in order:
                if kind == "decode only":
                    seconds = decode_only(folder, model, device, args.batch_size)
                elif kind == "plain loop":
                    seconds = run(plain, env).seconds
                else:
                    result = run([*sort, "--cache", str(fresh(cache))], env)
                    seconds = result.seconds
                    rss.append(result)
                results[kind].append(seconds)
                print(
                    f"  {tag} round {round_index + 1} {kind:12s} {seconds:6.1f} s", file=sys.stderr
                )
        medians = {kind: statistics.median(values) for kind, values in results.items()}
        rows.append((tag, medians, statistics.median(r.peak_rss_mb for r in rss)))

    print()
    print(
        f"machine: {machine()}; device: {device}"
        + (f" ({torch.cuda.get_device_name(0)})" if device.startswith("cuda") else "")
    )
    print(f"load average (1 min) before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    print(f"inputs: {len(photos)} JPEGs {width}x{height}; random weights from a file; "
          f"{args.rounds} alternating round(s), medians")  # fmt: skip
    print()
    print(
        "| model | decode only photos/s | plain loop photos/s | imgrank cold photos/s "
        "| imgrank vs plain | imgrank vs decode-only | peak RSS MB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    n = len(photos)
    for tag, m, peak in rows:
        print(
            f"| {tag} | {n / m['decode only']:.1f} | {n / m['plain loop']:.1f} | "
            f"{n / m['imgrank cold']:.1f} | {m['plain loop'] / m['imgrank cold']:.2f}x | "
            f"{m['decode only'] / m['imgrank cold']:.2f} | {peak:.0f} |"
        )


if __name__ == "__main__":
    main()
