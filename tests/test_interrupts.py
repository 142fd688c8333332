"""Ctrl-C at every point of ``imgrank sort --rename --apply`` (issue 16, item 12).

Real SIGINTs to real ``imgrank`` processes: sent by the process to itself just
before or after the k-th call of each step that matters (so every point is hit
exactly, whatever the machine's speed), and from outside at offsets spread over
a whole run. Wherever it lands, the user gets one message and exit 130 (or 0
when the work was over), never a traceback or death by the signal, and the
message matches the folder: nothing renamed, all renamed (and how to undo), or
a run left unfinished (and `imgrank recover`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import PHOTOS, tiny_args

pytestmark = [
    pytest.mark.slow,  # one imgrank process per point: minutes in all
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]

# The child: SIGINT itself before or after the k-th call of one function, then be `imgrank`.
_CHILD = r"""
import atexit, functools, importlib, os, signal, sys, time
point, when, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.argv = ["imgrank", *sys.argv[4:]]

def interrupt():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # let the handler run here, as with a key pressed at this instant

if point == "exit":
    atexit.register(interrupt)
else:
    module, _, name = point.partition(":")
    owner = importlib.import_module(module)
    if "." in name:
        cls, name = name.split(".")
        owner = getattr(owner, cls)
    real = getattr(owner, name)
    calls = [0]

    @functools.wraps(real)
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if when == "before" and calls[0] == k:
            interrupt()
        result = real(*args, **kwargs)
        if when == "after" and calls[0] == k:
            interrupt()
        return result

    setattr(owner, name, wrapped)
