"""Runs that are killed, resumed from a broken checkpoint, started twice in one second, or that diverge
(issue 14, points 1-4): the files on disk stay consistent and the result is the uninterrupted one."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_main import FAST, args, train

import main as train_main
from ldm.cli import RUN_DIR_ENV, RunDirs, claim_run_dir
from ldm.modules.embedding_formats import read_embeddings

SOAK = [*FAST, "lightning.modelcheckpoint.params.every_n_train_steps=4"]  # checkpoints at 4, 8, 12, 16, 20
KILLER = ["lightning.callbacks.killer.target=soak_callbacks.KillAtStep"]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1")


def _main(argv, **kw):
    return subprocess.Popen([sys.executable, str(REPO / "main.py"), *argv], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_embedding(tiny, tmp_path):
    """SIGKILL at 3 seeded random steps (mid-epoch: 6 steps per epoch), `--resume` each time: the final
    embedding is bitwise the uninterrupted run's. The resumed run restarts from the last saved step (every
    4) and replays the lost steps identically (resumable data order, per-batch seeds)."""
    kills = sorted(random.Random(14).sample(range(5, 20), 3))
    assert any(k % 6 and k % 4 for k in kills), kills  # at least one kill mid-epoch, between checkpoints
    straight = _main(args(tiny, tmp_path / "straight", steps=20) + SOAK)
    first = _main(args(tiny, tmp_path / "killed", steps=20) + SOAK + KILLER +
                  [f"lightning.callbacks.killer.params.step={kills[0]}"])
    out = first.communicate(timeout=600)[0]
    assert first.returncode == -signal.SIGKILL, out[-3000:]
    (logdir,) = (tmp_path / "killed").iterdir()
    for step in [*kills[1:], -1]:
        assert (logdir / "checkpoints" / "last.ckpt").is_file()
        resumed = _main(["--resume", str(logdir), "--max_steps", "20", "--no-test", "-t", *SOAK,
                         f"lightning.callbacks.killer.params.step={step}"])
        out = resumed.communicate(timeout=600)[0]
        assert resumed.returncode == (-signal.SIGKILL if step >= 0 else 0), out[-3000:]
    out = straight.communicate(timeout=600)[0]
    assert straight.returncode == 0, out[-3000:]
    (ref,) = (tmp_path / "straight").iterdir()
    a = read_embeddings(ref / "checkpoints" / "embeddings.pt").vectors["*"]
    b = read_embeddings(logdir / "checkpoints" / "embeddings.pt").vectors["*"]
    diverged = [s for s in (4, 8, 12, 16, 20) if not torch.equal(
        read_embeddings(ref / "checkpoints" / f"embeddings_gs-{s}.pt").vectors["*"],
        read_embeddings(logdir / "checkpoints" / f"embeddings_gs-{s}.pt").vectors["*"])]
    assert diverged == [], (kills, diverged)
    assert torch.equal(a, b)
    assert (logdir / "checkpoints" / "embeddings_gs-20.pt").is_file()


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory):
    """A finished 4-step run, copied per test."""
    return train(args(tiny, tmp_path_factory.mktemp("finished"), steps=4)).logdir


BROKEN = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "malicious": lambda data: b"cos\nsystem\n(S'echo pwned'\ntR.",  # a pickle that would run a command
    "not a checkpoint": None,  # an embeddings file renamed last.ckpt
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_failed_resume_leaves_the_run_untouched(finished_run, tmp_path, capsys, case):
    import shutil

    logdir = tmp_path / finished_run.name
    shutil.copytree(finished_run, logdir)
    last = logdir / "checkpoints" / "last.ckpt"
    if BROKEN[case] is None:
        shutil.copy(logdir / "checkpoints" / "embeddings.pt", last)
    else:
        last.write_bytes(BROKEN[case](last.read_bytes()))
    before = _digest(logdir)
    code = train_main.main(["--resume", str(logdir), "--max_steps", "8", "--no-test", "-t", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("main.py: error:") and str(last) in err[0], err
    assert _digest(logdir) == before  # embeddings.pt and last.ckpt byte for byte, nothing added


def test_claim_run_dir_is_atomic(tmp_path, monkeypatch):
    """Eight threads claiming the same folder name get eight folders; a DDP worker takes its launcher's."""
    dirs = RunDirs(str(tmp_path / "logs" / "2026_run"), "2026_run", "2026", "", "", None, [])
    got, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        got.append(claim_run_dir(dirs).logdir)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted([dirs.logdir] + [f"{dirs.logdir}_{i}" for i in range(1, 8)])
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(RUN_DIR_ENV, got[3])
    worker = claim_run_dir(dirs)
    assert worker.logdir == got[3] and worker.ckptdir == os.path.join(got[3], "checkpoints")
    assert len(os.listdir(tmp_path / "logs")) == 8


FROZEN = ("import sys, ldm.cli, main; ldm.cli.timestamp = lambda: '2026-01-01T00-00-00'; "
          "sys.exit(main.main(sys.argv[1:]))")


@pytest.mark.slow
def test_two_runs_in_the_same_second_get_their_own_folders(tiny, tmp_path):
    """Two main.py processes, same -n, same (frozen) timestamp, started together: two folders, two embeddings."""
    argv = args(tiny, tmp_path / "logs", steps=2)
    procs = [subprocess.Popen([sys.executable, "-c", FROZEN, *argv], cwd=REPO, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for p in procs:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-3000:]
    names = sorted(os.listdir(tmp_path / "logs"))
    assert names == ["data_images2026-01-01T00-00-00_run", "data_images2026-01-01T00-00-00_run_1"]
    for name in names:
        ckpts = tmp_path / "logs" / name / "checkpoints"
        assert (ckpts / "embeddings.pt").is_file() and (ckpts / "embeddings_gs-2.pt").is_file()
        assert len(list((tmp_path / "logs" / name / "configs").glob("*-project.yaml"))) == 1


def test_nonfinite_training_stops_and_keeps_the_last_finite_embedding(tiny, tmp_path, capsys):
    """A learning rate of 1e6 (tiny config): one line naming the step, exit 1, only finite vectors on disk."""
    logdir = tmp_path / "logs"
    argv = args(tiny, logdir, steps=20) + ["model.base_learning_rate=1e6",
                                           "lightning.modelcheckpoint.params.every_n_train_steps=1"]
    code = train_main.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("main.py: error: training stopped at step "), err
    step = int(err[0].split("training stopped at step ")[1].split()[0])
    (run,) = logdir.iterdir()
    files = sorted((run / "checkpoints").glob("embeddings*.pt"))
    for f in files:
        assert torch.isfinite(read_embeddings(f).vectors["*"]).all(), f
    assert not (run / "checkpoints" / f"embeddings_gs-{step}.pt").exists()
    if step > 1:
        assert (run / "checkpoints" / f"embeddings_gs-{step - 1}.pt").is_file()
