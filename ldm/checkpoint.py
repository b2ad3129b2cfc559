"""The one way this project reads model checkpoints and embedding files.

Reading is safe by construction: `.safetensors` files go through safetensors, everything else through
`torch.load(weights_only=True)` with the explicit allowlist `SAFE_GLOBALS` below (no arbitrary pickle
code can run). Loading into a model applies named fix-ups, then compares key sets and shapes and raises
`CheckpointMismatchError` naming the offending keys. The only keys allowed to be missing are those the
caller lists (by default the embedding manager's, which no base checkpoint contains).

Loading a file costs about one copy of the model: `open_checkpoint` maps it instead of reading it
(`ldm/mapped_file.py`), and `load_state_dict_into` copies it in one tensor at a time, checking each for NaN
just before and giving its file pages back just after; model tensors still on the meta device get their
storage as they are filled.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.mapped_file import FilePages, file_pages, map_safetensors

logger = logging.getLogger(__name__)


class _LightningCallbackKey:
    """Stand-in for the Lightning callback classes that PL 1.x checkpoints pickle as dict keys.

    Official checkpoints (e.g. sd-v1-4.ckpt) key their `callbacks` state by the ModelCheckpoint class
    object. We never need that state, so the name is mapped onto this inert class instead of importing
    and trusting Lightning's.
    """


def _numpy_globals() -> list[Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core -> numpy._core
    scalar = core.multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtypes,
    ]


#: Globals a weights-only load may resolve, and why:
#: - torch.nn.ParameterDict: official embedding files pickle `string_to_param` as this module;
#: - the Lightning ModelCheckpoint class name: dict key of `callbacks` in PL 1.x checkpoints (mapped to
#:   an inert stand-in, see `_LightningCallbackKey`);
#: - numpy scalar/dtype reconstruction: `best_model_score` and similar metadata in Lightning checkpoints.
SAFE_GLOBALS: list[Any] = [
    nn.ParameterDict,
    (_LightningCallbackKey, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_LightningCallbackKey, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
    *_numpy_globals(),
]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not the kind of file expected."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's keys or shapes do not match the model."""


def read_file(path: str | os.PathLike) -> Any:
    """Read a `.safetensors` or torch pickle file safely (no code execution); returns what it holds."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    try:
        return _torch_load(path)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]  # torch's own messages run to pages
        raise CheckpointError(
            f"cannot read {path} as a weights-only torch file ({reason}); it is truncated, corrupt or not a "
            "checkpoint. Only tensors, plain containers and the globals in ldm.checkpoint.SAFE_GLOBALS are "
            "accepted."
        ) from e


def _torch_load(path: Path, mmap: bool = False) -> Any:
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def check_finite(tensors: Mapping[str, Any], where: str) -> None:
    """Raise CheckpointError naming the first floating-point tensor with a NaN or an infinity (found through its
    min and max, which a NaN makes NaN: no temporary as large as the tensor)."""
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() and not bool(
                torch.isfinite(torch.stack(torch.aminmax(value))).all()):
            raise CheckpointError(f"{where}: tensor '{key}' holds NaN or infinite values; refusing to use it")


def verify_training_checkpoint(path: str | os.PathLike) -> dict:
    """Check a Lightning training checkpoint (`last.ckpt`) before a resume trusts it: readable without running
    code, complete (state dict, global step, loop state) and finite. Returns what it holds."""
    obj = read_file(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a Lightning training checkpoint")
    missing = [k for k in ("state_dict", "global_step", "loops") if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is not a Lightning training checkpoint (no {', '.join(missing)}); "
                              "resume from a run's checkpoints/last.ckpt")
    if not isinstance(obj["state_dict"], Mapping):
        raise CheckpointError(f"{path}: its state_dict is a {type(obj['state_dict']).__name__}")
    check_finite(obj["state_dict"], str(path))
    return dict(obj)


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, metadata) of a model checkpoint.

    Accepts a Lightning-style dict with `state_dict` (metadata: `global_step`, `epoch` when present), a
    flat state dict, or a safetensors file.
    """
    state_dict, meta = _state_dict_of(read_file(path), path)
    check_finite(state_dict, str(path))
    return state_dict, meta


