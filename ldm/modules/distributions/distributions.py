"""Distributions returned by first-stage encoders, and the Gaussian KL helper.

Ported from CompVis/latent-diffusion@5a6571e, `ldm/modules/distributions/distributions.py` (unchanged in
rinongal/textual_inversion); `normal_kl` comes from openai/improved-diffusion (`losses.py`).

Local changes:
- `DiagonalGaussianDistribution.sample` takes optional `noise` (injectable randomness) and `generator`;
  without them it draws exactly as upstream (`torch.randn` on the CPU generator), so seeded runs keep the
  reference's random stream. The noise is cast to the parameters' dtype as well as moved to their device.
- Deterministic `kl`/`nll` return their zero on the parameters' device instead of always on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class AbstractDistribution:
    def sample(self) -> torch.Tensor:
        raise NotImplementedError()

    def mode(self) -> torch.Tensor:
        raise NotImplementedError()


class DiracDistribution(AbstractDistribution):
    """Point mass: sampling and the mode both return `value`."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def sample(self) -> torch.Tensor:
        return self.value

    def mode(self) -> torch.Tensor:
        return self.value


class DiagonalGaussianDistribution:
    """Gaussian with diagonal covariance, parametrised by stacked moments.

    parameters: [B, 2C, H, W]; channels [:C] are the mean, [C:] the log-variance, clamped to [-30, 20].
    With `deterministic=True` the variance is zero, so `sample()` returns the mean.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if self.deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(
        self, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Return mean + std * noise, shape [B, C, H, W].

        noise: a standard-normal tensor of the mean's shape; if None it is drawn with `torch.randn` on the
        CPU (from `generator`, which must then be a CPU generator, or the global CPU generator) and moved to
        the parameters' device. Drawing on the CPU even for GPU models is the reference behaviour
        [PRESERVE]: it keeps seed-exact runs identical across devices.
        """
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator)
        noise = noise.to(device=self.parameters.device, dtype=self.parameters.dtype)
        return self.mean + self.std * noise

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other), or KL(self || N(0, I)) if `other` is None, summed over [C, H, W]: shape [B]."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device)
        if other is None:
            return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            torch.pow(self.mean - other.mean, 2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device)
        logtwopi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(
            logtwopi + self.logvar + torch.pow(sample - self.mean, 2) / self.var, dim=list(dims)
        )

    def mode(self) -> torch.Tensor:
        return self.mean


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))); arguments broadcast.

    At least one argument must be a tensor; plain numbers are converted to its device and dtype.
    """
    tensor = next((obj for obj in (mean1, logvar1, mean2, logvar2) if isinstance(obj, torch.Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl: at least one argument must be a torch.Tensor")
    logvar1, logvar2 = (
        x if isinstance(x, torch.Tensor) else torch.tensor(x).to(tensor) for x in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )
