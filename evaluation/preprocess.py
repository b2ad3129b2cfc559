"""The OpenAI CLIP image preprocessing, reproduced without torchvision.

OpenAI's `clip.load` returns, for a model of input side n (224 for ViT-B/32), the transform
`Resize(n, BICUBIC) -> CenterCrop(n) -> RGB -> ToTensor -> Normalize(CLIP_MEAN, CLIP_STD)` applied to PIL
images. `preprocess_pil` is that transform step by step:

1. resize so that the shorter side is n, the longer one `int(n * long / short)` (torchvision's rule;
   an image whose shorter side already is n is left untouched), with PIL's bicubic filter;
2. crop the central n x n square, offsets `int(round((h - n) / 2.0))` and `int(round((w - n) / 2.0))`
   (Python's round: halves go to the even neighbour, as in torchvision; Hugging Face's CLIP image
   processor floors instead, which differs when the excess is 3 mod 4);
3. convert to RGB, scale the uint8 values to [0, 1] in float32, subtract `CLIP_MEAN`, divide by `CLIP_STD`.

Generated images are tensors [B, 3, H, W] in [-1, 1]; `preprocess_tensor` offers two paths for them:

* `mode="pil"` (default): round each image to uint8 (`round((x + 1) * 127.5)`, clamped) and run
  `preprocess_pil`. In-memory samples then score exactly like the same samples saved losslessly, and
  training images that came from uint8 files (`x = v / 127.5 - 1`) are recovered exactly.
* `mode="tensor"`: the official `evaluation/clip_eval.py` path: `(x + 1) / 2`, then torchvision's tensor
  `Resize` as it behaved in the pinned torchvision 0.11 (bicubic `interpolate`, `align_corners=False`,
  no antialiasing, no clamping), the same centre crop and the CLIP normalisation, all in float on the
  tensor's device. Newer torchvision antialiases tensors by default, which changes the numbers
  (docs/DIFFERENCES.md#clip-preprocessing);
  this path pins the old behaviour. Use it to reproduce the official numbers most closely.

The two paths differ (PIL's bicubic filter widens its support when downsampling, the tensor path does
not), so a report must say which one was used; the evaluators record it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IMAGE_SIZE = 224

PreprocessMode = Literal["pil", "tensor"]
PREPROCESS_MODES = ("pil", "tensor")


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `size` (torchvision's rule for an int size)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the central `size` x `size` square, rounded as torchvision does."""
    if width < size or height < size:
        raise ValueError(f"cannot crop {size}x{size} from a {width}x{height} image")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> CLIP-normalised, in x's dtype and device."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess_pil(images: Sequence[Image.Image], size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """OpenAI CLIP's transform on PIL images -> float32 [B, 3, size, size] on the CPU."""
    if isinstance(images, Image.Image):
        images = [images]
    arrays = []
    for image in images:
        width, height = image.size
        new_size = resized_size(width, height, size)
        if new_size != (width, height):
            image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
        image = image.crop(center_crop_box(*image.size, size)).convert("RGB")
        arrays.append(np.asarray(image, dtype=np.uint8))
    if not arrays:
        raise ValueError("no images to preprocess")
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)
    return _normalize(pixels)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB PIL images, rounding to the nearest uint8 level."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    levels = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(level.permute(1, 2, 0).numpy()) for level in levels]


def preprocess_tensor(
    images: torch.Tensor, size: int = CLIP_IMAGE_SIZE, mode: PreprocessMode = "pil"
) -> torch.Tensor:
    """CLIP input from generator output [B, 3, H, W] in [-1, 1]; see the module docstring for `mode`.

    Returns float32 [B, 3, size, size]: on the CPU for `mode="pil"`, on the input's device otherwise.
    """
    if mode == "pil":
        return preprocess_pil(tensor_to_pil(images), size)
    if mode != "tensor":
        raise ValueError(f"preprocess mode {mode!r} is not supported; choose one of {list(PREPROCESS_MODES)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
    x = (images.float() + 1.0) / 2.0
    height, width = x.shape[-2:]
    new_w, new_h = resized_size(width, height, size)
    if (new_w, new_h) != (width, height):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=False)
    left, top, right, bottom = center_crop_box(new_w, new_h, size)
    return _normalize(x[..., top:bottom, left:right])
