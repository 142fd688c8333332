"""Benchmark ``imgrank cull``: how well bursts are grouped, and how fast grouping is.

    python benchmarks/bench_cull.py                  # ViT-B-32, random weights
    python benchmarks/bench_cull.py --model tests/data/tiny-clip.json --quick

What it measures, in one run:

(a) Grouping quality. Bursts are generated from the real photos in ../shared/photos
    (or tests/data/photos): a "scene" is a region of a photo, possibly mirrored; each
    burst is 1-8 frames of one scene with small crops and shifts, exposure changes
    and, in some frames, a little blur, EXIF capture times a fraction of a second
    apart; scenes follow each other a second to a few seconds apart, and one scene
    is shot again an hour later. The features are computed by imgrank's own pipeline
    (the model named by --model, random weights), then grouped, and the adjusted
    Rand index (scikit-learn) against the truth is printed:
      - with capture times (truth: the bursts; the revisit is a burst of its own),
      - without capture times (truth: the scenes; the revisit joins its scene),
      - the hash alone and the embedding alone, to show which carries the grouping,
      - the untimed case through the nearest-neighbour index instead of all pairs.
    It also prints the distributions the default thresholds are argued from:
    hash distances and cosine similarities within bursts and between scenes.
(b) Grouping speed: 100,000 synthetic photos (clusters of near-duplicate embeddings
    and hashes) grouped with and without capture times, against a baseline measured
    in the same run: sorting 100,000 numbers (the least any grouping by time costs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SOURCES = [REPO.parent / "shared" / "photos", REPO / "tests" / "data" / "photos"]

#: Regions of a source photo that make different scenes: (left, top, right, bottom) as
#: fractions of the width and height.
REGIONS = [
    (0.0, 0.0, 1.0, 1.0),
    (0.0, 0.0, 0.6, 0.6),
    (0.4, 0.4, 1.0, 1.0),
    (0.0, 0.4, 0.6, 1.0),
    (0.4, 0.0, 1.0, 0.6),
]
BURST_SIZES = [1, 1, 2, 3, 4, 5, 6, 8]
START = 1_780_000_000.0  # 2026-05-28, an arbitrary shoot day


@dataclass(frozen=True)
class Frame:
    path: Path
    burst: int
    scene: int
    time: float


def source_photos() -> list[Path]:
    for folder in SOURCES:
        found = sorted(folder.glob("*.jpg"))
        if found:
            return found
    raise SystemExit("no source photos found in ../shared/photos or tests/data/photos")


def exif_bytes(when: float) -> bytes:
    """EXIF with DateTimeOriginal, SubSecTimeOriginal and OffsetTimeOriginal for ``when``."""
    from PIL import Image

    seconds = int(when)
    stamp = time.strftime("%Y:%m:%d %H:%M:%S", time.gmtime(seconds))
    exif = Image.Exif()
    ifd = exif.get_ifd(0x8769)
    ifd[36867] = stamp
    ifd[37521] = f"{int(round((when - seconds) * 1000)):03d}"
    ifd[36881] = "+00:00"
    return exif.tobytes()


def make_frame(source, region, mirror: bool, rng: np.random.Generator, blur: bool):  # type: ignore[no-untyped-def]
    from PIL import ImageEnhance, ImageFilter, ImageOps

    w, h = source.size
    left, top, right, bottom = region
    box = [left * w, top * h, right * w, bottom * h]
    bw, bh = box[2] - box[0], box[3] - box[1]
    keep = rng.uniform(0.9, 1.0)  # the photographer zooms or steps by a few per cent
    cw, ch = bw * keep, bh * keep
    x = box[0] + rng.uniform(0, bw - cw)
    y = box[1] + rng.uniform(0, bh - ch)
    frame = source.crop((int(x), int(y), int(x + cw), int(y + ch)))
    if mirror:
        frame = ImageOps.mirror(frame)
    frame = ImageEnhance.Brightness(frame).enhance(rng.uniform(0.8, 1.25))
    if blur:
        frame = frame.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.0)))
    scale = 640 / max(frame.size)
    return frame.resize((max(1, int(frame.width * scale)), max(1, int(frame.height * scale))))


def make_bursts(folder: Path, seed: int = 0) -> list[Frame]:
    """Write the benchmark's frames into ``folder``; returns them with their truth."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in source_photos()]
    scenes = [(s, r, m) for s in range(len(sources)) for r in REGIONS for m in (False, True)]
    order = rng.permutation(len(scenes))
    plan = [(int(scene), False) for scene in order]
    plan.append((int(order[0]), True))  # the first scene, shot again an hour later
    frames: list[Frame] = []
    now = START
    for burst, (scene, revisit) in enumerate(plan):
        source, region, mirror = scenes[scene]
        if revisit:
            now += 3600.0
        size = int(rng.choice(BURST_SIZES))
        for index in range(size):
            image = make_frame(sources[source], region, mirror, rng, rng.random() < 0.25)
            # Names in shooting order would make a name-order accident invisible: shuffle.
            path = folder / f"IMG_{int(rng.integers(0, 10**6)):06d}_{burst}_{index}.jpg"
            image.save(path, quality=90, exif=exif_bytes(now))
            frames.append(Frame(path, burst, scene, now))
            now += rng.uniform(0.08, 0.5)
        now += rng.uniform(1.0, 8.0)  # the next scene, a second to a few seconds later
    return frames


