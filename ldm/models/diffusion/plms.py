"""PLMS sampler (pseudo linear multi-step, Liu et al. 2022), as in latent-diffusion@5a6571e.

The first step is a pseudo improved-Euler step (two model calls); later steps use Adams-Bashforth of
order 2-4 over the history of raw eps (not the averaged one), keeping the last three. Requires eta = 0.
Shared machinery: `sampling.py`.
"""

from __future__ import annotations

import torch

from ldm.models.diffusion.sampling import SamplerBase


class PLMSSampler(SamplerBase):
    name = "PLMS"

    def _check_eta(self, eta: float) -> None:
        if eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")

    def _reset(self) -> None:
        self.old_eps: list[torch.Tensor] = []

    def _step(self, x, c, t, index, t_next=None, quantize_denoised=False, **kwargs):
        t_next = torch.full_like(t, t_next)
        x_prev, pred_x0, e_t = self.p_sample_plms(x, c, t, index, old_eps=self.old_eps, t_next=t_next,
                                                  quantize_denoised=quantize_denoised, **kwargs)
        self.old_eps.append(e_t)
        if len(self.old_eps) >= 4:
            self.old_eps.pop(0)
        return x_prev, pred_x0

    @torch.no_grad()
    def p_sample_plms(self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False,
                      temperature=1.0, noise_dropout=0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1.0, unconditional_conditioning=None, old_eps=None,
                      t_next=None, generator=None):
        """One PLMS step; returns (x_prev, pred_x0, e_t) with the raw e_t for the history."""
        old_eps = old_eps or []

        def eps_at(x_, t_):
            return self.guided_eps(x_, t_, c, unconditional_guidance_scale, unconditional_conditioning,
                                   score_corrector, corrector_kwargs)

        def update(e):
            return self.ddim_update(x, e, index, use_original_steps, quantize_denoised, temperature,
                                    noise_dropout, repeat_noise, generator)

        e_t = eps_at(x, t)
        if len(old_eps) == 0:
            x_prev, _ = update(e_t)
            e_t_prime = (e_t + eps_at(x_prev, t_next)) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, pred_x0 = update(e_t_prime)
        return x_prev, pred_x0, e_t
