"""The result of a run: ranked images and skipped files.

These plain dataclasses are what every writer (CSV, JSON lines, paths,
links/copies, renames, the HTML report) consumes, so writers never depend on
torch or on how scores were produced.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RankedImage:
    """One image in the final order. ``rank`` starts at 1 (the first row).

    ``raw`` is the camera RAW file of a RAW+JPEG pair ranked through ``path`` (its
    JPEG twin); renames, links, copies and XMP sidecars apply to both files.
    """

    rank: int
    score: float
    path: Path
    raw: Path | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file this row stands for: the photo, then its RAW if paired."""
        return (self.path,) if self.raw is None else (self.path, self.raw)

    def expanded(self) -> list[RankedImage]:
        """One row per file (same rank and score), for writers that handle files one by one."""
        return [RankedImage(self.rank, self.score, path) for path in self.files]


@dataclass(frozen=True)
class SkippedFile:
    """A file the run could not use, and a one-line reason a user understands."""

    path: Path
    reason: str


@dataclass
class Ranking:
    """Everything a writer needs to present one run."""

    items: list[RankedImage]
    skipped: list[SkippedFile] = field(default_factory=list)
    prompt: str = ""
    scorer: str = ""
    seconds: float = 0.0
    #: How many images were scored (more than ``len(items)`` with ``--top``).
    scored: int = 0
    #: How many of them were scored from the embedding cache (nothing decoded).
    from_cache: int = 0
    #: Sub-folders not scanned because imgrank wrote them (``--link`` / ``--copy`` outputs).
    skipped_outputs: list[Path] = field(default_factory=list)


def rank_scores(
    scored: list[tuple[Path, float]],
    *,
    ascending: bool = False,
    top: int | None = None,
    raw_of: dict[Path, Path] | None = None,
    names: dict[Path, str] | None = None,
) -> list[RankedImage]:
    """Order ``(path, score)`` pairs and number them from 1.

    Ties are broken by path, so the output is deterministic.
    ``names`` gives the name to use for a file instead of its current one (the
    name it had before imgrank renamed it), so a rename into rank order does not
    change the order of tied files. ``ascending`` puts the lowest score first;
    ``top`` keeps only the first K rows; ``raw_of`` gives a ranked photo its RAW twin.
    """
    names = names or {}

    def tie(path: Path) -> str:
        original = names.get(path)
        return str(path if original is None else path.parent / original)

    if ascending:
        ordered = sorted(scored, key=lambda item: (item[1], tie(item[0])))
    else:
        ordered = sorted(scored, key=lambda item: (-item[1], tie(item[0])))
    if top is not None:
        ordered = ordered[:top]
    if not raw_of:  # (hashing 100,000 paths for an empty dict costs a re-sort 0.3 s)
        return [
            RankedImage(rank=i, score=score, path=path, raw=None)
            for i, (path, score) in enumerate(ordered, 1)
        ]
    return [
        RankedImage(rank=i, score=score, path=path, raw=raw_of.get(path))
        for i, (path, score) in enumerate(ordered, 1)
    ]


def tied_paths(scored: list[tuple[Path, float]]) -> list[Path]:
    """The paths whose score another path shares exactly."""
    counts = Counter(score for _path, score in scored)
    return [path for path, score in scored if counts[score] > 1]
