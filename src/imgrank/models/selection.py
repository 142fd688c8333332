"""What the user asked for, model-wise, and the one place it is checked.

Every front end (the ``sort``, ``eval`` and ``export`` commands, the Python
API) fills a :class:`ModelSelection` with only what the user gave: a field left
``None`` was not typed, so a model folder's own backbone, the default model
or the default device applies. :meth:`ModelSelection.resolve` checks the
combination once, before anything is loaded, and raises one
:class:`~imgrank.errors.UsageError` (exit code 2) per kind of mistake;
:func:`imgrank.models.loading.load_model` then loads what it resolved to.

Nothing here imports torch, open_clip or onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imgrank.errors import UsageError
from imgrank.models.clip.config import DEFAULT_MODEL, DEFAULT_PRETRAINED, BackboneSpec

#: ``auto``: onnxruntime on an automatic export where that is the fastest correct path
#: (:mod:`imgrank.models.auto_export`), else torch. ``None`` (not given) means torch, or
#: onnx with ``--onnx``: front ends that sort pass ``auto`` for "not given".
RUNTIMES = ("auto", "torch", "onnx")
#: ``auto``: half precision on CUDA, float32 elsewhere (bfloat16 moved the benchmark's
#: ranking to Spearman 0.998 against float32, below the 0.999 a default must keep).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


#: Devices an automatic ONNX export may stand in for (onnxruntime runs on the CPU there).
CPU_OK = ("auto", "cpu")


@dataclass(frozen=True)
class ModelSelection:
    """A model as the user selected it; ``None`` means "not given".

    Attributes:
        model: ``--model``: an open_clip model name or a config JSON.
        pretrained: ``--pretrained``: a pretrained tag, a weights file, or ``none``.
        adapter: ``--adapter``: an imgrank model folder (a ranking adapter or
            an imported linear/MLP head); it brings its own backbone.
        runtime: ``auto``, ``torch`` or ``onnx`` (``--onnx`` alone implies ``onnx``).
        onnx: ``--onnx``: a folder written by ``imgrank export``.
        providers: ``--providers``: onnxruntime execution providers, comma-separated.
        device: ``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (torch).
        precision: ``auto`` (half precision on CUDA, else float32), ``fp32``, ``bf16``
            (the image tower in bfloat16 on the CPU) or ``fp16`` (torch).
    """

    model: str | None = None
    pretrained: str | None = None
    adapter: Path | None = None
    runtime: str | None = None
    onnx: Path | None = None
    providers: str | None = None
    device: str | None = None
    precision: str | None = None

    def resolve(self) -> ResolvedSelection:
        """Check the combination and decide the runtime; nothing is read or loaded.

        Raises:
            UsageError: an unknown runtime or precision, or options of one
                runtime given to the other.
        """
        runtime = (self.runtime or "").lower() or None
        if runtime is not None and runtime not in RUNTIMES:
            raise UsageError(f"--runtime must be auto, torch or onnx, not {self.runtime!r}")
        precision = (self.precision or "auto").lower()
        if precision not in PRECISIONS:
            raise UsageError(
                f"--precision must be auto, fp32, bf16 or fp16, not {self.precision!r}"
            )
        automatic = runtime == "auto"
        if automatic:
            runtime = "onnx" if self.onnx is not None else None
        if runtime == "torch":
            if self.onnx is not None:
                raise UsageError("--onnx DIR is for --runtime onnx (or leave --runtime out)")
            if self.providers:
                raise UsageError(
                    "--providers is for --runtime onnx; the torch runtime uses --device"
                )
        elif runtime == "onnx" and self.onnx is None:
            raise UsageError(
                "--runtime onnx needs --onnx DIR, a folder written by `imgrank export --out DIR`"
            )
        elif self.onnx is None and self.providers:
            raise UsageError("--providers is for --runtime onnx --onnx DIR")
        if self.onnx is None:
            # Forcing a precision or a device other than the CPU is a torch choice.
            automatic = (
                automatic and precision == "auto" and (self.device or "auto").lower() in CPU_OK
            )
            return ResolvedSelection(self, "torch", precision, automatic_runtime=automatic)
        torch_only = [
            name
            for name, given in (
                ("--adapter", self.adapter is not None),
                ("--model", self.model is not None),
                ("--pretrained", self.pretrained is not None),
                ("--device", (self.device or "auto").lower() != "auto"),
                ("--precision", precision != "auto"),
            )
            if given
        ]
        if torch_only:
            raise UsageError(
                f"{', '.join(torch_only)} only apply to --runtime torch: with --runtime onnx the "
                "model, its adapter and its weights are those of the export (`imgrank export "
                "--adapter DIR` includes an adapter), and --providers chooses the device"
            )
        return ResolvedSelection(self, "onnx", precision)


@dataclass(frozen=True)
class ResolvedSelection:
    """A checked :class:`ModelSelection`: the runtime is decided, defaults are applied."""

    selection: ModelSelection
    runtime: str
    precision: str
    #: Nothing forced the torch runtime: an automatic ONNX export may replace it.
    automatic_runtime: bool = False

    @property
    def device(self) -> str:
        return self.selection.device or "auto"

    def default_backbone(self) -> BackboneSpec:
        """The backbone without a model folder: what was given, else the default model."""
        return BackboneSpec(
            model=self.selection.model or DEFAULT_MODEL,
            pretrained=self.selection.pretrained or DEFAULT_PRETRAINED,
        )
