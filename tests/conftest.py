"""Shared test fixtures: paths to ../shared, offline Hugging Face, deterministic torch."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TI_SHARED_DIR", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixture_path(*parts: str) -> Path:
    """Path under ../shared/fixtures, or skip the test with the reason if it is absent."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared fixture not found: {path} (set TI_SHARED_DIR to the shared/ folder)")
    return path


@pytest.fixture(autouse=True)
def _torch_defaults():
    """Two threads, and the global kernel switches back to their library defaults after every test
    (main.py sets them from its flags)."""
    from ldm.modules.attention import set_attention_backend
    from ldm.modules.diffusionmodules.util import set_gradient_checkpointing

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
    set_attention_backend("math")
    set_gradient_checkpointing(False)


# ---------------------------------------------------------------------------------------------------
# Tiny parity models (../shared/fixtures/parity/{ldm_tiny,sd_tiny})
# ---------------------------------------------------------------------------------------------------

PARITY_NAMES = ("ldm_tiny", "sd_tiny")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5, what=""):
    """max|a - b| <= rtol * max|b| + atol (the fixtures' suggested tolerance, relative to the tensor's max)."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = rtol * expected.abs().max().item() + atol
    assert err <= bound, f"{what}: max abs diff {err:.3g} > {bound:.3g}"
    return err


def parity_config(name: str, num_vectors: int = 1):
    """The fixture's config with offline tokenizer/text-config paths added to the cond stage."""
    from omegaconf import OmegaConf

    folder = fixture_path("parity", name)
    cfg = OmegaConf.load(folder / "config.yaml")
    cond = cfg.model.params.cond_stage_config.params
    if name == "sd_tiny":
        cond.tokenizer_path = str(fixture_path("tokenizers", "clip"))
        cond.text_config = str(folder / "clip_text_config.json")
    else:
        cond.tokenizer_path = str(fixture_path("tokenizers", "bert-base-uncased"))
    cfg.model.params.personalization_config.params.num_vectors_per_token = num_vectors
    return cfg


def build_parity_model(name: str, tmp_dir: Path, num_vectors: int = 1):
    """Build the tiny model as the reference did (spec in parity/README.md, "How the weights were made"):
    base weights (everything but the embedding manager) written as a Lightning-style .ckpt and loaded by
    the constructor before the embedding manager is created from the loaded text encoder."""
    from safetensors.torch import load_file

    from ldm.util import instantiate_from_config

    sd = load_file(str(fixture_path("parity", name, "model.safetensors")))
    base = {k: v for k, v in sd.items() if not k.startswith("embedding_manager.")}
    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    ckpt = Path(tmp_dir) / f"{name}_base.ckpt"
    if not ckpt.exists():
        torch.save({"state_dict": base}, ckpt)
    cfg = parity_config(name, num_vectors)
    cfg.model.params.ckpt_path = str(ckpt)
    return instantiate_from_config(cfg.model)


def tiny_clip_model(seed: int = 0):
    """A 2-layer CLIP with 32-pixel inputs, built locally (no download); initializer_factor 5 spreads the
    random features apart."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  initializer_factor=5.0)
    config = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **common),
                        vision_config=dict(image_size=32, patch_size=8, **common), projection_dim=16,
                        initializer_factor=5.0)
    return CLIPModel(config).eval()
