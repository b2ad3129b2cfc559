"""Issue 7 acceptance 3: each speed/memory switch keeps the numerics of a training step (tiny configs)."""

import copy
import json

import pytest
import torch
from conftest import PARITY_NAMES, assert_close, build_parity_model, fixture_path
from safetensors.torch import load_file

from ldm.modules.frozen_weights import UpcastBuffer, store_frozen_weights


@pytest.fixture(scope="module", params=PARITY_NAMES)
def case(request, tmp_path_factory):
    name = request.param
    model = build_parity_model(name, tmp_path_factory.mktemp(name))
    f = load_file(str(fixture_path("parity", name, "training.safetensors")))
    captions = json.loads(fixture_path("parity", name, "meta.json").read_text())["losses"]["shared_step_captions"]
    batch = {"image": f["shared_step_image"], "caption": captions}
    vectors = load_file(str(fixture_path("parity", name, "embeddings.safetensors")))["nv1_perturbed"]
    with torch.no_grad():
        model.embedding_manager.string_to_param_dict["*"].copy_(vectors)
    return model, batch, f, name


def with_options(model, name, **options):
    """The same model (weights and vectors) built with model options (`model.params.<option>`)."""
    from conftest import parity_config

    from ldm.util import instantiate_from_config

    cfg = parity_config(name)
    cfg.model.params.update(options)
    other = instantiate_from_config(cfg.model)
    other.load_state_dict(model.state_dict(), strict=True)
    return other


def step(model, batch, f):
    """Loss and embedding gradient of one training step with fixed randomness."""
    model.zero_grad(set_to_none=True)
    loss, _ = model.shared_step(batch, posterior_noise=f["shared_step_posterior_noise"], t=f["shared_step_t"],
                                noise=f["shared_step_noise"])
    loss.backward()
    return loss.detach(), model.embedding_manager.string_to_param_dict["*"].grad.clone()


def test_cached_latents_match_uncached(case):
    model, batch, f, _ = case
    cache = model.latent_cache
    assert cache is not None  # on by default for textual inversion
    model.latent_cache = None
    ref_loss, ref_grad = step(model, batch, f)
    model.latent_cache = cache
    for _ in range(2):  # first call fills the cache, the second one hits it
        loss, grad = step(model, batch, f)
        assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    assert cache.hits >= 2 and len(cache) == 2
    assert_close(loss, f["shared_step_loss"], what="loss vs reference")


def test_sdpa_attention_matches_math(case):
    model, batch, f, name = case
    ref_loss, ref_grad = step(model, batch, f)
    fused = with_options(model, name, attention="sdpa")
    kernels = {m.attention for m in fused.modules() if hasattr(m, "attention") and isinstance(m.attention, str)}
    assert kernels == {"sdpa"}
    loss, grad = step(fused, batch, f)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, what="loss")
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7, what="grad")


def test_gradient_checkpointing_matches(case):
    model, batch, f, name = case
    ref_loss, ref_grad = step(model, batch, f)
    checkpointed = with_options(model, name, gradient_checkpointing=True)
    unet = checkpointed.model.diffusion_model
    assert unet.gradient_checkpointing and all(b.checkpoint for b in unet.modules() if hasattr(b, "checkpoint")
                                               and isinstance(b.checkpoint, bool))
    loss, grad = step(checkpointed, batch, f)
    assert_close(loss, ref_loss, rtol=1e-6, atol=0, what="loss")
    assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8, what="grad")


def unet_convs_channels_last(model) -> list[bool]:
    return [m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
            for m in model.model.diffusion_model.modules() if isinstance(m, torch.nn.Conv2d)
            and m.weight.shape[-1] > 1]


def test_channels_last_matches(case):
    model, batch, f, name = case
    ref_loss, ref_grad = step(model, batch, f)
    nhwc = with_options(model, name, channels_last=True)
    assert all(unet_convs_channels_last(nhwc)) and not any(unet_convs_channels_last(model))
    loss, grad = step(nhwc, batch, f)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, what="loss")
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7, what="grad")


