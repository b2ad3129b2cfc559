"""What Textual Inversion changes in latent diffusion, in one place.

1. Freezing: the UNet and the text encoder are frozen and kept in eval mode, unless `unfreeze_model`.
2. The embedding manager is built on the text encoder and optionally loaded from a file.
3. The optimiser trains the placeholder vectors only (AdamW, torch defaults incl. weight decay 0.01),
   or, with `unfreeze_model`, adds the UNet and text encoder as a second group at `model_lr`.
4. The optional regulariser pulls the vectors towards their initializer embedding.
5. Checkpoints: every Lightning checkpoint also writes `embeddings.pt` and `embeddings_gs-<step>.pt`
   next to it, each with a `.safetensors` twin holding the same vectors plus the run's metadata
   (`run_metadata`). The reference emptied the Lightning checkpoint (so `--resume` could never work,
   docs/DIFFERENCES.md#resume-kept-checkpoint); here it
   keeps only the trainable tensors (a few KB: vectors, optimizer moments, step, and the progressive-words
   counter), and the frozen weights are taken from the model being resumed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ldm.util import instantiate_from_config


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for `nn.Module.train` on frozen submodules: they stay in eval mode."""
    return self


def freeze(module: nn.Module) -> None:
    """Put `module` in eval mode for good and stop gradients to its parameters."""
    module.eval()
    module.train = disabled_train.__get__(module)
    for p in module.parameters():
        p.requires_grad = False


def build_embedding_manager(config: Mapping, embedder: nn.Module) -> nn.Module:
    """Instantiate the `personalization_config` on `embedder`; load `embedding_manager_ckpt` if set."""
    manager = instantiate_from_config(config, embedder=embedder)
    ckpt = (config.get("params") or {}).get("embedding_manager_ckpt")
    if ckpt:
        manager.load(ckpt)
    for p in manager.embedding_parameters():
        p.requires_grad = True
    return manager


def make_optimizer(
    manager: nn.Module, lr: float, extra_params: list[nn.Parameter] | None = None, model_lr: float = 0.0
) -> torch.optim.Optimizer:
    """AdamW over the placeholder vectors (lr), plus `extra_params` at `model_lr` when unfrozen."""
    embedding_params = list(manager.embedding_parameters())
    if extra_params is None:
        return torch.optim.AdamW(embedding_params, lr=lr)
    return torch.optim.AdamW([{"params": embedding_params, "lr": lr}, {"params": extra_params}], lr=model_lr)


REG_FORMS = ("l2", "gram")


def embedding_regularization(manager: nn.Module, form: str = "gram") -> torch.Tensor:
    """Pull of the vectors towards their initializer embedding (paper, section 4.3 "regularization").

    "gram" (default, the reference's `embedding_to_coarse_loss().mean()`): the mean of the [k, k] Gram
    matrix (p - p0)(p - p0)^T / P, which for k > 1 only penalises the mean offset ||mean_i(p_i - p0_i)||^2.
    "l2" (option): mean over vectors of ||p_i - p0_i||^2, summed over the P initialised placeholders / P,
    which pulls each vector. Both agree for one vector per token. docs/DIFFERENCES.md#regulariser-per-vector
    """
    if form == "gram":
        loss = manager.embedding_to_coarse_loss()
        return loss.mean() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
    if form != "l2":
        raise ValueError(f"embedding_reg_form must be one of {REG_FORMS}, got '{form}'")
    inits = manager.initial_embeddings
    terms = [((manager.string_to_param_dict[k] - p0) ** 2).sum(-1).mean() for k, p0 in inits.items()]
    return torch.stack(terms).sum() / len(terms) if terms else torch.tensor(0.0)


MANAGER_PREFIX = "embedding_manager."
# Lightning-checkpoint key of the embedding manager's progressive-words forward-call counter (an int).
PROGRESSIVE_COUNTER_KEY = "embedding_manager_progressive_counter"


def slim_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The embedding manager's tensors only: all a frozen-model checkpoint needs."""
    return {k: v for k, v in state_dict.items() if k.startswith(MANAGER_PREFIX)}


def complete_state_dict(saved: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> dict:
    """Fill the frozen weights a slim checkpoint left out with the current model's."""
    return {**current, **saved}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cached_sha256(manager: nn.Module, path: str | os.PathLike) -> str | None:
    """`file_sha256(path)`, computed once per (path, size, mtime) and cached on `manager`; None if no file."""
    path = Path(path)
    if not path.is_file():
        return None
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    cache = manager.__dict__.setdefault("_file_sha256_cache", {})
    if key not in cache:
        cache[key] = file_sha256(path)
    return cache[key]


def run_config_file(dirpath: str | os.PathLike) -> Path | None:
    """The newest `configs/<now>-project.yaml` (SetupCallback's) beside the checkpoint folder, if any."""
    found = sorted((Path(dirpath).parent / "configs").glob("*-project.yaml"))
    return found[-1] if found else None


def run_metadata(manager: nn.Module, dirpath: str | os.PathLike, global_step: int) -> dict[str, str]:
    """Metadata of an embedding saved in the checkpoint folder `dirpath` of a training run.

    step; seed (`PL_GLOBAL_SEED`, set by the run's `seed_everything`); config (the run's project YAML);
    base_checkpoint and base_checkpoint_sha256 (its `model.params.ckpt_path`); text_encoder_width. Fields
    that cannot be found (no config file, no checkpoint file) are left out.
    """
    from omegaconf import OmegaConf

    meta = {"step": str(int(global_step)), "text_encoder_width": str(int(manager.token_dim))}
    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed:
        meta["seed"] = seed
    config_file = run_config_file(dirpath)
    if config_file is not None:
        text = config_file.read_text(encoding="utf-8")
        meta["config"] = text
        ckpt = OmegaConf.select(OmegaConf.create(text), "model.params.ckpt_path",
                                throw_on_resolution_failure=False)
        if ckpt:
            meta["base_checkpoint"] = Path(str(ckpt)).name
            sha = cached_sha256(manager, str(ckpt))
            if sha is not None:
                meta["base_checkpoint_sha256"] = sha
    return meta


def save_embedding_files(manager: nn.Module, dirpath: str, global_step: int, stem: str = "embeddings",
                         meta: Mapping | None = None) -> None:
    """`<stem>.pt` (latest) and `<stem>_gs-<global_step>.pt` (kept) in the checkpoint folder, in the
    official format, each with a `.safetensors` twin: the same vectors plus `run_metadata` and `meta`."""
    info = {**run_metadata(manager, dirpath, global_step), **{k: str(v) for k, v in (meta or {}).items()}}
    for name in (stem, f"{stem}_gs-{global_step}"):
        manager.save(os.path.join(dirpath, f"{name}.pt"))
        manager.save(os.path.join(dirpath, f"{name}.safetensors"), meta=info)
