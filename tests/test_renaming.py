"""Renaming into rank order: the planner, apply, undo, and their properties.

What a user would notice is checked on real files: the names in the folder
and the bytes behind each name, before and after.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imgrank.errors import UnfinishedRunError, UnsafeOperationError, UsageError
from imgrank.files import noreplace, rename_plan
from imgrank.files import renaming as renaming
from imgrank.files.journal import check_no_unfinished_run, list_runs, read_run
from imgrank.files.name_template import NameTemplate
from imgrank.files.noreplace import rename_noreplace
from imgrank.files.rename_plan import order_moves, plan_renames
from imgrank.files.renaming import apply_plan, undo
from imgrank.ranking import RankedImage


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every name in the folder and the bytes behind it (hidden temporary names included)."""
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


def make_files(folder: Path, names: list[str]) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(f"photo {i}: {name!r}".encode("utf-8", "surrogateescape"))
    return snapshot(folder)


def ranked(folder: Path, names_in_order: list[str]) -> list[RankedImage]:
    count = len(names_in_order)
    return [
        RankedImage(rank=i, score=1.0 - i / (count + 1), path=folder / name)
        for i, name in enumerate(names_in_order, 1)
    ]


# --------------------------------------------------------------------------- templates


def test_template_renders_padded_rank_score_stem_ext() -> None:
    template = NameTemplate.parse("{rank}-{score}-{stem}{ext}")
    assert (
        template.render(rank=7, width=3, score=0.5, stem="IMG_1", ext=".JPG")
        == "007-0.5000-IMG_1.JPG"
    )
    assert (
        NameTemplate.parse("{rank:04d}_{stem}{ext}").render(
            rank=7, width=1, score=0.0, stem="a", ext=".png"
        )
        == "0007_a.png"
    )
    assert (
        NameTemplate.parse("{score:.2f}{ext}").render(
            rank=1, width=1, score=-0.127, stem="a", ext=".png"
        )
        == "-0.13.png"
    )


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("{rank}_{name}{ext}", "unknown field {name}"),
        ("{rank}_{stem}", "drops the file extension"),
        ("sub/{rank}{ext}", "not a path"),
        ("{rank{ext}", "not a valid template"),
        ("{rank!r}{ext}", "conversions"),
        ("{rank:zz}{ext}", "{rank:zz}{ext}"),
        ("{rank}\n{ext}", "control character"),
    ],
)
def test_bad_templates_are_refused_with_the_reason(text: str, complaint: str) -> None:
    with pytest.raises(UsageError, match=None) as info:
        NameTemplate.parse(text)
    assert complaint in str(info.value)


def test_template_match_gives_back_rank_and_original_name() -> None:
    template = NameTemplate.parse("{rank}_{stem}{ext}")
    assert template.match("012_beach.tar.gz") == (12, "beach.tar.gz")
    assert template.match("beach.jpg") is None
    assert NameTemplate.parse("{rank}{ext}").match("1.jpg") is None  # no stem: cannot tell


# --------------------------------------------------------------------------- planning


def test_dry_run_plan_changes_nothing_and_pads_ranks_to_the_folder_width(tmp_path: Path) -> None:
    names = [f"img{i}.jpg" for i in range(12)]
    before = make_files(tmp_path, names)
    plan = plan_renames(ranked(tmp_path, names[::-1]))
    assert snapshot(tmp_path) == before
    new_names = [r.target.name for r in plan.renames]
    assert new_names[0] == "01_img11.jpg"
    assert new_names[-1] == "12_img0.jpg"
    assert all(r.source.is_absolute() and r.target.is_absolute() for r in plan.renames)
    assert list(rename_plan.describe_plan(plan, tmp_path))[0] == ("img11.jpg", "01_img11.jpg")


def test_apply_then_undo_restores_names_and_bytes(tmp_path: Path) -> None:
    before = make_files(tmp_path, ["b.jpg", "a.png", "c.jpeg"])
    plan = plan_renames(ranked(tmp_path, ["c.jpeg", "a.png", "b.jpg"]))
    result = apply_plan(plan, folder=tmp_path, prompt="sharpness")
    after = snapshot(tmp_path)
    assert sorted(after) == ["1_c.jpeg", "2_a.png", "3_b.jpg"]
    assert after["1_c.jpeg"] == before["c.jpeg"]
    assert result.renamed == 3
    run = read_run(result.journal)
    assert run.prompt == "sharpness" and run.status == "completed" and len(run.steps) == 3
    undo(result.run_id)
    assert snapshot(tmp_path) == before


