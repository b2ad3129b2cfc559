"""Reading and writing learned embeddings in the formats people exchange them in.

Read (format detected from the content): the official `.pt` (`string_to_token` + `string_to_param`, the
latter a pickled `nn.ParameterDict` or a plain dict), this project's `.safetensors` (vectors plus JSON
metadata), diffusers' `learned_embeds.{bin,safetensors}` ({token: [k, d] or [d]}), AUTOMATIC1111's `.pt`
(`string_to_param` with `name`/`step`) and `.safetensors` (`emb_params`). Every file is read without
executing pickled code (`ldm.checkpoint.read_file`).

Written: the official `.pt` (readable by the reference, A1111 and diffusers); our `.safetensors`: one
tensor per placeholder named `string_to_param.<placeholder>`, metadata `format=textual_inversion`,
`format_version`, `placeholders`, `string_to_token`, `num_vectors`, `token_dim` and any extra fields
(training adds step, seed, config, base_checkpoint, base_checkpoint_sha256, text_encoder_width, and
ema_decay for averaged files: `ldm.models.diffusion.textual_inversion.run_metadata`; all values are
strings); diffusers' `learned_embeds` layout ({placeholder: [k, d]}, `.bin` or `.safetensors`); A1111's
`.pt` (with `name` and `step`) and `.safetensors` (`emb_params`). The last two formats hold one
placeholder per file.

Our `.safetensors` of one placeholder is a single-tensor file, the layout diffusers' `load_textual_inversion`
and A1111 also read (pass diffusers `token=`, or it names the word `string_to_param.<placeholder>`). Without
its metadata it still reads here, the placeholder taken from the tensor name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import CheckpointError, read_file
from ldm.util import atomic_write

FORMAT_NAME = "textual_inversion"
FORMAT_VERSION = "1"
_PARAM_PREFIX = "string_to_param."


class EmbeddingFormatError(CheckpointError):
    """An embeddings file of an unknown layout or with inconsistent content."""


@dataclass
class EmbeddingSet:
    """Placeholder -> vectors [k, d] float32, optional placeholder -> token id, and free-form metadata."""

    vectors: dict[str, torch.Tensor]
    tokens: dict[str, int] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    #: the layout it was read from (one of FORMATS; "" when built in memory)
    source: str = field(default="", compare=False)

    @property
    def token_dim(self) -> int:
        dims = {v.shape[-1] for v in self.vectors.values()}
        if len(dims) != 1:
            raise EmbeddingFormatError(f"embeddings of different widths in one set: {sorted(dims)}")
        return dims.pop()


def _as_vectors(value, where: str) -> torch.Tensor:
    if isinstance(value, nn.Parameter):
        value = value.detach()
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or not value.is_floating_point():
        raise EmbeddingFormatError(f"{where}: expected a float tensor [k, d] or [d]")
    value = value.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(value).all()):
        raise EmbeddingFormatError(f"{where}: holds NaN or infinite values (a diverged run?); "
                                   "refusing to use it")
    return value[None] if value.ndim == 1 else value


def read_embeddings(path: str | os.PathLike) -> EmbeddingSet:
    """Read any supported embeddings file (see the module docstring)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        if not path.is_file():
            raise EmbeddingFormatError(f"embeddings file not found: {path}")
        data = read_file(path)  # first: it turns a corrupt file into a CheckpointError naming it
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return _from_flat(data, meta, path)
    data = read_file(path)
    if not isinstance(data, dict):
        raise EmbeddingFormatError(f"{path}: not an embeddings file (holds a {type(data).__name__})")
    return _from_flat(data, {}, path)


def _from_flat(data: dict, meta: dict[str, str], path: Path) -> EmbeddingSet:
    try:
        return _parse(data, meta, path)
    except (KeyError, ValueError, AttributeError, TypeError) as e:  # json errors are ValueErrors
        if isinstance(e, EmbeddingFormatError):
            raise
        raise EmbeddingFormatError(f"{path}: inconsistent embeddings file ({type(e).__name__}: {e})") from e


