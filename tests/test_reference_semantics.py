"""Reference semantics of the embedding manager in training, on the tiny parity models (issue #17):
an absent placeholder's AdamW update (docs/DIFFERENCES.md#absent-placeholder-update), the
`max_vectors_per_token` cap (#max-vectors-cap) and the regulariser's default form (#regulariser-per-vector).
"""

import logging
import math

import pytest
import torch
from conftest import PARITY_NAMES, parity_config, parity_weights
from safetensors.torch import load_file

from ldm.models.diffusion.textual_inversion import embedding_regularization
from ldm.modules.embedding_formats import EmbeddingSet, write_official
from ldm.util import instantiate_from_config


@pytest.fixture(scope="module")
def base_ckpts(tmp_path_factory):
    """{name: base checkpoint (everything but the embedding manager)}, written on first use."""
    root, made = tmp_path_factory.mktemp("base"), {}

    def get(name):
        if name not in made:
            sd = load_file(str(parity_weights(name)))
            made[name] = root / f"{name}_base.ckpt"
            torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("embedding_manager.")}},
                       made[name])
        return made[name]

    return get


def build(base_ckpts, name, model_params=None, **personalization):
    """The tiny model as conftest.build_parity_model builds it, with edited model and personalization params."""
    cfg = parity_config(name)
    cfg.model.params.personalization_config.params.update(personalization)
    cfg.model.params.update(model_params or {})
    cfg.model.params.ckpt_path = str(base_ckpts(name))
    torch.manual_seed(0)
    return instantiate_from_config(cfg.model)


def fixed_draws(seed, batch=2):
    gen = torch.Generator().manual_seed(seed)
    x_start = torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x_start, t, torch.randn(batch, 4, 8, 8, generator=gen)


def adamw_by_hand(p0, grads, lr, betas, eps, weight_decay):
    """torch.optim.AdamW (amsgrad off) in float64: decoupled decay p *= 1 - lr*wd, then the bias-corrected
    step; a None gradient skips the step entirely (decay included), as torch does."""
    p, step = p0.double().clone(), 0
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    b1, b2 = betas
    out = []
    for g in grads:
        if g is not None:
            g = g.double()
            step += 1
            p = p * (1 - lr * weight_decay)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            denom = (v.sqrt() / math.sqrt(1 - b2**step)) + eps
            p = p - lr / (1 - b1**step) * m / denom
        out.append(p.clone())
    return out


# ---------------------------------------------------------------------------------------------------
# 1. A placeholder absent from the batch (docs/DIFFERENCES.md#absent-placeholder-update)
# ---------------------------------------------------------------------------------------------------

STEP_CAPTIONS = (["a photo of * next to a @", "a @ and a * in the snow"],  # step 1: both placeholders
                 ["a photo of a *", "a rendering of the *"])               # step 2: no '@'


@pytest.mark.parametrize("name", PARITY_NAMES)
@pytest.mark.parametrize("nv", [1, 2])
def test_absent_placeholder_adamw_update(base_ckpts, name, nv):
    """Two placeholders trained at once through the real optimizer; step 2's captions lack '@'.
    Single-vector mode (reference): '@' gets a zero gradient, and AdamW still moves it (weight decay and
    the step-1 momentum). Multi-vector mode (reference): '@' is skipped, its gradient is None and AdamW
    leaves it unchanged."""
    model = build(base_ckpts, name, placeholder_strings=["*", "@"], initializer_words=["sculpture", "painting"],
                  num_vectors_per_token=nv)
    manager = model.embedding_manager
    model.learning_rate = 0.01
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.01  # torch's default
    params = dict(manager.string_to_param_dict.items())
    start = {k: p.detach().clone() for k, p in params.items()}
    grads = {k: [] for k in params}
    after = {k: [] for k in params}
    for step, captions in enumerate(STEP_CAPTIONS):
        opt.zero_grad()
        x_start, t, noise = fixed_draws(100 + step)
        loss, _ = model.p_losses(x_start, model.get_learned_conditioning(captions), t, noise=noise)
        loss.backward()
        for k, p in params.items():
            grads[k].append(None if p.grad is None else p.grad.detach().clone())
            assert step == 1 or float(grads[k][-1].abs().max()) > 0, k  # step 1: both present, real gradients
        opt.step()
        for k, p in params.items():
            after[k].append(p.detach().clone())

    if nv == 1:
        assert grads["@"][1] is not None and torch.equal(grads["@"][1], torch.zeros_like(start["@"]))
        assert not torch.equal(after["@"][1], after["@"][0])  # moved on a batch without '@'
    else:
        assert grads["@"][1] is None
        assert torch.equal(after["@"][1], after["@"][0])  # skipped: no decay, no momentum step
    # The reference's gradients for '@' at step 2: zero (single-vector) or None (multi-vector), not the
    # recorded ones, so the update is checked against the reference rule itself.
    grads["@"][1] = torch.zeros_like(start["@"]) if nv == 1 else None
    group = opt.param_groups[0]
    for k in params:
        expected = adamw_by_hand(start[k], grads[k], group["lr"], group["betas"], group["eps"],
                                 group["weight_decay"])
        for step in range(2):
            torch.testing.assert_close(after[k][step].double(), expected[step], rtol=1e-6, atol=1e-7,
                                       msg=f"'{k}' after step {step + 1}")


