"""DPM-Solver++(2M) (`ldm/models/diffusion/dpm_solver.py`): against the exact probability-flow ODE solution
of Gaussian data (second order, any parameterization), against DDIM on the tiny LDM model (one step is a
DDIM step; both converge to the same sample), and the sampler interface (x_T, generator, guidance, eta)."""

import math

import numpy as np
import pytest
import torch
from conftest import build_parity_model

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverPlusPlusSampler, logsnr_timesteps
from ldm.modules.diffusionmodules.util import make_beta_schedule

SHAPE = (4, 4, 4)


class GaussianDenoiser:
    """The exact denoiser of data x0 ~ N(m, s^2 I), m the conditioning: E[x0 | x_t] in closed form."""

    device = torch.device("cpu")
    num_timesteps = 1000

    def __init__(self, parameterization="eps", s=0.5):
        betas = torch.as_tensor(make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012))
        abar = torch.cumprod(1 - betas, 0)
        self.alphas_cumprod = abar.float()
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]]).float()
        self.sqrt_one_minus_alphas_cumprod = (1 - abar).sqrt().float()
        self.parameterization, self.s = parameterization, s

    def _coef(self, t):
        a = self.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        return a, a.sqrt(), (1 - a).sqrt()

    def apply_model(self, x, t, m):
        a, alpha, sigma = self._coef(t)
        x = x.double()
        x0 = m + alpha * self.s**2 / (a * self.s**2 + 1 - a) * (x - alpha * m)
        eps = (x - alpha * x0) / sigma
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[self.parameterization].float()

    def eps_from_output(self, x, t, out):
        _, alpha, sigma = (c.float() for c in self._coef(t))
        if self.parameterization == "eps":
            return out
        return (x - alpha * out) / sigma if self.parameterization == "x0" else alpha * out + sigma * x

    def exact(self, sampler, x_T, m):
        """The ODE solution from the sampler's first timestep to abar_0: (x - alpha m) / std is constant."""
        a_start = float(self.alphas_cumprod[int(sampler.ddim_timesteps[-1])])
        a_end = float(sampler.ddim_alphas_prev[0])

        def std(a):
            return math.sqrt(a * self.s**2 + 1 - a)

        return (x_T.double() - math.sqrt(a_start) * m) * std(a_end) / std(a_start) + math.sqrt(a_end) * m


def gaussian_error(cls, steps, parameterization="eps", **options):
    model = GaussianDenoiser(parameterization)
    m = torch.full((2, *SHAPE), 0.7)
    x_T = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0))
    sampler = cls(model, **options)
    z, _ = sampler.sample(steps, 2, SHAPE, m, x_T=x_T, verbose=False)
    exact = model.exact(sampler, x_T, m)
    return ((z.double() - exact).norm() / exact.norm()).item(), z


def test_second_order_convergence_to_the_exact_ode_solution():
    """Relative error vs the exact solution of the plain 2M update (max_step_ratio=None): ~4x smaller per
    doubling of the steps (measured 4.9e-3, 1.6e-3, 5.0e-4 at S = 125, 250, 500), DDIM ~2x (1.2e-2,
    6.0e-3, 3.1e-3). 250 and 500 are steps of 4 and 2 timesteps, i.e. exactly 250 and 500 steps."""
    dpm = [gaussian_error(DPMSolverPlusPlusSampler, s, max_step_ratio=None)[0] for s in (125, 250, 500)]
    ddim = [gaussian_error(DDIMSampler, s)[0] for s in (125, 250, 500)]
    assert dpm[1] / dpm[0] < 0.35 and dpm[2] / dpm[1] < 0.35, dpm
    assert 0.4 < ddim[1] / ddim[0] < 0.6 and 0.4 < ddim[2] / ddim[1] < 0.6, ddim
    assert all(p < d for p, d in zip(dpm, ddim, strict=True))
    assert dpm[2] < 1e-3


def test_the_first_order_fallback_on_long_steps():
    """The default (first order on a step > 2x the previous one in lambda: the step into t = 1 of the uniform
    grid up to ~100 steps) is closer to the exact solution than the plain update at few steps, and the same
    where it never fires. Measured at S = 20 / 50: default 3.4e-2 / 8.8e-3, plain 6.1e-2 / 1.9e-2, DDIM
    6.4e-2 / 2.8e-2."""
    for steps in (20, 50):
        default = gaussian_error(DPMSolverPlusPlusSampler, steps)[0]
        plain = gaussian_error(DPMSolverPlusPlusSampler, steps, max_step_ratio=None)[0]
        assert default < 0.7 * plain < 0.7 * gaussian_error(DDIMSampler, steps)[0], (steps, default, plain)
    assert torch.equal(gaussian_error(DPMSolverPlusPlusSampler, 500)[1],
                       gaussian_error(DPMSolverPlusPlusSampler, 500, max_step_ratio=None)[1])
    with pytest.raises(ValueError, match="max_step_ratio"):
        DPMSolverPlusPlusSampler(GaussianDenoiser(), max_step_ratio=0)


