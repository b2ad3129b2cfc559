"""Pivotal tuning (scripts/pivotal_tuning.py, model.params.freeze_embedding; paper Appendix E) on the tiny
LDM-style model: stage 2 trains the UNet only, the word stays bitwise at its pivot, and the exported
checkpoint loads strictly into the sampling config's model and samples through scripts/txt2img.py."""


import pytest
import torch
from conftest import fixture_path, load_script, parity_config, parity_weights
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.checkpoint import read_state_dict
from ldm.loading import load_model
from ldm.modules.embedding_formats import read_embeddings

FAST = [
    "data.params.batch_size=2",
    "data.params.train.params.repeats=4",
    "lightning.trainer.num_sanity_val_steps=0",
    "lightning.trainer.log_every_n_steps=1",
    "lightning.callbacks.image_logger.params.disabled=true",
]


@pytest.fixture(scope="module")
def pivotal(tmp_path_factory):
    """One pivotal-tuning run on the tiny model: stage 1 (3 steps) then stage 2 (3 steps at model_lr 1e-3)."""
    root = tmp_path_factory.mktemp("pivotal")
    cfg = parity_config("ldm_tiny")
    OmegaConf.save(cfg, root / "tiny.yaml")
    sd = load_file(str(parity_weights("ldm_tiny")))
    base = {k: v for k, v in sd.items() if not k.startswith("embedding_manager.")}
    torch.save({"state_dict": base}, root / "base.ckpt")
    images = fixture_path("parity", "ldm_tiny", "data_images")
    report = load_script("pivotal_tuning").run(
        load_script("pivotal_tuning").parser().parse_args(
            ["--config", str(root / "tiny.yaml"), "--stage1_config", str(root / "tiny.yaml"),
             "--actual_resume", str(root / "base.ckpt"), "--data_root", str(images), "--stage1_steps", "3",
             "--steps", "3", "--model_lr", "1e-3", "--template", "a photo of {}", "--logdir", str(root / "logs"),
             "--seed", "0"]), FAST)
    return root, base, report


def test_stage2_trains_the_unet_and_keeps_the_pivot(pivotal):
    root, base, report = pivotal
    assert report["embedding_unchanged"] and report["stage2_steps"] == 3 and report["model_lr"] == 1e-3
    pivot = read_embeddings(report["pivot"]).vectors["*"]
    tuned, _ = read_state_dict(report["last_ckpt"])
    assert torch.equal(tuned["embedding_manager.string_to_param_dict.*"].reshape(pivot.shape), pivot)
    unet = [k for k in base if k.startswith("model.diffusion_model.")]
    changed = [k for k in unet if not torch.equal(tuned[k], base[k])]
    assert len(changed) > len(unet) // 2, f"only {len(changed)} of {len(unet)} UNet tensors changed"
    frozen = [k for k in base if k.startswith(("cond_stage_model.", "first_stage_model."))]
    assert frozen and all(torch.equal(tuned[k], base[k]) for k in frozen), "text encoder or autoencoder moved"
    exported = load_file(report["model"])
    assert not any(k.startswith("embedding_manager.") for k in exported)
    assert all(torch.equal(exported[k], tuned[k]) for k in exported)


def test_checkpoint_loads_strictly_and_samples(pivotal, tmp_path):
    root, _, report = pivotal
    model = load_model(root / "tiny.yaml", report["model"])  # strict: every key of the sampling model
    exported = load_file(report["model"])
    sd = model.state_dict()
    assert all(torch.equal(sd[k], exported[k]) for k in exported)
    also_lightning = load_model(root / "tiny.yaml", report["last_ckpt"])  # the full Lightning file loads too
    assert torch.equal(also_lightning.model.diffusion_model.out[-1].weight, model.model.diffusion_model.out[-1].weight)
    out = tmp_path / "samples"
    rc = load_script("txt2img").main(["--config", str(root / "tiny.yaml"), "--ckpt_path", report["model"],
                                      "--embedding_path", report["pivot"], "--prompt", "a photo of *",
                                      "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--H", "64",
                                      "--W", "64", "--scale", "3", "--seed", "0", "--outdir", str(out),
                                      "--device", "cpu"])
    assert rc == 0
    assert len(list((out / "samples").glob("*.png"))) == 1


def test_freeze_embedding_needs_unfreeze_model(tmp_path):
    cfg = parity_config("ldm_tiny")
    cfg.model.params.freeze_embedding = True
    model = load_model(cfg)
    assert not any(p.requires_grad for p in model.embedding_manager.embedding_parameters())
    assert not any(p.requires_grad for p in model.cond_stage_model.parameters())
    model.learning_rate = 1e-3
    with pytest.raises(ValueError, match="unfreeze_model"):
        model.configure_optimizers()
    cfg.model.params.unfreeze_model = True
    cfg.model.params.model_lr = 1e-4
    model = load_model(cfg)
    model.learning_rate = 1e-3
    opt = model.configure_optimizers()
    opt = opt[0][0] if isinstance(opt, tuple) else (opt["optimizer"] if isinstance(opt, dict) else opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert [g["lr"] for g in opt.param_groups] == [1e-4]
    assert {id(p) for p in params} == {id(p) for p in model.model.parameters()}


def test_script_rejects_bad_flags(tmp_path, capsys):
    rc = load_script("pivotal_tuning").main(["--actual_resume", str(tmp_path / "none.ckpt"), "--data_root",
                                             str(tmp_path)])
    assert rc == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("pivotal_tuning.py: error: --actual_resume")
