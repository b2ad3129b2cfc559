"""Acceptance: every config under configs/ resolves all its targets and builds with tiny overrides."""

from pathlib import Path

import pytest
import torch
from conftest import REPO, fixture_path
from omegaconf import OmegaConf

from ldm.util import get_obj_from_str, instantiate_from_config

CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))
#: Partial configs merged on top of a base (`--base base.yaml overlay.yaml`), tested merged.
OVERLAYS = {f"configs/toy/ldm_stage{k}.yaml": "configs/toy/ldm.yaml" for k in (1, 2)}
OVERLAYS["configs/recipes/fast.yaml"] = "configs/latent-diffusion/txt2img-1p4B-finetune.yaml"  # any base fits

TINY_UNET = {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [1], "num_res_blocks": 1,
             "num_heads": 2, "context_dim": 16}
TINY_DD = {"ch": 32, "ch_mult": [1, 1, 1, 2], "num_res_blocks": 1, "resolution": 64}


def load(path):
    cfg = OmegaConf.load(REPO / path)
    return OmegaConf.merge(OmegaConf.load(REPO / OVERLAYS[path]), cfg) if path in OVERLAYS else cfg


def targets(node):
    if OmegaConf.is_dict(node):
        for k, v in node.items():
            if k == "target":
                yield v
            else:
                yield from targets(v)
    elif OmegaConf.is_list(node):
        for v in node:
            yield from targets(v)


def tiny_model_config(cfg):
    p = cfg.model.params
    if "unet_config" not in p:  # a first-stage config (the toy autoencoder)
        p.ddconfig.update(TINY_DD)
        return cfg
    p.unet_config.params.update(TINY_UNET)
    if "first_stage_config" in p and "ddconfig" in p.first_stage_config.params:
        p.first_stage_config.params.ddconfig.update(TINY_DD)
        p.first_stage_config.params.pop("ckpt_path", None)  # trained weights are not needed to build
    cond = p.cond_stage_config
    if cond.target.endswith("BERTEmbedder"):
        cond.params.update(n_embed=16, n_layer=2)
        if "tokenizer_path" not in cond.params:  # the bundled tiny config ships its own vocabulary
            cond.params.tokenizer_path = str(fixture_path("tokenizers", "bert-base-uncased"))
    elif cond.target.endswith("FrozenCLIPEmbedder"):
        cond.params = {"tokenizer_path": str(fixture_path("tokenizers", "clip")),
                       "text_config": str(fixture_path("parity", "sd_tiny", "clip_text_config.json"))}
    return cfg


def test_configs_found():
    assert len(CONFIGS) >= 7, CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_every_target_imports(path):
    cfg = load(path)
    found = list(targets(cfg))
    assert found
    for t in found:
        get_obj_from_str(t)


@pytest.mark.parametrize("path", CONFIGS)
def test_builds_with_tiny_overrides(path):
    cfg = tiny_model_config(load(path))
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    if "unet_config" not in cfg.model.params:
        x = torch.rand(2, 64, 64, 3) * 2 - 1
        model.learning_rate = 1e-4
        loss = model._step({"image": x}, "train")[0]
        assert torch.isfinite(loss) and model.decode(model.encode(x.permute(0, 3, 1, 2)).mode()).shape == (2, 3, 64, 64)
        return
    assert model.model.diffusion_model.model_channels == 32
    with torch.no_grad():
        c = model.get_learned_conditioning(["a photo of *", ""])
        eps = model.apply_model(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), c)
    assert eps.shape == (2, 4, 8, 8) and torch.isfinite(eps).all()
    if model.embedding_manager is not None:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        frozen_only = not cfg.model.params.get("unfreeze_model", False)
        if cfg.model.params.get("freeze_embedding", False):  # pivotal tuning, stage 2: the UNet alone
            assert trainable == {n for n, _ in model.model.named_parameters(prefix="model")}
        else:
            assert ("embedding_manager.string_to_param_dict.*" in trainable)
            assert (trainable == {"embedding_manager.string_to_param_dict.*"}) == frozen_only
    if "data" in cfg:
        personalized = "personalized" in cfg.data.params.train.target
        if personalized:
            images = fixture_path("parity", "ldm_tiny", "data_images")
            for split in ("train", "validation"):
                cfg.data.params[split].params.data_root = str(images)
        data = instantiate_from_config(cfg.data)
        data.setup()
        item = data.datasets["train"][0]
        assert item["image"].shape[-1] == 3 and isinstance(item["caption"], str)
        assert ("*" in item["caption"]) == personalized
    for cb in (cfg.get("lightning", {}).get("callbacks") or {}).values():
        instantiate_from_config(cb)


def test_eval_config_builds_without_personalization():
    cfg = tiny_model_config(OmegaConf.load(Path(REPO) / "configs/latent-diffusion/txt2img-1p4B-eval.yaml"))
    model = instantiate_from_config(cfg.model)
    assert model.embedding_manager is None
    assert any(p.requires_grad for p in model.model.parameters())  # no freezing without TI
