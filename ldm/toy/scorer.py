"""The toy world's attribute scorer: a small CNN with one classification head per attribute.

It grades images, generated or rendered, against the attributes of `ldm.data.toy_world` (shape, including the
unnamed shape, color, background, position, fill). Gate G0 (README.md, "The toy world and its model")
asks for >= 0.98 accuracy
per attribute on clean renders and >= 0.9 on degraded ones; `scripts/train_toy_scorer.py` trains it and
measures both.

Generated samples are blurry and sometimes off-distribution (the prototype's scorer called blurry blobs
"star"), so training uses fresh renders with blur, noise and colour jitter, and a share of *outliers* (an
elongated ellipse, or a shape blurred beyond recognition) whose shape and fill targets are uniform: on such
images those heads learn low confidence, and `score(..., threshold=t)` reports index -1 ("none/uncertain") for any
attribute whose top probability is below t. Colour, background and position stay labelled on outliers.

Weights are `.safetensors` with the architecture and the attribute lists in the metadata; loading checks the
lists against the current world and fails on a mismatch rather than mislabelling.

Input everywhere: float [B, 3, H, W] in [-1, 1] (the LDM's sample range), or uint8 [B, H, W, 3] / [H, W, 3].
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.data.toy_world import (
    ATTRIBUTE_VALUES,
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPE_RADIUS,
    SHAPES,
    SUPERSAMPLING,
    Attributes,
    render,
    sample_attributes,
)

__all__ = [
    "ScorerConfig",
    "ToyScorer",
    "accuracy",
    "degrade",
    "eval_set",
    "evaluate",
    "gaussian_blur",
    "load_scorer",
    "save_scorer",
    "scorer_loss",
    "training_batch",
]

FORMAT = "ldm.toy.scorer"
FORMAT_VERSION = "1"
ATTRIBUTES = tuple(ATTRIBUTE_VALUES)

#: Training augmentation: each applied to a sample with probability AUGMENT_P. Blur sigmas in pixels of the
#: 32x32 image; noise std in units of the [-1, 1] range.
AUGMENT_P = 0.6
TRAIN_BLUR = (0.0, 1.5)
TRAIN_NOISE = (0.0, 0.15)
COLOR_GAIN = 0.1  # per-channel gain in [1 - g, 1 + g]
COLOR_SHIFT = 0.06  # per-channel offset in [-s, s]
#: Outliers (uniform shape target): an elongated ellipse, or any shape blurred with a sigma in OUTLIER_BLUR.
OUTLIER_P = 0.1
OUTLIER_BLUR = (2.5, 4.0)
ELLIPSE_ASPECT = (1.8, 2.6)
#: Targets that are uniform on outliers.
UNCERTAIN_ON_OUTLIERS = ("shape", "fill")
#: Share of hollow squares and triangles in the training and evaluation renders.
HOLLOW_P = 0.5
#: The "degraded" evaluation set of gate G0: every image blurred and noised by amounts in these ranges.
DEGRADED_BLUR = (0.5, 1.0)
DEGRADED_NOISE = (0.02, 0.1)


@dataclass(frozen=True)
class ScorerConfig:
    """Architecture: two 3x3 convs + 2x average pool per width, then a hidden layer and one head each."""

    widths: tuple[int, ...] = (32, 64, 96)
    hidden: int = 64
    image_size: int = 32
    groups: int = 8


class ToyScorer(nn.Module):
    """Image [B, 3, image_size, image_size] in [-1, 1] -> {attribute: logits [B, len(values)]}."""

    def __init__(self, config: ScorerConfig | None = None):
        super().__init__()
        self.config = config = config or ScorerConfig()
        layers, width_in = [], 3
        for width in config.widths:
            for k in range(2):
                layers += [nn.Conv2d(width_in if k == 0 else width, width, 3, padding=1),
                           nn.GroupNorm(config.groups, width), nn.SiLU()]
            layers.append(nn.AvgPool2d(2))
            width_in = width
        self.features = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.widths)
        # Flattened, not globally pooled: the position head needs to know where the shape is.
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(width_in * side * side, config.hidden), nn.SiLU())
        self.heads = nn.ModuleDict(
            {name: nn.Linear(config.hidden, len(values)) for name, values in ATTRIBUTE_VALUES.items()}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.hidden(self.features(images))
        return {name: head(h) for name, head in self.heads.items()}

    def prepare(self, images) -> torch.Tensor:
        """Any accepted input (module docstring) as float [B, 3, S, S] in [-1, 1] on the model's device."""
        param = next(self.parameters())
        x = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images  # writable copy
        if x.dtype == torch.uint8:
            x = x.unsqueeze(0) if x.dim() == 3 else x
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = x.to(device=param.device, dtype=param.dtype)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] (or uint8 [B, H, W, 3]), got {tuple(x.shape)}")
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x

    @torch.no_grad()
    def score(self, images, threshold: float = 0.0) -> dict[str, dict]:
        """Per attribute: "probs" [B, K], "confidence" [B] (top probability), "index" [B] (argmax, or -1 when
        the confidence is below `threshold`: "none/uncertain") and "value" (the names, None for -1)."""
        was_training = self.training
        self.eval()
        logits = self(self.prepare(images))
        self.train(was_training)
        out = {}
        for name, logit in logits.items():
            probs = logit.float().softmax(-1)
            confidence, index = probs.max(-1)
            index = torch.where(confidence >= threshold, index, torch.full_like(index, -1))
            values = [ATTRIBUTE_VALUES[name][i] if i >= 0 else None for i in index.tolist()]
            out[name] = {"probs": probs, "confidence": confidence, "index": index, "value": values}
        return out


