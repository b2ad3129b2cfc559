"""DDIM inversion (ldm/models/diffusion/ddim_inversion.py, scripts/ddim_inversion.py; paper Appendix E).

Measured round-trip errors (RMS of z_rec - z0 over std(z0), scale 1, "aligned" schedule; first order in the
step size): with the exact noise predictor of Gaussian data on the tiny model's schedule 0.197 / 0.076 /
0.037 / 0.018 at 10 / 25 / 50 / 100 steps; on the bundled toy model (5 star images, "a photo of a star")
0.070 / 0.036 / 0.019 at 20 / 50 / 100 steps. The tiny parity model's random UNet is no denoiser (its
round trip is off by ~40 std at any step count), so it checks the formula and the plumbing, not the error.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, build_parity_model, fixture_path, load_script, parity_config, parity_weights
from omegaconf import OmegaConf
from PIL import Image

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddim_inversion import ddim_invert, ddim_reconstruct, image_latent

DATA_VAR = 0.25


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_parity_model("ldm_tiny", tmp_path_factory.mktemp("tiny")).eval()


def gaussian_eps(model):
    """The exact eps of data ~ N(mu(c), DATA_VAR I), mu from the conditioning (so guidance matters)."""

    def apply_model(x, t, cond):
        a = model.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        mu = 200 * cond.flatten(1).mean(1).view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * DATA_VAR + 1 - a)

    return apply_model


def rel_rms(z, z0):
    return ((z - z0).pow(2).mean().sqrt() / z0.std()).item()


@pytest.mark.parametrize("scale, tol", [(1.0, 0.05), (3.0, 0.15)])
def test_round_trip_with_an_exact_denoiser_converges(tiny, monkeypatch, scale, tol):
    """invert -> reconstruct (same prompt, eta 0) gives z0 back at 50 steps: within 0.05 std(z0) at scale 1
    (measured 0.037) and 0.15 at scale 3 (measured 0.123: z0 is a sample of the conditional data, not of the
    guided flow's); the error falls at least 3x from 25 to 100 steps (first order: 0.076 -> 0.018 at scale 1,
    0.241 -> 0.062 at scale 3)."""
    monkeypatch.setattr(tiny, "apply_model", gaussian_eps(tiny))
    c = tiny.get_learned_conditioning(2 * ["a photo of *"])
    uc = tiny.get_learned_conditioning(2 * [""])
    mu = 200 * c.flatten(1).mean(1).view(-1, 1, 1, 1)
    z0 = mu + DATA_VAR**0.5 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    err = {}
    for steps in (25, 50, 100):
        x_T = ddim_invert(tiny, z0, c, steps, uc, scale)
        assert 0.8 < x_T.std().item() < 1.2  # the data's noise: unit variance
        err[steps] = rel_rms(ddim_reconstruct(tiny, x_T, c, steps, uc, scale), z0)
    assert err[50] < tol, err
    assert err[100] < err[25] / 3, err


def test_official_schedule_is_the_reference_formula(tiny):
    """schedule="official" = the reference's invert_ddim_step (pycache only, reference_spec.md section 14):
    x_{i+1} = x + sqrt(a_{i+1}) [(sqrt(1/a_i) - sqrt(1/a_{i+1})) x + (sqrt(1/a_{i+1} - 1) - sqrt(1/a_i - 1)) eps],
    eps at (x, t_i), S - 1 steps from x0; with the tiny model's real network and guidance."""
    c = tiny.get_learned_conditioning(["a photo of *"])
    uc = tiny.get_learned_conditioning([""])
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.1
    steps, scale = 5, 3.0
    got = ddim_invert(tiny, z0, c, steps, uc, scale, schedule="official")
    sampler = DDIMSampler(tiny)
    sampler.make_schedule(steps, ddim_eta=0.0, verbose=False)
    a = sampler.ddim_alphas.double()
    x = z0.double()
    for i in range(steps - 1):
        t = torch.full((1,), int(sampler.ddim_timesteps[i]), dtype=torch.long)
        eps = sampler.guided_eps(x.float(), t, c, scale, uc).double()
        x = x + a[i + 1].sqrt() * ((1 / a[i]).sqrt() - (1 / a[i + 1]).sqrt()) * x \
            + a[i + 1].sqrt() * ((1 / a[i + 1] - 1).sqrt() - (1 / a[i] - 1).sqrt()) * eps
    assert torch.allclose(got.double(), x, rtol=1e-4, atol=1e-5)


