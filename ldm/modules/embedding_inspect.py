"""A look inside learned embeddings: vector norms, nearest vocabulary tokens, norms against the vocabulary.

    vocab = vocabulary_of(load_model("configs/toy/invert.yaml", "models/toy/toy_ldm.safetensors"))
    report = describe(read_embeddings("embeddings.safetensors"), vocab, top_k=5)

The vocabulary is the text encoder's token-embedding table (CLIP's `token_embedding`, LDM BERT's
`token_emb`), restricted to the ids the tokenizer can produce, compared with the raw vectors (CLIP's
position embedding, which the reference adds to the initial vector, is not added). `describe` returns
plain Python values, ready for JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ldm.modules.embedding_formats import EmbeddingSet


@dataclass
class Vocabulary:
    """Token-embedding rows [V, d] (float32, CPU) and their token strings."""

    weight: torch.Tensor
    tokens: list[str]

    @property
    def norms(self) -> torch.Tensor:
        return self.weight.norm(dim=-1)


def vocabulary_of(model: nn.Module) -> Vocabulary:
    """The token-embedding table of `model.cond_stage_model` (CLIP or LDM BERT) and its token strings."""
    encoder = getattr(model, "cond_stage_model", None)
    transformer = getattr(encoder, "transformer", None)
    if hasattr(encoder, "tokenizer") and hasattr(transformer, "text_model"):  # CLIP (SD)
        table = transformer.text_model.embeddings.token_embedding.weight
        tokenizer = encoder.tokenizer
    elif hasattr(getattr(encoder, "tknz_fn", None), "tokenizer") and hasattr(transformer, "token_emb"):  # LDM
        table = transformer.token_emb.weight
        tokenizer = encoder.tknz_fn.tokenizer
    else:
        raise ValueError(f"the model's text encoder ({type(encoder).__name__}) has no token-embedding table "
                         "and tokenizer of a known kind (CLIP's FrozenCLIPEmbedder or LDM's BERTEmbedder)")
    rows = min(table.shape[0], len(tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(list(range(rows)))
    return Vocabulary(table[:rows].detach().to("cpu", torch.float32).clone(), [str(t) for t in tokens])


def nearest_tokens(vectors: torch.Tensor, vocab: Vocabulary, top_k: int) -> list[list[dict]]:
    """For each row of `vectors` [k, d], the `top_k` vocabulary tokens by cosine similarity, best first."""
    cosine = F.normalize(vectors.float(), dim=-1) @ F.normalize(vocab.weight, dim=-1).T
    values, ids = cosine.topk(min(top_k, cosine.shape[-1]), dim=-1)
    return [[{"token": vocab.tokens[i], "id": i, "cosine": c} for i, c in zip(row_ids, row_cos, strict=True)]
            for row_ids, row_cos in zip(ids.tolist(), values.tolist(), strict=True)]


def norm_statistics(vocab: Vocabulary) -> dict:
    norms = vocab.norms.double()
    return {"tokens": len(vocab.tokens), "norm_mean": norms.mean().item(), "norm_std": norms.std().item(),
            "norm_min": norms.min().item(), "norm_max": norms.max().item()}


def norm_percentile(norm: float, vocab: Vocabulary) -> float:
    """Share (in %) of the vocabulary's token norms below `norm`."""
    return 100.0 * (vocab.norms < norm).double().mean().item()


def describe(emb: EmbeddingSet, vocab: Vocabulary | None = None, top_k: int = 5) -> dict:
    """Placeholders, token ids, each vector's L2 norm, the metadata, and with `vocab` the nearest tokens and
    each norm's percentile among the vocabulary's. A width different from the vocabulary's is a ValueError."""
    if top_k < 1:
        raise ValueError(f"--top_k {top_k}: give at least 1")
    if vocab is not None and emb.token_dim != vocab.weight.shape[1]:
        raise ValueError(f"the embeddings have width {emb.token_dim}, the model's token embeddings width "
                         f"{vocab.weight.shape[1]}")
    report = {"format": emb.source or None, "token_dim": emb.token_dim, "metadata": dict(emb.meta),
              "vocabulary": norm_statistics(vocab) if vocab is not None else None, "placeholders": []}
    for placeholder, vectors in emb.vectors.items():
        nearest = nearest_tokens(vectors, vocab, top_k) if vocab is not None else [None] * vectors.shape[0]
        rows = []
        for index, (vector, near) in enumerate(zip(vectors, nearest, strict=True)):
            norm = vector.double().norm().item()
            row = {"index": index, "norm": norm}
            if vocab is not None:
                row.update(norm_percentile=norm_percentile(norm, vocab), nearest=near)
            rows.append(row)
        report["placeholders"].append({"placeholder": placeholder, "token_id": emb.tokens.get(placeholder),
                                       "num_vectors": int(vectors.shape[0]), "vectors": rows})
    return report
