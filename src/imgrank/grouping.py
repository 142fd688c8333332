"""Grouping photos into bursts: capture time and look-alike, for ``imgrank cull``.

Two photos are linked when they look alike and, if both have a capture time, were
taken within ``gap`` seconds of each other; a group is a connected set of links
(so a burst of twenty frames is one group although its first and last frames are
seconds apart, and two bursts shot at the same moment by two cameras stay two
groups). Nothing depends on the order the photos are given in: not on file names,
not on the order a folder lists them.

"Look alike" is decided by the perceptual hash first and the embedding second:

* at most ``hash_sure`` differing bits of 64: alike, whatever the embedding says;
* at most ``hash_maybe`` bits, for two photos taken within the gap: alike when the
  embeddings' cosine similarity is at least ``min_cosine`` too;
* more: not alike. The embedding never overrides a clear "different" from the
  hash, because with random weights, or a head trained for another purpose, many
  pairs of different photos have a high cosine.

Photos without a capture time are grouped among themselves by the hash's "sure"
zone alone: with no moment to vouch for a doubtful pair, linking doubtful pairs
across a whole folder chains different scenes together (measured: adjusted Rand
index 0.29 instead of 0.91 on the benchmark). The thresholds are argued from the
measurements of ``benchmarks/bench_cull.py`` in docs/cull.md.

Up to :data:`EXACT_LIMIT` of them every pair is compared; beyond, candidate pairs
come from two nearest-neighbour indexes (a k-d tree over the embeddings reduced to
a few principal components, and buckets of equal 16-bit slices of the hash), and
only candidates are compared, so 100,000 photos group in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from imgrank.images.facts import CaptureTime

#: Seconds between two frames that may still belong to one burst. Bursts are several
#: frames a second and a photographer re-framing a shot takes a second or two; a new
#: scene takes longer. Look-alike decides within the gap, so a generous gap costs
#: little (measured in benchmarks/bench_cull.py).
DEFAULT_GAP = 2.0

#: Hash bits (of 64) under which two photos are alike whatever the embedding says.
DEFAULT_HASH_SURE = 12
#: Hash bits up to which the embedding decides.
DEFAULT_HASH_MAYBE = 22
#: Cosine similarity of the embeddings that confirms a doubtful hash.
DEFAULT_MIN_COSINE = 0.9

#: Untimed photos up to this count are compared pair by pair (exact, and fast enough:
#: two million pairs); above, through the nearest-neighbour indexes.
EXACT_LIMIT = 2048
#: Neighbours looked up per photo in the embedding index.
DEFAULT_NEIGHBOURS = 8
#: Principal components of the embedding kept for the k-d tree. k-d trees lose their
#: edge quickly with dimensions (measured on 100,000 photos: 16 components took 7x as
#: long as 8 and found 5 % more burst pairs); near-duplicates are close in every
#: projection.
INDEX_COMPONENTS = 8
#: Photos the principal components are estimated from.
_PCA_SAMPLE = 5000
#: The k-d tree's approximation factor (scipy's ``eps``), see _embedding_neighbour_pairs.
_APPROXIMATION = 3.0
#: Frames within the gap compared with each frame, at most (a 30 fps video export
#: would otherwise compare 60 x 60 frames per second of footage).
MAX_WINDOW = 64
#: Photos sharing one 16-bit slice of hash compared with each other, at most per photo.
_BUCKET_SPAN = 24

_PAIR_CHUNK = 65536


@dataclass(frozen=True)
class GroupingOptions:
    """How photos are grouped (see the module docstring)."""

    gap: float = DEFAULT_GAP
    hash_sure: int = DEFAULT_HASH_SURE
    hash_maybe: int = DEFAULT_HASH_MAYBE
    min_cosine: float = DEFAULT_MIN_COSINE
    neighbours: int = DEFAULT_NEIGHBOURS
    exact_limit: int = EXACT_LIMIT
    #: Let the embedding confirm doubtful hashes between untimed photos too (off: it
    #: chains scenes together; kept to measure that in benchmarks/bench_cull.py).
    untimed_doubtful: bool = False

    def __post_init__(self) -> None:
        if not self.gap >= 0:
            raise ValueError("the gap must be zero or more seconds")
        if not 0 <= self.hash_sure <= self.hash_maybe <= 64:
            raise ValueError("hash thresholds must satisfy 0 <= sure <= maybe <= 64")


def comparable_times(captured: Sequence[CaptureTime | None]) -> np.ndarray:
    """Capture times as seconds on one clock; NaN where a photo has none.

    UTC when every timed photo says its offset from UTC (so a trip across time zones
    orders correctly); otherwise the cameras' local clocks for all, since a local
    reading cannot be compared with a UTC one and photos of one shoot share a zone.
    """
    timed = [c for c in captured if c is not None]
    use_utc = bool(timed) and all(c.offset_minutes is not None for c in timed)
    out = np.full(len(captured), np.nan, dtype=np.float64)
    for i, c in enumerate(captured):
        if c is not None:
            out[i] = c.utc if use_utc and c.utc is not None else c.local
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differing bits between uint64 hashes, element-wise."""
    x = np.bitwise_xor(a.astype(np.uint64, copy=False), b.astype(np.uint64, copy=False))
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
    return table[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1)


