"""CLIP ranking of candidate images (the paper's section 4 curation: generate several, keep the best).

Scores are raw cosine similarities (see `evaluation.clip_eval`):

* `criterion="text"`: cosine between each candidate and the prompt with the placeholder removed;
* `criterion="image"`: each candidate's mean cosine to reference images (e.g. the training set).

`save_ranking` writes every candidate and the best ones as PNG files whose text metadata carries the
prompt, the score, the rank and the criterion, plus a `ranking.json` with all of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from evaluation.clip_eval import (
    METRIC_NOTE,
    image_similarity_per_sample,
    remove_placeholder,
    text_similarity_per_sample,
)

CRITERIA = ("text", "image")


@dataclass
class Ranking:
    criterion: str
    scores: list[float]  # per candidate, in generation order
    order: list[int]  # candidate indices, best first
    text: str | None = None  # the prompt scored against (criterion "text")
    metric: str = METRIC_NOTE
    info: dict = field(default_factory=dict)

    def rank_of(self, index: int) -> int:
        return self.order.index(index)


def rank_candidates(
    evaluator,
    candidates,
    criterion: str = "text",
    prompt: str | None = None,
    reference_images=None,
    placeholder: str = "*",
) -> Ranking:
    """Score `candidates` (tensor [K, 3, H, W] in [-1, 1] or PIL images) with a `CLIPEvaluator`."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is not supported; choose one of {list(CRITERIA)}")
    features = evaluator.get_image_features(candidates)
    text = None
    if criterion == "text":
        if prompt is None:
            raise ValueError("criterion 'text' needs the prompt")
        text = remove_placeholder(prompt, placeholder)
        scores = text_similarity_per_sample(evaluator.get_text_features(text), features)
    else:
        if reference_images is None:
            raise ValueError("criterion 'image' needs reference images")
        scores = image_similarity_per_sample(evaluator.get_image_features(reference_images), features)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    return Ranking(criterion, scores.tolist(), order, text)


def save_ranking(
    candidates: torch.Tensor,
    ranking: Ranking,
    out_dir: str | os.PathLike,
    keep: int = 1,
    info: Mapping[str, object] | None = None,
) -> list[Path]:
    """Write `candidates/<index>.png` for all, `best/rank<r>_<index>.png` for the `keep` best, and
    `ranking.json`; returns the paths of the best images."""
    from ldm.image_grid import save_image, to_uint8

    out = Path(out_dir)
    (out / "candidates").mkdir(parents=True, exist_ok=True)
    (out / "best").mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in (info or {}).items()}
    images01 = (candidates.detach().float().cpu() + 1.0) / 2.0
    best = []
    for index, image in enumerate(images01):
        rank = ranking.rank_of(index)
        text = {
            **meta,
            "criterion": ranking.criterion,
            "score": f"{ranking.scores[index]:.6f}",
            "rank": rank,
            "index": index,
            "metric": ranking.metric,
        }
        if ranking.text is not None:
            text["scored_text"] = ranking.text
        array = to_uint8(image)
        save_image(array, out / "candidates" / f"{index:05}.png", text=text)
        if rank < keep:
            path = out / "best" / f"rank{rank}_{index:05}.png"
            save_image(array, path, text=text)
            best.append((rank, path))
    record = {**asdict(ranking), "info": dict(meta), "keep": keep, "best": [str(p) for _, p in sorted(best)]}
    (out / "ranking.json").write_text(json.dumps(record, indent=1))
    return [p for _, p in sorted(best)]