def _parse(data: dict, meta: dict[str, str], path: Path) -> EmbeddingSet:
    if meta.get("format") == FORMAT_NAME:
        placeholders = json.loads(meta["placeholders"])
        tokens = {k: int(v) for k, v in json.loads(meta.get("string_to_token", "{}")).items()}
        vectors = {p: _as_vectors(data[_PARAM_PREFIX + p], f"{path}: '{p}'") for p in placeholders}
        extra = {k: v for k, v in meta.items() if k not in ("format", "placeholders", "string_to_token")}
        return EmbeddingSet(vectors, tokens, extra, "safetensors")
    if "string_to_param" in data:  # official, or A1111 (adds name/step)
        params = data["string_to_param"]
        vectors = {str(p): _as_vectors(v, f"{path}: '{p}'") for p, v in params.items()}
        tokens = {str(p): int(torch.as_tensor(t)) for p, t in (data.get("string_to_token") or {}).items()}
        extra = {k: str(data[k]) for k in ("name", "step", "sd_checkpoint_name") if k in data}
        source = "a1111" if ("name" in data or "step" in data) else "official"
        return EmbeddingSet(vectors, tokens, extra, source)
    if "emb_params" in data:  # A1111 safetensors: one embedding, named after the file
        vectors = {path.stem: _as_vectors(data["emb_params"], f"{path}: emb_params")}
        return EmbeddingSet(vectors, {}, dict(meta), "a1111")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) == len(data) and all(k.startswith(_PARAM_PREFIX) for k in tensors):
        # our layout without its metadata: placeholders from the tensor names, token ids from a tokenizer
        vectors = {k[len(_PARAM_PREFIX):]: _as_vectors(v, f"{path}: '{k}'") for k, v in tensors.items()}
        return EmbeddingSet(vectors, {}, dict(meta), "safetensors")
    if len(tensors) == len(data) and len(tensors) >= 1:  # diffusers: {token: vectors}
        vectors = {k: _as_vectors(v, f"{path}: '{k}'") for k, v in tensors.items()}
        return EmbeddingSet(vectors, {}, dict(meta), "diffusers")
    raise EmbeddingFormatError(
        f"{path}: unknown embeddings layout (keys {sorted(map(str, data))[:6]}); expected the official "
        "string_to_token/string_to_param, emb_params, or {token: tensor}"
    )


def write_official(emb: EmbeddingSet, path: str | os.PathLike) -> None:
    """The reference's `.pt`: {"string_to_token": {p: int64 0-d}, "string_to_param": ParameterDict}."""
    missing = [p for p in emb.vectors if p not in emb.tokens]
    if missing:
        raise EmbeddingFormatError(f"cannot write the official format without token ids for {missing}")
    obj = {
        "string_to_token": {p: torch.tensor(emb.tokens[p], dtype=torch.int64) for p in emb.vectors},
        "string_to_param": nn.ParameterDict({p: nn.Parameter(v.clone()) for p, v in emb.vectors.items()}),
    }
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_safetensors(emb: EmbeddingSet, path: str | os.PathLike) -> None:
    """Our safetensors layout with its metadata (see the module docstring)."""
    from safetensors.torch import save_file

    tensors = {_PARAM_PREFIX + p: v.contiguous() for p, v in emb.vectors.items()}
    meta = {str(k): str(v) for k, v in emb.meta.items()}
    meta.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, placeholders=json.dumps(list(emb.vectors)),
                string_to_token=json.dumps(emb.tokens),
                num_vectors=json.dumps({p: v.shape[0] for p, v in emb.vectors.items()}),
                token_dim=str(emb.token_dim))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def write_embeddings(emb: EmbeddingSet, path: str | os.PathLike) -> None:
    """By suffix: `.safetensors` -> ours, anything else -> the official `.pt`."""
    (write_safetensors if Path(path).suffix == ".safetensors" else write_official)(emb, path)


FORMATS = ("official", "safetensors", "diffusers", "a1111")


def _single(emb: EmbeddingSet, fmt: str) -> tuple[str, torch.Tensor]:
    if len(emb.vectors) != 1:
        raise EmbeddingFormatError(f"the {fmt} format holds one placeholder per file; this set has "
                                   f"{list(emb.vectors)} (write one file per placeholder)")
    return next(iter(emb.vectors.items()))


def write_diffusers(emb: EmbeddingSet, path: str | os.PathLike) -> None:
    """diffusers' `learned_embeds.bin` / `.safetensors`: {placeholder: [k, d]}."""
    placeholder, vectors = _single(emb, "diffusers")
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file({placeholder: vectors.contiguous()}, tmp))
    else:
        atomic_write(path, lambda tmp: torch.save({placeholder: vectors.clone()}, tmp))


def write_a1111(emb: EmbeddingSet, path: str | os.PathLike) -> None:
    """AUTOMATIC1111's `.pt` ({string_to_token, string_to_param, name, step}) or `.safetensors`
    (emb_params)."""
    placeholder, vectors = _single(emb, "a1111")
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file({"emb_params": vectors.contiguous()}, tmp))
        return
    obj = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone()},
           "name": emb.meta.get("name", Path(path).stem), "step": int(emb.meta.get("step", 0)),
           "sd_checkpoint": None, "sd_checkpoint_name": None}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_format(emb: EmbeddingSet, path: str | os.PathLike, fmt: str) -> None:
    writers = {"official": write_official, "safetensors": write_safetensors, "diffusers": write_diffusers,
               "a1111": write_a1111}
    if fmt not in writers:
        raise EmbeddingFormatError(f"unknown embeddings format '{fmt}'; choose one of {FORMATS}")
    writers[fmt](emb, path)