def group_photos(
    times: np.ndarray,
    hashes: np.ndarray,
    embeddings: np.ndarray | None,
    options: GroupingOptions | None = None,
) -> np.ndarray:
    """Group photos; returns one group number per photo, groups numbered in capture order.

    Args:
        times: (N,) capture times in seconds (:func:`comparable_times`), NaN when unknown.
        hashes: (N,) 64-bit perceptual hashes (``uint64``).
        embeddings: (N, E) L2-normalised embeddings, or None to decide by the hash alone.
        options: thresholds and gap.

    Returns:
        (N,) int64 group numbers from 0: timed groups by their first capture time, then
        the groups of untimed photos by their first member's position in the input
        (callers pass photos sorted by path, so that order is stable).
    """
    options = options or GroupingOptions()
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1)
    count = times.shape[0]
    if hashes.shape[0] != count or (embeddings is not None and embeddings.shape[0] != count):
        raise ValueError("times, hashes and embeddings must describe the same photos")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if embeddings is not None:
        embeddings = np.asarray(embeddings, dtype=np.float32)

    timed = np.flatnonzero(~np.isnan(times))
    untimed = np.flatnonzero(np.isnan(times))
    in_window = _time_window_pairs(times, timed, options)
    linked = [in_window[_alike(in_window, hashes, embeddings, options, doubtful=True)]]
    if untimed.size > 1:
        if untimed.size <= options.exact_limit:
            similar = _all_pairs(untimed)
        else:
            similar = _index_pairs(untimed, hashes, embeddings, options)
        doubtful = options.untimed_doubtful
        linked.append(similar[_alike(similar, hashes, embeddings, options, doubtful=doubtful)])
    labels = _components(count, np.concatenate(linked, axis=0))
    return _number_in_capture_order(labels, times)


def _time_window_pairs(
    times: np.ndarray, timed: np.ndarray, options: GroupingOptions
) -> np.ndarray:
    """Pairs of timed photos at most ``gap`` seconds apart (each with its next MAX_WINDOW)."""
    if timed.size < 2:
        return np.zeros((0, 2), dtype=np.int64)
    order = timed[np.argsort(times[timed], kind="stable")]
    sorted_times = times[order]
    last = np.searchsorted(sorted_times, sorted_times + options.gap, side="right")
    found = []
    positions = np.arange(order.size)
    for offset in range(1, MAX_WINDOW + 1):
        ok = positions + offset < last
        if not ok.any():
            break
        firsts = positions[ok]
        found.append(np.stack([order[firsts], order[firsts + offset]], axis=1))
    return np.concatenate(found, axis=0) if found else np.zeros((0, 2), dtype=np.int64)


def _all_pairs(members: np.ndarray) -> np.ndarray:
    first, second = np.triu_indices(members.size, k=1)
    return np.stack([members[first], members[second]], axis=1)


def _index_pairs(
    members: np.ndarray,
    hashes: np.ndarray,
    embeddings: np.ndarray | None,
    options: GroupingOptions,
) -> np.ndarray:
    """Candidate pairs among ``members`` from the nearest-neighbour indexes."""
    found = [_hash_bucket_pairs(members, hashes[members])]
    if embeddings is not None and options.neighbours > 0:
        found.append(_embedding_neighbour_pairs(members, embeddings[members], options.neighbours))
    # Duplicates (a pair found by both indexes, or from both ends) are left in: the
    # connected components do not mind, and removing them cost more than checking them.
    return np.concatenate(found, axis=0)


