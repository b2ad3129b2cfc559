"""The denoiser: a UNet with timestep embedding, residual blocks and (cross-)attention.

Ported from CompVis/latent-diffusion@5a6571e (`ldm/modules/diffusionmodules/openaimodel.py`), which took it
from openai/guided-diffusion (`guided_diffusion/unet.py`). Module and parameter names are unchanged, so
official checkpoints load strictly under `model.diffusion_model.`. Local changes:
- Gradient checkpointing works (non-reentrant) with the `gradient_checkpointing` option; off by default,
  as in the official TI code. Then the transformer blocks, and the blocks whose config asks with
  `use_checkpoint`, recompute their activations in backward. `AttentionBlock` follows its
  `use_checkpoint` flag instead of always asking for checkpointing.
- `attention` picks the cross-attention kernel of every `SpatialTransformer` ("math" or "sdpa").
- `use_fp16` is real: `convert_to_fp16` casts the torso (input, middle and output blocks) to float16, and
  the forward pass feeds it float16 activations, timestep embeddings and context (the official methods were
  no-op stubs, so `use_fp16=True` crashed). Mixed precision via autocast at the entry point is preferred.
- Constructor checks raise `ValueError` with explicit messages instead of bare asserts; `forward` takes no
  `**kwargs` sink.
- Device-agnostic: new tensors follow the inputs.
- `TransposedUpsample`, `AttentionPool2d`, `EncoderUNetModel`, `count_flops_attn` and the fp16 module
  converters are not carried over (no config uses them).
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embeddings as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the module to `x` given the timestep embeddings `emb`."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands `emb` to `TimestepBlock` children and `context` to `SpatialTransformer` ones."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling (inner two dims for 3-D signals), then an optional 3x3 `conv`."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expects {self.channels} channels, got {x.shape[1]}")
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """x2 downsampling (inner two dims for 3-D signals): strided 3x3 conv or average pooling (`op`)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without a conv cannot change the number of channels "
                                 f"({self.channels} -> {self.out_channels})")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expects {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    h = in_layers(x) [-> up/down];  h = h + emb_layers(emb)  (or, with scale-shift norm,
    h = norm(h) * (1 + scale) + shift);  h = out_layers(h);  return skip_connection(x) + h.

    :param channels: input channels C_in.
    :param emb_channels: width of the timestep embedding.
    :param dropout: dropout rate before the last conv.
    :param out_channels: C_out (default C_in).
    :param use_conv: with C_out != C_in, use a 3x3 (not 1x1) conv on the skip path.
    :param use_scale_shift_norm: FiLM-like conditioning through the output normalisation.
    :param up: upsample x2 inside the block; `down`: downsample x2.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, C_in, ...], emb [B, emb_channels] -> [B, C_out, ...]."""
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_rest(x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while emb_out.ndim < h.ndim:
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            h = out_rest(h)
        else:
            h = h + emb_out
            h = self.out_layers(h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions of a feature map (the non-transformer UNet path).

    Originally ported from https://github.com/hojonathanho/diffusion (via guided-diffusion).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels != 0:
                raise ValueError(f"q,k,v channels {channels} is not divisible by num_head_channels "
                                 f"{num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        # split qkv before splitting heads (new order) or after (legacy, the default)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(
            self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = self.attention(qkv)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


class QKVAttentionLegacy(nn.Module):
    """QKV attention that splits heads first, then q/k/v: [B, H*3*C, T] -> [B, H*C, T]."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads) != 0:
            raise ValueError(f"qkv width {width} is not divisible by 3 * n_heads = {3 * self.n_heads}")
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))  # d^-1/4 on q and on k: more stable in fp16 than d^-1/2 after
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v)
        return a.reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """QKV attention that splits q/k/v first, then heads: [B, 3*H*C, T] -> [B, H*C, T]."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        if width % (3 * self.n_heads) != 0:
            raise ValueError(f"qkv width {width} is not divisible by 3 * n_heads = {3 * self.n_heads}")
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum(
            "bct,bcs->bts",
            (q * scale).view(bs * self.n_heads, ch, length),
            (k * scale).view(bs * self.n_heads, ch, length),
        )
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * self.n_heads, ch, length))
        return a.reshape(bs, -1, length)


class UNetModel(nn.Module):
    """The full UNet with attention and timestep embedding.

    :param image_size: nominal input size (stored, unused).
    :param in_channels: channels of x. :param out_channels: channels of the output.
    :param model_channels: base channel count.
    :param num_res_blocks: residual blocks per resolution.
    :param attention_resolutions: downsampling factors `ds` (1, 2, 4, ...) at which attention is added.
    :param dropout: dropout in the residual blocks.
    :param channel_mult: channel multiplier per resolution level.
    :param conv_resample: learned 3x3 convs for up/downsampling (else nearest / average pooling).
    :param dims: 1-D, 2-D or 3-D signals.
    :param num_classes: if set, the model is class-conditional (`label_emb`, `y` argument).
    :param use_checkpoint: ask for gradient checkpointing of the residual and attention blocks (effective
        only with `gradient_checkpointing`).
    :param gradient_checkpointing: recompute activations in backward: the transformer blocks always, the
        other blocks where `use_checkpoint` asks (less memory, same numbers, slower). Off by default.
    :param attention: "math" (the official kernel) or "sdpa" for every cross-attention layer.
    :param use_fp16: run the torso in float16 (see `convert_to_fp16`).
    :param num_heads: attention heads per layer; :param num_head_channels: if set, a fixed width per head
        instead (then num_heads = ch // num_head_channels).
    :param num_heads_upsample: heads of the decoder `AttentionBlock`s (default num_heads).
    :param use_scale_shift_norm: FiLM-like conditioning in the residual blocks.
    :param resblock_updown: residual blocks for up/downsampling.
    :param use_new_attention_order: `QKVAttention` instead of `QKVAttentionLegacy`.
    :param use_spatial_transformer: `SpatialTransformer` (cross-attention on `context`) instead of
        `AttentionBlock`; requires `context_dim`.
    :param transformer_depth: blocks per `SpatialTransformer`.
    :param context_dim: width of the cross-attention context.
    :param n_embed: if set, predict codebook ids with `id_predictor` instead of `out`.
    :param legacy: ldm's head-width rule (see below); only changes the `AttentionBlock` path.
    """

    def __init__(
        self,
        image_size,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions,
        dropout: float = 0,
        channel_mult=(1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        gradient_checkpointing: bool = False,
        attention: str = "math",
    ):
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ValueError("Fool!! You forgot to include the dimension of your cross-attention "
                             "conditioning: use_spatial_transformer=True requires context_dim")
        if context_dim is not None:
            if not use_spatial_transformer:
                raise ValueError("Fool!! You forgot to use the spatial transformer for your cross-attention "
                                 "conditioning: context_dim is set, so use_spatial_transformer must be True")
            if isinstance(context_dim, ListConfig):
                context_dim = list(context_dim)
            if not isinstance(context_dim, int):
                # ldm converts a ListConfig and passes it on; per-block context widths are a later (SD 2.x)
                # feature that this SpatialTransformer lacks, so fail here rather than deep inside nn.Linear.
                raise ValueError(f"context_dim must be an int for this UNet, got {context_dim!r}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("Either num_heads or num_head_channels has to be set (both are -1)")

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.gradient_checkpointing = gradient_checkpointing
        block_checkpoint = use_checkpoint and gradient_checkpointing
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.predict_codebook_ids = n_embed is not None

        time_embed_dim = model_channels * 4

        def attention_layer(ch: int, heads: int, upsample: bool = False) -> tuple[nn.Module, int]:
            """Attention layer at width `ch` and the (possibly updated) head count.

            Head rule as ldm: with num_head_channels == -1, dim_head = ch // heads, else heads =
            ch // num_head_channels (that count carries over to later layers, a quirk kept). With `legacy`,
            the spatial transformer gets ch // heads and the AttentionBlock gets num_head_channels. Decoder
            AttentionBlocks use num_heads_upsample.
            """
            if num_head_channels == -1:
                dim_head = ch // heads
            else:
                heads = ch // num_head_channels
                dim_head = num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            if use_spatial_transformer:
                layer = SpatialTransformer(ch, heads, dim_head, depth=transformer_depth,
                                           context_dim=context_dim, checkpoint=gradient_checkpointing,
                                           attention=attention)
            else:
                layer = AttentionBlock(ch, use_checkpoint=block_checkpoint,
                                       num_heads=num_heads_upsample if upsample else heads,
                                       num_head_channels=dim_head,
                                       use_new_attention_order=use_new_attention_order)
            return layer, heads

        def resblock(ch: int, out_ch: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, dims=dims,
                            use_checkpoint=block_checkpoint, use_scale_shift_norm=use_scale_shift_norm,
                            up=up, down=down)

        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        # 1. Encoder: stem conv, then per level `num_res_blocks` x (ResBlock [+ attention]) and a downsample.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        self._feature_size = model_channels
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layer, num_heads = attention_layer(ch, num_heads)
                    layers.append(layer)
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                out_ch = ch
                self.input_blocks.append(TimestepEmbedSequential(
                    resblock(ch, out_ch, down=True) if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                ))
                ch = out_ch
                input_block_chans.append(ch)
                ds *= 2
                self._feature_size += ch

        # 2. Middle: ResBlock, attention, ResBlock.
        middle_attention, num_heads = attention_layer(ch, num_heads)
        self.middle_block = TimestepEmbedSequential(resblock(ch), middle_attention, resblock(ch))
        self._feature_size += ch

        # 3. Decoder: per level (deepest first) `num_res_blocks + 1` x (ResBlock on [h, skip] [+ attention]),
        #    the last one of each level but the top followed by an upsample.
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [resblock(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layer, num_heads = attention_layer(ch, num_heads, upsample=True)
                    layers.append(layer)
                if level and i == num_res_blocks:
                    out_ch = ch
                    layers.append(
                        resblock(ch, out_ch, up=True) if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch

        # 4. Head.
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(
                normalization(ch),
                conv_nd(dims, model_channels, n_embed, 1),
            )
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        """Cast the torso (input, middle and output blocks) to float16; `time_embed` and `out` stay float32.

        The forward pass then casts x, the timestep embeddings and the context to float16 for the torso, and
        the torso output back to x's dtype before `out`. Normalisations still compute in float32.
        """
        self.input_blocks.half()
        self.middle_block.half()
        self.output_blocks.half()
        self.dtype = torch.float16

    def convert_to_fp32(self) -> None:
        """Undo `convert_to_fp16`: cast the torso back to float32."""
        self.input_blocks.float()
        self.middle_block.float()
        self.output_blocks.float()
        self.dtype = torch.float32

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None,
                context: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict eps (or codebook logits) for a noisy batch.

        :param x: [B, in_channels, H, W] (H, W divisible by 2^(len(channel_mult)-1)).
        :param timesteps: [B] integer (or float) diffusion steps.
        :param context: [B, M, context_dim] cross-attention conditioning, or None.
        :param y: [B] class labels, required iff the model is class-conditional.
        :return: [B, out_channels, H, W] (or [B, n_embed, H, W] with `n_embed`).
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("must specify y if and only if the model is class-conditional")
        hs = []
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False)
        emb = self.time_embed(t_emb)
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)

        # `.type` to the same dtype is the identity, so the default float32 path is exactly ldm's.
        h = x.type(self.dtype)
        emb = emb.type(self.dtype)
        if context is not None:
            context = context.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        h = h.type(x.dtype)
        if self.predict_codebook_ids:
            return self.id_predictor(h)
        return self.out(h)
