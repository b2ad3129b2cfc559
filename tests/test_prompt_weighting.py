"""Prompt weighting (`ldm/prompt_weighting.py`): the A1111 syntax, and scaling of the text encoder's output
at exactly the weighted words' positions for BERT (LDM) and CLIP (SD), with one- and three-vector
placeholders, padding and truncation."""

import pytest
import torch
from conftest import build_parity_model

from ldm.prompt_weighting import (
    ROUND,
    SQUARE,
    expand_like_manager,
    parse_weights,
    position_weights,
    token_weights,
    weighted_conditioning,
)


@pytest.mark.parametrize("text,expected", [
    ("a photo of *", [("a photo of *", 1.0)]),
    ("a photo of (*:1.5)", [("a photo of ", 1.0), ("*", 1.5)]),
    ("a (photo) of [*]", [("a ", 1.0), ("photo", ROUND), (" of ", 1.0), ("*", SQUARE)]),
    ("((a)) [[b]]", [("a", ROUND * ROUND), (" ", 1.0), ("b", SQUARE * SQUARE)]),
    ("((a:2) b)", [("a", 2 * ROUND), (" b", ROUND)]),
    ("(a [b] c:0.5)", [("a ", 0.5), ("b", 0.5 * SQUARE), (" c", 0.5)]),
    ("(a: 1.25 ) (b:-.5)", [("a", 1.25), (" ", 1.0), ("b", -0.5)]),
    (r"\(a\) \[b\] c\\d", [(r"(a) [b] c\d", 1.0)]),
    ("a ) b ] c :1.2) d", [("a ) b ] c :1.2) d", 1.0)]),
    ("a (b", [("a ", 1.0), ("b", ROUND)]),
    ("(a:b)", [("a:b", ROUND)]),
    ("a () b", [("a  b", 1.0)]),
    ("", []),
])
def test_syntax(text, expected):
    assert parse_weights(text) == expected


MODELS = [("ldm_tiny", 1), ("ldm_tiny", 3), ("sd_tiny", 1), ("sd_tiny", 3)]


@pytest.fixture(scope="module", params=MODELS, ids=[f"{n}-nv{k}" for n, k in MODELS])
def model(request, tmp_path_factory):
    name, vectors = request.param
    m = build_parity_model(name, tmp_path_factory.mktemp(name), num_vectors=vectors).eval()
    if vectors > 1:  # distinct vectors, so a shifted or missing position shows
        with torch.no_grad():
            p = m.embedding_manager.string_to_param_dict["*"]
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    return m


def encode(model, prompts, **kwargs):
    with torch.no_grad():
        return weighted_conditioning(model, prompts, **kwargs)


def plain(model, prompts):
    with torch.no_grad():
        return model.get_learned_conditioning(prompts)


def placeholder_positions(model, prompt):
    """The positions of '*' in the encoder's sequence, from the embedding manager's own expansion."""
    manager, cond = model.embedding_manager, model.cond_stage_model
    ids = cond.tokenize([prompt]) if hasattr(cond, "tokenize") else cond.tknz_fn([prompt])
    expanded, _ = manager.substitute(ids, torch.zeros((*ids.shape, manager.token_dim)))
    return torch.nonzero(expanded[0] == int(manager.string_to_token_dict["*"])).flatten().tolist()


PROMPTS = ["a photo of *", "a sculpture of * on the beach", "", "* * a painting, with commas: and colons"]


def test_unweighted_prompts_give_todays_conditioning_bitwise(model):
    assert torch.equal(encode(model, PROMPTS), plain(model, PROMPTS))


def test_weight_one_is_the_word_itself(model):
    assert torch.equal(encode(model, ["a photo of (*:1.0)", "(a (sculpture:1.0):1) of *"]),
                       plain(model, ["a photo of *", "a sculpture of *"]))


def test_a_weight_scales_exactly_the_placeholder_positions(model):
    vectors = model.embedding_manager.string_to_param_dict["*"].shape[0]
    base, ours = plain(model, ["a photo of *"])[0], encode(model, ["a photo of (*:1.5)"])[0]
    where = placeholder_positions(model, "a photo of *")
    assert where == list(range(4, 4 + vectors))  # [BOS] a photo of *
    assert torch.equal(ours[where], base[where] * 1.5)
    others = [i for i in range(base.shape[0]) if i not in where]
    assert torch.equal(ours[others], base[others])


