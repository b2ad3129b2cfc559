"""main.py end to end on a tiny config with a tiny checkpoint written here: files, frozen weights, exact
resume, bad input, and DDP on two CPU processes."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, fixture_path, parity_config
from omegaconf import OmegaConf
from safetensors.torch import load_file

import main as train_main
from ldm.cli import parse_args
from ldm.modules.embedding_formats import read_embeddings

FAST = [  # keep a 20-step CPU run to a few seconds
    "data.params.batch_size=2",
    "data.params.train.params.repeats=4",  # 12 items -> 6 steps per epoch, so runs cross epochs
    "lightning.trainer.num_sanity_val_steps=0",
    "lightning.trainer.log_every_n_steps=1",
    "lightning.modelcheckpoint.params.every_n_train_steps=10",
    "lightning.callbacks.image_logger.target=main.ImageLogger",
    "lightning.callbacks.image_logger.params.batch_frequency=10",
    "lightning.callbacks.image_logger.params.max_images=2",
    "lightning.callbacks.image_logger.params.increase_log_steps=False",
    "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config path, base checkpoint, base state dict, image folder) for the tiny LDM-style model."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = parity_config("ldm_tiny")
    # the fixture's weights: random everywhere (a freshly initialised UNet zero-inits its attention output
    # projections, so the text, and with it the embedding, would get no gradient)
    sd = load_file(str(fixture_path("parity", "ldm_tiny", "model.safetensors")))
    base = {k: v for k, v in sd.items() if not k.startswith("embedding_manager.")}
    torch.save({"state_dict": base}, root / "base.ckpt")
    OmegaConf.save(cfg, root / "tiny.yaml")
    return root / "tiny.yaml", root / "base.ckpt", base, fixture_path("parity", "ldm_tiny", "data_images")


def args(tiny, logdir, *extra, steps=20, name="run"):
    config, ckpt, _, images = tiny
    return ["--base", str(config), "-t", "--actual_resume", str(ckpt), "-n", name, "--data_root", str(images),
            "--logdir", str(logdir), "--max_steps", str(steps), "--no-test", *extra, *FAST]


def train(argv):
    opt, unknown = parse_args(argv)
    prepared = train_main.prepare(opt, unknown)
    trainer = train_main.run(opt, *prepared)
    return trainer, prepared[-1], prepared[0]


def test_end_to_end_writes_files_and_learns_only_the_embedding(tiny, tmp_path):
    _, _, base, _ = tiny
    trainer, model, dirs = train(args(tiny, tmp_path / "logs"))
    assert trainer.global_step == 20
    run = Path(dirs.logdir)
    assert run.name.startswith("data_images") and run.name.endswith("_run")
    ckpts = run / "checkpoints"
    for f in ("embeddings.pt", "embeddings_gs-10.pt", "embeddings_gs-20.pt", "last.ckpt"):
        assert (ckpts / f).is_file(), f
    assert len(list((run / "configs").glob("*-project.yaml"))) == 1
    assert len(list((run / "configs").glob("*-lightning.yaml"))) == 1
    assert (run / "images" / "train" / "samples_scaled_gs-000010_e-000001_b-000003.jpg").is_file()
    assert (ckpts / "last.ckpt").stat().st_size < 50_000  # slim: no frozen weights inside

    emb = read_embeddings(ckpts / "embeddings.pt")  # weights-only reload
    assert emb.tokens == {"*": 1008}
    learned = model.embedding_manager.string_to_param_dict["*"].detach()
    assert torch.equal(emb.vectors["*"], learned)
    moved = (learned - model.embedding_manager.initial_embeddings["*"]).abs().max().item()
    assert moved > 0.05  # 20 AdamW steps at lr 0.01: the embedding really learns
    losses = [float(r["train/loss_step"]) for r in csv.DictReader(open(run / "csv" / "version_0" / "metrics.csv"))
              if r.get("train/loss_step")]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    state = model.state_dict()
    changed = [k for k, v in base.items() if not torch.equal(state[k], v)]
    assert changed == []  # UNet, autoencoder and text encoder bitwise unchanged
    saved_cfg = OmegaConf.load(next((run / "configs").glob("*-project.yaml")))
    assert saved_cfg.data.params.train.params.placeholder_token == "*"


def test_resume_is_exact(tiny, tmp_path):
    _, _, straight_dirs = train(args(tiny, tmp_path / "a", steps=20))
    _, _, first = train(args(tiny, tmp_path / "b", steps=10))
    trainer, _, resumed = train(["--resume", first.logdir, "--max_steps", "20", "--no-test", "-t", *FAST])
    assert trainer.global_step == 20 and resumed.logdir == first.logdir
    a = read_embeddings(Path(straight_dirs.logdir) / "checkpoints" / "embeddings.pt").vectors["*"]
    b = read_embeddings(Path(first.logdir) / "checkpoints" / "embeddings.pt").vectors["*"]
    assert (a - b).abs().max().item() <= 1e-6
    halfway = read_embeddings(Path(first.logdir) / "checkpoints" / "embeddings_gs-10.pt").vectors["*"]
    assert (a - halfway).abs().max().item() > 0.02  # the second half of training changed the embedding
    assert (Path(first.logdir) / "checkpoints" / "embeddings_gs-20.pt").is_file()


def test_placeholder_string_reaches_model_and_captions(tiny, tmp_path):
    _, model, dirs = train(args(tiny, tmp_path / "logs", "--placeholder_string", "@", "--init_word", "painting",
                                steps=2))
    assert list(model.embedding_manager.string_to_token_dict) == ["@"]
    cfg = OmegaConf.load(next((Path(dirs.logdir) / "configs").glob("*-project.yaml")))
    assert cfg.data.params.train.params.placeholder_token == "@"
    assert cfg.model.params.personalization_config.params.initializer_words[0] == "painting"


BAD_INPUTS = {
    "missing data_root": (lambda t, p: ["--data_root", str(p / "nope")], "nope"),
    "empty data_root": (lambda t, p: ["--data_root", str(_mkdir(p / "empty"))], "empty"),
    "no images": (lambda t, p: ["--data_root", str(_with_file(p / "txt", "notes.txt", b"hello"))], "no image"),
    "corrupt image": (lambda t, p: ["--data_root", str(_with_file(p / "bad", "x.png", b"\x89PNG garbage"))], "x.png"),
    "multi-token placeholder": (lambda t, p: ["--placeholder_string", "two words"], "two words"),
    "multi-token init word": (lambda t, p: ["--init_word", "sculpture painting"], "sculpture painting"),
    "missing checkpoint": (lambda t, p: ["--actual_resume", str(p / "none.ckpt")], "none.ckpt"),
    "other model": (lambda t, p: ["--actual_resume", str(_other_model(p))], "unexpected keys"),
    "name with resume": (lambda t, p: ["--resume", str(p)], "--resume"),
}


def _mkdir(p):
    p.mkdir(parents=True, exist_ok=True)
    return p


def _with_file(folder, name, data):
    _mkdir(folder)
    (folder / name).write_bytes(data)
    return folder


def _other_model(p):
    torch.save({"state_dict": {"model.weight": torch.zeros(2, 2)}}, p / "other.ckpt")
    return p / "other.ckpt"


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(tiny, tmp_path, capsys, case):
    make_extra, expected = BAD_INPUTS[case]
    logdir = _mkdir(tmp_path / "logs")
    (logdir / "keep.txt").write_text("untouched")
    argv = args(tiny, logdir) + make_extra(tiny, tmp_path)  # later flags win
    code = train_main.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("main.py: error:") and expected in err[0], err
    assert sorted(os.listdir(logdir)) == ["keep.txt"] and (logdir / "keep.txt").read_text() == "untouched"


def test_ddp_two_cpu_processes(tiny, tmp_path):
    """Two gloo processes: same embedding on both ranks (checked by EmbeddingSyncCheck), one set of files."""
    argv = args(tiny, tmp_path / "logs", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", steps=6)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(REPO / "main.py"), *argv], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "embedding identical on 2 ranks: max difference 0" in out.stdout + out.stderr
    runs = os.listdir(tmp_path / "logs")
    assert len(runs) == 1, runs
    ckpts = tmp_path / "logs" / runs[0] / "checkpoints"
    assert (ckpts / "embeddings.pt").is_file() and (ckpts / "embeddings_gs-6.pt").is_file()


def test_data_root_is_required(tiny, tmp_path, capsys):
    config, ckpt, _, _ = tiny
    argv = ["--base", str(config), "-t", "--actual_resume", str(ckpt), "--logdir", str(tmp_path), *FAST]
    assert train_main.main(argv) == 1
    assert "--data_root is required" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_debug_run_moves_to_debug_runs(tiny, tmp_path):
    opt, unknown = parse_args(args(tiny, tmp_path / "logs", "-d", steps=2))
    prepared = train_main.prepare(opt, unknown)
    train_main.run(opt, *prepared)
    name = Path(prepared[0].logdir).name
    assert (tmp_path / "logs" / "debug_runs" / name / "configs").is_dir()
    assert not (tmp_path / "logs" / name).exists()


def test_frozen_weights_bf16_trains_the_fp32_embedding(tiny, tmp_path):
    _, _, base, _ = tiny
    trainer, model, _ = train(args(tiny, tmp_path / "logs", "--frozen_weights", "bf16", steps=4))
    assert trainer.global_step == 4
    sd = model.state_dict()
    w = "model.diffusion_model.input_blocks.0.0.weight"
    assert sd[w].dtype == torch.bfloat16 and torch.equal(sd[w], base[w].to(torch.bfloat16))
    vector = model.embedding_manager.string_to_param_dict["*"]
    assert vector.dtype == torch.float32
    assert not torch.equal(vector.detach(), model.embedding_manager.initial_embeddings["*"])
