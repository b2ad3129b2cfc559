"""Lightning callbacks of the training entry point; configs name them as `main.SetupCallback`,
`main.ImageLogger`, `main.CUDACallback` and `main.LearningRateMonitor` (as in latent-diffusion's `main.py`).

Ported to Lightning 2 from latent-diffusion's `main.py`. Local changes: hooks renamed to their
Lightning 2 equivalents; only rank 0 writes files; no torchvision (grids via `ldm.image_grid`); the
CUDA callback is a no-op off GPU; step numbering follows Lightning 2 (`global_step` counts finished
optimizer steps, so the reference's `gs-000500` image is written after 500 updates here, after 501 there;
docs/DIFFERENCES.md#lightning-2-port).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor  # noqa: F401  (re-exported by main)
from pytorch_lightning.utilities import rank_zero_info

from ldm.data.resumable import derive_seed
from ldm.image_grid import make_grid, save_image, to_uint8

logger = logging.getLogger(__name__)


class SetupCallback(pl.Callback):
    """Create the run folders and snapshot the configs when fitting starts; save on Ctrl-C."""

    def __init__(self, resume, now, logdir, ckptdir, cfgdir, config, lightning_config):
        super().__init__()
        self.resume = resume
        self.now = now
        self.logdir = logdir
        self.ckptdir = ckptdir
        self.cfgdir = cfgdir
        self.config = config
        self.lightning_config = lightning_config

    def on_fit_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        for d in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(d, exist_ok=True)
        rank_zero_info("Project config\n" + OmegaConf.to_yaml(self.config))
        OmegaConf.save(self.config, os.path.join(self.cfgdir, f"{self.now}-project.yaml"))
        rank_zero_info("Lightning config\n" + OmegaConf.to_yaml(self.lightning_config))
        OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}),
                       os.path.join(self.cfgdir, f"{self.now}-lightning.yaml"))

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            rank_zero_info("Summoning checkpoint.")
            trainer.save_checkpoint(os.path.join(self.ckptdir, "last.ckpt"))


class ImageLogger(pl.Callback):
    """Every `batch_frequency` steps, write the model's `log_images` panels as JPEG grids.

    Files: `<save_dir>/images/<split>/<key>_gs-<step:06>_e-<epoch:06>_b-<batch:06>.jpg`, `save_dir` being the
    logger's (the run's log dir). With `increase_log_steps` it also logs at steps 1, 2, 4, ... first.
    """

    def __init__(self, batch_frequency, max_images, clamp=True, increase_log_steps=True, rescale=True,
                 disabled=False, log_on_batch_idx=False, log_first_step=False, log_images_kwargs=None):
        super().__init__()
        self.rescale = rescale
        self.batch_freq = batch_frequency
        self.max_images = max_images
        if increase_log_steps:
            self.log_steps = [2**n for n in range(int(np.log2(batch_frequency)) + 1)]
        else:
            self.log_steps = [batch_frequency]
        self.clamp = clamp
        self.disabled = disabled
        self.log_on_batch_idx = log_on_batch_idx
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.log_first_step = log_first_step

    def check_frequency(self, check_idx: int) -> bool:
        if ((check_idx % self.batch_freq) == 0 or (check_idx in self.log_steps)) and (
            check_idx > 0 or self.log_first_step
        ):
            if self.log_steps:
                self.log_steps.pop(0)
            return True
        return False

    def _save_dir(self, trainer) -> str:
        lg = trainer.logger
        return (getattr(lg, "save_dir", None) if lg is not None else None) or trainer.default_root_dir

    def log_img(self, trainer, pl_module, batch, batch_idx, split="train"):
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if not (callable(getattr(pl_module, "log_images", None)) and self.max_images > 0
                and self.check_frequency(check_idx)):
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        finally:
            pl_module.train(was_training)
        if trainer.is_global_zero:
            self.write(trainer, pl_module, images, batch_idx, split)

    def write(self, trainer, pl_module, images, batch_idx, split):
        root = Path(self._save_dir(trainer)) / "images" / split
        for key, value in images.items():
            value = value[: self.max_images].detach().float().cpu()
            if self.clamp:
                value = value.clamp(-1.0, 1.0)
            grid = make_grid(value, nrow=4)
            if self.rescale:
                grid = (grid + 1.0) / 2.0
            name = f"{key}_gs-{pl_module.global_step:06}_e-{pl_module.current_epoch:06}_b-{batch_idx:06}.jpg"
            save_image(to_uint8(grid), root / name)
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(f"{split}/{key}", ((make_grid(value) + 1.0) / 2.0).clamp(0, 1),
                                     global_step=pl_module.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.disabled and (pl_module.global_step > 0 or self.log_first_step):
            self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not self.disabled and pl_module.global_step > 0:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")


class CUDACallback(pl.Callback):
    """Report epoch time and, on a CUDA device, peak GPU memory per epoch (no-op for memory elsewhere)."""

    def _cuda_device(self, trainer):
        device = trainer.strategy.root_device
        return device if torch.cuda.is_available() and device.type not in ("cpu", "mps") else None

    # A mid-epoch restore (`--resume` after a kill) skips on_train_epoch_start of the interrupted epoch, so
    # the clock also starts in on_train_start and the epoch end never depends on the epoch start.
    start_time: float | None = None

    def _start_clock(self, trainer):
        device = self._cuda_device(trainer)
        if device is not None:
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        self.start_time = time.time()

    def on_train_start(self, trainer, pl_module):
        self._start_clock(trainer)

    def on_train_epoch_start(self, trainer, pl_module):
        self._start_clock(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        device = self._cuda_device(trainer)
        if device is not None:
            torch.cuda.synchronize(device)
        if self.start_time is None:  # no train start seen (e.g. a loop driven by hand): nothing to report
            return
        epoch_time = trainer.strategy.reduce(torch.tensor(time.time() - self.start_time)).item()
        rank_zero_info(f"Average Epoch time: {epoch_time:.2f} seconds")
        if device is not None:
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            peak = trainer.strategy.reduce(torch.tensor(peak, device=device)).item()
            rank_zero_info(f"Average Peak memory {peak:.2f}MiB")


class StepSeedCallback(pl.Callback):
    """Seed torch before every training batch from the run's seed and the batch's identity.

    The identity is the first `sample_key` of the batch (a unique position in the data stream, see
    `ldm.data.resumable`), else (epoch, batch index), and the rank. The model's random draws of a step
    (posterior sample, timestep, noise) then depend only on what is trained on, which makes `--resume`
    exact. (The reference seeded once at start.)
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        keys = batch.get("sample_key") if isinstance(batch, dict) else None
        position = (int(keys[0]),) if keys is not None else (trainer.current_epoch, batch_idx)
        torch.manual_seed(derive_seed(self.seed, *position, trainer.global_rank))


