"""The shell every command-line script shares: parse, run, and turn user errors into one line + exit 1."""

from __future__ import annotations

import argparse
import logging
import os
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


#: Set to 1 to see the traceback of a user error (every entry point; main.py also has --debug).
DEBUG_ENV = "TI_DEBUG"


def debug_enabled(flag: bool = False) -> bool:
    return bool(flag) or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def error_line(name: str, e: BaseException | str) -> str:
    """`<name>: error: <message>` on one line (a multi-line message is joined)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{name}: error: {text}"


def report_error(name: str, e: BaseException, debug: bool = False) -> int:
    """Print the one-line error (re-raise it instead under --debug / TI_DEBUG=1); returns exit code 1."""
    if debug_enabled(debug):
        raise e
    print(error_line(name, e), file=sys.stderr)
    return 1


def one_line_parser(name: str, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse report a malformed flag as one line `<name>: error: ... (see --help)`, exit code 2
    (argparse prints the whole usage block first)."""

    def error(message: str):
        parser.exit(2, error_line(name, f"{message} (see --help)") + "\n")

    parser.error = error
    return parser


def check_output_path(output: str, inputs, flag: str) -> None:
    """The output file must not be one of the inputs (it would replace it) nor lie under a file."""
    from pathlib import Path

    out = Path(output)
    for given in inputs:
        src = Path(given)
        if out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise ValueError(f"{flag} {output} is also an input: it would replace {given}; write to a new file")
    if out.is_dir():
        raise ValueError(f"{flag} {output} is a folder; give a file name")
    for q in out.parents:
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"{flag} {output}: {q} is a file; give a path in a folder")
            break


def run_script(name: str, parser: argparse.ArgumentParser, fn: Callable, argv=None) -> int:
    """Parse known flags (the rest are `key.path=value` config overrides) and call `fn(opt, overrides)`.

    Every user error (USER_ERRORS, malformed flags included) is one line `<name>: error: ...` and a non-zero
    exit code, with its traceback under TI_DEBUG=1.
    """
    one_line_parser(name, parser)
    opt, overrides = parser.parse_known_args(argv)
    bad = [t for t in overrides if "=" not in t or t.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        fn(opt, overrides)
    except USER_ERRORS as e:
        return report_error(name, e)
    return 0
