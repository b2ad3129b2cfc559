"""Encoder-only transformer of the LDM 1.4B text encoder (`BERTEmbedder`).

Ported from lucidrains/x-transformers 0.x as vendored by CompVis/latent-diffusion@5a6571e
(`ldm/modules/x_transformer.py`), with the Textual Inversion hook of rinongal/textual_inversion@424192d.
Module and attribute names are the checkpoint format: under `cond_stage_model.transformer.` the official
txt2img-1p4B checkpoint holds

    token_emb.weight, pos_emb.emb.weight, norm.{weight,bias}, to_logits.{weight,bias},
    attn_layers.layers.<i>.0.{weight,bias}                       pre-norm LayerNorm of layer i
    attn_layers.layers.<even i>.1.to_{q,k,v}.weight, .1.to_out.{weight,bias}          self-attention
    attn_layers.layers.<odd i>.1.net.0.0.{weight,bias}, .1.net.2.{weight,bias}        feed-forward

(`.2` of each layer is the parameter-free residual).

Local changes:
- Only what the LDM configs reach is implemented: `Encoder` (non-causal, pre-norm LayerNorm, plain residual,
  layer types ('a', 'f') x depth, softmax attention), learned absolute positions, `TransformerWrapper` without
  memory tokens. Every other x-transformers option raises `NotImplementedError` when set to a non-default
  value, instead of being accepted and ignored; unknown options raise `TypeError`.
  Dropped: `Decoder`, `CrossAttender`, `XTransformer`, rotary / relative / position-infused attention,
  talking heads, sparse top-k, entmax, memory key-values, scale/RMS norm, rezero, GRU gating, macaron,
  sandwich and PAR layouts, `mems` / `return_mems` / `return_attn`, the `exists`/`default` helper copies.
- `TransformerWrapper.forward` takes `embedding_manager` (the TI hook, as in the TI fork): it is called on
  (ids, token embeddings) after the token lookup and before the position embeddings are added.
- No einops: the head split is written with `reshape`/`transpose`; attention is computed in the same order
  (q k^T, times dim_head^-0.5, softmax, times v).
- A sequence longer than `max_seq_len` raises a `ValueError` naming both lengths.
- `to_logits`, the unused logits head, is a `LogitsHead`: same keys, shapes and random init, but its tensors
  are not parameters and a checkpoint's are kept without a copy (docs/DIFFERENCES.md#unused-logits-head).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import check_attention

DEFAULT_DIM_HEAD = 64

# x-transformers options that this port does not implement, with the upstream defaults (accepted as no-ops).
_UNSUPPORTED_LAYER_OPTIONS: dict[str, Any] = {
    "causal": False,
    "cross_attend": False,
    "only_cross": False,
    "use_scalenorm": False,
    "use_rmsnorm": False,
    "use_rezero": False,
    "rel_pos_bias": False,
    "rel_pos_num_buckets": 32,
    "rel_pos_max_distance": 128,
    "position_infused_attn": False,
    "rotary_pos_emb": False,
    "rotary_emb_dim": None,
    "custom_layers": None,
    "sandwich_coef": None,
    "par_ratio": None,
    "residual_attn": False,
    "cross_residual_attn": False,
    "macaron": False,
    "pre_norm": True,
    "gate_residual": False,
    "attn_talking_heads": False,
    "attn_sparse_topk": None,
    "attn_use_entmax15": False,
    "attn_num_mem_kv": 0,
    "attn_on_attn": False,
    "ff_glu": False,
    "ff_dim_out": None,
}
_UNSUPPORTED_WRAPPER_OPTIONS: dict[str, Any] = {
    "max_mem_len": 0.0,
    "num_memory_tokens": None,
    "tie_embedding": False,
    "use_pos_emb": True,
}
_UNSUPPORTED_FORWARD_OPTIONS: dict[str, Any] = {
    "return_mems": False,
    "return_attn": False,
    "mems": None,
    "context": None,
    "context_mask": None,
}


def _reject_unsupported(options: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> None:
    """Raise NotImplementedError for options this port lacks, TypeError for options x-transformers lacks."""
    for name, value in options.items():
        if name not in defaults:
            raise TypeError(f"{where} got an unexpected option '{name}'")
        if value != defaults[name]:
            raise NotImplementedError(
                f"{where}: x-transformers option {name}={value!r} is not supported by this port "
                f"(only the features used by the LDM configs are; upstream default {defaults[name]!r})"
            )


class AbsolutePositionalEmbedding(nn.Module):
    """Learned position table; `forward(x)` returns rows 0..n-1 as [1, n, dim] for x of shape [b, n, ...]."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=x.device)
        return self.emb(positions)[None, :, :]


