"""The committed toy-model files load strictly through the normal loader, keep their gates, and the bundled
model can be inverted against with main.py (issue 6, acceptance 4)."""

import json

import pytest
import torch
from conftest import REPO, load_script
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from ldm.modules.embedding_formats import read_embeddings
from ldm.toy import gates
from ldm.toy.gates import AE_MIN, autoencoder_gate
from ldm.toy.scorer import load_scorer
from ldm.util import instantiate_from_config

toy_demo = load_script("toy_demo")

TOY = REPO / "models" / "toy"
AE = TOY / "autoencoder.safetensors"
LDM = TOY / "toy_ldm.safetensors"
SCORER = REPO / "assets" / "toy" / "scorer.safetensors"


def test_toy_autoencoder_loads_strictly_and_keeps_attributes():
    cfg = OmegaConf.load(REPO / "configs" / "toy" / "autoencoder.yaml")
    cfg.model.params.ckpt_path = str(AE)  # strict: a missing or extra key would raise
    ae = instantiate_from_config(cfg.model).eval()
    with torch.no_grad():
        acc = autoencoder_gate(ae, load_scorer(SCORER))  # the gate itself: 256 renders
    assert all(v >= AE_MIN for v in acc.values()), acc


def test_inversion_config_describes_the_bundled_model():
    """invert.yaml must build the network of ldm.yaml: same schedule, parameterization and parts (a schedule or
    parameterization mismatch would load without error, since neither changes a tensor's shape)."""
    base, invert = (OmegaConf.load(REPO / "configs" / "toy" / f"{n}.yaml").model.params for n in ("ldm", "invert"))
    invert_only = {"personalization_config", "embedding_reg_weight"}
    assert set(invert) - set(base) == invert_only
    del base.first_stage_config.params.ckpt_path  # training the base model starts from the autoencoder file
    for key in base:
        assert invert[key] == base[key], key


def test_toy_ldm_loads_strictly_and_follows_a_prompt():
    cfg = OmegaConf.load(REPO / "configs" / "toy" / "ldm.yaml")
    cfg.model.params.ckpt_path = str(LDM)  # strict, through ldm.checkpoint
    model = instantiate_from_config(cfg.model).eval()
    images = gates.sample(model, 8 * ["a red hollow square on a black background"], seed=0, steps=20)
    scores = load_scorer(SCORER).score(images)
    for attribute, want in (("shape", "square"), ("color", "red"), ("background", "black"), ("fill", "hollow")):
        rate = sum(v == want for v in scores[attribute]["value"]) / 8
        assert rate >= 0.75, (attribute, scores[attribute]["value"])


@pytest.mark.slow
def test_demo_inverts_ten_steps_on_the_bundled_model(tmp_path):
    """The README's first job at 10 inversion steps: main.py inverts the ring, the sheet and metrics appear."""
    opt = toy_demo.parser().parse_args(["--steps", "10", "--samples", "2", "--outdir", str(tmp_path)])
    toy_demo.run(opt, [])
    run = next((tmp_path / "logs").iterdir())
    learned = read_embeddings(run / "checkpoints" / "embeddings.pt").vectors["*"]
    vocab = (REPO / "assets" / "tokenizers" / "toy-world" / "vocab.txt").read_text().split()
    table = load_file(str(LDM))["cond_stage_model.transformer.token_emb.weight"].float()
    init = table[vocab.index("shape")]
    assert learned.shape == (1, table.shape[1]) and torch.isfinite(learned).all()
    assert 1e-3 < (learned[0] - init).abs().max() < 1.0  # ten Adam steps moved it, and not wildly
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["inversion_steps"] == 10 and len(metrics["prompts"]) == len(toy_demo.PROMPTS)
    assert all(0 <= v <= 1 for entry in metrics["prompts"].values() for v in entry.values())
    sheet = Image.open(tmp_path / "contact_sheet.png")
    rows = 1 + len(toy_demo.PROMPTS)  # the training images, then one row per prompt
    assert sheet.height > rows * 32 and sheet.width > 5 * 32
    validation = run / "validation"
    previews = sorted(p.relative_to(validation).as_posix() for p in validation.rglob("*.png"))
    assert previews == [f"{folder}/{name}" for folder in ("00-a-photo-of-a-star", "01-a-red-star")
                        for name in ("contact_sheet.png", "gs-000000.png", "gs-000010.png")]


def test_gates_reuse_an_inversion_only_from_the_same_checkpoint(tmp_path):
    toy_gates = load_script("toy_gates")
    ckpt = tmp_path / "toy_ldm.safetensors"
    ckpt.write_bytes(LDM.read_bytes())
    opt = toy_gates.parser().parse_args(["--ckpt", str(ckpt), "--inversion_steps", "2", "--out", str(tmp_path / "g")])
    emb = toy_gates.invert(opt, "ring", seed=0)
    first = emb.stat().st_mtime_ns
    assert toy_gates.invert(opt, "ring", seed=0).stat().st_mtime_ns == first  # same source: reused
    ckpt.write_bytes(LDM.read_bytes())  # a new file at the same path
    assert toy_gates.invert(opt, "ring", seed=0).stat().st_mtime_ns != first  # inverted again
    assert len(list((emb.parent / "logs").iterdir())) == 1  # the stale run was cleared
