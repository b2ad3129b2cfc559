"""Cross-attention transformer used inside the UNet (`SpatialTransformer` and its parts).

Ported from CompVis/latent-diffusion@5a6571e (`ldm/modules/attention.py`); module and parameter names are
unchanged, so official checkpoints load strictly. Local changes:
- `CrossAttention` has two numerically equivalent backends, chosen per module with its `attention`
  argument: "math" (the official einsum + softmax, default) and "sdpa"
  (`torch.nn.functional.scaled_dot_product_attention`, which can pick memory-efficient kernels).
- `BasicTransformerBlock(checkpoint=True)` really checkpoints (see
  `ldm.modules.diffusionmodules.util.checkpoint`); the UNet passes `checkpoint=False` unless its
  `gradient_checkpointing` option is on, which is off by default, as in the official TI code.
- The unused `LinearAttention`, `SpatialSelfAttention`, `init_`, `uniq` and `max_neg_value` are not carried
  over.

Shapes: x [B, N, C] token sequences (N = H*W inside the UNet), context [B, M, D_ctx].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module
from ldm.util import default, exists

__all__ = [
    "ATTENTION_BACKENDS", "BasicTransformerBlock", "CrossAttention", "FeedForward", "GEGLU", "Normalize",
    "SpatialTransformer", "check_attention", "default", "exists", "zero_module",
]

ATTENTION_BACKENDS = ("math", "sdpa")


def check_attention(name: str) -> str:
    """`name` if it is an attention backend ("math" or "sdpa"), else a ValueError naming the choices."""
    if name not in ATTENTION_BACKENDS:
        valid = ", ".join(ATTENTION_BACKENDS)
        raise ValueError(f"unknown attention backend {name!r}; valid choices: {valid}")
    return name


def Normalize(in_channels: int) -> nn.GroupNorm:
    """GroupNorm(32 groups, eps 1e-6, affine) in the input dtype, as used by `SpatialTransformer.norm`."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): proj to 2*dim_out, return a * GELU(b) for the halves (a, b); exact GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: `net.0` (GEGLU or Linear+GELU, dim -> mult*dim), `net.1` Dropout, `net.2` Linear."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = default(dim_out, dim)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of x [B, N, query_dim] over context [B, M, context_dim] (self-attention if None).

    q = to_q(x), k = to_k(ctx), v = to_v(ctx) (no biases), heads of width `dim_head`;
    out = to_out(softmax(q k^T * dim_head^-0.5) v). The softmax runs in the input dtype (no upcast), as in
    ldm. `attention` picks how: "math" (the official einsum path) or "sdpa" (the same maths, fused).
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, attention: str = "math"):
        super().__init__()
        self.attention = check_attention(attention)
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.scale = dim_head**-0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, query_dim], context [B, M, context_dim] or None, mask [B, ...] bool (True = attend, M in
        total) or None -> [B, N, query_dim]."""
        context = default(context, x)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if exists(mask):
            mask = mask.reshape(mask.shape[0], -1)
        if self.attention == "sdpa":
            out = self._attend_sdpa(q, k, v, mask)
        else:
            out = self._attend_math(q, k, v, mask)
        return self.to_out(out)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N, h*d] -> [B, h, N, d]."""
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).transpose(1, 2)

    def _attend_math(self, q, k, v, mask):
        """The official computation over (B*h) batches."""
        b, n, _ = q.shape
        h = self.heads
        q, k, v = (self._split_heads(t).reshape(b * h, t.shape[1], -1) for t in (q, k, v))
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
        if exists(mask):
            # Masked keys get -max (not -inf), so a fully masked row gives uniform weights rather than NaN.
            keep = mask.repeat_interleave(h, dim=0)[:, None, :]
            sim.masked_fill_(~keep, -torch.finfo(sim.dtype).max)
        attn = sim.softmax(dim=-1)
        out = torch.einsum("b i j, b j d -> b i d", attn, v)
        return out.reshape(b, h, n, -1).transpose(1, 2).reshape(b, n, -1)

    def _attend_sdpa(self, q, k, v, mask):
        b, n, _ = q.shape
        q, k, v = (self._split_heads(t) for t in (q, k, v))
        attn_mask = None
        if exists(mask):
            # Additive -max mask instead of a boolean one: same result as the math path, also for fully
            # masked rows (a boolean mask would give NaN there).
            attn_mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            attn_mask.masked_fill_(~mask, -torch.finfo(q.dtype).max)
            attn_mask = attn_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return out.transpose(1, 2).reshape(b, n, -1)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention on `context`, gated feed-forward.

    x = attn1(norm1(x)) + x;  x = attn2(norm2(x), context) + x;  x = ff(norm3(x)) + x.
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: int | None = None, gated_ff: bool = True, checkpoint: bool = True,
                 attention: str = "math"):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                                    attention=attention)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout, attention=attention)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of an image-like feature map, conditioned on `context`.

    x [B, C, H, W] -> norm -> proj_in (1x1 conv to n_heads*d_head) -> [B, H*W, inner] -> `depth` blocks
    -> back to [B, inner, H, W] -> proj_out (zero-initialised 1x1 conv to C) -> + x.
    `checkpoint` and `attention` go to every block.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, checkpoint: bool = False, attention: str = "math"):
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                                   checkpoint=checkpoint, attention=attention)
             for _ in range(depth)]
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # [B, H*W, inner], contiguous as in ldm
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        x = self.proj_out(x)
        return x + x_in
