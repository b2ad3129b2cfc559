"""The committed toy-model files load strictly through the normal loader and keep their gates."""

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf

from ldm.toy.gates import AE_MIN, autoencoder_gate
from ldm.toy.scorer import load_scorer
from ldm.util import instantiate_from_config

AE = REPO / "models" / "toy" / "autoencoder.safetensors"


@pytest.mark.skipif(not AE.is_file(), reason=f"{AE} not committed yet")
def test_toy_autoencoder_loads_strictly_and_keeps_attributes():
    cfg = OmegaConf.load(REPO / "configs" / "toy" / "autoencoder.yaml")
    cfg.model.params.ckpt_path = str(AE)  # strict: a missing or extra key would raise
    ae = instantiate_from_config(cfg.model).eval()
    with torch.no_grad():
        acc = autoencoder_gate(ae, load_scorer(REPO / "assets" / "toy" / "scorer.safetensors"), n=64, seed=1)
    assert all(v >= AE_MIN for v in acc.values()), acc
