"""Coefficient table of the forward process q(x_t | x_0) and posterior q(x_{t-1} | x_t, x_0).

Notation (Ho et al. 2020): beta_t, alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s (`alphas_cumprod`),
abar_{t-1} (`alphas_cumprod_prev`, with abar_{-1} = 1). Everything is computed in float64 and cast to
float32 when registered, as in latent-diffusion; the names below are checkpoint buffer names.
"""

from __future__ import annotations

import numpy as np
import torch

#: Persistent buffers of DDPM, in registration order (all appear in official checkpoints).
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


#: What the network predicts: the noise (the reference's default), the clean latent, or v (Salimans & Ho
#: 2022, an extension: SD 2.x and the toy model use it).
PARAMETERIZATIONS = ("eps", "x0", "v")


def schedule_table(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    """All SCHEDULE_BUFFERS as float64 arrays of shape [T] from the betas (eq. 4, 6, 7 of Ho et al.).

    posterior_variance = (1 - v) * beta_t (1 - abar_{t-1}) / (1 - abar_t) + v * beta_t; its log is
    clipped at 1e-20 because the variance is 0 at t = 0.
    """
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas, axis=0)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_variance = (1 - v_posterior) * betas * (1.0 - abar_prev) / (1.0 - abar) + v_posterior * betas
    return {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
        "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    }


def lvlb_weights(buffers: dict[str, torch.Tensor], parameterization: str, faithful_x0: bool = True) -> torch.Tensor:
    """Per-timestep weights of the variational bound term, from the float32 buffers.

    eps: beta^2 / (2 sigma^2 alpha (1 - abar)).  v: the eps weight times abar, since an error d in v is an
    error sqrt(abar) d in the implied eps.  x0: 0.5 sqrt(abar) / (2 (1 - abar)); the reference wrote
    `2. * 1 - abar` (operator precedence, docs/DIFFERENCES.md#x0-elbo-weights) which `faithful_x0` keeps.
    Entry 0 (infinite, since
    the posterior variance is 0 there) is set to entry 1.
    """
    betas, abar = buffers["betas"], buffers["alphas_cumprod"]
    if parameterization in ("eps", "v"):
        w = betas**2 / (2 * buffers["posterior_variance"] * (1 - betas) * (1 - abar))
        if parameterization == "v":
            w = w * abar
    elif parameterization == "x0":
        denom = (2.0 * 1 - abar) if faithful_x0 else 2.0 * (1 - abar)
        w = 0.5 * torch.sqrt(abar) / denom
    else:
        raise NotImplementedError(f"mu not supported: parameterization '{parameterization}'")
    w[0] = w[1]
    return w
