"""Training seconds per optimizer step, for time-to-quality measurements.

The clock runs only between a batch's start and the end of its optimizer step (before other callbacks'
end-of-batch work, when it is listed first), so evaluation and file writing do not count. `seconds` maps
each global step to the training seconds spent up to it; it is saved in the checkpoint (a resumed run
continues the count) and written to `<logdir>/training_clock.json` whenever a checkpoint is saved and at
the end.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytorch_lightning as pl

from ldm.util import atomic_write


class TrainingClock(pl.Callback):
    def __init__(self, path: str | None = None):
        super().__init__()
        self.path = path
        self.total = 0.0
        self.seconds: dict[int, float] = {}
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is not None:
            self.total += time.perf_counter() - self._start
            self._start = None
        self.seconds[int(pl_module.global_step)] = self.total

    def state_dict(self) -> dict:
        return {"total": self.total, "seconds": {str(k): v for k, v in self.seconds.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.total = float(state["total"])
        self.seconds = {int(k): float(v) for k, v in state["seconds"].items()}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.write(trainer)

    def on_train_end(self, trainer, pl_module):
        self.write(trainer)

    def write(self, trainer) -> None:
        if not trainer.is_global_zero:
            return
        path = self.path or os.path.join(getattr(trainer, "logdir", trainer.default_root_dir), "training_clock.json")
        record = {"seconds": {str(k): round(v, 4) for k, v in sorted(self.seconds.items())}}
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
