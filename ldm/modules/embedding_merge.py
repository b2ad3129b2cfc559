"""Combine embeddings learned in separate runs into one file ("a photo of * in the style of @").

The reference's `merge_embeddings.py` asked on stdin for a new string when a placeholder repeated, and
missed most collisions (docs/DIFFERENCES.md#merge-non-interactive). Here every collision is detected and
must be resolved up front:
- the same placeholder string in two files;
- two strings with the same token id (e.g. "A" and "a" under the lower-casing BERT tokenizer);
- a rename that is not one token, or that collides with another placeholder;
- vectors of different widths (embeddings of different base models).
Renames are given as {(file_number, old): new}, file numbers counted from 1 in the given order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ldm.modules.embedding_formats import EmbeddingFormatError, EmbeddingSet


class MergeError(EmbeddingFormatError):
    """Embeddings that cannot be merged as asked."""


def parse_rename(text: str) -> tuple[tuple[int, str], str]:
    """'N:OLD=NEW' -> ((N, OLD), NEW)."""
    head, sep, new = text.partition("=")
    number, colon, old = head.partition(":")
    if not (sep and colon and number.isdigit() and old and new):
        raise MergeError(f"--rename '{text}': expected N:OLD=NEW, e.g. 2:*=@ (file 2's '*' becomes '@')")
    return (int(number), old), new


def merge_embeddings(
    sets: Sequence[tuple[str, EmbeddingSet]],
    renames: dict[tuple[int, str], str] | None = None,
    token_of: Callable[[str], int] | None = None,
) -> tuple[EmbeddingSet, dict[str, str]]:
    """Merge (name, set) pairs in order; returns the merged set and {placeholder: source name}.

    `token_of` maps a string to its single token id under the target model's tokenizer (raising if it is
    not one token). Without it the files' own token ids are used, and renames are impossible.
    """
    renames = dict(renames or {})
    vectors: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    source: dict[str, str] = {}
    width = None
    for number, (name, emb) in enumerate(sets, start=1):
        for placeholder, value in emb.vectors.items():
            new = renames.pop((number, placeholder), placeholder)
            if width is not None and value.shape[-1] != width:
                raise MergeError(f"{name}: '{placeholder}' has width {value.shape[-1]}, the files before have "
                                 f"{width}: embeddings of different base models cannot be merged")
            width = value.shape[-1]
            token = _token(new, placeholder, emb, name, token_of)
            if new in vectors:
                raise MergeError(f"placeholder '{new}' of {name} (file {number}) is already used by {source[new]}; "
                                 f"rename it, e.g. --rename {number}:{placeholder}=<new string>")
            clash = next((p for p, t in tokens.items() if t == token), None)
            if clash is not None:
                raise MergeError(f"placeholder '{new}' of {name} has token id {token}, the same as '{clash}' of "
                                 f"{source[clash]}; rename it with --rename {number}:{placeholder}=<new string>")
            vectors[new], tokens[new], source[new] = value.clone(), token, name
    if renames:
        unused = ", ".join(f"{n}:{old}" for n, old in renames)
        raise MergeError(f"--rename names placeholders that do not exist: {unused}")
    return EmbeddingSet(vectors, tokens), source


def _token(new: str, old: str, emb: EmbeddingSet, name: str, token_of) -> int:
    if token_of is not None:
        token = int(token_of(new))
        if new == old and old in emb.tokens and emb.tokens[old] != token:
            raise MergeError(f"{name}: '{old}' has token id {emb.tokens[old]} in the file but {token} under this "
                             "tokenizer: the file was made for another text encoder (use -sd for Stable Diffusion)")
        return token
    if new != old:
        raise MergeError("renaming needs the tokenizer (give --tokenizer_path, or run online)")
    if old not in emb.tokens:
        raise MergeError(f"{name}: no token id for '{old}' in the file; give the tokenizer (--tokenizer_path)")
    return emb.tokens[old]
