#!/usr/bin/env bash
# Set up .venv/ (if needed) and run the default job on the bundled toy model, no downloads: invert the
# never-named shape from 5 images with main.py, then use the new word in new prompts.
# Usage: bash scripts/demo.sh [--outdir DIR] [--steps N] [--samples N] [--seed S]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python scripts/toy_demo.py "$@"
