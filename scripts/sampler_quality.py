"""Compare samplers on the bundled toy model with the toy scorer: the same starting noises for every
sampler and step count, one learned word and one true word.

    python scripts/sampler_quality.py                      # ring ('a photo of a *') and star, 256 samples
    python scripts/sampler_quality.py --runs ddim:50 dpmpp2m:20 --samples 64

Per case and run: the concept rate (share of samples the scorer calls the target shape, the G2 figure of
ldm/toy/gates.py), the mean scorer probability of the target shape, and the share of samples whose scored
shape agrees with the first run's and the relative L2 distance of the latents to the first run's (by default
DPM-Solver++ at 200 steps, a near-converged solution of the ODE: DDIM at 200 steps is within 2% of it).
Classifier-free guidance with the empty prompt at --scale.
"""

import argparse
import glob
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.data.toy_world import ATTRIBUTE_VALUES  # noqa: E402
from ldm.generation import SAMPLERS  # noqa: E402
from ldm.loading import load_model  # noqa: E402
from ldm.scripts_common import run_script  # noqa: E402
from ldm.toy.scorer import load_scorer  # noqa: E402

RING = "outputs/time_to_quality/runs/baseline/ring_seed0/logs/*/checkpoints/embeddings_gs-300.pt"


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/toy/invert.yaml")
    p.add_argument("--ckpt", default="models/toy/toy_ldm.safetensors")
    p.add_argument("--scorer", default="assets/toy/scorer.safetensors")
    p.add_argument("--embedding", default=RING, help="the learned ring (a glob; read only)")
    p.add_argument("--runs", nargs="+", default=["dpmpp2m:200", "ddim:50", "dpmpp2m:20", "ddim:20", "dpmpp2m-plain:20",
                                                "dpmpp2m-logsnr:20", "dpmpp2m:10", "ddim:10", "dpmpp2m:50"],
                   help="sampler:steps (also dpmpp2m-logsnr: on logSNR-uniform steps, dpmpp2m-plain: without the "
                        "first-order fallback); the first run is the reference of the agreement and distance "
                        "columns")
    p.add_argument("--cases", nargs="+", choices=["ring", "star"], default=["ring", "star"])
    p.add_argument("--samples", type=int, default=256, help="samples per case (one batch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noises")
    p.add_argument("--scale", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the figures here")
    return p


#: variants of DPM-Solver++ for --runs: the paper's logSNR steps; no first-order fallback (max_step_ratio)
VARIANTS = {"dpmpp2m-logsnr": dict(timesteps="logsnr"), "dpmpp2m-plain": dict(max_step_ratio=None)}


def make_sampler(model, name: str):
    if name in VARIANTS:
        return SAMPLERS["dpmpp2m"](model, **VARIANTS[name])
    return SAMPLERS[name](model)


@torch.no_grad()
def sample(model, sampler: str, steps: int, prompts: list[str], x_T: torch.Tensor, scale: float):
    """(latents, images in [-1, 1])."""
    c = model.get_learned_conditioning(prompts)
    uc = model.get_learned_conditioning(len(prompts) * [""])
    z, _ = make_sampler(model, sampler).sample(steps, len(prompts), tuple(x_T.shape[1:]), c, verbose=False, x_T=x_T,
                                               unconditional_guidance_scale=scale, unconditional_conditioning=uc)
    return z, model.decode_first_stage(z).clamp(-1, 1)


def run(opt, overrides):
    if overrides:
        raise ValueError(f"unexpected arguments: {overrides}")
    torch.set_num_threads(opt.threads)
    runs = [(r.split(":")[0], int(r.split(":")[1])) for r in opt.runs]
    for name, _ in runs:
        if name not in (*SAMPLERS, *VARIANTS):
            raise ValueError(f"--runs: unknown sampler '{name}' (one of {[*sorted(SAMPLERS), *VARIANTS]})")
    found = sorted(glob.glob(opt.embedding))
    if not found:
        raise ValueError(f"--embedding {opt.embedding}: no such file")
    model = load_model(opt.config, opt.ckpt, attention="sdpa")
    scorer = load_scorer(opt.scorer)
    shapes = ATTRIBUTE_VALUES["shape"]
    cases = [c for c in (("ring", "a photo of a *", found[0]), ("star", "a photo of a star", None))
             if c[0] in opt.cases]
    report = {"samples": opt.samples, "seed": opt.seed, "scale": opt.scale, "embedding": found[0], "cases": {}}
    print(f"toy model, {opt.samples} samples per case, guidance {opt.scale}, starting noises from seed {opt.seed} "
          f"(the same for every run); ring word: {found[0]}")
    for shape, prompt, embedding in cases:
        if embedding is not None:
            model.embedding_manager.load(embedding)
        g = torch.Generator().manual_seed(opt.seed)
        x_T = torch.randn((opt.samples, model.channels, model.image_size, model.image_size), generator=g)
        rows, reference, ref_z = [], None, None
        print(f"\n{shape}: '{prompt}'")
        print(f"  {'sampler':<14} {'steps':>5} {'concept rate':>12} {'p(target)':>9} {'agree':>6} {'L2 to first':>11}"
              f" {'UNet calls':>10} {'seconds':>7}")
        for name, steps in runs:
            start = time.perf_counter()
            z, images = sample(model, name, steps, opt.samples * [prompt], x_T, opt.scale)
            scores = scorer.score(images)["shape"]
            seconds = time.perf_counter() - start
            values = list(scores["value"])
            reference = values if reference is None else reference
            ref_z = z if ref_z is None else ref_z
            row = {"sampler": name, "steps": steps,
                   "concept_rate": float(np.mean([v == shape for v in values])),
                   "p_target": float(scores["probs"][:, shapes.index(shape)].mean()),
                   "agree_with_first": float(np.mean([a == b for a, b in zip(values, reference, strict=True)])),
                   "latent_rel_l2_to_first": float((z - ref_z).double().norm() / ref_z.double().norm()),
                   "seconds": round(seconds, 1)}
            rows.append(row)
            calls = steps + (1 if name == "plms" else 0)
            print(f"  {name:<14} {steps:>5} {row['concept_rate']:>12.3f} {row['p_target']:>9.3f} "
                  f"{row['agree_with_first']:>6.3f} {row['latent_rel_l2_to_first']:>11.4f} {calls:>10} "
                  f"{seconds:>7.1f}", flush=True)
        report["cases"][shape] = {"prompt": prompt, "runs": rows}
    if opt.json:
        Path(opt.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opt.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    sys.exit(run_script("sampler_quality.py", parser(), run))
