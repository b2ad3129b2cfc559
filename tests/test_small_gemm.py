"""Frozen layers on few positions as `W @ X^T` (ldm/modules/small_gemm.py; `model.params.small_gemm`)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from test_optimizations import case, step, with_options  # noqa: F401  (case is a fixture)
from torch import nn

from ldm.modules import small_gemm
from ldm.modules.frozen_weights import StoredConv2d, StoredLinear, store_frozen_weights, use_small_gemm
from ldm.modules.saved_activations import saved_activations
from ldm.modules.small_gemm import SmallGemm

EVERY_CALL = SmallGemm(max_rows=10**9, min_linear_weight=0, max_conv_positions=10**9, min_conv_weight=0)
EVERY_WIDE = SmallGemm(max_rows=0, max_conv_positions=0, max_wide_rows=10**9, min_wide_features=1, wide_block=3)


def forward_backward(layer, x, grad):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    return y.detach(), x.grad


CONVS = [  # (in, out, kernel, stride, padding, bias), input shape
    ((8, 6, 3, 1, 1, True), (2, 8, 5, 5)),
    ((8, 6, 3, 2, 1, True), (2, 8, 5, 6)),  # a downsampling conv; one input column outside every window
    ((8, 6, 1, 1, 0, True), (1, 8, 4, 4)),
    ((8, 6, 3, 1, 0, False), (1, 8, 6, 6)),
    ((8, 6, (1, 3), 1, (0, 1), True), (1, 8, 3, 5)),
]


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("spec,shape", CONVS)
def test_conv_kernel_matches_pytorch(spec, shape, nhwc):
    """Forward, gradient to the input and the output's memory format, against F.conv2d's."""
    cin, cout, k, s, p, bias = spec
    torch.manual_seed(0)
    native = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=bias).requires_grad_(False)
    gemm = copy.deepcopy(native)
    assert use_small_gemm(gemm, EVERY_CALL) == 1 and isinstance(gemm, StoredConv2d)
    x = torch.randn(shape)
    if nhwc:
        x, native, gemm = (t.to(memory_format=torch.channels_last) for t in (x, native, gemm))
    y_ref = native(x)
    grad = torch.randn_like(y_ref)
    y_ref, gx_ref = forward_backward(native, x, grad)
    y, gx = forward_backward(gemm, x, grad)
    assert_close(y, y_ref, rtol=1e-5, atol=1e-6, what="output")
    assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6, what="input gradient")
    layout = torch.channels_last if nhwc else torch.contiguous_format
    assert y.is_contiguous(memory_format=layout) and gx.is_contiguous(memory_format=layout)


def test_linear_kernel_matches_pytorch():
    torch.manual_seed(0)
    native = nn.Linear(12, 7).requires_grad_(False)
    gemm = copy.deepcopy(native)
    use_small_gemm(gemm, EVERY_CALL)
    x, grad = torch.randn(2, 5, 12), torch.randn(2, 5, 7)
    y_ref, gx_ref = forward_backward(native, x, grad)
    y, gx = forward_backward(gemm, x, grad)
    assert y.shape == y_ref.shape and gx.shape == gx_ref.shape and y.is_contiguous()
    assert_close(y, y_ref, rtol=1e-5, atol=1e-6, what="output")
    assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6, what="input gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16-stored"])
def test_wide_linear_in_blocks_matches_pytorch(dtype, monkeypatch):
    """Output features in blocks of 3 (the last one short), each block of a 16-bit weight upcast on its own:
    the same output and input gradient as the layer without the rule."""
    torch.manual_seed(0)
    native = nn.Linear(12, 10).requires_grad_(False)
    store_frozen_weights(native, dtype)
    wide = copy.deepcopy(native)
    use_small_gemm(wide, EVERY_WIDE)
    calls = []
    original = small_gemm.linear_blocks
    monkeypatch.setattr(small_gemm, "linear_blocks", lambda *a: calls.append(a) or original(*a))
    x, grad = torch.randn(2, 5, 12), torch.randn(2, 5, 10)
    y_ref, gx_ref = forward_backward(native, x, grad)
    y, gx = forward_backward(wide, x, grad)
    assert len(calls) == 1 and y.shape == y_ref.shape and y.is_contiguous()
    assert_close(y, y_ref, rtol=1e-5, atol=1e-6, what="output")
    assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6, what="input gradient")


def test_the_rule_picks_the_low_resolution_layers_of_ldm_1p4b():
    """The documented defaults on LDM 1.4B's shapes at 256 px: the 1280-channel convolutions at 8x8 and 4x4
    and the 16x16 ones of 1280 channels take the product; 320- and 640-channel maps and BERT's 77 tokens
    do not; BERT's feed-forward up-projection and the 16x16 transformers' run in blocks."""
    rule = SmallGemm()
    conv = lambda cout, cin, k=3: torch.empty(cout, cin, k, k)  # noqa: E731
    assert rule.conv(8 * 8, conv(1280, 1280)) and rule.conv(4 * 4, conv(1280, 2560))
    assert rule.conv(16 * 16, conv(1280, 1280)) and not rule.conv(32 * 32, conv(1280, 1280))
    assert not rule.conv(16 * 16, conv(640, 640)) and not rule.conv(32 * 32, conv(320, 320))
    assert rule.conv(8 * 8, conv(1280, 2560, 1)) and not rule.conv(16 * 16, conv(1280, 2560, 1))  # 1x1: rows
    assert rule.linear(64, torch.empty(10240, 1280)) and not rule.linear(77, torch.empty(5120, 1280))
    assert not rule.linear(16, torch.empty(320, 320))
    # in blocks: BERT's feed-forward up-projection (77 tokens) and the 16x16 transformers' (256 tokens)
    assert rule.wide(77, torch.empty(5120, 1280)) and rule.wide(256, torch.empty(5120, 640))
    assert not rule.wide(77, torch.empty(1280, 5120)) and not rule.wide(1024, torch.empty(2560, 320))


def test_a_trained_layer_takes_pytorchs_path(monkeypatch):
    """The small path computes no weight gradient, so a layer whose weight trains falls back to PyTorch's
    (same weight gradient); the decision is taken per call, so freezing the layer later turns it on.
    Under autocast the layer is PyTorch's too."""
    torch.manual_seed(0)
    layer, native = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    native.load_state_dict(layer.state_dict())
    use_small_gemm(layer, EVERY_CALL)
    calls = []
    original = small_gemm.conv2d
    monkeypatch.setattr(small_gemm, "conv2d", lambda *a: calls.append(a) or original(*a))
    x = torch.randn(1, 4, 3, 3)
    layer(x).sum().backward()
    native(x).sum().backward()
    assert not calls and torch.equal(layer.weight.grad, native.weight.grad)
    layer.requires_grad_(False)
    assert_close(layer(x), native(x), rtol=1e-5, atol=1e-6, what="frozen output")
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast picks the dtype: PyTorch's layer
        assert layer(x).dtype == torch.bfloat16
    assert len(calls) == 1


