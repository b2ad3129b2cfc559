"""The honest gates of the bundled toy model (results in README.md, "The toy world and its model"),
measured with the attribute scorer.

- AE: the autoencoder keeps every attribute: scorer accuracy on reconstructions >= 0.95.
- G1 base model: fully specified prompts are followed: per-attribute adherence >= 0.7 (fill included).
- G2 fidelity of an inverted word: concept rate of "a photo of a *" >= max(0.5, true-word rate - 0.2) and
  >= initializer-word rate + 0.3.
- G3 editability: for edit prompts the edited attribute's accuracy >= 0.8 x the true word's, and the joint
  (concept and edit) accuracy >= 0.5.
Every number comes with its controls (true word, initializer word, random embedding), >= 2 seeds and
>= 32 samples per prompt in the full run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from ldm.data.toy_world import (
    ATTRIBUTE_VALUES,
    BACKGROUNDS,
    COLORS,
    HOLLOWABLE,
    POSITIONS,
    SHAPES,
    UNNAMED_SHAPE,
    Attributes,
    render,
    sample_attributes,
)
from ldm.models.diffusion.ddim import DDIMSampler

AE_MIN = 0.95
G1_MIN = 0.7
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "center": "in the center"}


@dataclass(frozen=True)
class Edit:
    """An edit prompt template ("{}" = the word) and the attribute value it asks for."""

    template: str
    attribute: str
    value: str


EDITS = (Edit("a {} on the left", "position", "left"), Edit("a red {}", "color", "red"),
         Edit("a {} on a black background", "background", "black"))
FIDELITY = "a photo of a {}"


def full_prompt(a: Attributes) -> str:
    fill = "hollow " if a.fill == "hollow" else ""
    return f"a {a.color} {fill}{a.shape} {POSITION_PHRASE[a.position]} on a {a.background} background"


def g1_cases(limit: int | None = None) -> list[Attributes]:
    """Fully specified attribute combinations over the named shapes, solid and (where a shape can be) hollow;
    the background never the object colour."""
    named = [s for s in SHAPES if s != UNNAMED_SHAPE]
    fills = {s: ("solid", "hollow") if s in HOLLOWABLE else ("solid",) for s in named}
    cases = [Attributes(s, c, b, p, f) for s, c, b, p in itertools.product(named, COLORS, BACKGROUNDS, POSITIONS)
             for f in fills[s] if b != c]
    if limit is not None:
        rng = np.random.default_rng(0)
        cases = [cases[i] for i in sorted(rng.choice(len(cases), size=min(limit, len(cases)), replace=False))]
    return cases


@torch.no_grad()
def sample(model, prompts: list[str], seed: int, steps: int = 50, scale: float = 5.0) -> torch.Tensor:
    """One sample per prompt (batched), images [B, 3, H, W] in [-1, 1]; randomness from `seed` only."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    c = model.get_learned_conditioning(prompts)
    uc = model.get_learned_conditioning(len(prompts) * [""])
    shape = (model.channels, model.image_size, model.image_size)
    z, _ = DDIMSampler(model).sample(steps, len(prompts), shape, c, eta=0.0, verbose=False, generator=g,
                                     unconditional_guidance_scale=scale, unconditional_conditioning=uc)
    return model.decode_first_stage(z).clamp(-1, 1)


def accuracy(scores: dict, expected: dict[str, list[str]]) -> dict[str, float]:
    """Per attribute: fraction of images whose scored value equals the expected one."""
    return {k: float(np.mean([v == e for v, e in zip(scores[k]["value"], want, strict=True)]))
            for k, want in expected.items()}


@torch.no_grad()
def autoencoder_gate(first_stage, scorer, n: int = 256, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng, unnamed_prob=None) for _ in range(n)]
    x = torch.from_numpy(np.stack([render(a, 32, rng) for a in attrs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec = first_stage.decode(first_stage.encode(x).mode()).clamp(-1, 1)
    scores = scorer.score(rec)
    return accuracy(scores, {k: [a.as_dict()[k] for a in attrs] for k in ATTRIBUTE_VALUES})


def g1_adherence(model, scorer, cases: list[Attributes], seeds: list[int], samples_per_prompt: int) -> dict:
    """Per-attribute adherence of fully specified prompts, pooled over cases, seeds and samples."""
    hits: dict[str, list[bool]] = {k: [] for k in ATTRIBUTE_VALUES}
    for seed in seeds:
        for rep in range(samples_per_prompt):
            images = sample(model, [full_prompt(a) for a in cases], seed=seed * 100003 + rep)
            scores = scorer.score(images)
            for k in hits:
                hits[k] += [v == a.as_dict()[k] for v, a in zip(scores[k]["value"], cases, strict=True)]
    acc = {k: float(np.mean(v)) for k, v in hits.items()}
    return {"accuracy": acc, "pass": all(v >= G1_MIN for v in acc.values()), "threshold": G1_MIN}


def concept_rates(model, scorer, word: str, shape: str, seeds: list[int], n: int) -> dict:
    """For one conditioning word: concept rate of the fidelity prompt, and per edit the edited attribute's
    accuracy and the joint (concept and edit) accuracy. `word` is the prompt token ('*' or a real word)."""
    out = {}
    prompts = [FIDELITY.format(word)] + [e.template.format(word) for e in EDITS]
    for p_i, prompt in enumerate(prompts):
        concept, edited, joint = [], [], []
        for seed in seeds:
            scores = scorer.score(sample(model, n * [prompt], seed=seed * 1009 + p_i))
            is_concept = [v == shape for v in scores["shape"]["value"]]
            concept += is_concept
            if p_i > 0:
                e = EDITS[p_i - 1]
                ok = [v == e.value for v in scores[e.attribute]["value"]]
                edited += ok
                joint += [a and b for a, b in zip(is_concept, ok, strict=True)]
        out[prompt] = {"concept": float(np.mean(concept))}
        if edited:
            out[prompt].update(edit=float(np.mean(edited)), joint=float(np.mean(joint)))
    return out


def judge(pseudo: dict, true: dict, init: dict) -> dict:
    """G2 and G3 verdicts from the rates of the pseudo-word, the true word and the initializer word."""
    fid = FIDELITY.format
    p, t, i = pseudo[fid("*")]["concept"], _first(true)["concept"], _first(init)["concept"]
    g2_bound = max(0.5, t - 0.2, i + 0.3)
    g3 = {}
    for e, (pk, tk) in zip(EDITS, zip(list(pseudo)[1:], list(true)[1:], strict=True), strict=True):
        edit_ok = pseudo[pk]["edit"] >= 0.8 * true[tk]["edit"]
        g3[e.template] = {"edit": pseudo[pk]["edit"], "true_edit": true[tk]["edit"], "joint": pseudo[pk]["joint"],
                          "pass": bool(edit_ok and pseudo[pk]["joint"] >= 0.5)}
    return {"G2": {"pseudo": p, "true": t, "init": i, "bound": g2_bound, "pass": bool(p >= g2_bound)},
            "G3": {"edits": g3, "pass": all(v["pass"] for v in g3.values())}}


def _first(rates: dict) -> dict:
    return next(iter(rates.values()))
