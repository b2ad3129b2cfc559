"""Text encoders: tokenizer ids, parity with the reference fixtures, the TI hook point, key layout, errors.

Fixtures: tests/fixtures/parity/{ldm_tiny,sd_tiny} (golden outputs of the official code),
tests/fixtures/tokenizers (offline vocabularies) and tests/fixtures/manifests (full-size key lists).
"""

from __future__ import annotations

import json
from functools import cache

import huggingface_hub.constants
import pytest
import torch
from conftest import fixture_path, parity_weights
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import CLIPTextModel

from ldm.modules.encoders.modules import BERTEmbedder, FrozenCLIPEmbedder
from ldm.modules.encoders.pretrained import PretrainedResourceError
from ldm.modules.x_transformer import AttentionLayers, Encoder, TransformerWrapper
from ldm.util import instantiate_from_config

# name -> (placeholder '*' id, 'sculpture' id)
TOKEN_IDS = {"ldm_tiny": (1008, 6743), "sd_tiny": (265, 8757)}


def _tokenizer_dir(name: str) -> str:
    return str(fixture_path("tokenizers", "bert-base-uncased" if name == "ldm_tiny" else "clip"))


def _extra_params(name: str) -> dict:
    params = {"tokenizer_path": _tokenizer_dir(name)}
    if name == "sd_tiny":
        params["text_config"] = str(fixture_path("parity", "sd_tiny", "clip_text_config.json"))
    return params


@cache
def _reference(name: str) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    folder = fixture_path("parity", name)
    prompts = json.loads((folder / "meta.json").read_text())["prompts"]
    cond = load_file(folder / "conditioning.safetensors")
    return prompts, cond, load_file(folder / "embeddings.safetensors")


@cache
def _cond_stage(name: str) -> torch.nn.Module:
    """The fixture's cond stage, built from its config.yaml, with the fixture's weights (strict)."""
    folder = fixture_path("parity", name)
    config = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml").model.params.cond_stage_config)
    config["params"] = {**(config.get("params") or {}), **_extra_params(name)}
    model = instantiate_from_config(config).eval()
    prefix = "cond_stage_model."
    weights = load_file(parity_weights(name))
    state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model.requires_grad_(False)  # frozen, as in Textual Inversion; shared between tests


def _tokenize(model: torch.nn.Module, text):
    return model.tknz_fn(text) if isinstance(model, BERTEmbedder) else model.tokenize(text)


def _token_table(model: torch.nn.Module) -> torch.nn.Embedding:
    if isinstance(model, BERTEmbedder):
        return model.transformer.token_emb
    return model.transformer.text_model.embeddings.token_embedding


