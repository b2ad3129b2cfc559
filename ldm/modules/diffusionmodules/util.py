"""Diffusion helpers: noise schedules, DDIM step selection, and small nn building blocks.

Import path kept from latent-diffusion (`ldm.modules.diffusionmodules.util`), which took these from
openai/improved-diffusion and guided-diffusion.

Notation: `alphas_cumprod` is abar_t = prod_{s<=t} (1 - beta_s); schedules are computed in float64.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------


def make_beta_schedule(
    schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3
) -> np.ndarray:
    """Return the float64 betas of a named schedule, shape [n_timestep].

    Names as in ldm (they do not say what they compute):
    - "linear": linear in sqrt(beta), i.e. diffusers' "scaled_linear" (every text-to-image config);
    - "cosine": Nichol & Dhariwal (2021), eq. 17, clipped to 0.999;
    - "sqrt_linear": linear in beta;  "sqrt": sqrt of a linear ramp.
    """
    if schedule == "linear":
        return np.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = 1 - alphas[1:] / alphas[:-1]
        return np.clip(betas.numpy(), a_min=0, a_max=0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    raise ValueError(f"schedule '{schedule}' unknown.")


def make_ddim_timesteps(
    ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int, verbose: bool = True
) -> np.ndarray:
    """Select the DDPM timesteps a DDIM sampler visits, ascending.

    Fidelity quirk: ldm adds 1 to every step, so S=50 of T=1000 gives [1, 21, ..., 981]; when T is not
    divisible by S the "uniform" rule yields more than S steps, and "quad" can repeat steps.
    """
    if ddim_discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        steps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif ddim_discr_method == "quad":
        steps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise NotImplementedError(f"There is no ddim discretization method called '{ddim_discr_method}'")
    steps_out = steps + 1
    if len(np.unique(steps_out)) != len(steps_out) or len(steps_out) != num_ddim_timesteps:
        logger.warning(
            "DDIM '%s' with S=%d of T=%d visits %d timesteps (%d distinct)",
            ddim_discr_method, num_ddim_timesteps, num_ddpm_timesteps, len(steps_out), len(np.unique(steps_out)),
        )
    if verbose:
        logger.info("Selected timesteps for ddim sampler: %s", steps_out)
    return steps_out


def make_ddim_sampling_parameters(
    alphacums: torch.Tensor, ddim_timesteps: np.ndarray, eta: float, verbose: bool = True
) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """DDIM coefficients (Song et al. 2021, eq. 16) for the selected steps.

    Returns (a_t [S] in the dtype of `alphacums`, a_prev [S] float64, sigma [S] float64). As in ldm, the
    final step goes to abar_0 (not 1): a_prev[0] = alphacums[0].
    """
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0].item()] + alphacums[ddim_timesteps[:-1]].tolist(), dtype=np.float64)
    a64 = alphas.double()
    prev64 = torch.as_tensor(alphas_prev, device=a64.device)
    sigmas = eta * torch.sqrt((1 - prev64) / (1 - a64) * (1 - a64 / prev64))
    if verbose:
        logger.info("Selected alphas for ddim sampler: a_t: %s; a_(t-1): %s", alphas, alphas_prev)
        logger.info("For the chosen value of eta, which is %s, this results in the following sigma_t schedule "
                    "for ddim sampler %s", eta, sigmas)
    return alphas, alphas_prev, sigmas


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    """Gather `a[t]` and reshape to [B, 1, 1, ...] to broadcast against a tensor of `x_shape`."""
    b = t.shape[0]
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def noise_like(shape: tuple[int, ...], device: torch.device | str, repeat: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise; with `repeat`, one sample broadcast over the batch."""
    if repeat:
        one = torch.randn((1, *shape[1:]), device=device, generator=generator)
        return one.repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device, generator=generator)
