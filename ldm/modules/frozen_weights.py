"""Frozen weights stored in 16 bits, computed in float32: half the memory of the frozen model.

Textual inversion trains a few vectors against a frozen model whose fp32 weights alone (6.2 GB for LDM 1.4B)
are most of a training step's peak memory. `store_frozen_weights(model, torch.float16)` keeps every frozen
Linear, Conv2d and Embedding weight in 16 bits and upcasts it to float32 inside each call, so all arithmetic
stays float32; the only change is that the weights are rounded: float16 keeps an 11-bit significand (relative
error <= 2**-11) where bfloat16 keeps 8 bits (2**-8), and the frozen weights of the supported models lie well
inside float16's range, so "fp16" is the more exact of the two. The autograd functions below save the 16-bit
tensor for backward and upcast it again there, so no float32 copy of a weight outlives its layer.

Every upcast writes into one `UpcastBuffer` per `store_frozen_weights` call, a float32 scratch tensor as large
as the largest weight, reused by every layer: a fresh float32 tensor per call would cost a page fault per 4 KiB
of weight (the allocator returns large blocks to the kernel), which made the upcast cost ~7x the copy itself.
Gradients flow to the layer inputs (and so to the embedding) only; frozen weights get none. Parameters that
require grad are left untouched. Opt-in (`main.py --frozen_weights fp16|bf16`): the faithful path keeps
float32 weights.

The same classes carry the other frozen-layer option, `use_small_gemm` (`model.params.small_gemm`): calls
on few positions run as weight-on-the-left products, wide linear calls in blocks of output features
(ldm/modules/small_gemm.py), with 16-bit or float32 weights alike; a float32 layer takes PyTorch's own
path for every other call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules import small_gemm
from ldm.modules.small_gemm import SmallGemm

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_frozen_weights(name: str, unfreeze_model: bool = False) -> None:
    """The model option `frozen_weights`: one of DTYPES, and only for a model whose weights stay frozen."""
    if name not in DTYPES:
        raise ValueError(f"frozen_weights must be one of {list(DTYPES)}, got '{name}'")
    if name != "fp32" and unfreeze_model:
        raise ValueError(f"frozen_weights={name} stores frozen weights; unfreeze_model trains them")


class UpcastBuffer:
    """A reusable scratch tensor that stored weights are upcast into, one layer at a time.

    `upcast(w, dtype)` returns a view of the buffer holding `w` in `dtype`; it is valid until the next call, so
    a caller uses it at once (every caller below does, within one kernel call). The buffer grows to the
    largest weight and follows the weight's device; on CUDA, stream order keeps reuse safe.
    """

    def __init__(self):
        self._data: torch.Tensor | None = None

    def upcast(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if weight.dtype == dtype:
            return weight
        data, n = self._data, weight.numel()
        if data is None or data.numel() < n or data.dtype != dtype or data.device != weight.device:
            data = self._data = torch.empty(n, dtype=dtype, device=weight.device)
        nhwc = weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
        if nhwc and not weight.is_contiguous():  # a channels-last weight stays channels-last
            k, c, h, w = weight.shape
            return data[:n].view(k, h, w, c).permute(0, 3, 1, 2).copy_(weight)
        return data[:n].view(weight.shape).copy_(weight)


def _compute_weight(buffer: UpcastBuffer | None, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight a call computes with: upcast into `buffer`, or as it is when it is stored in float32."""
    return weight if buffer is None else buffer.upcast(weight, dtype)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, buffer, small, block):
        ctx.save_for_backward(weight)
        ctx.buffer, ctx.small = buffer, small
        b = None if bias is None else bias.to(x.dtype)
        if block:
            return small_gemm.linear_blocks(x, weight, b, block, lambda w: _compute_weight(buffer, w, x.dtype))
        w = _compute_weight(buffer, weight, x.dtype)
        return small_gemm.linear(x, w, b) if small else F.linear(x, w, b)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        w = _compute_weight(ctx.buffer, weight, grad.dtype)
        return small_gemm.linear_input_grad(grad, w) if ctx.small else grad @ w, None, None, None, None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, buffer, small, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.buffer, ctx.small = buffer, small
        ctx.conf = (x.shape, small_gemm.memory_format_of(x), stride, padding, dilation, groups)
        w = _compute_weight(buffer, weight, x.dtype)
        b = None if bias is None else bias.to(x.dtype)
        if small:
            return small_gemm.conv2d(x, w, b, stride, padding)
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, memory_format, stride, padding, dilation, groups = ctx.conf
        w = _compute_weight(ctx.buffer, weight, grad.dtype)
        if ctx.small:
            grad_x = small_gemm.conv2d_input_grad(grad, w, shape, stride, padding, memory_format)
        else:
            grad_x = torch.nn.grad.conv2d_input(shape, w, grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None, None, None


def _frozen(module: nn.Module) -> bool:
    bias = getattr(module, "bias", None)
    return not module.weight.requires_grad and (bias is None or not bias.requires_grad)


class StoredLinear(nn.Linear):
    """A Linear whose frozen weight is stored in 16 bits (`upcast_buffer`) and/or whose small calls run as
    `W @ X^T` (`small_gemm`, see ldm/modules/small_gemm.py). A float32 weight that requires grad, an input
    of another dtype, off the CPU or under autocast, takes PyTorch's own path."""

    upcast_buffer: UpcastBuffer | None = None  # None: the weight is float32
    small_gemm: SmallGemm | None = None

    def forward(self, x):
        stored, rule = self.upcast_buffer is not None, self.small_gemm
        ours = (rule is not None and small_gemm.eligible(x)
                and (stored or (x.dtype == self.weight.dtype and _frozen(self))))
        rows = x.numel() // x.shape[-1]
        small = ours and rule.linear(rows, self.weight)
        block = rule.wide_block if ours and not small and rule.wide(rows, self.weight) else 0
        if not stored and not small and not block:
            return F.linear(x, self.weight, self.bias)
        return _Linear.apply(x, self.weight, self.bias, self.upcast_buffer, small, block)


class StoredConv2d(nn.Conv2d):
    """The Conv2d counterpart of `StoredLinear`; the small path takes one-group, undilated convolutions of
    a batched input."""

    upcast_buffer: UpcastBuffer | None = None
    small_gemm: SmallGemm | None = None

    def _small(self, x) -> bool:
        if self.small_gemm is None or not small_gemm.eligible(x) or x.dim() != 4 or self.groups != 1:
            return False
        if tuple(self.dilation) != (1, 1):
            return False
        if self.upcast_buffer is None and (x.dtype != self.weight.dtype or not _frozen(self)):
            return False
        ho, wo = small_gemm.conv_output_size(x.shape[2:], self.kernel_size, self.stride, self.padding)
        return self.small_gemm.conv(x.shape[0] * ho * wo, self.weight)

    def forward(self, x):
        small = self._small(x)
        if self.upcast_buffer is None and not small:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return _Conv2d.apply(x, self.weight, self.bias, self.upcast_buffer, small, self.stride, self.padding,
                             self.dilation, self.groups)


class StoredEmbedding(nn.Embedding):
    def forward(self, ids):
        return F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse).float()


