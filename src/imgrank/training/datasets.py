"""Labels for training and evaluation: label tables and folders of rated photos.

Two sources give the same thing, a :class:`LabelSet` of ``(image, prompt,
group, value)`` rows:

* **A label table** (TSV or CSV with a header), in the ranking-adapter
  authors' format: ``filepath`` (the image), ``title`` (the prompt),
  ``cname`` (the group within which images are compared), ``value`` (the
  target); other columns are ignored. ``path``, ``prompt`` and ``group`` are
  accepted as the column names too. Relative paths are resolved against the
  table's folder. Without a prompt column every row uses ``--prompt``;
  without a group column, each prompt is one group.
* **A folder of rated photos**: the star rating (0-5) a photo manager wrote,
  read from, in order of precedence, an XMP sidecar (``photo.jpg.xmp`` as
  darktable and digiKam write it, or ``photo.xmp`` as Lightroom does), the
  XMP packet embedded in the image (``xmp:Rating``), or the EXIF Rating tag
  (0x4746, written by Windows and many cameras). A sidecar wins because
  raw-workflow tools update it without touching the image. ``--prompt``
  says what the stars mean; all photos form one group. Unrated photos are
  left out and counted. A rating imgrank itself wrote (``sort --xmp``, which
  records it again as ``imgrank:Rating``) is left out and counted too, unless
  asked for, so imgrank is not taught its own guesses; a rating a person
  changed afterwards differs from ``imgrank:Rating`` and is used. A RAW+JPEG
  pair is one photo: trained on through the JPEG, rated from either sidecar.

A row that cannot be used (missing file, a value that is not a number,
later an image that cannot be decoded) becomes a :class:`BadRow` with its
line number and a reason, and is skipped; the rest of the data is used.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from xml.etree import ElementTree

from imgrank.errors import DataError
from imgrank.images.raw import RAW_EXTENSIONS

#: Accepted column names (lower-cased) for each field; the authors' names first.
PATH_COLUMNS = ("filepath", "path")
PROMPT_COLUMNS = ("title", "prompt")
GROUP_COLUMNS = ("cname", "group")
VALUE_COLUMNS = ("value",)

#: Table suffixes read as tables (anything else is sniffed from the header line).
TABLE_SUFFIXES = (".tsv", ".csv", ".tab", ".txt")

#: The XMP basic namespace, which holds ``xmp:Rating``.
XMP_NS = "http://ns.adobe.com/xap/1.0/"
#: imgrank's own namespace: ``imgrank:Rating`` records a rating ``sort --xmp`` wrote.
IMGRANK_XMP_NS = "urn:imgrank:xmp:1.0/"
#: EXIF tags Windows writes: stars (0-5) and the same as a percentage.
EXIF_RATING = 0x4746
EXIF_RATING_PERCENT = 0x4749
#: A sidecar larger than this is not an XMP sidecar (they are a few kB).
MAX_SIDECAR_BYTES = 4 * 1024 * 1024

#: ``imgrank``: a sidecar rating imgrank wrote itself (see :func:`read_rating`).
RatingSource = Literal["sidecar", "xmp", "exif", "imgrank"]


@dataclass(frozen=True)
class LabelRow:
    """One labelled image.

    Attributes:
        path: the image file, absolute.
        prompt: the text the value answers ("Rank the numbers of horse.").
        group: images are only compared with images of the same group and prompt.
        value: the target; higher means more of what the prompt asks.
        line: the row's line number in the table (the header is line 1), or
            None for a rated folder.
    """

    path: Path
    prompt: str
    group: str
    value: float
    line: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        """The comparison group: ``(group, prompt)``."""
        return (self.group, self.prompt)


@dataclass(frozen=True)
class BadRow:
    """A row left out, and why, in words a user can act on."""

    line: int | None
    path: str
    reason: str

    def describe(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.path}: {self.reason}" if self.path else f"{where}{self.reason}"


@dataclass
class LabelSet:
    """The usable rows of a label source, the rows left out, and where they came from.

    Attributes:
        rows: usable rows, in source order.
        bad: rows left out, with line numbers and reasons.
        source: the table file or the rated folder.
        kind: ``table`` or ``rated-folder``.
        unrated: photos of a rated folder that carry no rating (left out).
        imgrank_rated: photos whose rating imgrank wrote itself (left out unless
            ``include_imgrank_ratings``).
    """

    rows: list[LabelRow]
    bad: list[BadRow] = field(default_factory=list)
    source: Path = Path(".")
    kind: Literal["table", "rated-folder"] = "table"
    unrated: int = 0
    imgrank_rated: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def groups(self) -> dict[tuple[str, str], list[LabelRow]]:
        """Rows by comparison group ``(group, prompt)``, in first-seen order."""
        out: dict[tuple[str, str], list[LabelRow]] = {}
        for row in self.rows:
            out.setdefault(row.key, []).append(row)
        return out

    def group_names(self) -> dict[tuple[str, str], str]:
        """A display name per group: the group alone, or ``group | prompt`` if a group
        name is used with several prompts."""
        prompts_per_group: dict[str, set[str]] = {}
        for group, prompt in self.groups():
            prompts_per_group.setdefault(group, set()).add(prompt)
        return {
            (group, prompt): group if len(prompts_per_group[group]) == 1 else f"{group} | {prompt}"
            for group, prompt in self.groups()
        }

    def prompts(self) -> list[str]:
        """The distinct prompts, in first-seen order."""
        return list(dict.fromkeys(row.prompt for row in self.rows))

    def paths(self) -> list[Path]:
        """The distinct image files, in first-seen order."""
        return list(dict.fromkeys(row.path for row in self.rows))

    def without(self, failed: dict[Path, str]) -> LabelSet:
        """A copy without the rows whose image failed (``{path: reason}``), each reported."""
        if not failed:
            return self
        kept, bad = [], list(self.bad)
        for row in self.rows:
            reason = failed.get(row.path)
            if reason is None:
                kept.append(row)
            else:
                bad.append(BadRow(row.line, str(row.path), reason))
        bad.sort(key=lambda b: (b.line is None, b.line or 0))
        return replace(self, rows=kept, bad=bad)

    def require_rows_per_group(self, minimum: int, *, purpose: str) -> None:
        """Fail, naming every short group, unless each group has ``minimum`` usable rows.

        Raises:
            DataError: no usable row at all, or a group with too few.
        """
        if not self.rows:
            raise DataError(self._nothing_usable_message())
        names = self.group_names()
        short = [
            f"{names[key]!r} has {len(rows)}"
            for key, rows in self.groups().items()
            if len(rows) < minimum
        ]
        if short:
            shown = "; ".join(short[:10]) + (
                f"; and {len(short) - 10} more" if len(short) > 10 else ""
            )
            raise DataError(
                f"{self.source}: too few usable rows per group for {purpose}: each group needs at "
                f"least {minimum} (images are only compared within their group), but {shown}. "
                "Add labelled images to those groups or remove them from the data."
                + self._bad_hint()
            )

    def summary(self) -> dict[str, Any]:
        """What was read, for the training summary."""
        return {
            "source": str(self.source),
            "kind": self.kind,
            "rows": len(self.rows),
            "images": len(self.paths()),
            "groups": len(self.groups()),
            "prompts": self.prompts(),
            "bad_rows": len(self.bad),
            "unrated": self.unrated,
            "imgrank_rated": self.imgrank_rated,
        }

    def _bad_hint(self) -> str:
        if not self.bad:
            return ""
        first = "; ".join(b.describe() for b in self.bad[:3])
        return f" ({len(self.bad)} row(s) were left out, e.g. {first})"

    def _nothing_usable_message(self) -> str:
        if self.kind == "rated-folder":
            own = (
                f", {self.imgrank_rated} rated by imgrank itself (--include-imgrank-ratings "
                "to train on those)"
                if self.imgrank_rated
                else ""
            )
            return (
                f"{self.source}: no rated photo found ({self.unrated} unrated{own}). "
                "Ratings are read "
                "from XMP sidecars (photo.jpg.xmp or photo.xmp), embedded XMP (xmp:Rating) and the "
                "EXIF Rating tag; rate some photos (0-5 stars) in your photo manager first."
                + self._bad_hint()
            )
        return f"{self.source}: no usable row." + self._bad_hint()


def load_labels(
    source: Path, *, prompt: str | None = None, include_imgrank_ratings: bool = False
) -> LabelSet:
    """Read a label table, or the ratings of a folder of photos.

    Args:
        source: a TSV/CSV file or a folder.
        prompt: for a folder, what the ratings mean (required); for a table, the
            prompt of rows without one.
        include_imgrank_ratings: for a folder, also use ratings imgrank wrote itself.

    Raises:
        DataError: the source does not exist or cannot be read as labels.
    """
    source = Path(source).expanduser()
    if source.is_dir():
        return read_rated_folder(
            source, prompt=prompt, include_imgrank_ratings=include_imgrank_ratings
        )
    if source.is_file():
        return read_label_table(source, prompt=prompt)
    raise DataError(f"{source} does not exist (expected a label table or a folder of rated photos)")


# ---------------------------------------------------------------------------
# Label tables


def _delimiter(path: Path, header: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    return "\t" if "\t" in header else ","


def _pick_column(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [name.strip().lower() for name in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


#: Largest label magnitude imgrank trains on. Labels become float32 tensors, whose
#: range ends near 3.4e38: 1e300 turned into Infinity and a model of NaNs. Ratings
#: and scores are far below this bound, which still leaves room for squares (1e24).
MAX_LABEL = 1e12


def _label_problem(value: float) -> str | None:
    """Why a parsed label cannot be trained on, or None when it can."""
    if not math.isfinite(value):
        return "is not a finite number"
    if abs(value) > MAX_LABEL:
        return f"is out of range (labels must lie within ±{MAX_LABEL:g})"
    return None


def _parse_value(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if _label_problem(value) is None else None


def read_label_table(path: Path, *, prompt: str | None = None) -> LabelSet:
    """Read a TSV/CSV label table; bad rows are kept aside with their line numbers.

    Args:
        path: the table. ``.tsv``/``.tab`` are tab-separated, ``.csv`` comma-separated;
            otherwise the header line decides.
        prompt: the prompt for rows without one (and for tables without a prompt column).

    Raises:
        DataError: unreadable file, no header, or no path/value column.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 text table (save it as UTF-8 TSV or CSV)") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read: {exc.strerror or exc}") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(
            f"{path} is empty: expected a header line such as "
            "filepath<TAB>title<TAB>cname<TAB>value"
        )
    reader = csv.reader(text.splitlines(keepends=True), delimiter=_delimiter(path, lines[0]))
    header = next(reader)
    columns = {
        "path": _pick_column(header, PATH_COLUMNS),
        "prompt": _pick_column(header, PROMPT_COLUMNS),
        "group": _pick_column(header, GROUP_COLUMNS),
        "value": _pick_column(header, VALUE_COLUMNS),
    }
    missing = [
        "/".join(names)
        for key, names in (("path", PATH_COLUMNS), ("value", VALUE_COLUMNS))
        if columns[key] is None
    ]
    if missing:
        raise DataError(
            f"{path}: the header ({', '.join(h.strip() for h in header)}) has no "
            f"{' and no '.join(missing)} column. A label table needs columns "
            "filepath (or path), value, and usually title (or prompt) and cname (or group)."
        )
    if columns["prompt"] is None and not prompt:
        raise DataError(
            f"{path} has no title/prompt column: pass --prompt TEXT to say what the values mean"
        )
    base = path.resolve().parent
    rows: list[LabelRow] = []
    bad: list[BadRow] = []
    needed = max(i for i in columns.values() if i is not None) + 1
    for record in reader:
        line = reader.line_num
        if not record or all(not cell.strip() for cell in record):
            continue  # blank line
        if len(record) < needed:
            bad.append(
                BadRow(line, "", f"has {len(record)} column(s), the header has {len(header)}")
            )
            continue
        raw_path = record[columns["path"]].strip()  # type: ignore[index]
        if not raw_path:
            bad.append(BadRow(line, "", "empty file path"))
            continue
        raw_value = record[columns["value"]]  # type: ignore[index]
        value = _parse_value(raw_value)
        if value is None:
            try:
                problem = _label_problem(float(raw_value.strip())) or "is not a number"
            except ValueError:
                problem = "is not a number"
            bad.append(BadRow(line, raw_path, f"value {raw_value.strip()!r} {problem}"))
            continue
        row_prompt = record[columns["prompt"]].strip() if columns["prompt"] is not None else ""
        row_prompt = row_prompt or (prompt or "")
        if not row_prompt:
            bad.append(BadRow(line, raw_path, "empty title/prompt (or pass --prompt TEXT)"))
            continue
        row_group = record[columns["group"]].strip() if columns["group"] is not None else ""
        image = Path(raw_path).expanduser()
        if not image.is_absolute():
            image = base / image
        if not image.is_file():
            reason = "is a folder, not an image file" if image.is_dir() else "file does not exist"
            bad.append(BadRow(line, raw_path, f"{reason} (looked for {image})"))
            continue
        rows.append(
            LabelRow(
                path=image,
                prompt=row_prompt,
                group=row_group or row_prompt,
                value=value,
                line=line,
            )
        )
    return LabelSet(rows=rows, bad=bad, source=path, kind="table")