class EmbeddingSyncCheck(pl.Callback):
    """At the end of training, check that every DDP rank holds the same learned vectors (and say so)."""

    def on_train_end(self, trainer, pl_module):
        manager = getattr(pl_module, "embedding_manager", None)
        if manager is None or trainer.world_size < 2:
            return
        vec = torch.cat([p.detach().flatten() for p in manager.embedding_parameters()])
        gathered = pl_module.all_gather(vec)
        diff = (gathered - gathered[0]).abs().max().item()
        rank_zero_info(f"embedding identical on {trainer.world_size} ranks: max difference {diff:.3g}")
        if diff > 0:
            raise RuntimeError(f"DDP ranks disagree on the learned embedding (max difference {diff:.3g})")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or embedding; the run stops without saving it."""


class TrainProgress(pl.Callback):
    """The global step training (re)started at, after any checkpoint restore; None before training starts.

    `fit` saves an emergency checkpoint only for a run that trained past it, so a failed `--resume` (or a
    crash before the first step) never replaces the files of the run it was meant to continue.
    """

    start_step: int | None = None

    def on_train_start(self, trainer, pl_module):
        self.start_step = int(trainer.global_step)

    def trained(self, trainer) -> bool:
        return self.start_step is not None and int(trainer.global_step) > self.start_step


class FiniteGuard(pl.Callback):
    """Stop at the first optimizer step whose loss or learned embedding is not finite.

    It runs before the checkpoint callback of that step (Lightning orders checkpoint callbacks last), so no
    non-finite vector reaches `embeddings.pt` or `last.ckpt`: the files of the last checkpoint stay as they
    were. The model's embedding is set back to the last finite values, and `NonFiniteError` names the step.
    """

    def __init__(self):
        super().__init__()
        self._last: list[torch.Tensor] | None = None

    @staticmethod
    def _params(pl_module) -> list[torch.Tensor]:
        manager = getattr(pl_module, "embedding_manager", None)
        return list(manager.embedding_parameters()) if manager is not None else []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._last = [p.detach().clone() for p in self._params(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        why = None
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            why = f"the loss is {loss.detach().float().mean().item()}"
        elif not all(bool(torch.isfinite(p.detach()).all()) for p in self._params(pl_module)):
            why = "the learned embedding is no longer finite"
        if why is None:
            return
        if self._last is not None:
            with torch.no_grad():
                for p, old in zip(self._params(pl_module), self._last, strict=True):
                    p.copy_(old)
        raise NonFiniteError(
            f"training stopped at step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx}): "
            f"{why}; the files of the last checkpoint are kept. Lower model.base_learning_rate "
            "(or check the data)")


class LatentCacheCheckpoint(pl.Callback):
    """Carry the model's first-stage cache (`cache_first_stage`) in training checkpoints (key `latent_cache`).

    Without it a run resumed mid-epoch recomputes the moments of the images in other batch groupings than
    the uninterrupted run did, which changes their last bits, and the two runs drift apart by ~1e-8.
    """

    KEY = "latent_cache"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        cache = getattr(pl_module, "latent_cache", None)
        if cache is not None:
            checkpoint[self.KEY] = cache.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        cache = getattr(pl_module, "latent_cache", None)
        state = checkpoint.get(self.KEY)
        if cache is not None and state is not None:
            cache.load_state_dict(state)
