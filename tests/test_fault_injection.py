"""Renames under failure: injected errors, Ctrl-C, real SIGKILLs, cut journals, races.

After every failure the promise is the same: every photo exists exactly once,
with its bytes, and (after ``imgrank recover`` where the process died) under
its original name; no file that imgrank did not create is ever overwritten.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgrank.cli import app
from imgrank.errors import UnfinishedRunError
from imgrank.files import renaming as renaming
from imgrank.files.journal import (
    JournalError,
    JournalWriter,
    check_no_unfinished_run,
    list_runs,
    read_run,
    unfinished_runs,
)
from imgrank.files.rename_plan import plan_renames
from imgrank.files.renaming import RenameFailedError, RenameInterruptedError, apply_plan
from imgrank.ranking import RankedImage

runner = CliRunner()
REAL_RENAME = renaming.rename_noreplace

# Seven photos: ranking them this way under "{rank}{ext}" makes two cycles of three
# (each needs a temporary name) and one plain move: 9 rename calls in all.
NAMES = ["1.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg", "6.jpg", "x.jpg"]
ORDER = ["3.jpg", "1.jpg", "2.jpg", "6.jpg", "4.jpg", "5.jpg", "x.jpg"]
TEMPLATE = "{rank}{ext}"
TOTAL_MOVES = 9


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


def make_folder(folder: Path, names: list[str] = NAMES) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        # Different sizes too, so a mix-up could not go unnoticed.
        (folder / name).write_bytes(f"photo {i} {name}".encode() * (i + 1))
    return snapshot(folder)


def items(folder: Path, order: list[str] = ORDER) -> list[RankedImage]:
    return [RankedImage(i, 1.0 / i, folder / name) for i, name in enumerate(order, 1)]


def expected_after(before: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{rank}.jpg": before[name] for rank, name in enumerate(ORDER, 1)}


def assert_each_photo_once(folder: Path, before: dict[str, bytes]) -> None:
    """Every original content exactly once in the folder, nothing else (temporaries included)."""
    assert sorted(snapshot(folder).values()) == sorted(before.values())


def test_the_plan_really_needs_temporary_names(tmp_path: Path) -> None:
    make_folder(tmp_path)
    plan = plan_renames(items(tmp_path), template=TEMPLATE)
    assert len(plan.moves) == TOTAL_MOVES
    assert [m.to for m in plan.moves].count("temp") == 2


# --------------------------------------------------------------------------- injected errors


def failing_rename(
    monkeypatch: pytest.MonkeyPatch, fail_at: set[int], exc: BaseException
) -> list[int]:
    """Make the rename calls numbered ``fail_at`` (1-based, rollback calls counted too) raise."""
    real = renaming.rename_noreplace
    calls = [0]

    def rename(source: Path, target: Path) -> None:
        calls[0] += 1
        if calls[0] in fail_at:
            raise exc
        real(source, target)

    monkeypatch.setattr(renaming, "rename_noreplace", rename)
    return calls


@pytest.mark.parametrize("k", range(1, TOTAL_MOVES + 1))
def test_step_k_failing_rolls_everything_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    before = make_folder(tmp_path)
    plan = plan_renames(items(tmp_path), template=TEMPLATE)
    failing_rename(monkeypatch, {k}, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(RenameFailedError) as info:
        apply_plan(plan, folder=tmp_path)
    message = str(info.value)
    assert f"rename {k} of {TOTAL_MOVES}" in message
    assert "Input/output error" in message
    assert "nothing was lost" in message
    assert snapshot(tmp_path) == before
    (run,) = list_runs()
    assert (run.status, run.outcome) == ("rolled_back", "restored")
    check_no_unfinished_run()  # closed: other commands may write again


@pytest.mark.parametrize("k", [1, 4, TOTAL_MOVES])
def test_ctrl_c_at_step_k_rolls_back_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    before = make_folder(tmp_path)
    plan = plan_renames(items(tmp_path), template=TEMPLATE)
    failing_rename(monkeypatch, {k}, KeyboardInterrupt())
    with pytest.raises(RenameInterruptedError) as info:
        apply_plan(plan, folder=tmp_path)
    assert info.value.exit_code == 130
    assert "nothing was lost" in str(info.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("k", [1, 5, TOTAL_MOVES])
def test_journal_write_failing_after_a_rename_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    before = make_folder(tmp_path)
    plan = plan_renames(items(tmp_path), template=TEMPLATE)
    real = JournalWriter.record_moved
    calls = [0]

    def record(self: JournalWriter, step: int, position: str) -> None:  # type: ignore[override]
        calls[0] += 1
        if calls[0] == k:
            raise JournalError("cannot write the rename journal: No space left on device")
        real(self, step, position)  # type: ignore[arg-type]

    monkeypatch.setattr(JournalWriter, "record_moved", record)
    with pytest.raises(RenameFailedError, match="No space left"):
        apply_plan(plan, folder=tmp_path)
    assert snapshot(tmp_path) == before


def test_a_failing_rollback_leaves_every_photo_findable_and_recover_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = make_folder(tmp_path)
    plan = plan_renames(items(tmp_path), template=TEMPLATE)
    # Rename 6 fails, and so does the first rename of the rollback.
    failing_rename(monkeypatch, {6, 7}, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(RenameFailedError) as info:
        apply_plan(plan, folder=tmp_path)
    assert "imgrank recover" in str(info.value)
    assert_each_photo_once(tmp_path, before)
    # The run stays open, so nothing else writes until it is settled.
    with pytest.raises(UnfinishedRunError):
        check_no_unfinished_run()
    monkeypatch.setattr(renaming, "rename_noreplace", REAL_RENAME)  # the disk is healthy again
    result = runner.invoke(app, ["recover"])
    assert result.exit_code == 0, result.stderr
    assert snapshot(tmp_path) == before
    check_no_unfinished_run()


# --------------------------------------------------------------------------- races


def test_a_target_created_after_planning_is_never_overwritten(tmp_path: Path) -> None:
    before = make_folder(tmp_path)
    plan = plan_renames(items(tmp_path), template=TEMPLATE)
    intruder = tmp_path / "7.jpg"  # x.jpg's target, free at planning time
    intruder.write_bytes(b"someone else's file")
    with pytest.raises(RenameFailedError, match="appeared after imgrank planned"):
        apply_plan(plan, folder=tmp_path)
    assert intruder.read_bytes() == b"someone else's file"
    assert snapshot(tmp_path) == {**before, "7.jpg": b"someone else's file"}


@pytest.mark.parametrize("k", range(1, TOTAL_MOVES + 1))
def test_a_target_appearing_during_the_run_is_never_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    before = make_folder(tmp_path)
    plan = plan_renames(items(tmp_path), template=TEMPLATE)
    real = renaming.rename_noreplace
    calls = [0]
    planted: list[Path] = []

    def racing(source: Path, target: Path) -> None:
        calls[0] += 1
        if calls[0] == k:  # another program creates the very name about to be used
            target.write_bytes(b"created by another program")
            planted.append(target)
        real(source, target)

    monkeypatch.setattr(renaming, "rename_noreplace", racing)
    with pytest.raises(RenameFailedError, match="it was not overwritten") as info:
        apply_plan(plan, folder=tmp_path)
    (target,) = planted
    assert target.read_bytes() == b"created by another program"
    assert_each_photo_once(tmp_path, {**before, "intruder": b"created by another program"})
    if target.name not in before:
        assert snapshot(tmp_path) == {**before, target.name: b"created by another program"}
    else:
        # The other program took a name the run had just freed: the photo that had it
        # cannot get it back without overwriting, so it stays under its temporary
        # name, the message says where, and the run stays open for `imgrank recover`.
        message = str(info.value)
        assert "imgrank recover" in message
        hidden = [n for n in os.listdir(tmp_path) if n.startswith(".imgrank-")]
        assert len(hidden) == 1 and hidden[0] in message
        with pytest.raises(UnfinishedRunError):
            check_no_unfinished_run()


def test_a_photo_edited_after_planning_stops_the_run(tmp_path: Path) -> None:
    before = make_folder(tmp_path)
    plan = plan_renames(items(tmp_path), template=TEMPLATE)
    time.sleep(0.01)
    (tmp_path / "x.jpg").write_bytes(b"edited meanwhile")
    with pytest.raises(RenameFailedError, match="changed"):
        apply_plan(plan, folder=tmp_path)
    assert snapshot(tmp_path) == {**before, "x.jpg": b"edited meanwhile"}


# --------------------------------------------------------------------------- real SIGKILL

_CHILD = r"""
import os, signal, sys, time
from pathlib import Path
from imgrank.files import renaming as renaming
from imgrank.ranking import RankedImage

