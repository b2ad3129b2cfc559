"""Ancestral DDPM sampling (Ho et al. 2020, algorithm 2): `p_mean_variance`, `p_sample`, `p_sample_loop`,
`sample` and `sample_log(ddim=False)` of latent-diffusion@5a6571e, checked against a loop written here from
the formulas and the registered schedule buffers.

The tiny ldm model (tests/fixtures/parity/ldm_tiny) is built with `timesteps: 20` (its weights do not
depend on the schedule; the 1000-step schedule buffers of the checkpoint are ignored), so a full chain is
20 UNet calls instead of 1000."""

import pytest
import torch
from conftest import parity_config, parity_weights
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.models.diffusion.ddpm import DDPM
from ldm.models.diffusion.ddpm_schedule import SCHEDULE_BUFFERS
from ldm.util import instantiate_from_config

T = 20
SHAPE = (2, 4, 8, 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sd = load_file(str(parity_weights("ldm_tiny")))
    ckpt = tmp_path_factory.mktemp("ldm_tiny") / "base.ckpt"
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("embedding_manager.")}}, ckpt)
    cfg = parity_config("ldm_tiny")
    cfg.model.params.update(timesteps=T, ckpt_path=str(ckpt), ignore_keys=list(SCHEDULE_BUFFERS))
    model = instantiate_from_config(cfg.model).eval()
    assert model.num_timesteps == T and model.betas.shape == (T,)
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a photo of *", "a sculpture of *"])
        uncond = model.get_learned_conditioning(["", ""])
    return model, cond, uncond


def buf(model, name, t):
    return getattr(model, name)[t].view(-1, 1, 1, 1)


def x0_by_hand(model, x, t, out):
    """x0 from the network output, straight from the definitions."""
    if model.parameterization == "eps":
        return (buf(model, "sqrt_recip_alphas_cumprod", t) * x
                - buf(model, "sqrt_recipm1_alphas_cumprod", t) * out)
    if model.parameterization == "x0":
        return out
    return buf(model, "sqrt_alphas_cumprod", t) * x - buf(model, "sqrt_one_minus_alphas_cumprod", t) * out


@torch.no_grad()
def loop_by_hand(model, cond, shape, steps, randn, clip=False, log_every_t=None):
    """x_T ~ N(0, I); for t = steps-1..0: x_{t-1} = mu(x_t, x0) + [t > 0] sigma_t z (one draw per step)."""
    x = randn(shape)
    inter = [x]
    for i in reversed(range(steps)):
        t = torch.full((shape[0],), i, dtype=torch.long)
        out = model.apply_model(x, t, cond) if cond is not None else model.model(x, t)
        x0 = x0_by_hand(model, x, t, out)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        mean = buf(model, "posterior_mean_coef1", t) * x0 + buf(model, "posterior_mean_coef2", t) * x
        sigma = (0.5 * buf(model, "posterior_log_variance_clipped", t)).exp()
        z = randn(shape)
        x = mean + torch.full_like(sigma, float(i > 0)) * sigma * z
        if log_every_t and (i % log_every_t == 0 or i == steps - 1):
            inter.append(x)
    return x, inter


def seeded(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=g)


@pytest.fixture(scope="module")
def eps_chain(tiny):
    """(ours with a seeded generator, intermediates) for seed 7."""
    model, cond, _ = tiny
    return model.p_sample_loop(cond, SHAPE, return_intermediates=True, verbose=False, log_every_t=5,
                               generator=torch.Generator().manual_seed(7))


