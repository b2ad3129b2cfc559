"""Shared test fixtures: paths to ../shared, offline Hugging Face, deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TI_SHARED_DIR", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"


def fixture_path(*parts: str) -> Path:
    """Path under ../shared/fixtures, or skip the test with the reason if it is absent."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared fixture not found: {path} (set TI_SHARED_DIR to the shared/ folder)")
    return path


@pytest.fixture(autouse=True)
def _torch_defaults():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
