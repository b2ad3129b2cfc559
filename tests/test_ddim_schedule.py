"""DDIM step selection (`make_ddim_timesteps`, "uniform"): every step count from 1 to T=1000 works.

The reference, `np.asarray(list(range(0, T, T // S))) + 1`, ends at T (an out-of-range index, the official
`IndexError: index 1000 is out of bounds`) exactly when T // S divides T - 1; for T = 1000 that is
S = 3, 9, 27, 36-37, 101-111, 251-333 and 501-1000. Those S get the same steps without the +1 (ending at
999) and a warning; every other S keeps the reference's array bit for bit
(docs/DIFFERENCES.md#ddim-step-count)."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import build_parity_model

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm_schedule import schedule_table
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import SamplerBase
from ldm.modules.diffusionmodules.util import make_beta_schedule, make_ddim_timesteps

T = 1000
CRASHING = {3, 9, 27, 36, 37, *range(101, 112), *range(251, 334), *range(501, 1001)}
LOGGER = "ldm.modules.diffusionmodules.util"
DIFFERS = "differs from the reference"


def reference_timesteps(S, num_ddpm_timesteps=T):
    """latent-diffusion@5a6571e make_ddim_timesteps, 'uniform'."""
    c = num_ddpm_timesteps // S
    return np.asarray(list(range(0, num_ddpm_timesteps, c))) + 1


def test_the_crashing_step_counts_are_those_where_the_reference_leaves_the_range():
    leaves = {S for S in range(1, T + 1) if reference_timesteps(S)[-1] >= T}
    assert leaves == CRASHING
    assert leaves == {S for S in range(1, T + 1) if (T - 1) % (T // S) == 0}
    assert len(CRASHING) == 599


def test_every_step_count_gives_in_range_strictly_increasing_timesteps():
    for S in range(1, T + 1):
        steps = make_ddim_timesteps("uniform", S, T, verbose=False)
        assert steps.min() >= 0 and steps.max() <= T - 1, S
        assert np.all(np.diff(steps) > 0), S
        assert len(steps) >= S, S


def test_other_step_counts_keep_the_reference_timesteps_exactly():
    for S in range(1, T + 1):
        ours, ref = make_ddim_timesteps("uniform", S, T, verbose=False), reference_timesteps(S)
        assert ours.dtype == ref.dtype, S
        if S in CRASHING:
            np.testing.assert_array_equal(ours, ref - 1)  # the rule: same spacing, shifted down by one
            assert ours[-1] == T - 1
        else:
            np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", 3, T, verbose=False), [0, 333, 666, 999])
    s50 = make_ddim_timesteps("uniform", 50, T, verbose=False)
    np.testing.assert_array_equal(s50, np.arange(1, 1000, 20))


def test_the_warning_names_exactly_the_crashing_step_counts(caplog):
    warned = set()
    for S in range(1, T + 1):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            make_ddim_timesteps("uniform", S, T, verbose=False)
        lines = [r.getMessage() for r in caplog.records if DIFFERS in r.getMessage()]
        assert len(lines) <= 1 and all("\n" not in line for line in lines), S
        if lines:
            assert f"ddim_steps={S} " in lines[0]
            warned.add(S)
    assert warned == CRASHING


@pytest.mark.parametrize("bad", [0, -1, T + 1, 2.5, None])
def test_step_counts_outside_one_to_T_raise_naming_ddim_steps(bad):
    with pytest.raises(ValueError, match="ddim_steps"):
        make_ddim_timesteps("uniform", bad, T, verbose=False)


def test_the_sampler_coefficients_are_finite_for_every_step_count():
    """a_t, a_prev and sigma (eta 1) for all S, including the steps at t = 0 of the shifted schedules."""
    table = schedule_table(make_beta_schedule("linear", T, linear_start=0.00085, linear_end=0.012))
    model = SimpleNamespace(num_timesteps=T, alphas_cumprod=torch.tensor(table["alphas_cumprod"]).float(),
                            alphas_cumprod_prev=torch.tensor(table["alphas_cumprod_prev"]).float())
    sampler = SamplerBase(model)
    torch.set_num_threads(1)  # 1000 small schedules: thread wake-ups would dominate
    for S in range(1, T + 1):
        sampler.make_schedule(S, ddim_eta=1.0, verbose=False)
        n = len(sampler.ddim_timesteps)
        for values in (sampler.ddim_alphas, torch.as_tensor(sampler.ddim_alphas_prev), sampler.ddim_sigmas,
                       sampler.ddim_sqrt_one_minus_alphas):
            assert values.shape == (n,) and torch.isfinite(values).all(), S
        assert (1 - torch.as_tensor(sampler.ddim_alphas_prev) - sampler.ddim_sigmas**2 >= 0).all(), S


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = build_parity_model("ldm_tiny", tmp_path_factory.mktemp("ldm_tiny")).eval()
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a photo of *"] * 2)
        uncond = model.get_learned_conditioning([""] * 2)
    return model, cond, uncond


@pytest.mark.parametrize("sampler_cls,eta", [(DDIMSampler, 0.0), (DDIMSampler, 1.0), (PLMSSampler, 0.0)],
                         ids=["ddim_eta0", "ddim_eta1", "plms"])
def test_samplers_run_with_three_steps(tiny, sampler_cls, eta, caplog):
    """S=3 (the official crash): 4 steps [999, 666, 333, 0]; the last one (a_t = a_prev = abar_0) leaves x
    unchanged up to rounding."""
    model, cond, uncond = tiny
    sampler = sampler_cls(model)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        samples, inter = sampler.sample(S=3, batch_size=2, shape=(4, 8, 8), conditioning=cond, eta=eta,
                                        unconditional_guidance_scale=5.0, unconditional_conditioning=uncond,
                                        log_every_t=1, verbose=False,
                                        generator=torch.Generator().manual_seed(3))
    assert any(DIFFERS in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(sampler.ddim_timesteps, [0, 333, 666, 999])
    assert samples.shape == (2, 4, 8, 8) and torch.isfinite(samples).all()
    assert len(inter["x_inter"]) == 5 and all(torch.isfinite(x).all() for x in inter["pred_x0"])
    torch.testing.assert_close(inter["x_inter"][-1], inter["x_inter"][-2], rtol=1e-5, atol=1e-5)
