"""The ranking-aware adapter's configuration: shape and variant, without torch.

Reading a model folder (:func:`imgrank.models.checkpoints.load_model_folder`)
needs the configuration but not the module, so a re-sort served from the caches
on onnxruntime never imports torch (about a second). :mod:`imgrank.models.adapter`
builds the module from it and re-exports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from imgrank.errors import ModelError

Variant = Literal["full", "ranking-head", "ltr"]
VARIANTS: tuple[str, ...] = ("full", "ranking-head", "ltr")

# Values of the authors' own config switches that this module implements. Any
# other value selects code paths of theirs we do not have, so a config asking
# for one is refused instead of being run as something else.
_SUPPORTED_AUTHOR_SWITCHES = {
    "cross_attn_method": ("cross-qkv",),
    "reg_token_method": ("cross-attn-sum",),
    "adapter_attention_pooler": ("rank-attn",),
}


@dataclass(frozen=True)
class AdapterConfig:
    """Shape and variant of a ranking-aware adapter.

    ``AdapterConfig(**adapter_cfg)`` accepts the ``adapter_cfg`` dict of the
    authors' model configs as is; the keys of theirs that select behaviour
    (``cross_attn_method``, ``reg_token_method``, ``adapter_attention_pooler``)
    are checked against the one implementation they released, and any other
    unknown key is kept in :attr:`extra` so a config survives a round trip.

    Attributes:
        d_model: Width D of the adapter; image tokens and text tokens must both
            have this width (the backbone's ``embed_dim`` for image tokens, the
            text tower's width for text tokens).
        num_layers: Layers of the cross-modal block and of the post-fusion encoder.
        n_head: Attention heads everywhere in the adapter.
        num_learnable_text_tokens: K learnable scalars prepended to the text
            tokens (each broadcast to a D-vector); 0 disables them.
        n_reg_tokens: Q query tokens of the ranking-aware attention.
        variant: ``"full"``, ``"ranking-head"`` or ``"ltr"`` (see the module doc).
        dropout: Dropout of the post-fusion encoder layers (training only).
        cross_attn_method: The authors' switch; only ``"cross-qkv"`` exists.
        reg_token_method: The authors' switch; only ``"cross-attn-sum"`` exists.
        adapter_attention_pooler: The authors' switch; only ``"rank-attn"`` exists.
        extra: Other keys found in a config, kept verbatim.
    """

    d_model: int = 768
    num_layers: int = 2
    n_head: int = 8
    num_learnable_text_tokens: int = 32
    n_reg_tokens: int = 16
    variant: Variant = "full"
    dropout: float = 0.1
    cross_attn_method: str = "cross-qkv"
    reg_token_method: str = "cross-attn-sum"
    adapter_attention_pooler: str = "rank-attn"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __init__(self, **kwargs: Any) -> None:
        # A hand-written __init__ so that unknown keys of the authors' configs
        # land in ``extra`` instead of raising TypeError.
        names = {f.name for f in fields(self)} - {"extra"}
        extra = dict(kwargs.pop("extra", None) or {})
        for f in fields(self):
            if f.name == "extra":
                continue
            value = kwargs.pop(f.name) if f.name in kwargs else f.default
            object.__setattr__(self, f.name, value)
        extra.update({k: v for k, v in kwargs.items() if k not in names})
        object.__setattr__(self, "extra", extra)
        self._validate()

    def _validate(self) -> None:
        problems = []
        for name in ("d_model", "num_layers", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, not {value!r}")
        for name in ("num_learnable_text_tokens", "n_reg_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} must be a non-negative integer, not {value!r}")
        if not problems and self.d_model % self.n_head:
            problems.append(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {', '.join(VARIANTS)}, not {self.variant!r}")
        if self.variant == "full" and self.n_reg_tokens < 1:
            problems.append('variant "full" needs n_reg_tokens >= 1 (the ranking-aware queries)')
        if not 0.0 <= float(self.dropout) < 1.0:
            problems.append(f"dropout must be in [0, 1), not {self.dropout!r}")
        for name, supported in _SUPPORTED_AUTHOR_SWITCHES.items():
            if getattr(self, name) not in supported:
                problems.append(
                    f"{name}={getattr(self, name)!r} is not implemented "
                    f"(imgrank implements {', '.join(supported)}, the released model)"
                )
        if problems:
            raise ModelError("invalid adapter config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :class:`AdapterConfig` accepts back (``extra`` flattened in)."""
        data = asdict(self)
        extra = data.pop("extra")
        data.update(extra)
        return data