class Residual(nn.Module):
    """Parameter-free skip connection, `out + residual` (kept as a module: it is index `.2` of each layer)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return x + residual


class FeedForward(nn.Module):
    """`net` = Sequential(Sequential(Linear(dim, mult*dim), GELU), Dropout, Linear(mult*dim, dim))."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU()),
            nn.Dropout(dropout),
            nn.Linear(inner_dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Multi-head softmax self-attention; q, k, v without bias, output projection with bias.

    x: [b, n, dim] -> [b, n, dim]. `mask`: optional bool [b, n], True = attend (applied to queries and keys).
    `attention` "sdpa" uses the fused kernel where it computes the same (no mask, no active dropout).
    """

    def __init__(self, dim: int, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 8, dropout: float = 0.0,
                 attention: str = "math"):
        super().__init__()
        self.attention = check_attention(attention)
        self.heads = heads
        self.scale = dim_head**-0.5
        inner_dim = dim_head * heads
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.to_out = nn.Linear(inner_dim, dim)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).transpose(1, 2)  # [b, h, n, d]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (self._split_heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        if mask is None and self.attention == "sdpa" and not (self.training and self.dropout.p > 0):
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # same maths, fused kernel
            b, h, n, d = out.shape
            return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))
        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [b, h, n, n]
        if mask is not None:
            pair_mask = mask[:, None, :, None] & mask[:, None, None, :]
            dots = dots.masked_fill(~pair_mask, -torch.finfo(dots.dtype).max)
        attn = self.dropout(F.softmax(dots, dim=-1))
        out = torch.matmul(attn, v)  # [b, h, n, d]
        b, h, n, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))


class AttentionLayers(nn.Module):
    """`depth` blocks of (self-attention, feed-forward), each pre-normed and residual.

    `layers.<i>` = ModuleList([LayerNorm(dim), block, Residual()]), block types alternating 'a', 'f'.
    Options prefixed `attn_` / `ff_` go to Attention / FeedForward (as in x-transformers): supported are
    `attn_dim_head`, `attn_dropout`, `ff_mult`, `ff_dropout`. `attention` is the kernel of every
    attention block ("math" or "sdpa").
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        attn_dim_head: int = DEFAULT_DIM_HEAD,
        attn_dropout: float = 0.0,
        ff_mult: int = 4,
        ff_dropout: float = 0.0,
        attention: str = "math",
        **options: Any,
    ):
        super().__init__()
        _reject_unsupported(options, _UNSUPPORTED_LAYER_OPTIONS, type(self).__name__)
        self.dim = dim
        self.depth = depth
        self.has_pos_emb = False  # no position-infused attention; the wrapper adds absolute positions
        self.layer_types = ("a", "f") * depth
        self.layers = nn.ModuleList()
        for layer_type in self.layer_types:
            if layer_type == "a":
                block = Attention(dim, dim_head=attn_dim_head, heads=heads, dropout=attn_dropout,
                                  attention=attention)
            else:
                block = FeedForward(dim, mult=ff_mult, dropout=ff_dropout)
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), block, Residual()]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """x: [b, n, dim] -> [b, n, dim]. Extra keyword arguments are accepted and ignored (TI fork)."""
        for layer_type, (norm, block, residual_fn) in zip(self.layer_types, self.layers, strict=True):
            residual = x
            x = norm(x)
            out = block(x, mask=mask) if layer_type == "a" else block(x)
            x = residual_fn(out, residual)
        return x


