"""Train and evaluate the paper's setups over a set of concepts and prompts (Figure 7(a)).

    python scripts/run_paper_setups.py --spec paper_setups.yaml [--device cuda] [--eval_only]
    python scripts/run_paper_setups.py --list_setups

The spec format and a full example are in docs/EVALUATION.md. Writes results.csv/json, per_prompt.csv and
the reconstruction-editability plot tradeoff.png to the spec's out_dir (or --out_dir).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from evaluation.setups import run  # noqa: E402
from evaluation.spec import CATALOGUE, REFERENCES, load_spec  # noqa: E402
from ldm.scripts_common import USER_ERRORS  # noqa: E402

# Spec fields that can also be set on the command line (they win over the spec file).
CLI_FIELDS = {
    "out_dir": str,
    "device": str,
    "n_samples": int,
    "ddim_steps": int,
    "max_steps": int,
    "seed": int,
    "clip_model": str,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", type=str, help="YAML or JSON run spec")
    p.add_argument("--eval_only", action="store_true", help="do not train: every embedding must exist")
    p.add_argument("--list_setups", action="store_true", help="print the setup catalogue and exit")
    for name, kind in CLI_FIELDS.items():
        p.add_argument(f"--{name}", type=kind, default=None)
    return p


def main(argv=None) -> int:
    opt = build_parser().parse_args(argv)
    if opt.list_setups:
        for setup in CATALOGUE.values():
            print(f"{setup.name:18} {setup.label:28} {setup.options or ''} {' '.join(setup.overrides)}")
        for name, label in REFERENCES.items():
            print(f"{name:18} {label:28} (reference, no training)")
        return 0
    if not opt.spec:
        print("run_paper_setups.py: error: --spec is required", file=sys.stderr)
        return 2
    try:
        spec = load_spec(opt.spec)
        for name in CLI_FIELDS:
            if getattr(opt, name) is not None:
                setattr(spec, name, getattr(opt, name))
        spec.device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        trainer = dict(spec.train_options.get("trainer", {}))
        if spec.device.startswith("cuda") and not {"gpus", "devices", "accelerator"} & set(trainer):
            trainer["gpus"] = f"{torch.device(spec.device).index or 0},"  # train on the evaluation GPU
            spec.train_options = {**spec.train_options, "trainer": trainer}
        table = run(spec, train=not opt.eval_only)
    except USER_ERRORS as e:
        print(f"run_paper_setups.py: error: {e}", file=sys.stderr)
        return 1
    for row in table:
        print(
            f"{row['label']:28} image {row['image_similarity']:.4f} [{row['image_ci_low']:.4f}, "
            f"{row['image_ci_high']:.4f}]  text {row['text_similarity']:.4f} [{row['text_ci_low']:.4f}, "
            f"{row['text_ci_high']:.4f}]"
        )
    print(f"Results: {Path(spec.out_dir) / 'results.csv'}, plot: {Path(spec.out_dir) / 'tradeoff.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
