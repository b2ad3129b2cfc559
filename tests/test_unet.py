"""The denoiser: parity with the reference UNet, checkpointing, key layout of the full models, embeddings."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import fixture_path, parity_weights
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.modules.attention import CrossAttention
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding

PREFIX = "model.diffusion_model."


def max_abs_diff_ok(actual: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Assert max|a - b| <= rtol * max|ref| + atol (relative to the tensor's magnitude); return the max."""
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    diff = (actual.double() - ref.double()).abs().max().item()
    bound = rtol * ref.double().abs().max().item() + atol
    assert diff <= bound, f"max|a-b| = {diff:.3g} > {bound:.3g}"
    return diff


def tiny_unet(name: str, **options) -> UNetModel:
    """The reference tiny UNet of `parity/<name>` with its weights, in eval mode; `options` are UNet
    constructor options (`attention`, `gradient_checkpointing`)."""
    folder = fixture_path("parity", name)
    cfg = OmegaConf.load(folder / "config.yaml")
    unet = UNetModel(**cfg.model.params.unet_config.params, **options)
    full = load_file(str(parity_weights(name)))
    unet.load_state_dict({k[len(PREFIX):]: v for k, v in full.items() if k.startswith(PREFIX)}, strict=True)
    return unet.eval()


@pytest.mark.parametrize("name", ["ldm_tiny", "sd_tiny"])
def test_parity_with_reference(name):
    data = load_file(str(fixture_path("parity", name, "unet_forward.safetensors")))
    for backend in ("math", "sdpa"):
        unet = tiny_unet(name, attention=backend)
        assert {m.attention for m in unet.modules() if isinstance(m, CrossAttention)} == {backend}
        with torch.no_grad():
            out = unet(data["x"], data["t"], context=data["context"])
        diff = max_abs_diff_ok(out, data["out"])
        print(f"{name} [{backend}] max|out - ref| = {diff:.3g} (max|ref| = {data['out'].abs().max():.3g})")


def test_checkpointing_keeps_numerics():
    data = load_file(str(fixture_path("parity", "sd_tiny", "unet_forward.safetensors")))
    calls = []

    def run(enabled: bool):
        unet = tiny_unet("sd_tiny", gradient_checkpointing=enabled).requires_grad_(False)
        # Count calls into one ResBlock and one transformer block: recomputation in backward adds one
        # (pre-hooks: non-reentrant checkpointing may stop recomputing once it has every saved tensor it needs).
        unet.input_blocks[1][0].in_layers.register_forward_pre_hook(lambda *_: calls.append("res"))
        unet.input_blocks[1][1].transformer_blocks[0].ff.register_forward_pre_hook(lambda *_: calls.append("ff"))
        calls.clear()
        x = data["x"].clone().requires_grad_(True)
        context = data["context"].clone().requires_grad_(True)
        out = unet(x, data["t"], context=context)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), x.grad, context.grad

    plain = run(False)
    assert sorted(calls) == ["ff", "res"]
    checkpointed = run(True)
    assert sorted(calls) == ["ff", "ff", "res", "res"]
    for a, b in zip(plain, checkpointed, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def full_unet_params(context_dim: int) -> dict:
    return dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=context_dim, use_checkpoint=True, legacy=False,
    )


@pytest.mark.parametrize(("manifest", "context_dim"), [("ldm_txt2img_1p4B.json", 1280), ("sd_v1.json", 768)])
def test_full_size_key_layout(manifest, context_dim):
    keys = json.loads(fixture_path("manifests", manifest).read_text())["keys"]
    expected = {
        k[len(PREFIX):]: (tuple(v["shape"]), v["dtype"]) for k, v in keys.items() if k.startswith(PREFIX)
    }
    with torch.device("meta"):
        unet = UNetModel(**full_unet_params(context_dim))
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in unet.state_dict().items()}
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


def test_timestep_embedding_golden():
    emb = timestep_embedding(torch.tensor([0, 1]), 4)
    # half = 2: freqs = [exp(0), exp(-ln(1e4) / 2)] = [1, 0.01]; embedding = [cos(t f), sin(t f)]
    expected = torch.tensor([
        [1.0, 1.0, 0.0, 0.0],
        [math.cos(1.0), math.cos(0.01), math.sin(1.0), math.sin(0.01)],
    ])
    torch.testing.assert_close(emb, expected, atol=1e-7, rtol=0)
    odd = timestep_embedding(torch.tensor([1]), 5)
    assert odd.shape == (1, 5) and odd[0, -1] == 0
    torch.testing.assert_close(odd[:, :4], expected[1:])
    rep = timestep_embedding(torch.tensor([3, 7]), 3, repeat_only=True)
    assert rep.tolist() == [[3, 3, 3], [7, 7, 7]]


def test_attention_backends_agree_with_mask():
    torch.manual_seed(1)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1] = False  # fully masked row: uniform weights in both backends, not NaN
    outs = {}
    for backend in ("math", "sdpa"):
        torch.manual_seed(0)
        attn = CrossAttention(query_dim=16, context_dim=8, heads=2, dim_head=8, attention=backend).eval()
        with torch.no_grad():
            outs[backend] = attn(x, ctx, mask=mask)
    assert torch.isfinite(outs["math"]).all()
    torch.testing.assert_close(outs["sdpa"], outs["math"], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="math, sdpa"):
        CrossAttention(query_dim=16, attention="flash")


def test_constructor_validation():
    base = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
                num_res_blocks=1, channel_mult=[1, 2], num_heads=2)
    with pytest.raises(ValueError, match="context_dim"):
        UNetModel(**base, use_spatial_transformer=True)
    with pytest.raises(ValueError, match="use_spatial_transformer"):
        UNetModel(**base, context_dim=16)
    with pytest.raises(ValueError, match="num_heads or num_head_channels"):
        UNetModel(**{**base, "num_heads": -1})
    with pytest.raises(ValueError, match="context_dim must be an int"):
        UNetModel(**base, use_spatial_transformer=True, context_dim=OmegaConf.create([16, 16]))


def test_fp16_torso_runs_and_is_close():
    unet = tiny_unet("ldm_tiny")
    data = load_file(str(fixture_path("parity", "ldm_tiny", "unet_forward.safetensors")))
    unet.convert_to_fp16()
    assert unet.input_blocks[0][0].weight.dtype == torch.float16 and unet.out[2].weight.dtype == torch.float32
    with torch.no_grad():
        out = unet(data["x"], data["t"], context=data["context"])
    assert out.dtype == torch.float32
    max_abs_diff_ok(out, data["out"], rtol=2e-2, atol=1e-3)
    unet.convert_to_fp32()
    with torch.no_grad():
        out = unet(data["x"], data["t"], context=data["context"])
    max_abs_diff_ok(out, data["out"], rtol=1e-3)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_path_smoke(new_order):
    """The non-transformer options (AttentionBlock, scale-shift norm, resblock up/down, class labels) run."""
    torch.manual_seed(0)
    unet = UNetModel(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                     attention_resolutions=[2], channel_mult=[1, 2], num_classes=5, num_head_channels=16,
                     use_scale_shift_norm=True, resblock_updown=True,
                     use_new_attention_order=new_order).eval()
    assert unet.input_blocks[3][1].num_heads == 64 // 16
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 4])
    with torch.no_grad():
        out = unet(x, t, y=y)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="class-conditional"):
        unet(x, t)
