"""What the DDIM and PLMS samplers share: the step schedule, classifier-free guidance, the DDIM update.

Sampler protocol (what a model must provide): `apply_model(x, t, cond)`, `eps_from_output(x, t, output)`
(the noise estimate implied by a network output: eps, x0 and v models all sample), `alphas_cumprod`,
`alphas_cumprod_prev`, `sqrt_one_minus_alphas_cumprod`, `num_timesteps`, `device`, and `q_sample` for
masked sampling. Nothing here names a device: tensors follow `model.device`.

Numerics follow latent-diffusion@5a6571e `ddim.py`/`plms.py`, including the fidelity
quirks: the +1 step offset, a_prev[0] = abar_0, no clipping of x0, CFG as eps_u + s (eps_c - eps_u) in
one batched pass (unconditional first), and one normal draw per step even when sigma is 0. The reference
treated every output as eps; x0 and v outputs are converted here
(docs/DIFFERENCES.md#sampler-parameterization).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps

logger = logging.getLogger(__name__)


def guided_output(model, x, t, c, unconditional_guidance_scale=1.0, unconditional_conditioning=None):
    """The network output with classifier-free guidance: out_u + s (out_c - out_u), one batched
    `model.apply_model` call with the unconditional half first (a plain call without guidance).

    Guidance mixes raw outputs, which is linear in eps for every parameterization. Used by the DDIM/PLMS
    samplers and by the ancestral sampler (`LatentDiffusion.p_mean_variance`).
    """
    scale, uc = unconditional_guidance_scale, unconditional_conditioning
    if uc is None or scale == 1.0:
        return model.apply_model(x, t, c)
    x_in, t_in = torch.cat([x] * 2), torch.cat([t] * 2)
    if isinstance(c, dict):
        c_in = {k: [torch.cat([uc[k][i], c[k][i]]) for i in range(len(c[k]))] for k in c}
    else:
        c_in = torch.cat([uc, c])
    out_uncond, out = model.apply_model(x_in, t_in, c_in).chunk(2)
    return out_uncond + scale * (out - out_uncond)


class SamplerBase:
    """Holds the DDIM schedule of a model and runs the reverse loop; subclasses define `_step`."""

    name = "DDIM"

    def __init__(self, model, schedule: str = "linear"):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Select the visited timesteps and their coefficients (a_t, a_prev, sigma_t, sqrt(1 - a_t))."""
        model = self.model
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps, verbose)
        alphas_cumprod = model.alphas_cumprod.detach().float().cpu()
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("alphas have to be defined for each timestep")
        alphas, alphas_prev, sigmas = make_ddim_sampling_parameters(alphas_cumprod, self.ddim_timesteps,
                                                                    ddim_eta, verbose)
        self.ddim_alphas = alphas
        self.ddim_alphas_prev = alphas_prev
        self.ddim_sigmas = sigmas
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - alphas)
        abar, abar_prev = alphas_cumprod.double(), model.alphas_cumprod_prev.detach().double().cpu()
        self.ddim_sigmas_for_original_num_steps = ddim_eta * torch.sqrt(
            (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
        )

    # -- the loop ------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0,
               noise_dropout=0.0, score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               generator: torch.Generator | None = None):
        """Sample `batch_size` latents of `shape` (C, H, W) in `S` steps; returns (samples, intermediates).

        `generator` (optional) drives x_T and the per-step noise; by default the global RNG is used, as
        the reference. `normals_sequence` is accepted for signature compatibility and must be None.
        """
        if normals_sequence is not None:
            raise NotImplementedError("normals_sequence is not supported")
        if conditioning is not None:
            n = len(next(iter(conditioning.values()))) if isinstance(conditioning, dict) else len(conditioning)
            if n != batch_size:
                logger.warning("Got %d conditionings but batch-size is %d", n, batch_size)
        self._check_eta(eta)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        return self._loop(conditioning, size, x_T=x_T, callback=callback, img_callback=img_callback,
                          quantize_denoised=quantize_x0, mask=mask, x0=x0, log_every_t=log_every_t,
                          verbose=verbose,
                          step_kwargs=dict(temperature=temperature, noise_dropout=noise_dropout,
                                           score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                                           unconditional_guidance_scale=unconditional_guidance_scale,
                                           unconditional_conditioning=unconditional_conditioning,
                                           generator=generator))

    def _check_eta(self, eta: float) -> None:
        pass

    def _loop(self, cond, shape, x_T=None, callback=None, img_callback=None, quantize_denoised=False,
              mask=None, x0=None, log_every_t=100, verbose=True, step_kwargs=None):
        device = self.model.device
        b = shape[0]
        generator = step_kwargs["generator"]
        img = torch.randn(shape, device=device, generator=generator) if x_T is None else x_T.to(device)
        time_range = np.flip(self.ddim_timesteps)
        total_steps = self.ddim_timesteps.shape[0]
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        self._reset()
        iterator = tqdm(time_range, desc=f"{self.name} Sampler", total=total_steps, disable=not verbose)
        for i, step in enumerate(iterator):
            index = total_steps - i - 1
            ts = torch.full((b,), int(step), device=device, dtype=torch.long)
            if mask is not None:
                img = self.model.q_sample(x0, ts) * mask + (1.0 - mask) * img
            t_next = int(time_range[min(i + 1, len(time_range) - 1)])
            img, pred_x0 = self._step(img, cond, ts, index, t_next=t_next, quantize_denoised=quantize_denoised,
                                      **step_kwargs)
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    def _reset(self) -> None:
        pass

    def _step(self, x, c, t, index, **kwargs):
        raise NotImplementedError

    # -- pieces ----------------------------------------------------------------------------------------

    def guided_eps(self, x, t, c, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
                   score_corrector=None, corrector_kwargs=None):
        """eps = eps_u + s (eps_c - eps_u), one batched model call with the unconditional half first.

        Guidance mixes the raw outputs (linear in eps for every parameterization), then converts to eps.
        """
        e_t = guided_output(self.model, x, t, c, unconditional_guidance_scale, unconditional_conditioning)
        e_t = self.model.eps_from_output(x, t, e_t)
        if score_corrector is not None:
            if self.model.parameterization != "eps":
                raise ValueError("score_corrector needs an eps-prediction model")
            e_t = score_corrector.modify_score(self.model, e_t, x, t, c, **(corrector_kwargs or {}))
        return e_t

    def coefficients(self, index: int, use_original_steps: bool = False):
        """(a_t, a_prev, sigma_t, sqrt(1 - a_t)) at position `index` as Python floats."""
        if use_original_steps:
            m = self.model
            return (m.alphas_cumprod[index].item(), m.alphas_cumprod_prev[index].item(),
                    self.ddim_sigmas_for_original_num_steps[index].item(),
                    m.sqrt_one_minus_alphas_cumprod[index].item())
        return (self.ddim_alphas[index].item(), float(self.ddim_alphas_prev[index]), self.ddim_sigmas[index].item(),
                self.ddim_sqrt_one_minus_alphas[index].item())

    def ddim_update(self, x, e_t, index, use_original_steps=False, quantize_denoised=False, temperature=1.0,
                    noise_dropout=0.0, repeat_noise=False, generator=None):
        """One DDIM step (Song et al. 2021, eq. 12) from eps; returns (x_prev, pred_x0)."""
        b, device = x.shape[0], x.device
        a_t, a_prev, sigma_t, sqrt_one_minus_at = (
            torch.full((b, 1, 1, 1), v, device=device) for v in self.coefficients(index, use_original_steps)
        )
        # 1. predicted x_0 (no clipping)
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        if quantize_denoised:
            pred_x0, _, *_ = self.model.first_stage_model.quantize(pred_x0)
        # 2. direction pointing to x_t
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        # 3. random noise, drawn even when sigma_t = 0 (keeps the reference's RNG stream)
        if repeat_noise:
            raw = torch.randn((1, *x.shape[1:]), device=device, generator=generator).repeat(b, 1, 1, 1)
        else:
            raw = torch.randn(x.shape, device=device, generator=generator)
        noise = sigma_t * raw * temperature
        if noise_dropout > 0.0:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0
