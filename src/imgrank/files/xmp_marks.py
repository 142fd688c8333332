"""From a ranking to XMP fields: star ratings, colour labels, picks and rejects.

``sort --xmp rating|label|pick`` turns each ranked photo into the ``{field:
value}`` pairs :func:`imgrank.files.sidecars.plan_sidecars` writes. Next to
what photo managers read, imgrank records what it wrote in its own namespace
(``imgrank:Rating``), so ``imgrank train`` can tell a rating imgrank guessed
from one a person gave (or changed) later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from imgrank.errors import UsageError
from imgrank.ranking import RankedImage

XMP_MODES: tuple[str, ...] = ("rating", "label", "pick")

#: Lightroom's colour label names (digiKam and darktable map the same names).
LABEL_COLOURS: tuple[str, ...] = ("Red", "Yellow", "Green", "Blue", "Purple")

#: digiKam's pick labels (``digiKam:PickLabel``): 1 rejected, 2 pending, 3 accepted.
PICK_ACCEPTED = "3"
PICK_REJECTED = "1"
#: The rating Lightroom and darktable read as "rejected".
RATING_REJECTED = "-1"

#: Default share of the photos that counts as "the top" for label and pick.
DEFAULT_TOP_SHARE = 0.2


@dataclass(frozen=True)
class RatingScale:
    """How scores become 5..1 stars.

    ``percent``: ``values`` are the shares (in %) of the photos that get 5, 4, 3,
    2 and 1 stars, best first (quintiles: 20 each). ``score``: ``values`` are
    the lowest scores for 5, 4, 3 and 2 stars; anything lower gets 1.
    """

    kind: str
    values: tuple[float, ...]

    @classmethod
    def parse(cls, text: str | None) -> RatingScale:
        """``quintiles`` (default), ``percent:P5,P4,P3,P2,P1`` or ``score:T5,T4,T3,T2``.

        Raises:
            UsageError: anything else.
        """
        if text is None or text.strip() == "quintiles":
            return cls("percent", (20.0,) * 5)
        kind, _, rest = text.partition(":")
        try:
            values = tuple(float(v) for v in rest.split(","))
        except ValueError:
            values = ()
        if kind == "percent":
            if len(values) != 5 or any(v < 0 for v in values) or abs(sum(values) - 100) > 1e-6:
                raise UsageError(
                    f"--xmp-scale {text!r}: percent needs five shares for 5..1 stars that add "
                    "up to 100, e.g. percent:10,20,40,20,10"
                )
            return cls("percent", values)
        if kind == "score":
            if len(values) != 4 or any(a < b for a, b in zip(values, values[1:], strict=False)):
                raise UsageError(
                    f"--xmp-scale {text!r}: score needs four falling thresholds, the lowest "
                    "scores for 5, 4, 3 and 2 stars, e.g. score:0.8,0.6,0.4,0.2"
                )
            return cls("score", values)
        raise UsageError(
            f"--xmp-scale must be quintiles, percent:P5,P4,P3,P2,P1 or score:T5,T4,T3,T2, "
            f"not {text!r}"
        )


def _best_first(items: list[RankedImage]) -> list[RankedImage]:
    # Stars follow the score whatever order the ranking is shown in (--ascending).
    return sorted(items, key=lambda item: (-item.score, str(item.path)))


def stars(items: list[RankedImage], scale: RatingScale) -> dict[Path, int]:
    """Each photo's stars (5..1) under ``scale``."""
    ordered = _best_first(items)
    out: dict[Path, int] = {}
    if scale.kind == "score":
        for item in ordered:
            passed = [item.score >= t for t in scale.values]
            out[item.path] = 5 - passed.index(True) if any(passed) else 1
        return out
    count = len(ordered)
    bounds = []
    total = 0.0
    for share in scale.values:
        total += share
        bounds.append(total / 100 * count)
    for position, item in enumerate(ordered):
        # The band the photo's position falls in: position 0..count-1 against cumulative shares.
        band = next((i for i, bound in enumerate(bounds) if position < bound - 1e-9), 4)
        out[item.path] = 5 - band
    return out


def top_count(count: int, top: int | None) -> int:
    """How many photos count as the top: ``--xmp-top``, else the best 20% (at least one)."""
    if top is not None:
        if top < 1:
            raise UsageError("--xmp-top must be at least 1")
        return min(top, count)
    return max(1, math.ceil(count * DEFAULT_TOP_SHARE)) if count else 0


def xmp_writes(
    items: list[RankedImage],
    mode: str,
    *,
    scale: RatingScale | None = None,
    top: int | None = None,
    label: str = "Green",
) -> list[tuple[Path, dict[str, str]]]:
    """The ``(file, {field: value})`` pairs for a ranking; both files of a RAW+JPEG pair.

    Args:
        items: The ranking.
        mode: ``rating`` (``xmp:Rating`` 5..1 by ``scale``), ``label`` (``xmp:Label``
            for the top photos, nothing for the others) or ``pick`` (the top
            accepted, the rest rejected, in digiKam's and darktable's fields).
        scale: For ``rating`` (default: quintiles).
        top: For ``label`` and ``pick``: how many photos are the top (default 20%).
        label: The colour label for ``label``.

    Raises:
        UsageError: an unknown mode.
    """
    if mode not in XMP_MODES:
        raise UsageError(f"--xmp must be one of {', '.join(XMP_MODES)}, not {mode!r}")
    writes: list[tuple[Path, dict[str, str]]] = []
    if mode == "rating":
        given = stars(items, scale or RatingScale.parse(None))
        for item in _best_first(items):
            value = str(given[item.path])
            writes += [(f, {"xmp:Rating": value, "imgrank:Rating": value}) for f in item.files]
        return writes
    ordered = _best_first(items)
    best = top_count(len(ordered), top)
    if mode == "pick":
        return pick_writes(ordered[:best], ordered[best:])
    for item in ordered[:best]:
        writes += [(f, {"xmp:Label": label, "imgrank:Label": label}) for f in item.files]
    return writes


def pick_writes(
    accepted: list[RankedImage], rejected: list[RankedImage]
) -> list[tuple[Path, dict[str, str]]]:
    """Pick marks: ``accepted`` photos accepted, ``rejected`` ones rejected (digiKam's
    pick label, and the rejected rating darktable and Lightroom read). ``sort --xmp pick``
    accepts its top photos, ``cull --xmp pick`` the keepers of every group.
    """
    writes: list[tuple[Path, dict[str, str]]] = []
    for item in accepted:
        writes += [(f, {"digiKam:PickLabel": PICK_ACCEPTED}) for f in item.files]
    for item in rejected:
        fields = {
            "digiKam:PickLabel": PICK_REJECTED,
            "xmp:Rating": RATING_REJECTED,
            "imgrank:Rating": RATING_REJECTED,
        }
        writes += [(f, dict(fields)) for f in item.files]
    return writes
