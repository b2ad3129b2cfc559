#!/usr/bin/env bash
# Set up .venv/ (if needed) and run the default test suite. Usage: bash scripts/test.sh [pytest args]
# The default run deselects the `slow` and `gpu` markers (pyproject.toml); with CI=true the slow tests run
# too. A -m in the arguments comes later and wins.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
markers=()
if [ "${CI:-}" = "true" ]; then
  markers=(-m "not gpu")
fi
exec .venv/bin/python -m pytest -q "${markers[@]}" "$@"
