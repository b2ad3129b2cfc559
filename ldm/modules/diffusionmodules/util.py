"""Diffusion helpers: noise schedules, DDIM step selection, and small nn building blocks.

Ported from CompVis/latent-diffusion@5a6571e (`ldm/modules/diffusionmodules/util.py`, import path kept), which
took these from openai/improved-diffusion and guided-diffusion. Local changes:
- `checkpoint` really checkpoints (non-reentrant `torch.utils.checkpoint`) when its flag asks; the UNet's
  `gradient_checkpointing` option (off by default, as in the official TI code, which hard-disabled it)
  decides that flag.
- `GroupNorm32` also upcasts its affine parameters, so a half-precision UNet torso works (identical in fp32).
- `CheckpointFunction`, `SiLU`, `HybridConditioner`, `betas_for_alpha_bar` and `mean_flat` (unused) are not
  carried over.

Notation: `alphas_cumprod` is abar_t = prod_{s<=t} (1 - beta_s); schedules are computed in float64.
"""

from __future__ import annotations

import logging
import math
import operator

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

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

    Fix (docs/DIFFERENCES.md#ddim-step-count): where the +1 puts the last step at T (out of range, the
    reference's `IndexError: index 1000`; for T=1000 "uniform" that is S = 3, 9, 27, 36-37, 101-111,
    251-333 and 501-1000, i.e. T // S divides T - 1), the steps are returned without the +1: the same
    spacing shifted down by one, ending at T - 1 (S=3 gives [0, 333, 666, 999]), and a warning says so.
    Every other S returns the reference's array unchanged. S outside [1, T] raises a ValueError.
    """
    try:
        num_ddim_timesteps = operator.index(num_ddim_timesteps)
    except TypeError:
        raise ValueError(f"ddim_steps must be an integer, got {num_ddim_timesteps!r}") from None
    if not 1 <= num_ddim_timesteps <= num_ddpm_timesteps:
        raise ValueError(f"ddim_steps must be between 1 and the model's {num_ddpm_timesteps} diffusion "
                         f"timesteps, got {num_ddim_timesteps}")
    if ddim_discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        steps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif ddim_discr_method == "quad":
        steps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise NotImplementedError(f"There is no ddim discretization method called '{ddim_discr_method}'")
    steps_out = steps + 1
    if steps_out[-1] >= num_ddpm_timesteps:
        steps_out = steps
        logger.warning(
            "DDIM '%s' with ddim_steps=%d of T=%d: the reference's timesteps end at %d (out of range, it "
            "crashes); using them shifted down by one (%d..%d), so this schedule differs from the reference",
            ddim_discr_method, num_ddim_timesteps, num_ddpm_timesteps, steps[-1] + 1, steps[0], steps[-1],
        )
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


# ---------------------------------------------------------------------------------------------------
# nn building blocks (used by openaimodel.py and attention.py)
# ---------------------------------------------------------------------------------------------------

def checkpoint(func, inputs, params, flag: bool):
    """Evaluate `func(*inputs)`, recomputing its activations in the backward pass when `flag` is true.

    The official Textual Inversion code hard-disabled this function, so configs' `use_checkpoint: True`
    never saved memory; the UNet therefore passes `flag` true only when its `gradient_checkpointing` option
    is on (off by default). Uses non-reentrant `torch.utils.checkpoint`, which works with frozen parameters
    (the reason the official code disabled its reentrant version) and gives identical numerics.

    :param func: the function to evaluate.
    :param inputs: sequence of arguments for `func` (tensors or None).
    :param params: accepted for API compatibility with ldm and unused: the non-reentrant implementation
        finds the parameters `func` uses by itself.
    :param flag: whether to checkpoint; ignored (no checkpointing) while autograd is not recording.
    """
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal timestep embeddings, [B] -> [B, dim], float32 (or the raw timestep repeated).

    freqs_k = exp(-ln(max_period) * k / half) for k = 0..half-1 (half = dim // 2), args = t * freqs and the
    embedding is [cos(args), sin(args)] (cos first, as ldm), zero-padded by one column when `dim` is odd.
    With `repeat_only` the raw timestep is repeated `dim` times instead.
    """
    if repeat_only:
        return timesteps[:, None].expand(timesteps.shape[0], dim).contiguous()
    half = dim // 2
    # Computed on the CPU, as the official code does, then moved: keeps the frequencies bit-identical on
    # every device (a 1-ulp difference in a frequency becomes ~1e-4 in cos(t * f) at t ~ 1000).
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None].to(device=timesteps.device)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of `module` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply the parameters of `module` by `scale` in place and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that normalises in float32 and casts the result back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The affine parameters are upcast too, so a half-precision torso (UNetModel.convert_to_fp16) works;
        # for float32 weights `.float()` is the identity, i.e. exactly the official computation.
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return nn.functional.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's standard normalisation layer: GroupNorm32 with 32 groups (eps 1e-5)."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution module."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")


def linear(*args, **kwargs) -> nn.Module:
    """A linear module (nn.Linear)."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D average-pooling module."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims} (expected 1, 2 or 3)")
