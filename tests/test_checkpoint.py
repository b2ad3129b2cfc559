"""Acceptance: one strict, safe checkpoint loader for .ckpt (nested or flat) and .safetensors."""

import os

import pytest
import pytorch_lightning as pl
import torch
from conftest import parity_config
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, CheckpointMismatchError, load_state_dict_into, read_state_dict
from ldm.util import instantiate_from_config


@pytest.fixture(scope="module")
def tiny():
    """A randomly initialised tiny SD-style model and its base weights (no embedding manager)."""
    torch.manual_seed(0)
    model = instantiate_from_config(parity_config("sd_tiny").model)
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("embedding_manager.")}
    return model, base


def fresh(ckpt_path=None):
    cfg = parity_config("sd_tiny")
    if ckpt_path is not None:
        cfg.model.params.ckpt_path = str(ckpt_path)
    torch.manual_seed(1)
    return instantiate_from_config(cfg.model)


def assert_same_weights(model, base):
    sd = model.state_dict()
    for k, v in base.items():
        assert torch.equal(sd[k], v), k


def test_official_lightning_layout_loads_strictly(tiny, tmp_path):
    _, base = tiny
    path = tmp_path / "model.ckpt"
    # PL 1.x checkpoints key their callback state by the ModelCheckpoint class object
    torch.save({"state_dict": base, "global_step": 470000, "epoch": 6,
                "callbacks": {pl.callbacks.ModelCheckpoint: {"best_model_score": None}}}, path)
    sd, meta = read_state_dict(path)
    assert meta == {"global_step": 470000, "epoch": 6}
    assert_same_weights(fresh(path), base)


def test_flat_ckpt_and_safetensors_load(tiny, tmp_path):
    _, base = tiny
    torch.save(base, tmp_path / "flat.ckpt")
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "model.safetensors"))
    assert_same_weights(fresh(tmp_path / "flat.ckpt"), base)
    assert_same_weights(fresh(tmp_path / "model.safetensors"), base)


def test_missing_key_is_named(tiny, tmp_path):
    _, base = tiny
    key = "model.diffusion_model.out.2.weight"
    torch.save({"state_dict": {k: v for k, v in base.items() if k != key}}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: model\.diffusion_model\.out\.2\.weight"):
        fresh(tmp_path / "m.ckpt")


def test_wrong_shape_is_named(tiny, tmp_path):
    _, base = tiny
    key = "first_stage_model.quant_conv.weight"
    bad = dict(base, **{key: torch.zeros(3, 3, 1, 1)})
    torch.save({"state_dict": bad}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"first_stage_model\.quant_conv\.weight: checkpoint \(3, 3, 1, 1\)"):
        fresh(tmp_path / "m.ckpt")


def test_other_model_is_refused_with_keys(tiny, tmp_path):
    _, base = tiny
    other = {k.replace("model.diffusion_model.", "unet."): v for k, v in base.items()}
    torch.save({"state_dict": other}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointMismatchError, match="unexpected keys: unet"):
        fresh(tmp_path / "other.ckpt")


def test_named_fixups(tiny, tmp_path):
    """transformers-5 CLIP layout, absent position_ids, and EMA entries all load into our layout."""
    _, base = tiny
    prefix = "cond_stage_model.transformer.text_model."
    sd = {(k.replace(prefix, "cond_stage_model.transformer.") if k.startswith(prefix) else k): v
          for k, v in base.items() if not k.endswith("position_ids")}
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(10)
    torch.save({"state_dict": sd}, tmp_path / "fix.ckpt")
    assert_same_weights(fresh(tmp_path / "fix.ckpt"), base)


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="weights-only"):
        read_state_dict(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_missing_and_non_checkpoint_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.ckpt")
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(CheckpointError, match="config.yaml"):
        read_state_dict(tmp_path / "config.yaml")


def test_embedding_manager_keys_of_a_full_checkpoint_are_restored(tiny, tmp_path):
    """A checkpoint that carries embedding-manager tensors (e.g. a full TI run) restores them too."""
    model, base = tiny
    sd = dict(base)
    learned = torch.randn(1, 16)
    sd["embedding_manager.string_to_param_dict.*"] = learned
    torch.save({"state_dict": sd}, tmp_path / "full.ckpt")
    loaded = fresh(tmp_path / "full.ckpt")
    assert torch.equal(loaded.embedding_manager.string_to_param_dict["*"].detach(), learned)


def test_load_into_plain_module_from_mapping():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointMismatchError, match="missing keys: bias"):
        load_state_dict_into(lin, {"weight": torch.zeros(2, 2)}, allow_missing=())
    report = load_state_dict_into(lin, {"weight": torch.ones(2, 2), "bias": torch.zeros(2)})
    assert report.loaded == 2 and torch.equal(lin.weight.detach(), torch.ones(2, 2))
