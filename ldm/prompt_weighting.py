"""Prompt weighting in the AUTOMATIC1111 syntax, applied to the text encoder's output.

Syntax (`parse_weights`): `(text:1.2)` multiplies the weight of `text` by 1.2, `(text)` by 1.1, `[text]` by
1/1.1; nesting multiplies (`((a))` is 1.21); `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters.
A closing bracket without its opening one is literal text; a group still open at the end of the prompt
applies to the rest of the prompt (as A1111). The brackets are removed: the text encoder reads the
remaining characters exactly as written (`a photo of (*:1.5)` is encoded as `a photo of *`).

Positions (`weighted_conditioning`): the prompt without brackets is tokenized as the encoder does (padding
and truncation included; the tokenizer's character offsets say which characters each token comes from).
A token takes the weight of its first character; the start/end and padding tokens keep weight 1. A
multi-vector learned word is expanded by the embedding manager into k positions (later tokens move right
and the row is cut at the encoder's length); every one of its k positions takes its weight. The encoder
output [b, n, d] is multiplied at each position by that position's weight; positions of weight 1 are left
untouched (bitwise). The option `restore_mean` then rescales each prompt's whole conditioning so its mean is
that of the unweighted one (A1111's renormalisation; off by default).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

ROUND, SQUARE = 1.1, 1 / 1.1

_TOKENS = re.compile(r"""
    \\[()\[\]\\]                                   # an escaped bracket or backslash
  | :\s*(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)  # an explicit weight closing a round group
  | [()\[\]]                                        # a bracket
  | [^\\()\[\]:]+ | [\\:]                           # plain text (a lone backslash or colon is text)
""", re.VERBOSE)


def parse_weights(text: str) -> list[tuple[str, float]]:
    """`text` -> [(text, weight), ...]: consecutive pieces of equal weight merged, empty pieces dropped."""
    pieces: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in _TOKENS.finditer(text):
        tok, weight = m.group(0), m.group("weight")
        if len(tok) == 2 and tok[0] == "\\":
            pieces.append([tok[1], 1.0])
        elif tok == "(":
            open_round.append(len(pieces))
        elif tok == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            multiply(open_round.pop(), float(weight))
        elif tok == ")" and open_round:
            multiply(open_round.pop(), ROUND)
        elif tok == "]" and open_square:
            multiply(open_square.pop(), SQUARE)
        else:
            pieces.append([tok, 1.0])
    for start in open_round:
        multiply(start, ROUND)
    for start in open_square:
        multiply(start, SQUARE)
    merged: list[tuple[str, float]] = []
    for piece, w in pieces:
        if not piece:
            continue
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + piece, w)
        else:
            merged.append((piece, w))
    return merged


def plain_text(pieces: Sequence[tuple[str, float]]) -> str:
    """The text the encoder reads: the pieces joined, brackets and weights gone."""
    return "".join(p for p, _ in pieces)


def is_weighted(pieces: Sequence[tuple[str, float]]) -> bool:
    return any(w != 1.0 for _, w in pieces)


def _char_weights(pieces: Sequence[tuple[str, float]]) -> list[float]:
    return [w for p, w in pieces for _ in p]


def _tokenizer_of(encoder):
    """(HF tokenizer, max length, ids function) of a BERT (LDM) or CLIP (SD) text encoder."""
    if hasattr(encoder, "tokenizer") and hasattr(encoder, "tokenize"):  # FrozenCLIPEmbedder
        return encoder.tokenizer, encoder.max_length, lambda texts: encoder.tokenize(texts).cpu()
    tknz = getattr(encoder, "tknz_fn", None)
    if tknz is not None and hasattr(tknz, "tokenizer"):  # BERTEmbedder
        return tknz.tokenizer, tknz.max_length, lambda texts: tknz(texts).cpu()
    raise ValueError(f"prompt weighting needs a BERT (LDM) or CLIP (SD) text encoder, not "
                     f"{type(encoder).__name__}; leave out the brackets or use --no_prompt_weighting")


def token_weights(encoder, prompts: Sequence[Sequence[tuple[str, float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [b, n] int64, weights [b, n] float64) of parsed prompts at the tokenizer's positions, before
    any multi-vector expansion."""
    tokenizer, max_length, encoder_ids = _tokenizer_of(encoder)
    texts = [plain_text(p) for p in prompts]
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length",
                    return_attention_mask=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    if not torch.equal(ids, encoder_ids(texts)):
        raise RuntimeError("prompt weighting: the tokenizer's ids differ from the text encoder's")
    weights = torch.ones(ids.shape, dtype=torch.float64)
    for row, (pieces, offsets) in enumerate(zip(prompts, enc["offset_mapping"], strict=True)):
        chars = _char_weights(pieces)
        for col, (start, end) in enumerate(offsets):
            if end > start:
                weights[row, col] = chars[start]
    return ids, weights