# ---------------------------------------------------------------------------
# Rated folders

_DOCTYPE = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)
_RATING_FALLBACK = re.compile(rb"""xmp:Rating\s*(?:=\s*["']\s*([^"']*?)\s*["']|>\s*([^<]*?)\s*<)""")


def _xmp_root(data: bytes) -> ElementTree.Element | None:
    data = data.strip(b"\x00 \t\r\n")
    if not data or _DOCTYPE.search(data):
        return None
    try:
        return ElementTree.fromstring(data)
    except ElementTree.ParseError:
        return None


def _xmp_property(root: ElementTree.Element, namespace: str, name: str) -> str | None:
    key = f"{{{namespace}}}{name}"
    for element in root.iter():
        if key in element.attrib:
            return element.attrib[key]
        if element.tag == key:
            return element.text or ""
    return None


def written_by_imgrank(packet: bytes, rating: float) -> bool:
    """True when ``rating`` is the one imgrank wrote (``imgrank:Rating`` holds the same value)."""
    root = _xmp_root(packet)
    mark = None if root is None else _xmp_property(root, IMGRANK_XMP_NS, "Rating")
    if mark is None:
        return False
    try:
        return _rating_number(mark) == rating
    except ValueError:
        return False


def rating_from_xmp(packet: bytes | str) -> float | None:
    """The ``xmp:Rating`` of an XMP packet, or None when it has none.

    Both spellings XMP allows are read: an attribute of ``rdf:Description``
    (``xmp:Rating="4"``) and an element (``<xmp:Rating>4</xmp:Rating>``). The
    namespace is checked, so ``MicrosoftPhoto:Rating`` (a percentage) is not
    mistaken for stars. A packet that is not well-formed XML is searched for
    the literal ``xmp:Rating``. Packets declaring entities are refused (XMP
    never needs them; they are how XML bombs work).

    Raises:
        ValueError: the rating is present but not a number.
    """
    data = packet.encode("utf-8") if isinstance(packet, str) else bytes(packet)
    data = data.strip(b"\x00 \t\r\n")
    if not data or _DOCTYPE.search(data):
        return None
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        match = _RATING_FALLBACK.search(data)
        if match is None:
            return None
        text = (match.group(1) or match.group(2) or b"").decode("utf-8", "replace")
        return _rating_number(text)
    attribute = f"{{{XMP_NS}}}Rating"
    for element in root.iter():
        if attribute in element.attrib:
            return _rating_number(element.attrib[attribute])
        if element.tag == attribute:
            return _rating_number(element.text or "")
    return None


