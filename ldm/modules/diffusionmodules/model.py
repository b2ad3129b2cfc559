"""Convolutional encoder/decoder of the first-stage autoencoders (KL and VQ), and their building blocks.

Ported from CompVis/latent-diffusion@5a6571e, `ldm/modules/diffusionmodules/model.py` (unchanged in
rinongal/textual_inversion). Module names and the order in which submodules are created are kept, because
they are the state-dict keys of the official `first_stage_model.*` weights.

Local changes:
- Classes that no text-to-image config reaches are left out (`Model`, `LinAttnBlock`, `SimpleDecoder`,
  `UpsampleDecoder`, `LatentRescaler`, `MergedRescale*`, `Upsampler`, `Resize`, `FirstStagePostProcessor`);
  `make_attn(..., "linear")` raises `NotImplementedError` instead.
- Messages go through `logging` instead of `print`.
- The encoder keeps only the current activation instead of a list of all of them (same values, less memory).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU, written as upstream does: x * sigmoid(x)."""
    return x * torch.sigmoid(x)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups, eps 1e-6 and an affine transform (the only norm these networks use)."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if self.with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """x2 downsampling: [B, C, H, W] -> [B, C, H/2, W/2].

    With a conv, the input is zero-padded on the right and bottom only (asymmetric, as upstream; torch's
    conv padding is symmetric) and then convolved 3x3 with stride 2 and no padding; otherwise 2x2 average
    pooling.
    """

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if self.with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: norm-swish-conv, (+ timestep projection), norm-swish-dropout-conv.

    When the channel count changes the skip path is a 1x1 conv (`nin_shortcut`) or, with
    `conv_shortcut=True`, a 3x3 conv (`conv_shortcut`). `temb_channels=0` (all autoencoders) means no
    `temb_proj` layer and no timestep input.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float,
        temb_channels: int = 512,
    ):
        super().__init__()
        self.in_channels = in_channels
        out_channels = in_channels if out_channels is None else out_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if self.in_channels != self.out_channels:
            if self.use_conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        """x: [B, in_channels, H, W]; temb: [B, temb_channels] or None. Returns [B, out_channels, H, W]."""
        h = self.conv1(nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual: [B, C, H, W] -> same.

    softmax(q^T k / sqrt(C)) over the H*W key positions, applied to v, then `proj_out`.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)  # [B, HW, C]
        k = k.reshape(b, c, h * w)  # [B, C, HW]
        # Same operation order as upstream (scale applied to the logits, not to q) for bitwise-close outputs.
        weights = torch.bmm(q, k) * (int(c) ** (-0.5))  # [B, HW_q, HW_k]
        weights = F.softmax(weights, dim=2)
        v = v.reshape(b, c, h * w)
        h_ = torch.bmm(v, weights.permute(0, 2, 1))  # [B, C, HW_q]
        h_ = self.proj_out(h_.reshape(b, c, h, w))
        return x + h_


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """Attention block by name: "vanilla" (`AttnBlock`) or "none" (identity)."""
    if attn_type == "linear":
        raise NotImplementedError(
            "attn_type 'linear' (LinAttnBlock) is not ported: no text-to-image config uses it; "
            "use 'vanilla' or 'none'"
        )
    if attn_type not in ("vanilla", "none"):
        raise ValueError(f"attn_type must be 'vanilla' or 'none', got {attn_type!r}")
    logger.debug("making attention of type '%s' with %d in_channels", attn_type, in_channels)
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    return nn.Identity()


class Encoder(nn.Module):
    """Image -> latent moments: [B, in_channels, R, R] -> [B, (2 if double_z else 1)*z_channels, r, r].

    r = R / 2**(len(ch_mult) - 1). Level i runs `num_res_blocks` ResnetBlocks at width ch*ch_mult[i]
    (each followed by attention when the current resolution is in `attn_resolutions`) and, except at the
    last level, a Downsample. Then mid (res, attn, res), GroupNorm, swish, conv_out.

    Extra keyword arguments are accepted and ignored, as upstream: the configs hand the same `ddconfig`
    to the encoder and the decoder, so each sees the other's options (e.g. `out_ch` is unused here).
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        **ignore_kwargs: Any,
    ):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, self.ch, kernel_size=3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.in_ch_mult = in_ch_mult
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(self.num_res_blocks):
                block.append(
                    ResnetBlock(
                        in_channels=block_in,
                        out_channels=block_out,
                        temb_channels=self.temb_ch,
                        dropout=dropout,
                    )
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type=attn_type))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )
        self.mid.attn_1 = make_attn(block_in, attn_type=attn_type)
        self.mid.block_2 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temb = None
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            level = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](h, temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)

        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        h = nonlinearity(self.norm_out(h))
        return self.conv_out(h)


class Decoder(nn.Module):
    """Latent -> image: [B, z_channels, r, r] -> [B, out_ch, R, R], the mirror image of `Encoder`.

    conv_in, mid (res, attn, res), then for each level from the lowest resolution upwards
    `num_res_blocks + 1` ResnetBlocks (+ attention where configured) and, except at level 0, an Upsample;
    GroupNorm, swish, conv_out (tanh if `tanh_out`). `give_pre_end` returns the features before norm_out.

    `self.up[i]` is level i in natural order (0 = full resolution) although the levels are built from the
    lowest resolution upwards; that is where the official keys `decoder.up.<i>.*` point.
    Extra keyword arguments are ignored for the same reason as in `Encoder` (shared `ddconfig`).
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        **ignorekwargs: Any,
    ):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        logger.info(
            "Working with z of shape %s = %d dimensions.", self.z_shape, z_channels * curr_res * curr_res
        )

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )
        self.mid.attn_1 = make_attn(block_in, attn_type=attn_type)
        self.mid.block_2 = ResnetBlock(
            in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout
        )

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(self.num_res_blocks + 1):
                block.append(
                    ResnetBlock(
                        in_channels=block_in,
                        out_channels=block_out,
                        temb_channels=self.temb_ch,
                        dropout=dropout,
                    )
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type=attn_type))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            self.up.insert(0, up)  # prepend: keeps self.up[i] == level i (the official key order)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.last_z_shape = z.shape
        temb = None
        h = self.conv_in(z)

        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](h, temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)

        if self.give_pre_end:
            return h

        h = self.conv_out(nonlinearity(self.norm_out(h)))
        if self.tanh_out:
            h = torch.tanh(h)
        return h
