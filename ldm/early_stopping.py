"""Objective-based early stopping (after Voronov et al., NeurIPS 2023, arXiv 2302.04841): stop a textual
inversion run when the denoising loss on one fixed batch stops falling.

Every `every` steps the callback evaluates the model's ordinary training loss on a batch that never changes:
`batch_size` training items with their captions, timesteps, posterior noise and diffusion noise all drawn
once from `seed` (own generators: the run's random stream is untouched, so a run with the callback trains
exactly as one without it until it stops). Because nothing random changes between evaluations, the curve
moves only with the embedding. With L_k the k-th evaluation, the run stops at the first evaluation where

    |mean(L[k-w+1 .. k]) - mean(L[k-2w+1 .. k-w])| / mean(L[k-2w+1 .. k-w]) < threshold

(w = `window`), and not before `min_steps`. The curve and the decision go to `<logdir>/early_stopping.json`
and to the logger (`early_stopping/loss`); the embedding at the stop is what `embeddings.pt` holds. The
callback's state (the curve) is saved in the checkpoint, so a resumed run decides exactly as an
uninterrupted one.

Defaults are chosen on the bundled toy model (README, "Time to a good embedding"); `every` counts
optimizer steps, so for the paper's recipes (5,000 steps) scale it with the configured run length.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytorch_lightning as pl
import torch

from ldm.data.resumable import seeded_global_rngs
from ldm.util import atomic_write


def plateaued(losses: list[float], window: int, threshold: float) -> bool:
    """Whether the mean of the last `window` losses differs from the mean of the `window` before by less
    than `threshold`, relative to the earlier mean (False until there are 2 * window values)."""
    if window < 1 or len(losses) < 2 * window:
        return False
    before = sum(losses[-2 * window:-window]) / window
    last = sum(losses[-window:]) / window
    return abs(last - before) < threshold * abs(before)


class FixedBatch:
    """A training batch and every random draw of its loss, fixed once from `seed`."""

    def __init__(self, model, dataset, batch_size: int, seed: int):
        with seeded_global_rngs(seed):  # the dataset's own draws (template, flip) for these items
            items = [dataset[i % len(dataset)] for i in range(batch_size)]
        self.batch = {k: _collate([item[k] for item in items]) for k in items[0] if k != "sample_key"}
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            image = self.batch[model.first_stage_key]
            moments_shape = model.encode_first_stage(
                image.permute(0, 3, 1, 2).float().to(model.device)).mean.shape
        self.posterior_noise = torch.randn(moments_shape, generator=g)
        self.t = torch.randint(0, model.num_timesteps, (batch_size,), generator=g)
        self.noise = torch.randn(moments_shape, generator=g)

    @torch.no_grad()
    def loss(self, model) -> float:
        device = model.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.batch.items()}
        loss, _ = model.shared_step(batch, posterior_noise=self.posterior_noise.to(device), t=self.t.to(device),
                                    noise=self.noise.to(device))
        return float(loss)


def _collate(values: list):
    return torch.stack([torch.as_tensor(v) for v in values]) if not isinstance(values[0], str) else values


class ObjectiveEarlyStopping(pl.Callback):
    """Stop training when the fixed-batch loss plateaus (see the module docstring).

    every: evaluate every this many optimizer steps (None: the trainer's max_steps / 30, at least 1).
    window: evaluations per half of the comparison.
    threshold: relative change below which the run stops. min_steps: never stop before this step.
    batch_size, seed: the fixed batch. path: the curve's JSON (default `<logdir>/early_stopping.json`).
    stop: False only records the curve and the step the rule picks (`stopped_at`), and trains on: the
    time-to-quality benchmark uses it to score the rule against a full run.
    """

    def __init__(self, every: int | None = None, window: int = 3, threshold: float = 0.01, min_steps: int = 0,
                 batch_size: int = 8, seed: int = 0, path: str | None = None, stop: bool = True):
        super().__init__()
        for name, value in (("every", every or 1), ("window", window), ("batch_size", batch_size)):
            if int(value) < 1:
                raise ValueError(f"ObjectiveEarlyStopping: {name} must be >= 1, got {value}")
        if not threshold > 0:
            raise ValueError(f"ObjectiveEarlyStopping: threshold must be > 0, got {threshold}")
        self.every = int(every) if every else None
        self.window, self.threshold = int(window), float(threshold)
        self.min_steps, self.batch_size, self.seed = int(min_steps), int(batch_size), int(seed)
        self.path, self.stop = path, bool(stop)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.stopped_at: int | None = None
        self._batch: FixedBatch | None = None

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "losses": list(self.losses), "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.losses = list(state["steps"]), list(state["losses"])
        self.stopped_at = state.get("stopped_at")

    def fixed_batch(self, trainer, pl_module) -> FixedBatch:
        if self._batch is None:
            dataset = trainer.datamodule.datasets["train"] if trainer.datamodule is not None else None
            if dataset is None:
                raise ValueError("ObjectiveEarlyStopping needs the data module's train dataset")
            self._batch = FixedBatch(pl_module, dataset, self.batch_size, self.seed)
        return self._batch

    def on_train_start(self, trainer, pl_module):
        if self.every is None:
            self.every = max(1, int(trainer.max_steps) // 30) if trainer.max_steps and trainer.max_steps > 0 else 10

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.global_step
        if step % self.every or (self.steps and self.steps[-1] >= step):
            return
        loss = self.fixed_batch(trainer, pl_module).loss(pl_module)
        self.steps.append(step)
        self.losses.append(loss)
        pl_module.log("early_stopping/loss", loss, on_step=True, on_epoch=False, logger=True)
        if self.stopped_at is None and step >= self.min_steps and plateaued(self.losses, self.window,
                                                                              self.threshold):
            self.stopped_at = step
            pl.utilities.rank_zero_info(f"Early stopping at step {step}: the fixed-batch loss changed by less "
                                        f"than {self.threshold:g} over {self.window} evaluations")
        if self.stop and self.stopped_at is not None:
            trainer.should_stop = True
        if trainer.is_global_zero:
            self.write(trainer)

    def write(self, trainer) -> None:
        path = self.path or os.path.join(trainer.logdir if hasattr(trainer, "logdir") else trainer.default_root_dir,
                                         "early_stopping.json")
        record = {"every": self.every, "window": self.window, "threshold": self.threshold,
                  "min_steps": self.min_steps, "batch_size": self.batch_size, "seed": self.seed, "stop": self.stop,
                  "steps": self.steps, "losses": self.losses, "stopped_at": self.stopped_at}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
