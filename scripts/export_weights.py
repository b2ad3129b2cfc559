"""Export the weights of a training checkpoint as a safetensors file (what configs' ckpt_path can load).

    python scripts/export_weights.py logs/toy/<run>/checkpoints/last.ckpt models/toy/autoencoder.safetensors
    python scripts/export_weights.py last.ckpt unet_only.safetensors --prefix model.diffusion_model. --strip
    python scripts/export_weights.py last.ckpt grown.safetensors \
        --pad_rows cond_stage_model.transformer.token_emb.weight=64

`--pad_rows KEY=N` appends zero rows to a table until it has N rows: the warm start of a model whose
vocabulary gained words at its end (the old words keep their ids and their rows).

The file records the source checkpoint, its global step and epoch, and `--note` in its metadata.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import read_state_dict  # noqa: E402
from ldm.scripts_common import run_script  # noqa: E402
from ldm.util import atomic_write  # noqa: E402


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help=".ckpt (Lightning or flat) or .safetensors")
    p.add_argument("output", help="output .safetensors")
    p.add_argument("--prefix", default="", help="keep only keys starting with this")
    p.add_argument("--strip", action="store_true", help="remove the prefix from the kept keys")
    p.add_argument("--note", default="", help="free text stored in the metadata (e.g. the recipe)")
    p.add_argument("--half", action="store_true", help="store float tensors as float16 (half the size; they "
                   "load into a float32 model, rounded to float16 precision)")
    p.add_argument("--pad_rows", action="append", default=[], metavar="KEY=N",
                   help="append zero rows to tensor KEY until it has N rows (repeatable)")
    return p


def pad_rows(sd: dict, spec: str) -> None:
    """Apply one `KEY=N` of --pad_rows to `sd` in place."""
    key, _, rows = spec.rpartition("=")
    if key not in sd:
        raise ValueError(f"--pad_rows {spec}: no tensor {key!r} in the checkpoint")
    old = sd[key]
    if not rows.isdigit() or int(rows) < old.shape[0]:
        raise ValueError(f"--pad_rows {spec}: N must be an integer >= the {old.shape[0]} rows it has")
    sd[key] = torch.cat([old, old.new_zeros(int(rows) - old.shape[0], *old.shape[1:])])


def export(opt, overrides):
    if overrides:
        raise ValueError(f"unexpected arguments: {overrides}")
    from safetensors.torch import save_file

    sd, meta = read_state_dict(opt.checkpoint)
    for spec in opt.pad_rows:
        pad_rows(sd, spec)
    kept = {}
    for k, v in sd.items():
        if k.startswith(opt.prefix):
            v = v.half() if opt.half and v.is_floating_point() else v
            kept[k[len(opt.prefix):] if opt.strip else k] = v.contiguous()
    if not kept:
        raise ValueError(f"{opt.checkpoint}: no key starts with '{opt.prefix}'")
    info = {"source": str(opt.checkpoint), "note": opt.note, "pad_rows": " ".join(opt.pad_rows),
            "dtype": "float16" if opt.half else "as saved",
            **{k: str(v) for k, v in meta.items()}}
    atomic_write(opt.output, lambda tmp: save_file(kept, tmp, metadata=info))
    size = sum(v.numel() * v.element_size() for v in kept.values()) / 2**20
    print(f"{opt.output}: {len(kept)} tensors, {size:.1f} MiB, step {meta.get('global_step', '?')}")


if __name__ == "__main__":
    sys.exit(run_script("export_weights.py", parser(), export))