from imgrank.__main__ import main
main()
"""

#: (function, before/after, k): every step of a run with four renames, and around it.
POINTS = [
    ("imgrank.files.rename_plan:plan_renames", "after", 1),
    ("imgrank.files.journal:JournalWriter.create", "before", 1),
    ("imgrank.files.journal:JournalWriter.create", "after", 1),
    ("imgrank.files.renaming:rename_noreplace", "before", 1),
    ("imgrank.files.renaming:rename_noreplace", "after", 1),
    ("imgrank.files.renaming:rename_noreplace", "after", 3),
    ("imgrank.files.renaming:rename_noreplace", "after", 4),
    ("imgrank.files.journal:JournalWriter.record_moved", "after", 4),
    ("imgrank.files.journal:JournalWriter.finish", "before", 1),
    ("imgrank.files.journal:JournalWriter.finish", "after", 1),
    ("imgrank.files.renaming:apply_plan", "after", 1),
    ("imgrank.files.writers:write_ranking", "before", 1),
    ("imgrank.files.writers:materialize", "before", 1),
    ("exit", "", 0),
]


def _folder(tmp_path: Path) -> tuple[Path, Counter[bytes]]:
    folder = tmp_path / "photos"
    folder.mkdir(parents=True)
    for photo in sorted(PHOTOS.glob("*.jpg")):
        shutil.copy(photo, folder / photo.name)
    return folder, Counter(p.read_bytes() for p in folder.iterdir())


def _command(folder: Path, tmp_path: Path, cache: Path) -> list[str]:
    return [
        "sort", str(folder), "--by", "x", "--rename", "--apply",
        "-o", str(tmp_path / "ranking.csv"), "--link", str(tmp_path / "links"),
        "--cache", str(cache), *tiny_args(),
    ]  # fmt: skip


def _environment(home: Path) -> dict[str, str]:
    return {**os.environ, "IMGRANK_HOME": str(home)}


def _check(
    rc: int, stderr: str, folder: Path, contents: Counter[bytes], originals: set[str], home: Path
) -> str:
    """The invariants, whatever the point; returns which of the three outcomes it was."""
    from imgrank.files.journal import unfinished_runs

    message = " ".join(stderr.split())
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert rc in (0, 130), (rc, stderr)
    assert Counter(p.read_bytes() for p in folder.iterdir()) == contents  # nothing lost
    names = set(os.listdir(folder))
    old_env = os.environ.get("IMGRANK_HOME")
    os.environ["IMGRANK_HOME"] = str(home)
    try:
        unfinished = unfinished_runs()
    finally:
        os.environ["IMGRANK_HOME"] = old_env or ""
    if unfinished:
        assert rc == 130 and "imgrank recover" in message, message
        return "unfinished"
    if names == originals:
        assert rc == 130 and "interrupted" in message and "renamed 4" not in message, message
        return "nothing renamed"
    assert all(name.split("_", 1)[1] in originals for name in names), names
    if rc == 130:
        assert "interrupted" in message and "renamed 4 file(s)" in message, message
        assert "imgrank undo --last" in message, message
    return "renamed"


@pytest.mark.parametrize(("point", "when", "k"), POINTS)
def test_ctrl_c_at_each_step_of_a_rename_run(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, point: str, when: str, k: int
) -> None:
    folder, contents = _folder(tmp_path)
    originals = set(os.listdir(folder))
    home = tmp_path / "home"
    cache = tmp_path_factory.getbasetemp() / "shared-cache.sqlite3"  # warm after the first
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, point, when, str(k), *_command(folder, tmp_path, cache)],
        capture_output=True, timeout=300, env=_environment(home),
    )  # fmt: skip
    stderr = child.stderr.decode(errors="replace")
    outcome = _check(child.returncode, stderr, folder, contents, originals, home)
    expected = {
        "plan_renames": "nothing renamed",
        "create": "nothing renamed",
        "rename_noreplace": "renamed" if (when, k) == ("after", 4) else "nothing renamed",
        "record_moved": "renamed",
        "finish": "renamed",
        "apply_plan": "renamed",
        "write_ranking": "renamed",
        "materialize": "renamed",
        "exit": "renamed",
    }[point.rpartition(":")[2].rpartition(".")[2] if point != "exit" else "exit"]
    assert outcome == expected, (outcome, stderr)
    if point == "exit":
        assert child.returncode == 0, stderr  # the work was over: a late Ctrl-C changes nothing


def _before_imgrank_started(stderr: str) -> bool:
    """A KeyboardInterrupt traceback from Python's start-up, before any imgrank code ran
    (no frame in the imgrank package)."""
    import imgrank

    package = str(Path(imgrank.__file__).parent)
    return stderr.rstrip().endswith("KeyboardInterrupt") and package not in stderr


def _catches_sigint(pid: int) -> bool:
    """Whether the process has installed a SIGINT handler (Python has started)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt")), 16)
    return bool(caught & (1 << (signal.SIGINT - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_ctrl_c_at_offsets_over_a_whole_run(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """From the moment Python handles SIGINT to the end of the run, at spread offsets."""
    imgrank = shutil.which("imgrank") or str(Path(sys.executable).parent / "imgrank")
    cache = tmp_path_factory.getbasetemp() / "offsets-cache.sqlite3"
    # A full run first: it warms the cache and says how long a run takes.
    folder, _ = _folder(tmp_path / "warm")
    started = time.monotonic()
    subprocess.run([imgrank, *_command(folder, tmp_path / "warm", cache)], check=True,
                   capture_output=True, env=_environment(tmp_path / "warm" / "home"), timeout=300)  # fmt: skip
    duration = time.monotonic() - started
    outcomes: Counter[str] = Counter()
    for i in range(10):
        trial = tmp_path / f"t{i}"
        trial.mkdir()
        folder, contents = _folder(trial)
        originals = set(os.listdir(folder))
        home = trial / "home"
        child = subprocess.Popen(
            [imgrank, *_command(folder, trial, cache)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_environment(home),
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not _catches_sigint(child.pid) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.05 + duration * i / 10)
        child.send_signal(signal.SIGINT)
        _, raw = child.communicate(timeout=300)
        stderr = raw.decode(errors="replace")
        if _before_imgrank_started(stderr):
            # Python itself was still starting (its site module, or the console-script
            # launcher pip writes importing imgrank.__main__): no imgrank code had run,
            # nothing can have changed, and nothing imgrank does can speak yet.
            assert set(os.listdir(folder)) == originals
            outcomes["before imgrank started"] += 1
            continue
        outcomes[_check(child.returncode, stderr, folder, contents, originals, home)] += 1
    assert outcomes["nothing renamed"] >= 1, outcomes  # the early offsets stop it in time
    assert outcomes["before imgrank started"] <= 3, outcomes
