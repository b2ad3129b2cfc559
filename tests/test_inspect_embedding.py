"""Issue 15.6: scripts/inspect_embedding.py on every supported format, on the toy model (BERT-style toy
tokenizer) and the tiny SD model (CLIP): placeholders, norms, metadata, nearest tokens, clean errors."""

import json

import pytest
import torch
from conftest import REPO, fixture_path, load_script, parity_config, parity_weights
from omegaconf import OmegaConf
from safetensors.torch import load_file

import ldm.loading
from ldm.modules.embedding_formats import EmbeddingSet, write_format
from ldm.modules.embedding_inspect import Vocabulary, describe, nearest_tokens, vocabulary_of

TOY_CONFIG = REPO / "configs" / "toy" / "invert.yaml"
TOY_CKPT = REPO / "models" / "toy" / "toy_ldm.safetensors"
SCRIPT = load_script("inspect_embedding")

_MODELS = {}
_real_load_model = ldm.loading.load_model


def _cached_load_model(config, ckpt=None, **kw):
    """The real loader, once per (config, ckpt, tokenizer_path, overrides) in this module."""
    key = (str(config), str(ckpt), str(kw.get("tokenizer_path")), tuple(kw.get("overrides") or ()))
    if key not in _MODELS:
        _MODELS[key] = _real_load_model(config, ckpt, **kw)
    return _MODELS[key]


@pytest.fixture(autouse=True)
def _load_once(monkeypatch):
    monkeypatch.setattr(ldm.loading, "load_model", _cached_load_model)


@pytest.fixture(scope="module")
def toy():
    model = _cached_load_model(TOY_CONFIG, TOY_CKPT)
    return vocabulary_of(model), model.cond_stage_model.tknz_fn.tokenizer


def _inspect(capsys, *argv):
    code = SCRIPT.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *argv):
    code, out, err = _inspect(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


# format, suffix, the placeholder the file is read as
FORMATS = [("official", ".pt", "*"), ("safetensors", ".safetensors", "*"), ("diffusers", ".bin", "*"),
           ("diffusers", ".safetensors", "*"), ("a1111", ".pt", "*"), ("a1111", ".safetensors", "concept")]


@pytest.mark.parametrize("fmt,suffix,name", FORMATS)
def test_every_format_nearest_tokens_on_the_toy_model(toy, tmp_path, capsys, fmt, suffix, name):
    vocab, tokenizer = toy
    ring, circle = tokenizer.convert_tokens_to_ids(["ring", "circle"])
    k = 1 if fmt == "a1111" else 2  # vector 0 is the row of "ring", vector 1 twice the row of "circle"
    vectors = torch.stack([vocab.weight[ring], 2 * vocab.weight[circle]])[:k]
    path = tmp_path / f"concept{suffix}"
    write_format(EmbeddingSet({"*": vectors}, {"*": 5}, {"step": "300"}), path, fmt)
    report = _json(capsys, path, "--config", TOY_CONFIG, "--ckpt", TOY_CKPT, "--top_k", "3")
    assert report["format"] == fmt and report["token_dim"] == 64
    (entry,) = report["placeholders"]
    assert entry["placeholder"] == name and entry["num_vectors"] == k
    first = entry["vectors"][0]
    assert [n["token"] for n in first["nearest"]][0] == "ring" and first["nearest"][0]["id"] == ring
    assert first["nearest"][0]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert len(first["nearest"]) == 3 and first["nearest"][0]["cosine"] >= first["nearest"][1]["cosine"]
    assert first["norm"] == pytest.approx(vocab.weight[ring].norm().item(), rel=1e-6)
    if k == 2:
        second = entry["vectors"][1]
        assert second["nearest"][0]["token"] == "circle"  # cosine ignores the scale
        assert second["nearest"][0]["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert second["norm"] == pytest.approx(2 * vocab.weight[circle].norm().item(), rel=1e-6)
    expected_token = {"official": 5, "safetensors": 5, "a1111": 265 if suffix == ".pt" else None}.get(fmt)
    assert entry["token_id"] == expected_token  # A1111's .pt always says 265; diffusers' files have none
    if fmt == "safetensors" or (fmt, suffix) == ("a1111", ".pt"):
        assert report["metadata"]["step"] == "300"


def test_norm_against_the_vocabulary(toy, tmp_path, capsys):
    vocab, _ = toy
    norms = vocab.weight.double().norm(dim=-1)
    big = norms.max().item() * 2
    vector = torch.tensor([[big] + [0.0] * 63])
    write_format(EmbeddingSet({"*": vector}, {"*": 5}), tmp_path / "e.pt", "official")
    report = _json(capsys, tmp_path / "e.pt", "--config", TOY_CONFIG, "--ckpt", TOY_CKPT)
    stats = report["vocabulary"]
    assert stats["tokens"] == 64
    assert stats["norm_mean"] == pytest.approx(norms.mean().item(), rel=1e-6)
    assert stats["norm_std"] == pytest.approx(norms.std().item(), rel=1e-6)
    row = report["placeholders"][0]["vectors"][0]
    assert row["norm_percentile"] == 100.0 and row["norm"] == pytest.approx(big)
    assert len(row["nearest"]) == 5  # the default --top_k


def test_training_metadata_and_text_table(toy, tmp_path, capsys):
    vocab, tokenizer = toy
    ring = tokenizer.convert_tokens_to_ids("ring")
    meta = {"step": "300", "seed": "0", "config": "model:\n  params: {}\n",
            "base_checkpoint": "toy_ldm.safetensors", "base_checkpoint_sha256": "ab" * 32,
            "text_encoder_width": "64"}
    path = tmp_path / "embeddings_gs-300.safetensors"
    write_format(EmbeddingSet({"*": vocab.weight[ring][None]}, {"*": 5}, meta), path, "safetensors")
    code, out, err = _inspect(capsys, path, "--config", TOY_CONFIG, "--ckpt", TOY_CKPT, "--top_k", "2")
    assert code == 0, err
    assert "step: 300" in out and "seed: 0" in out and f"base_checkpoint_sha256: {'ab' * 32}" in out
    assert "config: 2 lines of YAML" in out and "'*' (token id 5): 1 vector(s)" in out
    table = out[out.index("rank"):].splitlines()
    assert table[1].split() == ["1", "ring", str(ring), "1.0000"] and len(table) == 3
    report = _json(capsys, path)  # no model: norms and metadata only
    assert report["metadata"]["config"] == meta["config"] and report["vocabulary"] is None
    assert "nearest" not in report["placeholders"][0]["vectors"][0]


def test_clip_vocabulary_of_the_tiny_sd_model(tmp_path, capsys):
    sd = load_file(str(parity_weights("sd_tiny")))
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("embedding_manager.")}},
               tmp_path / "base.ckpt")
    OmegaConf.save(parity_config("sd_tiny"), tmp_path / "config.yaml")
    table = sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    cat = 2368  # "cat</w>" in CLIP's vocabulary
    path = tmp_path / "learned_embeds.bin"
    write_format(EmbeddingSet({"<cat>": table[cat][None].clone()}), path, "diffusers")
    report = _json(capsys, path, "--config", tmp_path / "config.yaml", "--ckpt",
                   tmp_path / "base.ckpt", "--tokenizer_path", fixture_path("tokenizers", "clip"))
    near = report["placeholders"][0]["vectors"][0]["nearest"][0]
    assert near == {"token": "cat</w>", "id": cat, "cosine": pytest.approx(1.0, abs=1e-6)}
    assert report["vocabulary"]["tokens"] == 49408