_STORED = {nn.Linear: StoredLinear, nn.Conv2d: StoredConv2d, nn.Embedding: StoredEmbedding}


def _convertible(module: nn.Module) -> bool:
    """A plain Linear/Conv2d/Embedding whose weight (and bias) are frozen and whose call we can reproduce."""
    return type(module) in _STORED and _frozen(module) and _reproducible(module)


def _reproducible(module: nn.Module) -> bool:
    """A Linear/Conv2d/Embedding whose call the stored classes reproduce."""
    if isinstance(module, nn.Conv2d):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if isinstance(module, nn.Embedding):
        return module.max_norm is None  # max_norm renormalises the weight in place
    return True


@torch.no_grad()
def store_frozen_weights(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the frozen Linear/Conv2d/Embedding weights (and biases) of `model` in `dtype`; returns the number
    of modules converted. State-dict keys are unchanged. float32 is a no-op."""
    if dtype == torch.float32:
        return 0
    converted, buffer = 0, UpcastBuffer()
    for module in model.modules():
        if not _convertible(module):
            continue
        module.__class__ = _STORED[type(module)]
        module.upcast_buffer = buffer
        module.weight.data = module.weight.data.to(dtype)
        if getattr(module, "bias", None) is not None:
            module.bias.data = module.bias.data.to(dtype)
        converted += 1
    return converted


def use_small_gemm(model: nn.Module, rule: SmallGemm | None = None) -> int:
    """Run `model`'s frozen Linear and Conv2d calls that `rule` (default `SmallGemm()`) picks as `W @ X^T`
    (ldm/modules/small_gemm.py), whatever their storage; returns the number of layers that may. Which calls
    qualify is decided per call, so a layer that is unfrozen later takes PyTorch's path again."""
    rule, count = rule or SmallGemm(), 0
    for module in model.modules():
        if type(module) in (nn.Linear, nn.Conv2d) and _reproducible(module):
            module.__class__ = _STORED[type(module)]
        if isinstance(module, (StoredLinear, StoredConv2d)):
            module.small_gemm = rule
            count += 1
    return count
