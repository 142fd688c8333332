"""Benchmark ``imgrank sort`` against the plain open_clip loop, in one run, alternating.

    python benchmarks/bench_sort.py                 # 96 photos of 12 MP, 3 rounds
    python benchmarks/bench_sort.py --photos 48 --rounds 1 --no-profile   # quicker

What it measures (every figure in the same run, on the same inputs):

(a) ``imgrank sort`` cold (empty cache) against ``plain_loop.py``, the loop a
    user writes by hand (open, open_clip's preprocess, batch, encode_image,
    cosine, sort, CSV), both ViT-B-32 with random weights on the CPU;
(b) a warm re-sort by a NEW prompt against the cold sort;
(c) peak RSS of cold sorts at two folder sizes (it must not grow with N);
(d) the cache's size per photo;
and, unless ``--no-profile``, where the time of a cold and a warm sort goes.

Each round runs plain, cold, warm (alternating the order between rounds so
that a drift in machine load does not favour one side); the table shows
medians. Inputs are generated once into ``benchmarks/out/`` (git-ignored):
photo-sized JPEGs (4000x3000 = 12 MP, quality 92) made from the real photos in
``../shared/photos`` (or tests/data/photos), cropped, mirrored and exposed
differently, upscaled, with sensor-like grain so that decoding costs what a
camera file costs (a smooth upscale decodes several times faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SOURCES = [REPO.parent / "shared" / "photos", REPO / "tests" / "data" / "photos"]
WIDTH, HEIGHT, QUALITY = 4000, 3000, 92
PROMPT_COLD = "image quality"
PROMPT_WARM = "a sharp photo of a person"  # a new prompt: nothing of the cold run's text is reused

# ----------------------------------------------------------------------------- inputs

_GRAIN = None


def _grain_field(seed: int, width: int = WIDTH, height: int = HEIGHT):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (height + 64, width + 64)
    # Luminance grain (sigma 5) plus weaker colour noise (sigma 2.5), as a camera at ISO ~800.
    luminance = rng.normal(0, 5, (*shape, 1)).astype(np.float32)
    chroma = rng.normal(0, 2.5, (*shape, 3)).astype(np.float32)
    return np.clip(luminance + chroma, -127, 127).astype(np.int8)


def _make_one(job: tuple[int, str, str, int, int, int]) -> int:
    import numpy as np
    from PIL import Image, ImageEnhance, ImageOps

    global _GRAIN
    index, source, target, seed, width, height = job
    if _GRAIN is None or _GRAIN.shape[:2] != (height + 64, width + 64):
        _GRAIN = _grain_field(seed, width, height)
    rng = np.random.default_rng(seed * 100_003 + index)
    image = Image.open(source).convert("RGB")
    if index % 2:
        image = ImageOps.mirror(image)
    w, h = image.size
    keep = rng.uniform(0.7, 1.0)  # a random crop keeping 70-100 % of each side
    cw, ch = int(w * keep), int(h * keep)
    left, top = int(rng.uniform(0, w - cw)), int(rng.uniform(0, h - ch))
    image = image.crop((left, top, left + cw, top + ch))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16)
    dy, dx = rng.integers(0, 64, 2)
    pixels = pixels + _GRAIN[dy : dy + height, dx : dx + width]
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    out.save(target, quality=QUALITY)  # 4:2:0 chroma subsampling, as cameras write
    return Path(target).stat().st_size


def make_inputs(
    folder: Path, count: int, seed: int = 0, size: tuple[int, int] = (WIDTH, HEIGHT)
) -> list[Path]:
    """``count`` grainy JPEGs (12 MP unless ``size``) in ``folder``, reused when already there."""
    sources = next((sorted(d.glob("*.jpg")) for d in SOURCES if d.is_dir()), [])
    if not sources:
        raise SystemExit(f"no source photos in {' or '.join(map(str, SOURCES))}")
    spec = {"count": count, "size": list(size), "quality": QUALITY, "seed": seed, "v": 1}
    marker = folder / "inputs.json"
    paths = [folder / f"photo-{i:04d}.jpg" for i in range(count)]
    if (
        marker.exists()
        and json.loads(marker.read_text()) == spec
        and all(p.exists() for p in paths)
    ):
        return paths
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    jobs = [
        (i, str(sources[i % len(sources)]), str(p), seed, *size) for i, p in enumerate(paths)
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        list(pool.map(_make_one, jobs, chunksize=4))
    marker.write_text(json.dumps(spec))
    print(f"  generated {count} photos in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return paths


def subset(paths: list[Path], folder: Path) -> Path:
    """A folder holding hard links to ``paths`` (a smaller folder of the same photos)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in paths:
        try:
            os.link(path, folder / path.name)
        except OSError:
            shutil.copy(path, folder / path.name)
    return folder


