"""Rename templates: how a ranked photo's new name is made and recognised.

``--name-template`` fields are ``{rank}``, ``{score}``, ``{stem}`` and ``{ext}``;
a template can also be read backwards, to find the rank prefix an earlier
run gave a name (so a re-sort replaces it instead of stacking a new one).
"""

from __future__ import annotations

import os
import re
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from imgrank.errors import UsageError

DEFAULT_TEMPLATE = "{rank}_{stem}{ext}"
TEMPLATE_FIELDS = ("rank", "score", "stem", "ext")



_SCORE_PATTERN = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)"


@dataclass(frozen=True)
class NameTemplate:
    """A ``--name-template`` such as ``{rank}_{stem}{ext}``, validated.

    Fields: ``{rank}`` (zero-padded to the width the ranking needs unless a
    format spec such as ``{rank:05d}`` is given), ``{score}`` (four decimals
    unless a spec is given), ``{stem}`` and ``{ext}`` (the original name
    without and with only its extension, ``.jpg`` including the dot).
    """

    text: str

    @classmethod
    def parse(cls, text: str) -> NameTemplate:
        """Check a template and return it.

        Raises:
            UsageError: unknown fields, bad braces, a path separator, a
                control character, or no ``{ext}`` (a photo that loses its
                extension is no longer recognised as a photo).
        """
        try:
            pieces = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise UsageError(f"--name-template {text!r} is not a valid template: {exc}") from None
        names = set()
        for literal, name, _spec, conversion in pieces:
            _check_template_literal(text, literal)
            if name is None:
                continue
            if name not in TEMPLATE_FIELDS:
                shown = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
                raise UsageError(
                    f"--name-template {text!r}: unknown field {{{name}}}; the fields are {shown}"
                )
            if conversion is not None:
                raise UsageError(
                    f"--name-template {text!r}: conversions such as !r are not supported"
                )
            names.add(name)
        if "ext" not in names:
            raise UsageError(
                f"--name-template {text!r} drops the file extension; add {{ext}} "
                '(e.g. "{rank}_{stem}{ext}") so the photos stay recognisable'
            )
        template = cls(text)
        try:
            template.render(rank=1, width=1, score=0.5, stem="photo", ext=".jpg")
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--name-template {text!r}: {exc}") from None
        return template

    @property
    def fields(self) -> set[str]:
        """The field names the template uses."""
        return {name for _, name, _, _ in string.Formatter().parse(self.text) if name}

    def render(self, *, rank: int, width: int, score: float, stem: str, ext: str) -> str:
        """The new name of one file."""
        out = []
        for literal, name, spec, _conversion in string.Formatter().parse(self.text):
            out.append(literal)
            if name == "rank":
                out.append(format(rank, spec) if spec else f"{rank:0{width}d}")
            elif name == "score":
                out.append(format(score, spec) if spec else f"{score:.4f}")
            elif name == "stem":
                out.append(format(stem, spec))
            elif name == "ext":
                out.append(format(ext, spec))
        return "".join(out)

    def match(self, name: str) -> tuple[int | None, str] | None:
        """If ``name`` looks like this template's output, its rank and original name.

        Only templates with both ``{stem}`` and ``{ext}`` can give the
        original name back; for others this returns None.
        """
        if not {"stem", "ext"} <= self.fields:
            return None
        pattern = []
        seen: set[str] = set()
        for literal, field_name, _spec, _conversion in string.Formatter().parse(self.text):
            pattern.append(re.escape(literal))
            if field_name is None:
                continue
            if field_name in seen:
                pattern.append(f"(?P={field_name})")
                continue
            seen.add(field_name)
            group = {
                "rank": r"\d+",
                "score": _SCORE_PATTERN,
                "stem": r".+?",
                "ext": r"(?:\.[^.]*)?",
            }[field_name]
            pattern.append(f"(?P<{field_name}>{group})")
        found = re.fullmatch("".join(pattern), name, flags=re.DOTALL)
        if found is None:
            return None
        stem, ext = found.group("stem"), found.group("ext")
        original = stem + ext
        # The original must split back into the same stem and extension.
        if split_name(original) != (stem, ext):
            return None
        rank = int(found.group("rank")) if "rank" in seen else None
        return rank, original


def _check_template_literal(text: str, literal: str) -> None:
    for sep in filter(None, (os.sep, os.altsep, "/")):
        if sep in literal:
            raise UsageError(
                f"--name-template {text!r} contains {sep!r}: it names a file in the same "
                "folder, not a path"
            )
    if any(unicodedata.category(ch) == "Cc" for ch in literal):
        raise UsageError(f"--name-template {text!r} contains a control character")


def split_name(name: str) -> tuple[str, str]:
    """``("IMG_1", ".jpg")`` for ``IMG_1.jpg``, as :class:`pathlib.Path` splits it."""
    ext = Path(name).suffix
    return (name[: -len(ext)] if ext else name), ext