def test_channels_last_after_a_checkpoint_load_and_with_16bit_weights(case, tmp_path):
    """A model built from a checkpoint (meta device, tensors assigned from the file) is channels-last after
    the load; 16-bit stored weights stay channels-last and are upcast in that layout, same step."""
    model, batch, f, name = case
    from conftest import parity_config

    from ldm.util import instantiate_from_config

    path = tmp_path / "base.ckpt"
    torch.save({"state_dict": {k: v for k, v in model.state_dict().items()
                               if not k.startswith("embedding_manager.")}}, path)
    built = {}
    for layout in (False, True):
        cfg = parity_config(name)
        cfg.model.params.update(ckpt_path=str(path), frozen_weights="fp16", channels_last=layout)
        built[layout] = instantiate_from_config(cfg.model)
        with torch.no_grad():
            built[layout].embedding_manager.string_to_param_dict["*"].copy_(
                model.embedding_manager.string_to_param_dict["*"])
    assert all(unet_convs_channels_last(built[True])) and not any(unet_convs_channels_last(built[False]))
    weight = next(m.weight for m in built[True].model.diffusion_model.modules()
                  if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    assert weight.dtype == torch.float16
    upcast = UpcastBuffer().upcast(weight, torch.float32)
    assert upcast.is_contiguous(memory_format=torch.channels_last) and torch.equal(upcast, weight.float())
    ref_loss, ref_grad = step(built[False], batch, f)
    loss, grad = step(built[True], batch, f)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, what="loss")
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7, what="grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_frozen_weights_compute_in_fp32_with_rounded_weights(case, dtype):
    """16-bit storage changes the weights (rounded) and nothing else: the step equals an fp32 model whose frozen
    weights were rounded to that dtype, and the frozen weights take half the memory."""
    model, batch, f, _ = case
    rounded = copy.deepcopy(model)
    stored = copy.deepcopy(model)
    frozen_bytes = sum(p.numel() * p.element_size() for p in stored.parameters() if not p.requires_grad)
    converted = store_frozen_weights(stored, dtype)
    assert converted > 20
    stored_bytes = sum(p.numel() * p.element_size() for p in stored.parameters() if not p.requires_grad)
    assert stored_bytes < 0.55 * frozen_bytes
    assert list(stored.state_dict()) == list(model.state_dict())
    vector = stored.embedding_manager.string_to_param_dict["*"]
    assert vector.dtype == torch.float32 and vector.requires_grad
    with torch.no_grad():  # the fp32 model gets exactly the rounded weights
        for p, q in zip(rounded.parameters(), stored.parameters(), strict=True):
            p.copy_(q.float())
    ref_loss, ref_grad = step(rounded, batch, f)
    loss, grad = step(stored, batch, f)
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7, what="loss")
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7, what="grad")
    fp32_loss, _ = step(model, batch, f)
    assert not torch.equal(loss, fp32_loss)  # the weights really are rounded


def test_stored_layers_upcast_into_one_reused_buffer(case):
    """Every stored layer of one conversion upcasts into the same scratch tensor, which grows to the largest
    weight a step uses and is not allocated again on later steps."""
    model, batch, f, _ = case
    stored = copy.deepcopy(model)
    store_frozen_weights(stored, torch.float16)
    buffers = {id(m.upcast_buffer) for m in stored.modules() if hasattr(m, "upcast_buffer")}
    assert len(buffers) == 1
    buffer = next(m.upcast_buffer for m in stored.modules() if hasattr(m, "upcast_buffer"))
    step(stored, batch, f)
    first = buffer._data.data_ptr()
    largest = max(m.weight.numel() for m in stored.modules() if hasattr(m, "upcast_buffer")
                  and not isinstance(m, torch.nn.Embedding))
    assert 0 < buffer._data.numel() <= largest and buffer._data.dtype == torch.float32
    step(stored, batch, f)
    assert buffer._data.data_ptr() == first


def test_frozen_weights_config_stores_while_building_and_rejects_trainable_models():
    from conftest import parity_config

    from ldm.util import instantiate_from_config

    cfg = parity_config("ldm_tiny")
    cfg.model.params.frozen_weights = "bf16"
    model = instantiate_from_config(cfg.model)
    assert model.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert model.cond_stage_model.transformer.token_emb.weight.dtype == torch.bfloat16
    assert model.embedding_manager.string_to_param_dict["*"].dtype == torch.float32
    assert model.embedding_manager.initial_embeddings["*"].dtype == torch.float32
    cfg.model.params.unfreeze_model = True
    with pytest.raises(ValueError, match="unfreeze_model"):
        instantiate_from_config(cfg.model)
    cfg.model.params.unfreeze_model = False
    del cfg.model.params.personalization_config
    vanilla = instantiate_from_config(cfg.model)  # storing the frozen weights is fine for sampling ...
    assert vanilla.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.bfloat16
    vanilla.learning_rate = 1e-4
    with pytest.raises(ValueError, match="personalization_config"):  # ... but leaves nothing to train
        vanilla.configure_optimizers()
