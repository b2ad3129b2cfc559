"""The pseudo-word table of Textual Inversion: placeholder strings, their learned vectors, substitution.

Behaviour follows rinongal/textual_inversion@424192d `ldm/modules/embedding_manager.py`. The manager is
called by the text encoders right after the token-embedding lookup and before position embeddings are
added: `embedded = manager(token_ids, embedded)`.

Glossary: a *placeholder string* is what the user types (`*`); its *placeholder token id* is the id the
tokenizer gives it (it must be exactly one token); the *initializer word* seeds the vectors; each
placeholder owns `num_vectors_per_token` vectors of width `token_dim`.

Local changes (bugs of the official code; docs/DIFFERENCES.md#embedding-manager): the caller's token ids
and config lists are never mutated (#no-input-mutation); under a single-vector config the substitution mode
follows the parameter's row count, so a multi-vector file loads there (#mode-from-vector-count; a
multi-vector config caps the rows used at `num_vectors_per_token`, as the reference, #max-vectors-cap);
files are saved on the CPU and written atomically (#embeddings-saved-on-cpu); files are read without
unpickling code (#safe-loading); several-token and unknown placeholders raise a clear error
(#placeholder-errors). The progressive-words counter is saved in training checkpoints by the model
(#progressive-counter-resumed), not in embedding files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ldm.data.placeholder_tokens import per_img_token_list
from ldm.modules.embedding_formats import EmbeddingSet, read_embeddings, write_embeddings

logger = logging.getLogger(__name__)

DEFAULT_PLACEHOLDER_TOKEN = ["*"]
PROGRESSIVE_SCALE = 2000


class PlaceholderError(ValueError):
    """A placeholder or initializer string cannot be used as one pseudo-word."""


def _single_token_error(string: str) -> PlaceholderError:
    return PlaceholderError(f"String '{string}' maps to more than a single token. Please use another string")


def get_clip_token_for_string(tokenizer, string: str) -> torch.Tensor:
    """Id of `string` under a CLIP tokenizer, as a 0-d int64 tensor; it must be exactly one token."""
    with torch.device("cpu"):  # token ids are real even when the model is being built on "meta"
        ids = tokenizer(string, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    ids = ids["input_ids"]
    content = ids[0][(ids[0] != tokenizer.pad_token_id) & (ids[0] != tokenizer.bos_token_id)]
    if content.numel() != 1:
        raise _single_token_error(string)
    return content[0].clone()


def get_bert_token_for_string(tokenizer, string: str) -> torch.Tensor:
    """Id of `string` under the LDM BERT tokenizer module ([CLS] tok [SEP], pad 0); exactly one token."""
    with torch.device("cpu"):  # token ids are real even when the model is being built on "meta"
        ids = tokenizer(string).cpu()
    if int(torch.count_nonzero(ids)) != 3:
        raise _single_token_error(string)
    token = ids[0, 1].clone()
    unk = getattr(getattr(tokenizer, "tokenizer", None), "unk_token_id", None)
    if unk is not None and int(token) == unk:
        raise PlaceholderError(f"String '{string}' is not in the tokenizer's vocabulary (it maps to [UNK])")
    return token


def token_function(stable_diffusion: bool, tokenizer_path: str | None = None):
    """String -> single token id under SD's CLIP tokenizer or LDM's BERT tokenizer, without a model."""
    if stable_diffusion:
        from ldm.modules.encoders.pretrained import load_clip_tokenizer

        tokenizer = load_clip_tokenizer("openai/clip-vit-large-patch14", tokenizer_path)
        return lambda s: int(get_clip_token_for_string(tokenizer, s))
    from ldm.modules.encoders.modules import BERTTokenizer

    tokenizer = BERTTokenizer(vq_interface=False, tokenizer_path=tokenizer_path)
    return lambda s: int(get_bert_token_for_string(tokenizer, s))


def expand_placeholders(
    ids: torch.Tensor, embedded: torch.Tensor, token: torch.Tensor, vectors: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace every occurrence of `token` in each row by the k rows of `vectors`, keeping the length n.

    ids [B, n], embedded [B, n, d], vectors [k, d]. Occurrences are processed right to left so earlier
    columns stay valid; later tokens shift right by k-1 and the row is truncated to n (as the reference:
    trailing padding, and for long prompts real tokens, fall off the end). Returns new (ids, embedded).
    """
    n = ids.shape[1]
    k = vectors.shape[0]
    rows, cols = torch.where(ids == token)
    if rows.numel() == 0:
        return ids, embedded
    order = torch.argsort(cols, descending=True, stable=True)
    id_rows = list(ids.unbind(0))
    emb_rows = list(embedded.unbind(0))
    for r, c in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
        id_rows[r] = torch.cat([id_rows[r][:c], token.to(ids).repeat(k), id_rows[r][c + 1 :]])[:n]
        emb_rows[r] = torch.cat([emb_rows[r][:c], vectors.to(embedded.dtype), emb_rows[r][c + 1 :]])[:n]
    return torch.stack(id_rows), torch.stack(emb_rows)


