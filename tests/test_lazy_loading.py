"""Building a model from its checkpoint costs about one copy of the weights, in their storage dtype.

The UNet and the two stages are built on the meta device when `ckpt_path` fills them, then filled from the
mapped file tensor by tensor (ldm/checkpoint.py, ldm/mapped_file.py). Checked here: the result equals the
eager build (random init, then a copy) bit for bit, for .ckpt and .safetensors, fp32 and frozen_weights=bf16,
LDM (BERT) and SD (CLIP) layouts; strict errors are unchanged, the unused BERT logits head included; and, in
a subprocess, the peak memory of a ~200 MB model (scripts/load_memory.py).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, parity_config, parity_weights
from safetensors.torch import load_file, save_file

from ldm.checkpoint import CheckpointError, CheckpointMismatchError, open_checkpoint
from ldm.mapped_file import file_pages
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.ddpm_schedule import SCHEDULE_BUFFERS
from ldm.modules.x_transformer import LogitsHead
from ldm.util import instantiate_from_config

HEAD = "cond_stage_model.transformer.to_logits."
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux only")


class EagerLatentDiffusion(LatentDiffusion):
    """The build as it was before: random init of every submodule, then the checkpoint copied in."""

    meta_init = False


@pytest.fixture(scope="module")
def base():
    """name -> the tiny model's base weights (everything but the embedding manager)."""
    out = {}
    for name in ("ldm_tiny", "sd_tiny"):
        sd = load_file(str(parity_weights(name)))
        out[name] = {k: v for k, v in sd.items() if not k.startswith("embedding_manager.")}
    return out


