"""CLIP evaluation of a learned word with the LDM model (the official scripts/evaluate_model.py).

    python scripts/evaluate_model.py --prompt "a photo of *" --data_dir imgs/cat_statue \
        --ckpt_path models/ldm/text2img-large/model.ckpt \
        --embedding_path logs/<run>/checkpoints/embeddings.pt [--coverage]

Samples `--n_samples` images of the prompt (DDIM `--ddim_steps`, guidance `--scale`, eta 0), prints
`Image similarity: X` (mean pairwise cosine to the training images) and `Text similarity: Y` (cosine to the
prompt with `*` removed), both raw CLIP cosine similarities (not CLIPScore), and appends them to
`<out_dir>/clip_eval.json` and `clip_eval.csv`. `--coverage` also runs the appendix-B coverage test on
`--coverage_samples` samples of `--coverage_prompt` (`coverage.json`/`coverage.csv`).

Local changes: the results are printed (the reference crashed on an undefined `opt.out_dir` first,
docs/DIFFERENCES.md#evaluate-model-prints);
seed, config, CLIP model, sample count, steps, scale, device and tokenizer folder are flags; results and
settings are written as JSON and CSV. Trailing `key.path=value` arguments override the config.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from evaluation.clip_eval import METRIC_NOTE, LDMCLIPEvaluator, load_training_images  # noqa: E402
from evaluation.coverage import coverage_table, evaluate_coverage, mean_confidence_interval  # noqa: E402
from evaluation.preprocess import PREPROCESS_MODES  # noqa: E402
from ldm.loading import load_model  # noqa: E402
from ldm.scripts_common import run_script  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar")
    p.add_argument("--ckpt_path", type=str, default="models/ldm/text2img-large/model.ckpt")
    p.add_argument("--embedding_path", type=str, nargs="+", default=None, help="embedding file(s) to load")
    p.add_argument("--data_dir", type=str, required=True, help="folder with the training images")
    p.add_argument(
        "--config", type=str, default="configs/latent-diffusion/txt2img-1p4B-eval_with_tokens.yaml"
    )
    p.add_argument(
        "--clip_model",
        type=str,
        default="ViT-B/32",
        help="OpenAI name, Hugging Face id (openai/clip-vit-base-patch32) or local folder",
    )
    p.add_argument(
        "--clip_tokenizer", type=str, default=None, help="CLIP tokenizer folder (default: clip_model)"
    )
    p.add_argument("--n_samples", type=int, default=64)
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--batch_size", type=int, default=8, help="samples per DDIM batch")
    p.add_argument("--image_size", type=int, default=256, help="side the training images are resized to")
    p.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        default="pil",
        help="CLIP preprocessing of samples: pil (default) or tensor (the reference's path)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed (random and recorded if unset)")
    p.add_argument("--out_dir", type=str, default="outputs/clip_eval")
    p.add_argument("--save_samples", action="store_true", help="write the samples as a PNG grid")
    p.add_argument("--device", type=str, default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--tokenizer_path", type=str, default=None, help="the LDM tokenizer folder (offline)")
    p.add_argument("--coverage", action="store_true", help="also run the appendix-B coverage test")
    p.add_argument("--coverage_samples", type=int, default=256)
    p.add_argument("--coverage_prompt", type=str, default="A photo of *")
    return p


def append_json(path: Path, record: dict) -> None:
    """Append `record` to the JSON list in `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps([*records, record], indent=1))


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append `rows` (their scalar fields) to the CSV file `path`, writing the header when it is new."""
    rows = [{k: v for k, v in row.items() if not isinstance(v, (list, dict))} for row in rows]
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def check_flags(opt) -> None:
    """Flags checked before the model loads: a ValueError naming the flag."""
    import math

    for flag in ("n_samples", "ddim_steps", "batch_size", "image_size", "coverage_samples"):
        if getattr(opt, flag) < 1:
            raise ValueError(f"--{flag} {getattr(opt, flag)}: expected a whole number >= 1")
    if opt.ddim_steps > 1000:
        raise ValueError(f"--ddim_steps {opt.ddim_steps}: more than the model's 1000 diffusion steps")
    if not math.isfinite(opt.scale):
        raise ValueError(f"--scale {opt.scale}: expected a finite number")
    if not Path(opt.data_dir).is_dir():
        raise ValueError(f"--data_dir {opt.data_dir}: no such folder")
    for q in (Path(opt.out_dir), *Path(opt.out_dir).parents):
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"--out_dir {opt.out_dir}: {q} is a file; give a folder")
            break


def evaluate(opt, overrides: list[str]) -> dict:
    check_flags(opt)
    device = torch.device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed = opt.seed if opt.seed is not None else random.SystemRandom().randrange(2**31)
    model = load_model(opt.config, opt.ckpt_path, overrides=overrides, tokenizer_path=opt.tokenizer_path,
                       device=device)
    if opt.embedding_path:
        if model.embedding_manager is None:
            raise ValueError(f"{opt.config} has no personalization_config: it cannot use --embedding_path")
        model.embedding_manager.load_files(opt.embedding_path)
    evaluator = LDMCLIPEvaluator(
        device, opt.clip_model, tokenizer=opt.clip_tokenizer, preprocess=opt.preprocess
    )
    images = load_training_images(opt.data_dir, opt.image_size)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        sims, samples = evaluator.measure(
            model, images, opt.prompt, opt.n_samples, opt.ddim_steps, opt.scale, opt.batch_size, generator
        )
    print(f"Image similarity: {sims.image_similarity}")
    print(f"Text similarity: {sims.text_similarity}")
    image_ci, text_ci = (
        mean_confidence_interval(sims.image_per_sample),
        mean_confidence_interval(sims.text_per_sample),
    )
    record = {
        "prompt": opt.prompt,
        "scored_text": sims.text,
        "image_similarity": sims.image_similarity,
        "text_similarity": sims.text_similarity,
        "image_ci95_low": image_ci[1],
        "image_ci95_high": image_ci[2],
        "text_ci95_low": text_ci[1],
        "text_ci95_high": text_ci[2],
        "metric": METRIC_NOTE,
        "clip_model": opt.clip_model,
        "preprocess": opt.preprocess,
        "n_samples": opt.n_samples,
        "ddim_steps": opt.ddim_steps,
        "scale": opt.scale,
        "eta": 0.0,
        "seed": seed,
        "ckpt": opt.ckpt_path,
        "config": opt.config,
        "embeddings": json.dumps(opt.embedding_path or []),
        "data_dir": opt.data_dir,
        "num_train_images": len(images),
        "image_per_sample": sims.image_per_sample,
        "text_per_sample": sims.text_per_sample,
    }
    out = Path(opt.out_dir)
    append_json(out / "clip_eval.json", record)
    append_csv(out / "clip_eval.csv", [record])
    if opt.save_samples:
        from evaluation.setups import save_grid

        save_grid(samples, out / f"samples_seed{seed}.png", {"prompt": opt.prompt, "seed": seed})
    if opt.coverage:
        rows, _ = evaluate_coverage(
            evaluator,
            model,
            images,
            opt.coverage_prompt,
            opt.coverage_samples,
            opt.ddim_steps,
            opt.scale,
            opt.batch_size,
            generator,
        )
        for row in rows:
            print(
                f"Coverage at factor {row.factor}: kept {row.kept}, p = {row.p_value:.4g}"
                f" ({'indistinguishable' if row.indistinguishable else 'different'} at p > 0.05)"
            )
        settings = {
            "prompt": opt.coverage_prompt,
            "n_samples": opt.coverage_samples,
            "seed": seed,
            "clip_model": opt.clip_model,
            "test": "two-sided Welch t-test, alpha 0.05",
        }
        append_json(out / "coverage.json", {**settings, "rows": coverage_table(rows)})
        append_csv(out / "coverage.csv", [{**settings, **row} for row in coverage_table(rows)])
    return record


def main(argv=None) -> int:
    return run_script("evaluate_model.py", build_parser(), evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
