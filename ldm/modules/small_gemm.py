"""Frozen layers on few positions as one matrix product with the weight on the left; wide ones in blocks.

On CPU, the UNet's low-resolution levels are products of a large frozen weight with few rows: at 256 px,
LDM 1.4B's 1280-channel 3x3 convolutions see 8x8 or 4x4 positions, its transformers there 64 or 16 tokens.
MKL and oneDNN run these far below their speed on square products. Written as `W @ X^T` (the weight as the
tall left operand) instead of `X @ W^T`, the same product runs faster on the 2-core AMD EPYC the README
measures on: 1.4x (16x16) to 6x (4x4) for the 1280-channel convolutions (at 8x8: 58 ms -> 18 ms forward,
64 ms -> 23 ms for the gradient to its input), 1.2-1.9x for linear layers on 16 to 64 tokens. A
convolution becomes that product by unfolding its input into patches (im2col); the gradient to the input
is the transposed product folded back (col2im). The sums run in another order, so results are equal
within float tolerance, not bitwise.

The same libraries also lose speed on a wide product, many output features against few rows: BERT's
feed-forward up-projection in LDM 1.4B (77 tokens, 1280 -> 5120) took 21.6 ms as one `F.linear` and
13.2 ms as ten products of 512 output features each (`linear_blocks`); with 16-bit stored weights each
block is upcast just before its product, so the float32 copy stays in cache (25.3 -> 13.6 ms). Only the
forward is split; the input gradient of such a layer was not faster in blocks.

Only the gradient to the input is computed: the layers are frozen. `ldm/modules/frozen_weights.py` calls
these kernels, and takes PyTorch's own for a weight that requires grad, off the CPU and under autocast.
`SmallGemm` is the rule for which calls take this path; its defaults are the crossovers measured on that
machine, where both kernels are within 10% of each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SmallGemm:
    """Which frozen calls run as `W @ X^T`: a linear layer (or 1x1 convolution) with at most `max_rows`
    rows and a weight of at least `min_linear_weight` elements; a larger convolution kernel with at most
    `max_conv_positions` output positions and at least `min_conv_weight` weight elements. Which other
    linear calls run in blocks of `wide_block` output features (`linear_blocks`): at most `max_wide_rows`
    rows and at least `min_wide_features` output features."""

    max_rows: int = 64
    min_linear_weight: int = 1 << 20
    max_conv_positions: int = 256
    min_conv_weight: int = 1 << 23
    max_wide_rows: int = 256
    min_wide_features: int = 4096
    wide_block: int = 512

    def linear(self, rows: int, weight: torch.Tensor) -> bool:
        return rows <= self.max_rows and weight.numel() >= self.min_linear_weight

    def wide(self, rows: int, weight: torch.Tensor) -> bool:
        return rows <= self.max_wide_rows and weight.shape[0] >= self.min_wide_features

    def conv(self, positions: int, weight: torch.Tensor) -> bool:
        if weight.shape[2:] == (1, 1):
            return self.linear(positions, weight)
        return positions <= self.max_conv_positions and weight.numel() >= self.min_conv_weight


def eligible(x: torch.Tensor) -> bool:
    """A call these kernels take at all: a CPU input outside autocast (the crossovers were measured on CPU
    libraries; under autocast PyTorch's own layers pick the compute dtype)."""
    return x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


def conv_output_size(size: tuple[int, int], kernel: tuple[int, int], stride, padding) -> tuple[int, int]:
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(size, kernel, stride, padding, strict=True))


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format a convolution hands on: channels-last for a channels-last input."""
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed as `weight @ x^T`."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.mm(weight, rows.t()) if bias is None else torch.addmm(bias[:, None], weight, rows.t())
    return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])


def linear_blocks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block: int,
                  upcast: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed `block` output features at a time, each block of the weight
    passed through `upcast` (to the compute dtype) just before its product."""
    rows = x.reshape(-1, x.shape[-1])
    out = rows.new_empty(rows.shape[0], weight.shape[0])
    for i in range(0, weight.shape[0], block):
        b = None if bias is None else bias[i:i + block]
        out[:, i:i + block] = F.linear(rows, upcast(weight[i:i + block]), b)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of `F.linear(x, weight)` to `x`, `grad @ weight`, computed as `weight^T @ grad^T`."""
    rows = grad.reshape(-1, grad.shape[-1])
    return torch.mm(weight.t(), rows.t()).t().contiguous().view(*grad.shape[:-1], weight.shape[1])


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The (out, kh * kw * in) matrix of a conv weight; a view when the weight is channels-last."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _pointwise(weight: torch.Tensor, stride, padding) -> bool:
    return weight.shape[2:] == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride, padding)` (dilation 1, one group) as `W @ patches^T`; the output has
    the input's memory format."""
    n, c, h, w = x.shape
    kh, kw = weight.shape[2:]
    ho, wo = conv_output_size((h, w), (kh, kw), stride, padding)
    nhwc = x.permute(0, 2, 3, 1)
    if _pointwise(weight, stride, padding):
        patches = nhwc.reshape(n * h * w, c)
    else:
        padded = F.pad(nhwc, (0, 0, padding[1], padding[1], padding[0], padding[0]))
        windows = padded.unfold(1, kh, stride[0]).unfold(2, kw, stride[1])  # n, ho, wo, c, kh, kw
        patches = windows.permute(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, kh * kw * c)
    matrix = _weight_matrix(weight)
    out = torch.mm(matrix, patches.t()) if bias is None else torch.addmm(bias[:, None], matrix, patches.t())
    return out.view(-1, n, ho, wo).permute(1, 0, 2, 3).contiguous(memory_format=memory_format_of(x))


def conv2d_input_grad(grad: torch.Tensor, weight: torch.Tensor, input_shape, stride, padding,
                      memory_format: torch.memory_format) -> torch.Tensor:
    """The gradient of `conv2d` to its input: `W^T @ grad^T` gives each patch's share, which is summed back
    onto the positions the patch covered (col2im)."""
    n, c, h, w = input_shape
    kh, kw = weight.shape[2:]
    ho, wo = grad.shape[2:]
    rows = grad.permute(0, 2, 3, 1).reshape(n * ho * wo, -1)
    cols = torch.mm(_weight_matrix(weight).t(), rows.t())  # (kh * kw * c, n * ho * wo)
    if _pointwise(weight, stride, padding):
        return cols.view(c, n, h, w).permute(1, 0, 2, 3).contiguous(memory_format=memory_format)
    cols = cols.view(kh, kw, c, n, ho, wo)
    padded = grad.new_zeros(n, c, h + 2 * padding[0], w + 2 * padding[1])
    sh, sw = stride
    for i in range(kh):
        for j in range(kw):
            padded[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += cols[i, j].permute(1, 0, 2, 3)
    inside = padded[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w]
    return inside.contiguous(memory_format=memory_format)
