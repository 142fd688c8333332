"""Benchmark ``imgrank sort --engine ray`` against the local engine, in one run, alternating.

    python benchmarks/bench_ray.py                  # 96 photos of 12 MP, 2 rounds
    python benchmarks/bench_ray.py --rounds 1 --small 48

What it measures (every figure in the same run, on the same inputs; the inputs
and the random ViT-B-32 weights file are those of bench_sort.py, made once into
``benchmarks/out/``):

(a) throughput of whole ``imgrank sort`` processes on the CPU, no cache: the
    local engine (the baseline) and the ray engine starting Ray itself (what a
    one-off ``--engine ray`` on one machine costs); and, in a process that
    started Ray first (untimed), the ray engine's sort alone (what a user of a
    running cluster sees). Alternated round by round; medians.
(b) memory with the number of photos: peak RSS of the driver and the peak
    sum of RSS of the Ray worker processes, at ``--small`` and at all photos.
(c) per-stage cost per photo, one thread: the decode (``load_pixels``)
    and the encode (``encode_pixels``, batch of 16) of ViT-B-32 on the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_sort import (  # noqa: E402 - the same inputs, weights and process runner
    HEIGHT,
    WIDTH,
    Run,
    imgrank_command,
    machine,
    make_inputs,
    make_weights,
    run,
    subset,
)

PROMPT = "image quality"


def worker_rss() -> tuple[float, float, int]:
    """Ray worker processes (command lines start with ``ray::``): summed RSS, largest RSS (MB), count.

    The sum counts object-store pages once per process that maps them, and Ray keeps
    idle workers around, so the largest single worker is the figure to compare.
    """
    sizes: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as stream:
                if not stream.read(5).startswith(b"ray::"):
                    continue
            with open(f"/proc/{entry.name}/status", encoding="ascii") as stream:
                for line in stream:
                    if line.startswith("VmRSS:"):
                        sizes.append(int(line.split()[1]))
                        break
        except (OSError, ValueError):
            continue
    return sum(sizes) / 1024, max(sizes, default=0) / 1024, len(sizes)


class PeakSampler:
    """Samples the Ray workers every 0.25 s while a run is going on."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.largest = 0.0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            total, largest, count = worker_rss()
            self.peak = max(self.peak, total)
            self.largest = max(self.largest, largest)
            self.processes = max(self.processes, count)
            self._stop.wait(0.25)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def sort_command(folder: Path, weights: str, out: Path, extra: list[str]) -> list[str]:
    return [
        *imgrank_command(), "sort", str(folder), "--by", PROMPT, "--model", "ViT-B-32",
        "--pretrained", weights, "--device", "cpu", "--no-cache", "-o", str(out), "--force",
        "--quiet", *extra,
    ]  # fmt: skip


