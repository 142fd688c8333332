"""Grouping photos into bursts (imgrank.grouping) on synthetic times, hashes and embeddings,
and reading capture times and hashes (imgrank.images.facts)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import PHOTOS
from PIL import Image, ImageEnhance, ImageOps

from imgrank.grouping import GroupingOptions, comparable_times, group_photos, hamming
from imgrank.images.facts import CaptureTime, capture_time, parse_capture_time, perceptual_hash

RNG_SEED = 7


def near(base: int, bits: list[int]) -> int:
    value = base
    for bit in bits:
        value ^= 1 << int(bit)
    return value


def burst_data(rng: np.random.Generator, sizes: list[int], dim: int = 16):
    """Bursts of near-identical hashes and embeddings; different bursts far apart."""
    hashes, embeddings, truth = [], [], []
    for burst, size in enumerate(sizes):
        base = int(rng.integers(0, 2**63)) * 2 + 1
        centre = rng.normal(size=dim)
        for _ in range(size):
            hashes.append(near(base, list(rng.choice(64, size=3, replace=False))))
            embeddings.append(centre + 0.01 * rng.normal(size=dim))
            truth.append(burst)
    e = np.array(embeddings, dtype=np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return np.array(hashes, dtype=np.uint64), e, np.array(truth)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = {(int(x), int(y)) for x, y in zip(a, b, strict=True)}
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_hamming_counts_differing_bits() -> None:
    a = np.array([0, 2**64 - 1, 0b1011], dtype=np.uint64)
    b = np.array([0, 0, 0b0110], dtype=np.uint64)
    assert hamming(a, b).tolist() == [0, 64, 3]


def test_bursts_with_times_are_groups_and_numbered_in_capture_order() -> None:
    rng = np.random.default_rng(RNG_SEED)
    hashes, embeddings, truth = burst_data(rng, [3, 1, 4, 2])
    # Bursts 10 s apart, frames 0.2 s apart; the input is shuffled (file-name order
    # has nothing to do with shooting order).
    times = np.array([10.0 * b + 0.2 * i for b, i in zip(truth, range(len(truth)), strict=True)])
    order = rng.permutation(len(truth))
    groups = group_photos(times[order], hashes[order], embeddings[order])
    assert same_partition(groups, truth[order])
    # Group numbers follow capture time: burst 0 is group 0, burst 3 is group 3.
    assert groups.tolist() == truth[order].tolist()


def test_a_revisited_scene_is_a_group_of_its_own_but_joins_without_times() -> None:
    rng = np.random.default_rng(RNG_SEED)
    hashes, embeddings, truth = burst_data(rng, [3, 2])
    # Scene 0 shot again an hour later: same look, another moment.
    hashes = np.concatenate([hashes, hashes[:2] ^ np.uint64(1 << 40)])
    embeddings = np.concatenate([embeddings, embeddings[:2]])
    times = np.array([0.0, 0.3, 0.6, 10.0, 10.2, 3600.0, 3600.4])
    groups = group_photos(times, hashes, embeddings)
    assert groups.tolist() == [0, 0, 0, 1, 1, 2, 2]
    untimed = group_photos(np.full(7, np.nan), hashes, embeddings)
    assert same_partition(untimed, np.array([0, 0, 0, 1, 1, 0, 0]))


def test_look_alikes_within_the_gap_but_different_scenes_stay_apart() -> None:
    rng = np.random.default_rng(RNG_SEED)
    hashes, embeddings, truth = burst_data(rng, [2, 2])
    times = np.array([0.0, 0.2, 0.5, 0.7])  # all within one gap: only the look separates them
    assert same_partition(group_photos(times, hashes, embeddings), truth)


def test_the_gap_splits_a_look_alike_series() -> None:
    rng = np.random.default_rng(RNG_SEED)
    hashes, embeddings, _truth = burst_data(rng, [4])
    times = np.array([0.0, 0.5, 5.0, 5.5])
    short, long = GroupingOptions(gap=2.0), GroupingOptions(gap=10.0)
    assert group_photos(times, hashes, embeddings, short).tolist() == [0, 0, 1, 1]
    assert group_photos(times, hashes, embeddings, long).tolist() == [0] * 4


def test_a_long_burst_is_one_group_through_its_chain_of_frames() -> None:
    # 30 frames, 0.5 s apart: first and last are 15 s apart, each close to the next;
    # the look drifts a little frame by frame (5 bits per 10 frames).
    base = 0x5A5A5A5A5A5A5A5A
    hashes = np.array([near(base, list(range(i // 2))) for i in range(30)], dtype=np.uint64)
    times = 0.5 * np.arange(30)
    assert set(group_photos(times, hashes, None).tolist()) == {0}


def test_singles_are_groups_of_one_and_timed_and_untimed_photos_never_mix() -> None:
    rng = np.random.default_rng(RNG_SEED)
    hashes, embeddings, _ = burst_data(rng, [1, 1, 1])
    times = np.array([0.0, np.nan, 100.0])
    hashes[1] = hashes[0]  # identical look, but one has no capture time
    groups = group_photos(times, hashes, embeddings)
    assert sorted(groups.tolist()) == [0, 1, 2]
    # Timed groups first in capture order, the untimed photo after them.
    assert groups.tolist() == [0, 2, 1]


def test_a_doubtful_hash_needs_the_embedding_to_agree() -> None:
    base = 0x0F0F0F0F0F0F0F0F
    hashes = np.array([base, near(base, list(range(16)))], dtype=np.uint64)  # 16 bits apart
    times = np.array([0.0, 0.4])
    agree = np.array([[1.0, 0.0], [0.99, 0.141]], dtype=np.float32)
    disagree = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    assert group_photos(times, hashes, agree).tolist() == [0, 0]
    assert group_photos(times, hashes, disagree).tolist() == [0, 1]
    # A far hash is never overruled by the embedding.
    far = np.array([base, ~np.uint64(base)], dtype=np.uint64)
    assert group_photos(times, far, agree).tolist() == [0, 1]


def test_the_nearest_neighbour_index_finds_the_same_groups_as_all_pairs() -> None:
    rng = np.random.default_rng(RNG_SEED)
    sizes = list(rng.choice([1, 2, 3, 5, 8], size=400))
    hashes, embeddings, truth = burst_data(rng, sizes, dim=64)
    untimed = np.full(truth.size, np.nan)
    exact = group_photos(untimed, hashes, embeddings)
    indexed = group_photos(untimed, hashes, embeddings, GroupingOptions(exact_limit=0))
    assert same_partition(indexed, exact)
    # Random 64-bit hashes of different bursts can fall within the threshold by chance
    # (about once in 100,000 pairs): all but a merge or two are the true bursts.
    assert len(sizes) - 2 <= len(set(exact.tolist())) <= len(sizes)


def test_utc_when_every_camera_says_its_offset_local_clock_otherwise() -> None:
    paris = CaptureTime(local=7200.0, offset_minutes=120)  # 02:00 in Paris = 00:00 UTC
    london = CaptureTime(local=60.0, offset_minutes=0)
    assert comparable_times([paris, london, None]).tolist()[:2] == [0.0, 60.0]
    unknown_zone = CaptureTime(local=100.0)
    out = comparable_times([paris, unknown_zone])
    assert out.tolist() == [7200.0, 100.0]


def test_exif_capture_time_with_subseconds_and_offset(tmp_path) -> None:  # type: ignore[no-untyped-def]
    exif = Image.Exif()
    ifd = exif.get_ifd(0x8769)
    ifd[36867] = "2026:06:01 10:00:03"
    ifd[37521] = "25"
    ifd[36881] = "-05:30"
    exif[274] = 6  # rotated: the time must survive the orientation fix
    path = tmp_path / "shot.jpg"
    Image.new("RGB", (40, 30), "gray").save(path, exif=exif.tobytes())

    from imgrank.images.decode import open_image

    captured = capture_time(open_image(path))
    assert captured is not None
    assert captured.local == pytest.approx(1780308003.25)
    assert captured.offset_minutes == -330
    assert captured.utc == pytest.approx(1780308003.25 + 330 * 60)


@pytest.mark.parametrize(
    "text",
    [None, "", "0000:00:00 00:00:00", "    :  :     :  :  ", "2026:13:01 10:00:00", "garbage"],
)
def test_missing_or_unset_camera_clocks_give_no_time(text: str | None) -> None:
    assert parse_capture_time(text, "12", "+01:00") is None


def test_a_photo_without_exif_has_no_capture_time() -> None:
    from imgrank.images.decode import open_image

    assert capture_time(open_image(PHOTOS / "coffee.jpg")) is None


def test_perceptual_hash_tells_a_burst_frame_from_another_photo() -> None:
    photo = Image.open(PHOTOS / "coffee.jpg").convert("RGB")
    w, h = photo.size
    frame = ImageEnhance.Brightness(photo.crop((12, 8, w - 10, h - 6))).enhance(1.2)
    other = Image.open(PHOTOS / "rocket.jpg").convert("RGB")
    same = hamming(np.uint64(perceptual_hash(photo)), np.uint64(perceptual_hash(frame)))
    different = hamming(np.uint64(perceptual_hash(photo)), np.uint64(perceptual_hash(other)))
    mirrored = hamming(
        np.uint64(perceptual_hash(photo)), np.uint64(perceptual_hash(ImageOps.mirror(photo)))
    )
    assert same <= GroupingOptions().hash_sure < different
    assert mirrored > GroupingOptions().hash_maybe
