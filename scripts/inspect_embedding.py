"""Show what a learned embedding holds: placeholders, vector norms, training metadata, nearest tokens.

    python scripts/inspect_embedding.py logs/<run>/checkpoints/embeddings.safetensors
    python scripts/inspect_embedding.py embeddings_gs-300.pt --config configs/toy/invert.yaml \
        --ckpt models/toy/toy_ldm.safetensors --top_k 5 [--json]

Any format `scripts/convert_embeddings.py` reads (official .pt, our .safetensors, diffusers .bin/.safetensors,
A1111 .pt/.safetensors). With `--config` and `--ckpt` (the model the embedding was trained on) it also lists
each vector's nearest vocabulary tokens by cosine similarity and places its norm among the vocabulary's
token norms. `--tokenizer_path` points the text encoder at a local tokenizer folder (offline); trailing
`key.path=value` arguments override the config.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.modules.embedding_formats import read_embeddings  # noqa: E402
from ldm.modules.embedding_inspect import describe, vocabulary_of  # noqa: E402
from ldm.scripts_common import run_script  # noqa: E402


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("embedding", help="embeddings file (.pt, .bin or .safetensors)")
    p.add_argument("--config", default=None, help="model config, for the nearest tokens (with --ckpt)")
    p.add_argument("--ckpt", default=None, help="model checkpoint, for the nearest tokens (with --config)")
    p.add_argument("--top_k", type=int, default=5, help="nearest tokens listed per vector")
    p.add_argument("--tokenizer_path", default=None, help="local tokenizer folder (offline)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def check_flags(opt) -> None:
    if not Path(opt.embedding).is_file():
        raise FileNotFoundError(f"embedding file not found: {opt.embedding} (give a .pt, .bin or "
                                ".safetensors file, e.g. logs/<run>/checkpoints/embeddings.safetensors)")
    if (opt.config is None) != (opt.ckpt is None):
        given, missing = ("--config", "--ckpt") if opt.ckpt is None else ("--ckpt", "--config")
        raise ValueError(f"{given} needs {missing} too: the nearest tokens come from that model's vocabulary")
    for flag in ("config", "ckpt"):
        value = getattr(opt, flag)
        if value is not None and not Path(value).is_file():
            raise FileNotFoundError(f"--{flag} {value}: file not found")
    if opt.top_k < 1:
        raise ValueError(f"--top_k {opt.top_k}: give at least 1")


def inspect(opt, overrides) -> dict:
    """The report of `describe`, with the file and model named."""
    check_flags(opt)
    emb = read_embeddings(opt.embedding)
    vocab = None
    if opt.config is not None:
        from ldm.loading import load_model

        vocab = vocabulary_of(load_model(opt.config, opt.ckpt, overrides=overrides,
                                         tokenizer_path=opt.tokenizer_path))
        if vocab.weight.shape[1] != emb.token_dim:
            width = vocab.weight.shape[1]
            raise ValueError(f"{opt.embedding} has vectors of width {emb.token_dim}, the text encoder of "
                             f"--config {opt.config} --ckpt {opt.ckpt} has token width {width}; "
                             "give the model the embedding was trained for")
    elif overrides:
        raise ValueError(f"config overrides {overrides} need --config and --ckpt")
    report = describe(emb, vocab, opt.top_k)
    return {"file": str(opt.embedding), "model": {"config": opt.config, "ckpt": opt.ckpt} if vocab else None,
            **report}


#: the order metadata is printed in (safetensors keeps no order); other keys follow alphabetically
META_ORDER = ("step", "seed", "ema_decay", "base_checkpoint", "base_checkpoint_sha256", "text_encoder_width")


def format_text(report: dict) -> str:
    lines = [f"{report['file']}: format {report['format']}, width {report['token_dim']}, "
             f"{len(report['placeholders'])} placeholder(s)"]
    meta = report["metadata"]
    if meta:
        lines.append("metadata:")
        order = {k: i for i, k in enumerate(META_ORDER)}
        for key in sorted(meta, key=lambda k: (k == "config", order.get(k, len(order)), k)):
            value = meta[key]
            if key == "config":
                value = f"{len(value.splitlines())} lines of YAML (shown with --json)"
            lines.append(f"  {key}: {value}")
    vocab = report["vocabulary"]
    if vocab:
        lines.append(f"vocabulary of {report['model']['ckpt']}: {vocab['tokens']} tokens, norm mean "
                     f"{vocab['norm_mean']:.4f}, std {vocab['norm_std']:.4f} "
                     f"(min {vocab['norm_min']:.4f}, max {vocab['norm_max']:.4f})")
    for entry in report["placeholders"]:
        token = "" if entry["token_id"] is None else f" (token id {entry['token_id']})"
        lines.append(f"'{entry['placeholder']}'{token}: {entry['num_vectors']} vector(s)")
        for row in entry["vectors"]:
            text = f"  vector {row['index']}: norm {row['norm']:.4f}"
            if "norm_percentile" in row:
                text += f", percentile {row['norm_percentile']:.1f} of the vocabulary's norms"
            lines.append(text)
            if row.get("nearest"):
                width = max(len(n["token"]) for n in row["nearest"])
                lines.append(f"    {'rank':>4}  {'token':<{width}}  {'id':>5}  cosine")
                for rank, n in enumerate(row["nearest"], 1):
                    lines.append(f"    {rank:>4}  {n['token']:<{width}}  {n['id']:>5}  {n['cosine']:.4f}")
    return "\n".join(lines)


def run(opt, overrides) -> None:
    report = inspect(opt, overrides)
    print(json.dumps(report, indent=2) if opt.json else format_text(report))


def main(argv=None) -> int:
    return run_script("inspect_embedding.py", parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
