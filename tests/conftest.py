"""Shared fixtures: an isolated user folder, a tiny random-weight CLIP, real photos.

Every test gets its own IMGRANK_HOME so caches, weights and rename journals
never touch the real user folders (and tests never see each other's files).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
PHOTOS = DATA / "photos"
#: A 32 px ViT with one layer per tower: builds in milliseconds, random weights.
TINY_MODEL = DATA / "tiny-clip.json"
#: Where CI puts the shared folder (reference vectors from the authors' code).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("imgrank-home")
    monkeypatch.setenv("IMGRANK_HOME", str(home))
    # Tests run torch unless they test the automatic ONNX export (tests/test_auto_export.py):
    # otherwise every sort of a tiny model would first export it into this fresh home.
    monkeypatch.setenv("IMGRANK_RUNTIME", "torch")
    return home


@pytest.fixture
def tiny_model() -> Path:
    return TINY_MODEL


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """A folder with the four real CC0 photos."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in sorted(PHOTOS.glob("*.jpg")):
        shutil.copy(photo, folder / photo.name)
    return folder


def tiny_args(tiny_model: Path = TINY_MODEL) -> list[str]:
    """CLI arguments selecting the tiny random-weight model on the CPU."""
    return ["--model", str(tiny_model), "--pretrained", "none", "--device", "cpu"]


@pytest.fixture(scope="session")
def ray_session():  # type: ignore[no-untyped-def]
    """ONE local Ray for the whole test session (starting Ray takes ~10 s on 2 busy cores).

    Two CPUs whatever the machine: one decode task and one encode actor at a time, which
    is what the ray-engine tests need, and it leaves the other helpers' cores alone.
    """
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    pytest.importorskip("ray.data")
    import logging

    from imgrank.engines.ray import quiet_data_context

    if not ray.is_initialized():
        ray.init(
            address="local",  # never a cluster some `ray start` left on this machine
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
    quiet_data_context()
    yield ray
    ray.shutdown()


def run_with_stderr_on_a_tty(args: list[str]) -> tuple[bytes, str]:
    """Run the ``imgrank`` console script with stderr on a pseudo-terminal (where progress and
    the summary appear); returns stdout's bytes and what the terminal showed."""
    import pty

    imgrank = shutil.which("imgrank") or str(Path(sys.executable).parent / "imgrank")
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(
            [imgrank, *args], stdout=subprocess.PIPE, stderr=follower, timeout=300, check=True
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: everything has been read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    return done.stdout, b"".join(chunks).decode(errors="replace")