def _rating_number(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"rating {text.strip()!r} is not a number") from None
    problem = _label_problem(value)
    if problem is not None:
        raise ValueError(f"rating {text.strip()!r} {problem}")
    return value


def _percent_to_stars(percent: float) -> float:
    # Windows' own mapping between RatingPercent and stars.
    for stars, lowest in ((5, 99), (4, 75), (3, 50), (2, 25), (1, 1)):
        if percent >= lowest:
            return float(stars)
    return 0.0


def sidecar_paths(image: Path, raw: Path | None = None) -> list[Path]:
    """Sidecars that may hold an image's rating, most specific first.

    ``photo.jpg.xmp`` names one file exactly (darktable, digiKam);
    ``photo.xmp`` (Lightroom) may be shared by ``photo.jpg`` and ``photo.cr2``.
    With ``raw`` (the RAW of a RAW+JPEG pair), the RAW's own sidecar
    (``photo.cr2.xmp``, where darktable keeps a RAW's rating) is looked at too.
    """
    candidates = []
    for photo in (image,) if raw is None else (image, raw):
        for suffix in (".xmp", ".XMP"):
            candidates.append(photo.with_name(photo.name + suffix))
    for suffix in (".xmp", ".XMP"):
        candidates.append(image.with_suffix(suffix))
    return list(dict.fromkeys(candidates))


