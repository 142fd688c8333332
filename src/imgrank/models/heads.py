"""Linear and MLP heads on the pooled CLIP embedding: the LAION aesthetic predictor formats.

People sort by "aesthetics" with the LAION aesthetic predictor, which is a
small head on the L2-normalised CLIP image embedding of one named backbone:

* ``linear-head``: ``torch.nn.Linear(E, 1)``; its state dict has the keys
  ``weight`` (1, E) and ``bias`` (1,) (the first predictor, e.g. for ViT-B-32
  or ViT-L-14 with the ``openai`` weights);
* ``mlp-head``: the improved predictor's MLP, keys ``layers.0/2/4/6/7``
  (E -> 1024 -> 128 -> 64 -> 16 -> 1; the dropouts between them do nothing at
  inference and, as in the released code, there are no activations).

The score of an image is ``head(normalize(encode_image(x)))``: the prompt's
words are not read (``--by aesthetics`` only names the ranking). Files are
read with ``torch.load(weights_only=True)`` or safetensors, never unpickled.
``imgrank adapter import FILE --model M --pretrained P --out DIR`` turns one
into a model folder (:func:`imgrank.models.checkpoints.import_head`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from imgrank.errors import AdapterMismatchError, ModelError

if TYPE_CHECKING:
    import torch

HEAD_KINDS = ("linear-head", "mlp-head")

#: Hidden widths of the improved aesthetic predictor's MLP, input side first.
MLP_WIDTHS = (1024, 128, 64, 16)
#: Indices of its Linear layers in ``layers`` (the others are Dropout).
MLP_LINEAR_INDICES = (0, 2, 4, 6, 7)


@dataclass(frozen=True)
class HeadConfig:
    """What a head is: its kind and the embedding width it reads."""

    kind: str
    input_dim: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_dim": self.input_dim}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadConfig:
        kind, width = data.get("kind"), data.get("input_dim")
        if kind not in HEAD_KINDS or not isinstance(width, int) or width < 1:
            raise ValueError(f"not a head config: {data!r}")
        return cls(kind=str(kind), input_dim=int(width))

    @property
    def label(self) -> str:
        """``linear head`` or ``MLP head``, for summaries."""
        return "linear head" if self.kind == "linear-head" else "MLP head"


def expected_shapes(config: HeadConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of a head of this kind and width."""
    if config.kind == "linear-head":
        return {"weight": (1, config.input_dim), "bias": (1,)}
    widths = (config.input_dim, *MLP_WIDTHS, 1)
    shapes: dict[str, tuple[int, ...]] = {}
    layers = zip(widths, widths[1:], strict=False)  # consecutive widths: (in, out) per layer
    for index, (fan_in, fan_out) in zip(MLP_LINEAR_INDICES, layers, strict=True):
        shapes[f"layers.{index}.weight"] = (fan_out, fan_in)
        shapes[f"layers.{index}.bias"] = (fan_out,)
    return shapes


def detect_head(state: dict[str, Any], kind: str | None = None, *, source: str) -> HeadConfig:
    """The kind and input width of a head state dict, from its keys (``kind`` forces one).

    Raises:
        ModelError: the keys or shapes are not one of the two published formats
            (every mismatch is listed).
    """
    if kind is not None and kind not in HEAD_KINDS:
        raise ModelError(f"--kind must be {' or '.join(HEAD_KINDS)}, not {kind!r}")
    if kind is None:
        keys = set(state)
        if keys == {"weight", "bias"}:
            kind = "linear-head"
        elif keys and all(key.startswith("layers.") for key in keys):
            kind = "mlp-head"
        else:
            shown = ", ".join(sorted(keys)[:8]) + (" ..." if len(keys) > 8 else "")
            raise ModelError(
                f"{source} is neither a linear head (keys weight, bias) nor the improved "
                f"aesthetic predictor's MLP (keys layers.0/2/4/6/7.*); it has: {shown or 'no keys'}"
            )
    first = "weight" if kind == "linear-head" else "layers.0.weight"
    tensor = state.get(first)
    if tensor is None or len(tuple(tensor.shape)) != 2:
        raise ModelError(f"{source} has no 2-D {first!r}, so it is not a {kind}")
    config = HeadConfig(kind=kind, input_dim=int(tensor.shape[1]))
    expected = expected_shapes(config)
    problems = [f"{k} missing" for k in sorted(set(expected) - set(state))]
    problems += [f"{k} unexpected" for k in sorted(set(state) - set(expected))]
    problems += [
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (
            f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        )
        raise ModelError(f"{source} is not a {kind} of the published shape: {shown}")
    return config


def check_head_fits(config: dict[str, Any], head: HeadConfig, *, what: str) -> None:
    """Refuse a backbone whose pooled embedding is not as wide as the head's input.

    Raises:
        AdapterMismatchError: naming ``what`` (the backbone as the user called it).
    """
    width = int(config["embed_dim"])
    if width != head.input_dim:
        raise AdapterMismatchError(
            f"{what} gives {width}-wide image embeddings, but the {head.label} reads "
            f"{head.input_dim}-wide ones: it was made for another backbone (a LAION head for "
            "ViT-L-14 reads 768, for ViT-B-32 512)"
        )


def build_head(config: HeadConfig) -> torch.nn.Module:
    """An empty head module whose state-dict keys are the published ones (eval mode)."""
    from torch import nn

    if config.kind == "linear-head":
        return nn.Linear(config.input_dim, 1).eval()

    class MLPHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths = (config.input_dim, *MLP_WIDTHS)
            # The released layout: Linear, Dropout, ... with no activation in between.
            self.layers = nn.Sequential(
                nn.Linear(widths[0], widths[1]),
                nn.Dropout(0.2),
                nn.Linear(widths[1], widths[2]),
                nn.Dropout(0.2),
                nn.Linear(widths[2], widths[3]),
                nn.Dropout(0.1),
                nn.Linear(widths[3], widths[4]),
                nn.Linear(widths[4], 1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    return MLPHead().eval()


def load_head_module(config: HeadConfig, state: dict[str, Any], *, source: str) -> torch.nn.Module:
    """Build a head and load a state dict into it, in float32 (strict: every key must fit)."""
    detect_head(state, config.kind, source=source)
    module = build_head(config)
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return module.eval().requires_grad_(False)


def numpy_head_callable(
    config: HeadConfig, state: dict[str, np.ndarray], *, source: str
) -> Callable[[np.ndarray], np.ndarray]:
    """The head as ``normalized embeddings (N, E) float32 -> scores (N,)``, in numpy.

    Both published heads are affine maps (the MLP has no activations), a few
    matrix products: numpy runs them without importing torch (a second of a
    cached re-sort), giving the torch module's numbers within float rounding.

    Raises:
        ModelError: the state dict is not a head of ``config``'s kind and width.
    """
    detect_head(state, config.kind, source=source)
    if config.kind == "linear-head":
        names = [""]
    else:
        names = [f"layers.{index}." for index in MLP_LINEAR_INDICES]
    layers = [
        (
            np.ascontiguousarray(np.asarray(state[name + "weight"], dtype=np.float32).T),
            np.asarray(state[name + "bias"], dtype=np.float32),
        )
        for name in names
    ]

    def run(normalized: np.ndarray) -> np.ndarray:
        x = np.asarray(normalized, dtype=np.float32)
        for weight, bias in layers:
            x = x @ weight + bias
        return x.reshape(-1).astype(np.float64)

    return run
