"""Every command-line option that more than one command takes, declared once.

Each alias below is an ``Annotated`` type carrying its Typer option: its
names, its metavar, its help panel and a help text true for every command
that uses it, so ``--model`` (or ``--cache``, ``--device`` ...) means the same
thing in ``sort``, ``train``, ``eval`` and ``export``. Options with a fixed
set of values are enums, so ``--help`` lists the choices and Typer refuses a
typo before any work. Metavars are set explicitly: Typer's defaults
(``<str>``, ``<path>``, ``{folder}``) tell a reader nothing.

Commands keep their own defaults (``model: ModelOption = DEFAULT_MODEL``), and
options that only one command has are declared in that command's module.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from imgrank.errors import UsageError

# Help panels, in the order a reader needs them.
PANEL_RANKING = "Ranking"
PANEL_MODEL = "Model"
PANEL_INPUT = "Input"
PANEL_OUTPUT = "Output"
PANEL_RENAME = "Renaming photos"
PANEL_XMP = "XMP sidecars"
PANEL_ENGINE = "Distributed (Ray)"
PANEL_TRAINING = "Training"
PANEL_CACHE = "Embedding cache"
PANEL_PERFORMANCE = "Performance"


class OutputFormat(str, Enum):
    """What ``imgrank sort`` writes: ``rank,score,path`` CSV, JSON lines, or paths only."""

    csv = "csv"
    jsonl = "jsonl"
    paths = "paths"


class Runtime(str, Enum):
    """What runs the model: the fastest correct one, PyTorch, or onnxruntime on an export."""

    auto = "auto"
    torch = "torch"
    onnx = "onnx"


class Precision(str, Enum):
    """The number format of the torch image tower (see imgrank.models.selection)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class RawPairs(str, Enum):
    """A RAW file with a same-stem JPEG beside it: one photo (``pair``) or two (``separate``)."""

    pair = "pair"
    separate = "separate"


class XmpField(str, Enum):
    """What ``sort --xmp`` writes into sidecars."""

    rating = "rating"
    label = "label"
    pick = "pick"


class XmpSidecar(str, Enum):
    """Sidecar naming: ``IMG_1.CR2.xmp`` (file) or ``IMG_1.xmp`` (stem)."""

    file = "file"
    stem = "stem"


class Engine(str, Enum):
    """Where a sort runs: this process, or Ray Data (docs/distributed.md)."""

    local = "local"
    ray = "ray"


# --- the model ------------------------------------------------------------------------------

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        metavar="NAME|JSON",
        help="open_clip model name, or a model config JSON file.",
        rich_help_panel=PANEL_MODEL,
    ),
]
PretrainedOption = Annotated[
    str,
    typer.Option(
        "--pretrained",
        metavar="TAG|FILE",
        help="open_clip weights tag, a local .safetensors/.pt file, or 'none' "
        "(random weights: a meaningless order, for tests).",
        rich_help_panel=PANEL_MODEL,
    ),
]
AdapterOption = Annotated[
    Path | None,
    typer.Option(
        "--adapter",
        metavar="DIR",
        help="A ranking-adapter model folder (`imgrank train`, `imgrank adapter`); it brings "
        "its own backbone unless --model/--pretrained are given.",
        rich_help_panel=PANEL_MODEL,
    ),
]
DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="DEVICE",
        help="auto, cpu, cuda, cuda:N or mps.",
        rich_help_panel=PANEL_MODEL,
    ),
]

# --- reading photos -------------------------------------------------------------------------

BatchSizeOption = Annotated[
    int,
    typer.Option(
        "--batch-size",
        metavar="N",
        min=1,
        help="Images per forward pass of the backbone.",
        rich_help_panel=PANEL_PERFORMANCE,
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers",
        metavar="N",
        min=1,
        help="Decode threads (default: one per CPU core).",
        rich_help_panel=PANEL_PERFORMANCE,
    ),
]

# --- the embedding cache --------------------------------------------------------------------

CacheOption = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        metavar="FILE",
        help="Embedding cache file (default: embeddings.sqlite3 in the user cache folder).",
        rich_help_panel=PANEL_CACHE,
    ),
]
NoCacheOption = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        help="Neither read nor write the embedding cache.",
        rich_help_panel=PANEL_CACHE,
    ),
]

# --- what a command writes ------------------------------------------------------------------

OutFolderOption = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        metavar="DIR",
        help="The folder to create (it must not exist, or be empty).",
        rich_help_panel=PANEL_OUTPUT,
    ),
]
QuietOption = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="Print nothing on stderr but errors.", rich_help_panel=PANEL_OUTPUT
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print JSON instead of a table.", rich_help_panel=PANEL_OUTPUT),
]

# --- labels ---------------------------------------------------------------------------------