def read_rating(
    image: Path, *, raw: Path | None = None, include_imgrank: bool = True
) -> tuple[float, RatingSource] | None:
    """The star rating of one photo and where it was found, or None when unrated.

    Args:
        image: The photo.
        raw: Its RAW file, for a RAW+JPEG pair (whose sidecar is read too).
        include_imgrank: False to return ``(rating, "imgrank")`` for a sidecar
            rating imgrank wrote itself, so the caller can leave it out.

    Raises:
        ValueError: a rating is present but unusable (not a number), or the
            image cannot be opened to look for one.
    """
    for sidecar in sidecar_paths(image, raw):
        if not sidecar.is_file():
            continue
        if sidecar.stat().st_size > MAX_SIDECAR_BYTES:
            raise ValueError(f"sidecar {sidecar.name} is too large to be an XMP sidecar")
        packet = sidecar.read_bytes()
        rating = rating_from_xmp(packet)
        if rating is not None:
            if not include_imgrank and written_by_imgrank(packet, rating):
                return rating, "imgrank"
            return rating, "sidecar"
    if image.suffix.lower() in RAW_EXTENSIONS:
        return None  # Pillow cannot open a RAW to look for embedded XMP

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as handle:
            packet = handle.info.get("xmp")
            exif = handle.getexif()
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read") from None
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror or exc}") from None
    if packet:
        rating = rating_from_xmp(packet)
        if rating is not None:
            return rating, "xmp"
    if EXIF_RATING in exif:
        return _rating_number(str(exif[EXIF_RATING])), "exif"
    if EXIF_RATING_PERCENT in exif:
        return _percent_to_stars(_rating_number(str(exif[EXIF_RATING_PERCENT]))), "exif"
    return None


