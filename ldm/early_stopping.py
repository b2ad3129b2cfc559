"""Objective-based early stopping (after Voronov et al., NeurIPS 2023, arXiv 2302.04841): stop a textual
inversion run when the denoising loss on one fixed batch has stopped moving.

Every `every` steps the callback evaluates the model's ordinary training loss on a batch that never changes:
`batch_size` training items with their captions, timesteps, posterior noise and diffusion noise all drawn
once from `seed` (own generators: the run's random stream is untouched, so a run with the callback trains
exactly as one without it until it stops). Because nothing random changes between evaluations, the curve
moves only with the embedding. With L the evaluations so far and w = `window`, the run stops at the first
evaluation (not before `min_steps`, and with at least 2w evaluations) where

    var(last w of L) <= variance_ratio * var(L)                         (the paper's DVAR criterion)
    mean(last w) > (1 - threshold) * mean(the w before)                  (and the loss is not still falling)

The first line says the recent wobble is small against how far the loss has moved since the start; it
never fires while the loss has not moved at all (an embedding not learned yet). The second keeps a loss
that still falls steadily from stopping.

The vector at any one step swings (README, "Time to a good embedding"), so the embedding kept at the stop
is the mean of the vectors at the last `average` evaluations (1: the vector at the stop itself). It is
written as `embeddings_early_stop.pt` (with its `.safetensors` twin), and with `stop` the model's vectors
are set to it, so `embeddings.pt` and `last.ckpt` hold it too. The curve, the decision and the averaged
steps go to `<logdir>/early_stopping.json` and the logger (`early_stopping/loss`); the callback's state
(curve and recent vectors) is saved in the checkpoint, so a resumed run decides exactly as an uninterrupted
one.

Defaults are chosen on the bundled toy model (README, "Time to a good embedding"). `every` defaults to
max_steps / 60 (5 steps of the toy model's 300, 83 of the LDM recipe's 5,000), so `window` and `average`
span the same fraction of any run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytorch_lightning as pl
import torch

from ldm.data.resumable import seeded_global_rngs
from ldm.models.diffusion.textual_inversion import run_metadata
from ldm.util import atomic_write

AVERAGED_STEM = "embeddings_early_stop"  # the kept embedding's file name in the checkpoint folder


def plateaued(losses: list[float], window: int, variance_ratio: float, threshold: float) -> bool:
    """The stop rule of the module docstring (False until there are 2 * window values)."""
    if window < 1 or len(losses) < 2 * window:
        return False
    recent, before = losses[-window:], losses[-2 * window:-window]
    if _variance(recent) > variance_ratio * _variance(losses):
        return False
    return sum(recent) / window > (1.0 - threshold) * sum(before) / window


def _variance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


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
    """Stop training when the fixed-batch loss has stopped moving (see the module docstring).

    every: evaluate every this many optimizer steps (None: the trainer's max_steps / 60, at least 1).
    window: evaluations in the recent window (w). variance_ratio: the DVAR bound. threshold: the relative
    fall between two windows that still counts as falling. min_steps: never stop before this step.
    average: evaluations whose vectors are averaged into the kept embedding (1: the vector at the stop).
    batch_size, seed: the fixed batch. path: the curve's JSON (default `<logdir>/early_stopping.json`).
    stop: False only records the curve, the step the rule picks (`stopped_at`) and the averaged embedding,
    and trains on: the time-to-quality benchmark uses it to score the rule against a full run.
    """

    def __init__(self, every: int | None = None, window: int = 4, variance_ratio: float = 0.2,
                 threshold: float = 0.02, min_steps: int = 0, average: int = 8, batch_size: int = 8,
                 seed: int = 0, path: str | None = None, stop: bool = True):
        super().__init__()
        for name, value in (("every", every or 1), ("window", window), ("average", average),
                            ("batch_size", batch_size)):
            if int(value) < 1:
                raise ValueError(f"ObjectiveEarlyStopping: {name} must be >= 1, got {value}")
        for name, value in (("variance_ratio", variance_ratio), ("threshold", threshold)):
            if not value > 0:
                raise ValueError(f"ObjectiveEarlyStopping: {name} must be > 0, got {value}")
        self.every = int(every) if every else None
        self.window, self.variance_ratio, self.threshold = int(window), float(variance_ratio), float(threshold)
        self.min_steps, self.average = int(min_steps), int(average)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.path, self.stop = path, bool(stop)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.vectors: list[dict[str, torch.Tensor]] = []  # at the last `average` evaluations
        self.stopped_at: int | None = None
        self.averaged_steps: list[int] = []
        self._batch: FixedBatch | None = None

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "losses": list(self.losses), "stopped_at": self.stopped_at,
                "vectors": [dict(v) for v in self.vectors], "averaged_steps": list(self.averaged_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.losses = list(state["steps"]), list(state["losses"])
        self.stopped_at = state.get("stopped_at")
        self.vectors = [dict(v) for v in state.get("vectors", [])]
        self.averaged_steps = list(state.get("averaged_steps", []))

    def fixed_batch(self, trainer, pl_module) -> FixedBatch:
        if self._batch is None:
            dataset = trainer.datamodule.datasets["train"] if trainer.datamodule is not None else None
            if dataset is None:
                raise ValueError("ObjectiveEarlyStopping needs the data module's train dataset")
            self._batch = FixedBatch(pl_module, dataset, self.batch_size, self.seed)
        return self._batch

    def on_train_start(self, trainer, pl_module):
        if getattr(pl_module, "embedding_manager", None) is None:
            raise ValueError("ObjectiveEarlyStopping needs a textual inversion model (personalization_config)")
        if self.every is None:
            self.every = max(1, int(trainer.max_steps) // 60) if trainer.max_steps and trainer.max_steps > 0 else 10

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = pl_module.global_step
        if step % self.every or (self.steps and self.steps[-1] >= step):
            return
        loss = self.fixed_batch(trainer, pl_module).loss(pl_module)
        self.steps.append(step)
        self.losses.append(loss)
        manager = pl_module.embedding_manager
        self.vectors = [*self.vectors, {k: v.detach().float().cpu().clone()
                                        for k, v in manager.string_to_param_dict.items()}][-self.average:]
        pl_module.log("early_stopping/loss", loss, on_step=True, on_epoch=False, logger=True)
        if self.stopped_at is None and step >= self.min_steps and plateaued(self.losses, self.window,
                                                                              self.variance_ratio, self.threshold):
            self.stopped_at = step
            self.averaged_steps = self.steps[-len(self.vectors):]
            pl.utilities.rank_zero_info(
                f"Early stopping at step {step}: the fixed-batch loss has stopped moving; the kept embedding "
                f"averages the vectors of steps {self.averaged_steps[0]}-{self.averaged_steps[-1]}")
            self.keep_average(trainer, pl_module)
        if self.stop and self.stopped_at is not None:
            trainer.should_stop = True
        if trainer.is_global_zero:
            self.write(trainer)

    @torch.no_grad()
    def keep_average(self, trainer, pl_module) -> None:
        """Write the averaged embedding; with `stop`, leave it in the model (so the run's last files hold it)."""
        params = pl_module.embedding_manager.string_to_param_dict
        raw = {k: v.detach().clone() for k, v in params.items()}
        for key, vector in params.items():  # a progressive word that grew meanwhile: only its current rows
            same = [v[key] for v in self.vectors if key in v and v[key].shape == vector.shape]
            vector.copy_(torch.stack(same).mean(0).to(vector))
        dirpath = getattr(getattr(trainer, "checkpoint_callback", None), "dirpath", None)
        if trainer.is_global_zero and dirpath:
            os.makedirs(dirpath, exist_ok=True)
            manager = pl_module.embedding_manager
            meta = {**run_metadata(manager, dirpath, pl_module.global_step),
                    "early_stop_averaged_steps": ",".join(map(str, self.averaged_steps))}
            manager.save(os.path.join(dirpath, f"{AVERAGED_STEM}.pt"))
            manager.save(os.path.join(dirpath, f"{AVERAGED_STEM}.safetensors"), meta=meta)
        if not self.stop:
            for key, vector in params.items():
                vector.copy_(raw[key])

    def write(self, trainer) -> None:
        path = self.path or os.path.join(trainer.logdir if hasattr(trainer, "logdir") else trainer.default_root_dir,
                                         "early_stopping.json")
        record = {"every": self.every, "window": self.window, "variance_ratio": self.variance_ratio,
                  "threshold": self.threshold, "min_steps": self.min_steps, "average": self.average,
                  "batch_size": self.batch_size, "seed": self.seed, "stop": self.stop, "steps": self.steps,
                  "losses": self.losses, "stopped_at": self.stopped_at, "averaged_steps": self.averaged_steps}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
