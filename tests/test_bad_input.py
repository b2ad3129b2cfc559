"""Bad input at every entry point (issue 14 point 5): one line naming the culprit, a non-zero exit code, no
traceback, nothing written or changed; or, for input that may be meant, a warning."""

import hashlib
import logging
import math  # noqa: F401
from pathlib import Path

import pytest
import torch
from conftest import load_script
from omegaconf import OmegaConf
from PIL import Image
from test_main import args

import main as train_main
import merge_embeddings
from ldm.modules.embedding_formats import EmbeddingSet, write_official

TXT2IMG = load_script("txt2img")
STABLE = load_script("stable_txt2img")
CONVERT = load_script("convert_embeddings")
EVALUATE = load_script("evaluate_model")
BENCHMARK = load_script("benchmark")


def _emb(path: Path, placeholder="*", value=0.1, token=1008, dim=16) -> Path:
    write_official(EmbeddingSet({placeholder: torch.full((1, dim), value)}, {placeholder: token}), path)
    return path


def _file(path: Path, data=b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _images(folder: Path, size=(64, 64), n=2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (40 * i, 90, 200)).save(folder / f"{i}.png")
    return folder


def _truncated_jpeg(folder: Path) -> Path:
    _images(folder, n=1)
    buf = folder / "cut.jpg"
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, quality=95)
    data = buf.read_bytes()
    buf.write_bytes(data[: int(len(data) * 0.6)])
    return folder


def _bad_yaml(p: Path) -> Path:
    return _file(p / "bad.yaml", b"model:\n  target: x\n   params: [1, 2\n")


def M(t, p, *extra, steps=20):
    """main.py with the tiny config; `extra` comes last (later flags and overrides win)."""
    return args(t, p / "logs", steps=steps) + [str(x) for x in extra]


def M_no_steps(t, p, *extra):
    argv = args(t, p / "logs")
    i = argv.index("--max_steps")
    return argv[:i] + argv[i + 2:] + list(extra)


