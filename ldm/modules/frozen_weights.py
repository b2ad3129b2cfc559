"""Frozen weights stored in bfloat16, computed in float32: half the memory of the frozen model.

Textual inversion trains a few vectors against a frozen model whose fp32 weights alone (6.2 GB for LDM 1.4B)
are most of a training step's peak memory. `store_frozen_weights(model, torch.bfloat16)` keeps every frozen
Linear, Conv2d and Embedding weight in bfloat16 and upcasts it to float32 inside each call, so all
arithmetic stays float32; the only change is that the weights are rounded to bfloat16 (8-bit mantissa).
The autograd functions below save the bfloat16 tensor for backward and upcast it again there, so no float32
copy of a weight outlives its layer. Gradients flow to the layer inputs (and so to the embedding) only;
frozen weights get none. Parameters that require grad are left untouched. Opt-in (`main.py --frozen_weights
bf16`): the faithful path keeps float32 weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_frozen_weights(name: str, unfreeze_model: bool = False) -> None:
    """The model option `frozen_weights`: one of DTYPES, and only for a model whose weights stay frozen."""
    if name not in DTYPES:
        raise ValueError(f"frozen_weights must be one of {list(DTYPES)}, got '{name}'")
    if name != "fp32" and unfreeze_model:
        raise ValueError(f"frozen_weights={name} stores frozen weights; unfreeze_model trains them")


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride, padding,
                        dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        weight = weight.to(grad.dtype)
        grad_x = torch.nn.grad.conv2d_input(shape, weight, grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None


class StoredLinear(nn.Linear):
    def forward(self, x):
        return _Linear.apply(x, self.weight, self.bias)


class StoredConv2d(nn.Conv2d):
    def forward(self, x):
        return _Conv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


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
    converted = 0
    for module in model.modules():
        if not _convertible(module):
            continue
        module.__class__ = _STORED[type(module)]
        module.weight.data = module.weight.data.to(dtype)
        if getattr(module, "bias", None) is not None:
            module.bias.data = module.bias.data.to(dtype)
        converted += 1
    return converted