# ---------------------------------------------------------------------------------------------------
# 2. max_vectors_per_token caps the vectors used (docs/DIFFERENCES.md#max-vectors-cap)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PARITY_NAMES)
def test_max_vectors_per_token_caps_a_longer_file(base_ckpts, name, tmp_path, caplog):
    """A 4-vector file under num_vectors_per_token: 2 inserts its first 2 vectors, as the reference's
    min(rows, max_vectors_per_token): the token layout has two slots, and the conditioning is that of the
    2-vector table."""
    model = build(base_ckpts, name, num_vectors_per_token=2)
    manager = model.embedding_manager
    token = int(manager.string_to_token_dict["*"])
    vectors = torch.randn(4, manager.token_dim, generator=torch.Generator().manual_seed(7))
    write_official(EmbeddingSet({"*": vectors}, {"*": token}), tmp_path / "four.pt")
    with caplog.at_level(logging.WARNING, logger="ldm.modules.embedding_manager"):
        manager.load(tmp_path / "four.pt")
    assert "only the first 2 are used" in caplog.text
    assert manager.string_to_param_dict["*"].shape == (4, manager.token_dim)  # the table is kept whole

    prompts = ["a photo of *", "a * and a * in the snow"]
    cond = model.cond_stage_model
    if hasattr(cond, "tokenizer"):
        ids = cond.tokenizer(prompts, truncation=True, max_length=77, padding="max_length",
                             return_tensors="pt")["input_ids"]
    else:
        ids = cond.tknz_fn(prompts)
    embedded = torch.zeros(*ids.shape, manager.token_dim)
    with torch.no_grad():
        new_ids, out = manager.substitute(ids, embedded)
        capped = model.get_learned_conditioning(prompts)
    assert (new_ids == token).sum(1).tolist() == [2, 4]  # two slots per occurrence, not four
    slots = new_ids == token
    assert torch.equal(out[slots], vectors[:2].repeat(3, 1))

    manager.set_embeddings(EmbeddingSet({"*": vectors[:2].clone()}, {"*": token}))
    with torch.no_grad():
        assert torch.equal(capped, model.get_learned_conditioning(prompts))


# ---------------------------------------------------------------------------------------------------
# 3. The regulariser's default is the reference's Gram form (docs/DIFFERENCES.md#regulariser-per-vector)
# ---------------------------------------------------------------------------------------------------


def test_default_regulariser_is_the_reference_gram_mean(base_ckpts):
    """Default model, k = 2 vectors: loss_emb_reg is the mean of the [2, 2] Gram matrix of (p - p0), i.e.
    the reference's embedding_to_coarse_loss().mean(); "l2" stays available and differs."""
    model = build(base_ckpts, "ldm_tiny", model_params={"embedding_reg_weight": 0.5}, num_vectors_per_token=2)
    manager = model.embedding_manager
    assert model.embedding_reg_form == "gram"
    d = torch.randn(2, manager.token_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        manager.string_to_param_dict["*"].add_(d)
    d = d.double()
    gram = [[float(d[i] @ d[j]) for j in range(2)] for i in range(2)]  # P = 1 initialised placeholder
    by_hand = sum(map(sum, gram)) / 4
    per_vector = float((d * d).sum(1).mean())
    assert abs(by_hand - per_vector) > 1e-3  # the two forms really differ here

    model.train()
    x_start, t, noise = fixed_draws(5)
    loss, loss_dict = model.p_losses(x_start, model.get_learned_conditioning(["a photo of *"] * 2), t, noise=noise)
    assert loss_dict["train/loss_emb_reg"].item() == pytest.approx(by_hand, rel=1e-5)
    assert loss.item() == pytest.approx(loss_dict["train/loss_simple"].item() + 0.5 * by_hand, rel=1e-5)
    assert embedding_regularization(manager).item() == pytest.approx(by_hand, rel=1e-5)
    assert embedding_regularization(manager, "l2").item() == pytest.approx(per_vector, rel=1e-5)

    l2_model = build(base_ckpts, "ldm_tiny", model_params={"embedding_reg_weight": 0.5, "embedding_reg_form": "l2"},
                     num_vectors_per_token=2)
    with torch.no_grad():
        l2_model.embedding_manager.string_to_param_dict["*"].add_(d.float())
    _, l2_dict = l2_model.p_losses(x_start, l2_model.get_learned_conditioning(["a photo of *"] * 2), t, noise=noise)
    assert l2_dict["train/loss_emb_reg"].item() == pytest.approx(per_vector, rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# 4. The progressive-words counter in checkpoints (docs/DIFFERENCES.md#progressive-counter-resumed);
#    the end-to-end resume is tests/test_main.py::test_progressive_resume_is_exact
# ---------------------------------------------------------------------------------------------------


def test_progressive_counter_checkpoint_hooks_and_old_checkpoints(base_ckpts):
    from ldm.models.diffusion.textual_inversion import PROGRESSIVE_COUNTER_KEY

    prog = dict(num_vectors_per_token=3, progressive_words=True)
    model = build(base_ckpts, "ldm_tiny", **prog)
    model.embedding_manager.progressive_counter = 4321
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint[PROGRESSIVE_COUNTER_KEY] == 4321
    assert set(checkpoint["state_dict"]) == {k for k in model.state_dict() if k.startswith("embedding_manager.")}

    fresh = build(base_ckpts, "ldm_tiny", **prog)
    fresh.on_load_checkpoint(dict(checkpoint))
    assert fresh.embedding_manager.progressive_counter == 4321
    old = {k: v for k, v in checkpoint.items() if k != PROGRESSIVE_COUNTER_KEY}  # written before the counter
    older = build(base_ckpts, "ldm_tiny", **prog)
    older.on_load_checkpoint(old)
    assert older.embedding_manager.progressive_counter == 0  # the reference's restart
    older.load_state_dict(old["state_dict"])  # the slim state dict was completed as before