def test_aligned_step_inverts_the_sampler_step_for_a_fixed_eps(tiny, monkeypatch):
    """With eps independent of x, one inversion step is the exact inverse of the sampler's DDIM step."""
    const = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(tiny, "apply_model", lambda x, t, cond: const.expand_as(x))
    c = tiny.get_learned_conditioning(["a photo of *"])
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x_T = ddim_invert(tiny, z0, c, 10)
    assert rel_rms(ddim_reconstruct(tiny, x_T, c, 10), z0) < 1e-5


def test_round_trip_on_the_toy_model():
    """A trained denoiser (the bundled toy model): 2 star renders under "a photo of a star", 20 steps:
    within 0.1 std(z0) (measured 0.070 on 5 images); z0 = scale_factor * posterior mode."""
    from ldm.data.toy_world import Attributes, render
    from ldm.loading import load_model

    model = load_model(REPO / "configs/toy/invert.yaml", REPO / "models/toy/toy_ldm.safetensors")
    rng = np.random.default_rng(0)
    attrs = [Attributes("star", "red", "white", "left", "solid"), Attributes("star", "blue", "gray", "right", "solid")]
    x = torch.from_numpy(np.stack([render(a, 32, rng) for a in attrs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    z0 = image_latent(model, x)
    assert torch.allclose(z0, model.scale_factor * model.encode_first_stage(x).mode())
    c = model.get_learned_conditioning(2 * ["a photo of a star"])
    err = rel_rms(ddim_reconstruct(model, ddim_invert(model, z0, c, 20), c, 20), z0)
    assert err < 0.1, err


def test_bad_arguments(tiny):
    c = tiny.get_learned_conditioning(["a photo of *"])
    z0 = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="unconditional_conditioning"):
        ddim_invert(tiny, z0, c, 5, scale=3.0)
    with pytest.raises(ValueError, match="steps"):
        ddim_invert(tiny, z0, c, 0)
    with pytest.raises(ValueError, match="schedule"):
        ddim_invert(tiny, z0, c, 5, schedule="nope")


@pytest.fixture(scope="module")
def script_inputs(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("script")
    OmegaConf.save(parity_config("ldm_tiny"), root / "tiny.yaml")
    tiny.embedding_manager.save(root / "embeddings.pt")
    images = sorted(fixture_path("parity", "ldm_tiny", "data_images").iterdir())[:2]
    return root, images


def test_script_writes_grid_and_errors(script_inputs, tmp_path):
    root, images = script_inputs
    script = load_script("ddim_inversion")
    out = tmp_path / "out"
    edits = ["a red *", "a painting of *"]
    rc = script.main(["--config", str(root / "tiny.yaml"), "--ckpt", str(parity_weights("ldm_tiny")),
                      "--embedding_path", str(root / "embeddings.pt"), "--image", *map(str, images),
                      "--edit_prompts", *edits, "--scales", "1", "3", "5", "--ddim_steps", "2",
                      "--outdir", str(out), "--seed", "0", "--device", "cpu"])
    assert rc == 0
    report = json.loads((out / "inversion.json").read_text())
    assert sorted(report["scales"]) == ["1", "3", "5"]
    assert report["columns"] == ["input", "reconstruction", *edits]
    for r in report["scales"].values():
        assert math.isfinite(r["latent_mse"]) and math.isfinite(r["pixel_mse"])
        assert len(r["per_image"]["latent_mse"]) == 2
    tile = 64 + 2
    for name in ("grid.png", f"{images[0].stem}.png"):
        assert (out / name).is_file()
    assert Image.open(out / f"{images[0].stem}.png").size == (4 * tile + 2, 3 * tile + 2)
    assert Image.open(out / "grid.png").size == (4 * tile + 2, 6 * tile + 2)
    assert (out / "latents.safetensors").is_file()


def test_script_one_line_error(script_inputs, tmp_path, capsys):
    root, _ = script_inputs
    rc = load_script("ddim_inversion").main(["--config", str(root / "tiny.yaml"), "--ckpt",
                                              str(parity_weights("ldm_tiny")), "--image",
                                              str(Path(tmp_path) / "missing.png"), "--outdir", str(tmp_path)])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ddim_inversion.py: error: --image") and "no such file" in err[-1]
