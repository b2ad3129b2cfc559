"""Small helpers shared across the package: config instantiation and tensor predicates.

Public names kept from latent-diffusion (`ldm.util`): `instantiate_from_config`, `get_obj_from_str`,
`exists`, `default`, `count_params`, `log_txt_as_img`. Dropped (unused): `mean_flat`, `ismap`, `isimage`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import tempfile
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

# Config strings that stand for "no module" in latent-diffusion configs.
_SENTINELS = ("__is_first_stage__", "__is_unconditional__")


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import `package.module.attr` and return `attr`; errors name the dotted path."""
    module_name, _, attr = string.rpartition(".")
    if not module_name:
        raise ImportError(f"target '{string}' is not a dotted path 'module.attribute'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ImportError(f"cannot import module '{module_name}' for target '{string}': {e}") from e
    if reload:
        module = importlib.reload(module)
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise ImportError(f"module '{module_name}' has no attribute '{attr}' (target '{string}')") from e


def instantiate_from_config(config: Mapping | str, **kwargs: Any) -> Any:
    """Build `config.target(**config.params, **kwargs)`.

    The extra keyword arguments (a Textual Inversion addition) let callers pass live objects, such as the
    text encoder handed to the embedding manager. The two latent-diffusion sentinel strings give None.
    """
    if isinstance(config, str) and config in _SENTINELS:
        return None
    if not isinstance(config, Mapping) or "target" not in config:
        raise KeyError("Expected key `target` to instantiate.")
    params = dict(config.get("params", None) or {})
    return get_obj_from_str(config["target"])(**params, **kwargs)


def with_params(config: Any, values: Mapping[str, Any], only_if_accepted: bool = False) -> Any:
    """A copy of the config node `config` with `values` added to its `params` (the node itself is kept).

    Sentinel strings and empty `values` come back unchanged. With `only_if_accepted`, a value goes in only
    if the target's constructor has a parameter of that name (model options that some classes lack).
    """
    if not values or not isinstance(config, Mapping) or "target" not in config:
        return config
    if only_if_accepted:
        accepted = inspect.signature(get_obj_from_str(config["target"])).parameters
        values = {k: v for k, v in values.items() if k in accepted}
    params = {**dict(config.get("params", None) or {}), **values}
    return {**dict(config), "params": params}


def images_from_batch(batch: Mapping[str, Any], key: str) -> torch.Tensor:
    """Batch images [B, H, W, C] (channel-last, as the datasets give) -> contiguous float [B, C, H, W]."""
    x = batch[key]
    if x.ndim == 3:
        x = x[..., None]
    return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    """`val` unless it is None; then `d`, called first if it is a function."""
    if exists(val):
        return val
    return d() if callable(d) else d


def count_params(model: torch.nn.Module, verbose: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        logger.info("%s has %.2f M params.", model.__class__.__name__, total * 1.0e-6)
    return total


def log_txt_as_img(wh: tuple[int, int], xc: list[str], size: int = 10) -> torch.Tensor:
    """Render captions as black text on white images, [B, 3, H, W] in [-1, 1].

    Uses Pillow's default bitmap font (the official fix for the missing DejaVuSans.ttf); lines wrap
    every `int(40 * W / 256)` characters as upstream.
    """
    width = int(40 * (wh[0] / 256))
    font = ImageFont.load_default()
    out = []
    for caption in xc:
        canvas = Image.new("RGB", wh, color="white")
        ImageDraw.Draw(canvas).text((0, 0), "\n".join(textwrap.wrap(caption, width)), fill="black", font=font)
        arr = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        out.append(torch.from_numpy(arr))
    return torch.stack(out)


@torch.no_grad()
def randomize_parameters_(module: torch.nn.Module, generator: torch.Generator, skip_prefixes: tuple[str, ...] = ()):
    """Overwrite every parameter with random values (the parity fixtures' recipe): matrices and kernels
    U(-1, 1) / sqrt(fan_in), 1-D weights 1 + 0.1 N(0, 1), other 1-D 0.1 N(0, 1).

    For tiny demo and test models: a freshly initialised UNet zero-initialises its output projections,
    which would cut the text, and with it a learned word, off from the output.
    """
    for name, p in module.named_parameters():
        if name.startswith(skip_prefixes):
            continue
        if p.ndim >= 2:
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) / p[0].numel() ** 0.5)
        else:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=generator))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it over `path`.

    A crash or a bad input never leaves a half-written file, and never damages an existing one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
