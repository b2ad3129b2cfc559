"""Tables and the plot of the time-to-quality benchmark (`scripts/time_to_quality.py`).

Definitions (the README's "Time to a good embedding"):
- a run's **plateau** (per rate) is the mean of its snapshot rates over the last third of its steps;
- the **target** is the baseline recipe's plateau (mean over its seeds, per concept) minus 0.05;
- a run's **time to target** is the first snapshot from which its rate stays at or above the target until
  the end (a run that gets there and falls back is not there); None if it never does.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from evaluation.plot import PALETTE, _axis_range, _font, _ticks

RATES = ("concept_rate", "joint_rate")
TARGET_MARGIN = 0.05
STOP_MARGIN = 0.05  # a rate at the early stop this close to the full run's plateau counts as reached


def bootstrap_ci(values, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (fixed seed: the same values give the same
    interval)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))


def plateau(steps: list[int], rates: list[float], total_steps: int) -> float:
    """Mean rate of the snapshots in the last third of the run's steps."""
    tail = [r for s, r in zip(steps, rates, strict=True) if s >= total_steps * 2 / 3]
    return float(np.mean(tail)) if tail else math.nan


def time_to_target(steps: list[int], rates: list[float], target: float) -> int | None:
    """The first step from which every later rate is >= target (None if the last one is below)."""
    first = None
    for step, rate in zip(steps, rates, strict=True):
        if rate >= target:
            first = step if first is None else first
        else:
            first = None
    return first


def neighbour_change(rates: list[float]) -> float:
    """Mean absolute change between consecutive snapshots."""
    return float(np.mean(np.abs(np.diff(rates)))) if len(rates) > 1 else 0.0


def summarize(rows: list[dict], stops: dict, total_steps: int, baseline: str = "baseline") -> dict:
    """Per run: plateau, time to target (steps and seconds), swing; per recipe and concept: means over seeds
    and ratios to the baseline; the early-stopping rule scored against the full run's plateau.

    `stops` maps (recipe, concept, seed) to the run stopped by the rule: `stopped_at` and the scores of the
    embedding it kept (each rate and its `<rate>_ci`). A rate at the stop is "near" the plateau when it is
    within STOP_MARGIN of it or its 95% interval holds the plateau."""
    runs = defaultdict(list)
    for row in rows:
        runs[(row["recipe"], row["concept"], row["seed"])].append(row)
    runs = {k: sorted(v, key=lambda r: r["step"]) for k, v in runs.items()}
    targets = {}
    for concept in sorted({k[1] for k in runs}):
        base = [v for (r, c, _), v in runs.items() if r == baseline and c == concept]
        for rate in RATES:
            plateaus = [plateau([x["step"] for x in v], [x[rate] for x in v], total_steps) for v in base]
            targets[(concept, rate)] = float(np.mean(plateaus)) - TARGET_MARGIN if plateaus else math.nan
    per_run = []
    for (recipe, concept, seed), v in runs.items():
        steps = [x["step"] for x in v]
        seconds = {x["step"]: x["seconds"] for x in v}
        entry = {"recipe": recipe, "concept": concept, "seed": seed, "final_step": steps[-1]}
        for rate in RATES:
            values = [x[rate] for x in v]
            target = targets[(concept, rate)]
            hit = time_to_target(steps, values, target)
            after = [x for s, x in zip(steps, values, strict=True) if hit is not None and s >= hit]
            entry[rate] = {"plateau": plateau(steps, values, total_steps), "final": values[-1], "target": target,
                           "steps_to_target": hit, "seconds_to_target": seconds.get(hit) if hit is not None else None,
                           "neighbour_change": neighbour_change(values),
                           "spread_after_target": (max(after) - min(after)) if after else None}
        stop = stops.get((recipe, concept, seed))
        if stop is not None:
            entry["early_stopping"] = {"stopped_at": stop["stopped_at"], "stopped": stop.get("stopped", True),
                                       "fraction": stop["stopped_at"] / total_steps}
            for rate in RATES:
                value, (low, high), level = stop[rate], stop[f"{rate}_ci"], entry[rate]["plateau"]
                entry["early_stopping"].update({
                    f"{rate}_at_stop": value, f"{rate}_at_stop_ci": [low, high],
                    f"{rate}_near_plateau": bool(abs(value - level) <= STOP_MARGIN or low <= level <= high)})
        per_run.append(entry)
    table = []
    for recipe, concept in sorted({(e["recipe"], e["concept"]) for e in per_run}):
        group = [e for e in per_run if e["recipe"] == recipe and e["concept"] == concept]
        line = {"recipe": recipe, "concept": concept, "seeds": len(group)}
        for rate in RATES:
            hits = [e[rate]["steps_to_target"] for e in group]
            secs = [e[rate]["seconds_to_target"] for e in group]
            reached = all(h is not None for h in hits)
            line[rate] = {"target": targets[(concept, rate)],
                          "plateau": float(np.mean([e[rate]["plateau"] for e in group])),
                          "final": float(np.mean([e[rate]["final"] for e in group])),
                          "steps_to_target": float(np.mean(hits)) if reached else None,
                          "seconds_to_target": float(np.mean(secs)) if reached else None,
                          "runs_at_target": sum(h is not None for h in hits),
                          "neighbour_change": float(np.mean([e[rate]["neighbour_change"] for e in group]))}
        table.append(line)
    for line in table:
        base = next((b for b in table if b["recipe"] == baseline and b["concept"] == line["concept"]), None)
        for rate in RATES:
            mine, ref = line[rate], base[rate] if base else None
            for key in ("steps_to_target", "seconds_to_target"):
                ok = ref is not None and mine[key] is not None and ref[key]
                mine[f"{key}_ratio"] = mine[key] / ref[key] if ok else None
            mine["plateau_minus_baseline"] = mine["plateau"] - ref["plateau"] if ref else None
    return {"targets": {f"{c}/{r}": t for (c, r), t in targets.items()}, "table": table, "runs": per_run}


