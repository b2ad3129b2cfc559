"""Command-line pieces of `main.py`: flags, log-dir naming, resume, config merging, overrides, LR scaling.

Pure functions, so each rule of the official `main.py` is tested on its own. Lightning 2
has no `Trainer.add_argparse_args`; the trainer flags users pass today are declared explicitly below and
anything else can be set in YAML (`lightning.trainer.<key>=<value>` on the command line).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.data.personalized import is_personalized
from ldm.loading import LEAN_OPTIONS, MODEL_OPTIONS, set_model_options, set_tokenizer_path
from ldm.models.diffusion.ddpm import DDPM
from ldm.util import get_obj_from_str

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """A command-line or config mistake, reported as one line and exit code 2."""


def str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("Boolean value expected.")


# Trainer flags accepted on the command line (value type); they override `lightning.trainer` in YAML.
TRAINER_FLAGS: dict[str, Any] = {
    "gpus": str,
    "accelerator": str,
    "devices": str,
    "strategy": str,
    "num_nodes": int,
    "max_steps": int,
    "max_epochs": int,
    "accumulate_grad_batches": int,
    "precision": str,
    "gradient_clip_val": float,
    "check_val_every_n_epoch": int,
    "val_check_interval": float,
    "limit_val_batches": float,
    "num_sanity_val_steps": int,
    "log_every_n_steps": int,
    "benchmark": str2bool,
    "deterministic": str2bool,
}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Textual Inversion training (latent-diffusion main.py)")
    p.add_argument("-n", "--name", type=str, const=True, default="", nargs="?", help="postfix for logdir")
    p.add_argument("-r", "--resume", type=str, const=True, default="", nargs="?",
                   help="resume from a log dir or a checkpoint inside one")
    p.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                   help="paths to base configs, merged left to right; later wins")
    p.add_argument("-t", "--train", type=str2bool, const=True, default=False, nargs="?", help="train")
    p.add_argument("--no-test", type=str2bool, const=True, default=False, nargs="?", help="disable test")
    p.add_argument("-p", "--project", help="name of new or path to existing project (unused)")
    p.add_argument("-d", "--debug", type=str2bool, nargs="?", const=True, default=False,
                   help="on exit, move a fresh log dir to debug_runs/")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    p.add_argument("-f", "--postfix", type=str, default="", help="post-postfix for default name")
    p.add_argument("-l", "--logdir", type=str, default="logs", help="directory for logging")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                   help="scale base-lr by ngpu * batch_size * n_accumulate")
    p.add_argument("--datadir_in_name", type=str2bool, nargs="?", const=True, default=True,
                   help="prefix the log dir name with the data directory's name")
    p.add_argument("--actual_resume", type=str, default="",
                   help="pretrained model checkpoint (.ckpt or .safetensors)")
    p.add_argument("--data_root", type=str, default="", help="folder with the training images")
    p.add_argument("--embedding_manager_ckpt", type=str, default="", help="initialise embeddings from this file")
    p.add_argument("--placeholder_string", type=str, help="placeholder string (model and captions)")
    p.add_argument("--init_word", type=str, help="word used to initialise the placeholder vector(s)")
    p.add_argument("--tokenizer_path", type=str, default=None,
                   help="local folder with the text encoder's tokenizer files (offline use)")
    p.add_argument("--attention", choices=["sdpa", "math"], default=None,
                   help="attention kernel (model.params.attention): PyTorch SDPA (default unless the config "
                        "says otherwise; same maths, faster) or the reference's math")
    p.add_argument("--gradient_checkpointing", type=str2bool, nargs="?", const=True, default=None,
                   help="recompute UNet activations in backward (model.params.gradient_checkpointing; less "
                        "memory, same numbers, slower; default off)")
    p.add_argument("--frozen_weights", choices=["fp32", "fp16", "bf16"], default=None,
                   help="storage of the frozen weights (model.params.frozen_weights): fp32 (default, faithful) "
                        "fp16 or bf16 (half the memory, fp32 compute, weights rounded; fp16 rounds less)")
    p.add_argument("--saved_activations", choices=["fp32", "fp16", "bf16"], default=None,
                   help="storage of the activations a training step keeps for backward (model.params."
                        "saved_activations): fp32 (default, faithful) or fp16 / bf16 (about half of that memory; "
                        "forward exact, backward from rounded activations)")
    p.add_argument("--cache_first_stage", type=str2bool, nargs="?", const=True, default=None,
                   help="cache the training images' latent moments (model.params.cache_first_stage; exact; "
                        "default on for textual inversion)")
    p.add_argument("--channels_last", type=str2bool, nargs="?", const=True, default=None,
                   help="the UNet in channels-last (NHWC) layout (model.params.channels_last; equal within "
                        "float tolerance, faster convolutions on CPU; default on unless the config says otherwise)")
    p.add_argument("--small_gemm", type=str2bool, nargs="?", const=True, default=None,
                   help="the UNet's frozen layers on few positions as weight-on-the-left matrix products, "
                        "wide linear layers in blocks of output features (model.params.small_gemm; equal "
                        "within float tolerance, faster on CPU; default on unless the config says otherwise)")
    p.add_argument("--lean", type=str2bool, nargs="?", const=True, default=False,
                   help="the low-memory preset (ldm.loading.LEAN_OPTIONS) for the speed options not given: "
                        "frozen weights and saved activations stored in fp16, the autoencoder's unused halves "
                        "freed")
    p.add_argument("--early_stopping", type=str2bool, nargs="?", const=True, default=False,
                   help="stop when the loss on a fixed batch plateaus (ldm.early_stopping; its settings are "
                        "lightning.callbacks.early_stopping.params.*)")
    v = p.add_argument_group("validation previews (ldm.validation_previews; they replace the image logger)")
    v.add_argument("--validation_prompts", nargs="+", default=[], metavar="PROMPT",
                   help="prompts rendered from fixed starting noise every --validation_every steps; a value "
                        "naming a file stands for its lines")
    v.add_argument("--validation_every", type=int, default=None,
                   help="render every N optimizer steps (default: a tenth of max_steps)")
    v.add_argument("--validation_samples", type=int, default=4, help="images per prompt")
    v.add_argument("--validation_sampler", choices=["dpmpp2m", "ddim", "plms"], default="dpmpp2m")
    v.add_argument("--validation_steps", type=int, default=20, help="sampler steps")
    v.add_argument("--validation_scale", type=float, default=5.0, help="classifier-free guidance scale")
    v.add_argument("--validation_negative_prompt", type=str, default="",
                   help="prompt of the unconditional branch")
    for flag, kind in TRAINER_FLAGS.items():
        p.add_argument(f"--{flag}", type=kind, default=None, help=argparse.SUPPRESS)
    return p


#: a config override on the command line: `key.path=value`, no spaces in the key
OVERRIDE = re.compile(r"[A-Za-z_][\w.\[\]-]*=\S*")
BOOL_FLAGS = ("-t", "--train", "--no-test", "-d", "--debug", "--scale_lr", "--datadir_in_name",
              "--gradient_checkpointing", "--cache_first_stage", "--channels_last", "--small_gemm",
              "--early_stopping")
_BOOL_WORDS = {"yes", "true", "t", "y", "1", "no", "false", "f", "n", "0"}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Parse known flags; the rest are config overrides.

    A bare boolean flag followed by an override (`--no-test model.x=1`) would make argparse read the
    override as the flag's value; such flags get an explicit True first.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    fixed: list[str] = []
    for i, token in enumerate(argv):
        fixed.append(token)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if token in BOOL_FLAGS and nxt is not None and not nxt.startswith("-") and nxt.lower() not in _BOOL_WORDS:
            fixed.append("True")
    from ldm.scripts_common import one_line_parser

    opt, unknown = one_line_parser("main.py", get_parser()).parse_known_args(fixed)
    # `--validation_prompts a b key.path=value`: the list swallows the overrides that follow it
    overrides = [v for v in opt.validation_prompts if OVERRIDE.fullmatch(v)]
    opt.validation_prompts = [v for v in opt.validation_prompts if not OVERRIDE.fullmatch(v)]
    return opt, sorted([*overrides, *unknown], key=fixed.index)


# ---------------------------------------------------------------------------------------------------
# Devices and learning rate
# ---------------------------------------------------------------------------------------------------


def parse_gpus(gpus: Any) -> list[int] | int:
    """`--gpus` as users write it: "0," or "0,1" (indices, the README form), "2" or 2 (a count)."""
    if isinstance(gpus, int):
        return gpus
    text = str(gpus).strip()
    if "," in text:
        ids = [s for s in text.strip(",").split(",") if s.strip()]
        try:
            return [int(s) for s in ids]
        except ValueError as e:
            raise UsageError(f"--gpus '{gpus}': expected GPU indices such as '0,' or '0,1'") from e
    try:
        return int(text)
    except ValueError as e:
        raise UsageError(f"--gpus '{gpus}': expected a count or indices such as '0,'") from e


def count_devices(trainer_cfg: dict) -> int:
    """Number of training processes implied by the trainer settings (1 on CPU unless devices says more)."""
    devices = trainer_cfg.get("devices")
    if devices in (None, "auto"):
        return 1
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if str(devices).strip() == "-1":  # Lightning: all visible GPUs
        import torch

        return max(1, torch.cuda.device_count())
    text = str(devices).strip()
    if "," in text:
        return len([s for s in text.strip(",").split(",") if s.strip()])
    return max(1, int(text)) if text.lstrip("-").isdigit() and int(text) > 0 else 1


def trainer_flags(opt: argparse.Namespace) -> dict[str, Any]:
    """The trainer flags given on the command line (TRAINER_FLAGS), by name."""
    return {flag: getattr(opt, flag) for flag in TRAINER_FLAGS if getattr(opt, flag, None) is not None}


def trainer_settings(yaml_trainer: dict, flags: dict[str, Any]) -> dict:
    """Merge YAML `lightning.trainer` with the trainer flags (they win) and translate `gpus`."""
    unknown = sorted(set(flags) - set(TRAINER_FLAGS))
    if unknown:
        raise UsageError(f"unknown trainer option(s) {unknown}; set others as lightning.trainer.<key>=<value>")
    cfg = dict(yaml_trainer)
    cfg.update({k: v for k, v in flags.items() if v is not None})
    gpus = cfg.pop("gpus", None)
    if gpus is not None and parse_gpus(gpus) != 0:  # `--gpus 0` meant "no GPU" in Lightning 1.x
        cfg.setdefault("accelerator", "gpu")
        cfg["devices"] = parse_gpus(gpus)
    if isinstance(cfg.get("devices"), str):
        cfg["devices"] = parse_gpus(cfg["devices"]) if cfg["devices"] != "auto" else "auto"
    cfg.setdefault("accelerator", "cpu")
    if count_devices(cfg) > 1:
        cfg.setdefault("strategy", "ddp")
    return cfg


def learning_rate(base_lr: float, batch_size: int, ngpu: int, accumulate: int, scale: bool) -> tuple[float, str]:
    """The reference rule: lr = accumulate * ngpu * batch_size * base_lr when scaling; returns (lr, message)."""
    if not scale:
        return base_lr, "++++ NOT USING LR SCALING ++++"
    lr = accumulate * ngpu * batch_size * base_lr
    msg = (f"Setting learning rate to {lr:.2e} = {accumulate} (accumulate_grad_batches) * {ngpu} (num_gpus) "
           f"* {batch_size} (batchsize) * {base_lr:.2e} (base_lr)")
    return lr, msg


# ---------------------------------------------------------------------------------------------------
# Log directories
# ---------------------------------------------------------------------------------------------------


@dataclass
class RunDirs:
    logdir: str
    nowname: str
    now: str
    ckptdir: str
    cfgdir: str
    resume_ckpt: str | None
    resume_configs: list[str]


#: Environment variable carrying the run's timestamp to the DDP worker processes Lightning launches (they
#: re-run main.py with the same arguments and must land in the same log dir).
RUN_TIMESTAMP_ENV = "TI_RUN_TIMESTAMP"


def timestamp() -> str:
    """The run's timestamp: a DDP worker (LOCAL_RANK > 0) inherits its launcher's; others take the time
    now and export it for the workers they will launch."""
    inherited = os.environ.get(RUN_TIMESTAMP_ENV) if os.environ.get("LOCAL_RANK", "0") != "0" else None
    stamp = inherited or datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    os.environ[RUN_TIMESTAMP_ENV] = stamp
    return stamp


#: Environment variable carrying the log dir a launcher claimed (`claim_run_dir`) to its DDP workers.
RUN_DIR_ENV = "TI_RUN_DIR"


def claim_run_dir(dirs: RunDirs) -> RunDirs:
    """Create a new run's log dir atomically; the dirs of the run to write into.

    `os.mkdir` fails if the folder exists, so two runs started in the same second with the same name never
    share one: the second gets `<name>_1` (then `_2`, ...). A DDP worker (LOCAL_RANK > 0) takes the folder its
    launcher claimed (passed in RUN_DIR_ENV); a resumed run keeps its folder.
    """
    if dirs.resume_ckpt:
        return dirs
    inherited = os.environ.get(RUN_DIR_ENV) if os.environ.get("LOCAL_RANK", "0") != "0" else None
    if inherited:
        logdir = inherited
    else:
        parent = os.path.dirname(dirs.logdir)
        if parent:
            os.makedirs(parent, exist_ok=True)
        for i in range(10_000):
            logdir = dirs.logdir if i == 0 else f"{dirs.logdir}_{i}"
            try:
                os.mkdir(logdir)
                break
            except FileExistsError:
                continue
        else:
            raise UsageError(f"cannot create a new log folder next to {dirs.logdir}: 10000 exist")
        os.environ[RUN_DIR_ENV] = logdir
    return RunDirs(logdir, os.path.basename(logdir), dirs.now, os.path.join(logdir, "checkpoints"),
                   os.path.join(logdir, "configs"), None, [])


def run_dirs(opt, now: str | None = None) -> RunDirs:
    """Log dir of a new run (`<datadir><now>_<name><postfix>`) or of the run being resumed."""
    now = now or timestamp()
    if opt.name and opt.resume:
        raise UsageError("-n/--name and -r/--resume cannot be specified both. If you want to resume training "
                         "in a new log folder, use -n/--name in combination with --embedding_manager_ckpt")
    if opt.resume:
        path = Path(opt.resume)
        if not path.exists():
            raise UsageError(f"Cannot find {opt.resume}")
        if path.is_file():
            logdir, ckpt = str(path.parent.parent), str(path)
        else:
            logdir = str(path).rstrip("/")
            ckpt = os.path.join(logdir, "checkpoints", "last.ckpt")
        if not os.path.isfile(ckpt):
            raise UsageError(f"--resume {opt.resume}: no checkpoint at {ckpt}")
        configs = sorted(glob.glob(os.path.join(logdir, "configs", "*.yaml")))
        nowname = os.path.basename(logdir)
        return RunDirs(logdir, nowname, now, os.path.join(logdir, "checkpoints"), os.path.join(logdir, "configs"),
                       ckpt, configs)
    if opt.name:
        name = "_" + str(opt.name)
    elif opt.base:
        name = "_" + os.path.splitext(os.path.basename(opt.base[0]))[0]
    else:
        name = ""
    prefix = os.path.basename(os.path.normpath(opt.data_root)) if opt.datadir_in_name and opt.data_root else ""
    nowname = prefix + now + name + opt.postfix
    logdir = os.path.join(opt.logdir, nowname)
    return RunDirs(logdir, nowname, prefix + now, os.path.join(logdir, "checkpoints"), os.path.join(logdir, "configs"),
                   None, [])


# ---------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------


def merge_configs(paths: list[str], dotlist: list[str]) -> DictConfig:
    """OmegaConf.merge of the base YAMLs (left to right) and the `key.path=value` overrides."""
    for p in paths:
        if not os.path.isfile(p):
            raise UsageError(f"config file not found: {p}")
    bad = [t for t in dotlist if "=" not in t or t.startswith("-")]
    if bad:
        raise UsageError(f"unrecognised arguments: {' '.join(bad)} (config overrides are written key.path=value)")
    configs = [load_yaml(p) for p in paths]
    try:
        overrides = OmegaConf.from_dotlist(dotlist)
    except Exception as e:  # omegaconf's grammar errors
        raise UsageError(f"cannot parse the config override(s) {' '.join(dotlist)}: "
                         f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from e
    return OmegaConf.merge(*configs, overrides)


def load_yaml(path: str) -> DictConfig:
    """OmegaConf.load, a malformed file being a UsageError naming the file and the line."""
    import yaml

    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or (str(e).strip().splitlines() or ["invalid YAML"])[0]
        raise UsageError(f"config file {path} is not valid YAML ({problem} at{where or ' an unknown place'}); "
                         "fix the file") from e
    if not isinstance(cfg, DictConfig):
        raise UsageError(f"config file {path} holds a {type(cfg).__name__}, not a mapping of keys")
    return cfg


# ---------------------------------------------------------------------------------------------------
# Validation before any work (issue 14 point 5): unknown keys, types, ranges
# ---------------------------------------------------------------------------------------------------

TOP_LEVEL_KEYS = ("model", "data", "lightning")
# Framework classes end a **kwargs chain: whatever they would accept is not a config option of ours.
_FRAMEWORK_MODULES = ("torch", "pytorch_lightning", "lightning", "lightning_fabric", "builtins")


def did_you_mean(name: str, choices) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def accepted_arguments(target: str) -> set[str] | None:
    """Keyword arguments `target` (a class or function path) accepts, following `**kwargs` passed on to base
    classes (LatentDiffusion -> DDPM); None when it accepts anything or cannot be resolved."""
    import inspect

    try:
        obj = get_obj_from_str(target)
    except Exception:
        return None
    callables = [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if isinstance(obj, type) else [obj]
    owners = [c for c in obj.__mro__ if "__init__" in vars(c)] if isinstance(obj, type) else [None]
    names: set[str] = set()
    for fn, owner in zip(callables, owners, strict=True):
        if owner is not None and owner.__module__.split(".")[0] in _FRAMEWORK_MODULES:
            return names or None
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names - {"self"}
    return None


def check_override_keys(base: DictConfig, merged: DictConfig, dotlist: list[str]) -> None:
    """Each `key.path=value` override must name a key the configs have, or a constructor argument of the
    `target` whose `params` it sets; otherwise a UsageError with the closest existing name."""
    top = set(base) | set(TOP_LEVEL_KEYS)
    for item in dotlist:
        key = item.split("=", 1)[0].strip()
        parts = key.split(".")
        if parts[0] not in top:
            raise UsageError(f"unknown config key '{key}': no top-level section '{parts[0]}'"
                             f"{did_you_mean(parts[0], top)}")
        node, base_node = merged, base
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if part == "params" and i > 0:
                parent = OmegaConf.select(merged, ".".join(parts[:i]))
                target = parent.get("target") if isinstance(parent, DictConfig) else None
                if target is not None:
                    accepted = accepted_arguments(str(target))
                    in_yaml = isinstance(base_node, DictConfig) and nxt in base_node
                    if accepted is not None and nxt not in accepted and not in_yaml:
                        raise UsageError(f"unknown config key '{key}': {target} has no argument '{nxt}'"
                                         f"{did_you_mean(nxt, accepted)}")
            node = node.get(part) if isinstance(node, DictConfig) else None
            base_node = base_node.get(part) if isinstance(base_node, DictConfig) else None
            if not isinstance(node, DictConfig):
                break
        if parts[:2] == ["lightning", "trainer"] and len(parts) == 3:
            import inspect

            import pytorch_lightning as pl

            accepted = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"} | {"gpus"}
            if parts[2] not in accepted:
                raise UsageError(f"unknown config key '{key}': pytorch_lightning.Trainer has no argument "
                                 f"'{parts[2]}'{did_you_mean(parts[2], accepted)}")


_INT_TRAINER_KEYS = {"max_steps": -1, "max_epochs": -1, "num_sanity_val_steps": -1, "log_every_n_steps": 1,
                     "accumulate_grad_batches": 1, "check_val_every_n_epoch": 1, "num_nodes": 1}


def _flag_or_key(name: str, flags: dict) -> str:
    return f"--{name}" if name in flags else f"lightning.trainer.{name}"


def check_trainer_settings(cfg: dict, flags: dict) -> None:
    """Types and ranges of the trainer settings, the precision, and a GPU that is not there."""
    for name, low in _INT_TRAINER_KEYS.items():
        if cfg.get(name) is None:
            continue
        value = cfg[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{_flag_or_key(name, flags)}={value!r}: expected a whole number")
        if value < low:
            allowed = "-1 (no limit) or >= 0" if low == -1 else f">= {low}"
            raise UsageError(f"{_flag_or_key(name, flags)}={value}: expected {allowed}")
    for name in ("gradient_clip_val", "val_check_interval", "limit_val_batches"):
        value = cfg.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise UsageError(f"{_flag_or_key(name, flags)}={value!r}: expected a number >= 0")
    precision = cfg.get("precision")
    if precision is not None:
        import typing

        from lightning_fabric.connector import _PRECISION_INPUT

        allowed = [a for group in typing.get_args(_PRECISION_INPUT) for a in typing.get_args(group)]
        if precision not in allowed and str(precision) not in [str(a) for a in allowed]:
            raise UsageError(f"{_flag_or_key('precision', flags)}={precision!r}: not a precision Lightning knows; "
                             f"use one of 32-true, 16-mixed, bf16-mixed, 64-true")
    accelerator = str(cfg.get("accelerator", "cpu")).lower()
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            given = f"--gpus {flags['gpus']}" if "gpus" in flags else f"accelerator={accelerator}"
            raise UsageError(f"{given}: no CUDA GPU is available on this machine (torch.cuda.is_available() is "
                             "False); to train on the CPU leave out --gpus (or pass --accelerator cpu)")
    elif accelerator == "cpu" and precision is not None:
        check_cpu_precision(str(precision), _flag_or_key("precision", flags))


def cpu_half_compute() -> dict[str, bool]:
    """Which 16-bit formats this CPU computes natively through oneDNN (AVX512-BF16/AMX, AVX512-FP16/AMX-FP16).
    Without them autocast emulates the format and runs slower than float32."""
    import torch

    return {"bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "16": bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())}


def check_cpu_precision(precision: str, where: str) -> None:
    """Mixed precision on a CPU only where it is faster than float32 (detected at run time)."""
    kind = "bf16" if precision.startswith("bf16") else "16" if precision.split("-")[0] == "16" else None
    if kind is not None and not cpu_half_compute()[kind]:
        name = "bfloat16" if kind == "bf16" else "float16"
        raise UsageError(f"{where}={precision}: this CPU has no {name} instructions for oneDNN, so mixed precision "
                         f"would be emulated and slower than float32; leave out --precision (for memory use "
                         f"--frozen_weights fp16 or --lean)")


def check_number(value, where: str, *, minimum=None, integer=False, positive=False) -> None:
    """A config value that must be a finite number (a whole one if `integer`), >= minimum / > 0."""
    import math

    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if integer:
        ok = ok and isinstance(value, int)
    if not ok:
        kind = "a whole number" if integer else "a finite number"
        raise UsageError(f"{where}={value!r}: expected {kind}")
    if positive and value <= 0:
        raise UsageError(f"{where}={value}: expected a number > 0")
    if minimum is not None and value < minimum:
        raise UsageError(f"{where}={value}: expected >= {minimum}")


def check_writable_dir(path: str, what: str) -> None:
    """`path` is, or can be created as, a folder: neither it nor a parent is a file."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                detail = "is a file" if q == p else f"is under {q}, which is a file"
                raise UsageError(f"{what} {path} {detail}; give a folder")
            return


