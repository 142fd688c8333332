"""Progress hooks of training and evaluation, and the record of one epoch.

The library reports through a :class:`TrainingReporter` (all no-ops here);
the CLI subclasses it to draw Rich progress bars. Kept apart from the loop so
the encoding step, training and evaluation can all report without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EpochRecord:
    """What one epoch did (one line of the progress display and of the summary)."""

    epoch: int
    lr: float
    train_loss: float
    train_regression: float
    train_rank: float
    val_loss: float | None = None
    val_SRCC: float | None = None
    val_PLCC: float | None = None
    val_MAE: float | None = None
    seconds: float = 0.0


class TrainingReporter:
    """Hooks for a front end (the CLI draws a Rich progress display); all no-ops here."""

    def warn(self, message: str) -> None:
        """Something the user must know."""

    def encoding(self, total: int) -> None:
        """Encoding starts: ``total`` images (cache hits included)."""

    def encoded(self, count: int) -> None:
        """``count`` more images were encoded (or skipped)."""

    def training(self, epochs: int, steps_per_epoch: int, train_rows: int, val_rows: int) -> None:
        """The epochs start."""

    def step(self) -> None:
        """One batch was trained on."""

    def epoch(self, record: EpochRecord, is_best: bool) -> None:
        """An epoch ended."""
