"""Training data for style concepts: captions such as "a painting in the style of *".

Port of the reference `ldm/data/personalized_style.py` (rinongal/textual_inversion @ 424192de).
Identical to the object dataset in `ldm.data.personalized` (same image
pipeline, same random draws, same local fixes) except that the constructor has no `mixing_prob` and no
`coarse_class_text`: the dual-template probability is fixed at 0.25 and the placeholder is never prefixed.
"""

from __future__ import annotations

import os
import random

from ldm.data import personalized
from ldm.data.placeholder_tokens import per_img_token_list

__all__ = [
    "PersonalizedBase",
    "imagenet_dual_templates_small",
    "imagenet_templates_small",
    "per_img_token_list",
]

imagenet_templates_small = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

# Filled with (placeholder string, per-image token). Fidelity quirk kept from the reference: entry 12 puts
# the placeholder in the object slot and the per-image token in the style slot, unlike every other entry.
imagenet_dual_templates_small = [
    "a painting in the style of {} with {}",
    "a rendering in the style of {} with {}",
    "a cropped painting in the style of {} with {}",
    "the painting in the style of {} with {}",
    "a clean painting in the style of {} with {}",
    "a dirty painting in the style of {} with {}",
    "a dark painting in the style of {} with {}",
    "a cool painting in the style of {} with {}",
    "a close-up painting in the style of {} with {}",
    "a bright painting in the style of {} with {}",
    "a cropped painting in the style of {} with {}",
    "a good painting in the style of {} with {}",
    "a painting of one {} in the style of {}",
    "a nice painting in the style of {} with {}",
    "a small painting in the style of {} with {}",
    "a weird painting in the style of {} with {}",
    "a large painting in the style of {} with {}",
]

# The reference hard-codes this probability of a dual template when per_image_tokens is on.
DUAL_TEMPLATE_PROB = 0.25


class PersonalizedBase(personalized.PersonalizedBase):
    """Images of one style; arguments as `ldm.data.personalized.PersonalizedBase`, minus `mixing_prob`
    and `coarse_class_text` (passing either raises TypeError, as in the reference)."""

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
        exif_transpose: bool = True,
        alpha: str = "drop",
        rng: random.Random | None = None,
    ):
        super().__init__(
            data_root,
            size=size,
            repeats=repeats,
            interpolation=interpolation,
            flip_p=flip_p,
            set=set,
            placeholder_token=placeholder_token,
            per_image_tokens=per_image_tokens,
            center_crop=center_crop,
            mixing_prob=DUAL_TEMPLATE_PROB,
            coarse_class_text=None,
            exif_transpose=exif_transpose,
            alpha=alpha,
            rng=rng,
        )