# ------------------------------------------------------------------------------- quality


def features_of(folder: Path, model: str, cache: Path):  # type: ignore[no-untyped-def]
    """imgrank's own features of the folder (scores, embeddings, hashes, times)."""
    from imgrank.culler import collect_features
    from imgrank.sorter import SortRequest

    request = SortRequest(
        folder=folder, prompt="image quality", model=model, pretrained="none", device="cpu",
        cache=cache,
    )
    return collect_features(request)


def percentiles(values: np.ndarray) -> str:
    if values.size == 0:
        return "(none)"
    p = np.percentile(values, [0, 5, 50, 95, 100])
    return " ".join(f"{v:.3g}" for v in p) + f"  (n={values.size})"


def quality(model: str, seed: int) -> None:
    from sklearn.metrics import adjusted_rand_score

    from imgrank.grouping import GroupingOptions, comparable_times, group_photos, hamming

    # Kept between runs (git-ignored): a second run reads every feature from the cache.
    work = HERE / "out" / f"cull-{seed}"
    folder = work / "photos"
    manifest = work / "truth.json"
    try:
        started = time.perf_counter()
        if manifest.exists():
            frames = [Frame(Path(p), b, s, t) for p, b, s, t in json.loads(manifest.read_text())]
        else:
            shutil.rmtree(work, ignore_errors=True)
            folder.mkdir(parents=True)
            frames = make_bursts(folder, seed)
            rows = [[str(f.path), f.burst, f.scene, f.time] for f in frames]
            manifest.write_text(json.dumps(rows))
        print(f"generated {len(frames)} frames, {len({f.burst for f in frames})} bursts, "
              f"{len({f.scene for f in frames})} scenes in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        features = features_of(folder, model, work / f"cache-{Path(model).stem}.sqlite3")
        print(f"features ({model}, random weights) in {time.perf_counter() - started:.1f} s "
              f"({features.from_cache} from the cache, {features.facts_read} photos opened "
              "for their hash only)")
        truth = {f.path.name: f for f in frames}
        names = [p.name for p in features.paths]
        bursts = np.array([truth[n].burst for n in names])
        scenes = np.array([truth[n].scene for n in names])
        hashes = features.hashes
        embeddings = features.embeddings
        times = comparable_times(features.captured)
        assert not np.isnan(times).any(), "every generated frame has a capture time"

        first, second = np.triu_indices(len(names), k=1)
        distance = hamming(hashes[first], hashes[second])
        cosine = np.einsum("ij,ij->i", embeddings[first], embeddings[second])
        same_burst = bursts[first] == bursts[second]
        other_scene = scenes[first] != scenes[second]
        print("\npair statistics (min 5% 50% 95% max):")
        print(f"  hash bits, same burst     {percentiles(distance[same_burst])}")
        print(f"  hash bits, other scene    {percentiles(distance[other_scene])}")
        print(f"  cosine, same burst        {percentiles(cosine[same_burst])}")
        print(f"  cosine, other scene       {percentiles(cosine[other_scene])}")

        defaults = GroupingOptions()
        untimed = np.full(len(names), np.nan)
        rows = [
            ("capture time + hash + embedding", times, embeddings, defaults, bursts),
            ("capture time + hash only", times, None, defaults, bursts),
            ("capture time + embedding only", times, embeddings,
             GroupingOptions(hash_sure=0, hash_maybe=64), bursts),
            ("no time: hash + embedding (all pairs)", untimed, embeddings, defaults, scenes),
            ("no time: hash + embedding (NN index)", untimed, embeddings,
             GroupingOptions(exact_limit=0), scenes),
            ("no time: hash only", untimed, None, defaults, scenes),
            ("no time: embedding confirms doubtful hashes", untimed, embeddings,
             GroupingOptions(untimed_doubtful=True), scenes),
        ]
        print("\nadjusted Rand index against the truth:")
        for label, t, e, options, target in rows:
            started = time.perf_counter()
            groups = group_photos(t, hashes, e, options)
            seconds = time.perf_counter() - started
            ari = adjusted_rand_score(target, groups)
            print(f"  {label:40s} ARI {ari:.3f}  ({groups.max() + 1} groups for "
                  f"{len(set(target.tolist()))} true, {seconds * 1000:.0f} ms)")
        print("\nARI with capture times for other gaps / thresholds:")
        for gap in (0.5, 1.0, 2.0, 5.0, 30.0):
            groups = group_photos(times, hashes, embeddings, GroupingOptions(gap=gap))
            print(f"  --gap {gap:5.1f}  ARI {adjusted_rand_score(bursts, groups):.3f}")
        for sure, maybe in ((6, 6), (10, 10), (12, 12), (12, 22), (16, 16), (20, 20), (24, 24)):
            groups = group_photos(times, hashes, embeddings,
                                  GroupingOptions(hash_sure=sure, hash_maybe=maybe))
            free = group_photos(untimed, hashes, embeddings,
                                GroupingOptions(hash_sure=sure, hash_maybe=maybe))
            print(f"  hash sure {sure:2d} maybe {maybe:2d}  ARI timed "
                  f"{adjusted_rand_score(bursts, groups):.3f}  untimed "
                  f"{adjusted_rand_score(scenes, free):.3f}")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # a half-made folder is not reused
        raise


# --------------------------------------------------------------------------------- speed


def synthetic(count: int, dim: int = 512, seed: int = 1):  # type: ignore[no-untyped-def]
    """``count`` photos in bursts of 1-8: near-duplicate embeddings, hashes, times."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice(BURST_SIZES, size=count)
    burst_of = np.repeat(np.arange(count), sizes)[:count]
    bursts = burst_of.max() + 1
    # A decaying spectrum, as real embeddings have (a few directions carry most of the
    # variance); isotropic noise would be the k-d tree's worst case, not a photo library.
    scale = 1 / np.sqrt(np.arange(1, dim + 1, dtype=np.float32))
    centres = rng.normal(size=(bursts, dim)).astype(np.float32) * scale
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    embeddings = centres[burst_of] + 0.03 * rng.normal(size=(count, dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    base = rng.integers(0, 2**63, size=bursts, dtype=np.uint64) * np.uint64(2)
    flips = np.zeros(count, dtype=np.uint64)
    for _ in range(4):  # up to four differing bits per frame
        flips |= np.uint64(1) << rng.integers(0, 64, size=count).astype(np.uint64)
    hashes = base[burst_of] ^ flips
    starts = START + np.cumsum(rng.uniform(1.0, 8.0, size=bursts) + 8 * 0.5)
    times = starts[burst_of] + rng.uniform(0, 3.0, size=count)
    return times, hashes, embeddings, burst_of


def speed(count: int) -> None:
    from sklearn.metrics import adjusted_rand_score

    from imgrank.grouping import group_photos

    times, hashes, embeddings, truth = synthetic(count)
    started = time.perf_counter()
    np.sort(times)
    baseline = time.perf_counter() - started
    print(f"\ngrouping {count:,} synthetic photos (512-d embeddings):")
    print(f"  baseline: sorting {count:,} capture times      {baseline * 1000:8.1f} ms")
    for label, t in (("with capture times", times), ("without capture times (NN index)",
                                                     np.full(count, np.nan))):
        started = time.perf_counter()
        groups = group_photos(t, hashes, embeddings)
        seconds = time.perf_counter() - started
        print(f"  {label:40s} {seconds * 1000:8.1f} ms  ({seconds / baseline:,.0f}x baseline; "
              f"ARI {adjusted_rand_score(truth, groups):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model (random weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=100_000, help="photos in the speed test")
    parser.add_argument("--quick", action="store_true", help="10,000 photos in the speed test")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    quality(args.model, args.seed)
    speed(10_000 if args.quick else args.count)


if __name__ == "__main__":
    main()