def _state_dict_of(obj: Any, path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if "state_dict" in obj:
        meta = {k: obj[k] for k in ("global_step", "epoch") if k in obj}
        state_dict = obj["state_dict"]
    else:
        meta, state_dict = {}, obj
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    return dict(state_dict), meta


@dataclass
class Checkpoint:
    """A model checkpoint opened for loading (`open_checkpoint`): its state dict, its metadata and, when the
    tensors are views of a private mapping of the file, that mapping (`pages`)."""

    path: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    pages: FilePages | None = None

    def release(self, tensor: torch.Tensor) -> None:
        """Give back the file pages of one of its tensors once it has been copied (mapped files only)."""
        if self.pages is not None:
            self.pages.release(tensor)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a model checkpoint without reading it: `.safetensors` and zip-format torch files are mapped, so no
    tensor is resident until read; legacy torch files are read whole. Accepts what `read_state_dict` accepts,
    with its errors, but leaves the NaN check to the reader of each tensor (`load_state_dict_into`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    obj = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt"):  # validates the header
                pass
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    try:
        if path.suffix == ".safetensors":
            obj = map_safetensors(path)  # None: a dtype it does not map
        elif zipfile.is_zipfile(path):
            obj = _torch_load(path, mmap=True)
    except Exception:  # no mapping: read_file below reads the file, or raises the usual one-line error
        obj = None
    if obj is None:
        obj = read_file(path)
    state_dict, meta = _state_dict_of(obj, path)
    return Checkpoint(str(path), state_dict, meta, file_pages(path, state_dict.values()))


# ---------------------------------------------------------------------------------------------------
# Named fix-ups. Each takes (state_dict, model_keys) and returns the state dict it rewrites, logging what
# it changed. They run in order before the strict comparison.
# ---------------------------------------------------------------------------------------------------

_CLIP_PREFIX = "cond_stage_model.transformer."
_POSITION_IDS = "text_model.embeddings.position_ids"


def fixup_clip_transformers5_layout(sd: dict, model_keys: set[str]) -> dict:
    """Insert `text_model.` into CLIP text keys saved from a transformers>=5 `CLIPTextModel`.

    transformers 5 dropped the `.text_model` level, so a checkpoint written by a naive port has
    `cond_stage_model.transformer.encoder.*`; SD v1 files and this project use `...transformer.text_model.*`.
    """
    renamed = {}
    for k in sd:
        rest = k[len(_CLIP_PREFIX):] if k.startswith(_CLIP_PREFIX) else None
        if rest is not None and rest.split(".")[0] in ("embeddings", "encoder", "final_layer_norm"):
            new = _CLIP_PREFIX + "text_model." + rest
            if new in model_keys:
                renamed[k] = new
    if renamed:
        logger.info("fix-up: %d CLIP keys moved under 'text_model.' (transformers 5 layout)", len(renamed))
    return {renamed.get(k, k): v for k, v in sd.items()}


def fixup_clip_position_ids(sd: dict, model_keys: set[str]) -> dict:
    """Supply or drop CLIP's `position_ids` buffer (an arange) where checkpoint and model disagree.

    SD v1 checkpoints contain it; files saved with transformers>=4.31 (non-persistent buffer) do not.
    """
    out = dict(sd)
    for key in [k for k in model_keys if k.endswith(_POSITION_IDS) and k not in sd]:
        emb_key = key.replace("position_ids", "position_embedding.weight")
        if emb_key in sd:
            out[key] = torch.arange(sd[emb_key].shape[0], dtype=torch.int64)[None]
            logger.info("fix-up: added %s (arange), absent from the checkpoint", key)
    for key in [k for k in sd if k.endswith(_POSITION_IDS) and k not in model_keys]:
        del out[key]
        logger.info("fix-up: dropped %s, not a persistent buffer of this model", key)
    return out


def fixup_drop_unused_ema(sd: dict, model_keys: set[str]) -> dict:
    """Drop `model_ema.*` (EMA weights and counters) when the model was built with `use_ema: False`."""
    if any(k.startswith("model_ema.") for k in model_keys):
        return sd
    dropped = [k for k in sd if k.startswith("model_ema.")]
    if dropped:
        logger.info("fix-up: ignored %d EMA entries (model_ema.*) because use_ema is false", len(dropped))
    return {k: v for k, v in sd.items() if not k.startswith("model_ema.")}


FIXUPS: tuple[Callable[[dict, set[str]], dict], ...] = (
    fixup_clip_transformers5_layout,
    fixup_clip_position_ids,
    fixup_drop_unused_ema,
)


@dataclass
class LoadReport:
    path: str
    loaded: int
    missing_allowed: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def _match(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def load_state_dict_into(
    model: nn.Module,
    source: str | os.PathLike | Checkpoint | Mapping[str, torch.Tensor],
    *,
    ignore_keys: Iterable[str] = (),
    allow_missing: Iterable[str] = ("embedding_manager.",),
    source_name: str | None = None,
) -> LoadReport:
    """Load a checkpoint into `model` strictly, after the named fix-ups.

    `source`: a file, an opened one (`open_checkpoint`) or an in-memory state dict. A file's tensors are
    checked for NaN/inf one by one as they are loaded (a bad one stops the load part-way).
    `ignore_keys`: key prefixes of the checkpoint to drop first (the ldm `ignore_keys` option); the model keeps
    its own values for them (e.g. a new noise schedule over old weights).
    `allow_missing`: key prefixes of the model that the checkpoint may lack.
    `source_name`: how to name the source in messages (default: the file, or "<state dict>").
    Raises `CheckpointMismatchError` naming unexpected keys, missing keys and shape mismatches.
    """
    if isinstance(source, (str, os.PathLike)):
        source = open_checkpoint(source)
    if isinstance(source, Checkpoint):
        path, sd, meta, pages = source_name or source.path, dict(source.tensors), source.meta, source.pages
        check_as = path
    else:
        path, sd, meta, pages, check_as = source_name or "<state dict>", dict(source), {}, None, None
    ignore_keys, allow_missing = tuple(ignore_keys), tuple(allow_missing)
    sd = {k: v for k, v in sd.items() if not _match(k, ignore_keys)}
    target = model.state_dict()
    model_keys = set(target)
    for fix in FIXUPS:
        sd = fix(sd, model_keys)

    unexpected = sorted(set(sd) - model_keys)
    missing = sorted(model_keys - set(sd))
    missing_bad = [k for k in missing if not _match(k, allow_missing + ignore_keys)]
    shape_bad = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sorted(model_keys & set(sd))
        if sd[k].shape != target[k].shape
    ]
    if unexpected or missing_bad or shape_bad:
        parts = []
        for title, items in (("missing keys", missing_bad), ("unexpected keys", unexpected),
                             ("shape mismatches", shape_bad)):
            if items:
                shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointMismatchError(f"checkpoint {path} does not match {type(model).__name__}: " + "; ".join(parts))

    _fill(model, sd, pages, check_as)  # key sets were checked above, allowlist included
    logger.info("Restored %s from %s (%d tensors; allowed missing: %d)", type(model).__name__, path, len(sd),
                len(missing))
    return LoadReport(path=path, loaded=len(sd), missing_allowed=missing, meta=meta)


def _fill(model: nn.Module, sd: dict[str, torch.Tensor], pages: FilePages | None, check_as: str | None):
    """Copy `sd` into `model` one tensor at a time, through the module that owns it (its `load_state_dict`,
    so dtype conversion and module overrides are torch's): a meta-device target first gets uninitialised CPU
    storage, the source is checked for NaN (when `check_as` names the file) and its pages are released after.
    A model with load_state_dict hooks (none here) is loaded in one call instead, without releasing pages."""
    owners: dict[str, nn.Module] = {}
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # meta tensor id -> (it, its replacement)
    whole = any(m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks for m in model.modules())
    for key, value in sd.items():
        prefix, _, name = key.rpartition(".")
        if prefix not in owners:
            owners[prefix] = model.get_submodule(prefix)
        owner = owners[prefix]
        _give_storage(owner, name, replaced)
        if whole:
            continue
        if check_as is not None:
            check_finite({key: value}, check_as)
        owner.load_state_dict({name: value}, strict=False)
        if pages is not None:
            pages.release(value)
    if whole:
        if check_as is not None:
            check_finite(sd, check_as)
        model.load_state_dict(sd, strict=False)


def _give_storage(module: nn.Module, name: str, done: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replace `module`'s parameter or buffer `name`, if on the meta device, by uninitialised CPU storage of
    its dtype (one replacement per tensor, so tied tensors stay tied)."""
    old = module._parameters.get(name, module._buffers.get(name))
    if old is None or not old.is_meta:
        return
    if id(old) not in done:
        new = torch.empty_like(old, device="cpu")
        done[id(old)] = (old, nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new)
    setattr(module, name, done[id(old)][1])
