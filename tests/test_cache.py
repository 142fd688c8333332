"""The embedding cache: hits instead of decoding, invalidation, concurrency, damage.

Part of the failure suite (issue 6): two processes writing at once, a writer
killed mid-run followed by ``PRAGMA integrity_check``, and damaged or foreign
cache files moved aside and rebuilt.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from imgrank.errors import CacheError, UnsafeOperationError
from imgrank.features.cache import SCHEMA_VERSION, EmbeddingCache, FileKey, open_existing
from imgrank.features.pipeline import PipelineStats, score_images
from imgrank.models.scoring import FeatureBatch

SRC = Path(__file__).resolve().parents[1] / "src"

runner = CliRunner()


# ------------------------------------------------------------------------ helpers


def _backbone(tiny_model: Path, *, lazy: bool = True):
    from imgrank.models.clip.build import load_backbone
    from imgrank.models.clip.config import BackboneSpec

    spec = BackboneSpec(model=str(tiny_model), pretrained="none")
    return load_backbone(spec, device="cpu", lazy_image_tower=lazy)


def _zero_shot(backbone, prompt: str):
    from imgrank.models.scoring import ZeroShotScorer

    return ZeroShotScorer.for_backbone(backbone, prompt)


class TokenScorer:
    """A stand-in for an adapter: reads visual tokens only (mean token along a fixed direction)."""

    name = "token probe"
    needs_tokens = True

    def __init__(self, dim: int) -> None:
        self.direction = np.random.default_rng(0).standard_normal(dim).astype(np.float32)

    def score(self, batch: FeatureBatch) -> np.ndarray:
        assert batch.tokens is not None, "an adapter scorer must receive tokens"
        return batch.tokens.mean(axis=1) @ self.direction


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("a cache hit must not decode the photo")

    monkeypatch.setattr("imgrank.images.decode.open_image", refuse)


def _scores(result: list[tuple[Path, float]]) -> dict[str, float]:
    return {path.name: score for path, score in result}


def _same_scores(got: dict[str, float], expected: dict[str, float]) -> bool:
    """Same files, same scores up to float noise: batches of another composition (cached and
    computed images mixed) can change the last bits of a matrix product."""
    return got.keys() == expected.keys() and all(
        got[name] == pytest.approx(expected[name], abs=1e-6) for name in got
    )


def _write_entries(cache: EmbeddingCache, count: int, tag: str = "a") -> int:
    model = cache.model_id("fingerprint-" + tag, "test model")
    for i in range(count):
        key = FileKey(f"/photos/{tag}/{i}.jpg", 1000 + i, 10**18 + i, 7000 + i)
        cache.put(model, key, np.full(8, i, np.float32), np.full((4, 8), i, np.float32))
    cache.flush()
    return model


# --------------------------------------------------------------- what users notice


def test_resort_by_a_new_prompt_decodes_nothing_and_builds_no_image_tower(
    photo_dir: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgrank.models.clip.build import image_tower_built

    paths = sorted(photo_dir.glob("*.jpg"))
    db = tmp_path / "cache.sqlite3"
    first = _backbone(tiny_model)
    with EmbeddingCache.open(db) as cache:
        stats = PipelineStats()
        score_images(paths, first, _zero_shot(first, "image quality"), cache=cache, stats=stats)
    assert (stats.cache_hits, stats.cache_misses) == (0, len(paths))
    assert image_tower_built(first)

    # What the new prompt gives when everything is computed from the photos.
    expected = _scores(score_images(paths, first, _zero_shot(first, "sharpness")))

    _forbid_decoding(monkeypatch)
    second = _backbone(tiny_model)
    with EmbeddingCache.open(db) as cache:
        stats = PipelineStats()
        result = score_images(
            paths, second, _zero_shot(second, "sharpness"), cache=cache, stats=stats
        )
    assert (stats.cache_hits, stats.cache_misses) == (len(paths), 0)
    assert not image_tower_built(second), "a fully cached re-sort must not build the image tower"
    assert _same_scores(_scores(result), expected)


def test_a_changed_photo_is_embedded_again(
    photo_dir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    from PIL import Image

    paths = sorted(photo_dir.glob("*.jpg"))
    backbone = _backbone(tiny_model, lazy=False)
    scorer = _zero_shot(backbone, "image quality")
    db = tmp_path / "cache.sqlite3"
    with EmbeddingCache.open(db) as cache:
        score_images(paths, backbone, scorer, cache=cache)

    # Replace one photo by another picture under the same name.
    changed = paths[0]
    Image.open(paths[1]).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(changed, quality=80)
    with EmbeddingCache.open(db) as cache:
        stats = PipelineStats()
        result = score_images(paths, backbone, scorer, cache=cache, stats=stats)
    assert (stats.cache_hits, stats.cache_misses) == (len(paths) - 1, 1)
    assert _same_scores(_scores(result), _scores(score_images(paths, backbone, scorer)))

    # Size, mtime and inode are compared: touching the file invalidates it too.
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    with EmbeddingCache.open(db) as cache:
        stats = PipelineStats()
        score_images(paths, backbone, scorer, cache=cache, stats=stats)
    assert stats.cache_misses == 1


def _same_size_and_mtime(first: Path, second: Path) -> None:
    """Pad the smaller JPEG (decoders ignore bytes after the end marker) and copy the mtime."""
    small, large = sorted((first, second), key=lambda p: p.stat().st_size)
    with open(small, "ab") as handle:
        handle.write(b"\0" * (large.stat().st_size - small.stat().st_size))
    stamp = large.stat().st_mtime_ns
    for path in (first, second):
        os.utime(path, ns=(stamp, stamp))


def test_two_photos_that_swap_names_are_not_served_each_others_features(
    photo_dir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """Issue 17 item 1: size and mtime survive a rename, the inode does not stay with the name."""
    paths = sorted(photo_dir.glob("*.jpg"))
    first, second = paths[0], paths[1]
    _same_size_and_mtime(first, second)
    backbone = _backbone(tiny_model, lazy=False)
    scorer = _zero_shot(backbone, "image quality")
    db = tmp_path / "cache.sqlite3"
    with EmbeddingCache.open(db) as cache:
        before = _scores(score_images(paths, backbone, scorer, cache=cache))
    assert abs(before[first.name] - before[second.name]) > 1e-3

    parked = photo_dir / "parked.tmp"
    first.rename(parked)
    second.rename(first)
    parked.rename(second)  # `mv`, or imgrank's own `--name-template "{rank}{ext}"`
    assert first.stat().st_size == second.stat().st_size
    assert first.stat().st_mtime_ns == second.stat().st_mtime_ns

    with EmbeddingCache.open(db) as cache:
        stats = PipelineStats()
        after = _scores(score_images(paths, backbone, scorer, cache=cache, stats=stats))
    assert (stats.cache_hits, stats.cache_misses) == (len(paths) - 2, 2)
    # Batches of other sizes than the first run's: equal up to float rounding.
    assert after[first.name] == pytest.approx(before[second.name], abs=1e-5)
    assert after[second.name] == pytest.approx(before[first.name], abs=1e-5)
    uncached = _scores(score_images(paths, backbone, scorer))
    assert after == pytest.approx(uncached, abs=1e-5)


_V1_LAYOUT = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE models (id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE,"
    " description TEXT NOT NULL, created_at REAL NOT NULL, last_used_at REAL NOT NULL)",
    "CREATE TABLE entries (id INTEGER PRIMARY KEY,"
    " model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,"
    " path BLOB NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
    " pooled BLOB NOT NULL, tokens BLOB, token_count INTEGER, token_dim INTEGER,"
    " tokens_dtype TEXT, created_at REAL NOT NULL, UNIQUE (model_id, path))",
)


def _version_1_cache(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA application_id = 1229801298")  # "IMGR"
    for statement in _V1_LAYOUT:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (1)")
    conn.execute("INSERT INTO models VALUES (1, 'fp', 'old model', 0, 0)")
    conn.execute(
        "INSERT INTO entries (model_id, path, size, mtime_ns, pooled, created_at)"
        " VALUES (1, ?, 10, 20, ?, 0)",
        (b"/photos/a.jpg", np.zeros(8, np.float32).tobytes()),
    )
    conn.commit()
    conn.close()


@pytest.mark.parametrize("opener", ["sort", "upkeep"])
def test_a_version_1_cache_is_upgraded_in_place_and_its_unverifiable_entries_dropped(
    tmp_path: Path, opener: str
) -> None:
    db = tmp_path / "cache.sqlite3"
    _version_1_cache(db)
    warnings: list[str] = []
    cache = (
        EmbeddingCache.open(db, on_warning=warnings.append)
        if opener == "sort"
        else open_existing(db)
    )
    with cache:
        summary = cache.summary()
        assert summary.schema_version == SCHEMA_VERSION == 3
        assert summary.entries == 0, "a version 1 entry cannot tell a swapped file from its own"
        assert [m.fingerprint for m in summary.models] == ["fp"]
        model = cache.model_id("fp", "old model")
        key = FileKey("/photos/a.jpg", 10, 20, 30)
        cache.put(model, key, np.ones(8, np.float32))
        cache.flush()
        assert list(cache.get_many(model, [key])) == ["/photos/a.jpg"]
        assert cache.prune().missing == 1  # prune reads the new column too
    assert (
        warnings == []
        and sorted(
            p.name
            for p in tmp_path.iterdir()
            if "sqlite3." in p.name and not p.name.endswith(("-wal", "-shm"))
        )
        == []
    )


def test_adapter_style_scorers_run_from_tokens_cached_by_a_zero_shot_sort(
    photo_dir: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = sorted(photo_dir.glob("*.jpg"))
    backbone = _backbone(tiny_model, lazy=False)
    token_scorer = TokenScorer(dim=32)
    expected = _scores(score_images(paths, backbone, token_scorer))

    db = tmp_path / "cache.sqlite3"
    with EmbeddingCache.open(db) as cache:
        score_images(paths, backbone, _zero_shot(backbone, "image quality"), cache=cache)

    _forbid_decoding(monkeypatch)
    with EmbeddingCache.open(db) as cache:
        stats = PipelineStats()
        result = _scores(score_images(paths, backbone, token_scorer, cache=cache, stats=stats))
    assert stats.cache_hits == len(paths)
    # Tokens are stored as float16: close, and in the same order.
    assert result.keys() == expected.keys()
    np.testing.assert_allclose(
        [result[k] for k in expected], list(expected.values()), rtol=2e-3, atol=2e-3
    )
    assert sorted(result, key=result.get) == sorted(expected, key=expected.get)


def test_an_interrupted_run_keeps_what_it_finished(
    photo_dir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    paths = sorted(photo_dir.glob("*.jpg"))
    backbone = _backbone(tiny_model, lazy=False)
    inner = _zero_shot(backbone, "image quality")

    class InterruptedScorer:
        name, needs_tokens = "interrupted", False

        def __init__(self) -> None:
            self.calls = 0

        def score(self, batch: FeatureBatch) -> np.ndarray:
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return inner.score(batch)

    db = tmp_path / "cache.sqlite3"
    # commit_every is far above the run's size: only the final flush can save the work.
    with (
        EmbeddingCache.open(db, commit_every=10_000) as cache,
        pytest.raises(KeyboardInterrupt),
    ):
        score_images(paths, backbone, InterruptedScorer(), cache=cache, batch_size=1)

    with EmbeddingCache.open(db) as cache:
        stats = PipelineStats()
        score_images(paths, backbone, inner, cache=cache, stats=stats, batch_size=1)
    # The two batches finished before Ctrl-C were kept, although no commit was due.
    assert stats.cache_hits == 2 and stats.cache_misses == 2


def test_names_that_are_not_utf8_are_cached(tiny_model: Path, tmp_path: Path) -> None:
    if sys.platform == "darwin" or sys.platform.startswith("win"):
        pytest.skip("file systems here only allow valid Unicode names")
    from PIL import Image

    folder = tmp_path / "odd"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9 photo.jpg")  # Latin-1 bytes: not valid UTF-8
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / name)
    backbone = _backbone(tiny_model, lazy=False)
    scorer = _zero_shot(backbone, "image quality")
    db = tmp_path / "cache.sqlite3"
    for expected_hits in (0, 1):
        with EmbeddingCache.open(db) as cache:
            stats = PipelineStats()
            score_images([folder / name], backbone, scorer, cache=cache, stats=stats)
        assert stats.cache_hits == expected_hits


# -------------------------------------------------------------------- the CLI


def test_sort_uses_the_cache_and_cache_commands_report_it(
    photo_dir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    from conftest import tiny_args

    from imgrank.cli import app
    from imgrank.paths import default_cache_db

    base = ["sort", str(photo_dir), "--by", "image quality", *tiny_args(tiny_model)]
    result = runner.invoke(app, [*base, "--no-cache"])
    assert result.exit_code == 0, result.output
    assert not default_cache_db().exists(), "--no-cache must not create a cache"

    first = runner.invoke(app, base)
    assert first.exit_code == 0, first.output
    assert default_cache_db().exists()
    # The cache does not change the ranking (scores compared up to float noise).
    ranked = [line.rsplit(",", 1)[-1] for line in first.stdout.splitlines()]
    assert ranked == [line.rsplit(",", 1)[-1] for line in result.stdout.splitlines()]
    assert [float(line.split(",")[1]) for line in first.stdout.splitlines()[1:]] == pytest.approx(
        [float(line.split(",")[1]) for line in result.stdout.splitlines()[1:]], abs=2e-6
    )

    own = tmp_path / "mine.sqlite3"
    assert runner.invoke(app, [*base, "--cache", str(own)]).exit_code == 0
    assert own.exists()

    both = runner.invoke(app, [*base, "--cache", str(own), "--no-cache"])
    assert both.exit_code == 2 and "contradict" in both.stderr

    info = runner.invoke(app, ["cache", "info", "--json", "--check"])
    assert info.exit_code == 0, info.output
    import json

    record = json.loads(info.stdout)
    assert record["entries"] == 4 and record["integrity"] == ["ok"]
    (model,) = record["models"]
    assert "tiny-clip" in model["description"] and model["bytes_per_entry"] > 32 * 4

    (photo_dir / "rocket.jpg").unlink()
    pruned = runner.invoke(app, ["cache", "prune"])
    assert pruned.exit_code == 0 and "pruned 1 entry of missing files" in pruned.stderr
    assert (photo_dir / "coffee.jpg").exists(), "prune never touches a photo"
    cleared = runner.invoke(app, ["cache", "clear"])
    assert cleared.exit_code == 0 and "cleared 3 entries" in cleared.stderr
    info = runner.invoke(app, ["cache", "info"])
    assert "entries: 0" in info.stdout


def test_cache_commands_without_a_cache_say_so(tmp_path: Path) -> None:
    from imgrank.cli import app

    missing = tmp_path / "none.sqlite3"
    for command in ("info", "prune", "clear"):
        result = runner.invoke(app, ["cache", command, "--cache", str(missing)])
        assert result.exit_code == 0
        assert "no embedding cache" in result.output
    assert not missing.exists()


@pytest.mark.slow  # two interpreters importing torch on a shared 2-core machine: ~15 s
def test_two_sort_processes_on_one_cache_both_succeed(
    photo_dir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    from conftest import tiny_args

    db = tmp_path / "shared.sqlite3"
    command = [
        sys.executable, "-c", "from imgrank.cli import main; main()",
        "sort", str(photo_dir), "--by", "image quality",
        *tiny_args(tiny_model), "--cache", str(db), "--batch-size", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    assert outputs[0][0] == outputs[1][0] and outputs[0][0].count(b"\n") == 5
    with open_existing(db) as cache:
        assert cache.summary().entries == 4
        assert cache.integrity_check() == ["ok"]


# ------------------------------------------------------ the failure suite (issue 6)

_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from imgrank.features.cache import EmbeddingCache, FileKey

    path, tag, count, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with EmbeddingCache.open(path, commit_every=every) as cache:
        model = cache.model_id("shared-fingerprint", "test model")
        i = 0
        while count < 0 or i < count:
            key = FileKey(f"/photos/{tag}/{i}.jpg", 1000 + i, 10**18 + i, 7000 + i)
            cache.put(model, key, np.full(8, i, np.float32), np.random.rand(49, 64))
            i += 1
            if i % every == 0:
                print(i, flush=True)  # the rows up to i are committed
    """
)