def test_a_saved_float32_weight_is_not_rounded_by_saved_activations():
    """The small path saves only the weight for backward; with 16-bit saved activations that weight (a
    parameter) stays float32, so the input gradient is bitwise the one without the hooks."""
    torch.manual_seed(0)
    layer = nn.Linear(1024, 512).requires_grad_(False)  # a 2 MiB weight, above saved_activations' size limit
    use_small_gemm(layer, EVERY_CALL)
    x, grad = torch.randn(4, 1024), torch.randn(4, 512)
    _, ref = forward_backward(layer, x, grad)
    with saved_activations(torch.float16, layer, min_bytes=0):
        _, gx = forward_backward(layer, x, grad)
    assert torch.equal(gx, ref)


def test_small_gemm_matches_on_the_tiny_models(case, monkeypatch):  # noqa: F811
    """Every frozen UNet layer of the tiny models on the small path (the defaults never pick their small
    weights), then every text-encoder linear layer in blocks too: same loss and embedding gradient within
    float tolerance, same state-dict keys; with 16-bit weights too."""
    model, batch, f, name = case
    ref_loss, ref_grad = step(model, batch, f)
    built = with_options(model, name, small_gemm=True)
    unet = built.model.diffusion_model
    layers = [m for m in unet.modules() if isinstance(m, (StoredLinear, StoredConv2d))]
    assert len(layers) > 20 and all(m.small_gemm == SmallGemm() for m in layers)
    assert not any(isinstance(m, (StoredLinear, StoredConv2d)) for m in model.modules())
    assert list(built.state_dict()) == list(model.state_dict())
    use_small_gemm(unet, EVERY_CALL)
    calls = []
    original = small_gemm.conv2d
    monkeypatch.setattr(small_gemm, "conv2d", lambda *a: calls.append(a) or original(*a))
    loss, grad = step(built, batch, f)
    assert len(calls) >= 10  # the small path really ran
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, what="loss")
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7, what="grad")
    encoder = [m for m in built.cond_stage_model.modules() if isinstance(m, StoredLinear)]
    assert encoder and all(m.small_gemm == SmallGemm() for m in encoder)  # the text encoder has the rule
    use_small_gemm(built.cond_stage_model, EVERY_WIDE)
    blocks = []
    original_blocks = small_gemm.linear_blocks
    monkeypatch.setattr(small_gemm, "linear_blocks", lambda *a: blocks.append(a) or original_blocks(*a))
    loss, grad = step(built, batch, f)
    assert len(blocks) >= 4  # the text encoder's linear layers ran in blocks
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, what="loss, text encoder in blocks")
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7, what="grad, text encoder in blocks")
    stored, both = copy.deepcopy(model), copy.deepcopy(model)
    store_frozen_weights(stored, torch.float16)
    store_frozen_weights(both, torch.float16)
    use_small_gemm(both.model.diffusion_model, EVERY_CALL)
    ref_loss, ref_grad = step(stored, batch, f)
    loss, grad = step(both, batch, f)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, what="loss, 16-bit weights")
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7, what="grad, 16-bit weights")


def test_conv_output_size_is_pytorchs():
    cases = [((5, 6), (3, 3), (2, 2), (1, 1)), ((8, 8), (1, 1), (1, 1), (0, 0)), ((7, 4), (3, 1), (1, 2), (0, 0))]
    for size, k, s, p in cases:
        out = F.conv2d(torch.zeros(1, 1, *size), torch.zeros(1, 1, *k), stride=s, padding=p)
        assert small_gemm.conv_output_size(size, k, s, p) == tuple(out.shape[2:])