class EmbeddingManager(nn.Module):
    """Owns the learned vectors of each placeholder and substitutes them into token embeddings.

    `embedder`: the text encoder. CLIP-style encoders expose `tokenizer` and
    `transformer.text_model.embeddings`; the LDM BERT encoder exposes `tknz_fn` and `transformer.token_emb`.
    `clip_init_with_position`: fidelity quirk of the reference (kept as default): for CLIP the initial
    vector is token_embedding[init] + position_embedding[0], although the vector is later inserted before
    positions are added. False gives the raw token embedding.
    `embedding_manager_ckpt`: accepted for config compatibility; the model loads it after construction.
    """

    def __init__(
        self,
        embedder: nn.Module,
        placeholder_strings: Sequence[str] | None = None,
        initializer_words: Sequence[str] | None = None,
        per_image_tokens: bool = False,
        num_vectors_per_token: int = 1,
        progressive_words: bool = False,
        embedding_manager_ckpt: str | None = None,
        clip_init_with_position: bool = True,
    ):
        super().__init__()
        if not placeholder_strings:
            raise PlaceholderError("EmbeddingManager needs at least one placeholder string (placeholder_strings)")
        if num_vectors_per_token < 1:
            raise ValueError(f"num_vectors_per_token must be >= 1, got {num_vectors_per_token}")
        placeholder_strings = list(placeholder_strings)
        if per_image_tokens:
            placeholder_strings.extend(per_img_token_list)
        initializer_words = list(initializer_words or [])

        self.is_clip = hasattr(embedder, "tokenizer")
        if self.is_clip:
            embeddings = embedder.transformer.text_model.embeddings
            token_table = embeddings.token_embedding
            position0 = embeddings.position_embedding.weight[0] if clip_init_with_position else None

            def token_of(s: str) -> torch.Tensor:
                return get_clip_token_for_string(embedder.tokenizer, s)

            def tokenize(s: str) -> torch.Tensor:
                return embedder.tokenizer(s, truncation=True, max_length=77, return_tensors="pt")["input_ids"][0]
        else:
            token_table = embedder.transformer.token_emb
            position0 = None

            def token_of(s: str) -> torch.Tensor:
                return get_bert_token_for_string(embedder.tknz_fn, s)

            def tokenize(s: str) -> torch.Tensor:
                return embedder.tknz_fn(s)[0].cpu()

        self._token_of = token_of
        self._tokenize = tokenize
        self._checked_texts: set[str] = set()
        self.token_dim = token_table.weight.shape[1]
        self.string_to_token_dict: dict[str, torch.Tensor] = {}
        self.string_to_param_dict = nn.ParameterDict()
        self.initial_embeddings = nn.ParameterDict()
        self.progressive_words = progressive_words
        self.progressive_counter = 0
        self.max_vectors_per_token = num_vectors_per_token

        for idx, placeholder in enumerate(placeholder_strings):
            token = token_of(placeholder)
            if idx < len(initializer_words):
                init_token = token_of(initializer_words[idx])
                with torch.no_grad():
                    init = token_table.weight[init_token].detach().float()  # float32 even over bf16 weights
                    if position0 is not None:
                        init = init + position0.detach().float()
                vectors = init.unsqueeze(0).repeat(num_vectors_per_token, 1)
                self.initial_embeddings[placeholder] = nn.Parameter(vectors.clone(), requires_grad=False)
            else:
                # Reference behaviour: uniform [0, 1) noise, not scaled to the embedding statistics.
                vectors = torch.rand((num_vectors_per_token, self.token_dim), device=token_table.weight.device)
            self.string_to_token_dict[placeholder] = token
            self.string_to_param_dict[placeholder] = nn.Parameter(vectors.to(torch.float32))

    def forward(self, tokenized_text: torch.Tensor, embedded_text: torch.Tensor) -> torch.Tensor:
        """Substitute the learned vectors; [B, n] ids and [B, n, d] embeddings -> [B, n, d]."""
        return self.substitute(tokenized_text, embedded_text)[1]

    def substitute(self, ids: torch.Tensor, embedded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `forward`, also returning the token ids after multi-vector expansion."""
        for placeholder, token in self.string_to_token_dict.items():
            param = self.string_to_param_dict[placeholder]
            token = token.to(ids.device)
            rows = param.shape[0]
            if self.max_vectors_per_token == 1:
                if rows == 1:
                    # Reference single-vector mode: the vector enters the graph even when no token matches,
                    # so an absent placeholder gets a zero gradient (not None) and AdamW still moves it
                    # (weight decay, momentum). docs/DIFFERENCES.md#absent-placeholder-update
                    embedded = torch.where((ids == token)[..., None], param[0].to(embedded.dtype), embedded)
                    continue
                k = rows  # a multi-vector file under a single-vector config (#mode-from-vector-count)
            elif self.progressive_words:
                # Counts forward calls (not optimizer steps), before the presence check, as the reference.
                self.progressive_counter += 1
                k = min(rows, 1 + self.progressive_counter // PROGRESSIVE_SCALE)
            else:
                k = min(rows, self.max_vectors_per_token)  # the reference's cap (#max-vectors-cap)
            # Multi-vector mode: an absent placeholder is skipped, so its gradient stays None (as the reference).
            ids, embedded = expand_placeholders(ids, embedded, token, param[:k])
        return ids, embedded

    def warn_unmatched(self, texts: Sequence[str]) -> None:
        """Warn (once per text) when a placeholder string appears in a text but not as its token, e.g.
        glued to punctuation: CLIP reads "*," as one token, so the learned vector would have no effect."""
        for text in texts:
            if not isinstance(text, str) or text in self._checked_texts:
                continue
            self._checked_texts.add(text)
            for placeholder, token in self.string_to_token_dict.items():
                if placeholder in text and int(token) not in self._tokenize(text).tolist():
                    logger.warning("placeholder '%s' in %r is not a separate token (glued to punctuation or "
                                   "another word?): its learned vector has no effect there", placeholder, text)

    def embedding_parameters(self) -> Iterable[nn.Parameter]:
        return self.string_to_param_dict.parameters()

    def embedding_to_coarse_loss(self) -> torch.Tensor | float:
        """Official regulariser: sum over initialised placeholders of (p - p0)(p - p0)^T / P, a [k, k] Gram
        matrix (the caller takes its mean; for k > 1 that only penalises the mean offset). 0. if P = 0."""
        loss: torch.Tensor | float = 0.0
        num = len(self.initial_embeddings)
        for key, init in self.initial_embeddings.items():
            diff = self.string_to_param_dict[key] - init.to(self.string_to_param_dict[key].device)
            loss = loss + (diff @ diff.T) / num
        return loss

    # ------------------------------------------------------------------------------------------------
    # Files (formats in ldm.modules.embedding_formats)
    # ------------------------------------------------------------------------------------------------

    def to_embedding_set(self, meta: dict | None = None) -> EmbeddingSet:
        vectors = {s: p.detach().cpu().float().clone() for s, p in self.string_to_param_dict.items()}
        tokens = {s: int(t) for s, t in self.string_to_token_dict.items()}
        return EmbeddingSet(vectors, tokens, {k: str(v) for k, v in (meta or {}).items()})

    def save(self, ckpt_path: str | os.PathLike, meta: dict | None = None) -> None:
        """Write the vectors atomically, on the CPU: the official `.pt` (`string_to_token`,
        `string_to_param`; it has no place for `meta`), or with a `.safetensors` suffix our safetensors
        layout, which stores `meta` (step, seed, base model, ...)."""
        write_embeddings(self.to_embedding_set(meta), ckpt_path)

    def load(self, ckpt_path: str | os.PathLike) -> None:
        """Replace both tables with a file's content (the reference's semantics), checking the width.

        Files without token ids (diffusers, A1111 safetensors) get them from this model's tokenizer.
        """
        self.set_embeddings(read_embeddings(ckpt_path), str(ckpt_path))

    def load_files(self, paths: Sequence[str | os.PathLike], renames: dict | None = None) -> dict[str, str]:
        """Load several files at once (merged, every collision an error unless renamed, see
        `ldm.modules.embedding_merge`); returns {placeholder: file}."""
        from ldm.modules.embedding_merge import merge_embeddings

        sets = [(str(p), read_embeddings(p)) for p in paths]
        merged, source = merge_embeddings(sets, renames, lambda s: int(self._token_of(s)))
        self.set_embeddings(merged, ", ".join(map(str, paths)))
        return source

    def set_embeddings(self, emb: EmbeddingSet, source: str = "embeddings") -> None:
        """Replace both tables with `emb` (vectors moved to this manager's device)."""
        device = next(iter(self.string_to_param_dict.values())).device if self.string_to_param_dict else None
        params = nn.ParameterDict()
        tokens = {}
        for placeholder, value in emb.vectors.items():
            if value.shape[-1] != self.token_dim:
                raise PlaceholderError(
                    f"{source}: embedding for '{placeholder}' has width {value.shape[-1]}, "
                    f"but this model's text encoder has token width {self.token_dim}"
                )
            if 1 < self.max_vectors_per_token < value.shape[0] and not self.progressive_words:
                logger.warning("%s: '%s' has %d vectors but num_vectors_per_token is %d: only the first %d are "
                               "used (as the reference)", source, placeholder, value.shape[0],
                               self.max_vectors_per_token, self.max_vectors_per_token)
            params[placeholder] = nn.Parameter(value.to(device) if device is not None else value)
            token = emb.tokens.get(placeholder)
            tokens[placeholder] = torch.tensor(token) if token is not None else self._token_of(placeholder)
        self.string_to_token_dict = tokens
        self.string_to_param_dict = params
