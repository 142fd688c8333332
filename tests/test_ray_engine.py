"""The ray engine ranks like the local engine: same order, scores within 1e-5, same skips.

Ray runs on this machine through ONE session fixture (``ray_session`` in conftest);
the two-node test runs a simulated cluster (``ray.cluster_utils.Cluster``) in a
subprocess, since a process joins one Ray cluster at a time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import PHOTOS, TINY_MODEL, tiny_args
from typer.testing import CliRunner

from imgrank.cli import app

runner = CliRunner()


def cli(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [*args, *tiny_args()], catch_exceptions=False)


@pytest.fixture
def mixed_dir(photo_dir: Path) -> Path:
    """The real photos, a PNG copy, and two files no engine can read."""
    from PIL import Image

    with Image.open(PHOTOS / "rocket.jpg") as image:
        image.convert("RGBA").resize((80, 120)).save(photo_dir / "small-rocket.png")
    (photo_dir / "broken.jpg").write_bytes(b"this is not a jpeg")
    (photo_dir / "empty.png").write_bytes(b"")
    return photo_dir


def jsonl(stdout: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in stdout.splitlines()]


# --- refused before Ray starts ------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra", [["--rename"], ["--link", "L"], ["--copy", "C"], ["--xmp", "rating"]]
)
def test_file_changing_options_are_local_only(photo_dir: Path, extra: list[str]) -> None:
    result = cli("sort", str(photo_dir), "--by", "x", "--engine", "ray", *extra)
    assert result.exit_code == 2
    assert "work with the local engine only" in result.stderr
    assert not (photo_dir.parent / "L").exists() and not (photo_dir.parent / "C").exists()


def test_ray_options_need_the_ray_engine(photo_dir: Path) -> None:
    result = cli("sort", str(photo_dir), "--by", "x", "--ray-actors", "2")
    assert result.exit_code == 2
    assert "need --engine ray" in result.stderr
    result = cli("sort", str(photo_dir), "--by", "x", "--engine", "spark")
    # The option is a choice now (declared once in cli/options.py): click's own message.
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "'spark' is not one of 'local'" in message


# --- parity ----------------------------------------------------------------------------------


def test_ray_ranking_equals_the_local_ranking(ray_session, mixed_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    common = ["sort", str(mixed_dir), "--by", "image quality", "--format", "jsonl", "--no-cache"]
    local = cli(*common, "--errors", str(tmp_path / "local-errors.csv"))
    assert local.exit_code == 0, local.stderr
    ray_errors, ray_out = str(tmp_path / "ray-errors.csv"), str(tmp_path / "ray.jsonl")
    ray = cli(
        *common, "--engine", "ray", "--batch-size", "2", "--errors", ray_errors, "-o", ray_out
    )
    assert ray.exit_code == 0, ray.stderr
    local_rows = jsonl(local.stdout)
    ray_rows = jsonl((tmp_path / "ray.jsonl").read_text())
    assert len(local_rows) == 5
    assert [r["path"] for r in ray_rows] == [r["path"] for r in local_rows]  # order identical
    for a, b in zip(ray_rows, local_rows, strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    # Same skipped files, same reasons, same order.
    errors = (tmp_path / "ray-errors.csv").read_text()
    assert errors == (tmp_path / "local-errors.csv").read_text()
    assert "broken.jpg,not an image Pillow can read" in errors
    assert "empty.png,empty file (0 bytes)" in errors


@pytest.mark.slow
def test_ray_writers_top_ascending_and_uri_inputs(
    ray_session, mixed_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("pyarrow")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p.as_uri()}\n" for p in sorted(mixed_dir.iterdir())))
    common = ["--by", "sharpness", "--top", "3", "--ascending", "--format", "paths", "-0"]
    local = cli("sort", "--paths-from", str(listing), *common, "--no-cache")
    ray = cli("sort", "--paths-from", str(listing), *common, "--engine", "ray")
    assert local.exit_code == 0 and ray.exit_code == 0, ray.stderr
    assert ray.stdout == local.stdout
    assert ray.stdout.count("\0") == 3 and ray.stdout.startswith("file:///")


# --- a simulated two-node cluster --------------------------------------------------------------

CLUSTER_SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    from pathlib import Path
    import ray, ray.data
    from ray.cluster_utils import Cluster

    from imgrank.engines.ray import RayRunStats, quiet_data_context, rank_on_ray
    from imgrank.sorter import SortCallbacks, SortRequest, list_inputs

    folder, model = Path(sys.argv[1]), sys.argv[2]
    # Two nodes of 3 logical CPUs: an encode actor of 2 CPUs fits once per node, one CPU
    # per node is left for decode tasks. The 2-core machine is only shared, not split.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
    quiet_data_context()
    # Start processing only once both actors run, so each gets batches to encode.
    ray.data.DataContext.get_current().wait_for_min_actors_s = 300
    request = SortRequest(folder=folder, prompt="image quality", model=model, pretrained="none",
                          device="cpu", batch_size=2, ray_actors=2, ray_cpus_per_actor=2,
                          engine="ray")
    skipped = []
    sources = list_inputs(request, skipped.append)
    stats = RayRunStats()
    scored, _ = rank_on_ray(request, sources, on_skip=skipped.append, callbacks=SortCallbacks(),
                            stats=stats)
    print(json.dumps({"nodes": stats.encode_nodes, "alive": len(ray.nodes()),
                      "scored": {str(p): s for p, s in scored}}))
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_encode_work_runs_on_both_nodes_of_a_two_node_cluster(
    photo_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray.cluster_utils")
    for copy in range(4):  # 20 photos in batches of 2: enough batches for both actors
        for photo in PHOTOS.glob("*.jpg"):
            shutil.copy(photo, photo_dir / f"{copy}-{photo.name}")
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(photo_dir), str(TINY_MODEL)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["alive"] == 2
    assert len(report["nodes"]) == 2, report["nodes"]  # encode batches ran on both nodes
    assert sum(report["nodes"].values()) == 20
    # And the cluster's scores are the local engine's.
    local = cli("sort", str(photo_dir), "--by", "image quality", "--format", "jsonl", "--no-cache")
    for row in jsonl(local.stdout):
        assert report["scored"][row["path"]] == pytest.approx(row["score"], abs=1e-5)


# --- stage sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({"CPU": 2.0}, (1, 1.0, 0.0)),  # this machine: one actor, one CPU left to decode
        ({"CPU": 64.0}, (10, 4.0, 0.0)),  # 2/3 of the CPUs encode, the rest decode
        ({"CPU": 16.0, "GPU": 4.0}, (4, 1.0, 1.0)),  # one actor per GPU
    ],
)
def test_default_pool_sizes_leave_cpus_for_decoding(
    monkeypatch: pytest.MonkeyPatch, resources: dict[str, float], expected: tuple
) -> None:  # type: ignore[type-arg]
    ray = pytest.importorskip("ray")
    from imgrank.engines.ray import RayOptions

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    got = RayOptions().resolved()
    assert (got.actors, got.cpus_per_actor, got.gpus_per_actor) == expected


def test_a_pool_that_starves_decoding_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    from imgrank.engines.ray import RayOptions
    from imgrank.errors import UsageError

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(UsageError, match="leave no CPU of the cluster's 2 for decoding"):
        RayOptions(actors=2, cpus_per_actor=1).resolved()
