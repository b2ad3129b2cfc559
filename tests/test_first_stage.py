"""First stage: AutoencoderKL parity with the reference, official key layout, VQ interface smoke tests."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import fixture_path, parity_weights
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage, VQModel, VQModelInterface
from ldm.modules.distributions.distributions import normal_kl
from ldm.modules.vqvae.quantize import VectorQuantizer2

PREFIX = "first_stage_model."
SCALE_FACTOR = 0.18215


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, diffs: dict | None = None) -> None:
    """max|a-b| <= 1e-4 * max|ref| + 1e-5 (the parity README's tolerance for fp32 forwards)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    if diffs is not None:
        diffs[name] = diff
    bound = 1e-4 * expected.abs().max().item() + 1e-5
    assert diff <= bound, f"{name}: max|a-b| = {diff:.3g} > {bound:.3g}"


@pytest.fixture(scope="module", params=["ldm_tiny", "sd_tiny"])
def tiny_first_stage(request):
    """(AutoencoderKL with the reference weights, the first-stage fixture tensors)."""
    name = request.param
    cfg = OmegaConf.load(fixture_path("parity", name, "config.yaml"))
    model = AutoencoderKL(**cfg.model.params.first_stage_config.params)
    full = load_file(parity_weights(name))
    sd = {k[len(PREFIX) :]: v for k, v in full.items() if k.startswith(PREFIX)}
    model.load_state_dict(sd, strict=True)
    model.eval()
    return model, load_file(fixture_path("parity", name, "first_stage.safetensors"))


@torch.no_grad()
def test_first_stage_parity(tiny_first_stage):
    model, ref = tiny_first_stage
    diffs: dict[str, float] = {}

    assert_close(model.quant_conv(model.encoder(ref["image"])), ref["moments"], "moments", diffs)
    posterior = model.encode(ref["image"])
    for name in ("mean", "logvar", "std", "var"):
        assert_close(getattr(posterior, name), ref[name], name, diffs)
    assert_close(posterior.mode(), ref["mode"], "mode", diffs)

    sample = posterior.sample(noise=ref["noise"])
    assert_close(sample, ref["sample"], "sample", diffs)
    assert_close(model.decode(sample), ref["decode_sample"], "decode_sample", diffs)
    # decode_first_stage multiplies by the reciprocal of the scale factor (not a division), as the reference.
    assert_close(
        model.decode((1.0 / SCALE_FACTOR) * ref["z_scaled"]),
        ref["decode_first_stage_z_scaled"],
        "decode_first_stage_z_scaled",
        diffs,
    )
    assert_close(
        model.decode((1.0 / SCALE_FACTOR) * ref["z_random"]),
        ref["decode_first_stage_z_random"],
        "decode_first_stage_z_random",
        diffs,
    )
    print("max abs diffs:", {k: f"{v:.2e}" for k, v in diffs.items()})


@torch.no_grad()
def test_posterior_sample_uses_cpu_rng_like_reference(tiny_first_stage):
    """The default draw is torch.randn(mean.shape) on the global CPU generator: seed 203 gives the fixture."""
    model, ref = tiny_first_stage
    posterior = model.encode(ref["image"])
    torch.manual_seed(203)
    sample = posterior.sample()
    assert_close(sample, ref["sample"], "sample (seed 203)")
    # An explicit CPU generator with the same seed draws the same stream.
    generator = torch.Generator().manual_seed(203)
    assert_close(posterior.sample(generator=generator), ref["sample"], "sample (generator)")


@torch.no_grad()
def test_get_input_forward_and_kl(tiny_first_stage):
    model, ref = tiny_first_stage
    batch = {"image": ref["image"].permute(0, 2, 3, 1).double()}  # datasets emit HWC
    x = model.get_input(batch, model.image_key)
    assert x.dtype == torch.float32 and x.is_contiguous() and torch.equal(x, ref["image"])
    reconstruction, posterior = model(x, sample_posterior=False)
    assert_close(reconstruction, model.decode(ref["mode"]), "forward(sample_posterior=False)")
    kl = posterior.kl()
    assert kl.shape == (2,)
    assert torch.allclose(kl, normal_kl(posterior.mean, posterior.logvar, 0.0, 0.0).sum(dim=[1, 2, 3]))
    assert torch.allclose(
        posterior.nll(posterior.mean), 0.5 * (math.log(2 * math.pi) + posterior.logvar).sum([1, 2, 3])
    )


FULL_FIRST_STAGE = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
    "lossconfig": {"target": "torch.nn.Identity"},
}


