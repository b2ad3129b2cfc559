"""Time to a good embedding on the bundled toy model: quality against training steps and seconds, per recipe.

    python scripts/time_to_quality.py --recipes baseline fast --concepts ring star --seeds 0 1 2 \
        --steps 300 --every 10 --samples 64 --out outputs/time_to_quality

For every recipe, concept (the never-named ring, the "deleted" star) and seed it inverts 5 images of the
concept with the training code (`ldm.training.train`), saving the embedding every `--every` steps, and
scores every snapshot on the SAME starting noises (common random numbers) with the toy scorer:
- concept_rate: the fraction of "a photo of a *" samples scored as the concept (G2's rate);
- joint_rate: the fraction of "a red *" samples that are the concept and red (G3's joint rate);
- prob: the scorer's mean probability of the concept on the "a photo of a *" samples.
Each rate has a 95% bootstrap interval over its samples. Training seconds come from `TrainingClock`
(compute only). For the `--stop_recipes` (the baseline by default) every concept and seed is also trained
once more with `main.py --early_stopping` (the rule's defaults, `ldm.early_stopping`), and the embedding
that run keeps is scored the same way and set against the full run's plateau.

Definitions: a run's plateau is the mean of its rates over the last third of its steps; the target is the
baseline's plateau (mean over seeds) minus 0.05; a run's time to target is the first snapshot from which its
rate stays at or above the target until the end.

Outputs in `--out`: `snapshots.csv` (one row per snapshot), `summary.json` (tables), `curves.png`, and the
runs and score caches, reused when the script is started again with the same settings (resumable).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluation.time_to_quality import bootstrap_ci, draw_curves, summarize  # noqa: E402
from ldm.data.toy_world import ATTRIBUTE_VALUES, write_concept_images  # noqa: E402
from ldm.loading import load_model  # noqa: E402
from ldm.scripts_common import run_script  # noqa: E402
from ldm.toy import gates  # noqa: E402
from ldm.toy.scorer import load_scorer  # noqa: E402
from ldm.training import train  # noqa: E402
from ldm.util import atomic_write  # noqa: E402

#: recipe -> (overlay configs on top of --config, the embedding file stem it delivers)
RECIPES = {
    "baseline": ([], "embeddings"),
    "fast": (["configs/recipes/fast.yaml"], "embeddings_ema"),
}
PROMPTS = {"concept": "a photo of a *", "joint": "a red *"}
NOISE_SEED = {"concept": 7001, "joint": 7002}
SCORES = ("concept_rate", "joint_rate", "prob")  # the same starting noises for every snapshot of every run


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["baseline", "fast"], choices=list(RECIPES))
    p.add_argument("--concepts", nargs="+", default=["ring", "star"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="training steps of every run")
    p.add_argument("--every", type=int, default=10, help="snapshot (and early-stopping evaluation) interval")
    p.add_argument("--samples", type=int, default=64, help="samples per prompt and snapshot")
    p.add_argument("--ddim_steps", type=int, default=20)
    p.add_argument("--score_steps", type=int, nargs="+", default=None,
                   help="score only these snapshot steps (default: every snapshot); step 0, the initializer, "
                        "is always scored")
    p.add_argument("--config", default="configs/toy/invert.yaml")
    p.add_argument("--ckpt", default="models/toy/toy_ldm.safetensors")
    p.add_argument("--scorer", default="assets/toy/scorer.safetensors")
    p.add_argument("--init_word", default="shape")
    p.add_argument("--stop_recipes", nargs="*", default=["baseline"],
                   help="recipes whose runs are also trained with early stopping (none: skip)")
    p.add_argument("--cached_only", action="store_true",
                   help="score nothing new: summarize the scores cached so far (runs without any are left out)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--out", default="outputs/time_to_quality")
    return p


def invert(opt, recipe: str, shape: str, seed: int, logdir: Path, overrides: list[str], **options):
    """One inversion of the concept's 5 images (written beside the run) with the recipe's overlays."""
    images = Path(opt.out) / "runs" / recipe / f"{shape}_seed{seed}" / "images"
    write_concept_images(images, shape, n=5, seed=seed)
    return train([opt.config, *RECIPES[recipe][0]], actual_resume=opt.ckpt, data_root=str(images),
                 name=f"{recipe}_{shape}", logdir=str(logdir), seed=seed, init_word=opt.init_word,
                 datadir_in_name=False, no_test=True, trainer={"max_steps": opt.steps},
                 overrides=["lightning.callbacks.image_logger.params.disabled=true", *overrides], **options)


def run_inversion(opt, recipe: str, shape: str, seed: int) -> dict:
    """Train one run (or reuse a finished one); returns its record (snapshots, clock)."""
    folder = Path(opt.out) / "runs" / recipe / f"{shape}_seed{seed}"
    record_path = folder / "record.json"
    settings = {"recipe": recipe, "shape": shape, "seed": seed, "steps": opt.steps, "every": opt.every,
                "config": opt.config, "ckpt": opt.ckpt, "init_word": opt.init_word}
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["settings"] == settings:
            return record
    stem = RECIPES[recipe][1]
    run = invert(opt, recipe, shape, seed, folder / "logs",
                 [f"lightning.modelcheckpoint.params.every_n_train_steps={opt.every}",
                  "lightning.callbacks.training_clock.target=ldm.training_clock.TrainingClock"])
    clock = json.loads((run.logdir / "training_clock.json").read_text())["seconds"]
    files = {int(p.stem.rsplit("-", 1)[1]): str(p) for p in run.ckptdir.glob(f"{stem}_gs-*.pt")}
    record = {"settings": settings, "snapshots": {str(k): files[k] for k in sorted(files)}, "seconds": clock}
    atomic_write(record_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


def stopped_run(opt, model, scorer, recipe: str, shape: str, seed: int) -> dict:
    """The run again with `--early_stopping` (the rule's defaults): where it stopped, the curve, and the
    scores of the embedding it kept (cached beside the runs)."""
    folder = Path(opt.out) / "runs" / recipe / f"{shape}_seed{seed}"
    record_path = folder / "stopped.json"
    settings = {"recipe": recipe, "shape": shape, "seed": seed, "steps": opt.steps, "config": opt.config,
                "ckpt": opt.ckpt, "init_word": opt.init_word, "samples": opt.samples, "ddim_steps": opt.ddim_steps}
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["settings"] == settings:
            return record
    if opt.cached_only:
        return {}
    run = invert(opt, recipe, shape, seed, folder / "stopped", [], early_stopping=True)
    curve = json.loads((run.logdir / "early_stopping.json").read_text())
    model.embedding_manager.load(str(run.embeddings))
    scores = score_embedding(model, scorer, shape, opt.samples, opt.ddim_steps)
    record = {"settings": settings, "stopped_at": curve["stopped_at"], "final_step": run.global_step,
              "embedding": str(run.embeddings), "curve": {k: curve[k] for k in ("steps", "losses",
                                                                               "averaged_steps")},
              **{k: scores[k] for k in SCORES}, **{f"{k}_ci": scores[f"{k}_ci"] for k in SCORES}}
    atomic_write(record_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


@torch.no_grad()
def score_embedding(model, scorer, shape: str, samples: int, ddim_steps: int) -> dict:
    """Concept rate, joint rate ("a red *") and mean concept probability, with per-sample outcomes."""
    shape_index = ATTRIBUTE_VALUES["shape"].index(shape)
    concept_scores = scorer.score(gates.sample(model, samples * [PROMPTS["concept"]], seed=NOISE_SEED["concept"],
                                               steps=ddim_steps))
    joint_scores = scorer.score(gates.sample(model, samples * [PROMPTS["joint"]], seed=NOISE_SEED["joint"],
                                             steps=ddim_steps))
    concept_hits = [v == shape for v in concept_scores["shape"]["value"]]
    joint_hits = [s == shape and c == "red" for s, c in zip(joint_scores["shape"]["value"],
                                                              joint_scores["color"]["value"], strict=True)]
    probs = concept_scores["shape"]["probs"][:, shape_index]
    return {"concept_rate": float(np.mean(concept_hits)), "joint_rate": float(np.mean(joint_hits)),
            "prob": float(probs.mean()), "concept_rate_ci": bootstrap_ci(concept_hits),
            "joint_rate_ci": bootstrap_ci(joint_hits), "prob_ci": bootstrap_ci(probs.tolist())}


def score_run(opt, model, scorer, record: dict, initial: dict[str, torch.Tensor]) -> dict[int, dict]:
    """Scores of every snapshot of a run (step 0: the initializer word's vector), cached beside the run."""
    s = record["settings"]
    cache_path = Path(opt.out) / "scores" / s["recipe"] / f"{s['shape']}_seed{s['seed']}.json"
    key = {"samples": opt.samples, "ddim_steps": opt.ddim_steps, "settings": s}
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if cache.get("key") != key:
        cache = {"key": key, "scores": {}}
    manager = model.embedding_manager
    wanted = set(map(str, opt.score_steps)) if opt.score_steps else set(record["snapshots"])
    for step in ["0", *record["snapshots"]]:
        if step in cache["scores"] or (step != "0" and step not in wanted) or opt.cached_only:
            continue
        if step == "0":
            with torch.no_grad():
                for k, v in initial.items():
                    manager.string_to_param_dict[k].copy_(v)
        else:
            manager.load(record["snapshots"][step])
        cache["scores"][step] = score_embedding(model, scorer, s["shape"], opt.samples, opt.ddim_steps)
        atomic_write(cache_path, lambda tmp: Path(tmp).write_text(json.dumps(cache)))
    return {int(k): v for k, v in cache["scores"].items() if k == "0" or k in wanted}


def run(opt, overrides):
    if overrides:
        raise ValueError(f"unexpected arguments: {overrides}")
    if opt.threads:
        torch.set_num_threads(opt.threads)
    out = Path(opt.out)
    records = {(r, c, s): run_inversion(opt, r, c, s) for r in opt.recipes for c in opt.concepts for s in opt.seeds}
    model = load_model(opt.config, opt.ckpt, attention="sdpa",
                       overrides=[f"model.params.personalization_config.params.initializer_words=[{opt.init_word}]"])
    initial = {k: v.detach().clone() for k, v in model.embedding_manager.string_to_param_dict.items()}
    scorer = load_scorer(opt.scorer)
    rows = []
    for (recipe, shape, seed), record in records.items():
        scores = score_run(opt, model, scorer, record, initial)
        wanted = set(opt.score_steps or map(int, record["snapshots"])) | {0}
        if not wanted <= set(scores):  # --cached_only: a run not fully scored yet is left out
            continue
        seconds = {int(k): v for k, v in record["seconds"].items()}
        for step, sc in sorted(scores.items()):
            rows.append({"recipe": recipe, "concept": shape, "seed": seed, "step": step,
                         "seconds": round(seconds.get(step, 0.0), 3), **{k: sc[k] for k in SCORES},
                         **{f"{k}_ci_low": sc[f"{k}_ci"][0] for k in SCORES},
                         **{f"{k}_ci_high": sc[f"{k}_ci"][1] for k in SCORES}})
    stops = {}
    for recipe, shape, seed in records:
        if recipe in (opt.stop_recipes or []):
            stopped = stopped_run(opt, model, scorer, recipe, shape, seed)
            if stopped:  # a run that never stopped is scored at its end
                stops[(recipe, shape, seed)] = {**stopped, "stopped": stopped["stopped_at"] is not None,
                                                "stopped_at": stopped["stopped_at"] or stopped["final_step"]}
    summary = summarize(rows, stops, opt.steps, baseline="baseline")
    summary["settings"] = {k: getattr(opt, k) for k in ("recipes", "concepts", "seeds", "steps", "every", "samples",
                                                           "ddim_steps", "score_steps", "config", "ckpt",
                                                           "init_word", "stop_recipes")}
    summary["settings"]["threads"] = torch.get_num_threads()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "snapshots.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    draw_curves(rows, out / "curves.png")
    for line in summary["table"]:
        print(json.dumps(line))
    print(f"snapshots: {out / 'snapshots.csv'}; summary: {out / 'summary.json'}; plot: {out / 'curves.png'}")


if __name__ == "__main__":
    sys.exit(run_script("time_to_quality.py", parser(), run))