LabelsArgument = Annotated[
    Path,
    typer.Argument(
        metavar="LABELS",
        help="A label table (TSV/CSV: filepath, title, cname, value) or a folder of rated photos.",
        show_default=False,
    ),
]
PromptOption = Annotated[
    str | None,
    typer.Option(
        "--prompt",
        "-p",
        metavar="TEXT",
        help="What the labels mean, e.g. 'photos I like': required for a rated folder, "
        "the prompt of rows without one in a table.",
        rich_help_panel=PANEL_TRAINING,
    ),
]


def cache_choice(cache: Path | None, no_cache: bool) -> Path | bool:
    """``--cache``/``--no-cache`` as the library takes them: a file, True (the default), False.

    One rule for every command: giving both is a mistake, not a silent "no cache".

    Raises:
        UsageError: both were given.
    """
    if cache is not None and no_cache:
        raise UsageError("--cache and --no-cache contradict each other; give one of them")
    if no_cache:
        return False
    return cache if cache is not None else True


# --- shared by sort and cull ---------------------------------------------------------------

AgainstOption = Annotated[
    str | None,
    typer.Option(
        "--against",
        metavar="TEXT",
        help="Zero-shot only: the negative phrasing; --by and --against are then used "
        'verbatim (e.g. --by "a sharp photo" --against "a blurry photo").',
        rich_help_panel=PANEL_RANKING,
    ),
]


RuntimeOption = Annotated[
    Runtime | None,
    typer.Option(
        "--runtime",
        help="What runs the model. Default auto: on a CPU with onnxruntime installed, the "
        "model exported once to ONNX (cached, reused); else torch. onnx is implied by --onnx "
        "(see docs/onnx.md, docs/performance.md).",
        rich_help_panel=PANEL_MODEL,
    ),
]


PrecisionOption = Annotated[
    Precision | None,
    typer.Option(
        "--precision",
        help="torch number format: auto (fp16 on CUDA, else fp32), fp32, bf16 (image tower; "
        "fast on CPUs with AVX512_BF16/AMX, ranks slightly differently) or fp16.",
        rich_help_panel=PANEL_MODEL,
    ),
]


OnnxOption = Annotated[
    Path | None,
    typer.Option(
        "--onnx",
        metavar="DIR",
        help="A folder written by `imgrank export`, run with onnxruntime.",
        rich_help_panel=PANEL_MODEL,
    ),
]


ProvidersOption = Annotated[
    str | None,
    typer.Option(
        "--providers",
        metavar="LIST",
        help="onnxruntime providers in order, e.g. cuda,cpu (default: CUDA if any, else CPU).",
        rich_help_panel=PANEL_MODEL,
    ),
]


RecursiveOption = Annotated[
    bool,
    typer.Option(
        "--recursive/--no-recursive", help="Scan sub-folders too.", rich_help_panel=PANEL_INPUT
    ),
]


IncludeHiddenOption = Annotated[
    bool,
    typer.Option(
        "--include-hidden",
        help="Also take files and folders whose name starts with a dot.",
        rich_help_panel=PANEL_INPUT,
    ),
]


MaxPixelsOption = Annotated[
    int,
    typer.Option(
        "--max-pixels",
        metavar="N",
        min=1,
        help="Skip images with more pixels than this (decompression bombs); may be raised "
        "for huge panoramas.",
        rich_help_panel=PANEL_INPUT,
    ),
]


RawPairsOption = Annotated[
    RawPairs,
    typer.Option(
        "--raw-pairs",
        help="pair: a RAW with a same-stem JPEG in its folder is one photo, ranked through the JPEG "
        "and renamed, linked, copied or moved with it; separate: two photos of their own.",
        rich_help_panel=PANEL_INPUT,
    ),
]


OutputOption = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        metavar="FILE",
        help="Write the result to FILE instead of stdout.",
        rich_help_panel=PANEL_OUTPUT,
    ),
]


NullOption = Annotated[
    bool,
    typer.Option(
        "--null",
        "-0",
        help="With --format paths (or cull --paths): separate paths with NUL (for xargs -0).",
        rich_help_panel=PANEL_OUTPUT,
    ),
]


ErrorsOption = Annotated[
    Path | None,
    typer.Option(
        "--errors",
        metavar="FILE",
        help="Write the skipped files as CSV (path,reason) to FILE.",
        rich_help_panel=PANEL_OUTPUT,
    ),
]


XmpSidecarOption = Annotated[
    XmpSidecar,
    typer.Option(
        "--xmp-sidecar",
        help="file: IMG_1.CR2.xmp (darktable, digiKam); stem: IMG_1.xmp (Lightroom, "
        "Capture One).",
        rich_help_panel=PANEL_XMP,
    ),
]
