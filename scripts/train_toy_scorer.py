"""Train the toy world's attribute scorer (ldm/toy/scorer.py) on fresh renders and check gate G0.

    python scripts/train_toy_scorer.py --out assets/toy/scorer.safetensors --steps 1500 --seed 0 [--resume]

Every batch is rendered anew from a generator seeded by (seed, step), so a resumed run sees the same data as
an uninterrupted one. A resumable checkpoint (model, optimizer, step) is written every --ckpt-every steps to
<out>.ckpt (git-ignored). At the end the script prints per-attribute accuracy on fresh clean and degraded
(blurred + noised) renders, writes the weights (config and report in the safetensors metadata) and the
report as <out>.json, and exits with status 2 when gate G0 (>= 0.98 clean, >= 0.9 degraded) fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.toy.scorer import ATTRIBUTES, ToyScorer, evaluate, save_scorer, scorer_loss, training_batch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="assets/toy/scorer.safetensors")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine decay to 0)")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt when it exists")
    p.add_argument("--eval-n", type=int, default=2000, help="images per evaluation set")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def save_checkpoint(path: Path, model, optimizer, step: int, elapsed: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "elapsed": elapsed}, tmp)
    os.replace(tmp, path)


def main(argv=None) -> int:
    opt = parse_args(argv)
    torch.set_num_threads(opt.threads)
    torch.manual_seed(opt.seed)
    out = Path(opt.out)
    ckpt = out.with_suffix(".ckpt")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = ToyScorer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=1e-4)
    start, elapsed = 0, 0.0
    if opt.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state["elapsed"]
        print(f"resumed from {ckpt} at step {start}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"scorer: {n_params / 1e6:.3f} M parameters; training steps {start}..{opt.steps}")
    t0 = time.time()
    model.train()
    for step in range(start, opt.steps):
        for group in optimizer.param_groups:
            group["lr"] = opt.lr * lr_factor(step, opt.warmup, opt.steps)
        rng = np.random.default_rng([opt.seed, zlib.crc32(b"scorer-train"), step])
        images, labels, outlier = training_batch(rng, opt.batch_size)
        loss = scorer_loss(model(images), labels, outlier)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {loss.item():.4f} ({elapsed + time.time() - t0:.0f} s)", flush=True)
        if (step + 1) % opt.ckpt_every == 0 or step + 1 == opt.steps:
            save_checkpoint(ckpt, model, optimizer, step + 1, elapsed + time.time() - t0)
    train_seconds = elapsed + time.time() - t0

    report = evaluate(model.eval(), n=opt.eval_n, seed=opt.seed)
    report.update(steps=opt.steps, seed=opt.seed, batch_size=opt.batch_size, lr=opt.lr, params=n_params,
                  train_seconds=round(train_seconds, 1), threads=opt.threads)
    save_scorer(model, out, metadata={"report": json.dumps(report)})
    report["file_bytes"] = out.stat().st_size
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"{'attribute':<12}{'clean':>8}{'degraded':>10}")
    for name in ATTRIBUTES:
        print(f"{name:<12}{report['clean'][name]:>8.4f}{report['degraded'][name]:>10.4f}")
    print(f"shape flagged uncertain at {report['threshold']}: {report['shape_uncertain_rate']}")
    print(f"gate G0: {'pass' if report['gate_G0'] else 'FAIL'}; trained {train_seconds:.0f} s; wrote {out}")
    return 0 if report["gate_G0"] else 2


if __name__ == "__main__":
    sys.exit(main())
