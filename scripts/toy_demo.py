"""Invert a concept on the bundled toy model and use the new word in new prompts (the README's first job).

1. write 5 images of the never-named shape (ring), balanced over colour, background and position;
2. invert them into `*` with the training API and configs/toy/invert.yaml (the official recipe at toy size);
3. sample prompts that put `*` in new settings, score every sample with the attribute scorer;
4. write a contact sheet (training images, then one row per prompt) and a metrics JSON.

While it trains, validation previews (`--validation_prompts`) render two of the prompts from fixed noise every
`--validation_every` steps: `<outdir>/logs/<run>/validation/*/contact_sheet.png` shows the word forming.

    python scripts/toy_demo.py [--ckpt models/toy/toy_ldm.safetensors] [--steps 300] [--seed 23]
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.data.toy_world import write_concept_images  # noqa: E402
from ldm.image_grid import make_grid, save_image, to_uint8  # noqa: E402
from ldm.loading import load_model  # noqa: E402
from ldm.scripts_common import run_script  # noqa: E402
from ldm.toy import gates  # noqa: E402
from ldm.toy.scorer import load_scorer  # noqa: E402
from ldm.training import train  # noqa: E402

PROMPTS = [("a photo of a *", None), ("a * on the left", ("position", "left")), ("a red *", ("color", "red")),
           ("a * on a black background", ("background", "black"))]


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="models/toy/toy_ldm.safetensors")
    p.add_argument("--config", default="configs/toy/invert.yaml")
    p.add_argument("--scorer", default="assets/toy/scorer.safetensors")
    p.add_argument("--shape", default="ring")
    p.add_argument("--steps", type=int, default=300, help="inversion steps")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt")
    p.add_argument("--seed", type=int, default=23)
    p.add_argument("--outdir", default="outputs/toy_demo")
    p.add_argument("--validation_every", type=int, default=30, help="steps between validation previews")
    return p


def run(opt, overrides):
    if overrides:
        raise ValueError(f"unexpected arguments: {overrides}")
    if not Path(opt.ckpt).is_file():
        raise FileNotFoundError(f"toy model not found: {opt.ckpt} (see README, 'The toy world and its model')")
    t0, out = time.time(), Path(opt.outdir)
    images = [path for path, _ in write_concept_images(out / "data", opt.shape, n=5, seed=opt.seed)]
    run = train(opt.config, actual_resume=opt.ckpt, name="toy_demo", data_root=str(out / "data"),
                logdir=str(out / "logs"), seed=opt.seed, trainer={"max_steps": opt.steps}, no_test=True,
                validation_prompts=[PROMPTS[0][0], PROMPTS[2][0]], validation_every=opt.validation_every)
    embeddings, previews = run.embeddings, run.logdir / "validation"
    del run  # the trained model; sampling uses a fresh one in eval mode with the saved file, as before
    model = load_model(opt.config, opt.ckpt, attention="sdpa")
    model.embedding_manager.load(embeddings)
    scorer = load_scorer(opt.scorer)
    rows = [torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images]))
            .permute(0, 3, 1, 2).float() / 127.5 - 1]
    metrics = {"concept": opt.shape, "inversion_steps": opt.steps, "seed": opt.seed, "prompts": {}}
    for i, (prompt, edit) in enumerate(PROMPTS):
        samples = gates.sample(model, opt.samples * [prompt], seed=opt.seed * 1000 + i)
        scores = scorer.score(samples)
        entry = {"concept_rate": float(np.mean([v == opt.shape for v in scores["shape"]["value"]]))}
        if edit is not None:
            entry["edit_rate"] = float(np.mean([v == edit[1] for v in scores[edit[0]]["value"]]))
        metrics["prompts"][prompt] = entry
        rows.append(samples)
    width = max(r.shape[0] for r in rows)
    grid = torch.cat([torch.cat([r, -torch.ones(width - r.shape[0], *r.shape[1:])]) for r in rows])
    save_image(to_uint8((make_grid(grid, nrow=width) + 1) / 2), out / "contact_sheet.png",
               text={"rows": json.dumps(["training images"] + [p for p, _ in PROMPTS])})
    metrics["seconds"] = round(time.time() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    print(f"contact sheet: {out / 'contact_sheet.png'}")
    print(f"validation previews over steps: {previews}/*/contact_sheet.png")


if __name__ == "__main__":
    sys.exit(run_script("toy_demo.py", parser(), run))
