"""Text-to-image sampling with learned words, shared by scripts/txt2img.py (LDM) and
scripts/stable_txt2img.py (SD): one parser with per-script defaults, one run function.

Behaviour of the official scripts: DDIM or PLMS, classifier-free guidance with the
empty prompt, `n_iter` rounds of `n_samples`, numbered samples in `<outdir>/samples/` and one grid per
run in `<outdir>`. Local changes: PNG files carrying the prompt, seed, scale, steps, sampler and embedding
files in their text metadata; a seed always (recorded when drawn at random); several embedding files at
once; optional starting noise from a file; any device (the official scripts assumed CUDA,
docs/DIFFERENCES.md#samplers-any-device); the SD script's `--from-file` grid bug
(#stable-txt2img-fixes) and the LDM script's hard-coded config (#txt2img-seed-and-config) are gone.
Additions (#sampling-additions): `--negative_prompt` (and `PROMPT --neg NEGATIVE` lines in `--from-file`)
for the unconditional branch, A1111-style prompt weighting (`ldm.prompt_weighting`), and the
DPM-Solver++(2M) sampler (`--sampler dpmpp2m`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
from pathlib import Path

import torch
from tqdm import tqdm

from ldm.checkpoint import read_file
from ldm.image_grid import make_grid, save_image, to_uint8
from ldm.loading import load_model
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverPlusPlusSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.prompt_weighting import weighted_conditioning
from ldm.scripts_common import default_device

logger = logging.getLogger(__name__)

#: --sampler names and their classes (same `sample` interface)
SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpmpp2m": DPMSolverPlusPlusSampler}
#: the separator of a prompt and its negative prompt on a --from-file line
NEGATIVE_SEPARATOR = "--neg"
_NEG_SPLIT = re.compile(r"(?:^|\s)" + re.escape(NEGATIVE_SEPARATOR) + r"(?:\s|$)")


def build_parser(description: str, defaults: dict) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar")
    p.add_argument("--from-file", type=str, default=None,
                   help="one prompt per line, batched by n_samples; 'PROMPT --neg NEGATIVE' gives a line its own "
                        "negative prompt")
    p.add_argument("--negative_prompt", type=str, default="",
                   help="prompt of the unconditional guidance branch (default: empty, as the official scripts)")
    p.add_argument("--no_prompt_weighting", action="store_true",
                   help="read brackets literally: no (word:1.2) / (word) / [word] weighting")
    p.add_argument("--weighting_restore_mean", action="store_true",
                   help="after weighting, rescale each conditioning to its unweighted mean (as A1111)")
    p.add_argument("--outdir", type=str, nargs="?", default=defaults["outdir"])
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", type=int, default=defaults["ddim_steps"])
    p.add_argument("--sampler", type=str, choices=sorted(SAMPLERS), default=None,
                   help="sampler (default: ddim); --ddim_steps is its step count")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling (the same as --sampler plms)")
    p.add_argument("--fixed_code", action="store_true", help="one starting noise shared by all rounds")
    p.add_argument("--ddim_eta", type=float, default=0.0)
    p.add_argument("--n_iter", type=int, default=defaults["n_iter"], help="sampling rounds")
    p.add_argument("--H", type=int, default=defaults["H"])
    p.add_argument("--W", type=int, default=defaults["W"])
    p.add_argument("--C", type=int, default=4, help="latent channels")
    p.add_argument("--f", type=int, default=8, help="downsampling factor")
    p.add_argument("--n_samples", type=int, default=defaults["n_samples"], help="batch size")
    p.add_argument("--n_rows", type=int, default=0, help="grid columns (default: n_samples)")
    p.add_argument("--scale", type=float, default=defaults["scale"], help="guidance scale")
    p.add_argument("--config", type=str, default=defaults["config"])
    p.add_argument(defaults["ckpt_flag"], dest="ckpt", type=str, default=defaults["ckpt"])
    p.add_argument("--embedding_path", type=str, nargs="+", default=None, help="embedding file(s) to load")
    p.add_argument("--seed", type=int, default=defaults["seed"], help="seed (random and recorded if unset)")
    p.add_argument("--precision", type=str, choices=["full", "autocast"], default=defaults["precision"])
    p.add_argument("--device", type=str, default=default_device(), help="torch device (default: %(default)s)")
    p.add_argument("--tokenizer_path", type=str, default=None, help="local tokenizer folder (offline)")
    p.add_argument("--start_code", type=str, default=None,
                   help="starting noise [n_samples, C, H/f, W/f] from a .safetensors/.pt file (key x_T)")
    p.add_argument("--save_latents", action="store_true", help="also write samples/latents.safetensors")
    return p


def split_negative(line: str, default: str = "") -> tuple[str, str]:
    """A --from-file line -> (prompt, negative prompt): split at the first `--neg` standing alone
    (whitespace or the line's ends around it); without one the negative prompt is `default`."""
    m = _NEG_SPLIT.search(line)
    if m is None:
        return line.strip(), default
    return line[: m.start()].strip(), line[m.end():].strip()


def read_prompt_pairs(opt) -> list[list[tuple[str, str]]]:
    """Batches of n_samples (prompt, negative prompt): the same pair repeated, or the lines of --from-file."""
    negative = getattr(opt, "negative_prompt", "") or ""
    if not opt.from_file:
        return [opt.n_samples * [(opt.prompt, negative)]]
    lines = [split_negative(line, negative) for line in Path(opt.from_file).read_text().splitlines()
             if line.strip()]
    return [lines[i : i + opt.n_samples] for i in range(0, len(lines), opt.n_samples)]


def read_prompts(opt) -> list[list[str]]:
    """Batches of n_samples prompts: the same prompt repeated, or the lines of --from-file."""
    return [[p for p, _ in batch] for batch in read_prompt_pairs(opt)]


def sampler_name(opt) -> str:
    """--sampler, with --plms as an alias of `--sampler plms`; ddim by default."""
    chosen = getattr(opt, "sampler", None)
    if getattr(opt, "plms", False):
        if chosen not in (None, "plms"):
            raise ValueError(f"--plms with --sampler {chosen}: give one of them")
        return "plms"
    return chosen or "ddim"


def conditioning(model, opt, prompts: list[str]):
    """The conditioning of `prompts`, weighted unless --no_prompt_weighting."""
    if getattr(opt, "no_prompt_weighting", False):
        return model.get_learned_conditioning(prompts)
    return weighted_conditioning(model, prompts, restore_mean=getattr(opt, "weighting_restore_mean", False))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_*@.-]+", "-", text).strip("-")[:128].replace("*", "star") or "grid"