def test_describe_and_nearest_tokens_directly():
    vocab = Vocabulary(torch.eye(3, 4), ["a", "b", "c"])
    nearest = nearest_tokens(torch.tensor([[0.0, 1.0, 0.1, 0.0]]), vocab, 5)[0]
    assert [n["token"] for n in nearest] == ["b", "c", "a"]
    with pytest.raises(ValueError, match="width 2"):
        describe(EmbeddingSet({"*": torch.ones(1, 2)}), vocab)


def _write_bad(tmp_path, case):
    if case == "unknown format":
        torch.save({"foo": 1}, tmp_path / "u.pt")
        return [tmp_path / "u.pt"]
    if case == "corrupt safetensors":
        (tmp_path / "c.safetensors").write_bytes(b"not a safetensors file")
        return [tmp_path / "c.safetensors"]
    write_format(EmbeddingSet({"*": torch.ones(1, 768)}, {"*": 5}), tmp_path / "w.pt", "official")
    if case == "width mismatch":
        return [tmp_path / "w.pt", "--config", TOY_CONFIG, "--ckpt", TOY_CKPT]
    if case == "config without ckpt":
        return [tmp_path / "w.pt", "--config", TOY_CONFIG]
    if case == "missing ckpt":
        return [tmp_path / "w.pt", "--config", TOY_CONFIG, "--ckpt", tmp_path / "none.safetensors"]
    if case == "top_k 0":
        return [tmp_path / "w.pt", "--top_k", "0"]
    return [tmp_path / "absent.pt"]


BAD = {  # case: what the one error line must name
    "missing file": ["embedding file not found", "absent.pt"],
    "unknown format": ["unknown embeddings layout", "u.pt"],
    "corrupt safetensors": ["c.safetensors"],
    "width mismatch": ["w.pt", "width 768", "token width 64", "--config"],
    "config without ckpt": ["--config needs --ckpt"],
    "missing ckpt": ["--ckpt", "none.safetensors"],
    "top_k 0": ["--top_k 0"],
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line(tmp_path, capsys, case):
    code, out, err = _inspect(capsys, *_write_bad(tmp_path, case))
    lines = err.strip().splitlines()
    assert code == 1 and out == ""
    assert len(lines) == 1 and lines[0].startswith("inspect_embedding.py: error:"), lines
    for expected in BAD[case]:
        assert expected in lines[0], (expected, lines[0])
