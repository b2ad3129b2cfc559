"""main.py end to end on a tiny config with a tiny checkpoint written here: files, frozen weights, exact
resume, bad input, and DDP on two CPU processes."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf

import main as train_main
from ldm.cli import TRAINER_FLAGS, get_parser
from ldm.modules.embedding_formats import read_embeddings
from ldm.training import Run, TrainOptions, fit, prepare

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


def args(tiny, logdir, *extra, steps=20, name="run"):
    config, ckpt, _, images = tiny
    return ["--base", str(config), "-t", "--actual_resume", str(ckpt), "-n", name, "--data_root", str(images),
            "--logdir", str(logdir), "--max_steps", str(steps), "--no-test", *extra, *FAST]


def train(argv) -> Run:
    """A run through main.py's own path: its command line turned into TrainOptions, then prepare and fit."""
    opts = train_main.options_from_args(argv)
    return fit(prepare(opts), opts)


def test_end_to_end_writes_files_and_learns_only_the_embedding(tiny, tmp_path):
    _, _, base, _ = tiny
    result = train(args(tiny, tmp_path / "logs"))
    model = result.model
    assert result.global_step == 20 and result.trainer.global_step == 20
    run = result.logdir
    assert result.embeddings == run / "checkpoints" / "embeddings.pt"
    assert result.snapshots == {s: run / "checkpoints" / f"embeddings_gs-{s}.pt" for s in (10, 20)}
    assert result.last_ckpt.is_file() and set(result.metrics) >= {"train/loss_step"}
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
    straight_dirs = train(args(tiny, tmp_path / "a", steps=20))
    first = train(args(tiny, tmp_path / "b", steps=10))
    resumed = train(["--resume", str(first.logdir), "--max_steps", "20", "--no-test", "-t", *FAST])
    assert resumed.global_step == 20 and resumed.logdir == first.logdir
    a = read_embeddings(Path(straight_dirs.logdir) / "checkpoints" / "embeddings.pt").vectors["*"]
    b = read_embeddings(Path(first.logdir) / "checkpoints" / "embeddings.pt").vectors["*"]
    assert (a - b).abs().max().item() <= 1e-6
    halfway = read_embeddings(Path(first.logdir) / "checkpoints" / "embeddings_gs-10.pt").vectors["*"]
    assert (a - halfway).abs().max().item() > 0.02  # the second half of training changed the embedding
    assert (Path(first.logdir) / "checkpoints" / "embeddings_gs-20.pt").is_file()


def test_progressive_resume_is_exact(tiny, tmp_path, monkeypatch):
    """progressive_words: the forward-call counter travels in the checkpoint, so a run resumed at step 10
    adds its vectors on the same calls as an uninterrupted run and ends bitwise equal to it (the reference
    restarted the count; docs/DIFFERENCES.md#progressive-counter-resumed)."""
    import ldm.modules.embedding_manager as em
    from ldm.models.diffusion.textual_inversion import PROGRESSIVE_COUNTER_KEY

    monkeypatch.setattr(em, "PROGRESSIVE_SCALE", 16)  # one more vector every 16 forward calls (not 2,000)
    # The first-stage cache is off so that this test isolates the counter (the cache's own round trip through
    # checkpoints is test_resume_is_exact's business).
    prog = ["--cache_first_stage", "false", "model.params.personalization_config.params.num_vectors_per_token=3",
            "model.params.personalization_config.params.progressive_words=True"]
    straight = train(args(tiny, tmp_path / "a", *prog, steps=20))
    first = train(args(tiny, tmp_path / "b", *prog, steps=10))
    saved = torch.load(first.last_ckpt, map_location="cpu", weights_only=True)[PROGRESSIVE_COUNTER_KEY]
    assert 16 <= saved < 32  # two vectors in use when the first half stopped
    resumed = train(["--resume", str(first.logdir), "--max_steps", "20", "--no-test", "-t", *prog, *FAST])
    assert resumed.global_step == 20
    counter = straight.model.embedding_manager.progressive_counter
    assert counter >= 32 and resumed.model.embedding_manager.progressive_counter == counter  # three at the end
    a = read_embeddings(straight.embeddings).vectors["*"]
    b = read_embeddings(resumed.embeddings).vectors["*"]
    assert a.shape == (3, 16) and torch.equal(a, b)


def test_placeholder_string_reaches_model_and_captions(tiny, tmp_path):
    dirs = train(args(tiny, tmp_path / "logs", "--placeholder_string", "@", "--init_word", "painting", steps=2))
    model = dirs.model
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


@pytest.mark.slow
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
    run = train(args(tiny, tmp_path / "logs", "-d", steps=2))
    name = run.logdir.name
    assert run.logdir == tmp_path / "logs" / "debug_runs" / name
    assert (tmp_path / "logs" / "debug_runs" / name / "configs").is_dir()
    assert not (tmp_path / "logs" / name).exists()


def test_frozen_weights_bf16_trains_the_fp32_embedding(tiny, tmp_path):
    _, _, base, _ = tiny
    run = train(args(tiny, tmp_path / "logs", "--frozen_weights", "bf16", steps=4))
    model = run.model
    assert run.global_step == 4
    sd = model.state_dict()
    w = "model.diffusion_model.input_blocks.0.0.weight"
    assert sd[w].dtype == torch.bfloat16 and torch.equal(sd[w], base[w].to(torch.bfloat16))
    vector = model.embedding_manager.string_to_param_dict["*"]
    assert vector.dtype == torch.float32
    assert not torch.equal(vector.detach(), model.embedding_manager.initial_embeddings["*"])


def test_library_train_equals_the_command_line(tiny, tmp_path):
    """ldm.training.train with keyword options gives the run main.py's flags give: same vectors, same files."""
    from ldm.training import train as library_train

    config, ckpt, _, images = tiny
    cli = train(args(tiny, tmp_path / "cli", steps=4))
    lib = library_train(str(config), actual_resume=str(ckpt), name="run", data_root=str(images),
                        logdir=str(tmp_path / "lib"), trainer={"max_steps": 4}, no_test=True, overrides=FAST)
    assert lib.logdir.parent == tmp_path / "lib" and lib.logdir.name.endswith("_run")
    assert lib.global_step == cli.global_step == 4
    a = read_embeddings(cli.embeddings).vectors["*"]
    assert torch.equal(read_embeddings(lib.embeddings).vectors["*"], a)
    assert sorted(lib.snapshots) == sorted(cli.snapshots)
    assert lib.model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.attention == "sdpa"
    with pytest.raises(TypeError, match="max_step"):
        library_train(str(config), max_step=4)


def test_every_flag_reaches_the_options():
    """Each main.py flag is a TrainOptions field or a trainer flag, so none is dropped on the way."""
    dests = {a.dest for a in get_parser()._actions if a.dest != "help"}
    assert dests - set(TRAINER_FLAGS) == TrainOptions.names() - {"overrides", "trainer"}
    opts = train_main.options_from_args(["--base", "a.yaml", "-t", "--max_steps", "7", "--gpus", "0,",
                                         "--attention", "math", "x.y=1"])
    assert opts.base == ["a.yaml"] and opts.overrides == ["x.y=1"] and opts.attention == "math"
    assert opts.trainer == {"max_steps": 7, "gpus": "0,"}
