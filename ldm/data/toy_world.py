"""The toy world: procedurally rendered, captioned 32x32 images, the training data of the bundled CPU model.

Real text-to-image checkpoints cannot be downloaded on the build machines, so the project trains a small
latent diffusion model on this world (issue 6; the measured gates are in README.md, "The toy world and its
model"). The world is deliberately small:

* shape: circle, square, triangle, star, plus ``UNNAMED_SHAPE`` ("ring"), which no caption ever names. The
  word "ring" is still in the vocabulary, so a placeholder experiment can use it as an (untrained) control
  token; captions call a ring "shape" or "object", and so do half of the captions of squares, triangles
  and stars (`P_COARSE`), so a coarse initializer word exists. Circles are always named (`ALWAYS_NAMED`).
* color (of the shape): red, green, blue, yellow. background: white, black, gray. The background never
  equals the shape's colour; with these lists the two sets are disjoint, and `sample_attributes` still
  enforces the rule so that extending a list cannot break it.
* position: left, right, center. Big shapes only, no texture.
* fill: solid, or hollow (a hole of the same shape at half size, in the background colour). The ring is a
  hollow disc, so it is always hollow and a circle never is; squares and triangles are hollow with
  probability `HOLLOW_PROB`, stars never (their arms are too thin for a hole at 32x32). Captions say
  "hollow" (never "solid"), so the unnamed ring is a composition of words the captions do use: round like a
  circle, hollow like a hollow square. Without hollow named shapes (`hollow_prob=0`) "hollow" would name
  the ring, so captions then never say it.

Images are drawn at 4x the output size with PIL and box-filtered down (about 0.5 ms per 32x32 image).
Captions follow one template, e.g. "a picture of a red hollow square on the left on a white background";
the colour, fill, position and background phrases are each dropped with probability `p_drop`, and the prefix
is one of "", "a picture of ", "a photo of " (so the edit prompts "a red *", "a * on the left" are in
distribution).

Randomness is always an argument (so every item can be reproduced): `render` is a pure function of its
attributes and of
the optional `rng` that draws the jitter, and item `i` of `ToyWorld` is a pure function of (seed, split, i).

Every ring is captioned with a coarse word, so the share of rings among "shape"/"object" captions is what
the initializer word already means, and gate G2 asks an inverted ring word to beat it by 0.3. With uniform
shapes and every named shape coarse 10% of the time that share would be 71%. The defaults: rings are 15% of
the images (`UNNAMED_PROB`; at 5% the model drew their holes faintly), squares, triangles and stars are
coarse half of the time (`P_COARSE`) and circles never (`ALWAYS_NAMED`), so rings are about 32% of the coarse
captions and a round coarse shape is always a ring. (The first two training stages of the bundled model had
no hollow named shapes and the first used u = 5%, p = 10% for every named shape; README, "The toy world and
its model", has what each mix measured.)

The vocabulary in ``assets/tokenizers/toy-world`` is generated from these lists:

    python -m ldm.data.toy_world --write-vocab
    python -m ldm.data.toy_world --write-concept data/ring --shape ring --n 5 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import string
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "ATTRIBUTE_VALUES",
    "Attributes",
    "ToyWorld",
    "UNNAMED_SHAPE",
    "caption",
    "render",
    "sample_attributes",
    "vocabulary",
    "write_concept_images",
    "write_vocab",
]

NAMED_SHAPES = ("circle", "square", "triangle", "star")
UNNAMED_SHAPE = "ring"  # never named in a caption; in the vocabulary as an untrained control word
SHAPES = (*NAMED_SHAPES, UNNAMED_SHAPE)
COARSE_WORDS = ("shape", "object")
FILLS = ("solid", "hollow")
#: The shapes that may be hollow or solid; the ring is always hollow, every other shape always solid.
HOLLOWABLE = ("square", "triangle")
HOLE_SCALE = 0.5  # the hole's size relative to the shape

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
#: x of the shape's centre as a fraction of the width (y is always the middle).
POSITIONS = {"left": 0.28, "right": 0.72, "center": 0.5}

#: The label order of every attribute: `Attributes.labels` and the scorer's heads index into these lists.
#: Treat as read-only.
ATTRIBUTE_VALUES: dict[str, list[str]] = {
    "shape": list(SHAPES),
    "color": list(COLORS),
    "background": list(BACKGROUNDS),
    "position": list(POSITIONS),
    "fill": list(FILLS),
}

#: Probability of the unnamed shape under the default world distribution (see the module docstring).
UNNAMED_PROB = 0.15
#: Probability that a named shape (but not one of ALWAYS_NAMED) is captioned with a coarse word.
P_COARSE = 0.5
#: Named shapes that are never captioned with a coarse word (see the module docstring).
ALWAYS_NAMED = ("circle",)
#: Probability that a square or triangle is hollow (see the module docstring).
HOLLOW_PROB = 0.5

PREFIXES = ("", "a picture of ", "a photo of ")
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "center": "in the center"}
BACKGROUND_TEMPLATE = "on {article} {background} background"

SUPERSAMPLING = 4
SHAPE_RADIUS = 0.2  # of the image size, before jitter; per-shape factors below keep the areas comparable
JITTER_SHIFT = 0.03  # of the image size (about 1 px at 32x32), in x and in y
JITTER_SCALE = 0.06  # relative size change, uniform in [1 - s, 1 + s]
JITTER_ANGLE = 10.0  # degrees, uniform in [-a, a]; a circle or ring looks the same at any angle

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: `*` and `@` first, as in assets/tokenizers/tiny-words: the usual placeholder strings.
PUNCTUATION = ("*", "@", *(c for c in string.punctuation if c not in "*@"))
TOKENIZER_CONFIG = {"do_lower_case": True, "model_max_length": 77, "tokenizer_class": "BertTokenizer"}
VOCAB_FOLDER = Path(__file__).resolve().parents[2] / "assets" / "tokenizers" / "toy-world"


@dataclass(frozen=True)
class Attributes:
    """One object in the world: its shape, its colour, the background colour, where it stands and its fill.

    `fill=None` means the shape's usual fill: hollow for the ring, solid for the others.
    """

    shape: str
    color: str
    background: str
    position: str
    fill: str | None = None

    def __post_init__(self):
        if self.fill is None:
            object.__setattr__(self, "fill", "hollow" if self.shape == UNNAMED_SHAPE else "solid")
        for name, value in self.as_dict().items():
            if value not in ATTRIBUTE_VALUES[name]:
                raise ValueError(f"unknown {name} {value!r}; expected one of {ATTRIBUTE_VALUES[name]}")
        if self.color == self.background:
            raise ValueError(f"the background must differ from the shape's colour (both {self.color!r})")
        if self.fill == "hollow" and self.shape not in (*HOLLOWABLE, UNNAMED_SHAPE):
            raise ValueError(f"a {self.shape} cannot be hollow; hollow shapes: {[*HOLLOWABLE, UNNAMED_SHAPE]}")
        if self.shape == UNNAMED_SHAPE and self.fill != "hollow":
            raise ValueError(f"the {UNNAMED_SHAPE} is always hollow")

    def as_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTE_VALUES}

    @property
    def labels(self) -> dict[str, int]:
        """Integer label of each attribute: its index in `ATTRIBUTE_VALUES[name]`."""
        return {name: ATTRIBUTE_VALUES[name].index(value) for name, value in self.as_dict().items()}

    @classmethod
    def from_labels(cls, labels: dict[str, int]) -> Attributes:
        return cls(**{name: ATTRIBUTE_VALUES[name][int(labels[name])] for name in ATTRIBUTE_VALUES})


# ---------------------------------------------------------------------------------------------------
# Sampling and rendering
# ---------------------------------------------------------------------------------------------------


def shape_probabilities(shapes: Sequence[str] | None = None, unnamed_prob: float | None = UNNAMED_PROB):
    """(shapes, probabilities): the unnamed shape, when listed, has `unnamed_prob`; the others share the rest.

    `unnamed_prob=None` makes the listed shapes equally likely (the scorer trains that way).
    """
    shapes = tuple(SHAPES if shapes is None else shapes)
    unknown = [s for s in shapes if s not in SHAPES]
    if not shapes or unknown:
        raise ValueError(f"shapes must be a non-empty subset of {list(SHAPES)}, got {list(shapes)}")
    named = [s for s in shapes if s != UNNAMED_SHAPE]
    if unnamed_prob is None or not named or len(named) == len(shapes):
        return shapes, np.full(len(shapes), 1.0 / len(shapes))
    if not 0.0 <= unnamed_prob <= 1.0:
        raise ValueError(f"unnamed_prob must be in [0, 1], got {unnamed_prob}")
    probs = [unnamed_prob if s == UNNAMED_SHAPE else (1.0 - unnamed_prob) / len(named) for s in shapes]
    return shapes, np.asarray(probs)


def sample_attributes(
    rng: np.random.Generator,
    shapes: Sequence[str] | None = None,
    unnamed_prob: float | None = UNNAMED_PROB,
    hollow_prob: float = HOLLOW_PROB,
) -> Attributes:
    """Draw one object: shape from `shape_probabilities`, colour, background (never the colour), position,
    and a square or triangle (`HOLLOWABLE`) is hollow with probability `hollow_prob`.

    Makes four draws from `rng` in that order, then the fill draw only when `hollow_prob > 0` (so a world
    without hollow named shapes draws exactly what it drew before fills existed).
    """
    if not 0.0 <= hollow_prob <= 1.0:
        raise ValueError(f"hollow_prob must be in [0, 1], got {hollow_prob}")
    names, probs = shape_probabilities(shapes, unnamed_prob)
    shape = names[rng.choice(len(names), p=probs)]
    color = ATTRIBUTE_VALUES["color"][rng.integers(len(COLORS))]
    allowed = [b for b in ATTRIBUTE_VALUES["background"] if b != color]
    background = allowed[rng.integers(len(allowed))]
    position = ATTRIBUTE_VALUES["position"][rng.integers(len(POSITIONS))]
    hollow = hollow_prob > 0 and rng.random() < hollow_prob and shape in HOLLOWABLE
    return Attributes(shape, color, background, position, "hollow" if hollow else None)


def render(attrs: Attributes, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """The image of `attrs`, uint8 [size, size, 3].

    Without `rng` the shape sits exactly at its canonical place, size and angle; with it, a shift, scale and
    rotation jitter are drawn from `rng` (always four draws). Same arguments, same bytes.
    """
    big = size * SUPERSAMPLING
    dx, dy, scale, angle = 0.0, 0.0, 1.0, 0.0
    if rng is not None:
        dx, dy = rng.uniform(-JITTER_SHIFT, JITTER_SHIFT, size=2) * big
        scale = 1.0 + rng.uniform(-JITTER_SCALE, JITTER_SCALE)
        angle = rng.uniform(-JITTER_ANGLE, JITTER_ANGLE)
    image = Image.new("RGB", (big, big), BACKGROUNDS[attrs.background])
    center = (POSITIONS[attrs.position] * big + dx, 0.5 * big + dy)
    draw, radius = ImageDraw.Draw(image), SHAPE_RADIUS * big * scale
    outline = "circle" if attrs.shape == UNNAMED_SHAPE else attrs.shape  # the ring is a hollow disc
    draw_shape(draw, outline, center, radius, angle, COLORS[attrs.color])
    if attrs.fill == "hollow":
        draw_shape(draw, outline, center, HOLE_SCALE * radius, angle, BACKGROUNDS[attrs.background])
    return np.asarray(image.resize((size, size), Image.Resampling.BOX))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, center, radius: float, angle: float, fill):
    """Draw one filled named shape of nominal `radius` (pixels) at `center`, rotated by `angle` degrees."""
    cx, cy = center
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        return
    if shape == "square":  # half-diagonal 0.9 * sqrt(2) r: about the circle's area
        points = _polygon(center, [0.9 * math.sqrt(2) * radius] * 4, -45.0 + angle)
    elif shape == "triangle":  # equilateral, pointing up, centroid at the centre
        points = _polygon(center, [1.25 * radius] * 3, -90.0 + angle)
    elif shape == "star":  # five points, pointing up
        points = _polygon(center, [1.25 * radius, 0.5 * radius] * 5, -90.0 + angle)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    draw.polygon(points, fill=fill)


def _polygon(center, radii: Sequence[float], start_degrees: float) -> list[tuple[float, float]]:
    """Vertices at the given radii, evenly spaced in angle from `start_degrees` (image y axis points down)."""
    cx, cy = center
    step = 360.0 / len(radii)
    return [(cx + r * math.cos(math.radians(start_degrees + k * step)),
             cy + r * math.sin(math.radians(start_degrees + k * step))) for k, r in enumerate(radii)]


# ---------------------------------------------------------------------------------------------------
# Captions and vocabulary
# ---------------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(attrs: Attributes, rng: np.random.Generator, p_drop: float = 0.25, p_coarse: float = P_COARSE,
            always_named: Sequence[str] = ALWAYS_NAMED, name_fill: bool = True) -> str:
    """A caption of `attrs`: "[a picture of ]a [red ][hollow ]square[ on the left][ on a white background]".

    Each bracketed attribute phrase is dropped with probability `p_drop`; "hollow" is said only for hollow
    objects and only with `name_fill`. A named shape is called "shape" or "object" with probability
    `p_coarse` unless it is one of `always_named`; the unnamed shape always is. Makes six draws from `rng`,
    and a seventh for a hollow object with `name_fill`.
    """
    prefix = PREFIXES[rng.integers(len(PREFIXES))]
    keep_color, keep_position, keep_background = rng.random(3) >= p_drop
    coarse = (rng.random() < p_coarse and attrs.shape not in always_named) or attrs.shape == UNNAMED_SHAPE
    coarse_word = COARSE_WORDS[rng.integers(len(COARSE_WORDS))]
    keep_fill = name_fill and attrs.fill == "hollow" and rng.random() >= p_drop
    noun_phrase = ([attrs.color] if keep_color else []) + (["hollow"] if keep_fill else [])
    noun_phrase.append(coarse_word if coarse else attrs.shape)
    parts = [prefix + _article(noun_phrase[0]), *noun_phrase]
    if keep_position:
        parts.append(POSITION_PHRASES[attrs.position])
    if keep_background:
        background = attrs.background
        parts.append(BACKGROUND_TEMPLATE.format(article=_article(background), background=background))
    return " ".join(parts)


def vocabulary() -> list[str]:
    """The toy-world token list: BERT specials, punctuation, then every word a caption, an attribute value or
    an edit prompt ("a * on the left", "a red *", "a * on a blue background") can use, in a fixed order."""
    phrases = [
        "a an", *PREFIXES, *NAMED_SHAPES, UNNAMED_SHAPE, *COARSE_WORDS, *COLORS,
        *POSITION_PHRASES.values(), BACKGROUND_TEMPLATE.format(article="a", background=""), *BACKGROUNDS,
        "hollow",  # last: added after stages 1 and 2 of the bundled model, whose token ids must not move
    ]
    words = list(SPECIAL_TOKENS) + list(PUNCTUATION)
    for phrase in phrases:
        words += [w for w in phrase.split() if w not in words]
    return words


def write_vocab(folder: str | Path = VOCAB_FOLDER) -> Path:
    """Write `vocab.txt` and `tokenizer_config.json` (a word-level BERT WordPiece tokenizer) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(w + "\n" for w in vocabulary()), encoding="utf-8")
    config = json.dumps(TOKENIZER_CONFIG, indent=1) + "\n"
    (folder / "tokenizer_config.json").write_text(config, encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------


def item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one dataset item: a pure function of (seed, split, index)."""
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])


class ToyWorld(Dataset):
    """`length` captioned toy-world images; item i is a pure function of (seed, split, i).

    Items are dicts: "image" float32 [size, size, 3] in [-1, 1], "caption" str, "labels" {attribute: int}
    (indices into `ATTRIBUTE_VALUES`). `shapes` restricts the shapes drawn (default: all, with the unnamed one
    at `unnamed_prob`; None makes the listed shapes equally likely); squares and triangles are hollow with
    probability `hollow_prob`. `jitter=False` renders every object at its canonical place, size and angle.
    """

    def __init__(
        self,
        size: int = 32,
        length: int = 100_000,
        seed: int = 0,
        split: str = "train",
        shapes: Sequence[str] | None = None,
        p_drop: float = 0.25,
        p_coarse: float = P_COARSE,
        unnamed_prob: float | None = UNNAMED_PROB,
        always_named: Sequence[str] = ALWAYS_NAMED,
        hollow_prob: float = HOLLOW_PROB,
        jitter: bool = True,
    ):
        if length < 1 or seed < 0 or size < 8:
            raise ValueError(f"need length >= 1, seed >= 0 and size >= 8; got {length}, {seed}, {size}")
        self.size, self.length, self.seed, self.split = size, length, seed, split
        self.shapes = None if shapes is None else list(shapes)
        sample_attributes(np.random.default_rng(0), self.shapes, unnamed_prob, hollow_prob)  # validates
        self.p_drop, self.p_coarse, self.unnamed_prob, self.jitter = p_drop, p_coarse, unnamed_prob, jitter
        self.always_named, self.hollow_prob = tuple(always_named), hollow_prob
        if not set(self.always_named) <= set(NAMED_SHAPES):
            raise ValueError(f"always_named must be named shapes {list(NAMED_SHAPES)}, got {list(always_named)}")

    def __len__(self) -> int:
        return self.length

    def attributes(self, index: int) -> tuple[Attributes, np.random.Generator]:
        """The item's attributes and its generator, positioned after the attribute draws."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ToyWorld of length {self.length}")
        rng = item_rng(self.seed, self.split, index)
        return sample_attributes(rng, self.shapes, self.unnamed_prob, self.hollow_prob), rng

    def __getitem__(self, index: int) -> dict:
        attrs, rng = self.attributes(index)
        pixels = render(attrs, self.size, rng if self.jitter else None)
        text = caption(attrs, rng, self.p_drop, self.p_coarse, self.always_named, self.hollow_prob > 0)
        image = (pixels.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
        return {"image": image, "caption": text, "labels": attrs.labels}


def balanced_nuisance(shape: str, n: int, rng: np.random.Generator, tries: int = 100) -> list[Attributes]:
    """`n` objects of one `shape` whose colour, background and position are each spread evenly (counts per
    value differ by at most one), in distinct combinations when possible, the background never the colour."""
    nuisance = ("color", "background", "position")
    best = None
    for _ in range(tries):
        columns = {}
        for name in nuisance:
            values = ATTRIBUTE_VALUES[name]
            order = rng.permutation(len(values))
            column = [values[order[k % len(values)]] for k in range(n)]
            columns[name] = [column[k] for k in rng.permutation(n)]
        rows = list(zip(*(columns[name] for name in nuisance), strict=True))
        if any(color == background for color, background, _ in rows):
            continue
        best = rows
        if len(set(rows)) == len(rows):
            break
    if best is None:
        raise ValueError(f"could not balance {n} images of {shape!r} with background != colour")
    return [Attributes(shape, color, background, position) for color, background, position in best]


def write_concept_images(
    folder: str | Path, shape: str, n: int = 5, seed: int = 0, balanced: bool = True, size: int = 32
) -> list[tuple[Path, Attributes]]:
    """Write `n` PNG images of one shape into `folder`, for inversion experiments; returns (path, attributes).

    `balanced=True` spreads colour, background and position evenly over the images: with unbalanced sets
    the pseudo-word learns the over-represented nuisance attribute (the notes' "red background" star).
    `balanced=False` draws them independently. File names list the attributes (`00_ring_red_white_left.png`).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    rng = np.random.default_rng([seed, zlib.crc32(b"concept"), SHAPES.index(shape)])
    if balanced:
        objects = balanced_nuisance(shape, n, rng)
    else:
        objects = [sample_attributes(rng, [shape]) for _ in range(n)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k, attrs in enumerate(objects):
        path = folder / f"{k:02d}_{attrs.shape}_{attrs.color}_{attrs.background}_{attrs.position}.png"
        Image.fromarray(render(attrs, size, rng)).save(path)
        written.append((path, attrs))
    return written


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Toy-world utilities: write the vocabulary or a concept folder.")
    p.add_argument("--write-vocab", nargs="?", const=str(VOCAB_FOLDER), default=None, metavar="FOLDER",
                   help=f"write vocab.txt + tokenizer_config.json (default folder {VOCAB_FOLDER})")
    p.add_argument("--write-concept", default=None, metavar="FOLDER", help="write concept images here")
    p.add_argument("--shape", default=UNNAMED_SHAPE, choices=SHAPES)
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unbalanced", action="store_true", help="draw nuisance attributes independently")
    opt = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if opt.write_vocab is None and opt.write_concept is None:
        p.error("nothing to do: give --write-vocab and/or --write-concept FOLDER")
    if opt.write_vocab is not None:
        folder = write_vocab(opt.write_vocab)
        logger.info("wrote %s (%d tokens)", folder, len(vocabulary()))
    if opt.write_concept is not None:
        balanced = not opt.unbalanced
        for path, _ in write_concept_images(opt.write_concept, opt.shape, opt.n, opt.seed, balanced):
            logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
