"""Acceptance: the sampling scripts reproduce parity groups 5 (DDIM) and 6 (PLMS) from the fixtures'
weights, seeds and starting noise; merge_embeddings.py reproduces group 8."""

import json

import numpy as np
import pytest
import torch
from conftest import PARITY_NAMES, assert_close, fixture_path, load_script, parity_config, parity_weights
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

import merge_embeddings
from ldm.image_grid import to_uint8
from ldm.modules.embedding_formats import EmbeddingSet, read_embeddings, write_official
from ldm.scripts_common import run_script


@pytest.fixture(scope="module", params=PARITY_NAMES)
def setup(request, tmp_path_factory):
    """Config, base checkpoint, the perturbed '*' embedding file, the captions and the starting noise."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    folder = fixture_path("parity", name)
    sd = load_file(str(parity_weights(name)))
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("embedding_manager.")}},
               tmp / "base.ckpt")
    cfg = parity_config(name)
    OmegaConf.save(cfg, tmp / "config.yaml")
    meta = json.loads((folder / "meta.json").read_text())
    emb = load_file(str(folder / "embeddings.safetensors"))["nv1_perturbed"]
    write_official(EmbeddingSet({"*": emb}, {"*": meta["placeholder_token_id"]}), tmp / "star.pt")
    (tmp / "prompts.txt").write_text("\n".join(meta["train_captions"]) + "\n")
    sampling = load_file(str(folder / "sampling.safetensors"))
    save_file({"x_T": sampling["x_T"]}, str(tmp / "x_T.safetensors"))
    return name, tmp, sampling


CASES = [("ddim_eta0_cfg5", 506, 0.0, 5.0, False), ("ddim_eta1_cfg5", 507, 1.0, 5.0, False),
         ("ddim_eta0_cfg1", 508, 0.0, 1.0, False), ("plms_cfg5", 606, 0.0, 5.0, True)]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_script_reproduces_sampling_parity(setup, case, tmp_path):
    name, tmp, sampling = setup
    prefix, seed, eta, scale, plms = case
    script = load_script("stable_txt2img" if name == "sd_tiny" else "txt2img")
    ckpt_flag = "--ckpt" if name == "sd_tiny" else "--ckpt_path"
    cfg = OmegaConf.load(tmp / "config.yaml").model.params.cond_stage_config.params
    argv = ["--from-file", str(tmp / "prompts.txt"), "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "10",
            "--ddim_eta", str(eta), "--scale", str(scale), "--seed", str(seed), "--H", "64", "--W", "64",
            "--config", str(tmp / "config.yaml"), ckpt_flag, str(tmp / "base.ckpt"), "--device", "cpu",
            "--embedding_path", str(tmp / "star.pt"), "--start_code", str(tmp / "x_T.safetensors"),
            "--outdir", str(tmp_path), "--precision", "full", "--save_latents", "--tokenizer_path", cfg.tokenizer_path]
    if plms:
        argv.append("--plms")
    parser = script.parser() if hasattr(script, "parser") else script.build_parser("x", script.DEFAULTS)
    runner = getattr(script, "run_laion_aware", None) or script.run
    assert run_script("script", parser, runner, argv) == 0
    latents = load_file(str(tmp_path / "samples" / "latents.safetensors"))["samples"]
    assert_close(latents, sampling[f"{prefix}_samples"], rtol=1e-5, atol=1e-4, what="samples")
    expected = [to_uint8((x + 1) / 2) for x in sampling[f"{prefix}_decoded"]]
    for i, ref in enumerate(expected):
        png = Image.open(tmp_path / "samples" / f"{i:05}.png")
        diff = np.abs(np.asarray(png).astype(int) - ref.astype(int)).max()
        assert diff <= 1, f"sample {i}: max pixel difference {diff}"
        assert png.text["seed"] == str(seed) and png.text["scale"] == str(scale)
        assert png.text["steps"] == "10" and "star.pt" in png.text["embeddings"]
        assert png.text["prompt"] == (tmp / "prompts.txt").read_text().splitlines()[i]
    assert len(list(tmp_path.glob("prompts-0000.png"))) == 1  # the grid


@pytest.mark.parametrize("name", PARITY_NAMES)
def test_merge_embeddings_reproduces_reference(name, tmp_path, capsys):
    folder = fixture_path("parity", name, "merge")
    tokenizer = fixture_path("tokenizers", "clip" if name == "sd_tiny" else "bert-base-uncased")
    out = tmp_path / "merged.pt"
    argv = ["--manager_ckpts", str(folder / "A_star.pt"), str(folder / "B_at.pt"), "--output_path", str(out),
            "--tokenizer_path", str(tokenizer)] + (["-sd"] if name == "sd_tiny" else [])
    assert merge_embeddings.main(argv) == 0
    ours, ref = read_embeddings(out), read_embeddings(folder / "merged.pt")
    assert list(ours.vectors) == list(ref.vectors) == ["*", "@"]
    assert ours.tokens == ref.tokens
    for p in ref.vectors:
        assert torch.equal(ours.vectors[p], ref.vectors[p])
    raw = torch.load(out, weights_only=False)  # what the reference's loader sees: same keys and types
    assert set(raw) == {"string_to_token", "string_to_param"}
    assert isinstance(raw["string_to_param"], torch.nn.ParameterDict)
    assert "Managers merged." in capsys.readouterr().out


def test_merged_file_conditions_like_the_reference(tmp_path):
    from conftest import build_parity_model

    for name in PARITY_NAMES:
        model = build_parity_model(name, tmp_path / name)
        folder = fixture_path("parity", name, "merge")
        ref = load_file(str(folder / "merge.safetensors"))
        model.embedding_manager.load(folder / "merged.pt")
        prompts = json.loads(fixture_path("parity", name, "meta.json").read_text())["merge"]["merged_cond_prompts"]
        with torch.no_grad():
            cond = model.get_learned_conditioning(prompts)
        assert_close(cond, ref["merged_cond"], what=f"{name} merged_cond")


def test_merge_collisions_need_a_rename(tmp_path, capsys):
    folder = fixture_path("parity", "sd_tiny", "merge")
    tokenizer = str(fixture_path("tokenizers", "clip"))
    base = ["--manager_ckpts", str(folder / "A_star.pt"), str(folder / "A_star.pt"), "--output_path",
            str(tmp_path / "m.pt"), "-sd", "--tokenizer_path", tokenizer]
    assert merge_embeddings.main(base) == 1
    err = capsys.readouterr().err
    assert "placeholder '*'" in err and "--rename 2:*=" in err and not (tmp_path / "m.pt").exists()
    assert merge_embeddings.main(base + ["--rename", "2:*=@"]) == 0
    merged = read_embeddings(tmp_path / "m.pt")
    assert merged.tokens == {"*": 265, "@": 287}
    assert merge_embeddings.main(base + ["--rename", "2:*=two words"]) == 1
    assert "more than a single token" in capsys.readouterr().err


def test_merge_refuses_different_widths(tmp_path, capsys):
    write_official(EmbeddingSet({"*": torch.zeros(1, 16)}, {"*": 265}), tmp_path / "a.pt")
    write_official(EmbeddingSet({"@": torch.zeros(1, 768)}, {"@": 287}), tmp_path / "b.pt")
    argv = ["--manager_ckpts", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--output_path",
            str(tmp_path / "m.pt"), "-sd", "--tokenizer_path", str(fixture_path("tokenizers", "clip"))]
    assert merge_embeddings.main(argv) == 1
    assert "width 768" in capsys.readouterr().err
