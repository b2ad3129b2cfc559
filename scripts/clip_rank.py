"""Generate K candidates for a prompt and keep the best by CLIP score (the paper's section 4 curation).

    python scripts/clip_rank.py --prompt "a painting of * in the style of Monet" --n_candidates 16 --keep 2 \
        --ckpt_path models/ldm/text2img-large/model.ckpt \
        --embedding_path logs/<run>/checkpoints/embeddings.pt

Ranks by the text similarity to the prompt with `*` removed (`--criterion text`, default) or by the mean
image similarity to the training images (`--criterion image --data_dir imgs/`), both raw CLIP cosines.
Writes every candidate to `<outdir>/candidates/`, the `--keep` best to `<outdir>/best/` (PNG text metadata:
prompt, seed, score, rank, criterion) and `<outdir>/ranking.json`. Trailing `key.path=value` arguments
override the config.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from evaluation.clip_eval import LDMCLIPEvaluator, load_training_images  # noqa: E402
from evaluation.preprocess import PREPROCESS_MODES  # noqa: E402
from evaluation.ranking import CRITERIA, rank_candidates, save_ranking  # noqa: E402
from ldm.loading import load_model  # noqa: E402
from ldm.scripts_common import run_script  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=str, required=True)
    p.add_argument("--n_candidates", type=int, default=16, help="K: candidates generated")
    p.add_argument("--keep", type=int, default=1, help="how many of the best to save under best/")
    p.add_argument("--criterion", choices=CRITERIA, default="text")
    p.add_argument("--data_dir", type=str, default=None, help="training images (criterion image)")
    p.add_argument("--ckpt_path", type=str, default="models/ldm/text2img-large/model.ckpt")
    p.add_argument(
        "--config", type=str, default="configs/latent-diffusion/txt2img-1p4B-eval_with_tokens.yaml"
    )
    p.add_argument("--embedding_path", type=str, nargs="+", default=None)
    p.add_argument("--clip_model", type=str, default="ViT-B/32")
    p.add_argument("--clip_tokenizer", type=str, default=None)
    p.add_argument("--preprocess", choices=PREPROCESS_MODES, default="pil")
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=5.0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--image_size", type=int, default=256, help="side the training images are resized to")
    p.add_argument("--seed", type=int, default=None, help="seed (random and recorded if unset)")
    p.add_argument("--outdir", type=str, default="outputs/clip_rank")
    p.add_argument("--device", type=str, default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--tokenizer_path", type=str, default=None, help="the LDM tokenizer folder (offline)")
    return p


def rank(opt, overrides: list[str]) -> list[Path]:
    if opt.criterion == "image" and not opt.data_dir:
        raise ValueError("--criterion image needs --data_dir")
    device = torch.device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed = opt.seed if opt.seed is not None else random.SystemRandom().randrange(2**31)
    model = load_model(opt.config, opt.ckpt_path, overrides=overrides, tokenizer_path=opt.tokenizer_path,
                       device=device)
    if opt.embedding_path:
        model.embedding_manager.load_files(opt.embedding_path)
    evaluator = LDMCLIPEvaluator(
        device, opt.clip_model, tokenizer=opt.clip_tokenizer, preprocess=opt.preprocess
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    candidates = evaluator.generate(
        model, opt.prompt, opt.n_candidates, opt.ddim_steps, opt.scale, opt.batch_size, generator=generator
    )
    references = load_training_images(opt.data_dir, opt.image_size) if opt.criterion == "image" else None
    ranking = rank_candidates(evaluator, candidates, opt.criterion, opt.prompt, references)
    info = {
        "prompt": opt.prompt,
        "seed": seed,
        "scale": opt.scale,
        "steps": opt.ddim_steps,
        "ckpt": opt.ckpt_path,
        "clip_model": opt.clip_model,
        "embeddings": " ".join(opt.embedding_path or []),
    }
    best = save_ranking(candidates, ranking, opt.outdir, opt.keep, info)
    for path in best:
        index = int(path.stem.split("_")[-1])
        print(f"{path}: {ranking.criterion} similarity {ranking.scores[index]:.4f}")
    return best


def main(argv=None) -> int:
    return run_script("clip_rank.py", build_parser(), rank, argv)


if __name__ == "__main__":
    sys.exit(main())