def _assert_close_to_ref(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a-b| <= 1e-4 * max|ref| + 1e-5 (fixtures README); returns the max abs difference."""
    diff = (actual - ref).abs().max().item()
    bound = 1e-4 * ref.abs().max().item() + 1e-5
    assert diff <= bound, f"max|a-b| = {diff:.3g} > {bound:.3g}"
    return diff


class FakeManager:
    """Minimal single-vector embedding manager: rows whose id is `token` become `vector` (in place)."""

    def __init__(self, token: int, vector: torch.Tensor):
        self.token, self.vector, self.calls = token, vector, 0

    def __call__(self, ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        embedded[ids == self.token] = self.vector.to(embedded)
        return embedded


# (a) token ids ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ldm_tiny", "sd_tiny"])
def test_token_ids_match_fixture(name):
    prompts, cond, _ = _reference(name)
    assert torch.equal(_tokenize(_cond_stage(name), prompts), cond["tokens"])


def test_known_token_ids():
    bert = _cond_stage("ldm_tiny").tknz_fn
    ids = bert("a photo of *")
    assert ids.shape == (1, 77) and ids.dtype == torch.int64
    assert ids[0, :7].tolist() == [101, 1037, 6302, 1997, 1008, 102, 0]
    assert [bert(s)[0, 1].item() for s in ("*", "@", "sculpture")] == [1008, 1030, 6743]
    clip = _cond_stage("sd_tiny")
    ids = clip.tokenize(["*", "@", "sculpture"])
    assert ids[:, :3].tolist() == [[49406, 265, 49407], [49406, 287, 49407], [49406, 8757, 49407]]
    assert (ids[:, 3:] == 49407).all()
    assert clip.tokenizer.pad_token_id == 49407


# (b) parity without placeholders ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ldm_tiny", "sd_tiny"])
def test_encoder_parity_without_placeholders(name):
    prompts, cond, _ = _reference(name)
    model = _cond_stage(name)
    with torch.no_grad():
        out = model.encode(prompts)
        uncond = model.encode(["", ""])
    assert out.shape == cond["nv1_init_cond"].shape
    _assert_close_to_ref(out[3:5], cond["nv1_init_cond"][3:5])  # "" and "a photo of sculpture"
    _assert_close_to_ref(uncond, cond["uncond_2"])


# (c) the Textual Inversion hook point -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ldm_tiny", "sd_tiny"])
@pytest.mark.parametrize("which", ["init", "perturbed"])
def test_hook_reproduces_reference_conditioning(name, which):
    """A single-vector manager at the hook gives the reference's nv1 conditioning for all six prompts."""
    prompts, cond, vectors = _reference(name)
    placeholder, _ = TOKEN_IDS[name]
    manager = FakeManager(placeholder, vectors[f"nv1_{which}"][0])
    with torch.no_grad():
        out = _cond_stage(name).encode(prompts, embedding_manager=manager)
    assert manager.calls == 1
    _assert_close_to_ref(out, cond[f"nv1_{which}_cond"])


@pytest.mark.parametrize("name", ["ldm_tiny", "sd_tiny"])
def test_hook_is_before_position_embeddings_and_removed(name):
    model = _cond_stage(name)
    placeholder, sculpture = TOKEN_IDS[name]
    table = _token_table(model)
    manager = FakeManager(placeholder, table.weight[sculpture].detach().clone())
    with torch.no_grad():
        substituted = model.encode(["a photo of *"], embedding_manager=manager)
        plain_word = model.encode(["a photo of sculpture"])
        plain_star = model.encode(["a photo of *"])
    # The raw token row (no position term) at the hook == typing the word: the hook precedes positions.
    assert torch.equal(substituted, plain_word)
    assert not torch.allclose(plain_star, substituted)
    assert manager.calls == 1 and not table._forward_hooks


def test_clip_hook_removed_when_manager_raises():
    model = _cond_stage("sd_tiny")

    def failing(ids, embedded):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.encode(["a photo of *"], embedding_manager=failing)
    assert not _token_table(model)._forward_hooks


def test_hook_gradient_reaches_the_vector():
    """TI trains the vector through the frozen encoder: the substituted rows must carry gradient."""
    model = _cond_stage("sd_tiny")
    vector = torch.zeros(16, requires_grad=True)
    model.encode(["a photo of *"], embedding_manager=FakeManager(265, vector)).square().sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0


# (d) stock transformers model -------------------------------------------------------------------------------


def test_clip_matches_stock_transformers_model():
    model = _cond_stage("sd_tiny")
    stock = CLIPTextModel(model.transformer.text_model.config).eval()
    state = model.transformer.text_model.state_dict()
    state.pop("embeddings.position_ids")  # a non-persistent buffer in stock transformers 5
    stock.load_state_dict(state, strict=False)
    prompts, _, _ = _reference("sd_tiny")
    with torch.no_grad():
        ours = model.encode(prompts)
        theirs = stock(input_ids=model.tokenize(prompts)).last_hidden_state
    assert (ours - theirs).abs().max().item() <= 1e-6


# (e) key layout of the full-size encoders -------------------------------------------------------------------


def _manifest_entries(manifest: str) -> dict[str, tuple[tuple[int, ...], str]]:
    keys = json.loads(fixture_path("manifests", manifest).read_text())["keys"]
    prefix = "cond_stage_model."
    return {
        k[len(prefix) :]: (tuple(v["shape"]), v["dtype"]) for k, v in keys.items() if k.startswith(prefix)
    }


def _layout(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}


def test_full_size_key_layout_on_meta():
    bert_dir, clip_dir = _tokenizer_dir("ldm_tiny"), _tokenizer_dir("sd_tiny")
    with torch.device("meta"):
        bert = BERTEmbedder(n_embed=1280, n_layer=32, tokenizer_path=bert_dir)
        clip = FrozenCLIPEmbedder(tokenizer_path=clip_dir)
    assert _layout(bert) == _manifest_entries("ldm_txt2img_1p4B.json")
    assert _layout(clip) == _manifest_entries("sd_v1.json")
    assert _layout(clip)["transformer.text_model.embeddings.position_ids"] == ((1, 77), "int64")
    # Tokenizers still produce real CPU ids under the meta device.
    assert bert.tknz_fn("a photo of *")[0, :6].tolist() == [101, 1037, 6302, 1997, 1008, 102]


# (f) errors -------------------------------------------------------------------------------------------------


@pytest.fixture
def empty_offline_hub(tmp_path, monkeypatch):
    """Offline, with an empty Hugging Face home and cache (hub constants are read at import: patch them)."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))


def test_offline_errors_say_what_to_provide(empty_offline_hub, tmp_path):
    with pytest.raises(PretrainedResourceError, match="vocab.json and merges.txt.*tokenizer_path"):
        FrozenCLIPEmbedder(version="openai/clip-vit-large-patch14")
    with pytest.raises(PretrainedResourceError, match="vocab.txt.*tokenizer_path"):
        BERTEmbedder(n_embed=16, n_layer=1)
    with pytest.raises(PretrainedResourceError, match="text_config"):
        FrozenCLIPEmbedder(version="tiny/clip-text-h16-l2", tokenizer_path=_tokenizer_dir("sd_tiny"))
    with pytest.raises(PretrainedResourceError, match="missing vocab.txt"):
        BERTEmbedder(n_embed=16, n_layer=1, tokenizer_path=tmp_path)


def test_x_transformer_rejects_unsupported_options():
    with pytest.raises(NotImplementedError, match="use_rezero"):
        Encoder(dim=16, depth=1, use_rezero=True)
    with pytest.raises(NotImplementedError, match="causal"):
        AttentionLayers(dim=16, depth=1, causal=True)
    with pytest.raises(TypeError, match="not_an_option"):
        Encoder(dim=16, depth=1, not_an_option=1)
    with pytest.raises(NotImplementedError, match="num_memory_tokens"):
        TransformerWrapper(
            num_tokens=10, max_seq_len=8, attn_layers=Encoder(dim=16, depth=1), num_memory_tokens=2
        )
    wrapper = TransformerWrapper(num_tokens=10, max_seq_len=8, attn_layers=Encoder(dim=16, depth=1)).eval()
    ids = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NotImplementedError, match="return_attn"):
        wrapper(ids, return_attn=True)
    with pytest.raises(ValueError, match="max_seq_len"):
        wrapper(torch.zeros(1, 9, dtype=torch.long))
    # An all-True padding mask changes nothing; logits have the vocabulary width.
    with torch.no_grad():
        plain = wrapper(ids, return_embeddings=True)
        masked = wrapper(ids, return_embeddings=True, mask=torch.ones(2, 8, dtype=torch.bool))
        assert torch.equal(plain, masked) and wrapper(ids).shape == (2, 8, 10)
