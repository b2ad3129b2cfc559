"""`DataModuleFromConfig`: the Lightning data module the training configs name as `main.DataModuleFromConfig`.

Behaviour of latent-diffusion's `main.py`: each split given in the config becomes a dataset
built from its `target`/`params`; train shuffles, validation does not; `num_workers` defaults to twice
the batch size. Local changes: datasets are built once (the reference built them twice); with a `seed`
(main.py passes the run's seed) the train loader is a `ResumableDataLoader`: order and augmentations
are a pure function of (seed, epoch, position), sharded over DDP ranks, and resumable exactly
(docs/DIFFERENCES.md#datamodule-built-once, #exact-resume-data-order).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.data.resumable import KeyedDataset, ResumableDataLoader, ResumableSampler
from ldm.util import instantiate_from_config


class WrappedDataset(Dataset):
    """Wrap an arbitrary object with `__len__` and `__getitem__` into a map-style dataset."""

    def __init__(self, dataset):
        self.data = dataset

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        return self.data[idx]


def worker_init_fn(worker_id: int) -> None:
    """Seed python, numpy and torch in each worker from the loader's base seed and the worker id."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class DataModuleFromConfig(pl.LightningDataModule):
    def __init__(
        self,
        batch_size: int,
        train: Mapping | None = None,
        validation: Mapping | None = None,
        test: Mapping | None = None,
        predict: Mapping | None = None,
        wrap: bool = False,
        num_workers: int | None = None,
        shuffle_test_loader: bool = False,
        use_worker_init_fn: bool = False,
        shuffle_val_dataloader: bool = False,
        seed: int | None = None,
    ):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers if num_workers is not None else batch_size * 2
        self.use_worker_init_fn = use_worker_init_fn
        self.wrap = wrap
        self.shuffle_test_loader = shuffle_test_loader
        self.shuffle_val_dataloader = shuffle_val_dataloader
        self.seed = seed
        self.dataset_configs = {k: v for k, v in (("train", train), ("validation", validation),
                                                  ("test", test), ("predict", predict)) if v is not None}
        self.datasets: dict[str, Dataset] = {}
        # Lightning looks these hooks up by name: only splits with a config get a loader.
        for split, method in (("train", "train_dataloader"), ("validation", "val_dataloader"),
                              ("test", "test_dataloader"), ("predict", "predict_dataloader")):
            if split not in self.dataset_configs:
                setattr(self, method, None)

    def setup(self, stage: str | None = None) -> None:
        for split, cfg in self.dataset_configs.items():
            if split not in self.datasets:
                dataset = instantiate_from_config(cfg)
                self.datasets[split] = WrappedDataset(dataset) if self.wrap else dataset

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            shuffle=shuffle,
            worker_init_fn=worker_init_fn if (self.use_worker_init_fn or self.num_workers > 0) else None,
        )

    def train_dataloader(self) -> DataLoader:
        if self.seed is None:
            return self._loader("train", shuffle=True)
        self.setup()
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        dataset = self.datasets["train"]
        sampler = ResumableSampler(len(dataset), self.seed, shuffle=True, rank=rank, world_size=world)
        return ResumableDataLoader(KeyedDataset(dataset, self.seed), sampler, self.batch_size,
                                   num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=self.shuffle_val_dataloader)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=self.shuffle_test_loader)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
