"""`imgrank train` and `imgrank eval`: the adapter learns to count on a tiny random backbone.

The counting images come from the benchmark's own generator
(benchmarks/make_rank_data.py), in a smaller version: 128 training images,
8 epochs, a higher learning rate and a lower bar than the benchmark's
(held-out SRCC >= 0.9 with the defaults on 480 images).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL, tiny_args
from PIL import Image
from safetensors.numpy import load_file
from scipy.stats import spearmanr
from typer.testing import CliRunner

from imgrank.cli import app
from imgrank.errors import DataError, UnsafeOperationError
from imgrank.models.clip.config import BackboneSpec
from imgrank.training.datasets import LabelRow, LabelSet, load_labels
from imgrank.training.encoding import encode_images
from imgrank.training.fit import (
    EpochRecord,
    TrainingReporter,
    TrainSettings,
    _is_better,
    adapter_threads,
    lr_factor,
    make_batches,
    split_validation,
    train_adapter,
)

runner = CliRunner()
GENERATOR = Path(__file__).resolve().parents[1] / "benchmarks" / "make_rank_data.py"
CIRCLES = "Rank the numbers of circles."


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("make_rank_data", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def counting(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("counting")
    _generator().make_counting(root, train=128, test=48, seed=1)
    return root


@pytest.fixture(scope="module")
def trained(counting: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One CLI training run shared by the tests that only read its results."""
    out = tmp_path_factory.mktemp("models") / "counting"
    with pytest.MonkeyPatch.context() as mp:
        # Module-scoped: runs before the per-test IMGRANK_HOME fixture, so set our own.
        mp.setenv("IMGRANK_HOME", str(tmp_path_factory.mktemp("home")))
        result = invoke(
            "train",
            str(counting / "train.tsv"),
            "--out",
            str(out),
            *tiny_args(),
            "--epochs",
            "8",
            "--lr",
            "1e-3",
        )
    return out, result


