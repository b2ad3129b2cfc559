"""Merge embedding files from several Textual Inversion runs into one.

    python merge_embeddings.py --manager_ckpts cat.pt style.pt --output_path merged.pt [-sd]
    python merge_embeddings.py --manager_ckpts a.pt b.pt --output_path ab.pt --rename 2:*=@

Non-interactive: a placeholder collision is an error unless `--rename N:OLD=NEW` resolves it (file N, counted
from 1). Only the tokenizer is loaded (no model). Input: any format `ldm.modules.embedding_formats` reads;
output: the official `.pt`, or our `.safetensors` by suffix.
"""

from __future__ import annotations

import argparse
import sys

from ldm.modules.embedding_formats import read_embeddings, write_embeddings
from ldm.modules.embedding_manager import token_function
from ldm.modules.embedding_merge import merge_embeddings, parse_rename
from ldm.scripts_common import USER_ERRORS, check_output_path, one_line_parser, report_error


def parse_args(argv=None):
    p = one_line_parser("merge_embeddings.py", argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--manager_ckpts", type=str, nargs="+", required=True, help="embedding files, in order")
    p.add_argument("--output_path", type=str, required=True, help="merged file (.pt or .safetensors)")
    p.add_argument("-sd", "--stable_diffusion", action="store_true", help="CLIP (SD) instead of BERT (LDM)")
    p.add_argument("--rename", action="append", default=[], metavar="N:OLD=NEW",
                   help="rename placeholder OLD of file N (from 1) to NEW; repeatable")
    p.add_argument("--tokenizer_path", type=str, default=None, help="local tokenizer folder (offline use)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opt = parse_args(argv)
    try:
        check_output_path(opt.output_path, opt.manager_ckpts, "--output_path")
        renames = dict(parse_rename(r) for r in opt.rename)
        sets = []
        for path in opt.manager_ckpts:  # every input is read (and checked) before the tokenizer loads
            print(f"Parsing {path}...")
            sets.append((path, read_embeddings(path)))
        token_of = token_function(opt.stable_diffusion, opt.tokenizer_path)
        merged, source = merge_embeddings(sets, renames, token_of)
        print("Saving combined manager...")
        write_embeddings(merged, opt.output_path)
    except USER_ERRORS as e:
        return report_error("merge_embeddings.py", e)
    print("Managers merged. Final list of placeholders: ")
    print(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
