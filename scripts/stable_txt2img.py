"""Sample Stable Diffusion v1 with learned words (the official scripts/stable_txt2img.py).

    python scripts/stable_txt2img.py --ddim_eta 0.0 --n_samples 8 --n_iter 2 --scale 10.0 --ddim_steps 50 \
        --embedding_path logs/<run>/checkpoints/embeddings_gs-5000.pt \
        --ckpt models/ldm/stable-diffusion-v1/model.ckpt --prompt "a photo of *"

`--laion400m` samples the LDM 1.4B model instead (with its tokens config). Trailing `key.path=value`
arguments override the config.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.generation import build_parser, run  # noqa: E402
from ldm.scripts_common import run_script  # noqa: E402

DEFAULTS = {
    "outdir": "outputs/txt2img-samples", "ddim_steps": 50, "n_iter": 2, "H": 512, "W": 512, "n_samples": 3,
    "scale": 7.5, "config": "configs/stable-diffusion/v1-inference.yaml", "ckpt_flag": "--ckpt",
    "ckpt": "models/ldm/stable-diffusion-v1/model.ckpt", "seed": 42, "precision": "autocast",
}


def parser():
    p = build_parser(__doc__.splitlines()[0], DEFAULTS)
    p.add_argument("--laion400m", action="store_true", help="use the LDM 1.4B model (LAION-400M)")
    return p


def run_laion_aware(opt, overrides):
    # The reference pointed at a config without personalization (docs/DIFFERENCES.md#stable-txt2img-fixes).
    if opt.laion400m:
        opt.config = "configs/latent-diffusion/txt2img-1p4B-eval_with_tokens.yaml"
        opt.ckpt = "models/ldm/text2img-large/model.ckpt"
        opt.outdir = "outputs/txt2img-samples-laion400m"
    return run(opt, overrides)


def main(argv=None) -> int:
    return run_script("stable_txt2img.py", parser(), run_laion_aware, argv)


if __name__ == "__main__":
    sys.exit(main())
