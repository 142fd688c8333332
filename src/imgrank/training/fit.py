"""Training the ranking-aware adapter on a user's labels, and evaluating scorers on labels.

The paper's recipe with a frozen CLIP backbone:

1. **Encode once.** The backbone never changes, so every image is decoded and
   run through the image tower exactly once (features already in the
   embedding cache are reused, new ones are added to it), and each prompt
   through the text tower once. Epochs then cost adapter time only.
2. **Batches from one group.** Pairs are only meaningful between images
   scored for the same prompt within the same group (``cname``), so each
   batch holds images of one ``(group, prompt)``; batches of all groups are
   shuffled together every epoch.
3. **Loss.** ``0.2 * regression + 1.0 * rank`` (the released weights), the
   rank term being binary cross-entropy on the pair logits (``--loss bce``,
   released) or the hinge of the slides (``--loss hinge``).
4. **Optimiser and schedule.** AdamW (weight decay 0.05); the learning rate
   warms up linearly over the first 5% of the steps, then follows a cosine
   down to 1% of its peak at the last epoch. Warm-up keeps the first steps
   of a freshly initialised transformer from blowing up; the cosine tail
   lets the regression settle.
5. **Validation and stopping.** A share of the images (``--val-split``,
   20%, drawn per group, never the same image in both sides) is held out.
   After every epoch the mean per-group SRCC on it decides which epoch is
   kept (near-ties, within 0.002, go to the lower validation loss); training
   stops early when it has not improved for ``patience`` epochs.
6. **Repeatable, interruptible.** ``seed`` fixes the adapter's
   initialisation, the split, the batch order and dropout, so a CPU run
   gives the same weights twice. Ctrl-C ends training and the best epoch
   so far is saved.

The result is an imgrank model folder (``imgrank.models.checkpoints``) that
``imgrank sort --adapter`` and ``imgrank eval --adapter`` read, plus
``training.json``: the data, the settings and the metrics of every epoch.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from imgrank.errors import UsageError
from imgrank.models.clip.config import BackboneSpec
from imgrank.training.datasets import LabelRow, LabelSet
from imgrank.training.encoding import encode_prompts, encode_usable
from imgrank.training.metrics import EvalReport, evaluate
from imgrank.training.progress import EpochRecord, TrainingReporter

if TYPE_CHECKING:
    import torch

    from imgrank.models.adapter import RankingAdapter

__all__ = [
    "EpochRecord",
    "TrainResult",
    "TrainSettings",
    "TrainingReporter",
    "adapter_threads",
    "lr_factor",
    "make_batches",
    "split_validation",
    "train_adapter",
]

#: Name of the training summary written into the model folder.
SUMMARY_FILE = "training.json"

#: Validation SRCCs closer than this are a tie, decided by the validation loss.
SRCC_TIE = 0.002

VariantName = Literal["full", "ranking-head", "ltr"]
LossName = Literal["bce", "hinge"]


@dataclass
class TrainSettings:
    """Everything about a training run that is not the data or the backbone.

    Attributes:
        epochs: Upper bound on epochs; the stopping rule usually ends sooner.
        batch_size: Images per batch (all from one group); the pair losses see
            ``batch_size**2`` ordered pairs per batch.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay.
        warmup: Share of all steps spent warming the learning rate up linearly.
        val_split: Share of the images held out for validation (0 disables
            validation: the last epoch is kept).
        patience: Stop after this many epochs without a better validation SRCC.
        seed: Seed of the initialisation, split, batch order and dropout.
        loss: Rank loss: ``bce`` (released default) or ``hinge`` (as the slides write it).
        variant: ``full``, ``ranking-head`` or ``ltr`` (the paper's ablation rows).
        regression_weight: Weight of the regression term (0.2 released).
        rank_weight: Weight of the rank term (1.0 released).
        num_layers: Adapter depth (the released configs use 2).
        n_head: Attention heads (8 released).
        num_learnable_text_tokens: Learnable prompt tokens (32 released).
        n_reg_tokens: Queries of the ranking-aware attention (16 released).
    """

    epochs: int = 40
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup: float = 0.05
    val_split: float = 0.2
    patience: int = 10
    seed: int = 0
    loss: LossName = "bce"
    variant: VariantName = "full"
    regression_weight: float = 0.2
    rank_weight: float = 1.0
    num_layers: int = 2
    n_head: int = 8
    num_learnable_text_tokens: int = 32
    n_reg_tokens: int = 16

    def check(self) -> None:
        """Raises UsageError naming the first setting out of range."""
        if self.epochs < 1:
            raise UsageError("--epochs must be at least 1")
        if self.batch_size < 2:
            raise UsageError("--batch-size must be at least 2 (the rank loss compares pairs)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError("--lr must be a positive number")
        if not 0 <= self.val_split < 1:
            raise UsageError("--val-split must be at least 0 and below 1 (e.g. 0.2)")
        if self.patience < 1:
            raise UsageError("--patience must be at least 1")
        if self.loss not in ("bce", "hinge"):
            raise UsageError(f"--loss must be bce or hinge, not {self.loss!r}")
        if self.variant not in ("full", "ranking-head", "ltr"):
            raise UsageError(f"--variant must be full, ranking-head or ltr, not {self.variant!r}")


@dataclass
class TrainResult:
    """The outcome of :func:`train_adapter`.

    Attributes:
        out: The model folder written.
        best_epoch: The epoch whose weights were saved (1-based).
        epochs: Per-epoch records, in order.
        stopped: Why training ended: ``"epochs"``, ``"patience"`` or ``"interrupted"``.
        labels: The labels actually used (after images that failed to decode were dropped).
        summary: The content of ``training.json``.
    """

    out: Path
    best_epoch: int
    epochs: list[EpochRecord]
    stopped: str
    labels: LabelSet
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        return self.stopped == "interrupted"

    @property
    def best(self) -> EpochRecord:
        return self.epochs[self.best_epoch - 1]


# ---------------------------------------------------------------------------
# Splitting and batching


def split_validation(
    labels: LabelSet, fraction: float, rng: np.random.Generator
) -> tuple[list[LabelRow], list[LabelRow]]:
    """Hold out about ``fraction`` of each group's images for validation.

    An image is wholly on one side, even when it is labelled in several groups,
    so validation never scores an image the adapter was trained on. A group
    gives validation images only if it keeps at least two for training and
    gives at least two (one image has no pair to rank).
    """
    if fraction <= 0:
        return list(labels.rows), []
    side: dict[Path, str] = {}
    for rows in labels.groups().values():
        paths = list(dict.fromkeys(row.path for row in rows))
        wanted = int(round(fraction * len(paths)))
        if wanted == 1:
            wanted = 2
        if wanted < 2 or len(paths) - wanted < 2:
            for path in paths:
                side.setdefault(path, "train")
            continue
        have = sum(1 for p in paths if side.get(p) == "val")
        free = [p for p in paths if p not in side]
        rng.shuffle(free)  # type: ignore[arg-type]
        for path in free:
            if have < wanted:
                side[path] = "val"
                have += 1
            else:
                side[path] = "train"
    train = [row for row in labels.rows if side[row.path] == "train"]
    val = [row for row in labels.rows if side[row.path] == "val"]
    return train, val


def make_batches(
    rows: list[LabelRow], batch_size: int, rng: np.random.Generator | None
) -> list[list[LabelRow]]:
    """Batches of rows of one ``(group, prompt)`` each, shuffled (in order when ``rng`` is None).

    A group is cut into equal-sized batches (``ceil(n / batch_size)`` of them),
    so no batch is a lone leftover image without a pair.
    """
    groups: dict[tuple[str, str], list[LabelRow]] = {}
    for row in rows:
        groups.setdefault(row.key, []).append(row)
    batches: list[list[LabelRow]] = []
    for members in groups.values():
        order = np.arange(len(members))
        if rng is not None:
            rng.shuffle(order)
        count = max(1, math.ceil(len(members) / batch_size))
        for part in np.array_split(order, count):
            if len(part):
                batches.append([members[i] for i in part])
    if rng is not None:
        order = np.arange(len(batches))
        rng.shuffle(order)
        batches = [batches[i] for i in order]
    return batches


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then a cosine down to 0.01 at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------
# Training


def adapter_threads(d_model: int, available: int) -> int:
    """CPU threads for training an adapter of width ``d_model``.

    A small adapter's operations are too small to split: with several
    threads they spend their time waiting for each other, and on a busy
    2-core machine a step of a 32-wide adapter on 16 tokens took 890 ms with
    2 threads against 15 ms with 1. Wider adapters get one thread per 128 of
    width, up to what the machine has.
    """
    return max(1, min(available, d_model // 128))


def _is_better(candidate: EpochRecord, best: EpochRecord | None) -> bool:
    if best is None:
        return True
    c_srcc, b_srcc = candidate.val_SRCC, best.val_SRCC
    c_loss = candidate.val_loss if candidate.val_loss is not None else math.inf
    b_loss = best.val_loss if best.val_loss is not None else math.inf
    if c_srcc is None and b_srcc is None:
        return c_loss < b_loss
    if c_srcc is None:
        return False
    if b_srcc is None or c_srcc > b_srcc + SRCC_TIE:
        return True
    return c_srcc >= b_srcc - SRCC_TIE and c_loss < b_loss


#: A best validation SRCC at or below this ranks no better than chance.
CHANCE_SRCC = 0.0


def better_than_chance(best: EpochRecord) -> bool | None:
    """Whether the kept epoch ranks the validation images better than chance (None: no
    validation). A model that does not is still saved, but is worth a warning."""
    if best.val_loss is None:
        return None
    return best.val_SRCC is not None and best.val_SRCC > CHANCE_SRCC


def validation_record(best: EpochRecord) -> dict[str, Any] | None:
    """The kept epoch's validation metrics, as the model folder records them."""
    if best.val_loss is None:
        return None
    return {
        "epoch": best.epoch,
        "SRCC": best.val_SRCC,
        "PLCC": best.val_PLCC,
        "MAE": best.val_MAE,
        "better_than_chance": better_than_chance(best),
    }


def _none_if_nan(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def train_adapter(
    labels: LabelSet,
    out: Path,
    backbone_spec: BackboneSpec,
    settings: TrainSettings | None = None,
    *,
    device: str = "auto",
    cache: Path | bool | None = True,
    encode_batch_size: int = 32,
    workers: int | None = None,
    reporter: TrainingReporter | None = None,
    fit_threads: Callable[[int], int] | None = None,
) -> TrainResult:
    """Train a ranking-aware adapter on labels and write a model folder to ``out``.

    Args:
        labels: From :func:`imgrank.training.datasets.load_labels`.
        out: The model folder to create; it must not exist (or be empty).
        backbone_spec: The frozen backbone (``--model``/``--pretrained``).
        settings: Training settings (defaults: :class:`TrainSettings`).
        device: ``auto|cpu|cuda|cuda:N|mps``.
        cache: The embedding cache: True for the default file, a path, or None/False for none.
        encode_batch_size: Images per forward pass of the backbone.
        workers: Decode threads.
        reporter: Progress hooks.
        fit_threads: Called with the adapter's width, returns the CPU threads to
            fit it with (e.g. ``lambda width: adapter_threads(width, cores)``);
            torch's thread count is set for the fit and restored after. None
            (the default) leaves the process's thread count alone.

    Returns:
        What was trained and saved. ``stopped == "interrupted"`` when Ctrl-C ended
        training after at least one epoch (the best epoch so far was saved).

    Raises:
        DataError: too few usable rows per group.
        UnsafeOperationError: ``out`` exists and is not empty.
        ModelError / AdapterMismatchError: the backbone cannot carry an adapter.
        KeyboardInterrupt: Ctrl-C before the first epoch ended (nothing to save).
    """
    import torch

    from imgrank import __version__
    from imgrank.files.atomic import check_new_folder
    from imgrank.models.adapter import AdapterConfig, RankingAdapter
    from imgrank.models.checkpoints import check_backbone_fits, save_model_folder
    from imgrank.models.loading import load_model
    from imgrank.models.selection import ModelSelection

    settings = settings or TrainSettings()
    settings.check()
    reporter = reporter or TrainingReporter()
    out = Path(out).expanduser()
    # Checked before hours of work with the very rule the save applies (a symbolic
    # link, even to an empty folder, is refused), and again atomically when saving.
    check_new_folder(out, what="--out")
    labels.require_rows_per_group(2, purpose="training")
    started = time.perf_counter()

    model_selection = ModelSelection(
        model=backbone_spec.model, pretrained=backbone_spec.pretrained, device=device
    )
    ranking_model = load_model(model_selection, warn=reporter.warn)
    backbone = ranking_model.backbone()
    adapter_config = AdapterConfig(
        d_model=int(backbone.config["embed_dim"]),
        num_layers=settings.num_layers,
        n_head=settings.n_head,
        num_learnable_text_tokens=settings.num_learnable_text_tokens,
        n_reg_tokens=settings.n_reg_tokens,
        variant=settings.variant,
    )
    check_backbone_fits(backbone.config, adapter_config, what=f"--model {backbone_spec.model}")

    encoded, labels = encode_usable(
        labels, ranking_model.image_encoder, tokens=True, batch_size=encode_batch_size,
        workers=workers,
        cache=cache, reporter=reporter, purpose="training",
    )  # fmt: skip
    texts = encode_prompts(labels.prompts(), backbone)

    rng = np.random.default_rng(settings.seed)
    train_rows, val_rows = split_validation(labels, settings.val_split, rng)
    if settings.val_split > 0 and not val_rows:
        reporter.warn(
            "no group is large enough to hold images out for validation (each needs at least 4 "
            "images); training without validation, the last epoch is kept"
        )

    run_device = backbone.device
    tokens_all = torch.from_numpy(encoded.tokens)  # (N, P, D) float32 on the CPU
    values = {row: row.value for row in labels.rows}

    def batch_tensors(rows: list[LabelRow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.tensor([encoded.index[row.path] for row in rows])
        image = tokens_all.index_select(0, idx).to(run_device)
        text = texts[rows[0].prompt].to(run_device)
        target = torch.tensor([values[row] for row in rows], dtype=torch.float32, device=run_device)
        return image, text, target

    from imgrank.training.losses import adapter_loss

    def loss_of(model: RankingAdapter, rows: list[LabelRow]) -> Any:
        image, text, target = batch_tensors(rows)
        scores, pairs = model(image, text)
        return adapter_loss(
            scores,
            pairs,
            target,
            rank=settings.loss,
            regression_weight=settings.regression_weight,
            rank_weight=settings.rank_weight,
        )

    def validate(model: RankingAdapter) -> tuple[float, EvalReport]:
        model.eval()
        total, count = 0.0, 0
        predictions: dict[LabelRow, float] = {}
        with torch.no_grad():
            for rows in make_batches(val_rows, settings.batch_size, None):
                parts = loss_of(model, rows)
                total += float(parts.total) * len(rows)
                count += len(rows)
                image, text, _ = batch_tensors(rows)
                scores = model.score(image, text).reshape(-1).double().cpu().numpy()
                predictions.update(zip(rows, scores.tolist(), strict=True))
        model.train()
        names = labels.group_names()
        report = evaluate(
            [names[row.key] for row in val_rows],
            [predictions[row] for row in val_rows],
            [row.value for row in val_rows],
        )
        return total / max(1, count), report

    records: list[EpochRecord] = []
    best: EpochRecord | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stopped = "epochs"
    cuda_devices = [torch.device(run_device).index or 0] if run_device.startswith("cuda") else []
    threads_before = torch.get_num_threads()
    with contextlib.ExitStack() as restore:
        if run_device == "cpu" and fit_threads is not None:
            # Only when the caller asks: the thread count belongs to the whole process.
            torch.set_num_threads(fit_threads(adapter_config.d_model))
            restore.callback(torch.set_num_threads, threads_before)
        restore.enter_context(torch.random.fork_rng(devices=cuda_devices))
        torch.manual_seed(settings.seed)
        model = RankingAdapter(adapter_config).to(run_device).train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        steps_per_epoch = len(make_batches(train_rows, settings.batch_size, None))
        total_steps = steps_per_epoch * settings.epochs
        warmup = int(round(settings.warmup * total_steps))
        reporter.training(settings.epochs, steps_per_epoch, len(train_rows), len(val_rows))
        step, since_best = 0, 0
        try:
            for epoch in range(1, settings.epochs + 1):
                epoch_started = time.perf_counter()
                sums = np.zeros(3)
                seen = 0
                for rows in make_batches(train_rows, settings.batch_size, rng):
                    for group in optimizer.param_groups:
                        group["lr"] = settings.lr * lr_factor(step, total_steps, warmup)
                    parts = loss_of(model, rows)
                    optimizer.zero_grad(set_to_none=True)
                    parts.total.backward()
                    optimizer.step()
                    step += 1
                    sums += len(rows) * np.array(
                        [parts.total.item(), parts.regression.item(), parts.rank.item()]
                    )
                    seen += len(rows)
                    reporter.step()
                means = sums / max(1, seen)
                record = EpochRecord(
                    epoch=epoch,
                    lr=float(optimizer.param_groups[0]["lr"]),
                    train_loss=float(means[0]),
                    train_regression=float(means[1]),
                    train_rank=float(means[2]),
                )
                if val_rows:
                    val_loss, report = validate(model)
                    record.val_loss = float(val_loss)
                    record.val_SRCC = _none_if_nan(report.mean.SRCC)
                    record.val_PLCC = _none_if_nan(report.mean.PLCC)
                    record.val_MAE = _none_if_nan(report.mean.MAE)
                record.seconds = time.perf_counter() - epoch_started
                records.append(record)
                improved = (not val_rows) or _is_better(record, best)
                if improved:
                    best = record
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    since_best = 0
                else:
                    since_best += 1
                reporter.epoch(record, improved)
                if val_rows and since_best >= settings.patience:
                    stopped = "patience"
                    break
        except KeyboardInterrupt:
            if best_state is None:
                raise
            stopped = "interrupted"

    assert best is not None and best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    targets = [row.value for row in labels.rows]
    summary: dict[str, Any] = {
        "imgrank_version": __version__,
        "data": {
            **labels.summary(),
            "train_rows": len(train_rows),
            "val_rows": len(val_rows),
            "skipped": [bad.describe() for bad in labels.bad[:50]],
            "target_range": [min(targets), max(targets)],
        },
        "backbone": {
            "model": backbone.name,
            "pretrained": backbone_spec.pretrained,
            "device": run_device,
            "fingerprint": backbone.fingerprint,
        },
        "settings": asdict(settings),
        "adapter": adapter_config.to_dict(),
        "encoding": {
            "images": len(encoded.index),
            "from_cache": encoded.from_cache,
            "failed": len(encoded.failed),
            "seconds": round(encoded.seconds, 3),
        },
        "epochs": [asdict(r) for r in records],
        "best_epoch": best.epoch,
        "best": asdict(best),
        "stopped": stopped,
        "seconds": round(time.perf_counter() - started, 3),
    }
    folder = save_model_folder(
        out,
        model,
        backbone_spec,
        target_range=(min(targets), max(targets)),
        source={
            "trained_by": "imgrank train",
            "summary": SUMMARY_FILE,
            "data": str(labels.source),
            "best_epoch": best.epoch,
            # What `sort --adapter` compares --by with, and `adapter info` shows.
            "prompts": labels.prompts(),
            "validation": validation_record(best),
        },
        extra_files={SUMMARY_FILE: json.dumps(summary, indent=2) + "\n"},
    )
    return TrainResult(
        out=folder.path,
        best_epoch=best.epoch,
        epochs=records,
        stopped=stopped,
        labels=labels,
        summary=summary,
    )