def write(sd, path):
    """The official layouts: a Lightning dict for .ckpt, a flat file for .safetensors."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, path)
    return path


def build(name, ckpt=None, cls=None, **params):
    cfg = parity_config(name)
    cfg.model.params.update(params)
    if ckpt is not None:
        cfg.model.params.ckpt_path = str(ckpt)
    torch.manual_seed(0)
    if cls is None:
        return instantiate_from_config(cfg.model)
    return cls(**cfg.model.params)


def all_tensors(model):
    """state_dict plus the non-persistent buffers."""
    return {**dict(model.named_buffers()), **model.state_dict()}


@pytest.mark.parametrize("frozen", ["fp32", "bf16"])
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("name", ["ldm_tiny", "sd_tiny"])
def test_built_from_checkpoint_equals_the_eager_build(base, tmp_path, name, suffix, frozen):
    path = write(base[name], tmp_path / f"base{suffix}")
    lazy = build(name, path, frozen_weights=frozen)
    eager = build(name, path, EagerLatentDiffusion, frozen_weights=frozen)
    assert lazy.meta_init and not eager.meta_init
    ours, theirs = all_tensors(lazy), all_tensors(eager)
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        assert not value.is_meta, key
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key
    for key, value in base[name].items():  # and both hold the checkpoint, in the model's dtypes
        assert torch.equal(ours[key], value.to(ours[key].dtype)), key
    weight = lazy.model.diffusion_model.input_blocks[0][0].weight
    assert weight.dtype == (torch.bfloat16 if frozen == "bf16" else torch.float32)
    token = lazy.embedding_manager.initial_embeddings["*"]  # built after the load, from the loaded encoder
    assert torch.equal(token, eager.embedding_manager.initial_embeddings["*"])
    if name == "ldm_tiny":  # the unused logits head stayed a view of the mapped file: no copy in memory
        head = lazy.cond_stage_model.transformer.to_logits
        assert head.weight.dtype == torch.float32 and file_pages(path, [head.weight, head.bias]) is not None


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_strict_errors_are_unchanged(base, tmp_path, suffix):
    sd = base["ldm_tiny"]
    unet = "model.diffusion_model.out.2.weight"
    cases = [
        ({k: v for k, v in sd.items() if k != unet}, f"missing keys: {unet}"),
        ({k: v for k, v in sd.items() if k != HEAD + "weight"}, f"missing keys: {HEAD}weight"),
        ({**sd, "model.unknown": torch.zeros(1)}, "unexpected keys: model.unknown"),
        ({**sd, unet: torch.zeros(4, 3, 3, 3)}, f"{unet}: checkpoint (4, 3, 3, 3) vs model (4, 32, 3, 3)"),
        ({**sd, HEAD + "bias": torch.zeros(5)}, f"{HEAD}bias: checkpoint (5,) vs model (30522,)"),
    ]
    for i, (bad, message) in enumerate(cases):
        path = write(bad, tmp_path / f"bad{i}{suffix}")
        with pytest.raises(CheckpointMismatchError, match=re.escape(message)):
            build("ldm_tiny", path)


def test_a_nan_is_refused_naming_the_tensor(base, tmp_path):
    key = "first_stage_model.decoder.conv_out.weight"
    for suffix in (".ckpt", ".safetensors"):
        bad = dict(base["ldm_tiny"])
        bad[key] = bad[key].clone()
        bad[key][0, 0, 0, 0] = float("nan")
        with pytest.raises(CheckpointError, match=re.escape(f"tensor '{key}' holds NaN")):
            build("ldm_tiny", write(bad, tmp_path / f"nan{suffix}"))
    key = "embedding_manager.string_to_param_dict.*"
    bad = {**base["ldm_tiny"], key: torch.full((1, 16), float("inf"))}
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{key}' holds NaN")):
        build("ldm_tiny", write(bad, tmp_path / "inf.ckpt"))


def test_legacy_torch_file_is_read_whole(base, tmp_path):
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": base["sd_tiny"]}, path, _use_new_zipfile_serialization=False)
    opened = open_checkpoint(path)
    assert opened.pages is None
    model = build("sd_tiny", path)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in base["sd_tiny"].items())


def test_ignore_keys_into_a_submodule_build_it_as_usual(base, tmp_path):
    path = write(base["ldm_tiny"], tmp_path / "base.ckpt")
    model = build("ldm_tiny", path, ignore_keys=["first_stage_model."])
    random = build("ldm_tiny")  # the same seed: the first stage keeps these values
    assert not model.meta_init and not random.meta_init
    ours, theirs = model.state_dict(), random.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k.startswith("first_stage_model."))
    assert all(torch.equal(ours[k], v) for k, v in base["ldm_tiny"].items() if k.startswith("model."))
    schedule = build("ldm_tiny", path, timesteps=20, ignore_keys=list(SCHEDULE_BUFFERS))
    assert schedule.meta_init and schedule.betas.shape == (20,)


def test_use_ema_weights_come_from_the_checkpoint(base, tmp_path):
    sd = dict(base["ldm_tiny"])
    ema = build("ldm_tiny", use_ema=True).model_ema.state_dict()
    sd.update({f"model_ema.{k}": torch.randn_like(v) if v.is_floating_point() else v for k, v in ema.items()})
    model = build("ldm_tiny", write(sd, tmp_path / "ema.safetensors"), use_ema=True)
    assert model.meta_init
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in sd.items())


def test_logits_head_is_no_parameter_but_a_strict_state_dict_entry():
    torch.manual_seed(3)
    reference = torch.nn.Linear(8, 5)
    after_reference = torch.get_rng_state()
    torch.manual_seed(3)
    head = LogitsHead(8, 5)  # the same init and the same random draws as the nn.Linear it replaces
    assert torch.equal(torch.get_rng_state(), after_reference)
    assert torch.equal(head.weight, reference.weight) and torch.equal(head.bias, reference.bias)
    assert not list(head.parameters()) and not list(head.buffers())
    assert list(head.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 8)
    assert torch.equal(head(x), reference(x).detach())
    new = {"weight": torch.randn(5, 8), "bias": torch.randn(5)}
    head.load_state_dict(new)
    assert head.weight is not new["weight"] and head.weight.data_ptr() == new["weight"].data_ptr()  # no copy
    head.half()  # nothing casts or moves it
    assert head.weight.dtype == torch.float32
    with pytest.raises(RuntimeError, match=r"size mismatch for weight"):
        head.load_state_dict({"weight": torch.zeros(5, 7), "bias": torch.zeros(5)})
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "bias"'):
        head.load_state_dict({"weight": torch.zeros(5, 8)})
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "extra"'):
        head.load_state_dict({**new, "extra": torch.zeros(1)})
    model = build("ldm_tiny", frozen_weights="bf16")  # random build: the head stays float32, no parameter
    assert model.cond_stage_model.transformer.to_logits.weight.dtype == torch.float32
    assert not any(".to_logits." in k for k, _ in model.named_parameters())


@linux
def test_released_pages_leave_memory_and_read_back(tmp_path):
    path = write({"a": torch.randn(2048, 1024), "b": torch.randn(2048, 1024)}, tmp_path / "two.safetensors")
    opened = open_checkpoint(path)
    a = opened.tensors["a"]

    def resident_mib():
        lines = Path("/proc/self/smaps").read_text().split("\n")
        starts = [i for i, line in enumerate(lines) if line.endswith(str(path))]
        return sum(int(lines[j].split()[1]) for i in starts for j in range(i, i + 8)
                   if lines[j].startswith("Rss:")) / 1024

    total = float(a.sum()) + float(opened.tensors["b"].sum())
    assert resident_mib() >= 15
    for t in opened.tensors.values():
        opened.pages.release(t)
    assert resident_mib() < 1
    assert float(a.sum()) + float(opened.tensors["b"].sum()) == total  # read again from the file


@linux
@pytest.mark.slow
def test_peak_memory_of_a_load_is_one_copy_of_the_weights(tmp_path):
    """A ~210 MB model (the tiny LDM with a wide, deep UNet) from a random checkpoint, in a fresh process:
    the peak resident memory over the process's after a weightless build stays within 1.3x the weights, in
    float32 and in bfloat16 storage."""
    config = tmp_path / "wide.yaml"
    from omegaconf import OmegaConf

    OmegaConf.save(parity_config("ldm_tiny"), config)
    unet = "model.params.unet_config.params."
    wide = [f"{unet}model_channels=128", f"{unet}num_res_blocks=4", f"{unet}channel_mult=[1,2,2]",
            f"{unet}transformer_depth=3"]
    argv = [sys.executable, str(REPO / "scripts" / "load_memory.py"), "--config", str(config), "--workdir",
            str(tmp_path), *wide]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(results) == 4
    for r in results:
        assert r["weights"] > (150e6 if r["frozen_weights"] == "fp32" else 75e6), r
        assert r["ratio"] <= 1.3, r
