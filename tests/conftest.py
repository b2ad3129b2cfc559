"""Shared test helpers: golden fixtures in tests/fixtures, offline Hugging Face, deterministic torch."""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixture_path(*parts: str) -> Path:
    """Path under tests/fixtures; a missing fixture is an error, never a skip (they are part of the repo)."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"test fixture missing: {path} (tests/fixtures is tracked in git; "
                                "restore it rather than skipping)")
    return path


@pytest.fixture(autouse=True)
def _torch_defaults():
    """Two threads, as on the CI machine."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# ---------------------------------------------------------------------------------------------------
# Tiny parity models (tests/fixtures/parity/{ldm_tiny,sd_tiny})
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


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a CPU tensor's raw bytes (row-major, native little-endian: the bytes safetensors stores)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def regenerate_parity_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The reference's model.safetensors rebuilt from its recipe (parity/README.md, "How the weights were
    made"): seed 0, build config.model, overwrite every parameter but the embedding manager's in
    named_parameters() order from one generator seeded 1234, save the base weights as a .ckpt and build
    again from it so the embedding manager is initialised from the loaded text encoder. Not stored in git:
    test_parity_weights.py checks every tensor against the reference's sha256 (model_sha256.json)."""
    from ldm.util import instantiate_from_config

    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = instantiate_from_config(parity_config(name).model)
        gen = torch.Generator().manual_seed(1234)
        # the reference's named_parameters(): ours plus BERT's unused logits head, which is no parameter here
        # (ldm/modules/x_transformer.py, LogitsHead) but sits in the same place of the state dict
        params = dict(model.named_parameters())
        weights = [(k, v) for k, v in model.state_dict(keep_vars=True).items()
                   if k in params or ".to_logits." in k]
        with torch.no_grad():
            for key, p in weights:
                if key.startswith("embedding_manager."):
                    continue
                if p.dim() >= 2:
                    value = (torch.rand(p.shape, generator=gen) * 2 - 1) / math.sqrt(p[0].numel())
                elif key.endswith("weight"):
                    value = 1 + 0.1 * torch.randn(p.shape, generator=gen)
                else:
                    value = 0.1 * torch.randn(p.shape, generator=gen)
                p.copy_(value)
        base = {k: v for k, v in model.state_dict().items() if not k.startswith("embedding_manager.")}
        ckpt = Path(tmp) / f"{name}_base.ckpt"
        torch.save({"state_dict": base}, ckpt)
        del model, base
        cfg = parity_config(name)
        cfg.model.params.ckpt_path = str(ckpt)
        torch.manual_seed(0)
        model = instantiate_from_config(cfg.model)
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


_PARITY_WEIGHTS: dict[str, Path] = {}


def parity_weights(name: str) -> Path:
    """Path of the tiny model's full state dict (`model.safetensors` of the reference), regenerated once per
    test session into a temporary folder (removed at exit)."""
    if name not in _PARITY_WEIGHTS:
        from safetensors.torch import save_file

        folder = Path(tempfile.mkdtemp(prefix=f"ti_parity_{name}_"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        path = folder / "model.safetensors"
        save_file(regenerate_parity_state_dict(name), str(path))
        _PARITY_WEIGHTS[name] = path
    return _PARITY_WEIGHTS[name]


def build_parity_model(name: str, tmp_dir: Path, num_vectors: int = 1):
    """Build the tiny model as the reference did (spec in parity/README.md, "How the weights were made"):
    base weights (everything but the embedding manager) written as a Lightning-style .ckpt and loaded by
    the constructor before the embedding manager is created from the loaded text encoder."""
    from safetensors.torch import load_file

    from ldm.util import instantiate_from_config

    sd = load_file(str(parity_weights(name)))
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


# ---------------------------------------------------------------------------------------------------
# The tiny LDM-style training setup of the main.py tests (tests/test_main.py: args, train, FAST)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config path, base checkpoint, base state dict, image folder) for the tiny LDM-style model."""
    root = tmp_path_factory.mktemp("tiny")
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    cfg = parity_config("ldm_tiny")
    # the fixture's weights: random everywhere (a freshly initialised UNet zero-inits its attention output
    # projections, so the text, and with it the embedding, would get no gradient)
    sd = load_file(str(parity_weights("ldm_tiny")))
    base = {k: v for k, v in sd.items() if not k.startswith("embedding_manager.")}
    torch.save({"state_dict": base}, root / "base.ckpt")
    OmegaConf.save(cfg, root / "tiny.yaml")
    return root / "tiny.yaml", root / "base.ckpt", base, fixture_path("parity", "ldm_tiny", "data_images")