def stage_costs(folder: Path, weights: str) -> dict[str, float]:
    """Milliseconds per photo of the decode and of the ViT-B-32 encode, one thread each."""
    code = f"""
import json, time, numpy as np, torch
from pathlib import Path
torch.set_num_threads(1)
from imgrank.images.decode import load_pixels
from imgrank.models.clip.build import load_backbone
from imgrank.models.clip.config import BackboneSpec
backbone = load_backbone(BackboneSpec(model="ViT-B-32", pretrained={weights!r}), device="cpu")
paths = sorted(Path({str(folder)!r}).glob("*.jpg"))[:16]
started = time.thread_time()
pixels = np.stack([load_pixels(p, backbone.preprocess) for p in paths])
decode = (time.thread_time() - started) / len(paths)
backbone.encode_pixels(pixels[:2])
started = time.perf_counter()
backbone.encode_pixels(pixels)
encode = (time.perf_counter() - started) / len(paths)
print(json.dumps({{"decode_ms": decode * 1e3, "encode_ms": encode * 1e3}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])


def warm_child(folder: str, weights: str) -> None:
    """Start Ray (untimed), then time one ray-engine sort: what a running cluster costs."""
    import json

    from imgrank.engines.ray import connect
    from imgrank.sorter import SortRequest, sort_folder

    connect(None, quiet=True)
    request = SortRequest(
        folder=Path(folder), prompt=PROMPT, model="ViT-B-32", pretrained=weights,
        device="cpu", use_cache=False, engine="ray",
    )  # fmt: skip
    started = time.perf_counter()
    ranking = sort_folder(request)
    print(json.dumps({"seconds": time.perf_counter() - started, "scored": ranking.scored}))


def run_warm(folder: Path, weights: str, env: dict[str, str]) -> tuple[Run, float]:
    """The whole process, and the seconds of its sort after Ray was up."""
    import json

    command = [sys.executable, str(Path(__file__)), "--warm-child", str(folder), weights]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"warm ray run failed:\n{done.stderr[-3000:]}")
    whole = time.perf_counter() - started
    inner = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    return Run(whole, 0.0, 0.0), inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=96)
    parser.add_argument("--small", type=int, default=48, help="photos of the memory comparison")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=HERE / "out")
    parser.add_argument("--warm-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory-only", action="store_true", help="only the ray engine at --small and all photos"
    )
    args = parser.parse_args()
    if args.warm_child:
        warm_child(*args.warm_child)
        return

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    weights = str(make_weights(work / "vit-b-32-random.safetensors"))
    env = {**os.environ, "IMGRANK_HOME": str(work / "home")}
    photos = make_inputs(work / f"photos-{args.photos}", args.photos)
    folder = photos[0].parent
    small = subset(photos[: args.small], work / f"photos-{args.small}")
    out = work / "ranking-ray.csv"
    load_before = os.getloadavg()
    if args.memory_only:
        for folder_ in (small, folder):
            with PeakSampler() as sampler:
                result = run(sort_command(folder_, weights, out, ["--engine", "ray"]), env)
            count = len(list(folder_.glob("*.jpg")))
            print(
                f"ray engine, {count} photos: {result.seconds:.0f} s, driver peak RSS "
                f"{result.peak_rss_mb:.0f} MB, largest worker {sampler.largest:.0f} MB, "
                f"{sampler.processes} worker processes, workers summed {sampler.peak:.0f} MB"
            )
        return
    commands = {
        "local": sort_command(folder, weights, out, []),
        "ray": sort_command(folder, weights, out, ["--engine", "ray"]),
    }
    results: dict[str, list[Run]] = {kind: [] for kind in [*commands, "ray, Ray running"]}
    peaks: dict[str, list[float]] = {kind: [] for kind in results}
    inner: list[float] = []
    largest: dict[str, float] = {}
    processes: dict[str, int] = {}
    kinds = list(results)
    for round_index in range(args.rounds):
        order = kinds if round_index % 2 == 0 else list(reversed(kinds))
        for kind in order:
            with PeakSampler() as sampler:
                if kind in commands:
                    result = run(commands[kind], env)
                else:
                    result, sort_seconds = run_warm(folder, weights, env)
                    inner.append(sort_seconds)
            results[kind].append(result)
            peaks[kind].append(sampler.peak)
            largest[kind] = max(largest.get(kind, 0.0), sampler.largest)
            processes[kind] = max(processes.get(kind, 0), sampler.processes)
            print(f"  round {round_index + 1} {kind:17s} {result.seconds:6.1f} s", file=sys.stderr)
    with PeakSampler() as small_sampler:
        small_run = run(sort_command(small, weights, out, ["--engine", "ray"]), env)
    costs = stage_costs(folder, weights)

    def median(kind: str) -> float:
        return statistics.median(r.seconds for r in results[kind])

    n = len(photos)
    print()
    print(f"machine: {machine()}")
    print(f"load average (1 min) before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f}")
    print(
        f"inputs: {n} JPEGs {WIDTH}x{HEIGHT}, ViT-B-32 random weights from a file, CPU, "
        f"no cache; {args.rounds} alternating round(s), medians"
    )
    print()
    print("| run | wall s | photos/s | throughput vs local | driver peak RSS MB | workers peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in ("local", "ray"):
        seconds = median(kind)
        driver = statistics.median(r.peak_rss_mb for r in results[kind])
        print(
            f"| imgrank sort, {kind} engine (whole process) | {seconds:.1f} | {n / seconds:.2f} | "
            f"{median('local') / seconds:.2f}x | {driver:.0f} | {max(peaks[kind]):.0f} |"
        )
    warm = statistics.median(inner)
    print(
        f"| ray engine, sort after Ray is up (same process) | {warm:.1f} | {n / warm:.2f} | "
        f"{median('local') / warm:.2f}x | | {max(peaks['ray, Ray running']):.0f} |"
    )
    print()
    ray_runs = results["ray"]
    print(
        f"memory, ray engine: {args.small} photos: driver {small_run.peak_rss_mb:.0f} MB, "
        f"largest worker {small_sampler.largest:.0f} MB, {small_sampler.processes} workers; "
        f"{n} photos: driver {statistics.median(r.peak_rss_mb for r in ray_runs):.0f} MB, "
        f"largest worker {largest['ray']:.0f} MB, {processes['ray']} workers"
    )
    print(
        f"per photo, one thread: decode {costs['decode_ms']:.0f} ms CPU, "
        f"ViT-B-32 encode {costs['encode_ms']:.0f} ms (batch of 16)"
    )


if __name__ == "__main__":
    main()
