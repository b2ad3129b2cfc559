"""Runner for the paper's comparison of setups (reconstruction vs editability, Figure 7(a)).

A spec (YAML or JSON, see docs/EVALUATION.md) names the base model, the concepts (image folder and
initializer word each), the prompts and the setups. For every (setup, concept) the runner trains an
embedding with `main.py` (the official command line plus the setup's overrides), then samples every
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
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, fields
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
from evaluation.results import REFERENCES, Pool, write_results

logger = logging.getLogger(__name__)

_PM = "model.params.personalization_config.params"


@dataclass
class Setup:
    """One training recipe: main.py flags and `key.path=value` overrides on top of the base config.

    `optional_overrides` apply only where the config has the parent node (e.g. a validation split).
    `{captions}` in an override is replaced by the concept's captions file. `embeddings` maps concept
    names to existing embedding files, which are then used instead of training.
    """

    name: str
    label: str = ""
    args: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    optional_overrides: list[str] = field(default_factory=list)
    embeddings: dict[str, str] = field(default_factory=dict)

    @property
    def needs_captions(self) -> bool:
        return any("{captions}" in o for o in self.overrides + self.optional_overrides)


_CAPTIONS_TARGET = "evaluation.caption_data.CaptionedPersonalizedBase"

#: The paper's setups. The regularisation weight is our choice (the paper does not state it here).
CATALOGUE: dict[str, Setup] = {
    s.name: s
    for s in [
        Setup("single_word", "Single word"),
        Setup("two_words", "2 words", overrides=[f"{_PM}.num_vectors_per_token=2"]),
        Setup("three_words", "3 words", overrides=[f"{_PM}.num_vectors_per_token=3"]),
        Setup(
            "progressive",
            "Progressive (up to 3 words)",
            overrides=[f"{_PM}.num_vectors_per_token=3", f"{_PM}.progressive_words=True"],
        ),
        Setup("regularized", "Reg. to coarse word", overrides=["model.params.embedding_reg_weight=0.01"]),
        Setup(
            "per_image_tokens",
            "Per-image tokens",
            overrides=[f"{_PM}.per_image_tokens=True", "data.params.train.params.per_image_tokens=True"],
            optional_overrides=["data.params.validation.params.per_image_tokens=True"],
        ),
        Setup(
            "high_lr",
            "High LR (2e-2)",
            args=["--scale_lr", "False"],
            overrides=["model.base_learning_rate=0.02"],
        ),
        Setup(
            "low_lr",
            "Low LR (1e-4)",
            args=["--scale_lr", "False"],
            overrides=["model.base_learning_rate=0.0001"],
        ),
        Setup(
            "human_captions",
            "Human captions",
            overrides=[
                f"data.params.train.target={_CAPTIONS_TARGET}",
                "data.params.train.params.captions_file={captions}",
            ],
            optional_overrides=[
                f"data.params.validation.target={_CAPTIONS_TARGET}",
                "data.params.validation.params.captions_file={captions}",
            ],
        ),
    ]
}


@dataclass
class Concept:
    name: str
    data_root: str
    init_word: str
    captions: str | None = None


@dataclass
class RunnerSpec:
    """Everything a run needs; paths are relative to the working directory, as for main.py."""

    config: str
    ckpt: str
    concepts: list[Concept]
    prompts: list[str]
    setups: list[Setup]
    references: list[str] = field(default_factory=lambda: list(REFERENCES))
    reconstruction_prompt: str = "A photo of *"
    eval_config: str | None = None  # sampling config (default: `config`)
    tokenizer_path: str | None = None  # the diffusion model's text tokenizer folder (offline use)
    clip_model: str = "ViT-B/32"
    clip_tokenizer: str | None = None
    preprocess: str = "pil"
    out_dir: str = "outputs/paper_setups"
    seed: int = 23
    max_steps: int = 5000
    train_args: list[str] = field(default_factory=list)
    train_overrides: list[str] = field(default_factory=list)
    eval_overrides: list[str] = field(default_factory=list)
    n_samples: int = 64
    ddim_steps: int = 50
    scale: float = 5.0
    batch_size: int = 8
    image_size: int = 256
    device: str | None = None
    save_grids: bool = True

    def is_reconstruction(self, prompt: str) -> bool:
        """Whether `prompt` is the reconstruction prompt (case and spacing ignored, as the tokenizers do)."""
        return " ".join(prompt.lower().split()) == " ".join(self.reconstruction_prompt.lower().split())

    @property
    def all_prompts(self) -> list[str]:
        """The prompts, the reconstruction prompt first (added when missing)."""
        recon = next((p for p in self.prompts if self.is_reconstruction(p)), self.reconstruction_prompt)
        return [recon, *[p for p in self.prompts if not self.is_reconstruction(p)]]

    @property
    def editing_prompts(self) -> list[str]:
        """The prompts whose samples give the text similarity (all prompts if there is no other)."""
        return [p for p in self.prompts if not self.is_reconstruction(p)] or self.all_prompts[:1]


def _only_known(data: dict, cls, where: str) -> dict:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return data


def parse_setup(entry) -> Setup:
    """A catalogue name, or a dict; a dict naming a catalogue entry extends it (its lists are appended)."""
    if isinstance(entry, str):
        if entry not in CATALOGUE:
            raise ValueError(
                f"unknown setup {entry!r}; the catalogue has {sorted(CATALOGUE)} (or give a dict)"
            )
        return Setup(**asdict(CATALOGUE[entry]))
    data = _only_known(dict(entry), Setup, "setup")
    if "name" not in data:
        raise ValueError(f"setup {entry!r} has no name")
    base = asdict(CATALOGUE[data["name"]]) if data["name"] in CATALOGUE else {"name": data["name"]}
    for key in ("args", "overrides", "optional_overrides"):
        base[key] = list(base.get(key, [])) + [str(v) for v in data.get(key, [])]
    base["label"] = data.get("label") or base.get("label") or data["name"]
    base["embeddings"] = {**base.get("embeddings", {}), **dict(data.get("embeddings", {}))}
    return Setup(**base)


def load_spec(source) -> RunnerSpec:
    """A RunnerSpec from a YAML/JSON file path or a dict; unknown keys and unknown setups raise."""
    if not isinstance(source, dict):
        source = OmegaConf.to_container(OmegaConf.load(source), resolve=True)
    data = _only_known(dict(source), RunnerSpec, "spec")
    for key in ("config", "ckpt", "concepts", "prompts"):
        if not data.get(key):
            raise ValueError(f"spec: '{key}' is required")
    data["concepts"] = [Concept(**_only_known(dict(c), Concept, "concept")) for c in data["concepts"]]
    data["setups"] = [parse_setup(s) for s in data.get("setups") or []]
    spec = RunnerSpec(**data)
    bad = [r for r in spec.references if r not in REFERENCES]
    if bad:
        raise ValueError(f"spec: unknown reference(s) {bad}; choose from {list(REFERENCES)}")
    names = [s.name for s in spec.setups] + list(spec.references)
    if len(set(names)) != len(names):
        raise ValueError(f"spec: setup names must be unique, got {names}")
    for setup in spec.setups:
        lacking = [c.name for c in spec.concepts if setup.needs_captions and not c.captions]
        if lacking:
            raise ValueError(f"setup {setup.name!r} needs a captions file for concept(s) {lacking}")
    return spec


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


def train_command(spec: RunnerSpec, setup: Setup, concept: Concept, logdir: Path) -> list[str]:
    """The main.py argument list that trains `setup` on `concept`."""
    argv = [
        "--base",
        spec.config,
        "-t",
        "--actual_resume",
        spec.ckpt,
        "-n",
        f"{setup.name}_{concept.name}",
        "--data_root",
        concept.data_root,
        "--logdir",
        str(logdir),
        "--init_word",
        concept.init_word,
        "--seed",
        str(spec.seed),
        "--max_steps",
        str(spec.max_steps),
        "--no-test",
        "True",
    ]
    if spec.tokenizer_path:
        argv += ["--tokenizer_path", spec.tokenizer_path]
    return (
        argv
        + list(spec.train_args)
        + list(setup.args)
        + list(spec.train_overrides)
        + setup_overrides(spec.config, setup, concept)
    )


def train_embedding(spec: RunnerSpec, setup: Setup, concept: Concept) -> Path:
    """Path of the setup's embedding for `concept`: given, already trained, or trained now with main.py.

    A trained file is reused only if `<concept>.json` beside it records the same main.py arguments.
    """
    if concept.name in setup.embeddings:
        return Path(setup.embeddings[concept.name])
    target = Path(spec.out_dir) / "embeddings" / setup.name / f"{concept.name}.pt"
    manifest = target.with_suffix(".json")
    logdir = Path(spec.out_dir) / "runs" / setup.name / concept.name
    argv = train_command(spec, setup, concept, logdir)
    if target.is_file():
        recorded = json.loads(manifest.read_text()).get("argv") if manifest.is_file() else None
        if recorded != argv:
            raise ValueError(
                f"{target} was trained with other settings than {argv}; delete it or use another out_dir"
            )
        logger.info("reusing %s", target)
        return target
    import main as train_main

    code = train_main.main(argv)
    if code:
        raise RuntimeError(f"training {setup.name} on {concept.name} failed (main.py exit code {code})")
    runs = sorted(logdir.glob("*/checkpoints/embeddings.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RuntimeError(f"training {setup.name} on {concept.name} wrote no embeddings.pt under {logdir}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(runs[-1], target)
    manifest.write_text(json.dumps({"argv": argv, "run_dir": str(runs[-1].parent.parent)}, indent=1))
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
    from ldm.generation import load_model

    device = torch.device(spec.device or "cpu")
    model = load_model(
        spec.eval_config or spec.config, spec.ckpt, list(spec.eval_overrides), spec.tokenizer_path, device
    )
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
    return write_results(spec, scorer, scorer.evaluator.model_name)
