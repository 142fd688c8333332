"""Benchmark ``imgrank sort`` against the plain open_clip loop, in one run, alternating.

    python benchmarks/bench_sort.py                 # 96 photos of 12 MP, 3 rounds (~6 min; more the first time)
    python benchmarks/bench_sort.py --photos 48 --rounds 1 --no-profile --no-scaling  # quicker

What it measures (every figure in the same run, on the same inputs, ViT-B-32
with random weights loaded from one file on every side, on the CPU):

(a) the default ``imgrank sort`` cold (empty cache; the one-time automatic ONNX
    export made beforehand, its cost printed once) against ``plain_loop.py``, the
    loop a user writes by hand (open, open_clip's preprocess, batch,
    encode_image, cosine, sort, CSV), and against ``--runtime torch`` (float32,
    the default before the automatic export);
(b) how the default ranks against float32 torch (Spearman over the photos), and
    ``--precision bf16`` with ``--bf16``;
(c) warm re-sorts (every photo cached) by the same prompt and by a new one,
    against the cold sort that filled the cache, for the model named
    (``--model ViT-B-32``), the same model as a config JSON, and a ranking
    adapter on it;
(d) warm re-sorts of 1,000 and 100,000 cached photos with a micro model (the
    cost per photo of a re-sort; ``--no-scaling`` skips it);
(e) peak RSS of cold sorts at two folder sizes (it must not grow with N), and
    the cache's size per photo;
and, unless ``--no-profile``, where the time of a torch cold and warm sort goes.

Each round runs every cold sort followed by its warm re-sorts, alternating the
order between rounds so that a drift in machine load does not favour one side;
the tables show medians. Inputs are generated once into ``benchmarks/out/``
(git-ignored): photo-sized JPEGs (4000x3000 = 12 MP, quality 92) made from the
real photos in ``../shared/photos`` (or tests/data/photos), cropped, mirrored
and exposed differently, upscaled, with sensor-like grain so that decoding
costs what a camera file costs (a smooth upscale decodes several times faster).
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
from typing import Any

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
    folder: Path, prompt: str, cache: Path, out: Path, model: list[str] | None = None
) -> list[str]:
    """``imgrank sort`` as a user types it; ``model`` defaults to the named ViT-B-32."""
    if model is None:
        model = ["--model", "ViT-B-32", "--pretrained", WEIGHTS]
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




def model_variants(work: Path) -> dict[str, list[str]]:
    """The same ViT-B-32 three ways (made once, not timed): named, config JSON, an adapter.

    The adapter has random weights on the same random backbone (speed does not
    depend on values); its folder keeps a copy of the backbone weights, as
    ``imgrank train`` writes it.
    """
    import importlib.util

    found = importlib.util.find_spec("open_clip")
    assert found is not None and found.submodule_search_locations
    named_config = Path(next(iter(found.submodule_search_locations))) / "model_configs"
    config = work / "vit-b-32-config.json"
    if not config.exists():
        shutil.copy(named_config / "ViT-B-32.json", config)
    adapter = work / "adapter-vit-b-32"
    if not (adapter / "config.json").exists():
        if adapter.exists():
            shutil.rmtree(adapter)
        code = (
            "import sys, torch\n"
            "from imgrank.models.adapter import AdapterConfig, RankingAdapter\n"
            "from imgrank.models.clip.config import BackboneSpec\n"
            "from imgrank.models.checkpoints import save_model_folder\n"
            "torch.manual_seed(0)\n"
            "adapter = RankingAdapter(AdapterConfig(d_model=512, n_head=8))\n"
            "save_model_folder(sys.argv[1], adapter, BackboneSpec('ViT-B-32', sys.argv[2]))\n"
        )
        subprocess.run([sys.executable, "-c", code, str(adapter), WEIGHTS], check=True)
    return {
        "named": ["--model", "ViT-B-32", "--pretrained", WEIGHTS],
        "config JSON": ["--model", str(config), "--pretrained", WEIGHTS],
        "adapter": ["--adapter", str(adapter)],
    }


def scores_of(path: Path) -> dict[str, float]:
    import csv

    with path.open(newline="") as handle:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    from scipy.stats import spearmanr

    keys = sorted(a)
    if set(keys) != set(b):
        raise SystemExit("the two rankings hold different photos")
    return float(spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic)


def micro_scaling(work: Path, env: dict[str, str], sizes: list[int], rounds: int) -> dict:
    """Warm re-sorts of folders of ``sizes`` cached photos with a micro model, alternating.

    The cache is filled directly (not timed) under the fingerprint the default
    ``imgrank sort`` computes for the model (so the one-time export, if any, is
    made here), and the prompt's text features are cached by one untimed sort:
    the timed sorts read everything from the cache. Photos are hard links to one
    small JPEG (one copy per 50,000 links: file systems cap a file's links).
    """
    micro = REPO / "tests" / "data" / "tiny-clip.json"
    weights = work / "micro-random.safetensors"
    if not weights.exists():
        code = (
            "import sys; from safetensors.torch import save_file\n"
            "from imgrank.models.clip.build import load_backbone\n"
            "from imgrank.models.clip.config import BackboneSpec\n"
            "m = load_backbone(BackboneSpec(model=sys.argv[1], pretrained='none'), device='cpu')\n"
            "save_file({k: v.contiguous() for k, v in m.model.state_dict().items()}, sys.argv[2])\n"
        )
        subprocess.run([sys.executable, "-c", code, str(micro), str(weights)], check=True, env=env)
    source = sorted((REPO / "tests" / "data" / "photos").glob("*.jpg"))[0]
    model = ["--model", str(micro), "--pretrained", str(weights)]
    fill = (
        "import sys, numpy as np\n"
        "from pathlib import Path\n"
        "from imgrank.features.cache import FileKey, open_cache\n"
        "from imgrank.features.stream import cache_fingerprint, describe_encoder\n"
        "from imgrank.images.decode import find_images\n"
        "from imgrank.models.loading import load_model\n"
        "from imgrank.models.selection import ModelSelection\n"
        "model = load_model(ModelSelection(model=sys.argv[3], pretrained=sys.argv[4],"
        " runtime='auto'))\n"
        "encoder = model.image_encoder\n"
        "rng = np.random.default_rng(0)\n"
        "with open_cache(sys.argv[2]) as cache:\n"
        "    key = cache.model_id(cache_fingerprint(encoder), describe_encoder(encoder))\n"
        "    for path in find_images(Path(sys.argv[1])):\n"
        "        cache.put(key, FileKey.of(path), rng.standard_normal(32).astype(np.float32),\n"
        "                  rng.standard_normal((16, 32)).astype(np.float32))\n"
    )
    folders = {}
    for size in sizes:
        folder = work / f"micro-{size}"
        marker = work / f"micro-{size}.complete"
        if not marker.exists():
            if folder.exists():
                shutil.rmtree(folder)
            for index in range(size):
                sub = folder / f"{index // 1000:04d}"
                sub.mkdir(parents=True, exist_ok=True)
                copy = work / "micro-sources" / f"{index // 50_000}.jpg"
                if not copy.exists():
                    copy.parent.mkdir(exist_ok=True)
                    shutil.copy(source, copy)
                os.link(copy, sub / f"p{index:06d}.jpg")
            marker.write_text("")
        cache = fresh(work / f"micro-cache-{size}.sqlite3")
        subprocess.run(
            [sys.executable, "-c", fill, str(folder), str(cache), str(micro), str(weights)],
            check=True, env=env,
        )  # fmt: skip
        folders[size] = (folder, cache)
    out = work / "micro-ranking.csv"
    for size in sizes:  # untimed: the prompt's text features enter the cache
        folder, cache = folders[size]
        run(sort_command(folder, PROMPT_COLD, cache, out, model), env)
    times: dict[int, list[Run]] = {size: [] for size in sizes}
    for round_index in range(rounds):
        order = sizes if round_index % 2 == 0 else list(reversed(sizes))
        for size in order:
            folder, cache = folders[size]
            result = run(sort_command(folder, PROMPT_COLD, cache, out, model), env)
            times[size].append(result)
            print(f"  micro warm {size:7d} photos {result.seconds:6.2f} s", file=sys.stderr)
    return {
        size: (
            statistics.median(r.seconds for r in runs),
            statistics.median(r.peak_rss_mb for r in runs),
        )
        for size, runs in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=96, help="photos in the main folder")
    parser.add_argument("--small", type=int, default=24, help="photos in the small folder (RSS)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--workdir", type=Path, default=HERE / "out")
    parser.add_argument("--bf16", action="store_true", help="also rank with --precision bf16")
    parser.add_argument("--no-profile", action="store_true", help="skip the phase profile")
    parser.add_argument("--no-scaling", action="store_true", help="skip the micro-model scaling")
    parser.add_argument(
        "--scaling-sizes", default="1000,100000", help="cached photos of the micro-model runs"
    )
    parser.add_argument("--profile-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile_child:
        profile_child(*args.profile_child)
        return

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    global WEIGHTS
    WEIGHTS = str(make_weights(work / "vit-b-32-random.safetensors"))
    # The default as a user gets it: no IMGRANK_RUNTIME, exports in the bench's own home.
    env = {k: v for k, v in os.environ.items() if k != "IMGRANK_RUNTIME"}
    env.update({"IMGRANK_HOME": str(work / "home"), "IMGRANK_BENCH_WEIGHTS": WEIGHTS})
    load_before = os.getloadavg()
    print(f"machine: {machine()}", file=sys.stderr)
    photos = make_inputs(work / f"photos-{args.photos}", args.photos)
    small = subset(photos[: args.small], work / f"photos-{args.small}")
    mean_mb = statistics.mean(p.stat().st_size for p in photos) / 1e6
    folder = photos[0].parent
    variants = model_variants(work)
    torch_fp32 = [*variants["named"], "--runtime", "torch", "--device", "cpu"]

    # One-time costs, untimed in the rounds: the automatic exports (the config JSON shares
    # the named model's), made by a first default sort of the small folder.
    one_time: dict[str, float] = {}
    for name in ("named", "adapter"):
        started = time.perf_counter()
        run(sort_command(small, PROMPT_COLD, fresh(work / "setup.sqlite3"), work / "setup.csv",
                         variants[name]), env)  # fmt: skip
        one_time[name] = time.perf_counter() - started

    kinds = ("plain", "default", "torch", "bf16", "config JSON", "adapter", "adapter torch")
    out = {kind: work / f"ranking-{kind.replace(' ', '-')}.csv" for kind in kinds}
    caches = {kind: work / f"bench-cache-{kind.replace(' ', '-')}.sqlite3" for kind in variants}
    # Each step: (label, command); a cold sort's warm re-sorts follow it directly.
    steps: list[tuple[str, Any]] = [
        ("plain", lambda: plain_command(folder, PROMPT_COLD, out["plain"])),
        ("torch cold", lambda: sort_command(folder, PROMPT_COLD, fresh(work / "torch.sqlite3"),
                                            out["torch"], torch_fp32)),
    ]  # fmt: skip
    for name, model in variants.items():
        key = "default" if name == "named" else name
        steps += [
            (f"{name} cold", lambda m=model, n=name, k=key: sort_command(
                folder, PROMPT_COLD, fresh(caches[n]), out[k], m)),
            (f"{name} warm same prompt", lambda m=model, n=name: sort_command(
                folder, PROMPT_COLD, caches[n], work / "warm.csv", m)),
            (f"{name} warm new prompt", lambda m=model, n=name: sort_command(
                folder, PROMPT_WARM, caches[n], work / "warm.csv", m)),
        ]  # fmt: skip
    groups = [steps[:1], steps[1:2], steps[2:5], steps[5:8], steps[8:11]]
    results: dict[str, list[Run]] = {label: [] for label, _ in steps}
    for round_index in range(args.rounds):
        order = groups if round_index % 2 == 0 else list(reversed(groups))
        for group in order:
            for label, command in group:
                result = run(command(), env)
                results[label].append(result)
                print(f"  round {round_index + 1} {label:24s} {result.seconds:6.1f} s",
                      file=sys.stderr)  # fmt: skip

    # Rankings against float32 torch (untimed runs where needed).
    adapter_torch = [*variants["adapter"], "--runtime", "torch", "--device", "cpu"]
    run(sort_command(folder, PROMPT_COLD, fresh(work / "x.sqlite3"), out["adapter torch"],
                     adapter_torch), env)  # fmt: skip
    agreement = {
        "default vs float32 torch": spearman(scores_of(out["default"]), scores_of(out["torch"])),
        "config JSON vs float32 torch": spearman(
            scores_of(out["config JSON"]), scores_of(out["torch"])
        ),
        "adapter default vs adapter float32 torch": spearman(
            scores_of(out["adapter"]), scores_of(out["adapter torch"])
        ),
    }
    if args.bf16:
        bf16 = [*variants["named"], "--precision", "bf16", "--device", "cpu"]
        run(sort_command(folder, PROMPT_COLD, fresh(work / "x.sqlite3"), out["bf16"], bf16), env)
        agreement["--precision bf16 vs float32 torch"] = spearman(
            scores_of(out["bf16"]), scores_of(out["torch"])
        )

    cache = caches["named"]
    cache_bytes = sum(p.stat().st_size for p in (cache, Path(f"{cache}-wal")) if p.exists())
    info = subprocess.run(
        [*imgrank_command(), "cache", "info", "--json", "--cache", str(cache)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    payload = json.loads(info.stdout)["models"][0]["bytes_per_entry"]
    rss_small = run(sort_command(small, PROMPT_COLD, fresh(work / "small.sqlite3"),
                                 work / "small.csv"), env)  # fmt: skip
    plain_small = run(plain_command(small, PROMPT_COLD, work / "small.csv"), env)
    scaling = (
        {}
        if args.no_scaling
        else micro_scaling(work, env, [int(x) for x in args.scaling_sizes.split(",")],
                           args.rounds)  # fmt: skip
    )

    def median(label: str, attr: str = "seconds") -> float:
        return statistics.median(getattr(r, attr) for r in results[label])

    n = len(photos)
    print()
    print(f"machine: {machine()}")
    print(f"load average (1 min) before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}")
    print(
        f"inputs: {n} JPEGs {WIDTH}x{HEIGHT} ({WIDTH * HEIGHT / 1e6:.0f} MP, grain, q{QUALITY}), "
        f"{mean_mb:.1f} MB on average; ViT-B-32, random weights loaded from a file, CPU; "
        f"{args.rounds} alternating round(s), medians"
    )
    print(
        "one-time automatic exports (first default sort of the small folder, export included): "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in one_time.items())
    )
    print()
    print(f"| {'run':38s} | wall s |  CPU s | photos/s | peak RSS MB | ratio")
    print(f"| {'-' * 38} | ------ | ------ | -------- | ----------- | -----")

    def row(label: str, text: str, ratio: str) -> None:
        print(
            f"| {text:38s} | {median(label):6.2f} | {median(label, 'cpu_seconds'):6.2f} | "
            f"{n / median(label):8.1f} | {median(label, 'peak_rss_mb'):11.0f} | {ratio}"
        )

    def faster(label: str, than: str) -> float:
        return median(than) / median(label)

    row("plain", "plain open_clip loop", "1.00 (baseline)")
    row("torch cold", "sort --runtime torch, cold", f"{faster('torch cold', 'plain'):.2f}x plain")
    for name in variants:
        cold = f"{name} cold"
        row(cold, f"sort (default) {name}, cold", f"{faster(cold, 'plain'):.2f}x plain")
        for which in ("same prompt", "new prompt"):
            warm = f"{name} warm {which}"
            row(warm, f"  re-sort, {which}", f"{faster(warm, cold):.1f}x cold")
    print()
    for label, value in agreement.items():
        print(f"Spearman, {label}: {value:.4f}")
    rss_large = median("named cold", "peak_rss_mb")
    rss_growth = rss_large / rss_small.peak_rss_mb
    print(
        f"peak RSS, default cold: {args.small} photos {rss_small.peak_rss_mb:.0f} MB, "
        f"{n} photos {rss_large:.0f} MB ({rss_growth:.2f}x); plain loop: "
        f"{plain_small.peak_rss_mb:.0f} MB, {median('plain', 'peak_rss_mb'):.0f} MB"
    )
    print(
        f"cache: {cache_bytes / n / 1e3:.1f} KB per photo on disk ({payload / 1e3:.1f} KB of "
        "features: pooled float32 + 49x512 tokens float16)"
    )
    if scaling:
        sizes = sorted(scaling)
        for size in sizes:
            seconds, rss = scaling[size]
            print(f"micro model, warm re-sort of {size:,} cached photos: {seconds:.2f} s, "
                  f"{rss:.0f} MB peak RSS")  # fmt: skip
    print()
    checks = [
        ("default cold >= 3x the plain loop", faster("named cold", "plain") >= 3),
        ("default ranks at Spearman >= 0.999 vs float32 torch",
         agreement["default vs float32 torch"] >= 0.999),
        *[(f"{name}: warm re-sort (same prompt) >= 15x faster than cold",
           faster(f"{name} warm same prompt", f"{name} cold") >= 15) for name in variants],
        ("peak RSS flat (< 1.15x from the small to the large folder)", rss_growth < 1.15),
    ]  # fmt: skip
    if scaling:
        small_size, large_size = min(scaling), max(scaling)
        checks.append((
            f"{large_size:,} cached photos within 2x of {small_size:,}",
            scaling[large_size][0] <= 2 * scaling[small_size][0],
        ))  # fmt: skip
    for label, ok in checks:
        print(f"target {label}: {'met' if ok else 'NOT met'}")

    if not args.no_profile:
        profile_cache = fresh(work / "bench-cache-profile.sqlite3")
        for label, prompt in (("cold", PROMPT_COLD), ("warm", PROMPT_WARM)):
            report = profile(folder, profile_cache, prompt, env)
            total = sum(report["phases"].values())
            print()
            print(f"profile, torch {label} sort of {n} photos (in one process, {total:.1f} s):")
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


if __name__ == "__main__":
    main()
