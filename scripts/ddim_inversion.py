"""DDIM inversion of images under a learned word, reconstruction, and edits from the same x_T (Appendix E).

    python scripts/ddim_inversion.py --config configs/toy/invert.yaml --ckpt models/toy/toy_ldm.safetensors \
        --embedding_path logs/<run>/checkpoints/embeddings.pt --image imgs/00.png imgs/01.png \
        --prompt "a photo of a *" --edit_prompts "a red *" "a * on a black background" --scales 1 3 5

For each image and guidance scale: z0 = scale_factor * the first stage's posterior mode, x_T = the eta = 0
DDIM update run backwards under --prompt (ldm/models/diffusion/ddim_inversion.py), the reconstruction =
DDIM from x_T under --prompt, and one image per --edit_prompts from the same x_T. Writes
`<outdir>/<image stem>.png` (rows: scales; columns: input, reconstruction, each edit prompt), `grid.png`
(every image's rows), `latents.safetensors` (x_T, reconstructions and edits), and `inversion.json`: the
reconstruction error per scale (latent MSE against z0 and pixel MSE against the input, images in [-1, 1]),
and the autoencoder's own pixel MSE (decode(z0) against the input: the floor of the pixel error).
Trailing `key.path=value` arguments override the config.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.image_grid import make_grid, save_image, to_uint8  # noqa: E402
from ldm.loading import load_model  # noqa: E402
from ldm.models.diffusion.ddim_inversion import (  # noqa: E402
    SCHEDULES,
    ddim_invert,
    ddim_reconstruct,
    image_latent,
)
from ldm.scripts_common import default_device, run_script  # noqa: E402
from ldm.util import atomic_write  # noqa: E402


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/latent-diffusion/txt2img-1p4B-eval_with_tokens.yaml")
    p.add_argument("--ckpt", "--ckpt_path", dest="ckpt", required=True, help="model weights")
    p.add_argument("--embedding_path", nargs="+", default=None, help="embedding file(s) with the learned word")
    p.add_argument("--image", nargs="+", required=True, help="image file(s) to invert")
    p.add_argument("--prompt", default="a photo of *", help="inversion and reconstruction prompt")
    p.add_argument("--edit_prompts", nargs="*", default=["a red *", "a * on a black background"])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 5.0], help="guidance scales (rows)")
    p.add_argument("--ddim_steps", type=int, default=50)
    p.add_argument("--schedule", choices=SCHEDULES, default="aligned",
                   help="aligned: the sampler's S steps mirrored; official: the reference's invert_ddim")
    p.add_argument("--H", type=int, default=0, help="pixel size (default: the model's)")
    p.add_argument("--W", type=int, default=0)
    p.add_argument("--outdir", default="outputs/ddim_inversion")
    p.add_argument("--seed", type=int, default=0, help="feeds only the sampler's zero-weighted noise draws")
    p.add_argument("--device", default=default_device())
    p.add_argument("--tokenizer_path", default=None, help="local tokenizer folder (offline)")
    return p


def check_flags(opt) -> None:
    if opt.ddim_steps < 1 or opt.ddim_steps > 1000:
        raise ValueError(f"--ddim_steps {opt.ddim_steps}: expected 1..1000")
    if not opt.prompt.strip():
        raise ValueError("--prompt is empty; give the reconstruction prompt, e.g. 'a photo of *'")
    for flag in ("config", "ckpt"):
        if not Path(getattr(opt, flag)).is_file():
            raise ValueError(f"--{flag} {getattr(opt, flag)}: no such file")
    for path in opt.image:
        if not Path(path).is_file():
            raise ValueError(f"--image {path}: no such file")
    for s in opt.scales:
        if not np.isfinite(s) or s < 0:
            raise ValueError(f"--scales {s}: expected finite numbers >= 0")
    if Path(opt.outdir).is_file():
        raise ValueError(f"--outdir {opt.outdir} is a file; give a folder")


def read_image(path, size) -> torch.Tensor:
    """[3, H, W] in [-1, 1], resized (bicubic) to `size` (W, H) if needed."""
    img = Image.open(path).convert("RGB")
    if img.size != size:
        img = img.resize(size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def pixel_size(model) -> int:
    return int(model.image_size) * 2 ** int(getattr(model, "num_downs", 0))


def mse(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [float(v) for v in (a.float() - b.float()).pow(2).flatten(1).mean(1)]


@torch.no_grad()
def invert_images(model, images, prompt, edit_prompts, scales, steps, schedule="aligned", seed=0) -> dict:
    """Everything the script writes, as tensors and numbers: {scale: {...}} plus z0 and the AE floor."""
    n = images.shape[0]
    z0 = image_latent(model, images)
    c = model.get_learned_conditioning(n * [prompt])
    uc = model.get_learned_conditioning(n * [""])
    edits_c = [model.get_learned_conditioning(n * [p]) for p in edit_prompts]
    decode = lambda z: model.decode_first_stage(z).clamp(-1.0, 1.0).cpu()  # noqa: E731
    out = {"z0": z0.cpu(), "ae": decode(z0), "scales": {}}
    for s in scales:
        x_T = ddim_invert(model, z0, c, steps, uc, s, schedule=schedule)
        z_rec = ddim_reconstruct(model, x_T, c, steps, uc, s, seed=seed)
        z_edits = [ddim_reconstruct(model, x_T, ce, steps, uc, s, seed=seed) for ce in edits_c]
        out["scales"][s] = {"x_T": x_T.cpu(), "z_rec": z_rec.cpu(), "rec": decode(z_rec),
                            "z_edits": [z.cpu() for z in z_edits], "edits": [decode(z) for z in z_edits]}
    return out


def run(opt, overrides):
    check_flags(opt)
    model = load_model(opt.config, opt.ckpt, overrides=overrides, tokenizer_path=opt.tokenizer_path,
                       device=opt.device)
    if opt.embedding_path:
        if model.embedding_manager is None:
            raise ValueError(f"{opt.config} has no personalization_config: it cannot use --embedding_path")
        model.embedding_manager.load_files(opt.embedding_path)
    side = pixel_size(model)
    size = (opt.W or side, opt.H or side)
    images = torch.stack([read_image(p, size) for p in opt.image])
    torch.manual_seed(opt.seed)
    res = invert_images(model, images, opt.prompt, opt.edit_prompts, opt.scales, opt.ddim_steps, opt.schedule,
                        opt.seed)
    outdir = Path(opt.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    cols = 2 + len(opt.edit_prompts)
    info = {"prompt": opt.prompt, "edit_prompts": json.dumps(opt.edit_prompts), "scales": json.dumps(opt.scales),
            "steps": str(opt.ddim_steps), "schedule": opt.schedule, "ckpt": opt.ckpt,
            "embeddings": json.dumps(opt.embedding_path or [])}
    all_rows = []
    for i, path in enumerate(opt.image):
        rows = []
        for s in opt.scales:
            r = res["scales"][s]
            rows += [images[i], r["rec"][i], *(e[i] for e in r["edits"])]
        tiles = (torch.stack(rows) + 1.0) / 2.0
        all_rows.append(tiles)
        save_image(to_uint8(make_grid(tiles, nrow=cols)), outdir / f"{Path(path).stem}.png",
                   text={**info, "image": str(path)})
    save_image(to_uint8(make_grid(torch.cat(all_rows), nrow=cols)), outdir / "grid.png",
               text={**info, "images": json.dumps(list(opt.image))})
    from safetensors.torch import save_file

    tensors = {"z0": res["z0"].contiguous()}
    for s, r in res["scales"].items():
        tensors[f"x_T/{s:g}"] = r["x_T"].contiguous()
        tensors[f"z_rec/{s:g}"] = r["z_rec"].contiguous()
        for j, z in enumerate(r["z_edits"]):
            tensors[f"z_edit{j}/{s:g}"] = z.contiguous()
    save_file(tensors, str(outdir / "latents.safetensors"))
    z_std = float(res["z0"].std())
    report = {
        "z0": "scale_factor * posterior mode", "z0_std": z_std, "prompt": opt.prompt,
        "edit_prompts": opt.edit_prompts, "ddim_steps": opt.ddim_steps, "schedule": opt.schedule,
        "images": list(opt.image), "columns": ["input", "reconstruction", *opt.edit_prompts],
        "autoencoder_pixel_mse": float(np.mean(mse(res["ae"], images))),
        "scales": {},
    }
    for s, r in res["scales"].items():
        lat, pix = mse(r["z_rec"], res["z0"]), mse(r["rec"], images)
        report["scales"][f"{s:g}"] = {"latent_mse": float(np.mean(lat)), "pixel_mse": float(np.mean(pix)),
                                      "latent_rel_rms": float(np.sqrt(np.mean(lat))) / z_std,
                                      "per_image": {"latent_mse": lat, "pixel_mse": pix}}
    atomic_write(outdir / "inversion.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    for s, r in report["scales"].items():
        print(f"scale {s}: latent MSE {r['latent_mse']:.4g} ({r['latent_rel_rms']:.3f} of std(z0) as RMS), "
              f"pixel MSE {r['pixel_mse']:.4g}")
    print(f"wrote {outdir / 'grid.png'} and {outdir / 'inversion.json'}")
    return report


def main(argv=None) -> int:
    return run_script("ddim_inversion.py", parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