def test_p_sample_loop_equals_the_formulas(tiny, eps_chain):
    """eps model, 20 steps, generator-driven: bit for bit the hand-written loop, intermediates included."""
    model, cond, _ = tiny
    samples, inter = eps_chain
    ref, ref_inter = loop_by_hand(model, cond, SHAPE, T, seeded(7), log_every_t=5)
    assert len(inter) == len(ref_inter) == 6  # x_T, t = 19, 15, 10, 5, 0
    for a, b in zip(inter, ref_inter, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(samples, ref) and torch.isfinite(samples).all()


def test_p_sample_takes_explicit_noise_and_adds_none_at_t0(tiny):
    model, cond, _ = tiny
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for step in (T - 1, 7, 0):
        t = torch.full((2,), step, dtype=torch.long)
        mean, var, log_var = model.p_mean_variance(x, cond, t, clip_denoised=False)
        ours = model.p_sample(x, cond, t, noise=z)
        assert torch.equal(ours, mean + float(step > 0) * (0.5 * log_var).exp() * z)
        assert torch.equal(var, buf(model, "posterior_variance", t).expand_as(var))
    assert torch.equal(model.p_sample(x, cond, torch.zeros(2, dtype=torch.long), noise=z), mean)


@pytest.mark.parametrize("parameterization", ["v", "x0"])
def test_v_and_x0_outputs_follow_their_formulas(tiny, monkeypatch, parameterization):
    """The same network read as a v (or x0) model: 6 ancestral steps (`timesteps=6`) match the hand loop;
    x0 also with clip_denoised (clamped to [-1, 1])."""
    model, cond, _ = tiny
    monkeypatch.setattr(model, "parameterization", parameterization)
    clip = parameterization == "x0"
    monkeypatch.setattr(model, "clip_denoised", clip)
    ours = model.p_sample_loop(cond, SHAPE, timesteps=6, verbose=False,
                               generator=torch.Generator().manual_seed(3))
    ref, _ = loop_by_hand(model, cond, SHAPE, 6, seeded(3), clip=clip)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_guidance_mixes_the_outputs_before_the_posterior(tiny):
    """Not in the reference's ancestral path (docs/DIFFERENCES.md#ddpm-ancestral-sampler): out_u +
    s (out_c - out_u), then the usual posterior; scale 1 is the plain call."""
    model, cond, uncond = tiny
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    t = torch.full((2,), 11, dtype=torch.long)
    with torch.no_grad():
        out_c, out_u = model.apply_model(x, t, cond), model.apply_model(x, t, uncond)
    mixed = out_u + 5.0 * (out_c - out_u)
    ref = model.q_posterior(x0_by_hand(model, x, t, mixed), x, t)[0]
    ours = model.p_mean_variance(x, cond, t, clip_denoised=False, unconditional_guidance_scale=5.0,
                                 unconditional_conditioning=uncond)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)  # one batched call vs two
    plain = model.p_mean_variance(x, cond, t, clip_denoised=False, unconditional_guidance_scale=1.0,
                                  unconditional_conditioning=uncond)[0]
    assert torch.equal(plain, model.q_posterior(x0_by_hand(model, x, t, out_c), x, t)[0])


def test_sample_log_without_ddim_is_the_ancestral_chain_from_the_global_rng(tiny, eps_chain):
    """End to end: sample_log(ddim=False), drawing from the global RNG by default (x_T, then one draw per
    step, as the reference), is the generator-driven chain for the same seed. eta and ddim_steps are DDIM
    settings, ignored there as in the reference."""
    model, cond, _ = tiny
    torch.manual_seed(7)
    samples, inter = model.sample_log(cond, 2, ddim=False, ddim_steps=50, eta=1.0, verbose=False)
    assert isinstance(inter, list) and len(inter) == 3  # x_T, t = 19 (first step) and t = 0 (log_every_t 200)
    assert torch.equal(samples, eps_chain[0])


def test_log_images_samples_ancestrally_without_ddim_steps(tiny, monkeypatch):
    """ddim_steps=None (the reference's switch) routes both preview rows to the ancestral sampler; the
    chains are cut to 2 steps here to keep the test short."""
    model, _, _ = tiny
    calls, sample_log = [], model.sample_log

    def short_sample_log(cond, batch_size, ddim=True, ddim_steps=200, **kwargs):
        calls.append((ddim, "unconditional_conditioning" in kwargs))
        return sample_log(cond, batch_size, ddim=ddim, ddim_steps=ddim_steps, timesteps=2, verbose=False,
                          **kwargs)

    monkeypatch.setattr(model, "sample_log", short_sample_log)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand((1, 64, 64, 3), generator=g) * 2 - 1, "caption": ["a photo of *"]}
    log = model.log_images(batch, N=1, ddim_steps=None)
    assert calls == [(False, False), (False, True)]
    assert log["samples"].shape == log["samples_scaled"].shape == (1, 3, 64, 64)
    assert torch.isfinite(log["samples"]).all() and torch.isfinite(log["samples_scaled"]).all()
    calls.clear()
    model.log_images(batch, N=1, ddim_steps=3, ddim=False, sample=True)
    assert calls == [(False, False), (False, True)]


def test_pixel_ddpm_sampler_equals_the_formulas():
    """Pixel-space DDPM (x = model(x, t), clip_denoised on by default): 10 steps against the hand loop."""
    unet = OmegaConf.create({"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": dict(
        image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[],
        num_res_blocks=1, channel_mult=[1], num_heads=2, legacy=False)})
    torch.manual_seed(0)
    model = DDPM(unet, timesteps=10, image_size=8, channels=3, use_ema=False, log_every_t=4).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.parameters():  # the UNet's output conv starts at zero
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    assert model.clip_denoised
    samples, inter = model.sample(batch_size=2, return_intermediates=True, verbose=False,
                                  generator=torch.Generator().manual_seed(5))
    ref, ref_inter = loop_by_hand(model, None, (2, 3, 8, 8), 10, seeded(5), clip=True, log_every_t=4)
    assert len(inter) == len(ref_inter) == 5  # x_T, t = 9, 8, 4, 0
    assert torch.equal(samples, ref)