# ---------------------------------------------------------------------------------------------------
# File format
# ---------------------------------------------------------------------------------------------------


def save_scorer(model: ToyScorer, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the weights as safetensors; the config and the attribute lists go into the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(asdict(model.config)),
        "attribute_values": json.dumps(ATTRIBUTE_VALUES),
        **(metadata or {}),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=meta)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_scorer(path: str | Path, device: str | torch.device = "cpu") -> ToyScorer:
    """Load a scorer written by `save_scorer` (strictly), in eval mode."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        found = meta.get("format")
        raise ValueError(f"{path} is not a toy scorer file (format {found!r}, expected {FORMAT!r})")
    if json.loads(meta["attribute_values"]) != ATTRIBUTE_VALUES:
        raise ValueError(f"{path} was trained for other attribute lists {meta['attribute_values']}; "
                         f"the world now has {json.dumps(ATTRIBUTE_VALUES)}: retrain it")
    config = json.loads(meta["config"])
    model = ToyScorer(ScorerConfig(**{**config, "widths": tuple(config["widths"])}))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------
# Training data and augmentation
# ---------------------------------------------------------------------------------------------------


def render_ellipse(attrs: Attributes, size: int, rng: np.random.Generator) -> np.ndarray:
    """An outlier: an elongated, turned ellipse of the circle's area at `attrs`' place and colours."""
    big = size * SUPERSAMPLING
    aspect = rng.uniform(*ELLIPSE_ASPECT)
    turn = rng.uniform(0.0, math.pi)
    radius = SHAPE_RADIUS * big
    a, b = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
    cx, cy = POSITIONS[attrs.position] * big, 0.5 * big
    points = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x, y = a * math.cos(t), b * math.sin(t)
        cos, sin = math.cos(turn), math.sin(turn)
        points.append((cx + x * cos - y * sin, cy + x * sin + y * cos))
    image = Image.new("RGB", (big, big), BACKGROUNDS[attrs.background])
    ImageDraw.Draw(image).polygon(points, fill=COLORS[attrs.color])
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Blur each image [B, C, H, W] with its own sigma [B] (pixels; 0 leaves it as is); reflect padding."""
    b, c, h, w = images.shape
    radius = max(1, math.ceil(3 * float(sigmas.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    safe = sigmas.to(images).clamp_min(1e-3)[:, None]
    kernels = torch.exp(-0.5 * (offsets[None] / safe) ** 2)
    kernels = kernels / kernels.sum(-1, keepdim=True)
    kernels = kernels.repeat_interleave(c, 0)  # [B*C, K]
    x = images.reshape(1, b * c, h, w)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernels[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernels[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def degrade(images: torch.Tensor, rng: np.random.Generator, blur=DEGRADED_BLUR, noise=DEGRADED_NOISE,
            p: float = 1.0) -> torch.Tensor:
    """Blur, then add Gaussian noise, each with probability `p` per image and an amount uniform in its range;
    clamps to [-1, 1]. All draws come from `rng`."""
    b = images.shape[0]
    sigmas = rng.uniform(*blur, size=b) * (rng.random(b) < p)
    stds = rng.uniform(*noise, size=b) * (rng.random(b) < p)
    eps = torch.from_numpy(rng.standard_normal(images.shape).astype(np.float32)).to(images)
    stds = torch.from_numpy(stds).to(images)[:, None, None, None]
    x = gaussian_blur(images, torch.from_numpy(sigmas)) + stds * eps
    return x.clamp(-1.0, 1.0)


def to_tensor(pixels: list[np.ndarray]) -> torch.Tensor:
    """uint8 images [H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def training_batch(rng: np.random.Generator, batch_size: int = 64, size: int = 32, augment: bool = True):
    """(images [B, 3, S, S], labels {attribute: LongTensor [B]}, outlier BoolTensor [B]) of fresh renders,
    all shapes equally likely, fill by HOLLOW_P; with `augment`, outliers, colour jitter, blur and noise as
    described above."""
    objects = [sample_attributes(rng, SHAPES, None, HOLLOW_P) for _ in range(batch_size)]
    # 0: a render, 1: an ellipse outlier, 2: a smeared outlier (a render blurred beyond recognition)
    kinds = (rng.choice(3, size=batch_size, p=[1 - OUTLIER_P, OUTLIER_P / 2, OUTLIER_P / 2]) if augment
             else np.zeros(batch_size, dtype=np.int64))
    pixels = [render_ellipse(a, size, rng) if kind == 1 else render(a, size, rng)
              for a, kind in zip(objects, kinds, strict=True)]
    images = to_tensor(pixels)
    labels = {name: torch.tensor([a.labels[name] for a in objects]) for name in ATTRIBUTES}
    outlier = torch.zeros(batch_size, dtype=torch.bool)
    if augment:
        outlier = torch.from_numpy(kinds > 0)
        gain = 1 + rng.uniform(-COLOR_GAIN, COLOR_GAIN, size=(batch_size, 3, 1, 1))
        shift = rng.uniform(-COLOR_SHIFT, COLOR_SHIFT, size=(batch_size, 3, 1, 1))
        jitter = rng.random(batch_size)[:, None, None, None] < AUGMENT_P
        images = torch.where(torch.from_numpy(jitter), images * torch.from_numpy(gain).float()
                             + torch.from_numpy(shift).float(), images)
        images = degrade(images, rng, TRAIN_BLUR, TRAIN_NOISE, p=AUGMENT_P)
        smeared = torch.from_numpy(kinds == 2)
        heavy = torch.from_numpy(rng.uniform(*OUTLIER_BLUR, size=batch_size))
        images = torch.where(smeared[:, None, None, None], gaussian_blur(images, heavy * smeared), images)
    return images, labels, outlier


def scorer_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], outlier: torch.Tensor):
    """Sum over attributes of the cross-entropy; on outliers the UNCERTAIN_ON_OUTLIERS targets are uniform."""
    total = 0.0
    for name, logit in logits.items():
        target = F.one_hot(labels[name], logit.shape[-1]).float()
        if name in UNCERTAIN_ON_OUTLIERS:
            target = torch.where(outlier[:, None], torch.full_like(target, 1.0 / logit.shape[-1]), target)
        total = total + F.cross_entropy(logit, target)
    return total


# ---------------------------------------------------------------------------------------------------
# Evaluation (gate G0)
# ---------------------------------------------------------------------------------------------------


def eval_rng(seed: int, kind: str) -> np.random.Generator:
    """The generator of an evaluation set: disjoint from the training batches' generators."""
    return np.random.default_rng([seed, zlib.crc32(b"scorer-eval"), zlib.crc32(kind.encode())])


def eval_set(n: int, seed: int = 0, kind: str = "clean", size: int = 32):
    """(images, labels) of `n` fresh renders with jitter, all shapes equally likely, fill by HOLLOW_P. kind:
    "clean", "degraded" (blur and noise in DEGRADED_BLUR / DEGRADED_NOISE) or "outlier" (ellipses, smears)."""
    rng = eval_rng(seed, kind)
    objects = [sample_attributes(rng, SHAPES, None, HOLLOW_P) for _ in range(n)]
    if kind == "outlier":
        pixels = [render_ellipse(a, size, rng) for a in objects[: n // 2]]
        pixels += [render(a, size, rng) for a in objects[n // 2:]]
        images = to_tensor(pixels)
        smear = torch.arange(n) >= n // 2
        heavy = torch.from_numpy(rng.uniform(*OUTLIER_BLUR, size=n)) * smear
        images = gaussian_blur(images, heavy)
    else:
        images = to_tensor([render(a, size, rng) for a in objects])
        if kind == "degraded":
            images = degrade(images, rng)
        elif kind != "clean":
            raise ValueError(f"unknown evaluation set {kind!r}")
    return images, {name: torch.tensor([a.labels[name] for a in objects]) for name in ATTRIBUTES}


def accuracy(model: ToyScorer, images: torch.Tensor, labels: dict[str, torch.Tensor],
             batch_size: int = 500) -> dict[str, float]:
    """Per-attribute argmax accuracy."""
    hits = {name: 0 for name in ATTRIBUTES}
    for start in range(0, len(images), batch_size):
        scores = model.score(images[start:start + batch_size])
        for name in ATTRIBUTES:
            hits[name] += int((scores[name]["index"] == labels[name][start:start + batch_size]).sum())
    return {name: hits[name] / len(images) for name in ATTRIBUTES}


def evaluate(model: ToyScorer, n: int = 2000, seed: int = 0, threshold: float = 0.6) -> dict:
    """Gate G0 figures: accuracy per attribute on clean and degraded renders, and the share of images whose
    shape is flagged uncertain at `threshold` on each set (outliers should be flagged, renders should not)."""
    report = {"n": n, "clean": {}, "degraded": {}, "threshold": threshold, "shape_uncertain_rate": {}}
    for kind in ("clean", "degraded", "outlier"):
        images, labels = eval_set(n, seed, kind, model.config.image_size)
        if kind != "outlier":
            report[kind] = accuracy(model, images, labels)
        flagged = model.score(images, threshold)["shape"]["index"] == -1
        report["shape_uncertain_rate"][kind] = float(flagged.float().mean())
    passed = min(report["clean"].values()) >= 0.98 and min(report["degraded"].values()) >= 0.9
    report["gate_G0"] = bool(passed)
    return report