def read_rated_folder(
    folder: Path,
    *,
    prompt: str | None,
    recursive: bool = True,
    include_imgrank_ratings: bool = False,
) -> LabelSet:
    """Every rated photo of a folder as a row valued by its stars (0-5).

    A rating of -1 (Lightroom's and darktable's "rejected") and values outside
    0-5 are reported and left out; photos with no rating anywhere are
    counted in ``unrated``.

    Raises:
        DataError: no prompt was given.
    """
    from imgrank.images.decode import find_images
    from imgrank.images.raw import INSTALL_HINT, pair_raw_files

    folder = Path(folder).expanduser()
    if not prompt or not prompt.strip():
        raise DataError(
            f"{folder} is a folder of photos: pass --prompt TEXT to say what the star ratings "
            'mean (for example --prompt "photos I like")'
        )
    prompt = prompt.strip()
    bad: list[BadRow] = []

    def skipped(path: Path, reason: str) -> None:
        bad.append(BadRow(None, str(path), reason))

    rows: list[LabelRow] = []
    unrated = own = 0
    pairs = pair_raw_files(find_images(folder, recursive=recursive, on_skip=skipped))
    for raw in pairs.unreadable:
        bad.append(BadRow(None, str(raw), INSTALL_HINT))
    for image in pairs.photos:
        try:
            found = read_rating(
                image, raw=pairs.raw_of.get(image), include_imgrank=include_imgrank_ratings
            )
        except ValueError as exc:
            bad.append(BadRow(None, str(image), str(exc)))
            continue
        if found is None:
            unrated += 1
            continue
        stars, where = found
        if where == "imgrank":
            own += 1
            continue
        if stars == -1:
            bad.append(BadRow(None, str(image), f"marked rejected (rating -1, from {where})"))
            continue
        if not 0 <= stars <= 5:
            bad.append(
                BadRow(None, str(image), f"rating {stars:g} (from {where}) is not 0-5 stars")
            )
            continue
        rows.append(LabelRow(path=image.resolve(), prompt=prompt, group=prompt, value=stars))
    return LabelSet(
        rows=rows, bad=bad, source=folder, kind="rated-folder", unrated=unrated, imgrank_rated=own
    )


def write_label_table(path: Path, rows: Iterable[LabelRow]) -> None:
    """Write rows as a TSV label table in the authors' column names (paths relative
    to the table's folder where possible). Refuses to overwrite an existing file.

    Raises:
        DataError: the file exists.
    """
    import io
    import os

    from imgrank.errors import UnsafeOperationError
    from imgrank.files.atomic import atomic_file

    path = Path(path)
    if os.path.lexists(path):
        raise DataError(f"{path} already exists; imgrank never overwrites a file")
    base = path.resolve().parent
    try:
        with atomic_file(path) as stream:
            handle = io.TextIOWrapper(stream, encoding="utf-8", newline="")
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(["filepath", "title", "cname", "value"])
            for row in rows:
                try:
                    shown = os.path.relpath(row.path, base)
                except ValueError:  # another drive on Windows
                    shown = str(row.path)
                writer.writerow([shown, row.prompt, row.group, f"{row.value:g}"])
            handle.flush()
            handle.detach()
    except UnsafeOperationError as exc:  # the name was taken while writing
        raise DataError(str(exc)) from None
