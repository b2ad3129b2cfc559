"""Learning-rate schedules for `model.params.scheduler_config` (latent-diffusion's `ldm/lr_scheduler.py`).

A schedule is a multiplier of the base learning rate per optimizer step, used through
`torch.optim.lr_scheduler.LambdaLR` (`interval: step`), as in latent-diffusion. The official textual
inversion configs set none (constant learning rate), which stays the default.

    scheduler_config:
      target: ldm.lr_scheduler.LambdaWarmUpCosineScheduler
      params: {warm_up_steps: 20, lr_start: 0.1, lr_max: 1.0, lr_min: 0.05, max_decay_steps: 300}
"""

from __future__ import annotations

import math


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from `lr_start` to `lr_max` over `warm_up_steps`, then a half cosine down to `lr_min`
    at `max_decay_steps`, constant after. Values are multipliers of the base learning rate.

    `max_decay_steps: null` means the run's `max_steps` (set by the model when the optimizer is built), so
    one config overlay fits runs of any length."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float,
                 max_decay_steps: int | None = None, verbosity_interval: int = 0):
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start, self.lr_max, self.lr_min = lr_start, lr_max, lr_min
        self.verbosity_interval = verbosity_interval  # accepted for config compatibility
        self.last_lr = 0.0
        self.lr_max_decay_steps = None
        if max_decay_steps is not None:
            self.set_decay_steps(max_decay_steps)

    def set_decay_steps(self, max_decay_steps: int) -> None:
        warm_up_steps = self.lr_warm_up_steps
        if warm_up_steps < 0 or max_decay_steps <= warm_up_steps:
            raise ValueError(f"LambdaWarmUpCosineScheduler: need 0 <= warm_up_steps < max_decay_steps, got "
                             f"{warm_up_steps} and {max_decay_steps}")
        self.lr_max_decay_steps = int(max_decay_steps)

    def schedule(self, n: int, **kwargs) -> float:
        if self.lr_max_decay_steps is None:
            raise ValueError("LambdaWarmUpCosineScheduler: max_decay_steps is not set (null needs max_steps)")
        if n < self.lr_warm_up_steps:
            lr = self.lr_start + (self.lr_max - self.lr_start) * n / self.lr_warm_up_steps
        else:
            t = min(1.0, (n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps))
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(t * math.pi))
        self.last_lr = lr
        return lr

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)
