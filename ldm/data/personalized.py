"""Training data for object concepts: a folder of a few images, captioned from prompt templates.

Port of the reference `ldm/data/personalized.py` (rinongal/textual_inversion @ 424192de). The template
lists are the reference's, in its order and with its duplicates: captions are drawn with `random.choice`
over list positions, so a repeated template is proportionally more likely.

Fidelity: with the default `rng=None` every random draw is the reference's, from the same global generator and
in the same order per item: `np.random.uniform()` (only with `per_image_tokens`), then `random.choice` for the
template, then one `torch.rand(1)` for the horizontal flip (drawn even when `flip_p` is 0, as torchvision's
`RandomHorizontalFlip` does). Seeded the same way, items come out bit-identical to the reference's
(tests/test_personalized_data.py checks this against the shared parity fixtures).

Local changes (docs/DIFFERENCES.md#training-data): the image folder is filtered and sorted, EXIF
orientation is applied, and
16-bit images are scaled correctly (all in `ldm.data.image_folder`); `per_image_tokens` accepts up to
22 images instead of 21; `"linear"` interpolation works on Pillow >= 10; bad arguments
raise ValueError instead of failing later.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ldm.data.image_folder import (
    ALPHA_MODES,
    check_images,
    image_to_array,
    list_image_files,
    load_rgb,
    resampling_filter,
)
from ldm.data.placeholder_tokens import per_img_token_list
from ldm.util import get_obj_from_str

__all__ = [
    "PersonalizedBase",
    "imagenet_dual_templates_small",
    "imagenet_templates_small",
    "imagenet_templates_smallest",
    "per_img_token_list",
]

# Defined by the reference but never used by it.
imagenet_templates_smallest = [
    "a photo of a {}",
]

imagenet_templates_small = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
    "an illustration of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "an illustration of a clean {}",
    "an illustration of a dirty {}",
    "a dark photo of the {}",
    "an illustration of my {}",
    "an illustration of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "an illustration of the {}",
    "a good photo of the {}",
    "an illustration of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "an illustration of the clean {}",
    "a rendition of a {}",
    "an illustration of a nice {}",
    "a good photo of a {}",
    "an illustration of the nice {}",
    "an illustration of the small {}",
    "an illustration of the weird {}",
    "an illustration of the large {}",
    "an illustration of a cool {}",
    "an illustration of a small {}",
    "a depiction of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a depiction of a clean {}",
    "a depiction of a dirty {}",
    "a dark photo of the {}",
    "a depiction of my {}",
    "a depiction of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a depiction of the {}",
    "a good photo of the {}",
    "a depiction of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a depiction of the clean {}",
    "a rendition of a {}",
    "a depiction of a nice {}",
    "a good photo of a {}",
    "a depiction of the nice {}",
    "a depiction of the small {}",
    "a depiction of the weird {}",
    "a depiction of the large {}",
    "a depiction of a cool {}",
    "a depiction of a small {}",
]

# Filled with (placeholder string, per-image token).
imagenet_dual_templates_small = [
    "a photo of a {} with {}",
    "a rendering of a {} with {}",
    "a cropped photo of the {} with {}",
    "the photo of a {} with {}",
    "a photo of a clean {} with {}",
    "a photo of a dirty {} with {}",
    "a dark photo of the {} with {}",
    "a photo of my {} with {}",
    "a photo of the cool {} with {}",
    "a close-up photo of a {} with {}",
    "a bright photo of the {} with {}",
    "a cropped photo of a {} with {}",
    "a photo of the {} with {}",
    "a good photo of the {} with {}",
    "a photo of one {} with {}",
    "a close-up photo of the {} with {}",
    "a rendition of the {} with {}",
    "a photo of the clean {} with {}",
    "a rendition of a {} with {}",
    "a photo of a nice {} with {}",
    "a good photo of a {} with {}",
    "a photo of the nice {} with {}",
    "a photo of the small {} with {}",
    "a photo of the weird {} with {}",
    "a photo of the large {} with {}",
    "a photo of a cool {} with {}",
    "a photo of a small {} with {}",
]

SPLITS = ("train", "val", "test")


def is_personalized(node) -> bool:
    """Whether a dataset config node (`target`/`params`) builds a `PersonalizedBase` (objects, styles, or a
    subclass): the datasets that take `data_root` and `placeholder_token` from the command line."""
    target = node.get("target") if hasattr(node, "get") else None
    if not target:
        return False
    cls = get_obj_from_str(str(target))
    return isinstance(cls, type) and issubclass(cls, PersonalizedBase)


class PersonalizedBase(Dataset):
    """Images of one concept, each item captioned "a photo of a *"-style.

    Args:
        data_root: folder holding the training images (not searched recursively).
        size: side of the square the images are resized to; None keeps the file's size.
        repeats: with `set="train"`, the dataset is the image list repeated this many times (one epoch
            of Lightning = `repeats` passes); other splits have one item per image.
        interpolation: resize filter, "linear"/"bilinear", "bicubic" or "lanczos".
        flip_p: probability of a horizontal flip.
        set: "train", "val" or "test" (the reference's config keyword, kept although it shadows the builtin).
        placeholder_token: the placeholder string written into captions ("*"); it must be the string the
            embedding manager looks for (the official `--placeholder_string` updated only the model side).
        per_image_tokens: with probability `mixing_prob`, caption image i with a dual template that also
            names its own token `per_img_token_list[i]`. Needs at most 22 images.
        center_crop: crop the central square before resizing (default off, as in the reference, so
            non-square images are squashed, docs/DIFFERENCES.md#squashed-images).
        mixing_prob: see `per_image_tokens`.
        coarse_class_text: if given, the placeholder is written as "<coarse_class_text> <placeholder>".
        exif_transpose: apply the EXIF orientation (docs/DIFFERENCES.md#exif-orientation); False
            reproduces the reference exactly.
        alpha: "drop" (reference) or "white" (composite transparent images onto white).
        templates: caption templates replacing `imagenet_templates_small` (each with one "{}").
        rng: None draws from the global `numpy.random`, `random` and `torch` generators as the reference
            does. A `random.Random` makes every draw (mixing, template, flip) come from it instead; inside
            DataLoader workers each worker re-seeds its copy from that generator and the worker's seed,
            so workers do not repeat each other's captions and flips.

    Items are `{"caption": str, "image": float32 [size, size, 3] in [-1, 1]}`.
    """

    templates = imagenet_templates_small
    dual_templates = imagenet_dual_templates_small

    def __init__(
        self,
        data_root: str | os.PathLike,
        size: int | None = None,
        repeats: int = 100,
        interpolation: str = "bicubic",
        flip_p: float = 0.5,
        set: str = "train",
        placeholder_token: str = "*",
        per_image_tokens: bool = False,
        center_crop: bool = False,
        mixing_prob: float = 0.25,
        coarse_class_text: str | None = None,
        exif_transpose: bool = True,
        alpha: str = "drop",
        rng: random.Random | None = None,
        templates: list[str] | None = None,
    ):
        if templates is not None:  # e.g. a small vocabulary's own caption templates (the toy world)
            if not templates or any("{}" not in t for t in templates):
                raise ValueError("templates must be a non-empty list of strings with a '{}' placeholder slot")
            self.templates = list(templates)
        if set not in SPLITS:
            raise ValueError(f"set={set!r} is not supported; choose one of {list(SPLITS)}")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive integer or None, got {size!r}")
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        for name, p in (("flip_p", flip_p), ("mixing_prob", mixing_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        if alpha not in ALPHA_MODES:
            raise ValueError(f"alpha={alpha!r} is not supported; choose one of {list(ALPHA_MODES)}")
        if rng is not None and not isinstance(rng, random.Random):
            raise ValueError(f"rng must be a random.Random or None, got {type(rng).__name__}")

        self.data_root = os.fspath(data_root)
        self.image_paths = list_image_files(self.data_root)
        self.num_images = len(self.image_paths)
        if per_image_tokens and self.num_images > len(per_img_token_list):
            raise ValueError(
                f"per_image_tokens needs one token per image, but {self.data_root} holds {self.num_images} "
                f"images and per_img_token_list has {len(per_img_token_list)} tokens; use at most "
                f"{len(per_img_token_list)} images or add tokens to ldm/data/placeholder_tokens.py"
            )
        check_images(self.image_paths, exif_transpose=exif_transpose, alpha=alpha, size=size)

        self.set = set
        self._length = self.num_images * repeats if set == "train" else self.num_images
        self.size = size
        self.interpolation = resampling_filter(interpolation)
        self.flip_p = flip_p
        self.placeholder_token = placeholder_token
        self.per_image_tokens = per_image_tokens
        self.center_crop = center_crop
        self.mixing_prob = mixing_prob
        self.coarse_class_text = coarse_class_text
        self.exif_transpose = exif_transpose
        self.alpha = alpha
        self.rng = rng
        self._worker_seed: int | None = None
        self._worker_rng: random.Random | None = None

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> dict:
        index = i % self.num_images
        image = load_rgb(self.image_paths[index], exif_transpose=self.exif_transpose, alpha=self.alpha)
        caption = self.caption(index)
        flip = self._draw_flip()
        array = image_to_array(image, self.size, self.interpolation, self.center_crop, flip)
        return {"caption": caption, "image": array}

    def distinct_images(self) -> list[np.ndarray]:
        """Every image array `__getitem__` can return: each image unflipped and/or flipped, as `flip_p` allows
        (cropping and resizing are deterministic; only the flip is drawn)."""
        flips = [flip for flip in (False, True) if (self.flip_p > 0 if flip else self.flip_p < 1)]
        arrays = []
        for path in self.image_paths:
            image = load_rgb(path, exif_transpose=self.exif_transpose, alpha=self.alpha)
            arrays += [image_to_array(image, self.size, self.interpolation, self.center_crop, flip)
                       for flip in flips]
        return arrays

    @property
    def placeholder_string(self) -> str:
        """The text standing for the concept in captions, prefixed by the coarse class if one is set."""
        if self.coarse_class_text:
            return f"{self.coarse_class_text} {self.placeholder_token}"
        return self.placeholder_token

    def caption(self, index: int) -> str:
        """Draw the caption for image `index` (the reference's draws: mixing first, then the template)."""
        if self.per_image_tokens and self._draw_uniform() < self.mixing_prob:
            template = self._draw_choice(self.dual_templates)
            return template.format(self.placeholder_string, per_img_token_list[index])
        return self._draw_choice(self.templates).format(self.placeholder_string)

    # Random draws: the reference's global generators unless an own `rng` was given.

    def _draw_uniform(self) -> float:
        return float(np.random.uniform()) if self.rng is None else self._own_rng().random()

    def _draw_choice(self, options: list[str]) -> str:
        return random.choice(options) if self.rng is None else self._own_rng().choice(options)

    def _draw_flip(self) -> bool:
        if self.rng is None:
            # One float32 draw compared in float32, as torchvision's RandomHorizontalFlip does.
            return bool(torch.rand(1) < self.flip_p)
        return self._own_rng().random() < self.flip_p

    def _own_rng(self) -> random.Random:
        worker = get_worker_info()
        if worker is None:
            return self.rng
        if self._worker_seed != worker.seed:
            # A fresh dataset copy per worker (and per epoch without persistent workers): derive its
            # stream from the shared generator state and the worker's seed, which differ per worker/epoch.
            self._worker_seed = worker.seed
            self._worker_rng = random.Random(f"{self.rng.getrandbits(64)}/{worker.seed}")
        return self._worker_rng
