"""Train a Textual Inversion embedding (or any latent-diffusion model) from YAML configs.

    python main.py --base configs/latent-diffusion/txt2img-1p4B-finetune.yaml -t \
        --actual_resume models/ldm/text2img-large/model.ckpt -n run --gpus 0, \
        --data_root imgs/ --init_word sculpture

Unknown arguments are OmegaConf overrides (`key.path=value`). This is a command line over
`ldm.training.train`; the classes configs name as `main.X` are re-exported here, and importing this module
has no side effects.
"""

from __future__ import annotations

import logging
import sys

from ldm.callbacks import CUDACallback, ImageLogger, LearningRateMonitor, NonFiniteError, SetupCallback  # noqa: F401
from ldm.checkpoint import CheckpointError
from ldm.cli import UsageError, parse_args, trainer_flags
from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset  # noqa: F401
from ldm.malloc import restart_lean
from ldm.scripts_common import USER_ERRORS, report_error
from ldm.training import TrainOptions, fit, prepare

#: Errors of a started run that are reported as one line (see `main`).
TRAINING_ERRORS = (NonFiniteError, CheckpointError, UsageError)


def options_from_args(argv=None) -> TrainOptions:
    """`main.py`'s command line as TrainOptions: the flags by name, the trainer flags in `trainer`, the
    leftover `key.path=value` tokens as config overrides."""
    opt, unknown = parse_args(argv)
    values = {k: v for k, v in vars(opt).items() if k in TrainOptions.names()}
    return TrainOptions(**values, overrides=list(unknown), trainer=trainer_flags(opt))


def main(argv=None) -> int:
    """Exit code 0 on success; a user error (bad flag, config, file, or a run that went non-finite) is one
    line `main.py: error: ...` and exit code 1 (2 for malformed flags), its traceback shown with --debug or
    TI_DEBUG=1."""
    opts = options_from_args(argv)
    if opts.lean and argv is None:  # the command line itself: the allocator is chosen at process start
        restart_lean()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        job = prepare(opts)
    except USER_ERRORS as e:
        return report_error("main.py", e, opts.debug)
    try:
        fit(job, opts)
    except TRAINING_ERRORS as e:  # not every ValueError: a bug inside training keeps its traceback
        return report_error("main.py", e, opts.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
