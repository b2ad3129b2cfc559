"""The shell every command-line script shares: parse, run, and turn user errors into one line + exit 1."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

import torch

from ldm.checkpoint import CheckpointError
from ldm.modules.embedding_manager import PlaceholderError
from ldm.modules.encoders.pretrained import PretrainedResourceError

#: Errors that are the user's to fix (a wrong path, file, flag or value), reported without a traceback.
USER_ERRORS = (CheckpointError, PlaceholderError, PretrainedResourceError, FileNotFoundError, ValueError)


def default_device() -> str:
    """The entry points' default device: the first accelerator torch finds, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(torch.cuda.current_device()).type
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def run_script(name: str, parser: argparse.ArgumentParser, fn: Callable, argv=None) -> int:
    """Parse known flags (the rest are `key.path=value` config overrides) and call `fn(opt, overrides)`."""
    opt, overrides = parser.parse_known_args(argv)
    bad = [t for t in overrides if "=" not in t or t.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        fn(opt, overrides)
    except USER_ERRORS as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    return 0
