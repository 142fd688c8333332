"""``imgrank train`` and ``imgrank eval``: teach imgrank what "better" means, and measure it."""

from __future__ import annotations

import json
import shlex
import sys
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from imgrank.cli.common import (
    EXIT_INTERRUPTED,
    check_before_writing,
    err_console,
    handle_errors,
    option_given,
    prepare_torch,
    route_library_warnings,
    warn,
)
from imgrank.cli.options import (
    PANEL_INPUT,
    PANEL_OUTPUT,
    PANEL_TRAINING,
    AdapterOption,
    BatchSizeOption,
    CacheOption,
    DeviceOption,
    JsonOption,
    LabelsArgument,
    ModelOption,
    NoCacheOption,
    OutFolderOption,
    PretrainedOption,
    PromptOption,
    QuietOption,
    WorkersOption,
    cache_choice,
)

# These modules import torch only inside functions, so importing them here is cheap.
from imgrank.models.clip.config import DEFAULT_MODEL, DEFAULT_PRETRAINED, BackboneSpec
from imgrank.training.fit import EpochRecord, TrainingReporter, TrainSettings

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from imgrank.training.datasets import LabelSet
    from imgrank.training.metrics import EvalReport, Metrics

#: Skipped rows listed on stderr before "... and N more".
SHOWN_SKIPS = 20

_DEFAULTS = TrainSettings()



def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or value != value else f"{value:.{digits}f}"


class _Display(TrainingReporter):
    """Rich progress on stderr: a bar for encoding, a bar per epoch, one line per finished epoch.

    Bars are drawn only on a terminal; the per-epoch lines are printed
    everywhere (they are the log of the run) unless ``--quiet``.
    """

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.progress: Progress | None = None
        self._encode: TaskID | None = None
        self._epoch: TaskID | None = None
        self._epochs = 0
        self._steps = 0
        if err_console.is_terminal and not quiet:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=err_console,
                transient=True,
            )

    def __enter__(self) -> _Display:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def print(self, message: str) -> None:
        if not self.quiet:
            err_console.print(message)

    def warn(self, message: str) -> None:
        warn(message, quiet=self.quiet)

    def encoding(self, total: int) -> None:
        if self.progress is not None:
            self._encode = self.progress.add_task("encoding images", total=total)

    def encoded(self, count: int) -> None:
        if self.progress is not None and self._encode is not None:
            self.progress.advance(self._encode, count)

    def training(self, epochs: int, steps_per_epoch: int, train_rows: int, val_rows: int) -> None:
        if self.progress is not None and self._encode is not None:
            self.progress.remove_task(self._encode)
            self._encode = None
        held_out = f", {val_rows} held out for validation" if val_rows else ", no validation"
        self.print(f"training on {train_rows} labelled image(s){held_out}")
        self._epochs, self._steps = epochs, steps_per_epoch
        if self.progress is not None:
            self._epoch = self.progress.add_task(f"epoch 1/{epochs}", total=steps_per_epoch)

    def step(self) -> None:
        if self.progress is not None and self._epoch is not None:
            self.progress.advance(self._epoch)

    def epoch(self, record: EpochRecord, is_best: bool) -> None:
        val = (
            f"  val SRCC {_fmt(record.val_SRCC)}  MAE {_fmt(record.val_MAE, 3)}"
            if record.val_loss is not None
            else ""
        )
        mark = "  [green]best[/]" if is_best and record.val_loss is not None else ""
        self.print(
            f"epoch {record.epoch:>3}/{self._epochs}  loss {record.train_loss:.4f} "
            f"(reg {record.train_regression:.4f}, rank {record.train_rank:.4f}){val}  "
            f"lr {record.lr:.2e}  {record.seconds:.1f}s{mark}"
        )
        if self.progress is not None and self._epoch is not None:
            self.progress.reset(
                self._epoch,
                total=self._steps,
                description=f"epoch {record.epoch + 1}/{self._epochs}",
            )


def _report_skips(labels: LabelSet, *, quiet: bool) -> None:
    """List the rows left out (shown even with --quiet: they are errors in the user's data)."""
    for bad in labels.bad[:SHOWN_SKIPS]:
        err_console.print(f"[yellow]skipped:[/] {escape(bad.describe())}")
    if len(labels.bad) > SHOWN_SKIPS:
        err_console.print(
            f"[yellow]skipped:[/] ... and {len(labels.bad) - SHOWN_SKIPS} more row(s)"
        )
    if labels.imgrank_rated and not quiet:
        err_console.print(
            f"{labels.imgrank_rated} photo(s) rated by imgrank itself left out "
            "(--include-imgrank-ratings to train on them)"
        )
    if labels.unrated and not quiet:
        err_console.print(f"{labels.unrated} unrated photo(s) left out")


class Loss(str, Enum):
    """The pairwise rank loss: bce (the released recipe) or hinge (as the slides write it)."""

    bce = "bce"
    hinge = "hinge"


class Variant(str, Enum):
    """The paper's ablation rows."""

    full = "full"
    ranking_head = "ranking-head"
    ltr = "ltr"