def is_diffusion_model(model_config: DictConfig) -> bool:
    """Whether the config's model is a `DDPM` (or `LatentDiffusion`), the class that has the speed options."""
    cls = get_obj_from_str(str(model_config.get("target")))
    return isinstance(cls, type) and issubclass(cls, DDPM)


def speed_options(model_params: DictConfig, given: dict[str, Any], lean: bool = False) -> dict[str, Any]:
    """The model options a training run uses: the `given` ones, then (with `lean`) `LEAN_OPTIONS` for the
    rest (`release_first_stage` only for textual inversion, the one case with a latent cache), and
    `attention` "sdpa", `channels_last` and `small_gemm` on unless given or set in the config (all equal
    within float tolerance, and faster). The others are left to the config."""
    preset = dict(LEAN_OPTIONS) if lean else {}
    if model_params.get("personalization_config") is None:
        preset.pop("release_first_stage", None)
    options = {**preset, **given}
    options.setdefault("attention", model_params.get("attention") or "sdpa")
    config_layout = model_params.get("channels_last")
    options.setdefault("channels_last", True if config_layout is None else bool(config_layout))
    config_gemm = model_params.get("small_gemm")
    options.setdefault("small_gemm", True if config_gemm is None else bool(config_gemm))
    return options


def apply_overrides(config: DictConfig, opt) -> None:
    """The command-line options (`main.py`'s flags or `TrainOptions`), written into the config in one place.

    The placeholder goes to the model AND to the datasets (the reference updated only the model, so its
    captions kept "*": docs/DIFFERENCES.md#placeholder-string-reaches-the-datasets), except a dataset whose
    `placeholder_token` the command line's overrides set explicitly (`opt.overrides`): that one is kept. The speed options
    become model options; `attention` is "sdpa" unless the flag or the config says otherwise.
    """
    model_params = config.model.params
    personalization = model_params.get("personalization_config")
    if personalization is not None:
        params = personalization.params
        params.embedding_manager_ckpt = opt.embedding_manager_ckpt or ""
        if opt.placeholder_string:
            params.placeholder_strings = [opt.placeholder_string]
        if opt.init_word:
            if not params.get("initializer_words"):
                params.initializer_words = [opt.init_word]
            else:
                params.initializer_words[0] = opt.init_word
    elif opt.placeholder_string or opt.init_word or opt.embedding_manager_ckpt:
        raise UsageError("--placeholder_string/--init_word/--embedding_manager_ckpt need a "
                         "config with model.params.personalization_config")
    given = {k: getattr(opt, k) for k in MODEL_OPTIONS if getattr(opt, k, None) is not None}
    if is_diffusion_model(config.model):
        set_model_options(model_params, **speed_options(model_params, given, lean=opt.lean))
    elif given or opt.lean:
        flags = ", ".join(f"--{k}" for k in [*given, *(["lean"] if opt.lean else [])])
        raise UsageError(f"{flags}: options of diffusion models; model.target is {config.model.get('target')}")
    set_tokenizer_path(model_params, opt.tokenizer_path)
    explicit = {item.split("=", 1)[0] for item in getattr(opt, "overrides", ())}
    data = config.get("data")
    if data is not None:
        for split in ("train", "validation", "test"):
            node = data.params.get(split)
            if node is None:
                continue
            if opt.data_root:
                node.params.data_root = opt.data_root
            if personalization is not None and is_personalized(node):
                key = f"data.params.{split}.params.placeholder_token"
                model_token = personalization.params.placeholder_strings[0]
                if key not in explicit:
                    node.params.placeholder_token = model_token
                elif node.params.placeholder_token != model_token:
                    logger.warning("%s=%s differs from the model's placeholder %r: captions of that split "
                                   "will not contain the learned word", key, node.params.placeholder_token,
                                   model_token)
