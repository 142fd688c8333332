"""Every file imgrank writes: whole or not at all, never replacing, with the user's umask,
also on file systems without hard links (FAT, exFAT, some network shares)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY_MODEL, tiny_args
from typer.testing import CliRunner

import imgrank.files.noreplace as noreplace
from imgrank.cli import app
from imgrank.errors import OutputWriteError, UnsafeOperationError
from imgrank.files.atomic import atomic_file, atomic_folder, write_file

runner = CliRunner()


@pytest.fixture
def umask_027() -> Iterator[int]:
    """A umask other than the usual 022, so "honours the umask" cannot pass by chance."""
    previous = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(previous)


@pytest.fixture
def no_hard_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behave like FAT/exFAT: no no-replace rename, and link(2) answers EPERM."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(noreplace, "_renameat2", lambda: None)
    monkeypatch.setattr(noreplace, "_renamex_np", lambda: None)
    monkeypatch.setattr(os, "link", refuse)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "imgrank-partial" in p.name)


def test_a_new_file_honours_the_umask(tmp_path: Path, umask_027: int) -> None:
    write_file(tmp_path / "out.csv", "a,b\n")
    assert (tmp_path / "out.csv").stat().st_mode & 0o777 == 0o640


def test_sort_output_and_errors_files_honour_the_umask(
    photo_dir: Path, tmp_path: Path, umask_027: int
) -> None:
    (photo_dir / "broken.jpg").write_bytes(b"not a jpeg")
    out, errors = tmp_path / "ranking.csv", tmp_path / "errors.csv"
    result = runner.invoke(
        app,
        ["sort", str(photo_dir), "--by", "x", "-o", str(out), "--errors", str(errors), *tiny_args()],
    )
    assert result.exit_code == 0, result.stderr
    assert out.stat().st_mode & 0o777 == 0o640  # was 0600 (mkstemp)
    assert errors.stat().st_mode & 0o777 == 0o640
    assert "broken.jpg" in errors.read_text()


def test_an_existing_file_is_never_replaced_and_nothing_is_left_behind(tmp_path: Path) -> None:
    target = tmp_path / "ranking.csv"
    target.write_text("precious")
    with pytest.raises(UnsafeOperationError, match="already exists"):
        write_file(target, "new")
    assert target.read_text() == "precious"
    write_file(target, "new", replace=True)
    assert target.read_text() == "new" and leftovers(tmp_path) == []


def test_a_name_taken_during_the_write_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "ranking.csv"
    with pytest.raises(UnsafeOperationError, match="appeared while"), atomic_file(target) as out:
        out.write(b"ours")
        target.write_text("someone else's")
    assert target.read_text() == "someone else's" and leftovers(tmp_path) == []


def test_a_failed_or_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "ranking.csv"
    with pytest.raises(OutputWriteError, match=r"ranking\.csv: No space left"), atomic_file(
        target
    ) as out:
        out.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(KeyboardInterrupt), atomic_file(target) as out:
        out.write(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_without_hard_links_a_file_is_still_written(tmp_path: Path, no_hard_links: None) -> None:
    target = tmp_path / "ranking.csv"
    write_file(target, "rank,score,path\n")
    assert target.read_text() == "rank,score,path\n" and leftovers(tmp_path) == []
    with pytest.raises(UnsafeOperationError, match="already exists"):
        write_file(target, "other")
    assert target.read_text() == "rank,score,path\n"


def test_without_hard_links_a_name_taken_meanwhile_is_not_replaced(
    tmp_path: Path, no_hard_links: None
) -> None:
    target = tmp_path / "ranking.csv"
    with pytest.raises(UnsafeOperationError, match="appeared while"), atomic_file(target) as out:
        out.write(b"ours")
        target.write_text("theirs")
    assert target.read_text() == "theirs" and leftovers(tmp_path) == []


def test_sort_output_on_a_file_system_without_hard_links(
    photo_dir: Path, tmp_path: Path, no_hard_links: None
) -> None:
    out = tmp_path / "ranking.csv"
    result = runner.invoke(app, ["sort", str(photo_dir), "--by", "x", "-o", str(out), *tiny_args()])
    assert result.exit_code == 0, result.stderr
    assert len(out.read_text().splitlines()) == 5


def test_a_file_system_that_refuses_the_move_gives_a_message_not_a_traceback(
    photo_dir: Path, tmp_path: Path, no_hard_links: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    out = tmp_path / "ranking.csv"
    result = runner.invoke(app, ["sort", str(photo_dir), "--by", "x", "-o", str(out), *tiny_args()])
    assert result.exit_code == 1
    assert f"cannot write {out}: Permission denied" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_folder_appears_whole_with_ordinary_permissions(tmp_path: Path, umask_027: int) -> None:
    out = tmp_path / "model"
    with atomic_folder(out) as work:
        (work / "config.json").write_text("{}")
        assert not out.exists()  # not under its name until complete
    assert out.stat().st_mode & 0o777 == 0o750
    assert (out / "config.json").stat().st_mode & 0o777 == 0o640
    assert leftovers(tmp_path) == []


def test_a_folder_on_a_file_system_without_hard_links(tmp_path: Path, no_hard_links: None) -> None:
    out = tmp_path / "export"
    out.mkdir()  # an empty folder may be used
    with atomic_folder(out) as work:
        (work / "manifest.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert leftovers(tmp_path) == []


def test_a_trained_model_folder_honours_the_umask(tmp_path: Path, umask_027: int) -> None:
    from imgrank.models.adapter import AdapterConfig, RankingAdapter
    from imgrank.models.clip.config import BackboneSpec
    from imgrank.models.checkpoints import save_model_folder

    adapter = RankingAdapter(AdapterConfig(d_model=32, num_layers=1, n_head=4))
    folder = save_model_folder(
        tmp_path / "trained",
        adapter,
        BackboneSpec(model=str(TINY_MODEL), pretrained="none"),
        extra_files={"notes.json": "{}\n"},
    )
    assert folder.path.stat().st_mode & 0o777 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.path.iterdir()}
    assert set(modes.values()) == {0o640} and "notes.json" in modes
