"""Training data whose order and random augmentations are a pure function of (seed, epoch, position).

This is what makes `--resume` exact. The reference drew captions and flips from the global generators
inside the loader, so a resumed run could never replay the same batches. Here:
- `ResumableSampler` shuffles its e-th pass with a permutation seeded by (seed, e), shards it over DDP
  ranks, and yields keys `e * n + i`. It counts its passes itself (Lightning's epoch counter after a
  mid-epoch restore does not match a straight run's), and after a restore continues the interrupted pass;
- `KeyedDataset` runs the wrapped dataset's `__getitem__` under RNGs seeded from (seed, key), so the
  caption template and flip of every sample are fixed by its key, and adds the key to the item
  (`sample_key`), from which `StepSeedCallback` seeds the model's draws of that batch;
- `ResumableDataLoader` is stateful for Lightning: its `state_dict` (pass, batches yielded in it) is saved
  in the checkpoint and restored before the loader is iterated again.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers, well mixed (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Seed python `random`, numpy's global RNG and torch's CPU RNG inside the block, then restore them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class KeyedDataset(Dataset):
    """`dataset[key % n]` with all its random draws seeded by (seed, key)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int):
        with seeded_global_rngs(derive_seed(self.seed, key)):
            item = self.dataset[key % len(self.dataset)]
        return {**item, "sample_key": key} if isinstance(item, dict) else item


class ResumableSampler(Sampler[int]):
    """Pass e: a permutation seeded by (seed, e), sharded over `world_size` ranks, as keys e * n + i.

    Each rank gets every `world_size`-th key of the permutation, padded by wrapping so all ranks yield
    the same count (as torch's DistributedSampler). Every `__iter__` starts the next pass, unless `resume`
    asked to continue an interrupted one.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = -1  # the pass being yielded; -1 before the first
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return -(-self.n // self.world_size)

    def resume(self, epoch: int, skip: int) -> None:
        """Make the next `__iter__` continue pass `epoch` after its first `skip` keys."""
        self._resume = (epoch, skip)

    def keys(self, epoch: int) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))
        else:
            order = torch.arange(self.n)
        total = len(self) * self.world_size
        order = torch.cat([order, order[: total - self.n]]) if total > self.n else order
        return [epoch * self.n + int(i) for i in order[self.rank :: self.world_size]]

    def __iter__(self):
        if self._resume is not None:
            (self.epoch, start), self._resume = self._resume, None
        else:
            self.epoch, start = self.epoch + 1, 0
        yield from self.keys(self.epoch)[start:]


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` whose position Lightning saves and restores."""

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, **kwargs):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._yielded = 0

    def __iter__(self):
        resume = self.sampler._resume
        self._yielded = resume[1] // self.batch_size if resume is not None else 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        if int(state["epoch"]) >= 0:  # -1: saved before the first pass began, nothing to continue
            self.sampler.resume(int(state["epoch"]), int(state["batches"]) * self.batch_size)
