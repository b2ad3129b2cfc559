"""The sampling scripts' `--negative_prompt` (and `PROMPT --neg NEGATIVE` lines of `--from-file`), prompt
weighting flags and `--sampler`, on the tiny parity models, against the sampling loop written out here."""

import pytest
import torch
from conftest import PARITY_NAMES, fixture_path, load_script, parity_config, parity_weights
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm.generation import SAMPLERS, split_negative
from ldm.loading import load_model
from ldm.modules.embedding_formats import EmbeddingSet, write_official
from ldm.prompt_weighting import weighted_conditioning
from ldm.scripts_common import run_script

SEED, STEPS, SCALE, PROMPT = 7, 2, 5.0, "a photo of *"


@pytest.fixture(scope="module", params=PARITY_NAMES)
def setup(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    sd = load_file(str(parity_weights(name)))
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("embedding_manager.")}},
               tmp / "base.ckpt")
    cfg = parity_config(name)
    OmegaConf.save(cfg, tmp / "config.yaml")
    emb = load_file(str(fixture_path("parity", name, "embeddings.safetensors")))["nv1_perturbed"]
    import json

    token = json.loads(fixture_path("parity", name, "meta.json").read_text())["placeholder_token_id"]
    write_official(EmbeddingSet({"*": emb}, {"*": token}), tmp / "star.pt")
    x_T = load_file(str(fixture_path("parity", name, "sampling.safetensors")))["x_T"]
    save_file({"x_T": x_T}, str(tmp / "x_T.safetensors"))
    return name, tmp, cfg.model.params.cond_stage_config.params.tokenizer_path


def script_run(setup, out, *extra, prompt=PROMPT):
    """Run the script; returns (exit code, latents or None, PNG texts)."""
    name, tmp, tokenizer = setup
    script = load_script("stable_txt2img" if name == "sd_tiny" else "txt2img")
    ckpt_flag = "--ckpt" if name == "sd_tiny" else "--ckpt_path"
    argv = ["--n_samples", "2", "--n_iter", "1", "--ddim_steps", str(STEPS), "--scale", str(SCALE),
            "--seed", str(SEED), "--H", "64", "--W", "64", "--config", str(tmp / "config.yaml"), ckpt_flag,
            str(tmp / "base.ckpt"), "--device", "cpu", "--embedding_path", str(tmp / "star.pt"),
            "--start_code", str(tmp / "x_T.safetensors"), "--outdir", str(out), "--precision", "full",
            "--save_latents", "--skip_grid", "--tokenizer_path", tokenizer]
    if "--from-file" not in extra:
        argv += ["--prompt", prompt]
    parser = script.parser() if hasattr(script, "parser") else script.build_parser("x", script.DEFAULTS)
    runner = getattr(script, "run_laion_aware", None) or script.run
    code = run_script("script", parser, runner, [*argv, *map(str, extra)])
    if code != 0:
        return code, None, []
    latents = load_file(str(out / "samples" / "latents.safetensors"))["samples"]
    texts = [Image.open(out / "samples" / f"{i:05}.png").text for i in range(latents.shape[0])]
    return code, latents, texts