def _expand_row(ids: torch.Tensor, weights: torch.Tensor, token: int, k: int):
    n = ids.shape[0]
    for c in sorted(torch.nonzero(ids == token).flatten().tolist(), reverse=True):
        ids = torch.cat([ids[:c], ids.new_full((k,), token), ids[c + 1:]])[:n]
        weights = torch.cat([weights[:c], weights[c].repeat(k), weights[c + 1:]])[:n]
    return ids, weights


def expand_like_manager(manager, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights) after the embedding manager's multi-vector expansion: each occurrence of a placeholder
    with k vectors becomes k positions of its weight, right to left, each row cut to its length (the rule of
    `EmbeddingManager.substitute`, including its vector-count choice)."""
    from ldm.modules.embedding_manager import PROGRESSIVE_SCALE

    if manager is None:
        return ids, weights
    counter = manager.progressive_counter
    for placeholder, token in manager.string_to_token_dict.items():
        rows = manager.string_to_param_dict[placeholder].shape[0]
        if manager.max_vectors_per_token == 1:
            if rows == 1:
                continue  # in-place substitution: positions unchanged
            k = rows
        elif manager.progressive_words:
            counter += 1
            k = min(rows, 1 + counter // PROGRESSIVE_SCALE)
        else:
            k = min(rows, manager.max_vectors_per_token)
        out = [_expand_row(i, w, int(token), k) for i, w in zip(ids, weights, strict=True)]
        ids, weights = torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
    return ids, weights


def _check_expansion(manager, ids: torch.Tensor, expanded: torch.Tensor) -> None:
    """Compare with the manager's own expanded ids (not for progressive words: that call counts)."""
    if manager is None or manager.progressive_words:
        return
    with torch.no_grad():
        device = next(iter(manager.string_to_param_dict.values())).device
        probe = torch.zeros((*ids.shape, manager.token_dim), device=device)
        theirs, _ = manager.substitute(ids.to(device), probe)
    if not torch.equal(theirs.cpu(), expanded):
        raise RuntimeError("prompt weighting: the placeholder expansion differs from the embedding manager's")


def position_weights(model, prompts: Sequence[Sequence[tuple[str, float]]]) -> torch.Tensor:
    """Weights [b, n] (float64) at the positions of the encoder's output for parsed prompts."""
    ids, weights = token_weights(model.cond_stage_model, prompts)
    manager = getattr(model, "embedding_manager", None)
    expanded, weights = expand_like_manager(manager, ids, weights)
    _check_expansion(manager, ids, expanded)
    return weights


def weighted_conditioning(model, prompts: Sequence[str], restore_mean: bool = False) -> torch.Tensor:
    """`model.get_learned_conditioning` of the prompts without brackets, scaled per position by the parsed
    weights. Without any weight other than 1 this is exactly `get_learned_conditioning(prompts)` of the
    bracket-free prompts (a prompt without brackets is passed on as it is)."""
    parsed = [parse_weights(p) for p in prompts]
    texts = [plain_text(p) for p in parsed]
    if not any(is_weighted(p) for p in parsed):
        return model.get_learned_conditioning(texts)
    weights = position_weights(model, parsed)
    c = model.get_learned_conditioning(texts)
    if not isinstance(c, torch.Tensor) or c.dim() != 3 or c.shape[:2] != weights.shape:
        raise ValueError(f"prompt weighting needs conditioning [b, {weights.shape[1]}, d] from the text "
                         f"encoder, got {getattr(c, 'shape', type(c).__name__)}")
    w = weights.to(c.device)[..., None]
    scaled = torch.where(w != 1.0, (c.double() * w).to(c.dtype), c)
    if restore_mean:
        before = c.double().mean(dim=(1, 2), keepdim=True)
        after = scaled.double().mean(dim=(1, 2), keepdim=True)
        scaled = (scaled.double() * (before / after)).to(c.dtype)
    return scaled