def check_flags(opt) -> None:
    """The sampling flags, checked before the model is loaded: a ValueError naming the flag and the fix."""
    import math

    for flag, low in (("n_samples", 1), ("n_iter", 1), ("ddim_steps", 1), ("C", 1), ("f", 1), ("n_rows", 0)):
        if getattr(opt, flag) < low:
            raise ValueError(f"--{flag} {getattr(opt, flag)}: expected a whole number >= {low}")
    if opt.ddim_steps > 1000:
        raise ValueError(f"--ddim_steps {opt.ddim_steps}: more than the model's 1000 diffusion steps; use 1..1000 "
                         "(50-200 is usual)")
    for flag in ("H", "W"):
        value = getattr(opt, flag)
        if value < 8 or value % 8 or value % opt.f:
            raise ValueError(f"--{flag} {value}: expected a positive multiple of 8 (and of --f {opt.f}), e.g. "
                             f"{max(8, (value // 8) * 8)}")
    for flag in ("scale", "ddim_eta"):
        if not math.isfinite(getattr(opt, flag)):
            raise ValueError(f"--{flag} {getattr(opt, flag)}: expected a finite number")
    if opt.ddim_eta < 0:
        raise ValueError(f"--ddim_eta {opt.ddim_eta}: expected a number >= 0 (0 is deterministic DDIM)")
    sampler = sampler_name(opt)
    if sampler == "plms" and opt.ddim_eta != 0:
        flag = "--plms" if opt.plms else "--sampler plms"
        raise ValueError(f"{flag} with --ddim_eta {opt.ddim_eta}: PLMS is deterministic; leave out --ddim_eta")
    if sampler == "dpmpp2m" and opt.ddim_eta != 0:
        raise ValueError(f"--sampler dpmpp2m with --ddim_eta {opt.ddim_eta}: DPM-Solver++ is deterministic; "
                         "leave out --ddim_eta")
    for flag in ("prompt",):
        if not opt.from_file and not (getattr(opt, flag) or "").strip():
            raise ValueError("--prompt is empty; give a prompt, e.g. --prompt 'a photo of *'")
    if opt.from_file:
        path = Path(opt.from_file)
        if not path.is_file():
            raise ValueError(f"--from-file {opt.from_file}: no such file")
        lines = path.read_text().splitlines()
        if not any(line.strip() for line in lines):
            raise ValueError(f"--from-file {opt.from_file}: the file holds no prompt")
        for i, line in enumerate(lines, 1):
            if line.strip() and not split_negative(line)[0]:
                raise ValueError(f"--from-file {opt.from_file}, line {i}: no prompt before '--neg'")
    out = Path(opt.outdir)
    for q in (out, *out.parents):
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"--outdir {opt.outdir}: {q} is a file; give a folder")
            break
    for flag in ("config", "ckpt", "start_code"):
        value = getattr(opt, flag, None)
        if value and not Path(value).is_file():
            name = {"ckpt": "checkpoint", "config": "config", "start_code": "--start_code"}[flag]
            raise ValueError(f"{name} file not found: {value}")


