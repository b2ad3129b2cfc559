"""What the network predicts (`parameterization`: eps, x0, v): training targets, the samplers' conversion to
eps, the variational-bound weights, and loading old weights under a new noise schedule (`ignore_keys`).

The model is configs/toy/tiny-demo.yaml (random weights, no download)."""

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf

from ldm.checkpoint import load_state_dict_into
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm_schedule import SCHEDULE_BUFFERS, lvlb_weights
from ldm.models.diffusion.plms import PLMSSampler
from ldm.util import instantiate_from_config

CONFIG = REPO / "configs" / "toy" / "tiny-demo.yaml"


def build(parameterization="eps", seed=0, **params):
    cfg = OmegaConf.load(CONFIG)
    cfg.model.params.parameterization = parameterization
    cfg.model.params.update(params)
    torch.manual_seed(seed)
    return instantiate_from_config(cfg.model).eval()


def draw(shape=(3, 4, 4, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([150, 600, 999])
    return x0, noise, t


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_a_perfect_output_implies_the_true_noise(parameterization):
    model = build(parameterization)
    x0, noise, t = draw()
    target = model.training_target(x0, noise, t)
    expected = {"eps": noise, "x0": x0}.get(parameterization)
    if expected is not None:
        assert torch.equal(target, expected)
    eps = model.eps_from_output(model.q_sample(x0, t, noise), t, target)
    torch.testing.assert_close(eps, noise, rtol=1e-4, atol=1e-4)


def test_v_is_the_rotation_of_noise_and_latent():
    model = build("v")
    x0, noise, t = draw()
    v = model.get_v(x0, noise, t)
    a = model.alphas_cumprod[t].view(-1, 1, 1, 1).double()
    torch.testing.assert_close(v.double(), a.sqrt() * noise - (1 - a).sqrt() * x0, rtol=1e-6, atol=1e-6)
    x_t = model.q_sample(x0, t, noise).double()
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_the_loss_regresses_the_target(parameterization, monkeypatch):
    model = build(parameterization)
    x0, noise, t = draw()
    monkeypatch.setattr(model, "apply_model", lambda x, t, c: torch.zeros_like(x))
    cond = model.get_learned_conditioning(["a photo of a *"] * 3)
    _, logs = model.p_losses(x0, cond, t, noise=noise)
    target = noise if parameterization == "eps" else model.get_v(x0, noise, t)
    torch.testing.assert_close(logs["val/loss_simple"], target.pow(2).mean())


def test_v_lvlb_weights_are_the_eps_weights_times_abar():
    model = build("v")
    buffers = {n: getattr(model, n) for n in SCHEDULE_BUFFERS}
    eps_w = lvlb_weights(buffers, "eps")
    expected = eps_w * model.alphas_cumprod
    expected[0] = expected[1]
    torch.testing.assert_close(model.lvlb_weights, expected)


def test_unknown_parameterization_is_named():
    with pytest.raises(ValueError, match="mu"):
        build("mu")


@pytest.mark.parametrize("sampler_cls,eta", [(DDIMSampler, 0.0), (DDIMSampler, 1.0), (PLMSSampler, 0.0)])
def test_samplers_give_the_same_images_for_the_same_denoiser_in_any_parameterization(sampler_cls, eta, monkeypatch):
    """One eps denoiser, wrapped as an x0 and a v network: with guidance, every sampler's output agrees."""
    eps_model = build("eps")
    prompts, n = ["a photo of a *"] * 2, 2
    with torch.no_grad():
        cond, uncond = eps_model.get_learned_conditioning(prompts), eps_model.get_learned_conditioning([""] * n)

    def sample(model):
        x_T = torch.randn((n, 4, 4, 4), generator=torch.Generator().manual_seed(5))
        out, _ = sampler_cls(model).sample(S=8, batch_size=n, shape=(4, 4, 4), conditioning=cond, eta=eta,
                                           x_T=x_T, unconditional_guidance_scale=3.0,
                                           unconditional_conditioning=uncond, verbose=False,
                                           generator=torch.Generator().manual_seed(6))
        return out

    reference = sample(eps_model)
    for parameterization in ("x0", "v"):
        wrapped = build(parameterization)
        wrapped.load_state_dict(eps_model.state_dict())

        def apply_model(x, t, c, wrapped=wrapped):
            eps = eps_model.apply_model(x, t, c)
            a = wrapped.alphas_cumprod[t].view(-1, 1, 1, 1)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            return x0 if wrapped.parameterization == "x0" else a.sqrt() * eps - (1 - a).sqrt() * x0

        monkeypatch.setattr(wrapped, "apply_model", apply_model)
        torch.testing.assert_close(sample(wrapped), reference, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(reference, sample(build("v", seed=1)), atol=1e-2)  # the wrapping matters


def test_ignore_keys_keep_the_models_own_schedule():
    """Old weights under a new noise schedule: the ignored schedule buffers keep the new model's values."""
    old = build("eps", linear_end=0.012)
    new = build("v", seed=1, linear_end=0.03)
    new_betas = new.betas.clone()
    load_state_dict_into(new, old.state_dict(), ignore_keys=SCHEDULE_BUFFERS)
    assert torch.equal(new.betas, new_betas) and not torch.equal(new.betas, old.betas)
    assert new.alphas_cumprod_prev[-1] == new.alphas_cumprod[-2]
    for name, value in old.model.state_dict().items():
        assert torch.equal(new.model.state_dict()[name], value), name
    load_state_dict_into(new, old.state_dict())  # without ignore_keys the checkpoint's schedule wins
    assert torch.equal(new.betas, old.betas)