def test_logsnr_timesteps():
    """The paper's logSNR-uniform steps on the discrete schedule: from T - 1, ascending, distinct; second
    order against the exact solution too."""
    abar = GaussianDenoiser().alphas_cumprod
    for steps in (1, 5, 20, 50):
        grid = logsnr_timesteps(abar, steps)
        assert grid[-1] == 999 and (np.diff(grid) > 0).all() and len(grid) <= steps
    assert len(logsnr_timesteps(abar, 20)) == 20
    errors = [gaussian_error(DPMSolverPlusPlusSampler, s, timesteps="logsnr")[0] for s in (10, 20, 40)]
    assert errors[1] / errors[0] < 0.35 and errors[2] / errors[1] < 0.35, errors  # 1.1e-2, 3.4e-3, 6.3e-4
    with pytest.raises(ValueError, match="timesteps must be one of"):
        DPMSolverPlusPlusSampler(GaussianDenoiser(), timesteps="quad")


def test_every_parameterization_gives_the_same_samples():
    """The same exact denoiser as an eps, x0 or v network: x0 is read from each output directly."""
    ref = gaussian_error(DPMSolverPlusPlusSampler, 20, "eps")[1]
    for parameterization in ("x0", "v"):
        torch.testing.assert_close(gaussian_error(DPMSolverPlusPlusSampler, 20, parameterization)[1], ref,
                                   rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = build_parity_model("ldm_tiny", tmp_path_factory.mktemp("ldm_tiny")).eval()
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a photo of *"])
        uncond = model.get_learned_conditioning([""])
    x_T = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    return model, cond, uncond, x_T


def run(tiny, cls, steps, scale=5.0, **kwargs):
    model, cond, uncond, x_T = tiny
    kwargs.setdefault("x_T", x_T)
    z, inter = cls(model).sample(steps, 1, (4, 8, 8), cond, verbose=False, unconditional_guidance_scale=scale,
                                 unconditional_conditioning=uncond, **kwargs)
    return z, inter


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_one_step_is_a_ddim_step(tiny):
    """A single (first-order) DPM-Solver++ step is the DDIM update: same x0 estimate, same coefficients."""
    torch.testing.assert_close(run(tiny, DPMSolverPlusPlusSampler, 1)[0], run(tiny, DDIMSampler, 1)[0],
                               rtol=1e-5, atol=1e-5)


def test_the_gap_to_ddim_shrinks_with_the_steps(tiny):
    """Same x_T, same grid (DDIM's uniform steps, to abar_0): relative L2 between the two samples, measured
    0.028, 0.024, 0.017 at 5, 10, 20 steps (0.0087 at 50, 0.0047 at 100, 0.0024 at 200, 0.0010 at 500)."""
    gaps = [rel(run(tiny, DPMSolverPlusPlusSampler, s)[0], run(tiny, DDIMSampler, s)[0]) for s in (5, 10, 20)]
    assert gaps[0] > gaps[1] > gaps[2], gaps
    assert gaps[2] < 0.03, gaps


@pytest.mark.slow
def test_500_steps_agree_with_ddim_500_steps(tiny):
    """Both solve the same probability-flow ODE: relative L2 measured 0.10% at 500 vs 500 steps (bound 1%)."""
    ddim500 = run(tiny, DDIMSampler, 500)[0]
    dpm500 = run(tiny, DPMSolverPlusPlusSampler, 500)[0]
    assert rel(dpm500, ddim500) < 0.01


def test_x_T_and_generator(tiny):
    """Without x_T the starting noise is the generator's first draw (as DDIM); no other draw is made."""
    model, *_ = tiny
    x_T = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    a = run(tiny, DPMSolverPlusPlusSampler, 2, x_T=None, generator=g)[0]
    b = run(tiny, DPMSolverPlusPlusSampler, 2, x_T=x_T)[0]
    assert torch.equal(a, b)
    after = torch.Generator().manual_seed(11)
    torch.randn((1, 4, 8, 8), generator=after)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=after))


def test_guidance_and_determinism(tiny):
    guided = run(tiny, DPMSolverPlusPlusSampler, 3, scale=5.0)[0]
    assert torch.equal(guided, run(tiny, DPMSolverPlusPlusSampler, 3, scale=5.0)[0])
    plain = run(tiny, DPMSolverPlusPlusSampler, 3, scale=1.0)[0]
    model, cond, _, x_T = tiny
    unguided, _ = DPMSolverPlusPlusSampler(model).sample(3, 1, (4, 8, 8), cond, x_T=x_T, verbose=False)
    assert torch.equal(plain, unguided)
    assert rel(guided, plain) > 1e-3


def test_eta_must_be_zero(tiny):
    with pytest.raises(ValueError, match="ddim_eta must be 0"):
        run(tiny, DPMSolverPlusPlusSampler, 3, eta=0.5)


def test_interface_and_the_zero_length_last_step(tiny, caplog):
    """S = 3: grid [0, 333, 666, 999] (docs/DIFFERENCES.md#ddim-step-count); the last step (t = 0 to abar_0)
    has zero length and leaves x exactly unchanged. Intermediates and callbacks as DDIM."""
    calls = []
    z, inter = run(tiny, DPMSolverPlusPlusSampler, 3, log_every_t=1, callback=calls.append,
                   img_callback=lambda x0, i: calls.append(("img", i)))
    assert calls == [0, ("img", 0), 1, ("img", 1), 2, ("img", 2), 3, ("img", 3)]
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 5
    assert torch.equal(inter["x_inter"][-1], inter["x_inter"][-2]) and torch.equal(z, inter["x_inter"][-1])
    assert torch.isfinite(z).all() and z.shape == (1, 4, 8, 8)