class Encoder(AttentionLayers):
    """Bidirectional `AttentionLayers` (x-transformers `Encoder`); `causal` may not be passed."""

    def __init__(self, **kwargs: Any):
        if "causal" in kwargs:
            raise TypeError("Encoder is non-causal; do not pass `causal`")
        super().__init__(**kwargs)


class LogitsHead(nn.Module):
    """`to_logits`, the projection dim -> num_tokens, which textual inversion never runs (the embedder asks
    for `return_embeddings`): 39 M numbers at LDM 1.4B size.

    `weight` and `bias` are plain tensors, not parameters or buffers: they are in `state_dict()` and load
    strictly (missing, unexpected or mis-shaped keys are errors), but nothing moves, casts, stores in 16 bits
    or trains them, and loading keeps the given tensor itself instead of copying it. Loaded from a file
    through `ldm.checkpoint` they stay views of the mapped file, resident only while read (e.g. by an export).
    Initialised as `nn.Linear(dim, num_tokens)`, with the same random draws.
    """

    NAMES = ("weight", "bias")

    def __init__(self, dim: int, num_tokens: int):
        super().__init__()
        linear = nn.Linear(dim, num_tokens)
        self.weight, self.bias = linear.weight.detach(), linear.bias.detach()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight.to(h), self.bias.to(h))

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in self.NAMES:
            destination[prefix + name] = getattr(self, name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in self.NAMES:
            key, own = prefix + name, getattr(self, name)
            value = state_dict.get(key)
            if value is None:
                if strict:
                    missing_keys.append(key)
            elif value.shape != own.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {value.shape} from "
                                  f"checkpoint, the shape in current model is {own.shape}.")
            else:
                setattr(self, name, value.detach().cpu())
        if strict:
            names = {prefix + name for name in self.NAMES}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in names)


class TransformerWrapper(nn.Module):
    """Token embedding + learned positions + `attn_layers` + final LayerNorm (+ unused logits head).

    forward(x [b, n] int64) -> [b, n, dim] hidden states when `return_embeddings`, else [b, n, num_tokens].
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        max_seq_len: int,
        attn_layers: AttentionLayers,
        emb_dim: int | None = None,
        emb_dropout: float = 0.0,
        **options: Any,
    ):
        super().__init__()
        _reject_unsupported(options, _UNSUPPORTED_WRAPPER_OPTIONS, type(self).__name__)
        if not isinstance(attn_layers, AttentionLayers):
            raise TypeError("attn_layers must be an AttentionLayers (e.g. an Encoder)")
        dim = attn_layers.dim
        emb_dim = dim if emb_dim is None else emb_dim
        self.max_seq_len = max_seq_len
        self.num_tokens = num_tokens
        self.num_memory_tokens = 0
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.to_logits = LogitsHead(dim, num_tokens)

    def forward(
        self,
        x: torch.Tensor,
        return_embeddings: bool = False,
        mask: torch.Tensor | None = None,
        embedding_manager: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """x: token ids [b, n]. `embedding_manager(ids, token_embeddings [b, n, emb_dim])` -> embeddings.

        The manager runs on the raw token embeddings, before positions are added (Textual Inversion hook);
        it may change both tensors in place.
        """
        forward_options = {k: kwargs.pop(k) for k in list(kwargs) if k in _UNSUPPORTED_FORWARD_OPTIONS}
        _reject_unsupported(forward_options, _UNSUPPORTED_FORWARD_OPTIONS, "TransformerWrapper.forward")
        if x.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_seq_len {self.max_seq_len}")
        h = self.token_emb(x)
        if embedding_manager is not None:
            h = embedding_manager(x, h)
        h = h + self.pos_emb(h)
        h = self.emb_dropout(h)
        h = self.project_emb(h)
        h = self.attn_layers(h, mask=mask, **kwargs)
        h = self.norm(h)
        return h if return_embeddings else self.to_logits(h)
