"""The spec of the setups runner (`evaluation.setups`): its types, the paper's catalogue of setups, parsing.

A spec (YAML or JSON, see docs/EVALUATION.md) names the base model, the concepts (image folder and
initializer word each), the prompts, the setups (`Setup`: a `CATALOGUE` name or a dict) and the references
(`REFERENCES`: "image_only", "prompt_only"). `load_spec` turns it into a `RunnerSpec`; unknown keys, setups
and references raise. This module imports nothing else from `evaluation`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from omegaconf import OmegaConf

from ldm.training import TrainOptions

#: The references (no training): spec name -> label in the table and the plot.
REFERENCES = {"image_only": "Image only", "prompt_only": "Prompt only"}

_PM = "model.params.personalization_config.params"

#: Training options the runner sets itself for every (setup, concept); a spec may not set them.
RUNNER_OPTIONS = ("base", "overrides", "train", "actual_resume", "name", "data_root", "logdir", "init_word",
                  "seed", "tokenizer_path", "no_test")


@dataclass
class Setup:
    """One training recipe: training options and `key.path=value` overrides on top of the base config.

    `options` are `ldm.training.TrainOptions` fields (`main.py`'s flags by name, e.g. `scale_lr: false`;
    trainer flags under `trainer`), except those the runner sets (RUNNER_OPTIONS). `optional_overrides` apply only where the config has the parent node (e.g. a validation split).
    `{captions}` in an override is replaced by the concept's captions file. `embeddings` maps concept
    names to existing embedding files, which are then used instead of training.
    """

    name: str
    label: str = ""
    options: dict[str, Any] = field(default_factory=dict)
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
            options={"scale_lr": False},
            overrides=["model.base_learning_rate=0.02"],
        ),
        Setup(
            "low_lr",
            "Low LR (1e-4)",
            options={"scale_lr": False},
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
    """Everything a run needs; paths are relative to the working directory, as for main.py.

    `train_options` are `ldm.training.TrainOptions` fields applied to every setup (before its own)."""

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
    train_options: dict[str, Any] = field(default_factory=dict)  # TrainOptions fields for every setup
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
    for key in ("overrides", "optional_overrides"):
        base[key] = list(base.get(key, [])) + [str(v) for v in data.get(key, [])]
    base["options"] = merge_options(base.get("options", {}), dict(data.get("options", {})))
    base["label"] = data.get("label") or base.get("label") or data["name"]
    base["embeddings"] = {**base.get("embeddings", {}), **dict(data.get("embeddings", {}))}
    return Setup(**base)


def merge_options(*layers: dict) -> dict:
    """Training options, later layers winning; their `trainer` dicts merge key by key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            both_maps = isinstance(value, dict) and isinstance(merged.get(key, {}), dict)
            merged[key] = {**merged.get(key, {}), **value} if key == "trainer" and both_maps else value
    return merged


def check_options(options: dict, where: str) -> None:
    """Training options must be TrainOptions fields that the runner does not set itself."""
    unknown = sorted(set(options) - TrainOptions.names())
    if unknown:
        raise ValueError(f"{where}: unknown training option(s) {unknown}; see ldm.training.TrainOptions")
    reserved = sorted(set(options) & set(RUNNER_OPTIONS))
    if reserved:
        raise ValueError(f"{where}: option(s) {reserved} are set by the runner; use the spec's own keys")
    if not isinstance(options.get("trainer", {}), dict):
        raise ValueError(f"{where}: 'trainer' must be a mapping such as {{gpus: '0,'}}")


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
    check_options(spec.train_options, "spec train_options")
    for setup in spec.setups:
        check_options(setup.options, f"setup {setup.name!r} options")
        lacking = [c.name for c in spec.concepts if setup.needs_captions and not c.captions]
        if lacking:
            raise ValueError(f"setup {setup.name!r} needs a captions file for concept(s) {lacking}")
    return spec
