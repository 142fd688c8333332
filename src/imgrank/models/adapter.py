"""The ranking-aware adapter (Yu et al., ICLR 2025) and its configuration.

A frozen CLIP backbone gives each image a grid of visual tokens and the prompt
a sequence of text tokens. :class:`RankingAdapter` fuses them with
cross-attention and predicts one score per image (the regression head, used to
sort). For training it also scores every ordered pair of images of a batch
(the pair head, fed by the ranking-aware attention). The computation follows
the authors' released implementation; ``docs/adapter.md`` describes it and the
state-dict keys are the authors' keys without their ``adapter.`` prefix, so
their checkpoints load unchanged.

Three variants reproduce the ablation rows of the paper (``AdapterConfig.variant``):

* ``"full"``: the released model, pair head on top of ranking-aware attention;
* ``"ranking-head"``: the same pair head, but fed with the difference of the two
  images' pooled tokens (no relational attention);
* ``"ltr"``: no pair head; the "pair logits" are score differences
  ``s_i - s_j`` so that the same pairwise losses train the regression head.

Every variant returns ``(scores (N, 1), pair_logits (N*N, 1))`` from
:meth:`RankingAdapter.forward`, row ``i*N + j`` of ``pair_logits`` meaning
"image i ranks above image j", so the training loop does not branch on the
variant. Sorting only needs :meth:`RankingAdapter.score` (O(N), no pairs), or,
for many batches by one prompt, :meth:`RankingAdapter.prepare_text` once and
:meth:`RankingAdapter.score_prepared` per batch (the same numbers).

torch is imported at module level here: this module is only imported by code
that runs a model, never by ``imgrank.cli`` at start-up.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from imgrank.errors import ModelError

# The configuration lives in a torch-free module (reading a model folder needs no torch);
# it is re-exported here, where the authors' code would look for it.
from imgrank.models.adapter_config import VARIANTS, AdapterConfig, Variant

__all__ = ["VARIANTS", "AdapterConfig", "RankingAdapter", "Variant", "count_parameters"]

class _MLP(nn.Sequential):
    """D -> 4D -> D with GELU; the module names are the authors' keys."""

    def __init__(self, width: int) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, 4 * width)),
                    ("gelu", nn.GELU()),
                    ("c_proj", nn.Linear(4 * width, width)),
                ]
            )
        )


