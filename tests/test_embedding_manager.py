"""EmbeddingManager (docs/DIFFERENCES.md#embedding-manager): substitution, multi-vector expansion,
initialisation,
progressive words, per-image tokens, errors, the regulariser and the unmatched-placeholder warning.

Most tests use a fake BERT-style embedder (`tknz_fn` + `transformer.token_emb`, the LDM interface) so they
run in milliseconds; the CLIP-specific behaviour uses the tiny SD text encoder of the parity fixtures.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import parity_config
from torch import nn

import ldm.modules.embedding_manager as em
from ldm.data.placeholder_tokens import per_img_token_list
from ldm.models.diffusion.textual_inversion import embedding_regularization
from ldm.modules.embedding_formats import EmbeddingSet, write_official
from ldm.modules.embedding_manager import EmbeddingManager, PlaceholderError, expand_placeholders

CLS, SEP, PAD = 2, 3, 0
VOCAB = {"*": 10, "@": 11, "cat": 12, "dog": 13, "a": 14, "photo": 15, "of": 16, "painting": 17, "in": 18}
VOCAB.update({letter: 100 + i for i, letter in enumerate(per_img_token_list)})
DIM = 8
STAR, AT = VOCAB["*"], VOCAB["@"]


class FakeBertTokenizer:
    """(1, 77) ids: [CLS] one id per whitespace word [SEP], 0 padding (unknown words get id 1)."""

    def __call__(self, text: str) -> torch.Tensor:
        ids = [CLS] + [VOCAB.get(w, 1) for w in text.split()] + [SEP]
        out = torch.zeros(1, 77, dtype=torch.int64)
        out[0, : len(ids)] = torch.tensor(ids)
        return out


class FakeBertEmbedder(nn.Module):
    """The LDM BERTEmbedder interface the manager uses: `tknz_fn` and `transformer.token_emb`."""

    def __init__(self):
        super().__init__()
        self.tknz_fn = FakeBertTokenizer()
        self.transformer = nn.Module()
        self.transformer.token_emb = nn.Embedding(200, DIM)


@pytest.fixture
def bert():
    torch.manual_seed(0)
    return FakeBertEmbedder()


@pytest.fixture(scope="module")
def clip():
    """The tiny SD text encoder (FrozenCLIPEmbedder, real CLIP BPE vocabulary, width 16), random weights."""
    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    return instantiate_from_config(parity_config("sd_tiny").model.params.cond_stage_config)


def _ids(*rows: list[int], n: int = 10) -> torch.Tensor:
    out = torch.zeros(len(rows), n, dtype=torch.int64)
    for r, row in enumerate(rows):
        out[r, : len(row)] = torch.tensor(row)
    return out


# ---------------------------------------------------------------------------------------------------
# Single-vector substitution
# ---------------------------------------------------------------------------------------------------


def test_single_vector_replaces_every_occurrence_and_nothing_else(bert):
    manager = EmbeddingManager(bert, placeholder_strings=["*"], initializer_words=["cat"])
    ids = _ids([CLS, STAR, 14, STAR, SEP], [CLS, 15, 16, STAR, SEP], [CLS, 15, SEP])
    embedded = torch.randn(3, 10, DIM, requires_grad=True)
    ids_before = ids.clone()

    out = manager(ids, embedded)

    mask = ids == STAR
    assert int(mask.sum()) == 3
    vector = manager.string_to_param_dict["*"]
    assert vector.shape == (1, DIM)
    assert torch.equal(out[mask], vector.detach().expand(3, DIM))
    assert torch.equal(out[~mask], embedded.detach()[~mask])
    assert torch.equal(ids, ids_before)

    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    # The vector's gradient is the sum of the upstream gradients at all its positions ...
    torch.testing.assert_close(vector.grad, upstream[mask].sum(0, keepdim=True))
    # ... and the replaced token embeddings get none (they were overwritten), the others pass through.
    assert torch.equal(embedded.grad[mask], torch.zeros(3, DIM))
    assert torch.equal(embedded.grad[~mask], upstream[~mask])


def test_rows_without_placeholder_are_returned_unchanged(bert):
    manager = EmbeddingManager(bert, placeholder_strings=["*", "@"], num_vectors_per_token=2)
    ids = _ids([CLS, 15, 16, SEP])
    embedded = torch.randn(1, 10, DIM)
    new_ids, out = manager.substitute(ids, embedded)
    assert torch.equal(new_ids, ids)
    assert torch.equal(out, embedded)


# ---------------------------------------------------------------------------------------------------
# Multi-vector expansion (docs/DIFFERENCES.md#no-input-mutation)
# ---------------------------------------------------------------------------------------------------


def test_expand_placeholders_right_to_left_shift_and_truncation():
    token = torch.tensor(STAR)
    ids = _ids(
        [CLS, STAR, 5, STAR, 6, SEP],                # two occurrences in one row
        [CLS, 4, 5, 6, 7, 8, 9, 20, STAR, SEP],      # placeholder near the end: truncation drops tokens
        [CLS, 5, 6, SEP],                            # no placeholder
    )
    embedded = torch.randn(3, 10, DIM)
    vectors = torch.randn(3, DIM)
    ids_before, emb_before = ids.clone(), embedded.clone()

    new_ids, out = expand_placeholders(ids, embedded, token, vectors)

    T = STAR
    assert new_ids.tolist() == [
        [CLS, T, T, T, 5, T, T, T, 6, SEP],
        [CLS, 4, 5, 6, 7, 8, 9, 20, T, T],
        [CLS, 5, 6, SEP, 0, 0, 0, 0, 0, 0],
    ]
    e = emb_before
    expected0 = torch.stack([e[0, 0], *vectors, e[0, 2], *vectors, e[0, 4], e[0, 5]])
    expected1 = torch.cat([e[1, :8], vectors[:2]])
    assert torch.equal(out[0], expected0)
    assert torch.equal(out[1], expected1)
    assert torch.equal(out[2], e[2])
    assert out.shape == embedded.shape and new_ids.shape == ids.shape
    # The caller's tensors are not mutated (the reference wrote the expanded ids back in place).
    assert torch.equal(ids, ids_before)
    assert torch.equal(embedded, emb_before)


def test_expand_placeholders_gradient_per_vector():
    token = torch.tensor(STAR)
    ids = _ids([CLS, STAR, 5, STAR, SEP], [CLS, STAR, SEP])
    embedded = torch.randn(2, 10, DIM)
    vectors = torch.randn(2, DIM, requires_grad=True)
    new_ids, out = expand_placeholders(ids, embedded, token, vectors)
    assert new_ids.tolist()[0][:7] == [CLS, STAR, STAR, 5, STAR, STAR, SEP]
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    # vector j sits at positions 1+j and 4+j of row 0 and 1+j of row 1
    for j in range(2):
        expected = upstream[0, 1 + j] + upstream[0, 4 + j] + upstream[1, 1 + j]
        torch.testing.assert_close(vectors.grad[j], expected)


def test_substitute_two_placeholders_in_one_row(bert):
    manager = EmbeddingManager(bert, placeholder_strings=["*", "@"], initializer_words=["cat", "dog"],
                               num_vectors_per_token=2)
    with torch.no_grad():
        manager.string_to_param_dict["*"].copy_(torch.randn(2, DIM))
        manager.string_to_param_dict["@"].copy_(torch.randn(2, DIM))
    star, at = manager.string_to_param_dict["*"].detach(), manager.string_to_param_dict["@"].detach()
    ids = _ids([CLS, 14, STAR, 18, AT, SEP])
    embedded = torch.randn(1, 10, DIM)
    ids_before, e = ids.clone(), embedded.clone()

    new_ids, out = manager.substitute(ids, embedded)

    assert new_ids.tolist() == [[CLS, 14, STAR, STAR, 18, AT, AT, SEP, 0, 0]]
    expected = torch.stack([e[0, 0], e[0, 1], star[0], star[1], e[0, 3], at[0], at[1],
                            e[0, 5], e[0, 6], e[0, 7]])
    assert torch.equal(out[0], expected)
    assert torch.equal(ids, ids_before)  # not mutated
    assert torch.equal(manager(ids, embedded), out)  # forward == substitute()[1]


# ---------------------------------------------------------------------------------------------------
# Loading a multi-vector file under a single-vector config (docs/DIFFERENCES.md#mode-from-vector-count)
# and `load` semantics
# ---------------------------------------------------------------------------------------------------


def test_two_vector_file_under_single_vector_config(bert, tmp_path):
    vectors = torch.randn(2, DIM)
    path = tmp_path / "two.pt"
    write_official(EmbeddingSet({"*": vectors}, {"*": STAR}), path)
    manager = EmbeddingManager(bert, placeholder_strings=["*"], initializer_words=["cat"],
                               num_vectors_per_token=1)
    manager.load(path)
    assert manager.string_to_param_dict["*"].shape == (2, DIM)

    # Two occurrences in the batch: the reference would silently assign one row per occurrence.
    ids = _ids([CLS, STAR, 5, SEP], [CLS, 6, STAR, SEP])
    embedded = torch.randn(2, 10, DIM)
    new_ids, out = manager.substitute(ids, embedded)
    assert new_ids.tolist() == [[CLS, STAR, STAR, 5, SEP, 0, 0, 0, 0, 0],
                                [CLS, 6, STAR, STAR, SEP, 0, 0, 0, 0, 0]]
    assert torch.equal(out[0, 1:3], vectors)
    assert torch.equal(out[1, 2:4], vectors)
    assert torch.equal(out[0, 3], embedded[0, 2])


def test_load_replaces_placeholders_with_the_files(bert, tmp_path):
    vectors = torch.randn(1, DIM)
    path = tmp_path / "at.pt"
    write_official(EmbeddingSet({"@": vectors}, {"@": AT}), path)
    manager = EmbeddingManager(bert, placeholder_strings=["*"], initializer_words=["cat"])
    manager.load(path)
    assert list(manager.string_to_param_dict) == ["@"]
    assert {k: int(v) for k, v in manager.string_to_token_dict.items()} == {"@": AT}
    assert torch.equal(manager.string_to_param_dict["@"].detach(), vectors)
    out = manager(_ids([CLS, AT, STAR, SEP]), torch.zeros(1, 10, DIM))
    assert torch.equal(out[0, 1], vectors[0])
    assert torch.equal(out[0, 2], torch.zeros(DIM))  # '*' is no longer a placeholder


def test_load_file_without_token_ids_uses_the_tokenizer(bert, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "learned_embeds.safetensors"
    save_file({"@": torch.randn(1, DIM)}, str(path))
    manager = EmbeddingManager(bert, placeholder_strings=["*"])
    manager.load(path)
    assert int(manager.string_to_token_dict["@"]) == AT


# ---------------------------------------------------------------------------------------------------
# Progressive words (docs/DIFFERENCES.md#progressive-counter-resumed)
# ---------------------------------------------------------------------------------------------------


def test_progressive_words_grow_one_two_three(bert, monkeypatch):
    monkeypatch.setattr(em, "PROGRESSIVE_SCALE", 2)
    manager = EmbeddingManager(bert, placeholder_strings=["*"], num_vectors_per_token=3,
                               progressive_words=True)
    ids = _ids([CLS, STAR, 5, SEP])
    embedded = torch.randn(1, 10, DIM)
    param = manager.string_to_param_dict["*"].detach()

    counts = []
    for _ in range(6):
        new_ids, out = manager.substitute(ids, embedded)
        k = int((new_ids[0] == STAR).sum())
        counts.append(k)
        assert torch.equal(out[0, 1 : 1 + k], param[:k])
        assert torch.equal(out[0, 1 + k], embedded[0, 2])
    # k = min(3, 1 + counter // 2) with the counter advanced before use: counters 1..6
    assert counts == [1, 2, 2, 3, 3, 3]
    assert manager.progressive_counter == 6


def test_progressive_counter_advances_without_the_placeholder(bert, monkeypatch):
    monkeypatch.setattr(em, "PROGRESSIVE_SCALE", 2)
    manager = EmbeddingManager(bert, placeholder_strings=["*", "@"], num_vectors_per_token=3,
                               progressive_words=True)
    manager.substitute(_ids([CLS, 5, SEP]), torch.randn(1, 10, DIM))
    assert manager.progressive_counter == 2  # once per placeholder string per call, before the presence check
    new_ids, _ = manager.substitute(_ids([CLS, STAR, SEP]), torch.randn(1, 10, DIM))
    assert int((new_ids == STAR).sum()) == 2  # counter 3 -> 1 + 3 // 2


def test_progressive_words_off_uses_all_vectors(bert):
    manager = EmbeddingManager(bert, placeholder_strings=["*"], num_vectors_per_token=3,
                               progressive_words=False)
    new_ids, _ = manager.substitute(_ids([CLS, STAR, SEP]), torch.randn(1, 10, DIM))
    assert int((new_ids == STAR).sum()) == 3
    assert manager.progressive_counter == 0


# ---------------------------------------------------------------------------------------------------
# Per-image tokens (the caller's list is not mutated)
# ---------------------------------------------------------------------------------------------------


def test_per_image_tokens_add_22_hebrew_placeholders_without_mutation(bert):
    assert len(per_img_token_list) == 22
    placeholders = ["*"]
    manager = EmbeddingManager(bert, placeholder_strings=placeholders, initializer_words=["cat"],
                               per_image_tokens=True)
    assert placeholders == ["*"]
    assert list(manager.string_to_token_dict) == ["*", *per_img_token_list]
    assert list(manager.string_to_param_dict) == ["*", *per_img_token_list]
    assert int(manager.string_to_token_dict["\u05d0"]) == 100
    assert list(manager.initial_embeddings) == ["*"]  # only the first placeholder has an initializer


# ---------------------------------------------------------------------------------------------------
# Initialisation (docs/DIFFERENCES.md#clip-init-position)
# ---------------------------------------------------------------------------------------------------


def test_random_init_is_uniform_0_1_of_token_width(bert):
    torch.manual_seed(123)
    expected = torch.rand(3, DIM)
    torch.manual_seed(123)
    manager = EmbeddingManager(bert, placeholder_strings=["*"], num_vectors_per_token=3)
    param = manager.string_to_param_dict["*"]
    assert param.shape == (3, DIM) and param.dtype == torch.float32 and param.requires_grad
    assert torch.equal(param.detach(), expected)
    assert len(manager.initial_embeddings) == 0


def test_random_init_range_at_scale(bert):
    bert.transformer.token_emb = nn.Embedding(200, 1280)
    manager = EmbeddingManager(bert, placeholder_strings=["*"], num_vectors_per_token=4)
    p = manager.string_to_param_dict["*"].detach()
    assert p.shape == (4, 1280)
    assert float(p.min()) >= 0.0 and float(p.max()) < 1.0
    assert 0.45 < float(p.mean()) < 0.55  # uniform [0,1), not a standard normal


def test_bert_init_is_the_token_row_repeated(bert):
    manager = EmbeddingManager(bert, placeholder_strings=["*", "@"], initializer_words=["cat"],
                               num_vectors_per_token=2)
    row = bert.transformer.token_emb.weight[VOCAB["cat"]].detach()
    star = manager.string_to_param_dict["*"]
    assert torch.equal(star.detach(), row.expand(2, DIM))
    assert star.requires_grad
    init = manager.initial_embeddings["*"]
    assert torch.equal(init, row.expand(2, DIM)) and not init.requires_grad
    assert "@" not in manager.initial_embeddings  # no initializer word for the second placeholder
    # The parameter is a copy: training it does not move the frozen initial embedding or the table.
    with torch.no_grad():
        star.add_(1.0)
    assert torch.equal(manager.initial_embeddings["*"], row.expand(2, DIM))
    assert torch.equal(bert.transformer.token_emb.weight[VOCAB["cat"]].detach(), row)


def test_clip_init_includes_position_zero_by_default(clip):
    embeddings = clip.transformer.text_model.embeddings
    row = embeddings.token_embedding.weight[8757].detach()  # 'sculpture'
    pos0 = embeddings.position_embedding.weight[0].detach()
    assert float(pos0.abs().sum()) > 0

    manager = EmbeddingManager(clip, placeholder_strings=["*"], initializer_words=["sculpture"],
                               num_vectors_per_token=2)
    assert manager.is_clip
    assert int(manager.string_to_token_dict["*"]) == 265
    torch.testing.assert_close(manager.string_to_param_dict["*"].detach(), (row + pos0).expand(2, -1),
                               rtol=0, atol=1e-7)

    raw = EmbeddingManager(clip, placeholder_strings=["*"], initializer_words=["sculpture"],
                           clip_init_with_position=False)
    assert torch.equal(raw.string_to_param_dict["*"].detach(), row[None])
    assert torch.equal(raw.initial_embeddings["*"], row[None])


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_multi_token_placeholder_raises_official_message(bert):
    with pytest.raises(PlaceholderError) as e:
        EmbeddingManager(bert, placeholder_strings=["a photo"])
    assert str(e.value) == "String 'a photo' maps to more than a single token. Please use another string"


def test_multi_token_initializer_raises_official_message(bert):
    with pytest.raises(PlaceholderError) as e:
        EmbeddingManager(bert, placeholder_strings=["*"], initializer_words=["cat dog"])
    assert str(e.value) == "String 'cat dog' maps to more than a single token. Please use another string"


def test_multi_token_clip_placeholder_raises_official_message(clip):
    with pytest.raises(PlaceholderError) as e:
        EmbeddingManager(clip, placeholder_strings=["<cat-toy>"])
    assert str(e.value) == "String '<cat-toy>' maps to more than a single token. Please use another string"
    with pytest.raises(PlaceholderError, match="'two words' maps to more than a single token"):
        EmbeddingManager(clip, placeholder_strings=["*"], initializer_words=["two words"])


@pytest.mark.parametrize("placeholders", [[], None])
def test_no_placeholder_raises(bert, placeholders):
    with pytest.raises(PlaceholderError, match="placeholder"):
        EmbeddingManager(bert, placeholder_strings=placeholders)


def test_load_wrong_width_names_file_and_widths(bert, tmp_path):
    path = tmp_path / "wide.pt"
    write_official(EmbeddingSet({"*": torch.randn(1, 5)}, {"*": STAR}), path)
    manager = EmbeddingManager(bert, placeholder_strings=["*"])
    before = manager.string_to_param_dict["*"].detach().clone()
    with pytest.raises(PlaceholderError) as e:
        manager.load(path)
    msg = str(e.value)
    assert str(path) in msg and "5" in msg and str(DIM) in msg
    assert torch.equal(manager.string_to_param_dict["*"].detach(), before)  # nothing replaced


# ---------------------------------------------------------------------------------------------------
# Regulariser (docs/DIFFERENCES.md#regulariser-per-vector)
# ---------------------------------------------------------------------------------------------------


def _manager_with_offsets(bert, offsets: dict[str, torch.Tensor]) -> EmbeddingManager:
    words = {"*": "cat", "@": "dog"}
    names = list(offsets)
    k = next(iter(offsets.values())).shape[0]
    manager = EmbeddingManager(bert, placeholder_strings=names, initializer_words=[words[n] for n in names],
                               num_vectors_per_token=k)
    with torch.no_grad():
        for name, d in offsets.items():
            manager.string_to_param_dict[name].add_(d)
    return manager


def test_coarse_loss_single_vector_is_squared_distance_over_p(bert):
    d1, d2 = torch.randn(1, DIM), torch.randn(1, DIM)
    manager = _manager_with_offsets(bert, {"*": d1, "@": d2})
    loss = manager.embedding_to_coarse_loss()
    assert loss.shape == (1, 1)
    expected = (d1.pow(2).sum() + d2.pow(2).sum()) / 2
    torch.testing.assert_close(loss[0, 0], expected)
    torch.testing.assert_close(embedding_regularization(manager, "gram"), expected)
    torch.testing.assert_close(embedding_regularization(manager, "l2"), expected)


def test_coarse_loss_two_vectors_penalises_mean_offset(bert):
    d = torch.randn(2, DIM)
    manager = _manager_with_offsets(bert, {"*": d})
    gram = manager.embedding_to_coarse_loss()
    assert gram.shape == (2, 2)
    torch.testing.assert_close(gram, d @ d.T)
    torch.testing.assert_close(gram.mean(), d.mean(0).pow(2).sum())
    torch.testing.assert_close(embedding_regularization(manager, "gram"), d.mean(0).pow(2).sum())
    torch.testing.assert_close(embedding_regularization(manager, "l2"), d.pow(2).sum(-1).mean())


def test_l2_and_gram_differ_for_opposite_offsets(bert):
    v = torch.randn(DIM)
    d = torch.stack([v, -v])
    manager = _manager_with_offsets(bert, {"*": d, "@": d})
    gram = embedding_regularization(manager, "gram")
    l2 = embedding_regularization(manager, "l2")
    torch.testing.assert_close(gram, torch.tensor(0.0), atol=1e-6, rtol=0)
    # mean over vectors of ||d_i||^2, summed over P=2 placeholders, / P
    torch.testing.assert_close(l2, v.pow(2).sum())
    assert float(l2.detach()) > 1e-3


def test_regularizer_gradient_flows_to_the_vectors(bert):
    d = torch.randn(2, DIM)
    manager = _manager_with_offsets(bert, {"*": d})
    embedding_regularization(manager, "l2").backward()
    torch.testing.assert_close(manager.string_to_param_dict["*"].grad, 2 * d / 2)


def test_regularizer_without_initializers_is_zero(bert):
    manager = EmbeddingManager(bert, placeholder_strings=["*"])
    assert manager.embedding_to_coarse_loss() == 0
    assert float(embedding_regularization(manager, "l2")) == 0.0
    assert float(embedding_regularization(manager, "gram")) == 0.0


def test_regularizer_invalid_form(bert):
    manager = EmbeddingManager(bert, placeholder_strings=["*"], initializer_words=["cat"])
    with pytest.raises(ValueError, match="l1"):
        embedding_regularization(manager, "l1")


# ---------------------------------------------------------------------------------------------------
# Unmatched placeholder warning (CLIP glues punctuation: "*," is one token)
# ---------------------------------------------------------------------------------------------------


def test_warn_unmatched_glued_placeholder(clip, caplog):
    manager = EmbeddingManager(clip, placeholder_strings=["*"], initializer_words=["sculpture"])
    with caplog.at_level(logging.WARNING, logger="ldm.modules.embedding_manager"):
        manager.warn_unmatched(["a photo of *"])
    assert not caplog.records

    with caplog.at_level(logging.WARNING, logger="ldm.modules.embedding_manager"):
        manager.warn_unmatched(["*, trending on artstation"])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "'*'" in message and "*, trending on artstation" in message


def test_warn_unmatched_once_per_text(clip, caplog):
    manager = EmbeddingManager(clip, placeholder_strings=["*"])
    with caplog.at_level(logging.WARNING, logger="ldm.modules.embedding_manager"):
        manager.warn_unmatched(["*, trending on artstation", "*, trending on artstation"])
        manager.warn_unmatched(["*, trending on artstation"])
    assert len(caplog.records) == 1