def _hash_bucket_pairs(members: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Pairs that agree on one of the hash's four 16-bit slices.

    By the pigeonhole principle two hashes at most 3 bits apart agree on one slice;
    in practice most burst pairs further apart do too. A slice shared by very many
    photos (a dark sky) pairs each photo with its next :data:`_BUCKET_SPAN` only.
    """
    found = []
    for shift in (0, 16, 32, 48):
        slices = (hashes >> np.uint64(shift)) & np.uint64(0xFFFF)
        order = np.argsort(slices, kind="stable")
        values = slices[order]
        for offset in range(1, _BUCKET_SPAN + 1):
            if offset >= order.size:
                break
            same = values[:-offset] == values[offset:]
            if not same.any():
                break
            found.append(
                np.stack([members[order[:-offset][same]], members[order[offset:][same]]], axis=1)
            )
    return np.concatenate(found, axis=0) if found else np.zeros((0, 2), dtype=np.int64)


def _embedding_neighbour_pairs(
    members: np.ndarray, embeddings: np.ndarray, neighbours: int
) -> np.ndarray:
    """Each photo with its approximate nearest neighbours in a k-d tree over principal components.

    The components come from a sample of at most :data:`_PCA_SAMPLE` photos (a
    512x512 covariance instead of a 100,000-row SVD). ``eps`` lets the tree return
    neighbours up to ``1 + eps`` times as far as the true ones. Measured on 100,000
    synthetic photos: eps 1 found 95 % of the burst pairs in 6.4 s, eps 3 85 % in
    2.1 s, with the same groups in the end (every burst frame needs only one found
    pair to join its burst, and the hash buckets add their own).
    """
    from scipy.spatial import cKDTree

    k = min(neighbours + 1, members.size)
    mean = embeddings.mean(axis=0, keepdims=True)
    rng = np.random.default_rng(0)
    picked = rng.choice(members.size, size=min(members.size, _PCA_SAMPLE), replace=False)
    sample = (embeddings[picked] - mean).astype(np.float32)
    components = _leading_components(sample, INDEX_COMPONENTS, rng)
    reduced = embeddings @ components - mean @ components  # no centred copy of all rows
    tree = cKDTree(reduced, balanced_tree=False, compact_nodes=False)
    _distances, nearest = tree.query(reduced, k=k, eps=_APPROXIMATION, workers=-1)
    nearest = np.asarray(nearest).reshape(members.size, k)
    first = np.repeat(np.arange(members.size), k)
    second = nearest.reshape(-1)
    keep = first != second
    return np.stack([members[first[keep]], members[second[keep]]], axis=1)


def _leading_components(sample: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """The ``count`` leading principal directions of centred rows, (E, count) float32.

    A randomized range finder (a few products with a thin random matrix, then an
    eigen-decomposition of a tiny matrix) instead of a full 512x512 eigh: on a busy
    2-core machine the full decomposition took 8-11 s in threaded LAPACK, this
    takes milliseconds and finds the same leading directions.
    """
    dim = sample.shape[1]
    width = min(dim, 2 * count + 8)
    basis = sample.T @ (sample @ rng.normal(size=(dim, width)).astype(np.float32))
    for _ in range(3):  # power iterations sharpen the leading directions
        basis, _r = np.linalg.qr(basis)
        basis = sample.T @ (sample @ basis)
    basis, _r = np.linalg.qr(basis)
    projected = sample @ basis
    small = projected.T @ projected
    _values, vectors = np.linalg.eigh(small.astype(np.float64))
    return (basis @ vectors[:, ::-1][:, :count]).astype(np.float32)


def _alike(
    pairs: np.ndarray,
    hashes: np.ndarray,
    embeddings: np.ndarray | None,
    options: GroupingOptions,
    *,
    doubtful: bool,
) -> np.ndarray:
    """Which candidate pairs look alike (see the module docstring).

    ``doubtful``: whether hash distances between ``hash_sure`` and ``hash_maybe`` may be
    confirmed by the embedding (only for pairs that capture times put in one moment).
    """
    if pairs.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    distance = hamming(hashes[pairs[:, 0]], hashes[pairs[:, 1]])
    alike = distance <= options.hash_sure
    if not doubtful or embeddings is None:
        return alike
    doubtful_pairs = np.flatnonzero(
        (distance > options.hash_sure) & (distance <= options.hash_maybe)
    )
    if doubtful_pairs.size:
        for start in range(0, doubtful_pairs.size, _PAIR_CHUNK):
            chunk = doubtful_pairs[start : start + _PAIR_CHUNK]
            cosine = np.einsum(
                "ij,ij->i", embeddings[pairs[chunk, 0]], embeddings[pairs[chunk, 1]]
            )
            alike[chunk] = cosine >= options.min_cosine
    return alike


def _components(count: int, pairs: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ones = np.ones(pairs.shape[0], dtype=np.int8)
    graph = coo_matrix((ones, (pairs[:, 0], pairs[:, 1])), shape=(count, count))
    _n, labels = connected_components(graph, directed=False)
    return labels


def _number_in_capture_order(labels: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Renumber groups: timed groups by earliest time, then untimed by first position."""
    groups = labels.max() + 1
    first_time = np.full(groups, np.inf)
    np.fmin.at(first_time, labels, np.where(np.isnan(times), np.inf, times))
    first_index = np.full(groups, labels.size)
    np.minimum.at(first_index, labels, np.arange(labels.size))
    order = np.lexsort((first_index, first_time))
    rank = np.empty(groups, dtype=np.int64)
    rank[order] = np.arange(groups)
    return rank[labels]
