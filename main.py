"""Train a Textual Inversion embedding (or any latent-diffusion model) from YAML configs.

    python main.py --base configs/latent-diffusion/txt2img-1p4B-finetune.yaml -t \
        --actual_resume models/ldm/text2img-large/model.ckpt -n run --gpus 0, \
        --data_root imgs/ --init_word sculpture

Unknown arguments are OmegaConf overrides (`key.path=value`). The classes configs name as `main.X` are
re-exported here; importing this module has no side effects.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import pytorch_lightning as pl

from ldm.callbacks import CUDACallback, ImageLogger, LearningRateMonitor, SetupCallback  # noqa: F401
from ldm.cli import UsageError, apply_overrides, merge_configs, parse_args, run_dirs, trainer_settings
from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset  # noqa: F401
from ldm.modules.attention import set_attention_backend
from ldm.modules.diffusionmodules.util import set_gradient_checkpointing
from ldm.scripts_common import USER_ERRORS
from ldm.training import build_callbacks, build_data, build_loggers, save_last, set_learning_rate
from ldm.util import instantiate_from_config


def prepare(opt, unknown):
    """Everything before training; raises one of USER_ERRORS (reported as one line, exit code 1, a
    traceback with --debug) before anything is written."""
    dirs = run_dirs(opt)
    pl.seed_everything(opt.seed, workers=True)
    set_attention_backend(opt.attention)
    set_gradient_checkpointing(opt.gradient_checkpointing)
    config = merge_configs(dirs.resume_configs + list(opt.base), unknown)
    inverting = "personalization_config" in config.model.get("params", {})
    if opt.train and inverting and not dirs.resume_ckpt and not opt.actual_resume:
        raise UsageError("--actual_resume is required: the pretrained model checkpoint to invert against")
    lightning_config = config.pop("lightning", None) or {}
    trainer_cfg = trainer_settings(dict(lightning_config.get("trainer", None) or {}), opt)
    apply_overrides(config, opt)
    if opt.actual_resume:
        config.model.params.ckpt_path = opt.actual_resume
    if "data" in config:
        for split in ("train", "validation"):
            node = config.data.params.get(split)
            if node is not None and "personalized" in str(node.get("target")) and "data_root" not in node.params:
                raise UsageError(f"--data_root is required (data.params.{split}.params.data_root is not set)")
    data = build_data(config, opt.seed) if "data" in config else None
    model = instantiate_from_config(config.model)
    lightning_config.trainer = trainer_cfg
    return dirs, config, lightning_config, trainer_cfg, data, model


def run(opt, dirs, config, lightning_config, trainer_cfg, data, model) -> pl.Trainer:
    """Train (and test) a prepared run; returns the trainer."""
    callbacks = build_callbacks(dirs, config, lightning_config, model, opt.seed)
    trainer = pl.Trainer(**trainer_cfg, logger=build_loggers(dirs, lightning_config), callbacks=callbacks,
                         default_root_dir=dirs.logdir, use_distributed_sampler=False)
    trainer.logdir = dirs.logdir
    if data is not None:
        set_learning_rate(model, config, trainer_cfg, opt.scale_lr)

    def melk(*args):
        if trainer.is_global_zero:
            print("Summoning checkpoint.")
        save_last(trainer, dirs)

    if hasattr(signal, "SIGUSR1"):  # not on Windows (B5)
        signal.signal(signal.SIGUSR1, melk)

    if opt.train:
        try:
            trainer.fit(model, data, ckpt_path=dirs.resume_ckpt, weights_only=True)
        except Exception:
            melk()
            raise
        finally:
            if opt.debug and not dirs.resume_ckpt and trainer.is_global_zero:
                move_to_debug_runs(dirs)
        if not opt.debug:
            save_last(trainer, dirs)
    if not opt.no_test and not trainer.interrupted and data is not None and "test" in data.datasets:
        trainer.test(model, data)
    return trainer


def move_to_debug_runs(dirs) -> None:
    """`--debug`: a fresh run's log dir ends up in <logdir parent>/debug_runs/<name> (as the reference)."""
    target = os.path.join(os.path.dirname(dirs.logdir), "debug_runs", os.path.basename(dirs.logdir))
    if os.path.isdir(dirs.logdir):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(dirs.logdir, target)
        print(f"--debug: moved {dirs.logdir} to {target}")


def main(argv=None) -> int:
    opt, unknown = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prepared = prepare(opt, unknown)
    except USER_ERRORS as e:
        if opt.debug:
            raise
        print(f"main.py: error: {e}", file=sys.stderr)
        return 1
    run(opt, *prepared)
    return 0


if __name__ == "__main__":
    sys.exit(main())