def draw_curves(rows: list[dict], path: str | Path) -> None:
    """One panel per (concept, rate): mean rate over seeds against mean training seconds, one line per recipe,
    a band from the lowest to the highest seed."""
    panels = sorted({(r["concept"], rate) for r in rows for rate in RATES})
    recipes = sorted({r["recipe"] for r in rows})
    pw, ph, left, top, bottom = 460, 300, 60, 40, 45
    img = Image.new("RGB", (pw * 2, ph * math.ceil(len(panels) / 2) + 30), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(12)
    for i, (concept, rate) in enumerate(panels):
        ox, oy = (i % 2) * pw, (i // 2) * ph + 30
        sel = [r for r in rows if r["concept"] == concept]
        x0, x1 = _axis_range([r["seconds"] for r in sel])
        y0, y1 = 0.0, 1.0

        def px(x, ox=ox, x0=x0, x1=x1):
            return ox + left + (x - x0) / (x1 - x0) * (pw - left - 20)

        def py(y, oy=oy):
            return oy + ph - bottom - (y - y0) / (y1 - y0) * (ph - top - bottom)

        ticks, dec = _ticks(x0, x1)
        for x in ticks:
            draw.text((px(x), oy + ph - bottom + 4), f"{x:.{dec}f}", fill="black", font=small, anchor="mt")
        for y in (0.0, 0.25, 0.5, 0.75, 1.0):
            draw.line([(ox + left, py(y)), (ox + pw - 20, py(y))], fill=(228, 228, 228))
            draw.text((ox + left - 4, py(y)), f"{y:.2f}", fill="black", font=small, anchor="rm")
        draw.rectangle([ox + left, oy + top, ox + pw - 20, oy + ph - bottom], outline="black")
        draw.text((ox + pw / 2, oy + 14), f"{concept}: {rate} rate vs training seconds", fill="black", font=font,
                  anchor="mt")
        lines = []
        for j, recipe in enumerate(recipes):
            color = PALETTE[j % len(PALETTE)]
            by_step = defaultdict(list)
            for r in sel:
                if r["recipe"] == recipe:
                    by_step[r["step"]].append(r)
            if not by_step:
                continue
            steps = sorted(by_step)
            xs = [float(np.mean([r["seconds"] for r in by_step[s]])) for s in steps]
            lo = [min(r[rate] for r in by_step[s]) for s in steps]
            hi = [max(r[rate] for r in by_step[s]) for s in steps]
            mean = [float(np.mean([r[rate] for r in by_step[s]])) for s in steps]
            band = [(px(x), py(v)) for x, v in zip(xs, hi, strict=True)] + \
                   [(px(x), py(v)) for x, v in reversed(list(zip(xs, lo, strict=True)))]
            if len(band) > 2:
                draw.polygon(band, fill=tuple(int(c + (255 - c) * 0.75) for c in color))
            lines.append((color, [(px(x), py(v)) for x, v in zip(xs, mean, strict=True)]))
            draw.text((ox + pw - 30, oy + top + 8 + 16 * j), recipe, fill=color, font=small, anchor="rt")
        for color, points in lines:  # over every band
            draw.line(points, fill=color, width=2)
    draw.text((img.width / 2, 8), "Time to a good embedding (toy model; mean over seeds, band = min..max)",
              fill="black", font=font, anchor="mt")
    from ldm.image_grid import save_image

    save_image(np.asarray(img), path, text={"panels": json.dumps([f"{c}/{r}" for c, r in panels])})