@pytest.fixture(scope="module")
def default_run(setup, tmp_path_factory):
    """The run without any new flag, shared by the tests."""
    return script_run(setup, tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def today(setup, loaded):
    """`todays_loop` for the default prompt and the empty negative prompt."""
    return todays_loop(setup, loaded, 2 * [PROMPT], 2 * [""])


@pytest.fixture(scope="module")
def loaded(setup):
    name, tmp, tokenizer = setup
    model = load_model(str(tmp / "config.yaml"), str(tmp / "base.ckpt"), tokenizer_path=tokenizer, device="cpu")
    model.embedding_manager.load_files([str(tmp / "star.pt")])
    return model


def todays_loop(setup, model, prompts, negatives, weighted=False, sampler="ddim"):
    """The scripts' loop before negative prompts: seed, x_T from the file, c and uc, one sample call."""
    _, tmp, _ = setup
    encode = (lambda p: weighted_conditioning(model, p)) if weighted else model.get_learned_conditioning
    torch.manual_seed(SEED)
    x_T = load_file(str(tmp / "x_T.safetensors"))["x_T"]
    with torch.no_grad(), model.ema_scope():
        uc, c = encode(negatives), encode(prompts)
        z, _ = SAMPLERS[sampler](model).sample(S=STEPS, conditioning=c, batch_size=len(prompts), shape=(4, 8, 8),
                                              verbose=False, unconditional_guidance_scale=SCALE,
                                              unconditional_conditioning=uc, eta=0.0, x_T=x_T[:len(prompts)])
    return z.float()


def test_empty_negative_prompt_reproduces_todays_samples_bitwise(setup, today, default_run, tmp_path):
    _, default, texts = default_run
    _, empty, _ = script_run(setup, tmp_path, "--negative_prompt", "")
    assert torch.equal(default, today) and torch.equal(empty, today)
    assert texts[0]["negative_prompt"] == "" and texts[0]["sampler"] == "ddim"


def test_a_negative_prompt_changes_the_samples(setup, loaded, today, tmp_path):
    expected = todays_loop(setup, loaded, 2 * [PROMPT], 2 * ["a sculpture"])
    _, ours, texts = script_run(setup, tmp_path, "--negative_prompt", "a sculpture")
    assert torch.equal(ours, expected)
    assert not torch.allclose(ours, today, atol=1e-3)
    assert [t["negative_prompt"] for t in texts] == ["a sculpture"] * 2


@pytest.mark.parametrize("line,expected", [
    ("a photo of *", ("a photo of *", "DEFAULT")),
    ("a photo of * --neg blurry, dark", ("a photo of *", "blurry, dark")),
    ("a photo of *\t--neg\tblurry", ("a photo of *", "blurry")),
    ("a photo of * --neg", ("a photo of *", "")),
    ("a photo of * --neg a --neg b", ("a photo of *", "a --neg b")),
    ("a photo --negative of *", ("a photo --negative of *", "DEFAULT")),
    ("--neg blurry", ("", "blurry")),
])
def test_the_from_file_syntax(line, expected):
    assert split_negative(line, "DEFAULT") == expected


def test_from_file_lines_carry_their_negative_prompts(setup, loaded, tmp_path):
    """Line 1 has its own negative prompt, line 2 falls back to --negative_prompt."""
    if setup[0] != "ldm_tiny":
        pytest.skip("the file syntax is the shared parser's; one model suffices")
    (tmp_path / "p.txt").write_text("a photo of * --neg a sculpture\na rendering of a *\n")
    _, ours, texts = script_run(setup, tmp_path / "out", "--from-file", tmp_path / "p.txt",
                                "--negative_prompt", "a painting")
    expected = todays_loop(setup, loaded, ["a photo of *", "a rendering of a *"], ["a sculpture", "a painting"])
    assert torch.equal(ours, expected)
    assert [(t["prompt"], t["negative_prompt"]) for t in texts] == [("a photo of *", "a sculpture"),
                                                                   ("a rendering of a *", "a painting")]


def test_weighted_prompts_in_the_script(setup, loaded, today, tmp_path):
    """`(*:1.5)` in the prompt is weighted; --no_prompt_weighting passes the brackets to the tokenizer."""
    prompt = "a photo of (*:1.5)"
    _, ours, _ = script_run(setup, tmp_path / "w", prompt=prompt)
    assert torch.equal(ours, todays_loop(setup, loaded, 2 * [prompt], 2 * [""], weighted=True))
    assert not torch.allclose(ours, today, atol=1e-3)
    _, literal, _ = script_run(setup, tmp_path / "l", "--no_prompt_weighting", prompt=prompt)
    assert torch.equal(literal, todays_loop(setup, loaded, 2 * [prompt], 2 * [""]))


def test_sampler_flag_and_the_plms_alias(setup, loaded, tmp_path):
    if setup[0] != "ldm_tiny":
        pytest.skip("the flags are the shared parser's; one model suffices")
    _, dpm, texts = script_run(setup, tmp_path / "d", "--sampler", "dpmpp2m")
    assert torch.equal(dpm, todays_loop(setup, loaded, 2 * [PROMPT], 2 * [""], sampler="dpmpp2m"))
    assert texts[0]["sampler"] == "dpmpp2m"
    _, plms_alias, texts = script_run(setup, tmp_path / "p1", "--plms")
    _, plms, _ = script_run(setup, tmp_path / "p2", "--sampler", "plms")
    assert torch.equal(plms_alias, plms) and texts[0]["sampler"] == "plms"
    assert torch.equal(plms, todays_loop(setup, loaded, 2 * [PROMPT], 2 * [""], sampler="plms"))


@pytest.mark.parametrize("extra,message", [
    (["--plms", "--sampler", "ddim"], "--plms with --sampler ddim"),
    (["--sampler", "dpmpp2m", "--ddim_eta", "1"], "--sampler dpmpp2m with --ddim_eta"),
    (["--sampler", "plms", "--ddim_eta", "1"], "--sampler plms with --ddim_eta"),
])
def test_bad_sampler_flags(setup, tmp_path, capsys, extra, message):
    if setup[0] != "ldm_tiny":
        pytest.skip("the flags are the shared parser's")
    code, _, _ = script_run(setup, tmp_path, *extra)
    assert code == 1 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script_run(setup, tmp_path, "--sampler", "euler")
    assert "invalid choice: 'euler'" in capsys.readouterr().err


def test_a_file_line_without_a_prompt_is_refused(setup, tmp_path, capsys):
    if setup[0] != "ldm_tiny":
        pytest.skip("the file syntax is the shared parser's")
    (tmp_path / "p.txt").write_text("a photo of *\n --neg blurry\n")
    code, _, _ = script_run(setup, tmp_path / "out", "--from-file", tmp_path / "p.txt")
    assert code == 1 and "line 2: no prompt before '--neg'" in capsys.readouterr().err
