"""The image side of the personalized datasets: which files are training images, and how one becomes an array.

Shared by `ldm.data.personalized` and `ldm.data.personalized_style`. The pipeline follows the reference
(rinongal/textual_inversion @ 424192de, `ldm/data/personalized.py`, `PersonalizedBase.__getitem__`) pixel for
pixel on 8-bit RGB, L, P and RGBA inputs, with these local changes (docs/DIFFERENCES.md#training-data):

* only image files, by extension, are listed (no hidden files, no sub-folders), sorted by name;
  the reference took every `os.listdir` entry in filesystem order.
* the EXIF orientation is applied (`exif_transpose=True`, switchable for fidelity checks).
* `"linear"` means `Image.BILINEAR` (the reference's `Image.LINEAR` is gone since Pillow 10).
* 16-bit integer images are scaled to 8 bit (value / 257); the reference's `convert("RGB")` clips them.
* `alpha="white"` composites transparent images onto white; the default `"drop"` keeps the reference's
  behaviour of discarding the alpha channel.
* Every image is decoded once when the folder is listed, so a broken file fails early, naming its path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

# Config name -> Pillow resampling filter. "linear" and "bilinear" are the same filter (Pillow 10 removed
# Image.LINEAR, docs/DIFFERENCES.md#linear-interpolation).
INTERPOLATIONS = {
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

ALPHA_MODES = ("drop", "white")

logger = logging.getLogger(__name__)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_MODES_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def resampling_filter(interpolation: str) -> Image.Resampling:
    """Pillow filter for a config's `interpolation` string; unknown names raise a ValueError naming them."""
    try:
        return INTERPOLATIONS[interpolation]
    except (KeyError, TypeError):
        raise ValueError(
            f"interpolation={interpolation!r} is not supported; choose one of {sorted(INTERPOLATIONS)}"
        ) from None


def list_image_files(data_root: str | os.PathLike) -> list[str]:
    """Paths of the image files directly inside `data_root`, sorted by file name (code-point order; the
    reference took unfiltered `os.listdir` order, docs/DIFFERENCES.md#image-folder-listing).

    Hidden entries (names starting with ".", which includes macOS `._*` companions) and sub-folders are
    skipped; the extension test is case-insensitive. Raises ValueError if the folder is missing or holds
    no image, listing what it did hold.
    """
    root = os.fspath(data_root)
    if not os.path.exists(root):
        raise ValueError(f"data_root {root} does not exist")
    if not os.path.isdir(root):
        raise ValueError(f"data_root {root} is not a directory")
    entries = sorted(os.listdir(root))
    names = [
        name
        for name in entries
        if not name.startswith(".")
        and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        and os.path.isfile(os.path.join(root, name))
    ]
    if not names:
        shown = [name + "/" if os.path.isdir(os.path.join(root, name)) else name for name in entries[:20]]
        found = ", ".join(shown) + (f", ... ({len(entries)} entries)" if len(entries) > 20 else "")
        raise ValueError(
            f"no image files in data_root {root} (extensions {', '.join(IMAGE_EXTENSIONS)}); "
            f"found: {found or 'nothing'}"
        )
    skipped = [name for name in entries if not name.startswith(".") and name not in names]
    if skipped:
        logger.info("data_root %s: ignoring %d entries that are not image files: %s", root, len(skipped),
                    ", ".join(skipped[:20]))
    return [os.path.join(root, name) for name in names]


#: An image whose smaller side is below `size / UPSCALE_WARNING` gets a warning when listed (it will be blown up).
UPSCALE_WARNING = 4


