"""Sample the LDM 1.4B text-to-image model with learned words (the official scripts/txt2img.py).

    python scripts/txt2img.py --ddim_eta 0.0 --n_samples 8 --n_iter 2 --scale 10.0 --ddim_steps 50 \
        --embedding_path logs/<run>/checkpoints/embeddings_gs-5000.pt \
        --ckpt_path models/ldm/text2img-large/model.ckpt --prompt "a photo of *"

Trailing `key.path=value` arguments override the config.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.generation import build_parser, run  # noqa: E402
from ldm.scripts_common import run_script  # noqa: E402

DEFAULTS = {
    "outdir": "outputs/txt2img-samples", "ddim_steps": 200, "n_iter": 1, "H": 256, "W": 256, "n_samples": 4,
    "scale": 5.0, "config": "configs/latent-diffusion/txt2img-1p4B-eval_with_tokens.yaml",
    "ckpt_flag": "--ckpt_path", "ckpt": "models/ldm/text2img-large/model.ckpt", "seed": None, "precision": "full",
}

def main(argv=None) -> int:
    return run_script("txt2img.py", build_parser(__doc__.splitlines()[0], DEFAULTS), run, argv)


if __name__ == "__main__":
    sys.exit(main())
