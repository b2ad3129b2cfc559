"""Measure the toy model's gates (AE, G1, G2, G3; see ldm/toy/gates.py) and write a JSON report.

    python scripts/toy_gates.py --ckpt models/toy/toy_ldm.safetensors --out outputs/toy_gates
    python scripts/toy_gates.py --stage ae --ae_ckpt models/toy/autoencoder.safetensors

Concepts: the never-named shape (ring) and a named shape treated as a deleted word (star); each inverted
from 5 images balanced over colour, background and position, for every seed, with the
training API (`ldm.training.train`).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ldm.data.toy_world import write_concept_images  # noqa: E402
from ldm.loading import load_model  # noqa: E402
from ldm.scripts_common import run_script  # noqa: E402
from ldm.toy import gates  # noqa: E402
from ldm.toy.scorer import load_scorer  # noqa: E402
from ldm.training import train  # noqa: E402
from ldm.util import atomic_write  # noqa: E402

CONCEPTS = {"ring": "ring", "star": "star"}  # concept shape -> its true word
INIT_WORD = "shape"
#: Reported, not gated: phrases of trained words that describe a concept (the ring is a hollow circle, a
#: combination no caption contains), to show what the model can compose without a new word.
PHRASES = {"ring": "hollow circle"}


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=["ae", "g1", "concepts", "all"], default="all")
    p.add_argument("--ckpt", default="models/toy/toy_ldm.safetensors")
    p.add_argument("--ae_ckpt", default="models/toy/autoencoder.safetensors")
    p.add_argument("--config", default="configs/toy/invert.yaml")
    p.add_argument("--ae_config", default="configs/toy/autoencoder.yaml")
    p.add_argument("--scorer", default="assets/toy/scorer.safetensors")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--samples", type=int, default=32, help="samples per prompt and seed")
    p.add_argument("--g1_cases", type=int, default=24, help="fully specified prompts for G1")
    p.add_argument("--inversion_steps", type=int, default=300)
    p.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    p.add_argument("--out", default="outputs/toy_gates")
    return p


def invert(opt, shape: str, seed: int) -> Path:
    """Invert `shape`, or reuse an earlier inversion made from the same checkpoint and recipe."""
    out = Path(opt.out) / "inversions" / f"{shape}_seed{seed}"
    emb, stamp = out / "embeddings.pt", out / "source.json"
    ckpt = Path(opt.ckpt).resolve()
    stat = ckpt.stat()
    source = {"ckpt": str(ckpt), "ckpt_bytes": stat.st_size, "ckpt_mtime_ns": stat.st_mtime_ns,
              "config": str(Path(opt.config).resolve()), "steps": opt.inversion_steps}
    if emb.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == source:
        return emb
    if out.exists():
        shutil.rmtree(out)  # made from another checkpoint or recipe
    write_concept_images(out / "images", shape, n=5, seed=seed)
    run = train(opt.config, actual_resume=opt.ckpt, name=f"{shape}_{seed}", data_root=str(out / "images"),
                logdir=str(out / "logs"), seed=seed, trainer={"max_steps": opt.inversion_steps}, no_test=True,
                datadir_in_name=False, overrides=["lightning.callbacks.image_logger.params.disabled=true"])
    shutil.copyfile(run.embeddings, emb)
    stamp.write_text(json.dumps(source))  # written last: its presence means the inversion finished
    return emb


def concept_report(opt, model, scorer, shape: str) -> dict:
    manager = model.embedding_manager
    std = model.cond_stage_model.transformer.token_emb.weight.std().item()
    per_seed = {"pseudo": [], "random": []}
    for seed in opt.seeds:
        manager.load(invert(opt, shape, seed))
        per_seed["pseudo"].append(gates.concept_rates(model, scorer, "*", shape, [seed], opt.samples))
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            manager.string_to_param_dict["*"].copy_(torch.randn(1, manager.token_dim, generator=g) * std)
        per_seed["random"].append(gates.concept_rates(model, scorer, "*", shape, [seed], opt.samples))
    pooled = {k: _mean_rates(v) for k, v in per_seed.items()}
    pooled["true"] = gates.concept_rates(model, scorer, CONCEPTS[shape], shape, opt.seeds, opt.samples)
    pooled["init"] = gates.concept_rates(model, scorer, INIT_WORD, shape, opt.seeds, opt.samples)
    if shape in PHRASES:
        pooled["phrase"] = gates.concept_rates(model, scorer, PHRASES[shape], shape, opt.seeds, opt.samples)
    return {"rates": pooled, "per_seed": per_seed, **gates.judge(pooled["pseudo"], pooled["true"], pooled["init"])}


def _mean_rates(runs: list[dict]) -> dict:
    return {p: {k: sum(r[p][k] for r in runs) / len(runs) for k in runs[0][p]} for p in runs[0]}


def run(opt, overrides):
    if overrides:
        raise ValueError(f"unexpected arguments: {overrides}")
    torch.set_grad_enabled(False)
    scorer = load_scorer(opt.scorer)
    report = {"seeds": opt.seeds, "samples_per_prompt": opt.samples, "ckpt": opt.ckpt}
    if opt.stage in ("ae", "all"):
        acc = gates.autoencoder_gate(load_model(opt.ae_config, opt.ae_ckpt), scorer)
        report["AE"] = {"accuracy": acc, "pass": all(v >= gates.AE_MIN for v in acc.values())}
    if opt.stage in ("g1", "concepts", "all"):
        model = load_model(opt.config, opt.ckpt, attention="sdpa")
        if opt.stage in ("g1", "all"):
            report["G1"] = gates.g1_adherence(model, scorer, gates.g1_cases(opt.g1_cases), opt.seeds, opt.samples)
        if opt.stage in ("concepts", "all"):
            torch.set_grad_enabled(True)  # inversion trains
            report["concepts"] = {s: concept_report(opt, model, scorer, s) for s in opt.concepts}
    atomic_write(Path(opt.out) / "gates.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    print(json.dumps({k: v for k, v in report.items() if k != "concepts"}, indent=1))
    for shape, r in report.get("concepts", {}).items():
        print(f"{shape}: G2 {'pass' if r['G2']['pass'] else 'FAIL'} {r['G2']}; G3 {'pass' if r['G3']['pass'] else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(run_script("toy_gates.py", parser(), run))