def test_a_weighted_word_after_a_multi_vector_placeholder_moves_with_it(model):
    """'photo' follows the k vectors of '*': its weight lands k - 1 positions further right."""
    vectors = model.embedding_manager.string_to_param_dict["*"].shape[0]
    base, ours = plain(model, ["a * photo"])[0], encode(model, ["a * (photo:2)"])[0]
    photo = 2 + vectors  # [BOS] a *(k) photo
    changed = torch.nonzero((ours != base).any(-1)).flatten().tolist()
    assert changed == [photo]
    assert torch.equal(ours[photo], base[photo] * 2)


def test_several_words_and_prompts_in_one_batch(model):
    prompts = ["(a:0.5) [photo] of *", "a photo of *", "((*)) and (* :3)"]
    w = position_weights(model, [parse_weights(p) for p in prompts])
    base = plain(model, [p.replace("(", "").replace(")", "").replace("[", "").replace("]", "")
                         .replace(":0.5", "").replace(" :3", "") for p in prompts])
    ours = encode(model, prompts)
    assert torch.equal(ours[1], base[1]) and (w[1] == 1).all()
    k = model.embedding_manager.string_to_param_dict["*"].shape[0]
    assert w[0, 1].item() == 0.5 and w[0, 2].item() == SQUARE and (w[0, 3:] == 1).all()
    assert w[2, 1:1 + k].tolist() == [ROUND * ROUND] * k and w[2, 2 + k:2 + 2 * k].tolist() == [3.0] * k
    torch.testing.assert_close(ours, base * w[..., None].float(), rtol=1e-6, atol=0)


def test_truncation(model):
    """A weighted word past the encoder's length has no effect; one cut by the expansion keeps the weight on
    the positions that remain."""
    n = plain(model, ["x"]).shape[1]
    long_prompt = " ".join(["photo"] * (n + 5))
    assert torch.equal(encode(model, [long_prompt + " (*:2)"]), plain(model, [long_prompt + " *"]))
    k = model.embedding_manager.string_to_param_dict["*"].shape[0]
    head = " ".join(["photo"] * (n - 3))  # [BOS] photo x (n - 3), then '*' at n - 2
    text = head + " * photo photo"
    where = placeholder_positions(model, text)
    assert where == list(range(n - 2, min(n, n - 2 + k)))
    base, ours = plain(model, [text])[0], encode(model, [head + " (*:0.25) photo photo"])[0]
    assert torch.equal(ours[where], base[where] * 0.25)
    others = [i for i in range(n) if i not in where]
    assert torch.equal(ours[others], base[others])


def test_expansion_matches_the_embedding_manager_also_for_progressive_words(model):
    """The weights' expansion uses the manager's vector count, incl. progressive words' counter."""
    from ldm.modules.embedding_manager import PROGRESSIVE_SCALE

    manager = model.embedding_manager
    ids, weights = token_weights(model.cond_stage_model, [parse_weights("a (*:2) and *, (photo:3)")])
    saved = (manager.progressive_words, manager.progressive_counter)
    try:
        if manager.max_vectors_per_token > 1:
            manager.progressive_words, manager.progressive_counter = True, PROGRESSIVE_SCALE - 1  # k = 2
        mine, w = expand_like_manager(manager, ids, weights)
        with torch.no_grad():
            theirs, _ = manager.substitute(ids, torch.zeros((*ids.shape, manager.token_dim)))
        assert torch.equal(mine, theirs)
        token = int(manager.string_to_token_dict["*"])
        k = 1 if manager.max_vectors_per_token == 1 else 2
        assert (w[mine == token] == 2).sum() == k and (w == 3).sum() == 1
    finally:
        manager.progressive_words, manager.progressive_counter = saved


def test_restore_mean_keeps_each_prompts_mean(model):
    prompts = ["a photo of (*:1.5)", "a (sculpture:0.5) of *"]
    ours = encode(model, prompts, restore_mean=True).double()
    base = plain(model, [p.replace("(", "").replace(")", "").replace(":1.5", "").replace(":0.5", "")
                         for p in prompts]).double()
    torch.testing.assert_close(ours.mean(dim=(1, 2)), base.mean(dim=(1, 2)), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ours, encode(model, prompts).double())


def test_weighting_needs_a_known_text_encoder():
    class Other:
        cond_stage_model = torch.nn.Identity()
        embedding_manager = None

        def get_learned_conditioning(self, texts):
            return torch.zeros(len(texts), 4, 2)

    assert encode(Other(), ["a photo"]).shape == (1, 4, 2)  # unweighted: passed through
    with pytest.raises(ValueError, match="BERT .* or CLIP"):
        encode(Other(), ["a (photo)"])
