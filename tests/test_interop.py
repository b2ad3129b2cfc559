"""Acceptance: an SD embedding exported by this project loads with diffusers' `load_textual_inversion` into a
tiny StableDiffusionPipeline built from the same text-encoder weights, with equal prompt embeddings."""

import copy

import pytest
import torch
from conftest import build_parity_model, fixture_path

from ldm.modules.embedding_formats import EmbeddingSet, write_format

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (requirements-lock.txt)")


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return build_parity_model("sd_tiny", tmp_path_factory.mktemp("sd"), num_vectors=2)


def tiny_pipeline(text_encoder):
    from transformers import CLIPTokenizer

    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2)
    vae = diffusers.AutoencoderKL(block_out_channels=[32], in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"])
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=copy.deepcopy(text_encoder), unet=unet, scheduler=diffusers.DDIMScheduler(),
        tokenizer=CLIPTokenizer.from_pretrained(str(fixture_path("tokenizers", "clip"))),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def diffusers_embeds(pipe, prompt):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]


@pytest.mark.parametrize("k", [1, 2])
# The official .pt pickles an nn.ParameterDict (what the reference's own loader needs); diffusers reads .pt
# with weights_only=True and refuses that class, so exports for diffusers use its own layout (or A1111's).
@pytest.mark.parametrize("fmt,suffix", [("diffusers", ".safetensors"), ("diffusers", ".bin"), ("a1111", ".pt"),
                                        ("a1111", ".safetensors")])
def test_diffusers_loads_our_export(ours, tmp_path, fmt, suffix, k):
    torch.manual_seed(k)
    vectors = torch.randn(k, 16)
    with torch.no_grad():
        ours.embedding_manager.string_to_param_dict["*"].data = vectors.clone()
        expected = ours.get_learned_conditioning(["a photo of * on the beach"])
    path = tmp_path / f"learned_embeds{suffix}"
    placeholder = "<my-concept>" if fmt == "diffusers" else "*"
    write_format(EmbeddingSet({placeholder: vectors}, {placeholder: 265}), path, fmt)
    pipe = tiny_pipeline(ours.cond_stage_model.transformer.text_model)
    token = None if fmt == "diffusers" else "<my-concept>"
    pipe.load_textual_inversion(str(path), token=token)
    got = diffusers_embeds(pipe, "a photo of <my-concept> on the beach")
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5
