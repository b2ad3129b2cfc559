"""Validation previews: the user's own prompts rendered from fixed starting noise every N steps.

`main.py --validation_prompts "a photo of *" "a * on the beach" --validation_every 50` (or the callback
`ldm.validation_previews.ValidationPreviews` under `lightning.callbacks`). For prompt i the starting noise
is drawn once per render from a generator seeded with `derive_seed(seed, i)`, so every render of a prompt
starts from the same noise, in every run with that seed; the samplers are deterministic (eta 0), so the
only thing that changes between two renders is the learned embedding.

Files, under `<logdir>/validation/<i:02>-<prompt slug>/`:
- `gs-<step:06>.png`: one row of `samples` images at that optimizer step (step 0 is the initial
  embedding), with the prompt, negative prompt, step, seed, sampler and steps as PNG text;
- `contact_sheet.png`: every step's row, top to bottom, each labelled with its step, rebuilt from the
  `gs-*.png` files after each render (so a resumed run extends it).

Prompts are conditioned with `ldm.prompt_weighting` (`(word:1.2)`, `[word]`), the negative prompt drives
the unconditional branch of classifier-free guidance. Renders happen on rank 0, inside `ema_scope`, with the
autoencoder's decoder read back if `release_first_stage` freed it, and without touching the training
run's random state.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw

from ldm.data.resumable import derive_seed
from ldm.generation import SAMPLERS, slug
from ldm.image_grid import make_grid, save_image, to_uint8
from ldm.prompt_weighting import weighted_conditioning
from ldm.util import atomic_write

logger = logging.getLogger(__name__)

#: samplers a preview may use (deterministic from the starting noise)
PREVIEW_SAMPLERS = ("dpmpp2m", "ddim", "plms")
GRID = re.compile(r"gs-(\d+)\.png")


def read_prompts(values: Sequence[str]) -> list[str]:
    """`--validation_prompts` values: a value naming an existing file stands for its non-empty lines."""
    prompts: list[str] = []
    for value in values:
        path = Path(value)
        if path.is_file():
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not lines:
                raise ValueError(f"--validation_prompts {value}: the file holds no prompt")
            prompts += lines
        elif value.strip():
            prompts.append(value.strip())
    return prompts


def folder_name(index: int, prompt: str) -> str:
    return f"{index:02}-{slug(prompt)[:64]}"


def contact_sheet(rows: Sequence[tuple[int, np.ndarray]], label_width: int = 72) -> np.ndarray:
    """Rows of (step, [H, W, 3] uint8 grid) -> one image, the rows stacked in step order, each with
    "step N" on its left. Small grids are enlarged (nearest neighbour) to at least 64 pixels high."""
    rows = sorted(rows, key=lambda r: r[0])
    height = max(r[1].shape[0] for r in rows)
    scale = max(1, -(-64 // height))
    width = max(r[1].shape[1] for r in rows) * scale
    sheet = Image.new("RGB", (label_width + width, height * scale * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (step, grid) in enumerate(rows):
        image = Image.fromarray(grid)
        if scale > 1:
            image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
        top = k * height * scale
        sheet.paste(image, (label_width, top))
        draw.text((4, top + height * scale // 2 - 6), f"step {step}", fill="black")
    return np.asarray(sheet)


class ValidationPreviews(pl.Callback):
    """Every `every` optimizer steps (None: a tenth of `max_steps`, else 500), at the start (step 0) and at
    the end, render `samples` images of each prompt; see the module docstring for the files."""

    def __init__(self, prompts: Sequence[str], every: int | None = None, samples: int = 4,
                 sampler: str = "dpmpp2m", steps: int = 20, scale: float = 5.0, negative_prompt: str = "",
                 seed: int = 23, at_start: bool = True, folder: str = "validation"):
        super().__init__()
        self.prompts = read_prompts(list(prompts))
        if not self.prompts:
            raise ValueError("--validation_prompts: no prompt given")
        if sampler not in PREVIEW_SAMPLERS:
            raise ValueError(f"--validation_sampler {sampler}: expected one of {', '.join(PREVIEW_SAMPLERS)}")
        for flag, value in (("validation_samples", samples), ("validation_steps", steps)):
            if int(value) != value or value < 1:
                raise ValueError(f"--{flag} {value}: expected a whole number >= 1")
        if every is not None and (int(every) != every or every < 1):
            raise ValueError(f"--validation_every {every}: expected a whole number of steps >= 1")
        self.every, self.samples, self.sampler, self.steps = every, int(samples), sampler, int(steps)
        self.scale, self.negative_prompt, self.seed = float(scale), negative_prompt, int(seed)
        self.at_start, self.folder = at_start, folder
        self._rendered: set[int] = set()

    def interval(self, trainer) -> int:
        if self.every is not None:
            return int(self.every)
        max_steps = int(getattr(trainer, "max_steps", -1) or -1)
        return max(1, max_steps // 10) if max_steps > 0 else 500

    def root(self, trainer) -> Path:
        logdir = getattr(trainer, "logdir", None) or trainer.default_root_dir
        return Path(logdir) / self.folder

    def noise(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The starting noise of prompt `index`: the same on every call."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, index))
        return torch.randn((self.samples, *shape), generator=g)

    @torch.no_grad()
    def images(self, pl_module, index: int) -> torch.Tensor:
        """[samples, 3, H, W] in [0, 1] of prompt `index` with the model's current embedding."""
        model, n = pl_module, self.samples
        shape = (model.channels, model.image_size, model.image_size)
        c = weighted_conditioning(model, n * [self.prompts[index]])
        uc = weighted_conditioning(model, n * [self.negative_prompt]) if self.scale != 1.0 else None
        x_T = self.noise(index, shape).to(model.device)
        z, _ = SAMPLERS[self.sampler](model).sample(
            S=self.steps, conditioning=c, batch_size=n, shape=shape, verbose=False, x_T=x_T, eta=0.0,
            unconditional_guidance_scale=self.scale, unconditional_conditioning=uc)
        return ((model.decode_first_stage(z) + 1.0) / 2.0).clamp(0.0, 1.0).float().cpu()

    def render(self, trainer, pl_module) -> None:
        step = int(trainer.global_step)
        if step in self._rendered:
            return
        self._rendered.add(step)
        if not trainer.is_global_zero:
            return
        was_training = pl_module.training
        release = getattr(pl_module, "first_stage_release", None)
        device = pl_module.device  # its RNG is forked too when it is an accelerator
        on_accelerator = device.type != "cpu"
        rng = torch.random.fork_rng(devices=[device.index or 0] if on_accelerator else [],
                                    device_type=device.type if on_accelerator else None)
        pl_module.eval()
        try:
            decoder = (release.loaded(pl_module.first_stage_model, pl_module.device, "decoder")
                       if release is not None else contextlib.nullcontext())
            with rng, pl_module.ema_scope("Validation previews"), decoder:
                grids = [self.images(pl_module, i) for i in range(len(self.prompts))]
        finally:
            pl_module.train(was_training)
        for i, (prompt, images) in enumerate(zip(self.prompts, grids, strict=True)):
            self.write(trainer, i, prompt, step, images)
        logger.info("validation previews of step %d written to %s", step, self.root(trainer))

    def write(self, trainer, index: int, prompt: str, step: int, images: torch.Tensor) -> None:
        folder = self.root(trainer) / folder_name(index, prompt)
        grid = to_uint8(make_grid(images, nrow=self.samples))
        text = {"prompt": prompt, "negative_prompt": self.negative_prompt, "step": step, "seed": self.seed,
                "sampler": self.sampler, "steps": self.steps, "scale": self.scale, "prompt_index": index}
        save_image(grid, folder / f"gs-{step:06}.png", text=text)
        rows = []
        for path in folder.iterdir():
            match = GRID.fullmatch(path.name)
            if match:
                with Image.open(path) as image:
                    rows.append((int(match.group(1)), np.asarray(image.convert("RGB"))))
        sheet = Image.fromarray(contact_sheet(rows))
        atomic_write(folder / "contact_sheet.png", lambda tmp: sheet.save(tmp, format="PNG"))
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_images"):
            experiment.add_images(f"validation/{index:02}", images, global_step=step)

    def on_train_start(self, trainer, pl_module):
        if self.at_start and trainer.global_step == 0:
            self.render(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = int(trainer.global_step)
        if step > 0 and step % self.interval(trainer) == 0:
            self.render(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.render(trainer, pl_module)
