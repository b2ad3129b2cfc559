"""Parity of the Textual Inversion method with the reference on the tiny configs.

Groups of tests/fixtures/parity/README.md: (3) conditioning with 1 and 2 vectors per token,
(4) loss and gradient at fixed t and noise, shared_step on a real batch, two AdamW steps through
configure_optimizers. (Group 7, the dataset, is in test_personalized_data.py.)
"""

import json

import pytest
import torch
from conftest import PARITY_NAMES, assert_close, build_parity_model, fixture_path
from safetensors.torch import load_file


@pytest.fixture(scope="module", params=PARITY_NAMES)
def name(request):
    return request.param


@pytest.fixture(scope="module")
def models(name, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(name)
    return {nv: build_parity_model(name, tmp, num_vectors=nv) for nv in (1, 2)}


def fixture(name, file):
    return load_file(str(fixture_path("parity", name, file)))


def meta(name):
    return json.loads(fixture_path("parity", name, "meta.json").read_text())


def set_vectors(model, vectors):
    with torch.no_grad():
        model.embedding_manager.string_to_param_dict["*"].copy_(vectors)


def tokenize(model, prompts):
    cond = model.cond_stage_model
    if hasattr(cond, "tokenizer"):
        return cond.tokenizer(prompts, truncation=True, max_length=77, padding="max_length",
                              return_tensors="pt")["input_ids"]
    return cond.tknz_fn(prompts)


@pytest.mark.parametrize("nv", [1, 2])
@pytest.mark.parametrize("kind", ["init", "perturbed"])
def test_conditioning(name, models, nv, kind):
    model, prompts = models[nv], meta(name)["prompts"]
    f, emb = fixture(name, "conditioning.safetensors"), fixture(name, "embeddings.safetensors")
    if kind == "init":
        assert torch.equal(model.embedding_manager.string_to_param_dict["*"].detach(), emb[f"nv{nv}_init"])
    set_vectors(model, emb[f"nv{nv}_{kind}"])
    with torch.no_grad():
        cond = model.get_learned_conditioning(prompts)
        ids = tokenize(model, prompts)
        assert torch.equal(ids, f["tokens"])
        ids_after, _ = model.embedding_manager.substitute(ids.clone(), torch.zeros(*ids.shape, 16))
    assert torch.equal(ids_after, f[f"nv{nv}_{kind}_tokens_after_em"])
    assert_close(cond, f[f"nv{nv}_{kind}_cond"], what=f"nv{nv}_{kind}_cond")


def test_plain_prompts_and_uncond(name, models):
    model, prompts = models[1], meta(name)["prompts"]
    f = fixture(name, "conditioning.safetensors")
    with torch.no_grad():
        plain = model.get_learned_conditioning([p.replace("*", "sculpture") for p in prompts])
        uncond = model.get_learned_conditioning(["", ""])
    assert_close(plain, f["plain_prompt_sculpture_for_star_cond"], what="plain prompts")
    assert_close(uncond, f["uncond_2"], what="uncond")


@pytest.mark.parametrize("nv", [1, 2])
def test_loss_and_gradient(name, models, nv):
    model, m = models[nv], meta(name)
    f, emb = fixture(name, "training.safetensors"), fixture(name, "embeddings.safetensors")
    set_vectors(model, emb[f"nv{nv}_perturbed"])
    model.zero_grad(set_to_none=True)
    x_start, t, noise = f["x_start"], f["t"], f["noise"]
    c = model.get_learned_conditioning(m["train_captions"])
    assert_close(c.detach(), f[f"nv{nv}_cond"], what="cond")
    assert_close(model.q_sample(x_start, t, noise), f[f"nv{nv}_x_noisy"], what="x_noisy")
    loss, loss_dict = model.p_losses(x_start, c, t, noise=noise)
    loss.backward()
    assert_close(loss.detach(), f[f"nv{nv}_loss"], what="loss")
    for key, value in m["losses"][f"nv{nv}"].items():
        assert_close(loss_dict[key].detach(), torch.tensor(value), what=key)
    grad = model.embedding_manager.string_to_param_dict["*"].grad
    assert_close(grad, f[f"nv{nv}_grad"], what="grad")
    with torch.no_grad():
        eps = model.apply_model(f[f"nv{nv}_x_noisy"], t, c)
        assert_close(eps, f[f"nv{nv}_eps_pred"], what="eps_pred")
        reg = model.embedding_manager.embedding_to_coarse_loss()
    assert_close(reg, f[f"nv{nv}_embedding_to_coarse_loss"], what="embedding_to_coarse_loss")


def test_shared_step_on_a_batch(name, models):
    model, m = models[1], meta(name)
    f, emb = fixture(name, "training.safetensors"), fixture(name, "embeddings.safetensors")
    batch = {"image": f["shared_step_image"], "caption": m["losses"]["shared_step_captions"]}
    for seeded in (False, True):
        set_vectors(model, emb["nv1_perturbed"])
        model.zero_grad(set_to_none=True)
        if seeded:  # the reference's draws, in order: posterior sample (CPU), t, noise
            torch.manual_seed(406)
            loss, _ = model.shared_step(batch)
        else:
            loss, _ = model.shared_step(batch, posterior_noise=f["shared_step_posterior_noise"],
                                        t=f["shared_step_t"], noise=f["shared_step_noise"])
        loss.backward()
        assert_close(loss.detach(), f["shared_step_loss"], what=f"shared_step loss (seeded={seeded})")
        assert_close(model.embedding_manager.string_to_param_dict["*"].grad, f["shared_step_grad"], what="grad")


def test_two_adamw_steps(name, models):
    model, m = models[1], meta(name)
    f, emb = fixture(name, "training.safetensors"), fixture(name, "embeddings.safetensors")
    set_vectors(model, emb["nv1_perturbed"])
    model.learning_rate = m["losses"]["adamw"]["lr"]
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    for key, value in m["losses"]["adamw"]["defaults"].items():
        assert opt.defaults[key] == (tuple(value) if isinstance(value, list) else value), key
    param = model.embedding_manager.string_to_param_dict["*"]
    for k in range(2):
        torch.manual_seed(450 + k)
        t = torch.randint(0, 1000, (2,))
        noise = torch.randn_like(f["x_start"])
        assert torch.equal(t, f[f"adamw_step{k}_t"]) and torch.equal(noise, f[f"adamw_step{k}_noise"])
        opt.zero_grad()
        loss, _ = model.p_losses(f["x_start"], model.get_learned_conditioning(m["train_captions"]), t, noise=noise)
        loss.backward()
        assert_close(loss.detach(), torch.tensor(m["losses"]["adamw"]["step_losses"][k]), what=f"loss {k}")
        assert_close(param.grad, f[f"adamw_step{k}_grad"], what=f"grad {k}")
        opt.step()
        assert_close(param.detach(), f[f"adamw_step{k}_param_after"], what=f"param after step {k}")