def test_resorting_replaces_the_rank_prefix_instead_of_stacking(tmp_path: Path) -> None:
    make_files(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    apply_plan(plan_renames(ranked(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])), folder=tmp_path)
    # Same order again: nothing to do.
    again = plan_renames(ranked(tmp_path, ["1_a.jpg", "2_b.jpg", "3_c.jpg"]))
    assert again.is_empty and len(again.unchanged) == 3
    # Another order: the prefixes are replaced.
    apply_plan(plan_renames(ranked(tmp_path, ["3_c.jpg", "1_a.jpg", "2_b.jpg"])), folder=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["1_c.jpg", "2_a.jpg", "3_b.jpg"]
    # A photo added later gets a prefix; the others keep their original names.
    (tmp_path / "d.jpg").write_bytes(b"new")
    plan = plan_renames(ranked(tmp_path, ["d.jpg", "1_c.jpg", "2_a.jpg", "3_b.jpg"]))
    apply_plan(plan, folder=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["1_d.jpg", "2_c.jpg", "3_a.jpg", "4_b.jpg"]


def test_a_renamed_folder_without_journals_is_recognised(tmp_path: Path) -> None:
    # A folder sorted on another computer: every photo has a distinct rank prefix.
    make_files(tmp_path / "p", ["1_x.jpg", "2_y.jpg", "3_z.jpg"])
    plan = plan_renames(ranked(tmp_path / "p", ["3_z.jpg", "1_x.jpg", "2_y.jpg"]))
    assert [r.target.name for r in plan.renames] == ["1_z.jpg", "2_x.jpg", "3_y.jpg"]


def test_user_numbers_that_are_not_rank_prefixes_are_kept(tmp_path: Path) -> None:
    make_files(tmp_path, ["2023_party.jpg", "2024_party.jpg"])
    plan = plan_renames(ranked(tmp_path, ["2024_party.jpg", "2023_party.jpg"]))
    assert [r.target.name for r in plan.renames] == ["1_2024_party.jpg", "2_2023_party.jpg"]


def test_a_target_existing_outside_the_plan_is_refused_case_insensitively(tmp_path: Path) -> None:
    before = make_files(tmp_path, ["a.jpg", "b.jpg", "1_A.JPG"])
    # 1_A.JPG is not ranked (say it was skipped), and 1_a.jpg differs from it only by case.
    with pytest.raises(UnsafeOperationError, match="already exists and is not part of this sort"):
        plan_renames(ranked(tmp_path, ["a.jpg", "b.jpg"]), template="{rank}_{stem}{ext}")
    assert snapshot(tmp_path) == before


def test_two_files_mapped_to_one_name_are_refused(tmp_path: Path) -> None:
    make_files(tmp_path, ["a.jpg", "b.jpg"])
    items = [RankedImage(1, 0.5, tmp_path / "a.jpg"), RankedImage(2, 0.5, tmp_path / "b.jpg")]
    with pytest.raises(UnsafeOperationError, match="would both be named '0.5000.jpg'"):
        plan_renames(items, template="{score}{ext}")


def test_cycles_go_through_a_temporary_name_and_keep_every_byte(tmp_path: Path) -> None:
    before = make_files(tmp_path, ["1.jpg", "2.jpg", "3.jpg"])
    # 1->2, 2->3, 3->1: a cycle of three.
    plan = plan_renames(ranked(tmp_path, ["3.jpg", "1.jpg", "2.jpg"]), template="{rank}{ext}")
    assert [m.to for m in plan.moves].count("temp") == 1
    assert len(plan.moves) == 4
    temp = next(m.target for m in plan.moves if m.to == "temp")
    assert temp.parent == tmp_path and temp.name.startswith(".imgrank-")
    result = apply_plan(plan, folder=tmp_path)
    after = snapshot(tmp_path)
    assert after == {"1.jpg": before["3.jpg"], "2.jpg": before["1.jpg"], "3.jpg": before["2.jpg"]}
    undo(result.run_id)
    assert snapshot(tmp_path) == before


def test_order_moves_handles_chains_and_case_only_renames(tmp_path: Path) -> None:
    a, b, c, t = tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "t"
    # A chain a->b->c: c's name is free, so b moves first, then a; no temporary name.
    moves = order_moves([(0, a, b, t / "0"), (1, b, c, t / "1")], to="target")
    assert [(m.source.name, m.target.name) for m in moves] == [("b", "c"), ("a", "b")]
    # A change of case only goes through a temporary name (needed on case-insensitive disks).
    upper = tmp_path / "A"
    moves = order_moves([(0, a, upper, tmp_path / ".tmp")], to="target")
    assert [(m.source.name, m.target.name, m.to) for m in moves] == [
        ("a", ".tmp", "temp"),
        (".tmp", "A", "target"),
    ]


def test_a_name_too_long_for_the_file_system_is_refused(tmp_path: Path) -> None:
    name = "x" * 250 + ".jpg"
    before = make_files(tmp_path, [name])
    with pytest.raises(UnsafeOperationError, match="bytes long"):
        plan_renames(ranked(tmp_path, [name]), template="{rank}_{score}_{stem}{ext}")
    assert snapshot(tmp_path) == before


def test_a_hidden_or_missing_or_doubled_file_is_refused(tmp_path: Path) -> None:
    make_files(tmp_path, ["a.jpg"])
    with pytest.raises(UnsafeOperationError, match="start with a dot"):
        plan_renames(ranked(tmp_path, ["a.jpg"]), template=".{rank}{ext}")
    with pytest.raises(UnsafeOperationError, match="no longer exists"):
        plan_renames(ranked(tmp_path, ["gone.jpg"]))
    os.link(tmp_path / "a.jpg", tmp_path / "hard.jpg")
    with pytest.raises(UnsafeOperationError, match="same file"):
        plan_renames(ranked(tmp_path, ["a.jpg", "hard.jpg"]))


def test_a_symlink_is_renamed_as_a_link_and_its_target_is_untouched(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(b"real")
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "link.jpg").symlink_to(outside)
    result = apply_plan(plan_renames(ranked(folder, ["link.jpg"])), folder=folder)
    assert os.readlink(folder / "1_link.jpg") == str(outside)
    assert outside.read_bytes() == b"real"
    undo(result.run_id)
    assert os.readlink(folder / "link.jpg") == str(outside)


def test_non_utf8_names_survive_the_journal(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9-\xff.jpg")  # Latin-1 bytes: not UTF-8
    before = make_files(tmp_path, [name, "plain.jpg"])
    result = apply_plan(plan_renames(ranked(tmp_path, [name, "plain.jpg"])), folder=tmp_path)
    assert os.fsencode(tmp_path / ("1_" + name)) in [
        os.fsencode(tmp_path / n) for n in os.listdir(tmp_path)
    ]
    undo(result.run_id)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- no-overwrite rename


@pytest.fixture(params=["renameat2", "link+unlink"])
def rename_mechanism(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "link+unlink":
        monkeypatch.setattr(noreplace, "_renameat2_cache", [None])
        monkeypatch.setattr(noreplace, "_renamex_np", lambda: None)
    elif noreplace._renameat2() is None:
        pytest.skip("renameat2 is not available on this system")
    return str(request.param)


def test_rename_noreplace_never_replaces(tmp_path: Path, rename_mechanism: str) -> None:
    (tmp_path / "a").write_bytes(b"A")
    (tmp_path / "b").write_bytes(b"B")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert snapshot(tmp_path) == {"a": b"A", "b": b"B"}
    rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert snapshot(tmp_path) == {"b": b"B", "c": b"A"}


def test_apply_and_undo_work_with_the_link_fallback(tmp_path: Path, rename_mechanism: str) -> None:
    before = make_files(tmp_path, ["1.jpg", "2.jpg"])
    result = apply_plan(
        plan_renames(ranked(tmp_path, ["2.jpg", "1.jpg"]), template="{rank}{ext}"), folder=tmp_path
    )
    assert snapshot(tmp_path) == {"1.jpg": before["2.jpg"], "2.jpg": before["1.jpg"]}
    undo(result.run_id)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- undo


def test_undo_last_walks_back_through_history(tmp_path: Path) -> None:
    before = make_files(tmp_path, ["a.jpg", "b.jpg"])
    apply_plan(plan_renames(ranked(tmp_path, ["a.jpg", "b.jpg"])), folder=tmp_path)
    middle = snapshot(tmp_path)
    apply_plan(plan_renames(ranked(tmp_path, ["2_b.jpg", "1_a.jpg"])), folder=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["1_b.jpg", "2_a.jpg"]
    undo()
    assert snapshot(tmp_path) == middle
    undo()
    assert snapshot(tmp_path) == before
    with pytest.raises(UnsafeOperationError, match="no rename run left to undo"):
        undo()
    kinds = [(r.kind, r.status) for r in list_runs()]
    assert kinds == [("sort", "completed")] * 2 + [("undo", "completed")] * 2


def test_undo_of_an_older_run_asks_to_undo_the_later_one_first(tmp_path: Path) -> None:
    make_files(tmp_path, ["a.jpg", "b.jpg"])
    first = apply_plan(plan_renames(ranked(tmp_path, ["a.jpg", "b.jpg"])), folder=tmp_path)
    second = apply_plan(plan_renames(ranked(tmp_path, ["2_b.jpg", "1_a.jpg"])), folder=tmp_path)
    state = snapshot(tmp_path)
    with pytest.raises(UnsafeOperationError, match=f"undo {second.run_id}"):
        undo(first.run_id)
    assert snapshot(tmp_path) == state


@pytest.mark.parametrize("change", ["deleted", "moved", "replaced", "old name taken"])
def test_undo_refuses_when_a_file_changed_since(tmp_path: Path, change: str) -> None:
    make_files(tmp_path, ["a.jpg", "b.jpg"])
    result = apply_plan(plan_renames(ranked(tmp_path, ["b.jpg", "a.jpg"])), folder=tmp_path)
    if change == "deleted":
        (tmp_path / "1_b.jpg").unlink()
        expected = "no longer exists"
    elif change == "moved":
        (tmp_path / "1_b.jpg").rename(tmp_path / "elsewhere.jpg")
        expected = "no longer exists"
    elif change == "replaced":
        (tmp_path / "1_b.jpg").unlink()
        (tmp_path / "1_b.jpg").write_bytes(b"an edited copy saved as a new file")
        expected = "replaced or modified"
    else:
        (tmp_path / "b.jpg").write_bytes(b"a new photo under the old name")
        expected = "taken by another file"
    state = snapshot(tmp_path)
    with pytest.raises(UnsafeOperationError, match=expected) as info:
        undo(result.run_id)
    assert "Nothing was changed" in str(info.value) or "nothing was changed" in str(info.value)
    assert snapshot(tmp_path) == state


def test_undo_skip_changed_undoes_the_unchanged_files_and_leaves_the_edited_one(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "photos"
    before = make_files(folder, ["a.jpg", "b.jpg", "c.jpg"])
    apply_plan(plan_renames(ranked(folder, ["c.jpg", "a.jpg", "b.jpg"])), folder=folder)
    edited = folder / "2_a.jpg"
    with edited.open("ab") as handle:  # the user retouches one photo in place
        handle.write(b" retouched")
    os.utime(edited, ns=(1, 1))
    state = snapshot(folder)
    refused = _cli("undo", "--last")  # the default still refuses, naming the way out
    assert refused.exit_code == 6 and "--skip-changed" in refused.stderr
    assert snapshot(folder) == state
    result = _cli("undo", "--last", "--skip-changed")
    assert result.exit_code == 0, result.stderr
    message = " ".join(result.stderr.split())
    assert "restored the original names of 2 file(s)" in message
    assert "left 1 changed file(s) as they are" in message and "2_a.jpg" in message
    assert snapshot(folder) == {
        "b.jpg": before["b.jpg"],
        "c.jpg": before["c.jpg"],
        "2_a.jpg": before["a.jpg"] + b" retouched",
    }
    # The journal records what was done and what was left.
    (undo_run,) = [r for r in list_runs() if r.kind == "undo"]
    assert len(undo_run.steps) == 2 and [s["path"] for s in undo_run.skipped] == [str(edited)]
    # The photo left behind still counts as renamed: a new sort replaces its prefix.
    again = plan_renames(ranked(folder, ["2_a.jpg", "b.jpg", "c.jpg"]))
    assert [r.target.name for r in again.renames] == ["1_a.jpg", "2_b.jpg", "3_c.jpg"]
    assert _cli("undo", "--last").exit_code == 6  # nothing left to undo


def test_the_guard_blocks_writes_while_a_run_is_unfinished(tmp_path: Path) -> None:
    from imgrank.files.journal import JournalWriter

    make_files(tmp_path, ["a.jpg"])
    plan = plan_renames(ranked(tmp_path, ["a.jpg"]))
    writer = JournalWriter.create(
        run_id=plan.run_id, kind="sort", folder=tmp_path, steps=plan.steps()
    )
    # The writing process is alive (holds the lock): "in progress", not "recover".
    with pytest.raises(UnsafeOperationError, match="right now"):
        check_no_unfinished_run()
    writer.close()  # the process "died" without finishing the run
    with pytest.raises(UnfinishedRunError, match="imgrank recover") as info:
        check_no_unfinished_run()
    assert plan.run_id in str(info.value)
    with pytest.raises(UnfinishedRunError):
        apply_plan(plan_renames(ranked(tmp_path, ["a.jpg"])), folder=tmp_path)


# --------------------------------------------------------------------------- properties

# Name parts: letters in both cases (case variants), digits and underscores (rank-like
# prefixes), and non-ASCII letters whose case folding is unusual (ß, Σ/ς, İ).
_NAME_CHARS = st.sampled_from(list("aAbBzZ09_- ßẞΣσςİıéÉ漢字😀"))
_STEMS = st.text(_NAME_CHARS, min_size=1, max_size=12)
_EXTS = st.sampled_from([".jpg", ".JPG", ".png", ".jpeg"])


@st.composite
def photo_folders(draw: st.DrawFn) -> tuple[list[str], list[int]]:
    """Distinct file names (some with rank prefixes) and a random ranking of them."""
    count = draw(st.integers(min_value=1, max_value=12))
    names: list[str] = []
    keys: set[str] = set()
    for _ in range(count):
        stem = draw(_STEMS)
        if draw(st.booleans()):
            stem = (
                f"{draw(st.integers(min_value=0, max_value=15)):0{draw(st.integers(1, 3))}d}_{stem}"
            )
        name = stem + draw(_EXTS)
        key = rename_plan.name_key(name)
        # Two names equal but for case cannot both exist on every disk: one folder has one.
        if key in keys or name.startswith("."):
            continue
        keys.add(key)
        names.append(name)
    assume(names)
    order = draw(st.permutations(range(len(names))))
    return names, list(order)


@contextlib.contextmanager
def fresh_home() -> Iterator[Path]:
    """A folder and a journal folder of their own for one hypothesis example."""
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(photo_folders())
def test_property_apply_then_undo_restores_exactly(
    folder_spec: tuple[list[str], list[int]],
) -> None:
    names, order = folder_spec
    with fresh_home() as tmp:
        folder, journals = tmp / "photos", tmp / "journals"
        before = make_files(folder, names)
        items = ranked(folder, [names[i] for i in order])
        plan = plan_renames(items, journal_dir=journals)
        # No plan maps two files to one name (compared case-folded), nor onto a file outside it.
        keys = [rename_plan.name_key(r.target.name) for r in plan.renames]
        keys += [rename_plan.name_key(p.name) for p in plan.unchanged]
        assert len(keys) == len(set(keys)) == len(names)

        result = apply_plan(plan, folder=folder, journal_dir=journals)
        after = snapshot(folder)
        # Every photo exactly once, with its bytes, under its planned name; no temporary left.
        assert sorted(after.values()) == sorted(before.values())
        assert sorted(after) == sorted(
            [r.target.name for r in plan.renames] + [p.name for p in plan.unchanged]
        )
        for r in plan.renames:
            assert after[r.target.name] == before[r.source.name]
        # Sorting again in the same order changes nothing.
        again = plan_renames(
            [
                RankedImage(i.rank, i.score, folder / name)
                for i, name in zip(items, _current_names(plan, items), strict=True)
            ],
            journal_dir=journals,
        )
        assert again.is_empty
        if result.run_id is not None:
            undo(result.run_id, journal_dir=journals)
        assert snapshot(folder) == before


def _current_names(plan: rename_plan.RenamePlan, items: list[RankedImage]) -> list[str]:
    moved = {r.source.name: r.target.name for r in plan.renames}
    return [moved.get(i.path.name, i.path.name) for i in items]


@settings(max_examples=80, deadline=None)
@given(
    photo_folders(),
    st.sampled_from(
        ["{rank}_{stem}{ext}", "{stem}{ext}", "{score:.1f}{ext}", "{rank}{ext}", "x{ext}"]
    ),
)
def test_property_no_plan_maps_two_files_to_one_name(
    folder_spec: tuple[list[str], list[int]], template: str
) -> None:
    names, order = folder_spec
    with fresh_home() as tmp:
        folder = tmp / "photos"
        extra = "1_outsider.jpg"  # a file in the folder that is not ranked
        before = make_files(folder, [*names, extra] if extra not in names else names)
        items = [i for i in ranked(folder, [names[j] for j in order]) if i.path.name != extra]
        try:
            plan = plan_renames(items, template=template, journal_dir=tmp / "journals")
        except UnsafeOperationError:
            assert snapshot(folder) == before  # refused: nothing changed
            return
        final = [rename_plan.name_key(r.target.name) for r in plan.renames]
        final += [rename_plan.name_key(p.name) for p in plan.unchanged]
        assert len(final) == len(set(final))
        ranked_names = {rename_plan.name_key(i.path.name) for i in items}
        outside = {
            rename_plan.name_key(n) for n in before if rename_plan.name_key(n) not in ranked_names
        }
        assert not outside & set(final)
        assert snapshot(folder) == before


# --------------------------------------------------------------------------- the CLI


def _cli(*args: str):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from imgrank.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _sort(folder: Path, *extra: str):  # type: ignore[no-untyped-def]
    from conftest import tiny_args

    return _cli("sort", str(folder), "--by", "image quality", *tiny_args(), *extra)


def test_sort_rename_prints_the_plan_and_changes_nothing(photo_dir: Path) -> None:
    before = snapshot(photo_dir)
    result = _sort(photo_dir, "--rename")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    olds = [line.split(" -> ")[0] for line in lines]
    news = [line.split(" -> ")[1] for line in lines]
    assert sorted(olds) == sorted(before)
    assert news == [f"{rank}_{old}" for rank, old in enumerate(olds, 1)]
    assert "add --apply" in result.stderr
    assert snapshot(photo_dir) == before


def test_sort_rename_apply_then_undo_last(photo_dir: Path, tmp_path: Path) -> None:
    before = snapshot(photo_dir)
    ranking_file = tmp_path / "ranking.csv"
    result = _sort(photo_dir, "--rename", "--apply", "--output", str(ranking_file))
    assert result.exit_code == 0, result.stderr
    planned = [line.split(" -> ")[1] for line in result.stdout.splitlines()]
    assert sorted(os.listdir(photo_dir)) == sorted(planned)
    # The ranking file names the files as they are now.
    rows = ranking_file.read_text().splitlines()[1:]
    assert [Path(row.split(",", 2)[2]).name for row in rows] == planned
    # Sorting again by the same prompt changes nothing.
    again = _sort(photo_dir, "--rename", "--apply")
    assert again.exit_code == 0 and again.stdout == "" and "nothing to rename" in again.stderr
    listing = _cli("runs")
    assert "applied" in listing.stdout and "image quality" in listing.stdout
    undone = _cli("undo", "--last")
    assert undone.exit_code == 0, undone.stderr
    assert snapshot(photo_dir) == before
    assert "undone" in _cli("runs").stdout


def test_links_made_with_a_rename_point_at_the_new_names(photo_dir: Path, tmp_path: Path) -> None:
    links = tmp_path / "links"
    result = _sort(photo_dir, "--rename", "--apply", "--link", str(links))
    assert result.exit_code == 0, result.stderr
    for link in (p for p in links.iterdir() if p.name != ".imgrank-output"):
        assert link.resolve().exists() and link.resolve().parent == photo_dir.resolve()


def test_rename_options_are_checked_before_any_work(photo_dir: Path) -> None:
    assert _sort(photo_dir, "--apply").exit_code == 2
    bad = _sort(photo_dir, "--rename", "--name-template", "{rank}")
    assert bad.exit_code == 2 and "{ext}" in bad.stderr
    assert _sort(photo_dir, "--name-template", "{rank}{ext}").exit_code == 2
    assert _cli("undo").exit_code == 2  # neither RUN_ID nor --last


def test_writing_commands_refuse_while_a_run_is_unfinished(photo_dir: Path, tmp_path: Path) -> None:
    from imgrank.files.journal import JournalWriter

    plan = plan_renames(ranked(photo_dir, sorted(os.listdir(photo_dir))))
    JournalWriter.create(
        run_id=plan.run_id, kind="sort", folder=photo_dir, steps=plan.steps()
    ).close()
    for extra in (
        ["--rename", "--apply"],
        ["--link", str(tmp_path / "l")],
        ["--copy", str(tmp_path / "c")],
    ):
        result = _sort(photo_dir, *extra)
        assert result.exit_code == 6, extra
        assert "imgrank recover" in result.stderr and plan.run_id in result.stderr
    assert not (tmp_path / "l").exists() and not (tmp_path / "c").exists()
    # A dry run and a plain ranking still work: they write nothing into the folder.
    assert _sort(photo_dir, "--rename").exit_code == 0
    recovered = _cli("recover")
    assert recovered.exit_code == 0 and "original names" in recovered.stderr
    assert _sort(photo_dir, "--rename", "--apply").exit_code == 0


def test_renames_touch_only_files_inside_the_folder_and_leave_no_link_dangling(
    photo_dir: Path, tmp_path: Path
) -> None:
    """Issue 17 item 7: a folder link, a link to a photo, an earlier --link folder inside."""
    from conftest import tiny_args

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (photo_dir / "rocket.jpg").rename(elsewhere / "rocket.jpg")
    (photo_dir / "dirlink").symlink_to(Path("..") / "elsewhere")
    (photo_dir / "alias.jpg").symlink_to("astronaut.jpg")
    (photo_dir / "best").mkdir()
    (photo_dir / "best" / "0001_chelsea.jpg").symlink_to(Path("..") / "chelsea.jpg")
    result = _cli("sort", str(photo_dir), "--by", "q", *tiny_args(), "--rename", "--apply")
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(elsewhere)) == ["rocket.jpg"], "nothing outside the folder renamed"
    names = sorted(os.listdir(photo_dir))
    renamed = [n for n in names if n.endswith("coffee.jpg")]
    assert renamed != ["coffee.jpg"] and len(renamed) == 1, names  # the one free photo moved
    assert {"alias.jpg", "astronaut.jpg", "chelsea.jpg", "dirlink", "best"} <= set(names)
    for root, dirs, files in os.walk(photo_dir):
        for name in dirs + files:
            entry = os.path.join(root, name)
            if os.path.islink(entry):
                assert os.path.exists(entry), f"{entry} dangles"
    for reason in ("a symbolic link", "points to it", "reached through a symbolic link"):
        assert reason in result.stderr, result.stderr


def test_resorting_a_renamed_folder_keeps_tied_files_where_they_are(photo_dir: Path) -> None:
    """Ties are ordered by the names before the rename, which the rename does not change."""
    import shutil

    # Two identical photos score exactly alike; by path "a-sub/x.jpg" comes before "b.jpg",
    # but after the rename "2_b.jpg" would come before "a-sub/3_x.jpg".
    (photo_dir / "a-sub").mkdir()
    shutil.copy(photo_dir / "coffee.jpg", photo_dir / "a-sub" / "x.jpg")
    shutil.copy(photo_dir / "coffee.jpg", photo_dir / "b.jpg")
    first = _sort(photo_dir, "--rename", "--apply", "--ascending", "--format", "paths")
    assert first.exit_code == 0, first.stderr
    renamed = {line.split(" -> ")[1] for line in first.stdout.splitlines()}
    assert len(renamed) == 6
    for _ in range(2):  # and the plain ranking agrees with the names
        again = _sort(photo_dir, "--rename", "--apply", "--ascending")
        assert again.exit_code == 0, again.stderr
        assert again.stdout == "" and "nothing to rename" in again.stderr
    ranking = _sort(photo_dir, "--ascending", "--format", "paths")
    ranks = [int(Path(line).name.split("_")[0]) for line in ranking.stdout.splitlines()]
    assert ranks == [1, 2, 3, 4, 5, 6]