def _eval_json(*args: str) -> dict:  # type: ignore[type-arg]
    result = invoke("eval", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _tiny_labels(root: Path, count: int = 24) -> LabelSet:
    """The first ``count`` rows of the circles group, for quick library-level runs."""
    labels = load_labels(root / "train.tsv")
    rows = [row for row in labels.rows if row.group == "circle"][:count]
    return LabelSet(rows=rows, source=labels.source)


def _quick(**changes: object) -> TrainSettings:
    return TrainSettings(**{"epochs": 2, "lr": 1e-3, "val_split": 0.25, **changes})  # type: ignore[arg-type]


TINY_SPEC = BackboneSpec(model=str(TINY_MODEL), pretrained="none")


# --- the proof that it learns ----------------------------------------------------------------


def test_counting_train_then_eval_beats_zero_shot(trained, counting: Path) -> None:  # type: ignore[no-untyped-def]
    out, result = trained
    assert result.exit_code == 0, result.stderr
    assert "epoch   1/8" in result.stderr and "val SRCC" in result.stderr
    assert f"saved {out}" in result.stderr
    learned = _eval_json(str(counting / "test.tsv"), "--adapter", str(out), "--device", "cpu")
    assert set(learned["groups"]) == {"circle", "square"}
    assert set(learned["mean"]) == {"PLCC", "SRCC", "KRCC", "MAE", "accuracy", "n"}
    assert learned["mean"]["n"] == 48
    assert learned["mean"]["SRCC"] >= 0.75, learned
    assert learned["mean"]["accuracy"] >= 0.75
    # Without --adapter: the zero-shot scorer on the same backbone, for comparison.
    zero_shot = _eval_json(str(counting / "test.tsv"), *tiny_args())
    assert zero_shot["scorer"] == "zero-shot CLIP"
    assert zero_shot["mean"]["MAE"] is None  # its scores are not counts
    assert learned["mean"]["SRCC"] > zero_shot["mean"]["SRCC"] + 0.3


def test_training_summary_and_model_folder(trained) -> None:  # type: ignore[no-untyped-def]
    out, _ = trained
    summary = json.loads((out / "training.json").read_text())
    assert summary["data"]["rows"] == 128 and summary["data"]["groups"] == 2
    assert summary["data"]["train_rows"] + summary["data"]["val_rows"] == 128
    assert summary["data"]["val_rows"] > 0
    assert summary["settings"]["lr"] == 1e-3 and summary["settings"]["variant"] == "full"
    epochs = summary["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1))
    assert all(math.isfinite(e["train_loss"]) for e in epochs)
    # The kept epoch is (within the tie margin) the best by validation SRCC.
    best = summary["epochs"][summary["best_epoch"] - 1]
    assert best["val_SRCC"] >= max(e["val_SRCC"] for e in epochs) - 0.002 * len(epochs)
    config = json.loads((out / "config.json").read_text())
    assert config["target_range"] == [1.0, 8.0]
    assert config["adapter"]["variant"] == "full"
    assert config["source"]["trained_by"] == "imgrank train"


def test_sort_with_the_trained_adapter_puts_more_objects_first(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out, _ = trained
    import random

    make = _generator()
    rng = random.Random(7)
    folder = tmp_path / "photos"
    folder.mkdir()
    counts = {}
    for i, count in enumerate([1, 2, 3, 4, 5, 6, 7, 8] * 2):
        name = f"img{i:02d}.png"
        make.counting_image(count, "circle", rng).save(folder / name)
        counts[name] = count
    result = invoke(
        "sort",
        str(folder),
        "--by",
        CIRCLES,
        "--adapter",
        str(out),
        "--device",
        "cpu",
        "--format",
        "jsonl",
    )
    assert result.exit_code == 0, result.stderr
    ranked = [json.loads(line) for line in result.stdout.splitlines()]
    scores = [r["score"] for r in ranked]
    truth = [counts[Path(r["path"]).name] for r in ranked]
    assert spearmanr(scores, truth).statistic >= 0.7


def test_eval_table_and_round(trained, counting: Path) -> None:  # type: ignore[no-untyped-def]
    out, _ = trained
    table = invoke("eval", str(counting / "test.tsv"), "--adapter", str(out), "--device", "cpu")
    assert table.exit_code == 0, table.stderr
    for word in ("circle", "square", "mean", "PLCC", "SRCC", "KRCC", "MAE", "accuracy"):
        assert word in table.stdout
    plain = _eval_json(str(counting / "test.tsv"), "--adapter", str(out), "--device", "cpu")
    rounded = _eval_json(
        str(counting / "test.tsv"), "--adapter", str(out), "--device", "cpu", "--round"
    )
    assert rounded["rounded"] is True and plain["rounded"] is False
    # Rounded predictions are whole counts: their MAE is a multiple of 1/n per group.
    for name, group in rounded["groups"].items():
        assert group["MAE"] * group["n"] == pytest.approx(
            round(group["MAE"] * group["n"]), abs=1e-6
        )
        assert group["MAE"] != pytest.approx(plain["groups"][name]["MAE"])


# --- what the model folder tells a user (issue 16, items 7-9) --------------------------------


def test_the_model_folder_records_its_prompts_and_validation(trained) -> None:  # type: ignore[no-untyped-def]
    out, _ = trained
    source = json.loads((out / "config.json").read_text())["source"]
    summary = json.loads((out / "training.json").read_text())
    assert set(source["prompts"]) == {CIRCLES, "Rank the numbers of squares."}
    best = summary["epochs"][summary["best_epoch"] - 1]
    assert source["validation"]["SRCC"] == pytest.approx(best["val_SRCC"])
    assert source["validation"]["better_than_chance"] is (best["val_SRCC"] > 0)
    info = invoke("adapter", "info", str(out))
    assert info.exit_code == 0, info.stderr
    trained_on = next(line for line in info.stdout.splitlines() if line.startswith("trained on"))
    assert repr(CIRCLES) in trained_on
    assert f"SRCC {best['val_SRCC']:.3f}" in info.stdout


def test_sorting_by_a_prompt_the_adapter_never_saw_warns(trained, photo_dir: Path) -> None:  # type: ignore[no-untyped-def]
    out, _ = trained
    base = ["sort", str(photo_dir), "--adapter", str(out), "--device", "cpu"]
    seen = invoke(*base, "--by", CIRCLES)
    assert seen.exit_code == 0, seen.stderr
    assert "not a prompt" not in seen.stderr
    unseen = invoke(*base, "--by", "Rank the number of triangles.")
    assert unseen.exit_code == 0, unseen.stderr  # adapters can generalise: a warning only
    warning = " ".join(unseen.stderr.split())
    assert "'Rank the number of triangles.' is not a prompt counting was trained on" in warning
    assert len(unseen.stdout.splitlines()) == 5  # header + 4 photos


def test_a_model_no_better_than_chance_is_saved_with_a_clear_warning(
    counting: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from imgrank.training import fit

    real = fit.train_adapter

    def ranks_backwards(*args, **kwargs):  # type: ignore[no-untyped-def]
        """A real training run whose kept epoch then ranks validation backwards."""
        result = real(*args, **kwargs)
        result.epochs[result.best_epoch - 1] = dataclasses.replace(result.best, val_SRCC=-0.24)
        return result

    table = tmp_path / "t.tsv"
    rows = (counting / "train.tsv").read_text().splitlines()
    body = [str(counting / r.split("\t")[0]) + "\t" + r.split("\t", 1)[1] for r in rows[1:25]]
    table.write_text("\n".join([rows[0], *body]) + "\n")
    monkeypatch.setattr(fit, "train_adapter", ranks_backwards)
    out = tmp_path / "backwards"
    result = invoke("train", str(table), "--out", str(out), *tiny_args(), "--epochs", "1")
    assert result.exit_code == 0, result.stderr
    message = " ".join(result.stderr.split())
    assert "no better than chance (SRCC -0.2400)" in message
    for advice in ("more labelled images", "more --epochs", "a larger backbone"):
        assert advice in message
    assert (out / "config.json").exists()  # saved all the same
    # Without the twist, the warning follows what the folder records.
    monkeypatch.setattr(fit, "train_adapter", real)
    out = tmp_path / "plain"
    result = invoke("train", str(table), "--out", str(out), *tiny_args(), "--epochs", "1")
    assert result.exit_code == 0, result.stderr
    validation = json.loads((out / "config.json").read_text())["source"]["validation"]
    assert ("no better than chance" in result.stderr) is (not validation["better_than_chance"])


def test_eval_shows_a_group_of_one_image_as_undefined(trained, counting: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out, _ = trained
    rows = (counting / "test.tsv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    lonely = body[0].split("\t")
    lonely[2] = "a group of one"  # the cname column names the group
    table = tmp_path / "test.tsv"
    absolute = [str(counting / r.split("\t")[0]) + "\t" + r.split("\t", 1)[1] for r in body[1:]]
    single = str(counting / lonely[0]) + "\t" + "\t".join(lonely[1:])
    table.write_text("\n".join([header, *absolute, single]) + "\n")
    report = _eval_json(str(table), "--adapter", str(out), "--device", "cpu")
    alone = report["groups"]["a group of one"]
    assert alone["n"] == 1 and alone["SRCC"] is None and alone["PLCC"] is None
    assert report["mean"]["n"] == len(body)
    assert report["mean"]["SRCC"] == pytest.approx(
        np.mean([g["SRCC"] for name, g in report["groups"].items() if name != "a group of one"])
    )
    shown = invoke("eval", str(table), "--adapter", str(out), "--device", "cpu")
    assert shown.exit_code == 0, shown.stderr
    line = next(row for row in shown.stdout.splitlines() if "a group of one" in row)
    assert "—" in line


# --- behaviour of the training run ------------------------------------------------------------


def test_same_seed_same_weights_other_seed_other_weights(counting: Path, tmp_path: Path) -> None:
    labels = _tiny_labels(counting)
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        result = train_adapter(
            labels, tmp_path / name, TINY_SPEC, _quick(seed=seed), device="cpu", cache=False
        )
        outs.append(load_file(str(result.out / "adapter.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    # Same seed: the same weights (up to float noise); another seed: clearly other weights.
    assert all(np.allclose(outs[0][k], outs[1][k], rtol=0, atol=1e-6) for k in outs[0])
    assert not all(np.allclose(outs[0][k], outs[2][k], rtol=0, atol=1e-3) for k in outs[0])


class _InterruptAt(TrainingReporter):
    def __init__(self, epoch: int | None = None) -> None:
        self.at = epoch

    def step(self) -> None:
        if self.at is None:
            raise KeyboardInterrupt

    def epoch(self, record: EpochRecord, is_best: bool) -> None:
        if record.epoch == self.at:
            raise KeyboardInterrupt


def test_ctrl_c_saves_the_best_epoch_so_far(counting: Path, tmp_path: Path) -> None:
    labels = _tiny_labels(counting)
    result = train_adapter(
        labels,
        tmp_path / "m",
        TINY_SPEC,
        _quick(epochs=5),
        device="cpu",
        cache=False,
        reporter=_InterruptAt(2),
    )
    assert result.stopped == "interrupted" and len(result.epochs) == 2
    summary = json.loads((tmp_path / "m" / "training.json").read_text())
    assert summary["stopped"] == "interrupted" and summary["best_epoch"] in (1, 2)
    assert (tmp_path / "m" / "adapter.safetensors").is_file()
    # Before the first epoch ends there is nothing to save: the interrupt goes through.
    with pytest.raises(KeyboardInterrupt):
        train_adapter(
            labels,
            tmp_path / "n",
            TINY_SPEC,
            _quick(),
            device="cpu",
            cache=False,
            reporter=_InterruptAt(),
        )
    assert not (tmp_path / "n").exists()


def test_ctrl_c_on_the_command_line_saves_and_exits_130(
    counting: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgrank.cli import train_cmd

    def interrupt(self: object, record: EpochRecord, is_best: bool) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd._Display, "epoch", interrupt)
    table = tmp_path / "t.tsv"
    rows = (counting / "train.tsv").read_text().splitlines()
    body = [str(counting / r.split("\t")[0]) + "\t" + r.split("\t", 1)[1] for r in rows[1:25]]
    table.write_text("\n".join([rows[0], *body]) + "\n")
    out = tmp_path / "m"
    result = invoke("train", str(table), "--out", str(out), *tiny_args(), "--epochs", "5")
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "saved the best epoch so far (1" in result.stderr
    assert json.loads((out / "training.json").read_text())["stopped"] == "interrupted"


@pytest.mark.parametrize(
    ("variant", "loss"), [("ranking-head", "bce"), ("ltr", "bce"), ("full", "hinge")]
)
def test_variants_and_losses_train_and_load(
    counting: Path, tmp_path: Path, variant: str, loss: str
) -> None:
    from imgrank.models.checkpoints import load_adapter

    result = train_adapter(
        _tiny_labels(counting, 12),
        tmp_path / variant,
        TINY_SPEC,
        _quick(epochs=1, variant=variant, loss=loss),
        device="cpu",
        cache=False,
    )
    config = json.loads((result.out / "config.json").read_text())
    assert config["adapter"]["variant"] == variant
    assert math.isfinite(result.epochs[0].train_loss)
    keys = load_adapter(result.out).state_dict().keys()
    assert any(k.startswith("pair_regressor") for k in keys) == (variant != "ltr")
    assert any(k.startswith("reg_token_pooler") for k in keys) == (variant == "full")


def test_bad_rows_and_undecodable_images_are_reported_by_line(
    counting: Path, tmp_path: Path
) -> None:
    table = tmp_path / "labels.tsv"
    rows = (counting / "train.tsv").read_text().splitlines()
    good = [r for r in rows[1:] if "\tcircle\t" in r][:10]
    (tmp_path / "broken.png").write_bytes(Image.new("RGB", (8, 8)).tobytes()[:10])
    (tmp_path / "trunc.png").write_bytes((counting / good[0].split("\t")[0]).read_bytes()[:60])
    lines = [rows[0]] + [
        str(counting / r.split("\t")[0]) + "\t" + r.split("\t", 1)[1] for r in good
    ]
    lines += [
        f"missing.png\t{CIRCLES}\tcircle\t3",  # line 12
        f"broken.png\t{CIRCLES}\tcircle\tmany",  # line 13: not a number
        f"trunc.png\t{CIRCLES}\tcircle\t2",  # line 14: fails when decoded
    ]
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "model"
    result = invoke(
        "train", str(table), "--out", str(out), *tiny_args(), "--epochs", "1", "--no-cache"
    )
    assert result.exit_code == 0, result.stderr
    assert "line 12: missing.png: file does not exist" in result.stderr
    assert "line 13: broken.png: value 'many' is not a number" in result.stderr
    assert "line 14: " in result.stderr and "trunc.png" in result.stderr
    summary = json.loads((out / "training.json").read_text())
    assert summary["data"]["rows"] == 10 and summary["data"]["bad_rows"] == 3
    assert any(s.startswith("line 14: ") for s in summary["data"]["skipped"])


def test_rated_folder_to_adapter(tmp_path: Path) -> None:
    """The docs' worked example, small: stars in XMP sidecars -> train -> sort --adapter."""
    import random

    make = _generator()
    rng = random.Random(0)
    folder = tmp_path / "rated"
    folder.mkdir()
    for i in range(12):
        stars = i % 6
        photo = folder / f"p{i:02d}.png"
        make.counting_image(stars + 1, "circle", rng).save(photo)
        (folder / f"p{i:02d}.png.xmp").write_text(
            "<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>"
            f"<rdf:Description xmlns:xmp='http://ns.adobe.com/xap/1.0/' xmp:Rating='{stars}'/>"
            "</rdf:RDF></x:xmpmeta>"
        )
    make.counting_image(3, "circle", rng).save(folder / "unrated.png")
    out = tmp_path / "taste"
    result = invoke(
        "train",
        str(folder),
        "--prompt",
        "photos I like",
        "--out",
        str(out),
        *tiny_args(),
        "--epochs",
        "1",
    )
    assert result.exit_code == 0, result.stderr
    assert "1 unrated photo(s) left out" in result.stderr
    summary = json.loads((out / "training.json").read_text())
    assert summary["data"]["kind"] == "rated-folder" and summary["data"]["rows"] == 12
    ranked = invoke(
        "sort", str(folder), "--by", "photos I like", "--adapter", str(out), "--device", "cpu"
    )
    assert ranked.exit_code == 0, ranked.stderr
    assert len(ranked.stdout.splitlines()) == 1 + 13  # header + every photo, rated or not
    measured = _eval_json(
        str(folder), "--prompt", "photos I like", "--adapter", str(out), "--device", "cpu"
    )
    assert measured["mean"]["n"] == 12 and list(measured["groups"]) == ["photos I like"]


def test_existing_output_folder_is_never_touched(counting: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = invoke("train", str(counting / "train.tsv"), "--out", str(out), *tiny_args())
    assert result.exit_code == UnsafeOperationError.exit_code
    assert "never overwrites" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (
        out / "notes.txt"
    ).read_text() == "mine"


def test_too_few_rows_per_group_is_an_error(counting: Path, tmp_path: Path) -> None:
    rows = (counting / "train.tsv").read_text().splitlines()
    circles = [r for r in rows[1:] if "\tcircle\t" in r][:5]
    squares = [r for r in rows[1:] if "\tsquare\t" in r][:1]
    table = counting / "short.tsv"
    table.write_text("\n".join([rows[0], *circles, *squares]) + "\n")
    result = invoke("train", str(table), "--out", str(tmp_path / "m"), *tiny_args())
    assert result.exit_code == DataError.exit_code
    assert "'square' has 1" in result.stderr and "at least 2" in result.stderr
    assert not (tmp_path / "m").exists()


def test_bad_settings_are_refused_before_any_work(counting: Path, tmp_path: Path) -> None:
    result = invoke(
        "train", str(counting / "train.tsv"), "--out", str(tmp_path / "m"), "--variant", "huge"
    )
    assert result.exit_code == 2 and "--variant" in result.stderr
    result = invoke(
        "train", str(counting / "train.tsv"), "--out", str(tmp_path / "m"), "--val-split", "1"
    )
    assert result.exit_code == 2 and "--val-split" in result.stderr


def test_second_encoding_comes_from_the_cache(counting: Path) -> None:
    from imgrank.features.cache import open_cache
    from imgrank.models.clip.build import load_backbone

    backbone = load_backbone(TINY_SPEC, device="cpu")
    paths = _tiny_labels(counting, 8).paths()
    cache = open_cache()
    try:
        first = encode_images(paths, backbone, tokens=True, cache=cache)
    finally:
        cache.close()
    cache = open_cache()
    try:
        second = encode_images(paths, backbone, tokens=True, cache=cache)
    finally:
        cache.close()
    assert first.from_cache == 0 and second.from_cache == len(paths)
    assert first.tokens is not None and second.tokens is not None
    assert [second.index[p] for p in paths] == list(range(len(paths)))
    np.testing.assert_allclose(
        second.tokens, first.tokens, rtol=2e-3, atol=2e-3
    )  # stored as float16
    np.testing.assert_allclose(second.pooled, first.pooled, rtol=1e-6)


# --- the pieces ------------------------------------------------------------------------------


def _rows(groups: dict[str, int]) -> LabelSet:
    rows = [
        LabelRow(path=Path(f"/x/{g}{i}.png"), prompt="p", group=g, value=float(i))
        for g, n in groups.items()
        for i in range(n)
    ]
    return LabelSet(rows=rows)


def test_validation_split_is_per_group_and_keeps_pairs() -> None:
    labels = _rows({"a": 20, "b": 5, "c": 3})
    train, val = split_validation(labels, 0.2, np.random.default_rng(0))
    by_group = {g: sum(1 for r in val if r.group == g) for g in "abc"}
    assert by_group == {"a": 4, "b": 2, "c": 0}  # b: one would have no pair, so two; c: too small
    assert not {r.path for r in train} & {r.path for r in val}
    assert len(train) + len(val) == 28
    # an image labelled in two groups stays on one side
    shared = LabelRow(path=Path("/x/a0.png"), prompt="q", group="z", value=1.0)
    more = LabelSet(
        rows=labels.rows
        + [shared]
        + [LabelRow(Path(f"/x/z{i}"), "q", "z", float(i)) for i in range(9)]
    )
    train, val = split_validation(more, 0.3, np.random.default_rng(1))
    sides = {("val" if r in val else "train") for r in more.rows if r.path == Path("/x/a0.png")}
    assert len(sides) == 1


def test_batches_hold_one_group_and_no_lonely_image() -> None:
    labels = _rows({"a": 17, "b": 3})
    batches = make_batches(labels.rows, 8, np.random.default_rng(0))
    assert sorted(len(b) for b in batches) == [3, 5, 6, 6]
    assert all(len({r.key for r in b}) == 1 for b in batches)
    assert sorted(r.path for b in batches for r in b) == sorted(r.path for r in labels.rows)


def test_learning_rate_warms_up_then_decays() -> None:
    factors = [lr_factor(s, 100, 5) for s in range(100)]
    assert factors[0] == pytest.approx(0.2) and factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[5:], factors[6:], strict=False))
    assert factors[-1] == pytest.approx(0.01, abs=0.01)


def test_best_epoch_rule() -> None:
    def rec(srcc: float | None, loss: float) -> EpochRecord:
        return EpochRecord(1, 0.0, 0.0, 0.0, 0.0, val_loss=loss, val_SRCC=srcc)

    assert _is_better(rec(0.9, 1.0), None)
    assert _is_better(rec(0.95, 2.0), rec(0.9, 1.0))  # clearly better SRCC wins
    assert not _is_better(rec(0.85, 0.1), rec(0.9, 1.0))  # clearly worse SRCC loses
    assert _is_better(rec(0.899, 0.5), rec(0.9, 1.0))  # a tie goes to the lower loss
    assert not _is_better(rec(0.901, 1.5), rec(0.9, 1.0))
    assert _is_better(rec(None, 0.5), rec(None, 1.0))  # undefined SRCC: loss decides


def test_small_adapters_train_on_one_thread() -> None:
    assert adapter_threads(64, 8) == 1
    assert adapter_threads(512, 8) == 4
    assert adapter_threads(768, 2) == 2


def test_an_out_link_to_an_empty_folder_is_refused_before_training(
    counting: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17 item 12: training went on and the finished model was deleted at the end."""
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "model-link"
    out.symlink_to(empty)

    def no_training(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the destination must be refused before any training")

    monkeypatch.setattr("imgrank.models.clip.build.load_backbone", no_training)
    result = invoke("train", str(counting / "train.tsv"), "--out", str(out), *tiny_args())
    assert result.exit_code == UnsafeOperationError.exit_code, result.output
    assert str(out) in result.stderr and "not a folder" in result.stderr
    assert out.is_symlink() and os.readlink(out) == str(empty) and list(empty.iterdir()) == []