def _writer(db: Path, tag: str, count: int, every: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db), tag, str(count), str(every)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    db = tmp_path / "cache.sqlite3"
    # Small commits so that the two writers' transactions interleave many times.
    writers = [_writer(db, tag, 400, 8) for tag in ("left", "right")]
    for proc in writers:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    with open_existing(db) as cache:
        summary = cache.summary()
        assert summary.entries == 800
        assert [m.entries for m in summary.models] == [800]  # one model row, not two
        assert cache.integrity_check() == ["ok"]


def test_a_killed_writer_leaves_a_sound_cache(tmp_path: Path) -> None:
    db = tmp_path / "cache.sqlite3"
    proc = _writer(db, "killed", -1, 5)
    committed = 0
    assert proc.stdout is not None
    while committed < 60:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else "writer ended early"
        committed = int(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    with EmbeddingCache.open(db) as cache:
        assert cache.summary().entries >= committed  # every committed row survived
        _write_entries(cache, 10, tag="after")  # and the cache takes new writes
        assert cache.integrity_check() == ["ok"]


def _default_db() -> Path:
    from imgrank.paths import default_cache_db

    db = default_cache_db()  # under this test's own IMGRANK_HOME
    db.parent.mkdir(parents=True, exist_ok=True)
    return db


def test_a_garbage_file_at_the_default_location_is_moved_aside_and_rebuilt() -> None:
    db = _default_db()
    garbage = os.urandom(8192)
    db.write_bytes(garbage)
    warnings: list[str] = []
    with EmbeddingCache.open(db, on_warning=warnings.append) as cache:
        _write_entries(cache, 3)
        assert cache.summary().entries == 3
    (message,) = warnings
    asides = [p for p in db.parent.iterdir() if p.name.startswith(f"{db.name}.broken-")]
    assert len(asides) == 1 and str(asides[0]) in message
    assert asides[0].read_bytes() == garbage, "the damaged file is kept as it was"


@pytest.mark.parametrize("kind", ["photo", "foreign", "garbage"])
def test_a_named_cache_path_that_is_not_an_imgrank_cache_is_refused_untouched(
    photo_dir: Path, tmp_path: Path, tiny_model: Path, kind: str
) -> None:
    """Issue 17 item 4: `--cache photos/c00.jpg` moved the photo out of the ranking."""
    if kind == "photo":
        db = sorted(photo_dir.glob("*.jpg"))[0]
    elif kind == "foreign":
        db = tmp_path / "notes.db"
        conn = sqlite3.connect(db)
        conn.execute("CREATE TABLE notes (text TEXT)")
        conn.commit()
        conn.close()
    else:
        db = tmp_path / "mine.sqlite3"
        db.write_bytes(os.urandom(4096))
    before = sorted(p.name for p in db.parent.iterdir()), db.read_bytes()
    with pytest.raises(UnsafeOperationError, match="left untouched"):
        EmbeddingCache.open(db)

    from conftest import tiny_args

    from imgrank.cli import app

    result = runner.invoke(
        app, ["sort", str(photo_dir), "--by", "q", *tiny_args(tiny_model), "--cache", str(db)]
    )
    assert result.exit_code == 6, result.output
    assert str(db) in result.stderr and "left untouched" in result.stderr
    assert (sorted(p.name for p in db.parent.iterdir()), db.read_bytes()) == before


def test_a_truncated_cache_is_moved_aside_and_the_sort_goes_on(
    photo_dir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    db = tmp_path / "cache.sqlite3"
    with EmbeddingCache.open(db) as cache:
        _write_entries(cache, 300)
    with open(db, "r+b") as handle:
        handle.truncate(db.stat().st_size // 2)
    warnings: list[str] = []
    paths = sorted(photo_dir.glob("*.jpg"))
    backbone = _backbone(tiny_model, lazy=False)
    scorer = _zero_shot(backbone, "image quality")
    with EmbeddingCache.open(db, on_warning=warnings.append) as cache:
        result = score_images(paths, backbone, scorer, cache=cache, on_warning=warnings.append)
    assert _same_scores(_scores(result), _scores(score_images(paths, backbone, scorer)))
    assert warnings and "broken-" in warnings[0]
    with open_existing(db) as cache:
        assert cache.integrity_check() == ["ok"] and cache.summary().entries == 4


def test_another_programs_database_at_the_default_location_is_moved_aside_not_used() -> None:
    db = _default_db()
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE photos (name TEXT)")
    conn.execute("INSERT INTO photos VALUES ('keep me')")
    conn.commit()
    conn.close()
    with pytest.raises(CacheError, match="another program"):
        open_existing(db)  # upkeep commands never move anything
    warnings: list[str] = []
    with EmbeddingCache.open(db, on_warning=warnings.append) as cache:
        assert cache.summary().entries == 0
    (aside,) = [
        p
        for p in db.parent.iterdir()
        if ".foreign-" in p.name and not p.name.endswith(("-wal", "-shm"))
    ]
    rows = sqlite3.connect(aside).execute("SELECT name FROM photos").fetchall()
    assert rows == [("keep me",)] and "another program" in warnings[0]


def test_a_cache_from_a_newer_imgrank_is_left_alone(
    photo_dir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    db = tmp_path / "cache.sqlite3"
    with EmbeddingCache.open(db) as cache:
        _write_entries(cache, 2)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    before = db.read_bytes()
    with pytest.raises(CacheError, match="newer imgrank"):
        EmbeddingCache.open(db)
    assert db.read_bytes() == before

    from conftest import tiny_args

    from imgrank.cli import app

    result = runner.invoke(
        app,
        ["sort", str(photo_dir), "--by", "q", *tiny_args(tiny_model), "--cache", str(db)],
    )
    assert result.exit_code == 0, result.output  # the sort goes on without the cache
    assert "newer imgrank" in result.stderr and "without the cache" in result.stderr


def test_a_cache_locked_too_long_costs_entries_not_the_run(tmp_path: Path) -> None:
    db = tmp_path / "cache.sqlite3"
    warnings: list[str] = []
    with EmbeddingCache.open(db, busy_timeout=0.2, on_warning=warnings.append) as cache:
        model = cache.model_id("fingerprint", "test model")
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            cache.put(model, FileKey("/p/1.jpg", 1, 1, 1), np.zeros(8, np.float32))
            assert cache.flush() == 0
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert warnings and "locked" in warnings[0]
        cache.put(model, FileKey("/p/2.jpg", 2, 2, 2), np.zeros(8, np.float32))
        assert cache.flush() == 1  # later writes go through again


def test_a_prune_in_another_process_during_a_sort_loses_none_of_its_writes(
    tmp_path: Path,
) -> None:
    """Issue 17 item 5: prune deleted the model row a running sort had not written to yet."""
    db = tmp_path / "cache.sqlite3"
    warnings: list[str] = []
    with EmbeddingCache.open(db) as earlier:  # the model is in the cache, for a photo now gone
        gone = FileKey("/photos/gone.jpg", 1, 1, 1)
        earlier.put(earlier.model_id("sorting-model", "the sort's model"), gone, np.ones(8, np.float32))
    with EmbeddingCache.open(db, commit_every=1000, on_warning=warnings.append) as sort:
        model = sort.model_id("sorting-model", "the sort's model")
        keys = [FileKey(f"/photos/{i}.jpg", 100 + i, 10**18 + i, 500 + i) for i in range(3)]
        sort.put(model, keys[0], np.full(8, 0, np.float32))  # buffered, not written yet

        with open_existing(db) as upkeep:  # `imgrank cache prune` at this moment
            assert upkeep.prune().models_removed == 1  # the sort's model had no entries left
            # Another sort registers another model meanwhile: SQLite may reuse the freed id.
            other = upkeep.model_id("other-model", "another model")
            upkeep.put(other, FileKey("/photos/0.jpg", 100, 10**18, 500), np.ones(8, np.float32))
            upkeep.flush()

        for i, key in enumerate(keys[1:], start=1):
            sort.put(model, key, np.full(8, i, np.float32))
        assert sort.flush() == 3
        found = sort.get_many(model, keys)
        assert sorted(found) == sorted(k.path for k in keys)
        for i, key in enumerate(keys):
            np.testing.assert_array_equal(found[key.path].pooled, np.full(8, i, np.float32))
    assert warnings == []
    with open_existing(db) as cache:
        summary = cache.summary()
        assert {m.fingerprint: m.entries for m in summary.models} == {
            "sorting-model": 3,
            "other-model": 1,
        }


# ------------------------------------------------------------ giving space back (issue 16, item 4)


def test_prune_and_clear_give_the_space_back_and_report_the_true_figure(tmp_path: Path) -> None:
    from imgrank.cli import app
    from imgrank.cli.cache_cmd import _size
    from imgrank.features.cache import disk_usage

    for command in ("prune", "clear"):
        db = tmp_path / f"{command}.sqlite3"
        with EmbeddingCache.open(db) as cache:
            _write_entries(cache, 3000)  # their /photos/... files do not exist: prune drops them
        before = disk_usage(db)
        assert before > 500_000
        result = runner.invoke(app, ["cache", command, "--cache", str(db)])
        assert result.exit_code == 0, result.output
        after = disk_usage(db)
        assert after < before / 10, (command, before, after)
        message = " ".join(result.stderr.split())
        assert f"{_size(before - after)} freed (cache {_size(before)} -> {_size(after)})" in message


def test_a_run_that_caches_nothing_leaves_no_empty_model_row(tmp_path: Path) -> None:
    from conftest import tiny_args

    from imgrank.cli import app

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.jpg").write_bytes(b"not a photo")
    db = tmp_path / "cache.sqlite3"
    failed = runner.invoke(app, ["sort", str(broken), "--by", "x", "--cache", str(db), *tiny_args()])
    assert failed.exit_code == 3
    with EmbeddingCache.open(db) as cache:
        assert cache.summary().models == []
        # A model is written with its first entries, and found again by its fingerprint.
        model = _write_entries(cache, 2)
        keys = [FileKey(f"/photos/a/{i}.jpg", 1000 + i, 10**18 + i, 7000 + i) for i in range(2)]
        assert len(cache.get_many(model, keys)) == 2
        assert len(cache.get_many(cache.model_id("fingerprint-a", "test model"), keys)) == 2
    with EmbeddingCache.open(db) as cache:
        (only,) = cache.summary().models
        assert only.entries == 2


def test_a_cache_with_damaged_pages_is_one_message_for_upkeep_and_set_aside_by_a_sort(
    photo_dir: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """Issue 17 item 11: upkeep commands gave a traceback; sort warned on every run."""
    from conftest import tiny_args

    from imgrank.cli import app

    db = tmp_path / "cache.sqlite3"
    sort = ["sort", str(photo_dir), "--by", "q", *tiny_args(tiny_model), "--cache", str(db)]
    assert runner.invoke(app, sort).exit_code == 0
    data = bytearray(db.read_bytes())  # header and schema intact, the stored features damaged
    for i in range(len(data) * 2 // 3, len(data), 13):
        data[i] ^= 0x5A
    db.write_bytes(bytes(data))

    for command in (["info"], ["prune"], ["clear"]):
        result = runner.invoke(app, ["cache", *command, "--cache", str(db)])
        assert result.exit_code == CacheError.exit_code, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "is damaged" in result.stderr and str(db) in result.stderr
    assert db.read_bytes() == bytes(data), "upkeep commands change nothing"

    first = runner.invoke(app, sort)
    assert first.exit_code == 0 and first.stdout.count("\n") == 5, first.output
    # SQLite's words depend on which page the damage hit ("malformed", or text where an
    # integer belongs): imgrank's own message is what the user is promised.
    assert "is damaged" in first.stderr and "moved to" in first.stderr
    asides = [
        p
        for p in tmp_path.iterdir()
        if ".broken-" in p.name and not p.name.endswith(("-wal", "-shm"))
    ]
    assert len(asides) == 1, sorted(p.name for p in tmp_path.iterdir())
    # Set aside, not deleted (SQLite may have rewritten the pages it could, so no byte check).
    second = runner.invoke(app, sort)
    assert second.exit_code == 0 and "cache" not in second.stderr.replace("--cache", ""), (
        second.stderr
    )