def S(t, p, *extra):
    """Sampling flags with the tiny config and checkpoint (only reached by the cases that get that far)."""
    config, ckpt, _, _ = t
    return ["--config", str(config), "--ckpt_path", str(ckpt), "--outdir", str(p / "out"), "--device", "cpu",
            "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "2", "--H", "64", "--W", "64", *map(str, extra)]


def SD(t, p, *extra):
    config, ckpt, _, _ = t
    return ["--config", str(config), "--ckpt", str(ckpt), "--outdir", str(p / "out"), "--device", "cpu",
            *map(str, extra)]


def _tokenizer(t):
    return OmegaConf.load(t[0]).model.params.cond_stage_config.params.tokenizer_path


# (entry point, argv builder (tiny, tmp_path) -> argv, text the one-line message must contain)
ERRORS = {
    # main.py: config keys
    "main unknown model param": ("main", lambda t, p: M(t, p, "model.params.foo=1"), "'foo'"),
    "main batchsize typo": ("main", lambda t, p: M(t, p, "data.params.batchsize=2"), "did you mean 'batch_size'"),
    "main top-level typo": ("main", lambda t, p: M(t, p, "modle.params.x=1"), "did you mean 'model'"),
    "main trainer key typo": ("main", lambda t, p: M(t, p, "lightning.trainer.max_step=5"), "did you mean 'max_steps'"),
    "main unet param typo": ("main", lambda t, p: M(t, p, "model.params.unet_config.params.model_channel=8"),
                             "did you mean 'model_channels'"),
    "main dataset param typo": ("main", lambda t, p: M(t, p, "data.params.train.params.sizee=8"),
                                "did you mean 'size'"),
    "main manager param typo": ("main", lambda t, p: M(
        t, p, "model.params.personalization_config.params.placeholder_string=x"), "placeholder_strings"),
    # main.py: types and ranges
    "main max_steps abc (yaml)": ("main", lambda t, p: M_no_steps(t, p, "lightning.trainer.max_steps=abc"),
                                  "max_steps"),
    "main lr fast": ("main", lambda t, p: M(t, p, "model.base_learning_rate=fast"), "model.base_learning_rate"),
    "main lr negative": ("main", lambda t, p: M(t, p, "model.base_learning_rate=-1"), "model.base_learning_rate"),
    "main lr nan": ("main", lambda t, p: M(t, p, "model.base_learning_rate=nan"), "model.base_learning_rate"),
    "main precision abc": ("main", lambda t, p: M(t, p, "--precision", "abc"), "--precision"),
    "main max_steps -5": ("main", lambda t, p: M(t, p, "--max_steps", "-5"), "--max_steps"),
    "main max_epochs abc": ("main", lambda t, p: M(t, p, "--max_epochs", "abc"), "--max_epochs"),
    "main seed abc": ("main", lambda t, p: M(t, p, "--seed", "abc"), "--seed"),
    "main attention choice": ("main", lambda t, p: M(t, p, "--attention", "fast"), "--attention"),
    "main batch_size 0": ("main", lambda t, p: M(t, p, "data.params.batch_size=0"), "data.params.batch_size"),
    "main batch_size 1.5": ("main", lambda t, p: M(t, p, "data.params.batch_size=1.5"), "data.params.batch_size"),
    "main accumulate 0": ("main", lambda t, p: M(t, p, "lightning.trainer.accumulate_grad_batches=0"),
                          "accumulate_grad_batches"),
    "main logdir is a file": ("main", lambda t, p: M(t, p, "--logdir", _file(p / "afile")), "--logdir"),
    "main logdir under a file": ("main", lambda t, p: M(t, p, "--logdir", _file(p / "afile") / "sub"), "--logdir"),
    "main gpus without cuda": ("main", lambda t, p: M(t, p, "--gpus", "0,"), "--gpus 0,"),
    "main manager ckpt other placeholder": ("main", lambda t, p: M(
        t, p, "--embedding_manager_ckpt", _emb(p / "at.pt", "@")), "at.pt"),
    "main manager ckpt nan": ("main", lambda t, p: M(
        t, p, "--embedding_manager_ckpt", _emb(p / "nan.pt", value=float("nan"))), "NaN"),
    "main malformed yaml": ("main", lambda t, p: ["--base", str(_bad_yaml(p)), "-t", "--logdir", str(p / "logs")],
                            "bad.yaml"),
    "main missing base": ("main", lambda t, p: ["--base", str(p / "none.yaml"), "-t"], "none.yaml"),
    "main empty placeholder": ("main", lambda t, p: M(t, p, "--placeholder_string", ""), "--placeholder_string"),
    "main empty init word": ("main", lambda t, p: M(t, p, "--init_word", ""), "--init_word"),
    "main resume missing": ("main", lambda t, p: ["--resume", str(p / "gone"), "-t"], "gone"),
    "main huge image": ("main_bomb", lambda t, p: M(t, p, "--data_root", _images(p / "big")), "big"),
    # sampling
    "txt2img n_samples 0": ("txt2img", lambda t, p: S(t, p, "--n_samples", 0), "--n_samples"),
    "txt2img ddim_steps 0": ("txt2img", lambda t, p: S(t, p, "--ddim_steps", 0), "--ddim_steps"),
    "txt2img ddim_steps 2000": ("txt2img", lambda t, p: S(t, p, "--ddim_steps", 2000), "--ddim_steps"),
    "txt2img ddim_steps -5": ("txt2img", lambda t, p: S(t, p, "--ddim_steps", -5), "--ddim_steps"),
    "txt2img n_iter 0": ("txt2img", lambda t, p: S(t, p, "--n_iter", 0), "--n_iter"),
    "txt2img H 30": ("txt2img", lambda t, p: S(t, p, "--H", 30), "--H"),
    "txt2img outdir under a file": ("txt2img", lambda t, p: S(t, p, "--outdir", _file(p / "f") / "o"), "--outdir"),
    "txt2img scale nan": ("txt2img", lambda t, p: S(t, p, "--scale", "nan"), "--scale"),
    "txt2img plms with eta": ("txt2img", lambda t, p: S(t, p, "--plms", "--ddim_eta", 1), "--plms"),
    "txt2img from-file missing": ("txt2img", lambda t, p: S(t, p, "--from-file", p / "none.txt"), "none.txt"),
    "txt2img missing ckpt": ("txt2img", lambda t, p: S(t, p, "--ckpt_path", p / "none.ckpt"), "none.ckpt"),
    "txt2img nan embedding": ("txt2img", lambda t, p: S(
        t, p, "--embedding_path", _emb(p / "nan.pt", value=float("nan"))), "NaN"),
    "txt2img n_samples abc": ("txt2img", lambda t, p: S(t, p, "--n_samples", "abc"), "--n_samples"),
    "stable W 100": ("stable", lambda t, p: SD(t, p, "--W", 100), "--W"),
    "stable precision abc": ("stable", lambda t, p: SD(t, p, "--precision", "abc"), "--precision"),
    "stable missing embedding": ("stable", lambda t, p: SD(t, p, "--embedding_path", p / "no.pt"), "no.pt"),
    "stable inf embedding": ("stable", lambda t, p: SD(
        t, p, "--embedding_path", _emb(p / "inf.pt", value=float("inf"))), "inf.pt"),
    # merge
    "merge nan input": ("merge", lambda t, p: ["--manager_ckpts", str(_emb(p / "a.pt")),
                                               str(_emb(p / "nan.pt", "@", float("nan"))),
                                               "--output_path", str(p / "m.pt")], "NaN"),
    "merge output is an input": ("merge", lambda t, p: ["--manager_ckpts", str(_emb(p / "a.pt")),
                                                        str(_emb(p / "b.pt", "@", token=1009)),
                                                        "--output_path", str(p / "a.pt")], "would replace"),
    "merge bad rename": ("merge", lambda t, p: ["--manager_ckpts", str(_emb(p / "a.pt")), "--output_path",
                                                str(p / "m.pt"), "--rename", "x"], "--rename"),
    "merge missing input": ("merge", lambda t, p: ["--manager_ckpts", str(p / "none.pt"), "--output_path",
                                                   str(p / "m.pt")], "none.pt"),
    "merge missing flag": ("merge", lambda t, p: ["--manager_ckpts", str(p / "none.pt")], "--output_path"),
    # convert
    "convert nan input": ("convert", lambda t, p: [str(_emb(p / "nan.pt", value=float("nan"))), str(p / "o.bin"),
                                                   "--to", "diffusers"], "NaN"),
    "convert output is the input": ("convert", lambda t, p: [str(_emb(p / "a.pt")), str(p / "a.pt"),
                                                             "--to", "official"], "would replace"),
    "convert two-word placeholder": ("convert", lambda t, p: [str(_emb(p / "a.pt")), str(p / "o.bin"), "--to",
                                                              "diffusers", "--placeholder", "two words"],
                                     "--placeholder"),
    "convert empty placeholder": ("convert", lambda t, p: [str(_emb(p / "a.pt")), str(p / "o.bin"), "--to",
                                                           "diffusers", "--placeholder", ""], "--placeholder"),
    "convert unknown format": ("convert", lambda t, p: [str(_emb(p / "a.pt")), str(p / "o.bin"), "--to", "png"],
                               "--to"),
    "convert not an embedding": ("convert", lambda t, p: [str(_file(p / "junk.pt", b"junk")), str(p / "o.bin"),
                                                          "--to", "diffusers"], "junk.pt"),
    # evaluation and benchmark
    "evaluate n_samples 0": ("evaluate", lambda t, p: ["--data_dir", str(_images(p / "imgs")), "--n_samples", "0",
                                                       "--out_dir", str(p / "ev")], "--n_samples"),
    "evaluate missing data_dir": ("evaluate", lambda t, p: ["--data_dir", str(p / "none"), "--out_dir",
                                                            str(p / "ev")], "--data_dir"),
    "evaluate scale abc": ("evaluate", lambda t, p: ["--data_dir", str(p), "--scale", "abc"], "--scale"),
    "benchmark unknown variant": ("benchmark", lambda t, p: ["--config", str(t[0]), "--variants", "turbo"],
                                  "turbo"),
    "benchmark steps abc": ("benchmark", lambda t, p: ["--config", str(t[0]), "--steps", "abc"], "--steps"),
}

ENTRY = {
    "main": train_main.main, "main_bomb": train_main.main, "txt2img": TXT2IMG.main, "stable": STABLE.main,
    "merge": merge_embeddings.main, "convert": CONVERT.main, "evaluate": EVALUATE.main, "benchmark": BENCHMARK.main,
}


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _call(entry: str, argv: list[str]) -> int:
    try:
        return ENTRY[entry](argv)
    except SystemExit as e:  # argparse, or SystemExit("message"), which Python prints to stderr, exit 1
        if isinstance(e.code, str):
            import sys

            print(e.code, file=sys.stderr)
            return 1
        return int(e.code or 0)


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys, case):
    entry, build, expected = ERRORS[case]
    if case == "main gpus without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    if entry == "main_bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 64x64 images are then "huge" (> 2x the limit)
    monkeypatch.delenv("TI_DEBUG", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # default output folders of the scripts land here, and would be seen
    argv = build(tiny, tmp_path)
    before = _snapshot(tmp_path)
    code = _call(entry, argv)
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert code != 0, (case, out.err[-2000:])
    assert len(lines) == 1, lines
    assert ": error: " in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in out.err
    assert _snapshot(tmp_path) == before, "files were written or changed"


def test_debug_env_shows_the_traceback(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TI_DEBUG", "1")
    with pytest.raises(ValueError, match="model.base_learning_rate"):
        train_main.main(M(tiny, tmp_path, "model.base_learning_rate=fast"))
    with pytest.raises(ValueError, match="--n_samples"):
        TXT2IMG.main(S(tiny, tmp_path, "--n_samples", "0"))


WARNINGS = {
    "truncated jpeg": (lambda t, p: M(t, p, "--data_root", _truncated_jpeg(p / "cut"), steps=1), "truncated"),
    "1x1 image": (lambda t, p: M(t, p, "--data_root", _images(p / "tiny_imgs", size=(1, 1)), steps=1), "upscaled"),
}


@pytest.mark.parametrize("case", list(WARNINGS))
def test_doubtful_images_warn_and_train(tiny, tmp_path, caplog, case):
    build, expected = WARNINGS[case]
    with caplog.at_level(logging.WARNING):
        assert train_main.main(build(tiny, tmp_path)) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and expected in r.getMessage()]
    assert len(warned) >= 1, caplog.text[-2000:]


def test_prompt_without_the_loaded_placeholder_warns(tiny, tmp_path, caplog, capsys):
    """Embeddings for '@', prompt with '*': sampling runs, with a warning that the learned word is unused."""
    from ldm.modules.embedding_manager import token_function

    token = token_function(False, _tokenizer(tiny))("@")
    emb = _emb(tmp_path / "at.pt", "@", token=token)
    argv = S(tiny, tmp_path, "--embedding_path", emb, "--prompt", "a photo of *", "--seed", "1",
             "--tokenizer_path", _tokenizer(tiny))
    with caplog.at_level(logging.WARNING):
        assert TXT2IMG.main(argv) == 0
    assert "learned word is unused" in caplog.text
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1