def check_embeddings(opt, prompts: list[str]) -> list[str]:
    """Read the --embedding_path files before the model (a NaN or broken file is refused here) and warn when
    no prompt uses any of their placeholders; returns the placeholders."""
    from ldm.modules.embedding_formats import read_embeddings

    placeholders: list[str] = []
    for path in opt.embedding_path or []:
        placeholders += list(read_embeddings(path).vectors)
    if placeholders and not any(p in prompt for p in placeholders for prompt in prompts):
        logger.warning("warning: no prompt contains the loaded placeholder(s) %s (the prompt is %r): the learned "
                       "word is unused; write it into the prompt, e.g. 'a photo of %s'", placeholders,
                       prompts[0], placeholders[0])
    return placeholders


def run(opt, overrides: list[str]) -> list[Path]:
    """Generate; returns the paths written."""
    check_flags(opt)
    check_embeddings(opt, [p for b in read_prompts(opt) for p in b])
    device = torch.device(opt.device)  # chosen by the script (scripts_common.default_device)
    seed = opt.seed if opt.seed is not None else random.SystemRandom().randrange(2**31)
    model = load_model(opt.config, opt.ckpt, overrides=overrides, tokenizer_path=opt.tokenizer_path, device=device)
    embeddings = []
    if opt.embedding_path:
        if model.embedding_manager is None:
            raise ValueError(f"{opt.config} has no personalization_config: it cannot use --embedding_path")
        model.embedding_manager.load_files(opt.embedding_path)
        embeddings = list(opt.embedding_path)
    steps = int(getattr(model, "num_timesteps", 1000))
    if opt.ddim_steps > steps:
        raise ValueError(f"--ddim_steps {opt.ddim_steps}: more than the model's {steps} diffusion steps")
    name = sampler_name(opt)
    sampler = SAMPLERS[name](model)
    pairs = read_prompt_pairs(opt)
    batches = [[p for p, _ in batch] for batch in pairs]
    if opt.scale == 1.0 and any(neg for batch in pairs for _, neg in batch):
        logger.warning("warning: --scale 1.0 turns classifier-free guidance off: the negative prompt is unused")
    shape = (opt.C, opt.H // opt.f, opt.W // opt.f)
    torch.manual_seed(seed)  # the reference's seed_everything: the sampler's noise draws follow it
    start_code = None
    if opt.start_code:
        start_code = read_file(opt.start_code)
        start_code = (start_code["x_T"] if isinstance(start_code, dict) else start_code).to(device)
    elif opt.fixed_code:
        start_code = torch.randn((opt.n_samples, *shape), device=device)

    sample_dir = Path(opt.outdir) / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    base_count = len([p for p in sample_dir.iterdir() if p.suffix == ".png"])
    grid_count = len([p for p in Path(opt.outdir).iterdir() if p.suffix == ".png"])
    info = {"seed": seed, "scale": opt.scale, "steps": opt.ddim_steps, "eta": opt.ddim_eta,
            "sampler": name, "ckpt": opt.ckpt, "config": opt.config,
            "embeddings": json.dumps(embeddings), "size": f"{opt.W}x{opt.H}"}
    # "autocast" as the reference: half-precision matmuls on an accelerator; the CPU always runs in full
    precision = torch.autocast(device.type) if opt.precision == "autocast" and device.type != "cpu" \
        else contextlib.nullcontext()
    written, images, latents = [], [], []
    with torch.no_grad(), precision, model.ema_scope():
        for _ in tqdm(range(opt.n_iter), desc="Sampling"):
            for batch in pairs:
                prompts, negatives = [p for p, _ in batch], [neg for _, neg in batch]
                n = len(prompts)
                uc = conditioning(model, opt, negatives) if opt.scale != 1.0 else None
                c = conditioning(model, opt, prompts)
                x_T = start_code[:n] if start_code is not None else None
                z, _ = sampler.sample(S=opt.ddim_steps, conditioning=c, batch_size=n, shape=shape, verbose=False,
                                      unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc,
                                      eta=opt.ddim_eta, x_T=x_T)
                x = ((model.decode_first_stage(z.float()) + 1.0) / 2.0).clamp(0.0, 1.0).cpu()
                latents.append(z.float().cpu())
                for prompt, negative, image in zip(prompts, negatives, x, strict=True):
                    if not opt.skip_save:
                        path = sample_dir / f"{base_count:05}.png"
                        save_image(to_uint8(image), path, text={**info, "prompt": prompt, "negative_prompt": negative,
                                                                "index": base_count})
                        written.append(path)
                    base_count += 1
                images.append(x)
    if not opt.skip_grid:
        grid = make_grid(torch.cat(images), nrow=opt.n_rows or opt.n_samples)
        name = slug(batches[0][0]) if not opt.from_file else slug(Path(opt.from_file).stem)
        path = Path(opt.outdir) / f"{name}-{grid_count:04}.png"
        save_image(to_uint8(grid), path, text={**info, "prompts": json.dumps([p for b in batches for p in b])})
        written.append(path)
    if opt.save_latents:
        from safetensors.torch import save_file

        save_file({"samples": torch.cat(latents)}, str(sample_dir / "latents.safetensors"))
    print(f"Your samples are ready and waiting for you here: \n{os.path.abspath(opt.outdir)} \n \nEnjoy.")
    return written