@pytest.mark.parametrize("manifest", ["ldm_txt2img_1p4B", "sd_v1"])
def test_full_first_stage_keys_match_official(manifest):
    entries = json.loads(fixture_path("manifests", f"{manifest}.json").read_text())["keys"]
    expected = {
        k[len(PREFIX) :]: (tuple(v["shape"]), v["dtype"]) for k, v in entries.items() if k.startswith(PREFIX)
    }
    with torch.device("meta"):
        model = AutoencoderKL(**FULL_FIRST_STAGE)
    actual = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert sorted(set(actual) - set(expected)) == [], "keys not in the official checkpoint"
    assert sorted(set(expected) - set(actual)) == [], "official keys missing"
    mismatched = {k: (actual[k], expected[k]) for k in actual if actual[k] != expected[k]}
    assert mismatched == {}


TINY_DDCONFIG = {
    "double_z": False,
    "z_channels": 3,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
}


@torch.no_grad()
def test_vq_model_interface_round_trip_shapes():
    model = VQModelInterface(
        embed_dim=3, ddconfig=TINY_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, n_embed=16
    ).eval()
    assert model.quantize.embedding.weight.shape == (16, 3)
    assert "encoder.down.1.attn.0.q.weight" in model.state_dict()  # attention at resolution 8
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    h = model.encode(x)
    assert h.shape == (2, 3, 8, 8)
    assert model.decode(h).shape == x.shape
    assert model.decode(h, force_not_quantize=True).shape == x.shape
    quant, loss, (_, _, indices) = VQModel.encode(model, x)  # the parent's encode quantises
    assert quant.shape == h.shape and loss.ndim == 0 and indices.shape == (2 * 8 * 8,)


def test_quantizer_picks_nearest_code_and_passes_gradient_straight_through():
    vq = VectorQuantizer2(n_e=3, e_dim=2, beta=0.25, sane_index_shape=True)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    # One image, 2x2 positions, channels first: vectors (0.9, 0.1), (0.1, 0.8), (-0.2, 0.1), (0.6, 0.55).
    z = torch.tensor([[0.9, 0.1, -0.2, 0.6], [0.1, 0.8, 0.1, 0.55]]).reshape(1, 2, 2, 2).requires_grad_()
    z_q, loss, (_, _, indices) = vq(z)
    assert indices.tolist() == [[[1, 2], [0, 1]]]
    codebook = vq.embedding.weight.detach()
    assert torch.equal(z_q.detach(), codebook[indices].permute(0, 3, 1, 2))
    expected_loss = (1 + 0.25) * torch.mean((z_q.detach() - z.detach()) ** 2)
    assert torch.allclose(loss, expected_loss)
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through estimator


def test_ckpt_path_loads_official_checkpoint_layout(tmp_path):
    """`ckpt_path` goes through ldm.checkpoint; a Lightning-style {"state_dict": ...} file round-trips."""
    pytest.importorskip("ldm.checkpoint")
    config = OmegaConf.load(fixture_path("parity", "ldm_tiny", "config.yaml"))
    cfg = config.model.params.first_stage_config.params
    source = AutoencoderKL(**cfg)
    path = tmp_path / "first_stage.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = AutoencoderKL(**{**cfg, "ckpt_path": str(path)})
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_identity_first_stage():
    x = torch.randn(1, 3, 4, 4)
    assert IdentityFirstStage().encode(x) is x
    quant, loss, info = IdentityFirstStage(vq_interface=True).quantize(x)
    assert quant is x and loss is None and info == [None, None, None]
