"""An exponential moving average of the learned vectors, saved beside the raw ones.

With a constant learning rate the learned vector never settles: on the toy model the quality of snapshots
taken 10 steps apart swings by about 0.15 (README, "Time to a good embedding"). The average over the last
~1 / (1 - decay) steps damps that swing without touching training: the optimizer still updates the raw
vectors, and the average is only read and written.

    lightning.callbacks.embedding_ema:
      target: ldm.embedding_ema.EmbeddingEMA
      params: {decay: 0.9}

Every time the run writes `embeddings.pt` / `embeddings_gs-<step>.pt`, this writes `embeddings_ema.pt` /
`embeddings_ema_gs-<step>.pt` in the same format (the official `.pt`), each with its `.safetensors` twin
(metadata as the raw files' plus `ema_decay`). The average is part of the
checkpoint (callback state), so `--resume` continues it exactly.
"""

from __future__ import annotations

import contextlib
import os

import pytorch_lightning as pl
import torch

from ldm.models.diffusion.textual_inversion import save_embedding_files


class EmbeddingEMA(pl.Callback):
    """ema <- decay * ema + (1 - decay) * vector after every optimizer step, per placeholder."""

    def __init__(self, decay: float = 0.9):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EmbeddingEMA: decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {}

    @staticmethod
    def _vectors(pl_module) -> dict[str, torch.Tensor]:
        manager = getattr(pl_module, "embedding_manager", None)
        if manager is None:
            raise ValueError("EmbeddingEMA needs a textual inversion model (personalization_config)")
        return dict(manager.string_to_param_dict.items())

    def on_train_start(self, trainer, pl_module):
        for key, vector in self._vectors(pl_module).items():
            self.shadow.setdefault(key, vector.detach().float().cpu().clone())

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for key, vector in self._vectors(pl_module).items():
            value = vector.detach().float().cpu()
            if key not in self.shadow or self.shadow[key].shape != value.shape:  # new or grown (progressive)
                self.shadow[key] = value.clone()
            else:
                self.shadow[key].mul_(self.decay).add_(value, alpha=1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}

    @contextlib.contextmanager
    def averaged(self, pl_module):
        """Inside the block the model's vectors are the averages; the raw ones come back afterwards."""
        vectors = self._vectors(pl_module)
        raw = {k: v.detach().clone() for k, v in vectors.items()}
        with torch.no_grad():
            for key, vector in vectors.items():
                if key in self.shadow:
                    vector.copy_(self.shadow[key].to(vector))
        try:
            yield
        finally:
            with torch.no_grad():
                for key, vector in vectors.items():
                    vector.copy_(raw[key])

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        dirpath = getattr(getattr(trainer, "checkpoint_callback", None), "dirpath", None)
        if not (trainer.is_global_zero and self.shadow and dirpath and os.path.isdir(dirpath)):
            return
        with self.averaged(pl_module):
            save_embedding_files(pl_module.embedding_manager, dirpath, pl_module.global_step,
                                 stem="embeddings_ema", meta={"ema_decay": self.decay})
