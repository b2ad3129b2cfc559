#!/usr/bin/env bash
# Set up .venv/ (if needed) and run the default job on the bundled model, no downloads.
# Usage: bash scripts/demo.sh [--outdir DIR] [--steps N] [--seed S]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python scripts/tiny_demo.py "$@"
