"""Build a model from its config: the one place that does it for sampling, scoring and benchmarking.

    model = load_model("configs/toy/invert.yaml", "models/toy/toy_ldm.safetensors")
    model = load_model(config, ckpt, overrides=["model.params.x=1"], tokenizer_path="tok/", device=device,
                       attention="sdpa", frozen_weights="bf16")

The checkpoint goes in as `model.params.ckpt_path`, so the model's own constructor loads it strictly (see
`ldm/checkpoint.py`). The speed and memory options are the model's own config keys (see `DDPM`); None leaves
what the config says. Training builds its model in `ldm/training.py` from the same helpers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.util import instantiate_from_config

#: Model options that switch kernels or storage, never the maths beyond float rounding (`model.params.*`).
MODEL_OPTIONS = ("attention", "gradient_checkpointing", "frozen_weights", "cache_first_stage",
                 "release_first_stage", "channels_last", "saved_activations", "small_gemm")

#: The low-memory preset (`main.py --lean`, the benchmark's `lean` variant): frozen weights stored in fp16
#: (fp32 compute; fp16 rounds the weights 8x less than bf16), the activations kept for backward stored in
#: fp16 (`ldm/modules/saved_activations.py`) and, in textual inversion only (`ldm.cli.speed_options`), the
#: autoencoder freed once the training latents are cached, its decoder read back while previews are drawn
#: (`release_first_stage`).
LEAN_OPTIONS = {"frozen_weights": "fp16", "saved_activations": "fp16", "release_first_stage": True}

ConfigSource = str | os.PathLike | Sequence[str | os.PathLike] | Mapping | DictConfig


def load_config(config: ConfigSource, overrides: Sequence[str] = ()) -> DictConfig:
    """A fresh DictConfig from a YAML path, a list of paths (merged left to right) or a config, with the
    `key.path=value` overrides merged last. The caller's config object is never modified."""
    if isinstance(config, (str, os.PathLike)):
        parts = [OmegaConf.load(config)]
    elif isinstance(config, (Mapping, DictConfig)):
        parts = [OmegaConf.create(OmegaConf.to_container(config) if isinstance(config, DictConfig) else config)]
    else:
        parts = [OmegaConf.load(p) for p in config]
    return OmegaConf.merge(*parts, OmegaConf.from_dotlist(list(overrides)))


def set_tokenizer_path(model_params: DictConfig, path: str | os.PathLike | None) -> None:
    """Point the text encoder (`cond_stage_config`) at a local tokenizer folder, for offline use."""
    if not path:
        return
    if "cond_stage_config" not in model_params or not isinstance(model_params.cond_stage_config, Mapping):
        raise ValueError("tokenizer_path: this config has no text encoder (model.params.cond_stage_config)")
    cond = model_params.cond_stage_config
    if cond.get("params") is None:
        cond.params = {}
    cond.params.tokenizer_path = str(path)


def set_model_options(model_params: DictConfig, **options: Any) -> None:
    """Write the given MODEL_OPTIONS into `model.params`; None keeps the config's value."""
    unknown = sorted(set(options) - set(MODEL_OPTIONS))
    if unknown:
        raise TypeError(f"unknown model option(s) {unknown}; known: {list(MODEL_OPTIONS)}")
    for key, value in options.items():
        if value is not None:
            model_params[key] = value


def load_model(config: ConfigSource, ckpt: str | os.PathLike | None = None, *, overrides: Sequence[str] = (),
               tokenizer_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               **options: Any) -> torch.nn.Module:
    """The model of `config` with `ckpt` loaded strictly, in eval mode on `device`.

    `options` are MODEL_OPTIONS (e.g. `attention="sdpa"`); without `ckpt` the config's own `ckpt_path`
    (if any) is used, and without either the weights stay as built.
    """
    cfg = load_config(config, overrides)
    if "model" not in cfg:
        raise ValueError("the config has no 'model' section")
    params = cfg.model.get("params")
    if params is None:
        cfg.model.params = {}
        params = cfg.model.params
    if ckpt is not None:
        params.ckpt_path = str(ckpt)
    set_tokenizer_path(params, tokenizer_path)
    set_model_options(params, **options)
    return instantiate_from_config(cfg.model).eval().to(device)