# ------------------------------------------------------------------------------ runs


@dataclass
class Run:
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float


def run(command: list[str], env: dict[str, str]) -> Run:
    """Run a command to completion; wall time, CPU time and peak RSS of that process tree's root."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{err}")
    rss_kb = usage.ru_maxrss  # kilobytes on Linux
    return Run(seconds, usage.ru_utime + usage.ru_stime, rss_kb / 1024)


def imgrank_command() -> list[str]:
    script = Path(sys.executable).parent / "imgrank"
    return (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from imgrank.cli import main; main()"]
    )


def sort_command(
    folder: Path, prompt: str, cache: Path, out: Path, onnx: Path | None = None
) -> list[str]:
    if onnx is None:
        model = ["--model", "ViT-B-32", "--pretrained", WEIGHTS, "--device", "cpu"]
    else:  # the export brings its model; onnxruntime picks the CPU here
        model = ["--runtime", "onnx", "--onnx", str(onnx)]
    return [
        *imgrank_command(), "sort", str(folder), "--by", prompt, *model,
        "--cache", str(cache), "--output", str(out), "--force", "--quiet",
    ]  # fmt: skip


def plain_command(folder: Path, prompt: str, out: Path) -> list[str]:
    return [sys.executable, str(HERE / "plain_loop.py"), str(folder), prompt, str(out), WEIGHTS]


#: The weights every timed run loads: a file of random ViT-B-32 weights made once
#: (see :func:`make_weights`), or "none" with --random-init. Set in main().
WEIGHTS = "none"


def make_weights(path: Path) -> Path:
    """Random ViT-B-32 weights saved once as safetensors (not timed).

    Users load real weights from a file, which costs a memory map, not the
    seconds of random initialisation that ``--pretrained none`` spends; timing
    runs that load a file measures what users see.
    """
    if not path.exists():
        code = (
            "import sys, open_clip, torch; from safetensors.torch import save_file; "
            "torch.manual_seed(0); m = open_clip.create_model('ViT-B-32', pretrained=None); "
            "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, sys.argv[1])"
        )
        partial = path.with_suffix(".partial")
        subprocess.run([sys.executable, "-c", code, str(partial)], check=True)
        partial.rename(path)
    return path


def fresh(path: Path) -> Path:
    for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        candidate.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- profile


def profile_child(folder: str, cache: str, prompt: str) -> None:
    """One sort in this process, timing each phase; prints JSON (run by the parent)."""
    phases: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = now - mark
        mark = now

    import torch  # noqa: F401

    lap("import torch")
    from imgrank.features.cache import open_cache
    from imgrank.features.pipeline import PipelineStats, score_images
    from imgrank.images.decode import find_images
    from imgrank.models.clip.build import image_tower_built
    from imgrank.models.loading import load_model
    from imgrank.models.selection import ModelSelection
    from imgrank.ranking import rank_scores

    paths = find_images(Path(folder))
    lap("import imgrank, scan folder")
    selection = ModelSelection(
        model="ViT-B-32", pretrained=os.environ.get("IMGRANK_BENCH_WEIGHTS", "none"), device="cpu"
    )
    stats = PipelineStats()
    with open_cache(cache) as store:
        # What `imgrank sort` does: a fully cached folder needs neither open_clip nor the
        # image tower (imgrank.models.clip.light_text); otherwise the full backbone is built.
        model = load_model(selection)
        warm = model.fully_cached(paths, store)
        if warm:
            scorer = model.scorer(prompt, images_cached=True)
            lap("cache check + text tower without open_clip")
        else:
            lap("cache check (not every photo cached)")
            import open_clip  # noqa: F401

            lap("import open_clip (+ torchvision, timm)")
            model.backbone()
            lap("build model (text tower; image tower is lazy)")
            scorer = model.scorer(prompt)
            lap("tokenize + text tower")
        scored = score_images(paths, model.image_encoder, scorer, cache=store, stats=stats)
        lap("score_images (lookups, decode, image tower, cache writes)")
    rank_scores(scored)
    lap("rank")
    built = model._backbone is not None and image_tower_built(model._backbone)
    print(
        json.dumps(
            {
                "phases": phases,
                "stats": stats.__dict__,
                "image_tower_built": built,
                "threads": torch.get_num_threads(),
            }
        )
    )


def profile(folder: Path, cache: Path, prompt: str, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--profile-child", str(folder), str(cache), prompt],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ main


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("torch", "open_clip_torch", "pillow")
    )
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, {versions}"


def export_onnx(folder: Path, env: dict[str, str]) -> Path:
    """ViT-B-32 (random weights) exported with ``imgrank export``, once (not timed)."""
    if not (folder / "imgrank-onnx.json").exists():
        if folder.exists():
            shutil.rmtree(folder)
        command = [*imgrank_command(), "export", "--out", str(folder), "--model", "ViT-B-32"]
        subprocess.run([*command, "--pretrained", WEIGHTS, "--quiet"], env=env, check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=96, help="photos in the main folder")
    parser.add_argument("--small", type=int, default=24, help="photos in the small folder (RSS)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--workdir", type=Path, default=HERE / "out")
    parser.add_argument("--onnx", action="store_true", help="also time --runtime onnx sorts")
    parser.add_argument("--no-profile", action="store_true", help="skip the phase profile")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="build random weights in every run (--pretrained none) instead of loading a "
        "weights file; adds the cost of random initialisation to every side",
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=0,
        help="also time one cold and one warm sort of a folder K times larger (symlinks to the "
        "same photos in K sub-folders): the warm/cold ratio as the folder grows",
    )
    parser.add_argument("--profile-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile_child:
        profile_child(*args.profile_child)
        return

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    global WEIGHTS
    if not args.random_init:
        WEIGHTS = str(make_weights(work / "vit-b-32-random.safetensors"))
    env = {**os.environ, "IMGRANK_HOME": str(work / "home"), "IMGRANK_BENCH_WEIGHTS": WEIGHTS}
    load_before = os.getloadavg()
    print(f"machine: {machine()}", file=sys.stderr)
    photos = make_inputs(work / f"photos-{args.photos}", args.photos)
    small = subset(photos[: args.small], work / f"photos-{args.small}")
    mean_mb = statistics.mean(p.stat().st_size for p in photos) / 1e6
    folder = photos[0].parent
    cache = work / "bench-cache.sqlite3"
    onnx_cache = work / "bench-cache-onnx.sqlite3"
    out = work / "ranking.csv"
    commands = {
        "plain": lambda: plain_command(folder, PROMPT_COLD, out),
        "cold": lambda: sort_command(folder, PROMPT_COLD, fresh(cache), out),
        "warm": lambda: sort_command(folder, PROMPT_WARM, cache, out),
    }
    if args.onnx:
        onnx = export_onnx(work / "onnx", env)
        commands["onnx cold"] = lambda: sort_command(
            folder, PROMPT_COLD, fresh(onnx_cache), out, onnx
        )
        commands["onnx warm"] = lambda: sort_command(folder, PROMPT_WARM, onnx_cache, out, onnx)
    results: dict[str, list[Run]] = {kind: [] for kind in commands}
    kinds = list(commands)
    for round_index in range(args.rounds):
        # Alternate which side goes first; a warm run always follows its cold run.
        order = kinds if round_index % 2 == 0 else [*kinds[1:], kinds[0]]
        for kind in order:
            result = run(commands[kind](), env)
            results[kind].append(result)
            print(f"  round {round_index + 1} {kind:9s} {result.seconds:6.1f} s", file=sys.stderr)

    cache_bytes = sum(p.stat().st_size for p in (cache, Path(f"{cache}-wal")) if p.exists())
    info = subprocess.run(
        [*imgrank_command(), "cache", "info", "--json", "--cache", str(cache)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    payload = json.loads(info.stdout)["models"][0]["bytes_per_entry"]

    small_cache = work / "bench-cache-small.sqlite3"
    rss_small = run(sort_command(small, PROMPT_COLD, fresh(small_cache), out), env)
    plain_small = run(plain_command(small, PROMPT_COLD, out), env)

    def median(kind: str, attr: str = "seconds") -> float:
        return statistics.median(getattr(r, attr) for r in results[kind])

    n = len(photos)

    def faster(kind: str, than: str) -> str:
        return f"{median(than) / median(kind):.2f}x faster than {than}"

    ratios = {
        "plain": ("plain open_clip loop", "1.00 (baseline)"),
        "cold": ("imgrank sort, cold (empty cache)", faster("cold", "plain")),
        "warm": ("imgrank sort, warm, new prompt", faster("warm", "cold")),
    }
    if args.onnx:
        ratios["onnx cold"] = ("imgrank sort --runtime onnx, cold", faster("onnx cold", "plain"))
        ratios["onnx warm"] = (
            "imgrank sort --runtime onnx, warm",
            faster("onnx warm", "onnx cold"),
        )
    print()
    print(f"machine: {machine()}")
    print(f"load average (1 min) before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}")
    print(
        f"inputs: {n} JPEGs {WIDTH}x{HEIGHT} ({WIDTH * HEIGHT / 1e6:.0f} MP, grain, q{QUALITY}), "
        f"{mean_mb:.1f} MB on average; ViT-B-32, random weights "
        f"({'built in each run' if WEIGHTS == 'none' else 'loaded from a file'}), CPU; "
        f"{args.rounds} alternating round(s), medians"
    )
    print()
    print(f"| {'run':34s} | wall s |  CPU s | photos/s | peak RSS MB | ratio")
    print(f"| {'-' * 34} | ------ | ------ | -------- | ----------- | -----")
    for kind, (label, ratio) in ratios.items():
        print(
            f"| {label:34s} | {median(kind):6.1f} | {median(kind, 'cpu_seconds'):6.1f} | "
            f"{n / median(kind):8.1f} | {median(kind, 'peak_rss_mb'):11.0f} | {ratio}"
        )
    print()
    rss_large = median("cold", "peak_rss_mb")
    rss_growth = rss_large / rss_small.peak_rss_mb
    print(
        f"peak RSS, imgrank cold: {args.small} photos {rss_small.peak_rss_mb:.0f} MB, "
        f"{n} photos {rss_large:.0f} MB ({rss_growth:.2f}x); plain loop: "
        f"{plain_small.peak_rss_mb:.0f} MB, {median('plain', 'peak_rss_mb'):.0f} MB"
    )
    print(
        f"cache: {cache_bytes / n / 1e3:.1f} KB per photo on disk ({payload / 1e3:.1f} KB of "
        "features: pooled float32 + 49x512 tokens float16)"
    )
    print()
    checks = [
        ("cold >= 2x the plain loop", median("plain") / median("cold") >= 2),
        ("warm re-sort >= 5x faster than cold", median("cold") / median("warm") >= 5),
        ("peak RSS flat (< 1.15x from the small to the large folder)", rss_growth < 1.15),
    ]
    for label, ok in checks:
        print(f"target {label}: {'met' if ok else 'NOT met'}")

    if args.scale > 1:
        # A warm re-sort costs a fixed start-up (importing torch and open_clip) plus almost
        # nothing per photo, so its advantage grows with the folder: measure one larger size.
        large = work / f"photos-{n}x{args.scale}"
        if large.exists():
            shutil.rmtree(large)
        for copy_index in range(args.scale):
            sub = large / str(copy_index)
            sub.mkdir(parents=True)
            for path in photos:
                os.symlink(path, sub / path.name)
        large_cache = work / "bench-cache-large.sqlite3"
        cold_large = run(sort_command(large, PROMPT_COLD, fresh(large_cache), out), env)
        warm_large = run(sort_command(large, PROMPT_WARM, large_cache, out), env)
        print()
        print(
            f"{n * args.scale} photos (one round): cold {cold_large.seconds:.1f} s "
            f"({cold_large.peak_rss_mb:.0f} MB peak RSS), warm new prompt {warm_large.seconds:.1f} s: "
            f"warm is {cold_large.seconds / warm_large.seconds:.2f}x faster than cold"
        )

    if not args.no_profile:
        profile_cache = fresh(work / "bench-cache-profile.sqlite3")
        for label, prompt in (("cold", PROMPT_COLD), ("warm", PROMPT_WARM)):
            report = profile(folder, profile_cache, prompt, env)
            total = sum(report["phases"].values())
            print()
            print(f"profile, {label} sort of {n} photos (in one process, {total:.1f} s):")
            for phase, seconds in report["phases"].items():
                print(f"  {phase:58s} {seconds:6.2f} s  {100 * seconds / total:3.0f} %")
            stats = report["stats"]
            if stats["cache_misses"]:
                print(
                    f"  inside score_images: image tower {stats['encode_seconds']:.1f} s wall, "
                    f"waiting for decoded photos {stats['wait_seconds']:.1f} s, "
                    f"decoding {stats['decode_cpu_seconds']:.1f} s CPU over the decode "
                    f"threads, cache writes {stats['store_seconds']:.2f} s"
                )
            print(
                f"  hits {stats['cache_hits']}, misses {stats['cache_misses']}, "
                f"image tower built: {report['image_tower_built']}, "
                f"torch threads: {report['threads']}"
            )


if __name__ == "__main__":
    main()
