"""Assembly of a training run for `main.py`: loggers, callbacks, trainer, model, data.

Each function is one step of the reference's `main.py` (spec 1.2-1.8), on Lightning 2.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ldm.cli import RunDirs, count_devices, learning_rate
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


def build_loggers(dirs: RunDirs, lightning_config: DictConfig) -> list:
    """CSV metrics always (`<logdir>/csv/version_0/metrics.csv`); TensorBoard when it is installed.

    A `lightning.logger` block (target/params) replaces both, as the reference's logger override.
    """
    if "logger" in lightning_config:
        return [instantiate_from_config(lightning_config.logger)]
    loggers = [pl.loggers.CSVLogger(save_dir=dirs.logdir, name="csv")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(pl.loggers.TensorBoardLogger(save_dir=dirs.logdir, name="tensorboard"))
    return loggers


def build_callbacks(dirs: RunDirs, config: DictConfig, lightning_config: DictConfig, model, seed: int) -> list:
    """Default callbacks of the reference merged with `lightning.callbacks` / `lightning.modelcheckpoint`."""
    ckpt_cfg = {"target": "pytorch_lightning.callbacks.ModelCheckpoint",
                "params": {"dirpath": dirs.ckptdir, "filename": "{epoch:06}", "verbose": True, "save_last": True}}
    # The reference monitored val/loss_simple_ema; Lightning 2 defers a monitored every-N-steps save until
    # the metric exists, which would skip embeddings_gs-N files. A TI run saves unmonitored instead.
    if getattr(model, "monitor", None) and getattr(model, "embedding_manager", None) is None:
        logger.info("Monitoring %s as checkpoint metric.", model.monitor)
        ckpt_cfg["params"].update(monitor=model.monitor, save_top_k=1)
    ckpt_cfg = OmegaConf.merge(ckpt_cfg, lightning_config.get("modelcheckpoint") or {})
    defaults = {
        "setup_callback": {"target": "main.SetupCallback",
                           "params": {"resume": dirs.resume_ckpt or "", "now": dirs.now, "logdir": dirs.logdir,
                                      "ckptdir": dirs.ckptdir, "cfgdir": dirs.cfgdir, "config": config,
                                      "lightning_config": lightning_config}},
        "image_logger": {"target": "main.ImageLogger",
                         "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
        "learning_rate_logger": {"target": "main.LearningRateMonitor", "params": {"logging_interval": "step"}},
        "cuda_callback": {"target": "main.CUDACallback"},
        "step_seed": {"target": "ldm.callbacks.StepSeedCallback", "params": {"seed": seed}},
    }
    if getattr(model, "embedding_manager", None) is not None:
        defaults["embedding_sync_check"] = {"target": "ldm.callbacks.EmbeddingSyncCheck"}
    cfg = OmegaConf.merge(defaults, lightning_config.get("callbacks") or {})
    callbacks = [instantiate_from_config(cfg[k]) for k in cfg]
    callbacks.append(instantiate_from_config(ckpt_cfg))
    return callbacks


def build_data(config: DictConfig, seed: int):
    """Instantiate and set up the data module; the run's seed makes the train loader resumable."""
    data_cfg = config.data
    if data_cfg.get("target") == "main.DataModuleFromConfig":
        data_cfg.params.seed = seed
    data = instantiate_from_config(data_cfg)
    data.prepare_data()
    data.setup()
    logger.info("#### Data #####")
    for k, v in data.datasets.items():
        logger.info("%s, %s, %d", k, type(v).__name__, len(v))
    return data


def set_learning_rate(model, config: DictConfig, trainer_cfg: dict, scale: bool) -> None:
    accumulate = int(trainer_cfg.get("accumulate_grad_batches", 1) or 1)
    trainer_cfg["accumulate_grad_batches"] = accumulate
    lr, msg = learning_rate(config.model.base_learning_rate, config.data.params.batch_size,
                            count_devices(trainer_cfg), accumulate, scale)
    model.learning_rate = lr
    pl.utilities.rank_zero_info(msg)


def save_last(trainer: pl.Trainer, dirs: RunDirs) -> None:
    """Write `last.ckpt` (and with it `embeddings.pt` and `embeddings_gs-<step>.pt`)."""
    os.makedirs(dirs.ckptdir, exist_ok=True)
    trainer.save_checkpoint(os.path.join(dirs.ckptdir, "last.ckpt"), weights_only=False)
