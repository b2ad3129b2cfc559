"""Where the text encoders get their tokenizers and CLIP text configs, with clear offline errors.

New file (no upstream counterpart). CompVis/latent-diffusion@5a6571e and rinongal/textual_inversion@424192d
call `from_pretrained` on a Hugging Face hub id inside the encoder constructors and let whatever error
transformers raises propagate. Here every lookup goes through one function per resource, in this order:

1. an explicit local directory (`tokenizer_path`, or `version` when it names an existing directory);
2. for the CLIP text config only: an explicit `text_config` (a dict or a JSON file), else a built-in table of
   known architectures, so the config of "openai/clip-vit-large-patch14" needs no download;
3. the hub id through `from_pretrained`, which works online or from the Hugging Face cache.

Only the tokenizer vocabularies and the text config are read this way; weights always come from the
LDM / SD checkpoint. When nothing works, `PretrainedResourceError` says which file or option to provide.

Fidelity note: transformers 5.x returns a tokenizer holding only its special tokens (every word -> [UNK])
when the vocabulary files are missing, instead of raising. `_check_vocabulary` turns that into an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTokenizer

CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt")
BERT_TOKENIZER_FILES = ("vocab.txt",)
DEFAULT_BERT_TOKENIZER = "bert-base-uncased"

# Text towers we can build without any download. Values are the `text_config` of the published
# config.json (pad/bos/eos ids 1/0/2 as published; they only matter for pooling, which SD v1 does not use).
KNOWN_CLIP_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    },
}

_CONFIG_HINT = "model.params.cond_stage_config.params"


class PretrainedResourceError(OSError):
    """A tokenizer or text config could not be found locally nor fetched from the Hugging Face hub."""


def _local_dir(path: str | os.PathLike | None) -> Path | None:
    return Path(path) if path is not None and Path(path).is_dir() else None


def _require_files(folder: Path, names: tuple[str, ...], what: str, option: str) -> None:
    """Raise unless `folder` has `tokenizer.json` or every file in `names`."""
    if (folder / "tokenizer.json").is_file() or all((folder / n).is_file() for n in names):
        return
    missing = [n for n in names if not (folder / n).is_file()]
    raise PretrainedResourceError(
        f"cannot load the {what} from '{folder}': missing {', '.join(missing)}. "
        f"Point {_CONFIG_HINT}.{option} at a folder with {' and '.join(names)}."
    )


def _check_vocabulary(tokenizer: Any, what: str, source: str) -> None:
    """Reject a tokenizer that holds nothing but its special tokens (see the module docstring)."""
    if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_tokens)):
        raise PretrainedResourceError(
            f"the {what} loaded from '{source}' has no vocabulary (only its special tokens); "
            "its vocabulary files were not found"
        )


def load_clip_tokenizer(version: str, tokenizer_path: str | os.PathLike | None = None) -> CLIPTokenizer:
    """CLIP BPE tokenizer from `tokenizer_path`, a local `version` folder, or the hub id `version`."""
    folder = _local_dir(tokenizer_path) or _local_dir(version)
    if tokenizer_path is not None and folder is None:
        raise PretrainedResourceError(f"tokenizer_path '{tokenizer_path}' is not a directory")
    if folder is not None:
        _require_files(folder, CLIP_TOKENIZER_FILES, "CLIP tokenizer", "tokenizer_path")
        source = str(folder)
    else:
        source = version
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source)
        _check_vocabulary(tokenizer, "CLIP tokenizer", source)
    except (OSError, ValueError) as e:
        raise PretrainedResourceError(
            f"cannot load the CLIP tokenizer '{source}' (offline and not in the Hugging Face cache, or not "
            f"a tokenizer). Provide a local folder with {' and '.join(CLIP_TOKENIZER_FILES)} via "
            f"{_CONFIG_HINT}.tokenizer_path=<dir> (FrozenCLIPEmbedder(tokenizer_path=...)), "
            f"or run once online so that '{version}' is cached. Cause: {e}"
        ) from e
    return tokenizer


def load_bert_tokenizer(tokenizer_path: str | os.PathLike | None = None) -> BertTokenizerFast:
    """WordPiece tokenizer of the LDM text encoder from `tokenizer_path` or the hub id bert-base-uncased.

    Always through `from_pretrained`: with transformers 5.x, constructing the class from a vocab file
    directly maps every word to [UNK].
    """
    folder = _local_dir(tokenizer_path)
    if tokenizer_path is not None and folder is None:
        raise PretrainedResourceError(f"tokenizer_path '{tokenizer_path}' is not a directory")
    if folder is not None:
        _require_files(folder, BERT_TOKENIZER_FILES, "BERT tokenizer", "tokenizer_path")
    source = str(folder) if folder is not None else DEFAULT_BERT_TOKENIZER
    try:
        tokenizer = BertTokenizerFast.from_pretrained(source)
        _check_vocabulary(tokenizer, "BERT tokenizer", source)
    except (OSError, ValueError) as e:
        raise PretrainedResourceError(
            f"cannot load the BERT tokenizer '{source}' (offline and not in the Hugging Face cache, or not "
            f"a tokenizer). Provide a local folder with vocab.txt (the bert-base-uncased WordPiece "
            f"vocabulary) via {_CONFIG_HINT}.tokenizer_path=<dir> (BERTEmbedder(tokenizer_path=...)), "
            f"or run once online so that '{DEFAULT_BERT_TOKENIZER}' is cached. Cause: {e}"
        ) from e
    return tokenizer


def _config_from_mapping(values: Mapping[str, Any]) -> CLIPTextConfig:
    """CLIPTextConfig from plain fields; a full CLIPConfig dict contributes its `text_config`."""
    values = dict(values.get("text_config", values))
    # Private or bookkeeping fields (e.g. `_attn_implementation`) are not constructor arguments.
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    values.pop("transformers_version", None)
    values.pop("model_type", None)
    return CLIPTextConfig(**values)


def load_clip_text_config(
    version: str, text_config: Mapping[str, Any] | str | os.PathLike | None = None
) -> CLIPTextConfig:
    """Architecture of the CLIP text tower (no weights).

    `text_config` (a dict or a JSON file) wins; then the built-in table; then `version` as a local folder
    holding config.json; then `CLIPTextConfig.from_pretrained(version)`.
    """
    if isinstance(text_config, Mapping):
        return _config_from_mapping(text_config)
    if text_config is not None:
        path = Path(text_config)
        if not path.is_file():
            raise PretrainedResourceError(f"text_config '{text_config}' is neither a dict nor a JSON file")
        with path.open() as f:
            return _config_from_mapping(json.load(f))
    if version in KNOWN_CLIP_TEXT_CONFIGS:
        return CLIPTextConfig(**KNOWN_CLIP_TEXT_CONFIGS[version])
    try:
        return CLIPTextConfig.from_pretrained(version)
    except (OSError, ValueError) as e:
        raise PretrainedResourceError(
            f"cannot load the CLIP text config for '{version}': it is not built in "
            f"({', '.join(KNOWN_CLIP_TEXT_CONFIGS)}), not a local folder with config.json, and it could not "
            f"be fetched (offline and not in the Hugging Face cache?). Provide the CLIPTextConfig fields via "
            f"{_CONFIG_HINT}.text_config=<dict or path to a JSON file>. Cause: {e}"
        ) from e
