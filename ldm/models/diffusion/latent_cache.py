"""Cache of first-stage posterior moments for the few images textual inversion trains on.

The reference encodes the same 3-5 training images (each with or without its flip) through the frozen
autoencoder at every step: about a quarter of the step time of LDM 1.4B on a CPU. The encoder is
deterministic, so its output moments (mean, logvar) for a given image never change; only the posterior
*sample* is random. This cache stores the moments per distinct input image (keyed by the bytes of the
[C, H, W] tensor) and the model still draws the sample from them every step, with the same noise as
before: losses are identical to the uncached path for the same noise (tested).

A batch with an image not cached yet is encoded whole, as the uncached step encodes it: a convolution's
last bits can depend on the batch size (on the CPU one image alone differs from the same image in a pair),
though not on the other images of a batch of the same size (tests/test_release_first_stage.py).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


class LatentCache:
    """Moments [2 * z_channels, h, w] per image, least recently used entries dropped past `max_items`."""

    def __init__(self, max_items: int = 4096):
        self.max_items = max_items
        self._store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def key(image: torch.Tensor) -> bytes:
        t = image.detach().to("cpu", torch.float32).contiguous()
        return hashlib.blake2b(t.numpy().tobytes() + str(tuple(t.shape)).encode(), digest_size=16).digest()

    def __contains__(self, key: bytes) -> bool:
        return key in self._store

    def moments(self, images: torch.Tensor, encode) -> torch.Tensor:
        """Moments for a batch [B, C, H, W]: cached ones reused; if any is missing, `encode` (a function of a
        batch returning moments [B, 2 * z, h, w]) computes the whole batch and the missing ones are stored."""
        keys = [self.key(x) for x in images]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        if missing:
            fresh = encode(images).detach()
            for i in missing:
                self._store[keys[i]] = fresh[i].clone()
            while len(self._store) > self.max_items:
                self._store.popitem(last=False)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        out = []
        for k in keys:
            self._store.move_to_end(k)
            out.append(self._store[k])
        return torch.stack(out).to(images.device)

    def state_dict(self) -> dict:
        """The cached moments, in LRU order (keys as hex strings), for a training checkpoint."""
        keys = list(self._store)
        return {"keys": [k.hex() for k in keys],
                "moments": torch.stack([self._store[k].cpu() for k in keys]) if keys else torch.empty(0)}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`: a run resumed mid-epoch reuses the moments the interrupted run computed
        (recomputing them would batch the images differently, and a CPU convolution's last bits can depend
        on the batch), so it replays the uninterrupted run bitwise."""
        self._store = OrderedDict((bytes.fromhex(k), m) for k, m in zip(state["keys"], state["moments"], strict=True))
