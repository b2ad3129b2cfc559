"""Test-only Lightning callbacks, named in configs by tests (tests/ is on PYTHONPATH in their subprocesses)."""

import os
import signal

import pytorch_lightning as pl


class KillAtStep(pl.Callback):
    """SIGKILL this process right after optimizer step `step` (after any checkpoint of that step); -1: never."""

    def __init__(self, step: int = -1):
        super().__init__()
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.step >= 0 and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
