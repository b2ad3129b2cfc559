"""Exponential moving average of a module's trainable parameters (`LitEma`).

Ported from CompVis/latent-diffusion@5a6571e `ldm/modules/ema.py`. The buffer names are an on-disk
format: `decay`, `num_updates`, and one buffer per trainable parameter named after it with the dots
removed (`diffusion_model.out.2.weight` -> `diffusion_modelout2weight`). Local changes: none in behaviour;
`copy_to`/`store`/`restore` use a name map built once.
"""

from __future__ import annotations

import torch
from torch import nn


class LitEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be between 0 and 1, got {decay}")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer(
            "num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int)
        )
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update; warm-up decay min(decay, (1 + n) / (10 + n)) when counting updates."""
        decay = self.decay.item()
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(decay, (1 + self.num_updates.item()) / (10 + self.num_updates.item()))
        one_minus_decay = 1.0 - decay
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                s = shadow[self.m_name2s_name[name]]
                s.sub_(one_minus_decay * (s - p.detach().to(s.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(shadow[self.m_name2s_name[name]])

    def store(self, parameters) -> None:
        """Save the current parameters so `restore` can put them back after `copy_to`."""
        self.collected_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters) -> None:
        for c, p in zip(self.collected_params, parameters, strict=True):
            p.copy_(c)
