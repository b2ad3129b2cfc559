"""`release_first_stage`: textual-inversion training without the autoencoder weights its steps never use.

With the latent cache (latent_cache.py) a training step runs the encoder only for images it has not seen
yet, and the decoder only for previews. With `model.params.release_first_stage: true`, `LatentDiffusion` at
train start encodes every image its train and validation loaders can yield (`distinct_images()` of the
dataset), a loader batch at a time as the steps would, then frees `first_stage_model.encoder` and
`quant_conv` for the rest of the run, and `decoder` and `post_quant_conv`, which `log_images` reads back from
`ckpt_path` while it draws previews and frees after. Nothing is read back otherwise;
`model.restore_first_stage()` brings both back. Off by default; sampling never frees anything.

A freed module is swapped for a `Released` stub without tensors (so it is absent from `state_dict()` and
from checkpoints; calling it is a one-line error naming the option) and kept aside as a skeleton with every
tensor emptied, which keeps its classes (the `frozen_weights` storage) and dtypes. A read-back fills the
skeleton from the checkpoint, rounded to the stored dtype as the constructor's load rounds it, and checks it
bitwise against a digest taken before freeing.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ldm.checkpoint import CheckpointError, check_finite, open_checkpoint

OPTION = "model.params.release_first_stage"
#: The first-stage submodules freed together, by the half of the autoencoder they belong to.
PARTS = {"encoder": ("encoder", "quant_conv"), "decoder": ("decoder", "post_quant_conv")}
_WHY = {"encoder": "after caching the latents of the training and validation images; these images are not "
                   "among them",
        "decoder": "outside previews"}


class ReleasedError(RuntimeError):
    """A first-stage module freed by `release_first_stage` was called."""


class Released(nn.Module):
    """Stands in for a freed first-stage submodule; calling it raises `ReleasedError`."""

    def __init__(self, name: str, part: str):
        super().__init__()
        self.name, self.part = name, part

    def forward(self, *args, **kwargs):
        raise ReleasedError(f"first_stage_model.{self.name} is freed by {OPTION}=true during training "
                            f"({_WHY[self.part]}); model.restore_first_stage() reads it back")


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """blake2b of the names, dtypes, shapes and bytes of a state dict's tensors."""
    h = hashlib.blake2b(digest_size=16)
    for key, t in state.items():
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _empty(module: nn.Module) -> None:
    """Drop the data of every parameter and persistent buffer of `module` (dtype and device are kept)."""
    for sub in module.modules():
        for p in sub._parameters.values():
            if p is not None:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        for key, b in sub._buffers.items():
            if b is not None and key not in sub._non_persistent_buffers_set:
                sub._buffers[key] = torch.empty(0, dtype=b.dtype, device=b.device)


@dataclass
class Freed:
    skeleton: nn.Module
    shapes: dict[str, tuple[int, ...]]
    digest: str


