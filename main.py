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

from ldm.callbacks import CUDACallback, ImageLogger, LearningRateMonitor, SetupCallback  # noqa: F401
from ldm.cli import parse_args, trainer_flags
from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset  # noqa: F401
from ldm.scripts_common import USER_ERRORS
from ldm.training import TrainOptions, fit, prepare


def options_from_args(argv=None) -> TrainOptions:
    """`main.py`'s command line as TrainOptions: the flags by name, the trainer flags in `trainer`, the
    leftover `key.path=value` tokens as config overrides."""
    opt, unknown = parse_args(argv)
    values = {k: v for k, v in vars(opt).items() if k in TrainOptions.names()}
    return TrainOptions(**values, overrides=list(unknown), trainer=trainer_flags(opt))


def main(argv=None) -> int:
    opts = options_from_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        job = prepare(opts)
    except USER_ERRORS as e:
        if opts.debug:
            raise
        print(f"main.py: error: {e}", file=sys.stderr)
        return 1
    fit(job, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
