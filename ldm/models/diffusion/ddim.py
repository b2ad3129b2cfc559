"""DDIM sampler (Song et al. 2021), as in latent-diffusion@5a6571e plus the Textual Inversion helpers
`stochastic_encode` and `decode` (img2img building blocks). Shared machinery: `sampling.py`.

Local changes: no forced CUDA buffers (docs/DIFFERENCES.md#samplers-any-device); optional `generator`;
logging instead of print.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ldm.models.diffusion.sampling import SamplerBase
from ldm.modules.diffusionmodules.util import extract_into_tensor


class DDIMSampler(SamplerBase):
    name = "DDIM"

    def _step(self, x, c, t, index, t_next=None, quantize_denoised=False, **kwargs):
        return self.p_sample_ddim(x, c, t, index, quantize_denoised=quantize_denoised, **kwargs)

    @torch.no_grad()
    def p_sample_ddim(self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False,
                      temperature=1.0, noise_dropout=0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1.0, unconditional_conditioning=None, generator=None):
        e_t = self.guided_eps(x, t, c, unconditional_guidance_scale, unconditional_conditioning,
                              score_corrector, corrector_kwargs)
        return self.ddim_update(x, e_t, index, use_original_steps, quantize_denoised, temperature, noise_dropout,
                                repeat_noise, generator)

    @torch.no_grad()
    def stochastic_encode(self, x0, t, use_original_steps=False, noise=None):
        """Noise x0 to DDIM step index `t`: sqrt(a) x0 + sqrt(1 - a) noise (schedule from make_schedule)."""
        if use_original_steps:
            sqrt_a = self.model.sqrt_alphas_cumprod
            sqrt_one_minus_a = self.model.sqrt_one_minus_alphas_cumprod
        else:
            sqrt_a = torch.sqrt(self.ddim_alphas)
            sqrt_one_minus_a = self.ddim_sqrt_one_minus_alphas
        noise = torch.randn_like(x0) if noise is None else noise
        sqrt_a, sqrt_one_minus_a = sqrt_a.to(x0.device), sqrt_one_minus_a.to(x0.device)
        return (extract_into_tensor(sqrt_a, t, x0.shape) * x0
                + extract_into_tensor(sqrt_one_minus_a, t, x0.shape) * noise)

    @torch.no_grad()
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               use_original_steps=False, verbose=True):
        """Denoise `x_latent` from DDIM step index `t_start` down to 0."""
        timesteps = np.arange(self.ddpm_num_timesteps) if use_original_steps else self.ddim_timesteps
        time_range = np.flip(timesteps[:t_start])
        x = x_latent
        for i, step in enumerate(tqdm(time_range, desc="Decoding image", disable=not verbose)):
            index = t_start - i - 1
            ts = torch.full((x_latent.shape[0],), int(step), device=x_latent.device, dtype=torch.long)
            x, _ = self.p_sample_ddim(x, cond, ts, index=index, use_original_steps=use_original_steps,
                                      unconditional_guidance_scale=unconditional_guidance_scale,
                                      unconditional_conditioning=unconditional_conditioning)
        return x
