"""Deterministic DDIM inversion (Song et al. 2021; Dhariwal & Nichol 2021, appendix F): run the eta = 0
DDIM update backwards, image latent -> x_T, under a prompt; the existing `DDIMSampler` (with `x_T`) maps it
back. The paper's Appendix E ("bipartite" inversion, Figure 15) inverts a training image under
"a photo of *", reconstructs it from x_T with the same prompt, then keeps x_T and changes the prompt.

    z0 = image_latent(model, images)                     # scale_factor * posterior mode
    c = model.get_learned_conditioning(n * ["a photo of *"])
    x_T = ddim_invert(model, z0, c, steps=50)            # scale 1: no guidance
    z_rec = ddim_reconstruct(model, x_T, c, steps=50)    # ~ z0
    z_edit = ddim_reconstruct(model, x_T, model.get_learned_conditioning(n * ["a red *"]), steps=50)

Schedules. "aligned" (default) is the exact mirror of the sampler's S steps: step i goes from the sampler's
a_prev[i] (a_prev[0] = abar_0, the reference's quirk) up to a_t[i] = abar[t_i], with the noise estimate
eps(x, t_i) taken at the current, less noisy x (the usual approximation eps(x_{t-1}, t) ~ eps(x_t, t),
as diffusers' DDIMInverseScheduler and null-text inversion do). "official" is the reference's
`invert_ddim` (pycache only, reference_spec.md section 14): x0 is taken as being at level a_t[0], eps is
taken at (x, t_i) with x at level a_t[i], and S - 1 steps go up to a_t[S - 1]. With guidance (scale > 1) the
same rule as sampling is used (eps_u + s (eps_c - eps_u)); the round trip is then no longer near exact,
because the guided ODE is not the one the inverse walk integrates well at large s.
"""

from __future__ import annotations

import torch

from ldm.models.diffusion.ddim import DDIMSampler

SCHEDULES = ("aligned", "official")


@torch.no_grad()
def image_latent(model, images: torch.Tensor) -> torch.Tensor:
    """z0 = scale_factor * mode of the first stage's posterior, for images [B, 3, H, W] in [-1, 1]
    (deterministic; training draws a posterior sample instead)."""
    posterior = model.encode_first_stage(images.to(model.device))
    z = posterior.mode() if hasattr(posterior, "mode") else posterior
    return model.scale_factor * z


def _levels(sampler: DDIMSampler, schedule: str):
    """[(alpha-bar of the current x, alpha-bar after the step, the timestep eps is taken at)]."""
    a_t = [float(a) for a in sampler.ddim_alphas]
    a_prev = [float(a) for a in sampler.ddim_alphas_prev]
    steps = [int(t) for t in sampler.ddim_timesteps]
    if schedule == "aligned":
        return [(a_prev[i], a_t[i], steps[i]) for i in range(len(steps))]
    if schedule == "official":
        return [(a_t[i], a_t[i + 1], steps[i]) for i in range(len(steps) - 1)]
    raise ValueError(f"schedule must be one of {SCHEDULES}, got '{schedule}'")


@torch.no_grad()
def ddim_invert(model, z0: torch.Tensor, cond, steps: int, unconditional_conditioning=None, scale: float = 1.0,
                schedule: str = "aligned", return_intermediates: bool = False):
    """x_T for the clean latent `z0` under `cond`: the eta = 0 DDIM update run from image to noise.

    `steps` DDIM steps (the sampler's uniform schedule); guidance `scale` with `unconditional_conditioning`
    (the empty prompt's encoding) as in sampling. Returns x_T, or (x_T, [x after each step]).
    """
    if steps < 1 or steps > model.num_timesteps:
        raise ValueError(f"steps {steps}: expected 1..{model.num_timesteps}")
    if scale != 1.0 and unconditional_conditioning is None:
        raise ValueError(f"scale {scale} needs unconditional_conditioning (the empty prompt's encoding)")
    sampler = DDIMSampler(model)
    sampler.make_schedule(steps, ddim_eta=0.0, verbose=False)
    x = z0.to(model.device)
    inter = [x]
    for a_cur, a_next, t in _levels(sampler, schedule):
        ts = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = sampler.guided_eps(x, ts, cond, scale, unconditional_conditioning)
        pred_x0 = (x - (1.0 - a_cur) ** 0.5 * eps) / a_cur**0.5
        x = a_next**0.5 * pred_x0 + (1.0 - a_next) ** 0.5 * eps
        inter.append(x)
    return (x, inter) if return_intermediates else x


@torch.no_grad()
def ddim_reconstruct(model, x_T: torch.Tensor, cond, steps: int, unconditional_conditioning=None,
                     scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """The DDIM sampler (eta = 0) from a given x_T: the inverse of `ddim_invert` with the same `steps`.

    `seed` only feeds the sampler's sigma = 0 noise draws (kept for the reference's RNG stream; they are
    multiplied by 0), so the global RNG is left alone."""
    g = torch.Generator(device=x_T.device).manual_seed(seed)
    z, _ = DDIMSampler(model).sample(steps, x_T.shape[0], tuple(x_T.shape[1:]), cond, eta=0.0, verbose=False,
                                     x_T=x_T, unconditional_guidance_scale=scale,
                                     unconditional_conditioning=unconditional_conditioning, generator=g)
    return z
