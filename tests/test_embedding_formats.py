"""Embedding file formats (docs/DIFFERENCES.md#checkpoints-and-embedding-files): round trips, third-party
layouts, safe reading,
atomic writes."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from conftest import fixture_path
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ldm.checkpoint import CheckpointError
from ldm.modules.embedding_formats import (
    EmbeddingFormatError,
    EmbeddingSet,
    read_embeddings,
    write_embeddings,
    write_official,
    write_safetensors,
)
from ldm.modules.embedding_manager import EmbeddingManager

DIM = 16


class _Tokenizer:
    VOCAB = {"*": 265, "@": 537, "cat": 2368}

    def __call__(self, text: str) -> torch.Tensor:
        ids = [101] + [self.VOCAB[w] for w in text.split()] + [102]
        out = torch.zeros(1, 77, dtype=torch.int64)
        out[0, : len(ids)] = torch.tensor(ids)
        return out


class _Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tknz_fn = _Tokenizer()
        self.transformer = nn.Module()
        self.transformer.token_emb = nn.Embedding(3000, DIM)


def _manager(k: int) -> EmbeddingManager:
    torch.manual_seed(0)
    manager = EmbeddingManager(_Embedder(), placeholder_strings=["*", "@"], initializer_words=["cat"],
                               num_vectors_per_token=k)
    with torch.no_grad():
        for p in manager.string_to_param_dict.values():
            p.add_(torch.randn_like(p))
    return manager


def _vectors(manager: EmbeddingManager) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in manager.string_to_param_dict.items()}


def _assert_vectors_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == torch.float32
        assert torch.equal(actual[key], expected[key]), key


# ---------------------------------------------------------------------------------------------------
# Official .pt
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_official_pt_round_trip_via_manager_save(tmp_path, k):
    manager = _manager(k)
    path = tmp_path / "embeddings.pt"
    manager.save(path)

    emb = read_embeddings(path)
    _assert_vectors_equal(emb.vectors, _vectors(manager))
    assert emb.tokens == {"*": 265, "@": 537}
    assert all(v.shape == (k, DIM) for v in emb.vectors.values())

    # The file has the reference's layout exactly (readable by the original code, A1111 and diffusers).
    raw = torch.load(path, map_location="cpu", weights_only=False)
    assert set(raw) == {"string_to_token", "string_to_param"}
    assert isinstance(raw["string_to_param"], nn.ParameterDict)
    assert list(raw["string_to_param"]) == ["*", "@"]
    for key, token in raw["string_to_token"].items():
        assert isinstance(token, torch.Tensor) and token.dim() == 0 and token.dtype == torch.int64
        assert int(token) == {"*": 265, "@": 537}[key]
    assert raw["string_to_param"]["*"].device.type == "cpu"

    # And loads back into a manager.
    other = _manager(k)
    with torch.no_grad():
        for p in other.string_to_param_dict.values():
            p.zero_()
    other.load(path)
    _assert_vectors_equal(_vectors(other), _vectors(manager))
    assert {s: int(t) for s, t in other.string_to_token_dict.items()} == {"*": 265, "@": 537}


@pytest.mark.parametrize("k", [1, 3])
def test_write_official_round_trip(tmp_path, k):
    vectors = {"*": torch.randn(k, DIM), "<x>": torch.randn(k, DIM)}
    path = tmp_path / "e.pt"
    write_official(EmbeddingSet(vectors, {"*": 265, "<x>": 49400}), path)
    emb = read_embeddings(path)
    _assert_vectors_equal(emb.vectors, vectors)
    assert emb.tokens == {"*": 265, "<x>": 49400}


def test_reference_file_reads(tmp_path):
    path = fixture_path("parity", "sd_tiny", "merge", "A_star.pt")
    emb = read_embeddings(path)
    assert list(emb.vectors) == ["*"]
    assert emb.tokens == {"*": 265}
    assert emb.vectors["*"].shape == (1, 16)
    raw = torch.load(path, map_location="cpu", weights_only=False)
    assert isinstance(raw["string_to_param"], nn.ParameterDict)  # really the pickled-module layout
    assert torch.equal(emb.vectors["*"], raw["string_to_param"]["*"].detach())


def test_pt_with_plain_tensors(tmp_path):
    vec = torch.randn(2, DIM)
    path = tmp_path / "plain.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": vec}}, path)
    emb = read_embeddings(path)
    assert emb.tokens == {"*": 265}
    assert torch.equal(emb.vectors["*"], vec)


def test_pt_with_one_dimensional_vector(tmp_path):
    vec = torch.randn(DIM)
    path = tmp_path / "flat.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": vec}}, path)
    assert torch.equal(read_embeddings(path).vectors["*"], vec[None])


# ---------------------------------------------------------------------------------------------------
# Our safetensors
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_safetensors_round_trip_with_metadata(tmp_path, k):
    manager = _manager(k)
    path = tmp_path / "embeddings.safetensors"
    manager.save(path, meta={"step": 5})

    emb = read_embeddings(path)
    _assert_vectors_equal(emb.vectors, _vectors(manager))
    assert emb.tokens == {"*": 265, "@": 537}
    assert emb.meta["step"] == "5"

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = sorted(f.keys())
    assert keys == ["string_to_param.*", "string_to_param.@"]
    assert meta["format"] == "textual_inversion"
    assert json.loads(meta["placeholders"]) == ["*", "@"]
    assert json.loads(meta["string_to_token"]) == {"*": 265, "@": 537}
    assert json.loads(meta["num_vectors"]) == {"*": k, "@": k}
    assert meta["token_dim"] == str(DIM)
    assert meta["step"] == "5"

    other = _manager(k)
    other.load(path)
    _assert_vectors_equal(_vectors(other), _vectors(manager))


def test_write_embeddings_dispatches_on_suffix(tmp_path):
    emb = EmbeddingSet({"*": torch.randn(1, DIM)}, {"*": 265})
    write_embeddings(emb, tmp_path / "a.safetensors")
    write_embeddings(emb, tmp_path / "a.pt")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "textual_inversion"
    assert set(torch.load(tmp_path / "a.pt", weights_only=False)) == {"string_to_token", "string_to_param"}


# ---------------------------------------------------------------------------------------------------
# Third-party layouts
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_diffusers_learned_embeds(tmp_path, suffix, k):
    vec = torch.randn(k, DIM)
    path = tmp_path / f"learned_embeds.{suffix}"
    if suffix == "safetensors":
        save_file({"<cat-toy>": vec}, str(path))
    else:
        torch.save({"<cat-toy>": vec}, path)
    emb = read_embeddings(path)
    assert list(emb.vectors) == ["<cat-toy>"]
    assert torch.equal(emb.vectors["<cat-toy>"], vec)
    assert emb.tokens == {}


def test_diffusers_single_vector_1d(tmp_path):
    vec = torch.randn(DIM)
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": vec}, path)
    emb = read_embeddings(path)
    assert torch.equal(emb.vectors["<cat-toy>"], vec[None])


def test_a1111_pt(tmp_path):
    vec = torch.randn(2, DIM)
    path = tmp_path / "x.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "x", "step": 3}, path)
    emb = read_embeddings(path)
    assert list(emb.vectors) == ["*"]
    assert torch.equal(emb.vectors["*"], vec)
    assert emb.tokens == {"*": 265}
    assert emb.meta["name"] == "x" and emb.meta["step"] == "3"


def test_a1111_safetensors_named_after_file(tmp_path):
    vec = torch.randn(4, DIM)
    path = tmp_path / "my-style.safetensors"
    save_file({"emb_params": vec}, str(path))
    emb = read_embeddings(path)
    assert list(emb.vectors) == ["my-style"]
    assert torch.equal(emb.vectors["my-style"], vec)
    assert emb.tokens == {}


@pytest.mark.parametrize("content", [{"foo": 1}, {"a": torch.randn(2), "foo": "bar"}])
def test_unknown_layout_names_file(tmp_path, content):
    path = tmp_path / "weird.pt"
    torch.save(content, path)
    with pytest.raises(EmbeddingFormatError) as e:
        read_embeddings(path)
    assert str(path) in str(e.value)


def _bad_ours(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("case", ["placeholder_without_tensor", "bad_json", "no_placeholders",
                                  "param_not_a_dict"])
def test_inconsistent_file_raises_format_error(tmp_path, case):
    vec = {"string_to_param.*": torch.randn(1, DIM)}
    if case == "placeholder_without_tensor":
        path = tmp_path / "e.safetensors"
        _bad_ours(path, vec, {"format": "textual_inversion", "placeholders": json.dumps(["*", "@"])})
    elif case == "bad_json":
        path = tmp_path / "e.safetensors"
        _bad_ours(path, vec, {"format": "textual_inversion", "placeholders": "[oops"})
    elif case == "no_placeholders":
        path = tmp_path / "e.safetensors"
        _bad_ours(path, vec, {"format": "textual_inversion"})
    else:
        path = tmp_path / "e.pt"
        torch.save({"string_to_param": torch.randn(2, DIM)}, path)
    with pytest.raises(EmbeddingFormatError) as e:
        read_embeddings(path)
    assert str(path) in str(e.value)


def test_non_dict_file(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.randn(2, DIM)], path)
    with pytest.raises(EmbeddingFormatError, match="list"):
        read_embeddings(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError):
        read_embeddings(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError):
        read_embeddings(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------------------------------
# Safety: no pickled code runs
# ---------------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": _Evil(str(marker))}}
    torch.save(payload, path)

    with pytest.raises(CheckpointError):
        read_embeddings(path)
    assert not marker.exists()

    # Control: the payload is live, an unsafe load would have run it.
    control_marker = tmp_path / "control"
    control = tmp_path / "control.pt"
    torch.save({"x": _Evil(str(control_marker))}, control)
    torch.load(control, weights_only=False)
    assert control_marker.exists()


def test_malicious_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"<x>": _Evil(str(marker))}, protocol=2))
    with pytest.raises(CheckpointError):
        read_embeddings(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------


def _existing(tmp_path, name: str) -> tuple[os.PathLike, bytes]:
    path = tmp_path / name
    write_embeddings(EmbeddingSet({"*": torch.randn(1, DIM)}, {"*": 265}), path)
    return path, path.read_bytes()


def test_failed_write_without_tokens_leaves_existing_file(tmp_path):
    path, before = _existing(tmp_path, "embeddings.pt")
    with pytest.raises(EmbeddingFormatError, match="token"):
        write_official(EmbeddingSet({"*": torch.randn(1, DIM)}, {}), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.pt"]


def test_crash_while_writing_pt_leaves_existing_file(tmp_path, monkeypatch):
    path, before = _existing(tmp_path, "embeddings.pt")

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_official(EmbeddingSet({"*": torch.randn(1, DIM)}, {"*": 265}), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.pt"]  # no temporary left behind


def test_crash_while_writing_safetensors_leaves_existing_file(tmp_path, monkeypatch):
    import safetensors.torch

    path, before = _existing(tmp_path, "embeddings.safetensors")

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(EmbeddingSet({"*": torch.randn(1, DIM)}, {"*": 265}), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embeddings.safetensors"]


def test_mixed_widths_rejected():
    with pytest.raises(EmbeddingFormatError, match="widths"):
        _ = EmbeddingSet({"*": torch.randn(1, 4), "@": torch.randn(1, 5)}).token_dim