_DEFAULT_LOSS = Loss(_DEFAULTS.loss)
_DEFAULT_VARIANT = Variant(_DEFAULTS.variant)


def _training(name: str, **kwargs: Any) -> Any:
    return typer.Option(name, rich_help_panel=PANEL_TRAINING, **kwargs)


@handle_errors
def train(
    data: LabelsArgument,
    out: OutFolderOption,
    prompt: PromptOption = None,
    model: ModelOption = DEFAULT_MODEL,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    device: DeviceOption = "auto",
    epochs: Annotated[
        int,
        _training(
            "--epochs",
            metavar="N",
            help="At most this many epochs (training stops earlier when validation SRCC "
            "stops improving).",
        ),
    ] = _DEFAULTS.epochs,
    batch_size: Annotated[
        int,
        _training(
            "--batch-size", metavar="N", help="Images per training batch (all from one group)."
        ),
    ] = _DEFAULTS.batch_size,
    lr: Annotated[
        float,
        _training("--lr", metavar="RATE", help="Peak learning rate (AdamW, warm-up + cosine)."),
    ] = _DEFAULTS.lr,
    val_split: Annotated[
        float,
        _training(
            "--val-split",
            metavar="SHARE",
            help="Share of images held out to pick the best epoch (0: none).",
        ),
    ] = _DEFAULTS.val_split,
    patience: Annotated[
        int,
        _training(
            "--patience",
            metavar="N",
            help="Stop after this many epochs without a better validation SRCC.",
        ),
    ] = _DEFAULTS.patience,
    seed: Annotated[
        int, _training("--seed", metavar="N", help="Seed: the same seed repeats a CPU run exactly.")
    ] = _DEFAULTS.seed,
    loss: Annotated[
        Loss,
        _training("--loss", help="Rank loss: bce (the released recipe) or hinge (the slides)."),
    ] = _DEFAULT_LOSS,
    variant: Annotated[
        Variant,
        _training(
            "--variant",
            help="full (the paper's model), ranking-head (no ranking-aware attention) or ltr "
            "(rank loss on score differences only).",
        ),
    ] = _DEFAULT_VARIANT,
    include_imgrank_ratings: Annotated[
        bool,
        typer.Option(
            "--include-imgrank-ratings",
            help="Rated folder: also train on star ratings imgrank itself wrote (sort --xmp) "
            "and nobody changed since; left out by default so imgrank does not learn its own "
            "guesses.",
            rich_help_panel=PANEL_INPUT,
        ),
    ] = False,
    cache: CacheOption = None,
    no_cache: NoCacheOption = False,
    workers: WorkersOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train a ranking adapter on your labels and save it as a model folder.

    The backbone stays frozen: every image is encoded once, then only the small
    adapter learns, with the paper's regression + pairwise rank losses on images
    of the same group. Use the result with `imgrank sort --adapter OUT` and
    measure it with `imgrank eval --adapter OUT`.

    Examples:

        imgrank train labels.tsv --out my-model

        imgrank train ~/Pictures/rated --prompt "photos I like" --out my-taste
    """
    from imgrank.images.decode import DEFAULT_MAX_PIXELS, set_pillow_pixel_guard
    from imgrank.models.device import available_cores

    set_pillow_pixel_guard(DEFAULT_MAX_PIXELS)  # the documented 200 MP, not Pillow's 179 MP
    from imgrank.models.checkpoints import CONFIG_FILE
    from imgrank.training.datasets import load_labels
    from imgrank.training.fit import (
        SUMMARY_FILE,
        adapter_threads,
        better_than_chance,
        train_adapter,
    )

    route_library_warnings(quiet=quiet)
    check_before_writing()  # refuse while an interrupted rename run is unsettled
    cache_file = cache_choice(cache, no_cache)  # both given is a usage error, before any work

    settings = TrainSettings(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        val_split=val_split,
        patience=patience,
        seed=seed,
        loss=Loss(loss).value,  # type: ignore[arg-type]
        variant=Variant(variant).value,  # type: ignore[arg-type]
    )
    settings.check()  # before reading thousands of files
    labels = load_labels(data, prompt=prompt, include_imgrank_ratings=include_imgrank_ratings)
    _report_skips(labels, quiet=quiet)
    prepare_torch()
    with _Display(quiet=quiet) as display:
        result = train_adapter(
            labels,
            out,
            BackboneSpec(model=model, pretrained=pretrained),
            settings,
            device=device,
            cache=cache_file,
            workers=workers,
            reporter=display,
            fit_threads=lambda width: adapter_threads(width, available_cores()),
        )
    # Images that failed to decode are only known after encoding.
    late = [bad for bad in result.labels.bad if bad not in labels.bad]
    for bad in late[:SHOWN_SKIPS]:
        err_console.print(f"[yellow]skipped:[/] {escape(bad.describe())}")
    best = result.best
    measured = (
        f": validation SRCC {_fmt(best.val_SRCC)}, MAE {_fmt(best.val_MAE, 3)}"
        if best.val_loss is not None
        else " (the last one: no validation)"
    )
    if result.interrupted:
        err_console.print(
            f"[bold red]interrupted:[/] saved the best epoch so far "
            f"({result.best_epoch}{measured}) "
            f"to {escape(str(result.out))}"
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    if better_than_chance(best) is False:
        warn(
            f"the best epoch ranks the validation images no better than chance (SRCC "
            f"{_fmt(best.val_SRCC)}): sorting with this model is no better than random. What "
            "usually helps: more labelled images per group, more --epochs (or a higher --lr), "
            "a larger backbone (--model). The model was saved; its validation metrics are in "
            f"{CONFIG_FILE} and {SUMMARY_FILE}.",
            quiet=quiet,
        )
    why = {"patience": "validation SRCC stopped improving", "epochs": "all epochs done"}[
        result.stopped
    ]
    if not quiet:
        err_console.print(
            f"saved {escape(str(result.out))}: epoch {result.best_epoch} of {len(result.epochs)}"
            f"{measured} ({why}, {result.summary['seconds']:.0f} s)"
        )
        prompts = result.labels.prompts()
        others = f" (or another of its {len(prompts)} prompts)" if len(prompts) > 1 else ""
        err_console.print(
            "sort with it: imgrank sort FOLDER --by "
            f"{escape(shlex.quote(prompts[0]))} "
            f"--adapter {escape(shlex.quote(str(result.out)))}{others}"
        )


def _metrics_row(name: str, m: Metrics) -> list[str]:
    return [
        name,
        _fmt(m.PLCC),
        _fmt(m.SRCC),
        _fmt(m.KRCC),
        _fmt(m.MAE, 3),
        _fmt(m.accuracy),
        str(m.n),
    ]


def _print_table(report: EvalReport, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("group")
    for name in ("PLCC", "SRCC", "KRCC", "MAE", "accuracy", "n"):
        table.add_column(name, justify="right")
    for name, metrics in report.groups.items():
        table.add_row(*_metrics_row(name, metrics))
    if len(report.groups) > 1:
        table.add_section()
        table.add_row(*_metrics_row("mean", report.mean))
    Console(file=sys.stdout, highlight=False, soft_wrap=True).print(table)


@handle_errors
def evaluate(
    ctx: typer.Context,
    data: LabelsArgument,
    adapter: AdapterOption = None,
    prompt: PromptOption = None,
    round_predictions: Annotated[
        bool,
        typer.Option(
            "--round",
            help="Round predictions to whole numbers first (ordinal targets: age group, decade).",
            rich_help_panel=PANEL_OUTPUT,
        ),
    ] = False,
    as_json: JsonOption = False,
    model: ModelOption = DEFAULT_MODEL,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    device: DeviceOption = "auto",
    batch_size: BatchSizeOption = 32,
    cache: CacheOption = None,
    no_cache: NoCacheOption = False,
    workers: WorkersOption = None,
    quiet: QuietOption = False,
) -> None:
    """Measure how well a scorer orders labelled images: PLCC, SRCC, KRCC, MAE, pairwise accuracy.

    Metrics are computed per group (images are only compared within their group)
    and averaged over groups. Without --adapter the zero-shot CLIP scorer is
    measured, so you can see what training bought you (its MAE is not shown:
    its scores are not in your labels' units).

    Examples:

        imgrank eval test.tsv --adapter my-model

        imgrank eval test.tsv --adapter my-model --json > metrics.json
    """
    from imgrank.images.decode import DEFAULT_MAX_PIXELS, set_pillow_pixel_guard

    set_pillow_pixel_guard(DEFAULT_MAX_PIXELS)  # the documented 200 MP, not Pillow's 179 MP
    from imgrank.models.selection import ModelSelection
    from imgrank.training.datasets import load_labels
    from imgrank.training.evaluate import evaluate_labels

    # Without --adapter the defaults name the backbone; with one, only what was typed counts.
    model_typed = adapter is None or option_given(ctx, "model")
    pretrained_typed = adapter is None or option_given(ctx, "pretrained")
    selection = ModelSelection(
        model=model if model_typed else None,
        pretrained=pretrained if pretrained_typed else None,
        adapter=adapter,
        device=device,
    )
    selection.resolve()  # option mistakes before reading thousands of files

    route_library_warnings(quiet=quiet)
    cache_file = cache_choice(cache, no_cache)  # both given is a usage error, before any work
    labels = load_labels(data, prompt=prompt)
    _report_skips(labels, quiet=quiet)
    prepare_torch()
    with _Display(quiet=quiet) as display:
        result = evaluate_labels(
            labels,
            selection,
            round_predictions=round_predictions,
            cache=cache_file,
            batch_size=batch_size,
            workers=workers,
            reporter=display,
        )
    late = [bad for bad in result.labels.bad if bad not in labels.bad]
    for bad in late[:SHOWN_SKIPS]:
        err_console.print(f"[yellow]skipped:[/] {escape(bad.describe())}")
    if as_json:
        payload: dict[str, Any] = {
            "scorer": result.scorer,
            "data": str(result.labels.source),
            **result.report.to_dict(),
            "skipped": len(result.labels.bad),
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        sys.stdout.flush()
    else:
        rounded = ", predictions rounded" if round_predictions else ""
        _print_table(result.report, escape(f"{result.scorer} on {data}{rounded}"))
