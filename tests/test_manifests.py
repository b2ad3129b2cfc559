"""Acceptance: the full-size models built from the official configs have exactly the checkpoint layout.

Built on the meta device (no memory, no weights) and compared key by key with the state-dict manifests
of the reference (tests/fixtures/manifests), including dtypes and which parameters are trainable.
"""

import json

import pytest
import torch
from conftest import REPO, fixture_path
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

CASES = [
    ("configs/latent-diffusion/txt2img-1p4B-finetune.yaml", "ldm_txt2img_1p4B.json", "bert-base-uncased"),
    ("configs/stable-diffusion/v1-inference.yaml", "sd_v1.json", "clip"),
    ("configs/stable-diffusion/v1-finetune.yaml", "sd_v1.json", "clip"),
]


@pytest.mark.parametrize("config,manifest,tokenizer", CASES, ids=[c[0].split("/")[-1] for c in CASES])
def test_full_model_matches_manifest(config, manifest, tokenizer):
    spec = json.loads(fixture_path("manifests", manifest).read_text())["keys"]
    cfg = OmegaConf.load(REPO / config)
    cfg.model.params.cond_stage_config.params = cfg.model.params.cond_stage_config.get("params") or {}
    cfg.model.params.cond_stage_config.params.tokenizer_path = str(fixture_path("tokenizers", tokenizer))
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
    ours = {k: v for k, v in model.state_dict().items()}
    # the manifest names the embedding-manager entries by the placeholder pattern "*": ours use "*" too
    assert sorted(ours) == sorted(spec)
    # the parameters, and BERT's unused logits head, which holds no parameters (x_transformer.LogitsHead)
    params = model.state_dict(keep_vars=True)
    for key, entry in spec.items():
        assert list(ours[key].shape) == entry["shape"], key
        assert str(ours[key].dtype).removeprefix("torch.") == entry["dtype"], key
        if entry["kind"] == "param":
            assert params[key].requires_grad == entry["requires_grad"], key
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == spec["embedding_manager.string_to_param_dict.*"]["shape"][1]
