"""The one library entry point for a training run; `main.py` is a command line over it.

    from ldm.training import train
    run = train("configs/toy/invert.yaml", actual_resume="models/toy/toy_ldm.safetensors",
                data_root="imgs/", name="ring", seed=0, trainer={"max_steps": 300}, no_test=True)
    run.embeddings      # <logdir>/checkpoints/embeddings.pt
    run.snapshots       # {step: <logdir>/checkpoints/embeddings_gs-<step>.pt}

`TrainOptions` holds exactly what `main.py`'s flags say (same names, same defaults, except `train`, which is
true here); `train(base, **options)` builds one and runs it. A run goes in two steps: `prepare` (configs,
overrides, log folder name, data, model; raises one of `ldm.scripts_common.USER_ERRORS` before anything is
written) and `fit` (Lightning). Each helper below is one step of the official `main.py`, on Lightning 2.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ldm.callbacks import FiniteGuard, LatentCacheCheckpoint, NonFiniteError, TrainProgress
from ldm.checkpoint import verify_training_checkpoint
from ldm.cli import (
    RunDirs,
    UsageError,
    apply_overrides,
    check_number,
    check_override_keys,
    check_trainer_settings,
    check_writable_dir,
    claim_run_dir,
    count_devices,
    learning_rate,
    merge_configs,
    run_dirs,
    trainer_settings,
)
from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.personalized import is_personalized
from ldm.malloc import return_freed_memory
from ldm.modules.embedding_formats import read_embeddings
from ldm.util import atomic_write, get_obj_from_str, instantiate_from_config

logger = logging.getLogger(__name__)

EARLY_STOPPING = "ldm.early_stopping.ObjectiveEarlyStopping"
VALIDATION_PREVIEWS = "ldm.validation_previews.ValidationPreviews"


@dataclass
class TrainOptions:
    """A training run as `main.py`'s flags describe it (see `python main.py --help`).

    `overrides` are `key.path=value` config overrides; `trainer` holds the trainer flags (`max_steps`,
    `gpus`, `precision`, ...), which win over `lightning.trainer` in the YAML. The speed options
    `attention`, `gradient_checkpointing`, `frozen_weights`, `saved_activations`, `cache_first_stage`,
    `channels_last` and `small_gemm` are model options (`model.params.*`); None keeps the config's value,
    except `attention` ("sdpa"), `channels_last` and `small_gemm` (on), which apply unless the config sets
    them. `lean` fills the ones left None from `ldm.loading.LEAN_OPTIONS` (the low-memory preset) and fixes
    glibc's mmap threshold (`ldm/malloc.py`); its allocator (tcmalloc where the system has it, else glibc's
    huge pages) is chosen in the environment Python starts with, `ldm.malloc.lean_environment`, which
    `main.py --lean` sets by restarting itself.
    """

    base: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    trainer: dict[str, Any] = field(default_factory=dict)
    train: bool = True
    name: str = ""
    resume: str = ""
    no_test: bool = False
    debug: bool = False
    seed: int = 23
    postfix: str = ""
    logdir: str = "logs"
    scale_lr: bool = True
    datadir_in_name: bool = True
    actual_resume: str = ""
    data_root: str = ""
    embedding_manager_ckpt: str = ""
    placeholder_string: str | None = None
    init_word: str | None = None
    tokenizer_path: str | None = None
    attention: str | None = None
    gradient_checkpointing: bool | None = None
    frozen_weights: str | None = None
    saved_activations: str | None = None
    cache_first_stage: bool | None = None
    channels_last: bool | None = None
    small_gemm: bool | None = None
    lean: bool = False
    early_stopping: bool = False
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int | None = None
    validation_samples: int = 4
    validation_sampler: str = "dpmpp2m"
    validation_steps: int = 20
    validation_scale: float = 5.0
    validation_negative_prompt: str = ""
    project: str | None = None  # accepted for command-line compatibility; unused, as in the reference

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class Run:
    """What a finished (or interrupted) training run left behind."""

    logdir: Path
    config: DictConfig
    global_step: int
    metrics: dict[str, float]
    interrupted: bool
    model: Any = field(repr=False)
    trainer: pl.Trainer = field(repr=False)

    @property
    def ckptdir(self) -> Path:
        return self.logdir / "checkpoints"

    @property
    def last_ckpt(self) -> Path:
        return self.ckptdir / "last.ckpt"

    @property
    def embeddings(self) -> Path | None:
        """The final embedding file (`embeddings.pt`), or None for a run that trains no embedding."""
        path = self.ckptdir / "embeddings.pt"
        return path if path.is_file() else None

    @property
    def snapshots(self) -> dict[int, Path]:
        """The embedding files saved during training, by global step."""
        found = {}
        for path in self.ckptdir.glob("embeddings_gs-*.pt"):
            match = re.fullmatch(r"embeddings_gs-(\d+)\.pt", path.name)
            if match:
                found[int(match.group(1))] = path
        return dict(sorted(found.items()))


@dataclass
class TrainingJob:
    """A prepared run: everything `fit` needs, built before anything is written."""

    dirs: RunDirs
    config: DictConfig
    lightning_config: DictConfig
    trainer_cfg: dict
    data: Any
    model: Any


def train(base: str | Sequence[str] = (), **options: Any) -> Run:
    """Train as `main.py -t --base <base> ...` would, and return the `Run`. `options` are `TrainOptions`
    fields; an unknown one is a TypeError naming it."""
    unknown = sorted(set(options) - TrainOptions.names())
    if unknown:
        raise TypeError(f"train() got unknown option(s) {unknown}; see ldm.training.TrainOptions")
    base = [str(base)] if isinstance(base, (str, os.PathLike)) else [str(b) for b in base]
    opts = TrainOptions(base=base, **options)
    return fit(prepare(opts), opts)


def prepare(opts: TrainOptions) -> TrainingJob:
    """Everything before training; raises one of USER_ERRORS before anything is written."""
    if opts.placeholder_string is not None and not opts.placeholder_string.strip():
        raise UsageError("--placeholder_string is empty; give the word to learn, e.g. --placeholder_string '*'")
    if opts.init_word is not None and not opts.init_word.strip():
        raise UsageError("--init_word is empty; give a one-token word, e.g. --init_word sculpture")
    check_writable_dir(opts.logdir, "--logdir")
    dirs = run_dirs(opts)
    if dirs.resume_ckpt:  # before anything trusts it: a truncated or foreign last.ckpt is a one-line error
        verify_training_checkpoint(dirs.resume_ckpt)
    pl.seed_everything(opts.seed, workers=True)
    paths = dirs.resume_configs + list(opts.base)
    config = merge_configs(paths, list(opts.overrides))
    check_override_keys(merge_configs(paths, []), config, list(opts.overrides))
    if "model" not in config:
        raise UsageError(f"no 'model' section in {' + '.join(opts.base) or 'the configs'}")
    inverting = "personalization_config" in (config.model.get("params") or {})
    if opts.train and inverting and not dirs.resume_ckpt and not opts.actual_resume:
        raise UsageError("--actual_resume is required: the pretrained model checkpoint to invert against")
    lightning_config = config.pop("lightning", None) or OmegaConf.create()
    if opts.early_stopping:  # the callback with its defaults, unless the config already configures it
        lightning_config = OmegaConf.merge({"callbacks": {"early_stopping": {"target": EARLY_STOPPING}}},
                                           lightning_config)
    if opts.validation_prompts:
        lightning_config = OmegaConf.merge(lightning_config, validation_callbacks(opts))
    trainer_cfg = trainer_settings(dict(lightning_config.get("trainer", None) or {}), opts.trainer)
    check_trainer_settings(trainer_cfg, opts.trainer)
    apply_overrides(config, opts)
    check_training_values(config, opts)
    if opts.actual_resume:
        config.model.params.ckpt_path = opts.actual_resume
    if "data" in config:
        for split in ("train", "validation"):
            node = config.data.params.get(split)
            if node is not None and is_personalized(node) and "data_root" not in node.params:
                raise UsageError(f"--data_root is required (data.params.{split}.params.data_root is not set)")
    data = build_data(config, opts.seed) if "data" in config else None
    if opts.lean:
        return_freed_memory()
    model = instantiate_from_config(config.model)
    lightning_config.trainer = trainer_cfg
    return TrainingJob(dirs, config, lightning_config, trainer_cfg, data, model)


def validation_callbacks(opts: TrainOptions) -> DictConfig:
    """`--validation_prompts`: the `ValidationPreviews` callback with the flags' settings and the run's seed,
    checked now (a bad value is a UsageError before anything is written); it replaces the reference's
    image logger, whose previews sample 200 DDIM steps from fresh noise."""
    params = {"prompts": list(opts.validation_prompts), "every": opts.validation_every,
              "samples": opts.validation_samples, "sampler": opts.validation_sampler,
              "steps": opts.validation_steps, "scale": opts.validation_scale,
              "negative_prompt": opts.validation_negative_prompt, "seed": opts.seed}
    try:
        get_obj_from_str(VALIDATION_PREVIEWS)(**params)
    except ValueError as e:
        raise UsageError(str(e)) from e
    previews = {"target": VALIDATION_PREVIEWS, "params": params}
    return OmegaConf.create({"callbacks": {"validation_previews": previews,
                                           "image_logger": {"params": {"disabled": True}}}})


def check_training_values(config: DictConfig, opts: TrainOptions) -> None:
    """Values a run cannot mean: a learning rate or batch size that is not a positive number, an embedding
    file for another placeholder than the config trains."""
    if "base_learning_rate" in config.model:
        check_number(config.model.base_learning_rate, "model.base_learning_rate", positive=True)
    if "data" in config and "batch_size" in (config.data.get("params") or {}):
        check_number(config.data.params.batch_size, "data.params.batch_size", integer=True, minimum=1)
    personalization = config.model.get("params", {}).get("personalization_config")
    if opts.embedding_manager_ckpt and personalization is not None:
        held = sorted(read_embeddings(opts.embedding_manager_ckpt).vectors)
        wanted = sorted(personalization.params.get("placeholder_strings") or [])
        if held != wanted:
            raise UsageError(f"--embedding_manager_ckpt {opts.embedding_manager_ckpt} holds placeholder(s) {held}, "
                             f"the config trains {wanted}; pass --placeholder_string {held[0]!r} to continue it"
                             if len(held) == 1 else
                             f"--embedding_manager_ckpt {opts.embedding_manager_ckpt} holds placeholder(s) {held}, "
                             f"the config trains {wanted}")


def fit(job: TrainingJob, opts: TrainOptions) -> Run:
    """Train (and test) a prepared run.

    A new run's log folder is created here, atomically (`claim_run_dir`: `<name>_1` if another run took the
    name in the same second). The emergency save on an exception (and on SIGUSR1) only happens once the run
    has trained past the step it started or resumed at, and never after a non-finite step (`FiniteGuard`).
    """
    model, data = job.model, job.data
    dirs = job.dirs = claim_run_dir(job.dirs)
    progress = TrainProgress()
    callbacks = build_callbacks(dirs, job.config, job.lightning_config, model, opts.seed)
    callbacks += [progress, FiniteGuard(), LatentCacheCheckpoint()]
    trainer_cfg = dict(job.trainer_cfg)
    trainer_cfg.setdefault("plugins", [AtomicCheckpointIO()])
    trainer = pl.Trainer(**trainer_cfg, logger=build_loggers(dirs, job.lightning_config), callbacks=callbacks,
                         default_root_dir=dirs.logdir, use_distributed_sampler=False)
    trainer.logdir = dirs.logdir
    if data is not None:
        set_learning_rate(model, job.config, job.trainer_cfg, opts.scale_lr)

    def melk(*args):
        if not progress.trained(trainer):
            return
        if trainer.is_global_zero:
            print("Summoning checkpoint.")
        save_last(trainer, dirs)

    if hasattr(signal, "SIGUSR1"):  # Windows has no SIGUSR1
        signal.signal(signal.SIGUSR1, melk)

    logdir = dirs.logdir
    if opts.train:
        try:
            trainer.fit(model, data, ckpt_path=dirs.resume_ckpt, weights_only=True)
        except NonFiniteError:
            raise  # nothing non-finite is saved: the last checkpoint's files stay
        except Exception:
            melk()
            raise
        finally:
            if opts.debug and not dirs.resume_ckpt and trainer.is_global_zero:
                logdir = move_to_debug_runs(dirs)
        if not opts.debug:
            save_last(trainer, dirs)
    if not opts.no_test and not trainer.interrupted and data is not None and "test" in data.datasets:
        trainer.test(model, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    return Run(Path(logdir), job.config, trainer.global_step, metrics, trainer.interrupted, model, trainer)


def move_to_debug_runs(dirs: RunDirs) -> str:
    """`--debug`: a fresh run's log dir ends up in <logdir parent>/debug_runs/<name> (as the reference)."""
    target = os.path.join(os.path.dirname(dirs.logdir), "debug_runs", os.path.basename(dirs.logdir))
    if not os.path.isdir(dirs.logdir):
        return dirs.logdir
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(dirs.logdir, target)
    print(f"--debug: moved {dirs.logdir} to {target}")
    return target


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
    """Instantiate and set up the data module; the run's seed makes our data module's order resumable."""
    data_cfg = config.data
    cls = get_obj_from_str(str(data_cfg.get("target")))
    if isinstance(cls, type) and issubclass(cls, DataModuleFromConfig):
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


class AtomicCheckpointIO(pl.plugins.TorchCheckpointIO):
    """Lightning's torch checkpoint writer, but through a temporary file renamed into place: a process killed
    while saving leaves the previous `last.ckpt` whole instead of a truncated one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp,
                                                                                        storage_options))


def save_last(trainer: pl.Trainer, dirs: RunDirs) -> None:
    """Write `last.ckpt` (and with it `embeddings.pt` and `embeddings_gs-<step>.pt`)."""
    os.makedirs(dirs.ckptdir, exist_ok=True)
    trainer.save_checkpoint(os.path.join(dirs.ckptdir, "last.ckpt"), weights_only=False)
