"""Tables and files of the setups runner: one row per setup (mean and 95% interval of both metrics),
`results.csv`/`results.json`, `per_prompt.csv` and the Figure 7(a) plot (drawn by `evaluation.plot`)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evaluation.clip_eval import METRIC_NOTE
from evaluation.coverage import mean_confidence_interval
from evaluation.plot import draw_tradeoff_plot
from evaluation.spec import REFERENCES, RunnerSpec


@dataclass
class Pool:
    """Per-image values behind one table row."""

    image: list[float] = field(default_factory=list)
    text: list[float] = field(default_factory=list)


TABLE_COLUMNS = [
    "setup",
    "label",
    "kind",
    "image_similarity",
    "image_ci_low",
    "image_ci_high",
    "image_n",
    "text_similarity",
    "text_ci_low",
    "text_ci_high",
    "text_n",
]


def summarize(spec: RunnerSpec, pools: dict[str, Pool]) -> list[dict]:
    """One row per setup and reference (in spec order): means and 95% intervals."""
    labels = {s.name: (s.label or s.name, "setup") for s in spec.setups}
    labels.update({r: (REFERENCES[r], "reference") for r in spec.references})
    table = []
    for name, (label, kind) in labels.items():
        pool = pools.get(name, Pool())
        image = mean_confidence_interval(pool.image)
        text = mean_confidence_interval(pool.text)
        table.append(
            dict(
                zip(
                    TABLE_COLUMNS,
                    [name, label, kind, *image, len(pool.image), *text, len(pool.text)],
                    strict=True,
                )
            )
        )
    return table


def write_csv(rows: list[dict], path: Path, columns: list[str] | None = None) -> None:
    columns = columns or list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_results(spec: RunnerSpec, pools: dict[str, Pool], rows: list[dict], clip_name: str) -> list[dict]:
    """results.csv/json, per_prompt.csv and tradeoff.png in `spec.out_dir`; returns the table.

    `pools`: per-image values of each setup and reference; `rows`: the per-prompt rows (per_prompt.csv);
    `clip_name`: the CLIP model that scored them (recorded, and named in the plot's title).
    """
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(spec, pools)
    write_csv(table, out / "results.csv", TABLE_COLUMNS)
    write_csv(rows, out / "per_prompt.csv")
    record = {
        "metric": METRIC_NOTE,
        "interval": "95% Student-t interval of the mean; unit = one image (image similarity: samples of the "
        "reconstruction prompt; text similarity: samples of the editing prompts)",
        "clip_model": clip_name,
        "preprocess": spec.preprocess,
        "n_samples": spec.n_samples,
        "ddim_steps": spec.ddim_steps,
        "scale": spec.scale,
        "eta": 0.0,
        "seed": spec.seed,
        "reconstruction_prompt": spec.reconstruction_prompt,
        "editing_prompts": spec.editing_prompts,
        "table": table,
        "per_prompt": rows,
        "spec": asdict(spec),
    }
    (out / "results.json").write_text(json.dumps(record, indent=1))
    shown = Path(clip_name).name if Path(clip_name).is_dir() else clip_name  # no local paths in the figure
    title = f"Reconstruction vs editability (CLIP {shown}, raw cosine, 95% CI)"
    draw_tradeoff_plot(table, out / "tradeoff.png", title)
    return table
