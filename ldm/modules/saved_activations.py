"""Activations saved for backward, stored in 16 bits: the low-memory preset's other half.

Between a training step's forward and its backward, autograd keeps the activations that the backward
formulas need. With the frozen weights in fp16 (ldm/modules/frozen_weights.py) they are most of what a
textual inversion step adds to the weights: 392 MB for LDM 1.4B at 256 px and batch 1, 92 MB of it in the
BERT encoder. `saved_activations(torch.float16)` is a context for the forward pass: every float32 tensor
of at least `min_bytes` that autograd saves is kept as a float16 copy and turned back into float32 when the
backward needs it. The forward is unchanged (bitwise); the backward computes from activations rounded to
fp16 (relative error <= 2**-11), so the gradient that reaches the embedding differs at that level.

Kept exact: tensors below `min_bytes` (normalisation statistics, attention log-sum-exps), anything that is
not float32, parameters (saving a copy of a weight would add memory, not save it), and any tensor with a
value outside float16's range. Opt-in (`model.params.saved_activations`, `main.py --saved_activations`,
part of `--lean`); the faithful path keeps float32.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ldm.modules.frozen_weights import DTYPES  # the same names for both storage options

MIN_BYTES = 1 << 20
FP16_MAX = 65504.0


def check_saved_activations(name: str) -> None:
    """The model option `saved_activations`: one of DTYPES."""
    if name not in DTYPES:
        raise ValueError(f"saved_activations must be one of {list(DTYPES)}, got '{name}'")


class _Stored:
    """A saved activation kept in 16 bits."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor):
        self.value = value


def saved_activations(dtype: torch.dtype, model: nn.Module | None = None, min_bytes: int = MIN_BYTES):
    """A context in which autograd stores the float32 activations it saves in `dtype` (see the module
    docstring); `model`'s parameters are never converted. float32 gives a context that changes nothing."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
    limit = FP16_MAX if dtype == torch.float16 else float("inf")

    def pack(t: torch.Tensor):
        if (t.dtype != torch.float32 or t.numel() * 4 < min_bytes or t.untyped_storage().data_ptr() in params
                or (t.requires_grad and t.is_leaf)):
            return t
        if limit != float("inf"):
            low, high = torch.aminmax(t.detach())
            if not (-limit < float(low) and float(high) < limit):
                return t
        return _Stored(t.detach().to(dtype))

    def unpack(packed):
        return packed.value.float() if isinstance(packed, _Stored) else packed

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
