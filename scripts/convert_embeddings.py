"""Convert a learned embedding between formats: official .pt, our .safetensors, diffusers, A1111.

    python scripts/convert_embeddings.py embeddings.pt learned_embeds.safetensors --to diffusers
    python scripts/convert_embeddings.py learned_embeds.bin star.pt --to official --placeholder '*' -sd

Reading detects the format from the content. Writing the official or safetensors format needs token ids:
they come from the input file, or for files without them (diffusers, A1111 safetensors) from the tokenizer
(`-sd` for Stable Diffusion's CLIP, LDM's BERT otherwise; `--tokenizer_path` offline).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.modules.embedding_formats import FORMATS, EmbeddingSet, read_embeddings, write_format  # noqa: E402
from ldm.modules.embedding_manager import token_function  # noqa: E402
from ldm.scripts_common import check_output_path, run_script  # noqa: E402


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", help="embeddings file to read")
    p.add_argument("output", help="file to write")
    p.add_argument("--to", choices=FORMATS, required=True, help="output format")
    p.add_argument("--placeholder", default=None, help="rename the (single) placeholder")
    p.add_argument("-sd", "--stable_diffusion", action="store_true", help="CLIP tokenizer (SD) for token ids")
    p.add_argument("--tokenizer_path", default=None, help="local tokenizer folder (offline)")
    return p


def convert(opt, overrides):
    if overrides:
        raise ValueError(f"unexpected arguments: {overrides}")
    if opt.placeholder is not None and (not opt.placeholder.strip() or len(opt.placeholder.split()) != 1):
        raise ValueError(f"--placeholder {opt.placeholder!r}: a placeholder is one word without spaces "
                         "(it becomes one token), e.g. --placeholder '*'")
    check_output_path(opt.output, [opt.input], "output")
    emb = read_embeddings(opt.input)
    if opt.placeholder:
        if len(emb.vectors) != 1:
            raise ValueError(f"--placeholder renames a single placeholder; {opt.input} has {list(emb.vectors)}")
        (old, vectors), = emb.vectors.items()
        emb = EmbeddingSet({opt.placeholder: vectors}, {}, emb.meta)
    missing = [p for p in emb.vectors if p not in emb.tokens]
    if opt.to in ("official", "safetensors") and missing:
        token_of = token_function(opt.stable_diffusion, opt.tokenizer_path)
        emb.tokens.update({p: token_of(p) for p in missing})
    write_format(emb, opt.output, opt.to)
    print(f"{opt.input} -> {opt.output} ({opt.to}): " +
          ", ".join(f"'{p}' {tuple(v.shape)}" for p, v in emb.vectors.items()))


def main(argv=None) -> int:
    return run_script("convert_embeddings.py", parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())