class FirstStageRelease:
    """The freed submodules of one model's first stage and how to read them back from `ckpt_path`."""

    def __init__(self, ckpt_path: str):
        self.ckpt_path = str(ckpt_path)
        self.freed: dict[str, Freed] = {}

    def is_freed(self, part: str) -> bool:
        return any(name in self.freed for name in PARTS[part])

    def free(self, first_stage: nn.Module, *parts: str) -> None:
        for part in parts:
            for name in PARTS[part]:
                if name in self.freed:
                    continue
                module = getattr(first_stage, name)
                state = module.state_dict()
                shapes = {k: tuple(v.shape) for k, v in state.items()}
                self.freed[name] = Freed(module, shapes, state_digest(state))
                del state
                fresh = {}  # frozen_weights' float32 scratch, as large as the largest weight: fresh ones
                for sub in module.modules():
                    scratch = getattr(sub, "upcast_buffer", None)
                    if scratch is not None:
                        if id(scratch) not in fresh:
                            fresh[id(scratch)] = type(scratch)()
                        sub.upcast_buffer = fresh[id(scratch)]
                _empty(module)
                setattr(first_stage, name, Released(name, part))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def restore(self, first_stage: nn.Module, device: torch.device, *parts: str) -> None:
        """Read the freed modules of `parts` (default: all) back from the checkpoint and put them in place."""
        names = [n for part in (parts or PARTS) for n in PARTS[part] if n in self.freed]
        if not names:
            return
        ckpt = open_checkpoint(self.ckpt_path)  # mapped: only the tensors read below become resident
        sd = ckpt.tensors
        for name in names:
            freed, prefix = self.freed[name], f"first_stage_model.{name}."
            absent = [k for k in freed.shapes if prefix + k not in sd]
            if absent:
                raise CheckpointError(f"{self.ckpt_path} has no {prefix}{absent[0]} ({len(absent)} keys "
                                      f"missing), needed to read back what {OPTION} freed")
            values = {k: sd[prefix + k] for k in freed.shapes}
            check_finite({prefix + k: v for k, v in values.items()}, self.ckpt_path)
            bad = [k for k, shape in freed.shapes.items() if tuple(values[k].shape) != shape]
            if bad:
                shape = tuple(values[bad[0]].shape)
                raise CheckpointError(f"{self.ckpt_path}: {prefix}{bad[0]} has shape {shape}, the model's "
                                      f"was {freed.shapes[bad[0]]}")
            for sub_name, sub in freed.skeleton.named_modules():
                at = f"{sub_name}." if sub_name else ""
                for key, p in sub._parameters.items():
                    if p is not None:
                        p.data = values[at + key].to(device=device, dtype=p.dtype, copy=True)
                        ckpt.release(values[at + key])
                for key, b in sub._buffers.items():
                    if b is not None and key not in sub._non_persistent_buffers_set:
                        sub._buffers[key] = values[at + key].to(device=device, dtype=b.dtype, copy=True)
                        ckpt.release(values[at + key])
            del values
            if state_digest(freed.skeleton.state_dict()) != freed.digest:
                _empty(freed.skeleton)
                raise CheckpointError(f"{self.ckpt_path} no longer holds the weights of "
                                      f"first_stage_model.{name} that {OPTION} freed; restore that file or "
                                      "train with the option off")
            setattr(first_stage, name, freed.skeleton)
            del self.freed[name]

    @contextmanager
    def loaded(self, first_stage: nn.Module, device: torch.device, part: str):
        """Hold `part` in memory for the block (read back if freed), and free it again after."""
        was_freed = self.is_freed(part)
        if was_freed:
            self.restore(first_stage, device, part)
        try:
            yield
        finally:
            if was_freed:
                self.free(first_stage, part)

    def freed_state_dict(self, first_stage: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        """The freed tensors as they were (read back and checked), under their `first_stage_model.*` keys."""
        parts = [part for part in PARTS if self.is_freed(part)]
        self.restore(first_stage, device, *parts)
        try:
            return {f"first_stage_model.{name}.{key}": value.detach().cpu()
                    for part in parts for name in PARTS[part]
                    for key, value in getattr(first_stage, name).state_dict().items()}
        finally:
            self.free(first_stage, *parts)


def with_decoder(method):
    """For a model method that decodes (`log_images`): a freed decoder is held while it runs."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        release = getattr(self, "first_stage_release", None)
        if release is None:
            return method(self, *args, **kwargs)
        with release.loaded(self.first_stage_model, self.device, "decoder"):
            return method(self, *args, **kwargs)

    return wrapper


def loaders(trainer) -> list[tuple[str, object]]:
    """(split, loader) for the trainer's train loader(s), then its validation loader(s)."""

    def flat(value):
        if value is None:
            return []
        if isinstance(value, Mapping):
            return [x for v in value.values() for x in flat(v)]
        if isinstance(value, (list, tuple)):
            return [x for v in value for x in flat(v)]
        return [value]

    return ([("train", x) for x in flat(trainer.train_dataloader)]
            + [("validation", x) for x in flat(trainer.val_dataloaders)])


def distinct_images(dataset, split: str = "train") -> list[np.ndarray]:
    """The image arrays a dataset can yield, from its `distinct_images()` (through the Keyed/Wrapped/Subset/
    Concat dataset wrappers); a dataset without one is an error naming the option."""
    if callable(getattr(dataset, "distinct_images", None)):
        return list(dataset.distinct_images())
    if isinstance(getattr(dataset, "datasets", None), (list, tuple)):
        return [a for d in dataset.datasets for a in distinct_images(d, split)]
    for attr in ("dataset", "data"):
        inner = getattr(dataset, attr, None)
        if inner is not None and inner is not dataset and (isinstance(inner, Dataset)
                                                            or hasattr(inner, "distinct_images")):
            return distinct_images(inner, split)
    raise ValueError(f"{OPTION}: the {split} dataset ({type(dataset).__name__}) cannot list the images "
                     "it yields (no distinct_images(), as ldm.data.personalized.PersonalizedBase has); train "
                     "with the option off")


def padded_batches(n: int, batch_size: int) -> Iterator[list[int]]:
    """Index groups of exactly `batch_size` covering range(n), the last one filled up from the start."""
    for start in range(0, n, batch_size):
        yield [(start + i) % n for i in range(batch_size)]


def stack_images(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """Arrays [H, W, C] stacked as the default collate stacks a batch."""
    return torch.stack([torch.as_tensor(a) for a in arrays])
