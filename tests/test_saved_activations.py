"""Activations saved for backward stored in 16 bits (ldm/modules/saved_activations.py; part of --lean)."""

import contextlib

import pytest
import torch
from test_optimizations import case, step, with_options  # noqa: F401  (case is a fixture)

from ldm.modules.saved_activations import _Stored, saved_activations


def test_forward_is_exact_and_the_gradient_rounded(case):  # noqa: F811
    """fp16 storage (every size, so the tiny model's activations count): the loss is bitwise the fp32 one,
    the embedding's gradient differs by the fp16 rounding of the activations and no more."""
    model, batch, f, _ = case
    ref_loss, ref_grad = step(model, batch, f)
    with saved_activations(torch.float32, model):  # fp32: changes nothing
        loss, grad = step(model, batch, f)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    with saved_activations(torch.float16, model, min_bytes=0):
        loss, grad = step(model, batch, f)
    assert torch.equal(loss, ref_loss)
    scale = ref_grad.abs().max()
    assert not torch.equal(grad, ref_grad)  # the backward really used rounded activations
    assert (grad - ref_grad).abs().max() <= 2e-3 * scale, ((grad - ref_grad).abs().max() / scale).item()


def test_what_is_kept_exact():
    weight = torch.nn.Parameter(torch.randn(512, 512))
    hooks = saved_activations(torch.float16, torch.nn.ParameterList([weight]))
    pack, unpack = hooks.pack_hook, hooks.unpack_hook
    big = torch.randn(512, 1024)  # 2 MiB
    packed = pack(big)
    assert isinstance(packed, _Stored) and packed.value.dtype == torch.float16
    back = unpack(packed)
    assert back.dtype == torch.float32 and torch.allclose(back, big, rtol=2**-11, atol=1e-7)
    assert pack(torch.randn(64, 64)) is not None and not isinstance(pack(torch.randn(64, 64)), _Stored)  # small
    assert not isinstance(pack(weight), _Stored)  # a parameter: copying it would add memory
    assert not isinstance(pack(torch.randn(512, 1024, requires_grad=True)), _Stored)  # a trained leaf
    assert not isinstance(pack(big * 1e5), _Stored)  # outside float16's range
    assert not isinstance(pack(big.double()), _Stored)  # not float32
    assert unpack(big) is big


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_the_model_option_sets_the_training_step_scope(case, name):  # noqa: F811
    model, _, _, case_name = case
    built = with_options(model, case_name, saved_activations=name)
    scope = built.saved_activations_scope()
    assert isinstance(scope, contextlib.nullcontext) == (name == "fp32")
    with pytest.raises(ValueError, match="saved_activations"):
        with_options(model, case_name, saved_activations="int8")
