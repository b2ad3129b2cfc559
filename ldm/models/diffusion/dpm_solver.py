"""DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, algorithm 2): the multistep second-order solver of
the probability-flow ODE in data prediction, beside DDIM and PLMS with the same `sample` interface.

Not in the official code (docs/DIFFERENCES.md#sampling-additions). Discrete-time model: alpha_t =
sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t), all from the model's
`alphas_cumprod`. Timesteps (`timesteps`): "uniform" (default) is DDIM's grid (`make_ddim_timesteps`, with
the reference's +1 offset) and, as DDIM, the last step lands on abar_0, so both samplers integrate the
same interval and 1 step of DPM-Solver++ is 1 DDIM step; "logsnr" is the paper's logSNR-uniform grid on
the discrete schedule. Step i >= 2 (h_i = lambda_{t_i} - lambda_{t_{i-1}}, r_i = h_{i-1} / h_i):

    D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2}
    x_{t_i} = sigma_{t_i} / sigma_{t_{i-1}} x_{t_{i-1}} - alpha_{t_i} (exp(-h_i) - 1) D_i

and the first step uses D_1 = x0_{0} (first order, the DDIM step). Local safeguard, not in the paper
(`max_step_ratio`, default 2; None turns it off): a step more than twice as long in lambda as the one
before (extrapolation weight 1 / (2 r) > 1) is taken in first order. On the uniform grid that is only
the step into t = 1 for up to ~100 steps (lambda grows fast near t = 0), where the plain 2M update lost
fine detail on the toy model. The x0 estimate comes from the guided network output (eps, x0 or v
models). Deterministic: `eta` must be 0; a step of zero length (the shifted grids of
docs/DIFFERENCES.md#ddim-step-count end with t = 0 -> abar_0) leaves x unchanged.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ldm.models.diffusion.sampling import SamplerBase, guided_output

logger = logging.getLogger(__name__)

TIMESTEPS = ("uniform", "logsnr")


def logsnr_timesteps(alphas_cumprod: torch.Tensor, steps: int) -> np.ndarray:
    """Ascending timesteps whose lambda is nearest to S + 1 points uniform in lambda from t = T - 1 to t = 0
    (the paper's "logSNR" steps on the discrete schedule), the last point (t = 0) left out as it is the
    target; repeated timesteps are merged (then fewer than S steps, with a warning)."""
    abar = alphas_cumprod.detach().double().cpu()
    lam = 0.5 * (torch.log(abar) - torch.log1p(-abar))
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps + 1, dtype=torch.float64)[:-1]
    picked = torch.argmin((lam[None, :] - targets[:, None]).abs(), dim=1).numpy()
    out = np.unique(picked)
    if len(out) != steps:
        logger.warning("DPM-Solver++ logSNR steps: %d steps of T=%d give %d distinct timesteps", steps,
                       len(abar), len(out))
    return out.astype(np.int64)


class DPMSolverPlusPlusSampler(SamplerBase):
    """`timesteps`: "uniform" (DDIM's grid, the default) or "logsnr" (`logsnr_timesteps`);
    `max_step_ratio`: first order on a step longer than this many times the previous one (None: never)."""

    name = "DPM-Solver++(2M)"

    def __init__(self, model, schedule: str = "linear", timesteps: str = "uniform",
                 max_step_ratio: float | None = 2.0):
        super().__init__(model, schedule)
        if timesteps not in TIMESTEPS:
            raise ValueError(f"timesteps must be one of {TIMESTEPS}, got '{timesteps}'")
        if max_step_ratio is not None and not max_step_ratio > 0:
            raise ValueError(f"max_step_ratio must be > 0 or None, got {max_step_ratio}")
        self.timesteps = timesteps
        self.max_step_ratio = max_step_ratio

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        if self.timesteps == "uniform":
            return super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)
        abar = self.model.alphas_cumprod.detach().float().cpu()
        if not 1 <= ddim_num_steps <= self.ddpm_num_timesteps:
            raise ValueError(f"ddim_steps must be between 1 and the model's {self.ddpm_num_timesteps} diffusion "
                             f"timesteps, got {ddim_num_steps}")
        self.ddim_timesteps = logsnr_timesteps(abar, ddim_num_steps)
        self.ddim_alphas = abar[self.ddim_timesteps]
        self.ddim_alphas_prev = np.asarray([abar[0].item()] + abar[self.ddim_timesteps[:-1]].tolist())
        self.ddim_sigmas = torch.zeros(len(self.ddim_timesteps), dtype=torch.float64)
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - self.ddim_alphas)

    def _check_eta(self, eta: float) -> None:
        if eta != 0:
            raise ValueError("ddim_eta must be 0 for DPM-Solver++ (a deterministic ODE solver)")

    def _reset(self) -> None:
        self.prev_x0: torch.Tensor | None = None
        self.prev_h: float | None = None

    def alpha_sigma(self, abar: float) -> tuple[float, float, float]:
        """(alpha, sigma, lambda) of one abar, in float64."""
        alpha, sigma = math.sqrt(abar), math.sqrt(1.0 - abar)
        return alpha, sigma, math.log(alpha) - math.log(sigma)

    def x0_estimate(self, x, t, c, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
                    score_corrector=None, corrector_kwargs=None):
        """The guided data prediction at (x, t): from eps, x0 or v outputs directly, via eps with a
        score corrector."""
        model = self.model
        abar = model.alphas_cumprod[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        if score_corrector is not None:
            e_t = self.guided_eps(x, t, c, unconditional_guidance_scale, unconditional_conditioning,
                                  score_corrector, corrector_kwargs)
            return (x - sigma * e_t) / alpha
        out = guided_output(model, x, t, c, unconditional_guidance_scale, unconditional_conditioning)
        parameterization = getattr(model, "parameterization", "eps")
        if parameterization == "eps":
            return (x - sigma * out) / alpha
        if parameterization == "x0":
            return out
        if parameterization == "v":
            return alpha * x - sigma * out
        raise ValueError(f"DPM-Solver++: unknown parameterization '{parameterization}'")

    def _step(self, x, c, t, index, t_next=None, quantize_denoised=False, temperature=1.0, noise_dropout=0.0,
              score_corrector=None, corrector_kwargs=None, unconditional_guidance_scale=1.0,
              unconditional_conditioning=None, generator=None):
        pred_x0 = self.x0_estimate(x, t, c, unconditional_guidance_scale, unconditional_conditioning,
                                   score_corrector, corrector_kwargs)
        if quantize_denoised:
            pred_x0, _, *_ = self.model.first_stage_model.quantize(pred_x0)
        _, sigma_s, lambda_s = self.alpha_sigma(float(self.ddim_alphas[index]))
        alpha_t, sigma_t, lambda_t = self.alpha_sigma(float(self.ddim_alphas_prev[index]))
        h = lambda_t - lambda_s
        if h == 0.0:
            return x, pred_x0
        if self.prev_x0 is None or (self.max_step_ratio is not None and h > self.max_step_ratio * self.prev_h):
            d = pred_x0
        else:
            half_inv_r = 0.5 * h / self.prev_h
            d = (1.0 + half_inv_r) * pred_x0 - half_inv_r * self.prev_x0
        self.prev_x0, self.prev_h = pred_x0, h
        x_next = (sigma_t / sigma_s) * x + (alpha_t * -math.expm1(-h)) * d
        return x_next, pred_x0
