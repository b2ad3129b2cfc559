"""Image grids and PNG/JPEG writing without torchvision.

`make_grid` follows torchvision.utils.make_grid's layout (rows of `nrow` images, `padding` pixels of
`pad_value` around each); `to_uint8` maps [0, 1] floats to bytes by truncation like the reference
(`(x * 255).astype(np.uint8)`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ldm.util import atomic_write


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """[B, C, H, W] -> [C, H', W'] grid with min(nrow, B) columns; one-channel images become RGB."""
    if images.ndim != 4:
        raise ValueError(f"make_grid expects [B, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    b, c, h, w = images.shape
    if b == 1:
        return images[0]
    cols = min(nrow, b)
    rows = math.ceil(b / cols)
    hp, wp = h + padding, w + padding
    grid = images.new_full((c, rows * hp + padding, cols * wp + padding), pad_value)
    for i in range(b):
        r, k = divmod(i, cols)
        grid[:, r * hp + padding : r * hp + padding + h, k * wp + padding : k * wp + padding + w] = images[i]
    return grid


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] float in [0, 1] -> [H, W, C] uint8 (truncating, as the reference)."""
    arr = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return (arr * 255).astype(np.uint8)


def save_image(array: np.ndarray, path: str | os.PathLike, text: Mapping[str, str] | None = None) -> None:
    """Write an image atomically; PNG files get `text` as tEXt metadata (prompt, seed, ...)."""
    path = Path(path)
    image = Image.fromarray(array)
    kwargs = {}
    if path.suffix.lower() == ".png" and text:
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(str(k), str(v))
        kwargs["pnginfo"] = info
    atomic_write(path, lambda tmp: image.save(tmp, **kwargs))