class _SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block over the image tokens."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _MLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention: image tokens attend to the (normalised) text tokens."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.ln_1_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _MLP(width)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        kv = self.ln_1_kv(text)
        x = x + self.attn(self.ln_1(x), kv, kv, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))

    def _projection(self, part: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention's query (0), key (1) or value (2) projection, from its packed weights."""
        width = self.attn.embed_dim
        bias = self.attn.in_proj_bias
        rows = slice(part * width, (part + 1) * width)
        return self.attn.in_proj_weight[rows], None if bias is None else bias[rows]

    def text_keys_values(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's keys and values of text tokens (1, L, D): each (H, L, hd).

        They depend on the prompt only, so a scorer computes them once instead of
        once per image (:meth:`forward` recomputes them for every image).
        """
        kv = self.ln_1_kv(text)[0]  # (L, D)
        heads = self.attn.num_heads
        length, width = kv.shape
        keys = nn.functional.linear(kv, *self._projection(1))
        values = nn.functional.linear(kv, *self._projection(2))
        split = (length, heads, width // heads)
        return keys.reshape(split).transpose(0, 1), values.reshape(split).transpose(0, 1)

    def forward_prepared(
        self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward` with the text's keys and values from :meth:`text_keys_values`."""
        n, p, width = x.shape
        heads = self.attn.num_heads
        q = nn.functional.linear(self.ln_1(x), *self._projection(0))  # (N, P, D)
        # Every image attends to the same keys and values, and no query sees another:
        # all N*P queries go through one attention, without copying the text N times.
        q = q.reshape(n * p, heads, width // heads).transpose(0, 1)  # (H, N*P, hd)
        attended = nn.functional.scaled_dot_product_attention(q, keys, values)  # (H, N*P, hd)
        attended = attended.transpose(0, 1).reshape(n, p, width)
        x = x + self.attn.out_proj(attended)
        return x + self.mlp(self.ln_2(x))


class _CrossModalBlock(nn.Module):
    """``num_layers`` x (self-attention, cross-attention), then LayerNorm and projection."""

    def __init__(self, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_SelfAttentionBlock(width, heads) for _ in range(layers))
        self.cross_attn = nn.ModuleList(_CrossAttentionBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.projection = nn.Parameter(torch.empty(width, width))
        nn.init.normal_(self.projection, std=width**-0.5)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        x = image_tokens
        for block, cross in zip(self.resblocks, self.cross_attn, strict=True):
            x = cross(block(x), text_tokens)
        return self.ln_final(x) @ self.projection


class _Head(nn.Module):
    """An MLP head ending in one logit (module names as in the authors' state dict)."""

    def __init__(self, layers: list[nn.Module], width: int) -> None:
        super().__init__()
        self.pre_linear_block = nn.Sequential(*layers)
        self.output_head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_head(self.pre_linear_block(x))


def _regression_head(width: int) -> _Head:
    # Linear -> LayerNorm -> ReLU, twice (indices 0..5 are the authors' keys).
    return _Head(
        [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU(),
         nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()],
        width,
    )  # fmt: skip


def _pair_head(width: int) -> _Head:
    # LayerNorm, then Linear -> LayerNorm -> ReLU three times (indices 0..9).
    layers: list[nn.Module] = [nn.LayerNorm(width)]
    for _ in range(3):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    return _Head(layers, width)


class _RankingAwareAttention(nn.Module):
    """Learned queries attend jointly over the tokens of two images; outputs the difference.

    For the ordered pair (i, j) the keys of both images are concatenated and one
    softmax runs over all 2P positions; the pair feature is what the queries
    pooled from i minus what they pooled from j. Materialising the (N*N, 2P)
    attention would cost O(N^2 P) memory, so this uses an exact factorisation:
    with ``lse_i`` the log-sum-exp of the query-key logits over image i's
    tokens and ``o_i`` the output of a softmax over image i alone, the joint
    softmax gives image i the share ``w_ij = sigmoid(lse_i - lse_j)`` of the
    attention mass, so the pair feature is ``w_ij * o_i - (1 - w_ij) * o_j``.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, width)  # one projection gives keys and values
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, width)

    def pooled(
        self, queries: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image attention: ``(o (N, H, Q, hd), lse (N, H, Q))``."""
        n, p, width = tokens.shape
        hd = width // self.heads
        q = self.ln_q(self.q_proj(queries))  # (Q, D)
        kv = self.ln_kv(self.kv_proj(tokens))  # (N, P, D)
        q = q.reshape(-1, self.heads, hd).transpose(0, 1)  # (H, Q, hd)
        kv = kv.reshape(n, p, self.heads, hd).transpose(1, 2)  # (N, H, P, hd)
        logits = torch.matmul(q.unsqueeze(0), kv.transpose(-1, -2)) * (hd**-0.5)  # (N, H, Q, P)
        lse = torch.logsumexp(logits, dim=-1)  # (N, H, Q)
        weights = torch.exp(logits - lse.unsqueeze(-1))
        return torch.matmul(weights, kv), lse

    def pair_features(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(N*N, D): the pair features summed over the Q queries, after ``out_proj``."""
        n = tokens.shape[0]
        o, lse = self.pooled(queries, tokens)  # (N, H, Q, hd), (N, H, Q)
        share = torch.sigmoid(lse.unsqueeze(1) - lse.unsqueeze(0))  # (N_i, N_j, H, Q): i's share
        # sum_q share_ij * o_i - sum_q (1 - share_ij) * o_j, without an (N, N, H, Q, hd) tensor.
        from_i = torch.einsum("ijhq,ihqd->ijhd", share, o)
        from_j = torch.einsum("ijhq,jhqd->ijhd", 1.0 - share, o)
        diff = (from_i - from_j).reshape(n * n, -1)  # heads merged: (N*N, D)
        # out_proj is applied per query token and then summed over the Q tokens:
        # W (sum_q f_q) + Q * b, the same numbers without the (N*N, Q, D) tensor.
        num_queries = queries.shape[0]
        return nn.functional.linear(diff, self.out_proj.weight) + num_queries * self.out_proj.bias


@dataclass
class PreparedText:
    """One prompt's side of the adapter (:meth:`RankingAdapter.prepare_text`).

    Attributes:
        keys: Per cross-attention layer, the keys of the text tokens (H, L, hd),
            learnable text tokens included.
        values: The values, likewise.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class RankingAdapter(nn.Module):
    """The ranking-aware adapter.

    Inputs are the frozen backbone's tokens: ``image_tokens`` (N, P, D) and
    ``text_tokens`` (N, L, D) or (1, L, D) for one prompt shared by the batch.
    """

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        width, heads, layers = config.d_model, config.n_head, config.num_layers
        if config.num_learnable_text_tokens:
            self.learnable_text_tokens = nn.Parameter(
                torch.zeros(1, config.num_learnable_text_tokens)
            )
            nn.init.normal_(self.learnable_text_tokens, std=0.02)
        else:
            self.learnable_text_tokens = None
        if config.variant == "full":
            self.reg_tokens = nn.Parameter(torch.empty(config.n_reg_tokens, width))
            nn.init.normal_(self.reg_tokens, std=0.02)
        self.crossmodal_block = _CrossModalBlock(width, heads, layers)
        encoder_layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=width,
            dropout=config.dropout,
            batch_first=True,
        )
        self.post_fuse_block = nn.TransformerEncoder(
            encoder_layer, num_layers=layers, enable_nested_tensor=False
        )
        if config.variant == "full":
            self.reg_token_pooler = _RankingAwareAttention(width, heads)
        if config.variant != "ltr":
            self.pair_regressor = _pair_head(width)
        self.reg_ln = nn.LayerNorm(width)
        self.regressor = _regression_head(width)

    def _check_inputs(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        width = self.config.d_model
        if image_tokens.ndim != 3 or image_tokens.shape[-1] != width:
            raise ModelError(
                f"the adapter expects image tokens (N, P, {width}); "
                f"got {tuple(image_tokens.shape)}. "
                "The backbone does not produce the tokens this adapter was trained on."
            )
        if text_tokens.ndim != 3 or text_tokens.shape[-1] != width:
            raise ModelError(
                f"the adapter expects text tokens (N, L, {width}); got {tuple(text_tokens.shape)}. "
                "The backbone's text tower is not the one this adapter was trained on."
            )
        n = image_tokens.shape[0]
        if text_tokens.shape[0] == 1 and n != 1:
            text_tokens = text_tokens.expand(n, -1, -1)
        elif text_tokens.shape[0] != n:
            raise ModelError(
                f"{n} images but {text_tokens.shape[0]} prompts: "
                "pass one prompt per image or one for all"
            )
        return text_tokens

    def fuse(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """Cross-modal fusion and the post-fusion encoder: Z (N, P, D)."""
        text_tokens = self._check_inputs(image_tokens, text_tokens)
        if self.learnable_text_tokens is not None:
            n, width = text_tokens.shape[0], self.config.d_model
            # Each learnable scalar becomes a whole D-vector of that value.
            learned = self.learnable_text_tokens.to(text_tokens.dtype)
            learned = learned.unsqueeze(-1).expand(n, -1, width)
            text_tokens = torch.cat([learned, text_tokens], dim=1)
        fused = self.crossmodal_block(image_tokens, text_tokens)
        return self.post_fuse_block(fused)

    def _pooled(self, fused: torch.Tensor) -> torch.Tensor:
        return self.reg_ln(fused).sum(dim=1)  # (N, D)

    def score(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """Regression scores only (N, 1): what sorting needs, linear in N."""
        return self.regressor(self._pooled(self.fuse(image_tokens, text_tokens)))

    def prepare_text(self, text_tokens: torch.Tensor) -> PreparedText:
        """What the adapter computes from one prompt alone, for :meth:`score_prepared`.

        Args:
            text_tokens: (1, L, D) the prompt's text tokens.
        """
        width = self.config.d_model
        if text_tokens.ndim != 3 or text_tokens.shape[0] != 1 or text_tokens.shape[-1] != width:
            raise ModelError(
                f"the adapter expects one prompt's text tokens (1, L, {width}); got "
                f"{tuple(text_tokens.shape)}. The backbone's text tower is not the one this "
                "adapter was trained on."
            )
        if self.learnable_text_tokens is not None:
            learned = self.learnable_text_tokens.to(text_tokens.dtype).unsqueeze(-1)
            text_tokens = torch.cat([learned.expand(1, -1, width), text_tokens], dim=1)
        pairs = [cross.text_keys_values(text_tokens) for cross in self.crossmodal_block.cross_attn]
        return PreparedText(keys=[k for k, _ in pairs], values=[v for _, v in pairs])

    def score_prepared(self, image_tokens: torch.Tensor, prepared: PreparedText) -> torch.Tensor:
        """:meth:`score` for the prompt of ``prepared`` (:meth:`prepare_text`): (N, 1).

        The same numbers as :meth:`score` (within float rounding, tested at 1e-5),
        without recomputing the prompt's side of the cross-attention per image.
        """
        width = self.config.d_model
        if image_tokens.ndim != 3 or image_tokens.shape[-1] != width:
            raise ModelError(
                f"the adapter expects image tokens (N, P, {width}); "
                f"got {tuple(image_tokens.shape)}. "
                "The backbone does not produce the tokens this adapter was trained on."
            )
        block = self.crossmodal_block
        x = image_tokens
        layers = zip(block.resblocks, block.cross_attn, prepared.keys, prepared.values, strict=True)
        for attention, cross, keys, values in layers:
            x = cross.forward_prepared(attention(x), keys, values)
        fused = self.post_fuse_block(block.ln_final(x) @ block.projection)
        return self.regressor(self._pooled(fused))

    def forward(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (N, 1) and pair logits (N*N, 1), row ``i*N + j`` for "i above j"."""
        fused = self.fuse(image_tokens, text_tokens)
        pooled = self._pooled(fused)
        scores = self.regressor(pooled)
        n = scores.shape[0]
        variant = self.config.variant
        if variant == "full":
            pair = self.pair_regressor(self.reg_token_pooler.pair_features(self.reg_tokens, fused))
        elif variant == "ranking-head":
            pair = self.pair_regressor(
                (pooled.unsqueeze(1) - pooled.unsqueeze(0)).reshape(n * n, -1)
            )
        else:  # "ltr": the pairwise loss acts on score differences
            pair = (scores.reshape(n, 1) - scores.reshape(1, n)).reshape(n * n, 1)
        return scores, pair


def count_parameters(module: nn.Module) -> int:
    """Number of trainable numbers in a module (shown by ``imgrank adapter info``)."""
    return int(sum(math.prod(p.shape) for p in module.parameters()))