def check_images(paths: Sequence[str], exif_transpose: bool = True, alpha: str = "drop",
                 size: int | None = None) -> None:
    """Decode every image once through `load_rgb`; the first failure raises ValueError naming the file.

    With `size` (the training resolution), an image more than UPSCALE_WARNING times smaller gets a warning.
    Images above Pillow's `Image.MAX_IMAGE_PIXELS` (decompression-bomb limit) are refused by `load_rgb`.
    """
    for path in paths:
        image = load_rgb(path, exif_transpose=exif_transpose, alpha=alpha)
        if size and min(image.size) * UPSCALE_WARNING < size:
            logger.warning("warning: image %s is only %dx%d pixels; it is upscaled to %dx%d for training, "
                           "which blurs it (use a larger image)", path, *image.size, size, size)


def load_rgb(path: str, exif_transpose: bool = True, alpha: str = "drop") -> Image.Image:
    """Open `path` and return it as an 8-bit RGB image.

    Order: decode, EXIF orientation (if `exif_transpose`), colour conversion (`to_rgb`). Any decoding or
    conversion failure becomes `ValueError("cannot read image <path>: <reason>")`.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha={alpha!r} is not supported; choose one of {list(ALPHA_MODES)}")
    try:
        return _decode(path, exif_transpose, alpha, truncated=False)
    except OSError as e:
        if "truncated" not in str(e):  # partly decodable (a cut-off or damaged JPEG): the rest is filled in
            raise ValueError(f"cannot read image {path}: {e}") from e
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    try:
        image = _decode(path, exif_transpose, alpha, truncated=True)
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    if path not in _WARNED_TRUNCATED:
        _WARNED_TRUNCATED.add(path)
        logger.warning("warning: image %s is truncated or damaged; only part of it decodes and the rest is "
                       "filled in (replace the file)", path)
    return image


_WARNED_TRUNCATED: set[str] = set()


def _decode(path: str, exif_transpose: bool, alpha: str, truncated: bool) -> Image.Image:
    from PIL import ImageFile

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = truncated
    try:
        with Image.open(path) as image:
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image, alpha=alpha)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def to_rgb(image: Image.Image, alpha: str = "drop") -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    * RGB is returned unchanged; L, 1, P, CMYK, YCbCr, ... go through Pillow's `convert("RGB")`, as in
      the reference (grey is replicated to three channels).
    * 16-bit integer modes ("I;16*", and "I", which is how Pillow opens 16-bit PNG/TIFF data) are scaled
      from [0, 65535] to [0, 255] by value / 257, rounded; the reference's conversion clipped at 255.
    * "F" (float) follows Pillow's convention that its values are on the 0..255 scale: rounded and clipped.
    * Images with transparency (RGBA, LA, PA, or a `transparency` entry): `alpha="drop"` discards the alpha
      channel exactly like the reference's `convert("RGB")`; `alpha="white"` composites onto white.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha={alpha!r} is not supported; choose one of {list(ALPHA_MODES)}")
    if image.mode in _SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.float64) / 257.0
        return Image.fromarray(_round_to_uint8(levels)).convert("RGB")
    if image.mode == "F":
        return Image.fromarray(_round_to_uint8(np.asarray(image, dtype=np.float64))).convert("RGB")
    if alpha == "white" and (image.mode in _MODES_WITH_ALPHA or "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _round_to_uint8(levels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(levels), 0, 255).astype(np.uint8)


def image_to_array(
    image: Image.Image,
    size: int | None,
    resample: Image.Resampling,
    center_crop: bool,
    flip: bool,
) -> np.ndarray:
    """Crop, resize and flip an RGB image into the model's input: float32 [H, W, 3] in [-1, 1].

    Reference order: optional central square crop (side min(h, w), rows/cols [(h-c)//2, (h+c)//2)),
    then resize to (size, size) with `resample` (aspect ratio not kept without the crop, as in the
    reference), then the horizontal flip, then `uint8 / 127.5 - 1` computed in float64 and stored as
    float32, which is what the reference's numpy expression does.
    """
    if center_crop:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if size is not None:
        image = image.resize((size, size), resample=resample)
    pixels = np.asarray(image, dtype=np.uint8)
    if flip:
        pixels = pixels[:, ::-1]
    return (pixels / 127.5 - 1.0).astype(np.float32)
