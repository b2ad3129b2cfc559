"""Run the whole Textual Inversion pipeline end to end on a tiny model, on a CPU, in about a minute.

1. render 5 training images of one concept (an orange ring on varied backgrounds);
2. build the tiny latent-diffusion model of configs/toy/tiny-demo.yaml (random weights, seeded) and write
   it as a base checkpoint;
3. invert the concept with main.py (the official command line);
4. sample "a photo of *" and edits with the learned word and write a contact sheet and a metrics JSON.

The tiny model is untrained, so its samples are noise-like: this checks the plumbing, not quality.

    python scripts/tiny_demo.py [--outdir outputs/tiny_demo] [--steps 40] [--seed 23]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import main as train_main  # noqa: E402
from ldm.image_grid import make_grid, save_image, to_uint8  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.util import instantiate_from_config, randomize_parameters_  # noqa: E402

CONFIG = REPO / "configs" / "toy" / "tiny-demo.yaml"
PROMPTS = ["a photo of *", "a red *", "a * on a blue background"]
BACKGROUNDS = [(240, 240, 240), (40, 90, 200), (30, 160, 60), (220, 210, 40), (120, 120, 120)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outdir", default="outputs/tiny_demo")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=23)
    return p.parse_args(argv)


def render_concept(folder: Path, size: int = 64) -> None:
    """Five images of an orange ring, background and position varied."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, bg in enumerate(BACKGROUNDS):
        img = Image.new("RGB", (size, size), bg)
        cx, cy = size // 2 + (i - 2) * 4, size // 2 + (2 - i) * 3
        r = size // 4
        ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), outline=(250, 140, 20), width=size // 10)
        img.save(folder / f"ring_{i}.png")


def write_base_checkpoint(path: Path, seed: int) -> None:
    """Random weights everywhere, as the parity fixtures' recipe: a fresh UNet zero-initialises its output
    projections, which would cut the text (and so the learned word) off from the output."""
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.load(CONFIG).model)
    randomize_parameters_(model, torch.Generator().manual_seed(seed), skip_prefixes=("embedding_manager.",))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("embedding_manager.")}
    torch.save({"state_dict": state}, path)


@torch.no_grad()
def sample_prompts(run_dir: Path, base_ckpt: Path, seed: int) -> dict[str, torch.Tensor]:
    cfg = OmegaConf.load(CONFIG)
    cfg.model.params.ckpt_path = str(base_ckpt)
    model = instantiate_from_config(cfg.model).eval()
    model.embedding_manager.load(run_dir / "checkpoints" / "embeddings.pt")
    sampler = DDIMSampler(model)
    g = torch.Generator().manual_seed(seed)
    uc = model.get_learned_conditioning(4 * [""])
    out = {}
    for prompt in PROMPTS:
        c = model.get_learned_conditioning(4 * [prompt])
        z, _ = sampler.sample(S=20, batch_size=4, shape=(4, 4, 4), conditioning=c, eta=0.0, verbose=False,
                              unconditional_guidance_scale=5.0, unconditional_conditioning=uc, generator=g)
        out[prompt] = model.decode_first_stage(z).clamp(-1, 1)
    return out


def contact_sheet(data_dir: Path, samples: dict[str, torch.Tensor], path: Path) -> None:
    """Row 1: the training images; one row per prompt below."""
    train = [np.asarray(Image.open(p).convert("RGB").resize((32, 32))) for p in sorted(data_dir.glob("*.png"))]
    rows = [torch.from_numpy(np.stack(train)).permute(0, 3, 1, 2).float() / 255.0]
    rows += [(s[:5] + 1) / 2 for s in samples.values()]
    width = max(r.shape[0] for r in rows)
    padded = [torch.cat([r, torch.zeros(width - r.shape[0], *r.shape[1:])]) for r in rows]
    save_image(to_uint8(make_grid(torch.cat(padded), nrow=width)), path,
               text={"rows": json.dumps(["training images", *samples])})


def main(argv=None) -> int:
    opt = parse_args(argv)
    out = Path(opt.outdir)
    t0 = time.time()
    render_concept(out / "data")
    base = out / "tiny_base.ckpt"
    write_base_checkpoint(base, opt.seed)
    before = {p.name for p in (out / "logs").glob("*")} if (out / "logs").exists() else set()
    code = train_main.main([
        "--base", str(CONFIG), "-t", "--actual_resume", str(base), "-n", "tiny_demo", "--data_root",
        str(out / "data"), "--logdir", str(out / "logs"), "--seed", str(opt.seed), "--max_steps", str(opt.steps),
        "--no-test",
    ])
    if code:
        return code
    run_dir = next(p for p in sorted((out / "logs").glob("*")) if p.name not in before)
    samples = sample_prompts(run_dir, base, opt.seed)
    contact_sheet(out / "data", samples, out / "contact_sheet.png")
    losses = [float(r["train/loss_step"]) for r in csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv"))
              if r.get("train/loss_step")]
    metrics = {"run_dir": str(run_dir), "steps": opt.steps, "seed": opt.seed, "loss_first": losses[0],
               "loss_last": losses[-1], "prompts": PROMPTS, "seconds": round(time.time() - t0, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics, indent=1))
    print(f"contact sheet: {out / 'contact_sheet.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
