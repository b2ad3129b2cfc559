"""Conditioning encoders: the LDM 1.4B BERT-style text encoder and the SD v1 CLIP text encoder.

Ported from CompVis/latent-diffusion@5a6571e (`ldm/modules/encoders/modules.py`) with the Textual Inversion
changes of rinongal/textual_inversion@424192d (the `embedding_manager` argument of the text encoders).
Config targets and state-dict keys are unchanged: `cond_stage_model.transformer.*` for `BERTEmbedder`
(see `ldm/modules/x_transformer.py`) and `cond_stage_model.transformer.text_model.*` for
`FrozenCLIPEmbedder`, including the int64 buffer `...text_model.embeddings.position_ids` of SD v1 checkpoints.

Textual Inversion hook: both text encoders take `embedding_manager`, a callable
`(ids [b, n] int64, token_embeddings [b, n, d]) -> token_embeddings` applied right after the token-embedding
lookup and before position embeddings are added.

Local changes:
- `FrozenCLIPEmbedder` does not monkey-patch transformers (the TI fork rebinds four `forward` methods and
  copies two private helpers of transformers 4.18). It runs a stock `transformers.CLIPTextModel` and, for one
  encode only, registers a forward hook on `text_model.embeddings.token_embedding` that passes the token
  embeddings through the embedding manager. Under transformers 5, `CLIPTextModel` has no `.text_model`, so
  `self.transformer` is a small container whose `text_model` is the `CLIPTextModel`; this keeps the keys.
  `position_ids` is re-registered as a persistent buffer so SD v1 checkpoints load with `strict=True`.
- The CLIP weights are never downloaded: the model is built from a config (built-in for
  "openai/clip-vit-large-patch14") and filled from the LDM / SD checkpoint. Tokenizers and configs come from
  local folders or the Hugging Face hub/cache, with clear errors (`ldm/modules/encoders/pretrained.py`);
  new arguments `tokenizer_path`, `text_config`, `attn_implementation` (default "eager", the reference math).
- Devices come from the parameters; `device` arguments are accepted for config compatibility only (the
  originals defaulted to a CUDA device). Tokenizer output is built on the CPU, so it also works under
  `with torch.device("meta")`.
- Dropped (unused by Textual Inversion, and they made `clip` and `kornia` hard dependencies):
  `SpatialRescaler`, `FrozenCLIPTextEmbedder`, `FrozenClipImageEmbedder`, and the private helpers
  `_expand_mask` / `_build_causal_attention_mask`. Also dropped (unused, named by no config here):
  `ClassEmbedder`, `TransformerEmbedder` and `FrozenCLIPEmbedder.freeze` (the model freezes its encoders
  with `ldm.models.diffusion.textual_inversion.freeze`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextModel

from ldm.modules.encoders.pretrained import load_bert_tokenizer, load_clip_text_config, load_clip_tokenizer
from ldm.modules.x_transformer import Encoder, TransformerWrapper

EmbeddingManagerFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Text = str | Sequence[str]


def _tokenize(tokenizer: Any, text: Text, max_length: int) -> torch.Tensor:
    """Ids [b, max_length] int64 on the CPU (truncate, pad to `max_length`); no attention mask is used."""
    batch = tokenizer(
        text, truncation=True, max_length=max_length, padding="max_length", return_attention_mask=False
    )
    ids = batch["input_ids"]
    if isinstance(text, str):
        ids = [ids]
    return torch.tensor(ids, dtype=torch.long, device="cpu")


class AbstractEncoder(nn.Module):
    """Base class of the conditioning encoders; subclasses implement `encode`."""

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class BERTTokenizer(AbstractEncoder):
    """bert-base-uncased WordPiece tokenizer as a module: text -> ids [b, max_length] ([CLS] .. [SEP], pad 0).

    `device`: where `forward` puts the ids (default: CPU). The HF tokenizer is the attribute `tokenizer`.
    """

    def __init__(
        self,
        device: Any = None,
        vq_interface: bool = True,
        max_length: int = 77,
        tokenizer_path: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.tokenizer = load_bert_tokenizer(tokenizer_path)
        self.device = device
        self.vq_interface = vq_interface
        self.max_length = max_length

    def forward(self, text: Text) -> torch.Tensor:
        ids = _tokenize(self.tokenizer, text, self.max_length)
        return ids if self.device is None else ids.to(self.device)

    @torch.no_grad()
    def encode(self, text: Text) -> Any:
        """The ids, or `(None, None, [None, None, ids])` with `vq_interface` (the VQ model's return shape)."""
        tokens = self(text)
        if not self.vq_interface:
            return tokens
        return None, None, [None, None, tokens]

    def decode(self, text: Any) -> Any:
        return text


class BERTEmbedder(AbstractEncoder):
    """LDM 1.4B text encoder: BERT tokenizer + x-transformer, text -> [b, max_seq_len, n_embed].

    Public attributes used by the embedding manager: `tknz_fn` (the `BERTTokenizer`; `tknz_fn(s)` -> ids
    [1, 77]) and `transformer.token_emb` (the token-embedding table). `device` is accepted for config
    compatibility; ids are moved to the device of the parameters. `attention` is the self-attention kernel
    ("math", the official one, or "sdpa": the same maths fused).
    """

    def __init__(
        self,
        n_embed: int,
        n_layer: int,
        vocab_size: int = 30522,
        max_seq_len: int = 77,
        device: Any = None,
        use_tokenizer: bool = True,
        embedding_dropout: float = 0.0,
        tokenizer_path: str | os.PathLike | None = None,
        attention: str = "math",
    ):
        super().__init__()
        self.use_tokenizer = use_tokenizer
        if use_tokenizer:
            self.tknz_fn = BERTTokenizer(
                vq_interface=False, max_length=max_seq_len, tokenizer_path=tokenizer_path
            )
        self.transformer = TransformerWrapper(
            num_tokens=vocab_size,
            max_seq_len=max_seq_len,
            attn_layers=Encoder(dim=n_embed, depth=n_layer, attention=attention),
            emb_dropout=embedding_dropout,
        )

    def forward(
        self, text: Text | torch.Tensor, embedding_manager: EmbeddingManagerFn | None = None
    ) -> torch.Tensor:
        """`text`: strings (or ids [b, n] when `use_tokenizer` is False) -> hidden states [b, n, n_embed]."""
        tokens = self.tknz_fn(text) if self.use_tokenizer else text
        tokens = tokens.to(self.transformer.token_emb.weight.device)
        return self.transformer(tokens, return_embeddings=True, embedding_manager=embedding_manager)

    def encode(
        self, text: Text | torch.Tensor, embedding_manager: EmbeddingManagerFn | None = None
    ) -> torch.Tensor:
        return self(text, embedding_manager=embedding_manager)


class CLIPTextTower(nn.Module):
    """Holds a `transformers.CLIPTextModel` as `text_model`, so keys read `transformer.text_model.<...>`."""

    def __init__(self, text_model: CLIPTextModel):
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids [b, n] -> last hidden state after the final LayerNorm, [b, n, width] (causal, no pad mask)."""
        return self.text_model(input_ids=input_ids).last_hidden_state


class FrozenCLIPEmbedder(AbstractEncoder):
    """SD v1 text encoder: CLIP BPE tokenizer + CLIP text transformer, text -> [b, 77, width].

    Public attributes used by the embedding manager: `tokenizer` (HF `CLIPTokenizer`) and
    `transformer.text_model.embeddings` (`token_embedding`, `position_embedding`, `position_ids`).
    The weights are not loaded here; they come from the LDM / SD checkpoint.

    version: hub id or local folder. tokenizer_path: local folder with vocab.json and merges.txt.
    text_config: CLIPTextConfig fields (dict or JSON file), needed for versions that are not built in.
    """

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: Any = None,
        max_length: int = 77,
        tokenizer_path: str | os.PathLike | None = None,
        text_config: Mapping[str, Any] | str | os.PathLike | None = None,
        attn_implementation: str = "eager",
    ):
        super().__init__()
        self.tokenizer = load_clip_tokenizer(version, tokenizer_path)
        config = load_clip_text_config(version, text_config)
        if max_length > config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the text model's {config.max_position_embeddings} positions"
            )
        config._attn_implementation = attn_implementation
        text_model = CLIPTextModel(config)
        # Persistent again (as in transformers < 4.31), so `...embeddings.position_ids` is a checkpoint key.
        embeddings = text_model.embeddings
        positions = torch.arange(config.max_position_embeddings, device=embeddings.position_ids.device)
        embeddings.register_buffer("position_ids", positions[None, :], persistent=True)
        self.transformer = CLIPTextTower(text_model)
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return self.transformer.text_model.embeddings.token_embedding.weight.device

    def tokenize(self, text: Text) -> torch.Tensor:
        """Ids [b, max_length] int64 on the parameters' device (BOS 49406 ... EOS 49407, pad 49407)."""
        return _tokenize(self.tokenizer, text, self.max_length).to(self.device)

    @contextmanager
    def _token_embedding_hook(self, embedding_manager: EmbeddingManagerFn | None) -> Iterator[None]:
        """While active, token-embedding outputs pass through `embedding_manager(ids, embeddings)`."""
        if embedding_manager is None:
            yield
            return

        def substitute(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor):
            return embedding_manager(args[0], output)

        handle = self.transformer.text_model.embeddings.token_embedding.register_forward_hook(substitute)
        try:
            yield
        finally:
            handle.remove()

    def forward(self, text: Text, embedding_manager: EmbeddingManagerFn | None = None) -> torch.Tensor:
        """Strings -> last hidden state [b, max_length, width] (after the final LayerNorm, all positions)."""
        ids = self.tokenize(text)
        with self._token_embedding_hook(embedding_manager):
            return self.transformer(ids)

    def encode(self, text: Text, embedding_manager: EmbeddingManagerFn | None = None) -> torch.Tensor:
        return self(text, embedding_manager=embedding_manager)