folder, kill_at, when, order, template = (
    Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
)
real = renaming.rename_noreplace
calls = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def rename(source, target):
    calls[0] += 1
    if calls[0] == kill_at and when == "before":
        die()
    if calls[0] == kill_at and when == "halfway":
        os.link(source, target, follow_symlinks=False)  # the link+unlink fallback, cut in two
        die()
    if when == "slow":
        time.sleep(0.02)
    real(source, target)
    if calls[0] == kill_at and when == "after":
        die()  # renamed, but the journal does not know yet

renaming.rename_noreplace = rename
names = order.split(",")
items = [RankedImage(i, 1.0 / i, folder / n) for i, n in enumerate(names, 1)]
from imgrank.files.rename_plan import plan_renames
plan = plan_renames(items, template=template)
renaming.apply_plan(plan, folder=folder, prompt="killed")
"""


def run_child(
    folder: Path, kill_at: int, when: str, order: list[str] = ORDER, template: str = TEMPLATE
) -> subprocess.CompletedProcess[bytes]:
    """Run a plan in a child process that SIGKILLs itself at rename ``kill_at``."""
    # The child inherits IMGRANK_HOME, so it journals where this test looks.
    return subprocess.run(
        [sys.executable, "-c", _CHILD, str(folder), str(kill_at), when, ",".join(order), template],
        capture_output=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("k", "when"),
    [
        (1, "before"),
        (1, "after"),
        (2, "after"),
        (4, "after"),
        (6, "before"),
        (TOTAL_MOVES, "after"),
        (5, "halfway"),
    ],
)
def test_sigkill_mid_run_then_recover_gives_every_photo_back(
    tmp_path: Path, k: int, when: str
) -> None:
    folder = tmp_path / "photos"
    before = make_folder(folder)
    child = run_child(folder, k, when)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    (run,) = unfinished_runs()
    assert run.begun and run.prompt == "killed"
    with pytest.raises(UnfinishedRunError, match="imgrank recover"):
        check_no_unfinished_run()
    # Other writing commands refuse too, and say why.
    refused = runner.invoke(app, ["undo", "--last"])
    assert refused.exit_code == 6 and "imgrank recover" in refused.stderr

    result = runner.invoke(app, ["recover"])
    assert result.exit_code == 0, result.stderr
    assert "original names" in result.stderr
    assert snapshot(folder) == before
    check_no_unfinished_run()
    listing = runner.invoke(app, ["runs"])
    assert "recovered back" in listing.stdout


@pytest.mark.parametrize(("k", "when"), [(3, "after"), (7, "before"), (5, "halfway")])
def test_sigkill_then_recover_forward_finishes_the_run(tmp_path: Path, k: int, when: str) -> None:
    folder = tmp_path / "photos"
    before = make_folder(folder)
    assert run_child(folder, k, when).returncode == -signal.SIGKILL
    result = runner.invoke(app, ["recover", "--forward"])
    assert result.exit_code == 0, result.stderr
    assert snapshot(folder) == expected_after(before)
    # A run finished forward can be undone like any other.
    assert runner.invoke(app, ["undo", "--last"]).exit_code == 0
    assert snapshot(folder) == before


def test_sigkill_from_outside_mid_run(tmp_path: Path) -> None:
    """The parent kills a child that is busy renaming 120 photos, at a moment it does not choose."""
    folder = tmp_path / "photos"
    names = [f"{i}.jpg" for i in range(1, 121)]
    order = names[1:] + names[:1]  # one long cycle: every file moves
    before = make_folder(folder, names)
    journal_dir = Path(os.environ["IMGRANK_HOME"]) / "data" / "journals"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(folder), "0", "slow", ",".join(order), TEMPLATE],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            journals = list(journal_dir.glob("*.jsonl")) if journal_dir.exists() else []
            if journals and journals[0].read_bytes().count(b'"moved"') >= 10:
                break
            assert child.poll() is None, child.stderr.read() if child.stderr else b""
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    (run,) = unfinished_runs()
    assert 10 <= len(run.moved) < 121
    assert snapshot(folder) != before  # it really was stopped midway
    assert_each_photo_once(folder, before)

    result = runner.invoke(app, ["recover"])
    assert result.exit_code == 0, result.stderr
    assert snapshot(folder) == before


# --------------------------------------------------------------------------- cut journals


def test_a_journal_cut_mid_line_still_parses_and_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    before = make_folder(folder)
    assert run_child(folder, 6, "after").returncode == -signal.SIGKILL
    (run,) = unfinished_runs()
    data = run.path.read_bytes()
    # Power loss during an append: the last record is half written.
    cut = data[: len(data) - 7]
    assert not cut.endswith(b"\n")
    run.path.write_bytes(cut)
    again = read_run(run.path)
    assert again.damaged_lines == 1
    assert len(again.steps) == len(run.steps) and again.begun
    assert len(again.moved) == len(run.moved) - 1

    result = runner.invoke(app, ["recover"])
    assert result.exit_code == 0, result.stderr
    assert snapshot(folder) == before
    closed = read_run(run.path)
    assert closed.status == "recovered" and closed.outcome == "restored"
    # Recovery started a fresh line after the cut one instead of gluing onto it.
    assert closed.damaged_lines == 1


def test_a_journal_cut_just_before_a_newline_still_gets_clean_appends(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    before = make_folder(folder)
    assert run_child(folder, 4, "after").returncode == -signal.SIGKILL
    (run,) = unfinished_runs()
    data = run.path.read_bytes()
    run.path.write_bytes(data[:-1])  # the last record is whole, only its newline is missing
    assert read_run(run.path).damaged_lines == 0
    assert runner.invoke(app, ["recover"]).exit_code == 0
    closed = read_run(run.path)
    assert closed.damaged_lines == 0 and closed.status == "recovered"
    assert snapshot(folder) == before


def test_a_journal_cut_before_the_plan_was_complete_means_nothing_moved(tmp_path: Path) -> None:
    before = make_folder(tmp_path)
    plan = plan_renames(items(tmp_path), template=TEMPLATE)
    writer = JournalWriter.create(
        run_id=plan.run_id, kind="sort", folder=tmp_path, steps=plan.steps()
    )
    writer.close()
    data = writer.path.read_bytes()
    # The crash happened while the plan itself was being written: no "begin" line.
    writer.path.write_bytes(data[: data.index(b'"type":"step"', 200) + 5])
    run = read_run(writer.path)
    assert not run.begun
    result = runner.invoke(app, ["recover"])
    assert result.exit_code == 0, result.stderr
    assert "before any file was renamed" in result.stderr
    assert snapshot(tmp_path) == before
    check_no_unfinished_run()


def test_recover_reports_a_file_it_cannot_place_and_never_overwrites(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    before = make_folder(folder, ["a.jpg", "b.jpg"])
    # a.jpg -> 1_a.jpg is done, b.jpg -> 2_b.jpg is not, when the process dies.
    child = run_child(folder, 1, "after", ["a.jpg", "b.jpg"], template="{rank}_{stem}{ext}")
    assert child.returncode == -signal.SIGKILL
    assert sorted(os.listdir(folder)) == ["1_a.jpg", "b.jpg"]
    # Meanwhile another program saves a new file under the freed name.
    (folder / "a.jpg").write_bytes(b"a new photo")
    result = runner.invoke(app, ["recover"])
    assert result.exit_code == 6
    assert "none was overwritten or deleted" in result.stderr
    assert "1_a.jpg" in result.stderr  # says where the photo is
    assert snapshot(folder) == {
        "a.jpg": b"a new photo",
        "1_a.jpg": before["a.jpg"],
        "b.jpg": before["b.jpg"],
    }
    check_no_unfinished_run()  # the run is closed, with the problem recorded
    (run,) = list_runs()
    assert run.outcome == "partial" and run.problems


# --------------------------------------------------------------------------- --copy


def test_a_copy_cut_short_leaves_no_half_written_photo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from imgrank.errors import OutputWriteError
    from imgrank.files import writers as outputs

    folder = tmp_path / "photos"
    before = make_folder(folder, ["a.jpg", "b.jpg"])
    out = tmp_path / "best"
    real_copy = shutil.copyfileobj
    calls = [0]

    def disk_fills_up(src, dst, length=0):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 2:
            dst.write(src.read(5))
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(src, dst, length)

    monkeypatch.setattr(outputs.shutil, "copyfileobj", disk_fills_up)
    with pytest.raises(OutputWriteError, match="No space left"):  # a full disk: exit code 1
        outputs.materialize(items(folder, ["b.jpg", "a.jpg"]), out, mode="copy")
    # The first copy is whole, the cut one is gone; the marker says whose folder it is.
    copied = snapshot(out)
    assert copied.pop(".imgrank-output")
    assert copied == {"0001_b.jpg": before["b.jpg"]}
    assert snapshot(folder) == before


def test_every_writing_command_refuses_until_recovered(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    before = make_folder(folder)
    child = run_child(folder, 2, "after")
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    out = tmp_path / "out"
    writing_commands = [
        ["sort", str(folder), "--by", "x", "--link", str(out)],
        ["sort", str(folder), "--by", "x", "-o", str(tmp_path / "ranking.csv")],
        ["train", str(folder), "--prompt", "x", "--out", str(out)],
        ["export", "--out", str(out)],
        ["adapter", "import", str(tmp_path / "missing.pt"), "--out", str(out)],
    ]
    for command in writing_commands:
        refused = runner.invoke(app, command)
        assert refused.exit_code == 6, (command, refused.stderr)
        assert "imgrank recover" in refused.stderr, command
    assert not out.exists() and not (tmp_path / "ranking.csv").exists()
    assert runner.invoke(app, ["recover"]).exit_code == 0
    assert snapshot(folder) == before


# --- issue 17 item 6: --copy onto a full disk --------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A tmpfs of 24 pages (96 KiB) mounted for this test; skipped where mounting is not allowed."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=98304", "tmpfs", str(mountpoint)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_copy_that_runs_out_of_space_at_its_last_bytes_leaves_nothing(
    photo_dir: Path, small_disk: Path
) -> None:
    """The disk fills within the last 8 KiB, which Python buffers and writes at close."""
    from imgrank.errors import ImgrankError
    from imgrank.files.writers import materialize
    from imgrank.ranking import RankedImage

    photo = photo_dir / "astronaut.jpg"  # 99,308 bytes: 1,004 more than the disk holds
    assert 0 < photo.stat().st_size - 98304 < 8192
    copies = small_disk / "copies"
    with pytest.raises(ImgrankError, match="No space left"):
        materialize([RankedImage(1, 0.5, photo)], copies, mode="copy")
    left = sorted(p.name for p in copies.iterdir() if p.name != ".imgrank-output")  # the marker
    assert left == [], "no cut-short copy, no partial file"


def test_sort_copy_onto_a_full_disk_keeps_only_whole_copies(
    photo_dir: Path, small_disk: Path
) -> None:
    from conftest import tiny_args
    from typer.testing import CliRunner

    from imgrank.cli import app

    copies = small_disk / "copies"
    result = CliRunner().invoke(
        app, ["sort", str(photo_dir), "--by", "q", *tiny_args(), "--copy", str(copies)]
    )
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.stderr and "Traceback" not in result.output
    originals = {p.read_bytes() for p in photo_dir.iterdir()}
    left = sorted(p for p in copies.iterdir() if p.name != ".imgrank-output")  # the marker
    assert all(not p.name.startswith(".") for p in left), left
    assert all(p.read_bytes() in originals for p in left), "every copy there is whole"


# --- issue 17 item 13: a run that rolled back completely is settled; parked photos are named ----


def test_a_run_rolled_back_completely_but_left_open_blocks_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rollback worked, only the closing line could not be written (a full disk)."""
    folder = tmp_path / "photos"
    before = make_folder(folder)
    plan = plan_renames(items(folder), template=TEMPLATE)
    real_rename = renaming.rename_noreplace
    failing_rename(monkeypatch, {3}, OSError(errno.EIO, "Input/output error"))
    real_finish = JournalWriter.finish

    def finish(self: JournalWriter, status: str, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if status == "rolled_back":
            raise JournalError("cannot write the rename journal: No space left on device")
        real_finish(self, status, *args, **kwargs)

    monkeypatch.setattr(JournalWriter, "finish", finish)
    with pytest.raises(RenameFailedError, match="original name again"):
        apply_plan(plan, folder=folder)
    monkeypatch.setattr(JournalWriter, "finish", real_finish)  # the disk has room again
    monkeypatch.setattr(renaming, "rename_noreplace", real_rename)
    assert snapshot(folder) == before
    assert len(unfinished_runs()) == 1  # the closing line is missing...

    check_no_unfinished_run()  # ...yet nothing is blocked: there is nothing to recover
    (run,) = list_runs()
    assert run.status == "rolled_back" and not unfinished_runs()
    assert snapshot(folder) == before


def test_an_unsettled_run_that_still_needs_recovery_keeps_blocking(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "photos"
    before = make_folder(folder)
    plan = plan_renames(items(folder), template=TEMPLATE)
    steps = plan.steps()
    writer = JournalWriter.create(
        run_id=plan.run_id, kind="sort", folder=folder, steps=steps, prompt="q",
        template=plan.template,
    )  # fmt: skip
    os.rename(steps[0].source, steps[0].temp)  # a kill right after parking one photo
    writer.record_moved(0, "temp")
    writer.close()
    with pytest.raises(UnfinishedRunError):
        check_no_unfinished_run()

    from conftest import tiny_args

    result = CliRunner().invoke(
        app, ["sort", str(folder), "--by", "q", "-q", *tiny_args()], catch_exceptions=False
    )
    # The test photos are not decodable images: what matters is the warning before the scan.
    assert "left 1 photo(s) under hidden temporary names" in result.stderr, result.stderr
    assert str(steps[0].temp) in result.stderr and "imgrank recover" in result.stderr
    renaming.recover()
    assert snapshot(folder) == before
