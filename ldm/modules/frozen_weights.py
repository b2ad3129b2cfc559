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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, buffer):
        ctx.save_for_backward(weight)
        ctx.buffer = buffer
        return F.linear(x, buffer.upcast(weight, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ ctx.buffer.upcast(weight, grad.dtype), None, None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, buffer, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.buffer = buffer
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, buffer.upcast(weight, x.dtype), None if bias is None else bias.to(x.dtype), stride,
                        padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        weight = ctx.buffer.upcast(weight, grad.dtype)
        grad_x = torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None, None


class StoredLinear(nn.Linear):
    upcast_buffer: UpcastBuffer

    def forward(self, x):
        return _Linear.apply(x, self.weight, self.bias, self.upcast_buffer)


class StoredConv2d(nn.Conv2d):
    upcast_buffer: UpcastBuffer

    def forward(self, x):
        return _Conv2d.apply(x, self.weight, self.bias, self.upcast_buffer, self.stride, self.padding,
                             self.dilation, self.groups)


class StoredEmbedding(nn.Embedding):
    def forward(self, ids):
        return F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse).float()


_STORED = {nn.Linear: StoredLinear, nn.Conv2d: StoredConv2d, nn.Embedding: StoredEmbedding}


def _convertible(module: nn.Module) -> bool:
    """A plain Linear/Conv2d/Embedding whose weight (and bias) are frozen and whose call we can reproduce."""
    if type(module) not in _STORED or module.weight.requires_grad:
        return False
    if getattr(module, "bias", None) is not None and module.bias.requires_grad:
        return False
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
