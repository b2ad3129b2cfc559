"""Runner for the paper's comparison of setups (reconstruction vs editability, Figure 7(a)).

A spec (YAML or JSON, see docs/EVALUATION.md) names the base model, the concepts (image folder and
initializer word each), the prompts and the setups. For every (setup, concept) the runner trains an
embedding with `ldm.training.train` (what `main.py` runs, plus the setup's options and overrides), then samples every
prompt with the embedding and measures the CLIP metrics of `evaluation.clip_eval`:

* image similarity (reconstruction): samples of the reconstruction prompt ("A photo of *") against the
  training images;
* text similarity (editability): samples of the other prompts against the prompt without `*`.

Two references need no training: "image_only" (the training images themselves, scored against the
training set including themselves, as `img_to_img_similarity(train, train)` would, and against the
editing prompts) and "prompt_only" (samples of each prompt with `*` replaced by the concept's coarse
initializer word).

Outputs in `out_dir`: `results.csv`/`results.json` (one row per setup: mean and 95% confidence interval
of both metrics; the unit is one generated image, the interval Student-t), `per_prompt.csv`,
`tradeoff.png` (the scatter plot with error bars), sample grids, and the trained embeddings under
`embeddings/<setup>/<concept>.pt` (reused when the runner is started again).

Every (concept, prompt) uses the same seed in every setup (common random numbers), so setups differ by
their embedding only.

The spec's types and parsing (`Setup`, `Concept`, `RunnerSpec`, `CATALOGUE`, `REFERENCES`, `parse_setup`,
`load_spec`) live in `evaluation.spec` and are re-exported here; the tables and files are written by
`evaluation.results`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from evaluation.clip_eval import (
    LDMCLIPEvaluator,
    image_similarity_per_sample,
    load_training_images,
    remove_placeholder,
    text_similarity_per_sample,
)
from evaluation.results import Pool, write_results
from evaluation.spec import (  # noqa: F401  (re-exported: the spec's names were defined here before)
    CATALOGUE,
    REFERENCES,
    Concept,
    RunnerSpec,
    Setup,
    load_spec,
    merge_options,
    parse_setup,
)
from ldm.loading import load_model
from ldm.training import train

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def setup_overrides(config_path: str, setup: Setup, concept: Concept) -> list[str]:
    """The setup's overrides for `concept`, checked against the config: every key's parent must exist."""
    config = OmegaConf.load(config_path)
    chosen = []
    for optional, items in ((False, setup.overrides), (True, setup.optional_overrides)):
        for item in items:
            item = item.replace("{captions}", str(concept.captions))
            key = item.split("=", 1)[0]
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            if parent and OmegaConf.select(config, parent) is None:
                if optional:
                    continue
                raise ValueError(f"setup {setup.name!r}: {config_path} has no '{parent}' (override '{item}')")
            chosen.append(item)
    return chosen


def train_options(spec: RunnerSpec, setup: Setup, concept: Concept, logdir: Path) -> dict:
    """The options of `ldm.training.train` that train `setup` on `concept` (JSON-serialisable): the runner's
    own, then the spec's `train_options`, then the setup's `options`; the overrides in the same order."""
    own = {
        "base": [spec.config],
        "actual_resume": spec.ckpt,
        "name": f"{setup.name}_{concept.name}",
        "data_root": concept.data_root,
        "logdir": str(logdir),
        "init_word": concept.init_word,
        "seed": spec.seed,
        "trainer": {"max_steps": spec.max_steps},
        "no_test": True,
    }
    if spec.tokenizer_path:
        own["tokenizer_path"] = spec.tokenizer_path
    options = merge_options(own, spec.train_options, setup.options)
    options["overrides"] = list(spec.train_overrides) + setup_overrides(spec.config, setup, concept)
    return options


def train_embedding(spec: RunnerSpec, setup: Setup, concept: Concept) -> Path:
    """Path of the setup's embedding for `concept`: given, already trained, or trained now.

    A trained file is reused only if `<concept>.json` beside it records the same training options.
    """
    if concept.name in setup.embeddings:
        return Path(setup.embeddings[concept.name])
    target = Path(spec.out_dir) / "embeddings" / setup.name / f"{concept.name}.pt"
    manifest = target.with_suffix(".json")
    logdir = Path(spec.out_dir) / "runs" / setup.name / concept.name
    options = train_options(spec, setup, concept, logdir)
    if target.is_file():
        recorded = json.loads(manifest.read_text()).get("options") if manifest.is_file() else None
        if recorded != options:
            raise ValueError(
                f"{target} was trained with other settings than {options}; delete it or use another out_dir"
            )
        logger.info("reusing %s", target)
        return target
    base = options.pop("base")
    result = train(base, **options)
    options["base"] = base
    if result.embeddings is None:
        raise RuntimeError(f"training {setup.name} on {concept.name} wrote no embeddings.pt in {result.logdir}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(result.embeddings, target)
    manifest.write_text(json.dumps({"options": options, "run_dir": str(result.logdir)}, indent=1))
    return target


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


class Scorer:
    """Samples and scores prompts for one run, collecting the per-prompt rows and the per-setup pools."""

    def __init__(self, spec: RunnerSpec, model, evaluator: LDMCLIPEvaluator, progress: bool = True):
        self.spec, self.model, self.evaluator, self.progress = spec, model, evaluator, progress
        self.rows: list[dict] = []
        self.pools: dict[str, Pool] = {}

    def generator(self, concept_index: int, prompt_index: int) -> torch.Generator:
        seed = self.spec.seed + 1000 * concept_index + prompt_index
        return torch.Generator(device=self.model.device).manual_seed(seed)

    def add(self, name: str, concept: Concept, prompt: str, sampled: str, seed, image_values, text_values):
        role = "reconstruction" if self.spec.is_reconstruction(prompt) else "editing"
        pool = self.pools.setdefault(name, Pool())
        if role == "reconstruction":
            pool.image += list(image_values)
        if prompt in self.spec.editing_prompts:
            pool.text += list(text_values)
        self.rows.append(
            {
                "setup": name,
                "concept": concept.name,
                "prompt": prompt,
                "sampled_prompt": sampled,
                "scored_text": remove_placeholder(prompt),
                "role": role,
                "n": len(image_values),
                "image_similarity": float(np.mean(image_values)),
                "text_similarity": float(np.mean(text_values)),
                "seed": seed,
            }
        )

    def score_samples(
        self, name: str, ci: int, concept: Concept, train_features: torch.Tensor, replace_with=None
    ):
        """Sample every prompt (with `*` replaced by `replace_with` if given) and score it."""
        for pi, prompt in enumerate(self.spec.all_prompts):
            sampled = prompt.replace("*", replace_with) if replace_with else prompt
            g = self.generator(ci, pi)
            seed = g.initial_seed()
            samples = self.evaluator.generate(
                self.model,
                sampled,
                self.spec.n_samples,
                self.spec.ddim_steps,
                self.spec.scale,
                self.spec.batch_size,
                generator=g,
                progress=self.progress,
            )
            sims = self.evaluator.similarities(samples, None, prompt, src_features=train_features)
            self.add(name, concept, prompt, sampled, seed, sims.image_per_sample, sims.text_per_sample)
            if self.spec.save_grids:
                save_grid(
                    samples,
                    Path(self.spec.out_dir) / "samples" / name / concept.name / f"{pi:02}.png",
                    {"prompt": sampled, "seed": seed, "setup": name, "concept": concept.name},
                )

    def score_image_only(self, concept: Concept, train_features: torch.Tensor):
        """The training images as the 'generated' set (reference point of the plot)."""
        image_values = image_similarity_per_sample(train_features, train_features).tolist()
        for prompt in self.spec.all_prompts:
            text = self.evaluator.get_text_features(remove_placeholder(prompt))
            text_values = text_similarity_per_sample(text, train_features).tolist()
            self.add("image_only", concept, prompt, "", None, image_values, text_values)


def save_grid(samples: torch.Tensor, path: Path, info: dict) -> None:
    from ldm.image_grid import make_grid, save_image, to_uint8

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(
        to_uint8(make_grid((samples + 1.0) / 2.0, nrow=8)), path, text={k: str(v) for k, v in info.items()}
    )


def evaluate_setups(
    spec: RunnerSpec, embeddings: dict[tuple[str, str], Path], progress: bool = True
) -> Scorer:
    """Sample and score every setup, concept and prompt, and the references."""
    device = torch.device(spec.device or "cpu")
    model = load_model(spec.eval_config or spec.config, spec.ckpt, overrides=list(spec.eval_overrides),
                       tokenizer_path=spec.tokenizer_path, device=device, attention="sdpa")
    evaluator = LDMCLIPEvaluator(
        device, spec.clip_model, tokenizer=spec.clip_tokenizer, preprocess=spec.preprocess
    )
    if spec.setups and getattr(model, "embedding_manager", None) is None:
        raise ValueError(
            f"{spec.eval_config or spec.config} has no personalization_config: it cannot load embeddings"
        )
    scorer = Scorer(spec, model, evaluator, progress)
    jobs = [(ci, c, s) for ci, c in enumerate(spec.concepts) for s in [*spec.setups, *spec.references]]
    features = {}
    for ci, concept, setup in tqdm(jobs, desc="Evaluating", disable=not progress):
        if concept.name not in features:
            features[concept.name] = evaluator.get_image_features(
                load_training_images(concept.data_root, spec.image_size)
            )
        train_features = features[concept.name]
        if setup == "image_only":
            scorer.score_image_only(concept, train_features)
        elif setup == "prompt_only":
            scorer.score_samples("prompt_only", ci, concept, train_features, replace_with=concept.init_word)
        else:
            model.embedding_manager.load(embeddings[(setup.name, concept.name)])
            scorer.score_samples(setup.name, ci, concept, train_features)
    return scorer


def run(spec: RunnerSpec, progress: bool = True, train: bool = True) -> list[dict]:
    """Train (unless `train` is False: then every embedding must exist), evaluate, write the outputs."""
    embeddings = {}
    for setup in spec.setups:
        for concept in spec.concepts:
            if train:
                embeddings[(setup.name, concept.name)] = train_embedding(spec, setup, concept)
            else:
                path = Path(
                    setup.embeddings.get(concept.name)
                    or Path(spec.out_dir) / "embeddings" / setup.name / f"{concept.name}.pt"
                )
                if not path.is_file():
                    raise FileNotFoundError(f"no embedding for {setup.name}/{concept.name}: {path}")
                embeddings[(setup.name, concept.name)] = path
    scorer = evaluate_setups(spec, embeddings, progress)
    return write_results(spec, scorer.pools, scorer.rows, scorer.evaluator.model_name)
