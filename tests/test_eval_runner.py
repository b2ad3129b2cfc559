"""The paper-setups runner, evaluate_model.py and clip_rank.py on the tiny latent-diffusion model.

The tiny model is configs/toy/tiny-demo.yaml with random (non-degenerate) weights, CLIP is a tiny random
CLIPModel saved to a local folder; training runs 5 steps per setup on 4 rendered images.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, fixture_path, load_script, tiny_clip_model
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from evaluation.caption_data import CaptionedPersonalizedBase
from evaluation.clip_eval import LDMCLIPEvaluator, load_training_images
from evaluation.results import TABLE_COLUMNS
from evaluation.setups import run, setup_overrides, train_embedding, train_options
from evaluation.spec import CATALOGUE, Concept, load_spec, parse_setup

CONFIG = REPO / "configs" / "toy" / "tiny-demo.yaml"
TOKENIZER = REPO / "assets" / "tokenizers" / "tiny-words"
PROMPTS = ["a photo of *", "a red *"]


def render_rings(folder: Path, n: int = 4, size: int = 32) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new(
            "RGB", (size, size), [(230, 230, 230), (40, 90, 200), (30, 160, 60), (120, 120, 120)][i % 4]
        )
        c, r = size // 2 + i - 2, size // 4
        ImageDraw.Draw(img).ellipse((c - r, c - r, c + r, c + r), outline=(250, 140, 20), width=3)
        img.save(folder / f"ring_{i}.png")


def write_tiny_base(path: Path, seed: int = 5) -> None:
    """Random weights everywhere (a fresh UNet zero-initialises its output layers, which would make the
    text irrelevant); the embedding manager is left out, as in a real base checkpoint."""
    from ldm.util import instantiate_from_config, randomize_parameters_

    config = OmegaConf.load(CONFIG)
    config.model.params.cond_stage_config.params.tokenizer_path = str(TOKENIZER)
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    randomize_parameters_(model, torch.Generator().manual_seed(seed), skip_prefixes=("embedding_manager.",))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("embedding_manager.")}
    torch.save({"state_dict": state}, path)


def write_tiny_clip(folder: Path) -> None:
    from transformers import CLIPTokenizer

    tiny_clip_model(seed=0).save_pretrained(folder)
    CLIPTokenizer.from_pretrained(str(fixture_path("tokenizers", "clip"))).save_pretrained(folder)


# Tiny models gain nothing from a second thread, and on a busy 2-core machine a second thread spins
# (runs here were up to 10x slower with two). One thread for the module fixtures and for every test.
@pytest.fixture(scope="module", autouse=True)
def _one_thread_module():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread(_torch_defaults):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_runner")
    render_rings(root / "rings")
    write_tiny_base(root / "base.ckpt")
    write_tiny_clip(root / "clip")
    return root


def spec_dict(root: Path, **changes) -> dict:
    spec = {
        "config": str(CONFIG),
        "ckpt": str(root / "base.ckpt"),
        "tokenizer_path": str(TOKENIZER),
        "clip_model": str(root / "clip"),
        "out_dir": str(root / "out"),
        "device": "cpu",
        "concepts": [{"name": "rings", "data_root": str(root / "rings"), "init_word": "ring"}],
        "prompts": PROMPTS,
        "setups": ["single_word", "two_words"],
        "references": ["image_only", "prompt_only"],
        "max_steps": 5,
        "n_samples": 2,
        "ddim_steps": 2,
        "batch_size": 2,
        "image_size": 32,
        "seed": 7,
        "train_overrides": [
            "lightning.trainer.enable_progress_bar=False",
            "lightning.trainer.enable_model_summary=False",
        ],
    }
    spec.update(changes)
    return spec


@pytest.fixture(scope="module")
def runner_output(workspace):
    spec = load_spec(spec_dict(workspace))
    table = run(spec, progress=False)
    return spec, table


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))




# ---------------------------------------------------------------------------------------------------
# Spec and setups (no training)
# ---------------------------------------------------------------------------------------------------


def test_every_catalogue_setup_applies_to_the_config(tmp_path):
    from ldm.cli import merge_configs

    concept = Concept("c", str(tmp_path), "ring", captions=str(tmp_path / "captions.json"))
    expected = {
        "two_words": {"model.params.personalization_config.params.num_vectors_per_token": 2},
        "three_words": {"model.params.personalization_config.params.num_vectors_per_token": 3},
        "progressive": {
            "model.params.personalization_config.params.num_vectors_per_token": 3,
            "model.params.personalization_config.params.progressive_words": True,
        },
        "regularized": {"model.params.embedding_reg_weight": 0.01},
        "per_image_tokens": {
            "model.params.personalization_config.params.per_image_tokens": True,
            "data.params.train.params.per_image_tokens": True,
            "data.params.validation.params.per_image_tokens": True,
        },
        "high_lr": {"model.base_learning_rate": 0.02},
        "low_lr": {"model.base_learning_rate": 0.0001},
        "human_captions": {
            "data.params.train.target": "evaluation.caption_data.CaptionedPersonalizedBase",
            "data.params.train.params.captions_file": str(tmp_path / "captions.json"),
            "data.params.validation.params.captions_file": str(tmp_path / "captions.json"),
        },
    }
    assert set(CATALOGUE) == {"single_word", *expected}
    for name, values in expected.items():
        merged = merge_configs([str(CONFIG)], setup_overrides(str(CONFIG), CATALOGUE[name], concept))
        for key, value in values.items():
            assert OmegaConf.select(merged, key) == value, (name, key)
    spec = load_spec(spec_dict(tmp_path, train_options={"trainer": {"precision": "32"}, "scale_lr": True}))
    options = train_options(spec, CATALOGUE["high_lr"], concept, tmp_path)
    assert options["scale_lr"] is False and "model.base_learning_rate=0.02" in options["overrides"]  # setup wins
    assert options["init_word"] == "ring" and options["trainer"] == {"max_steps": 5, "precision": "32"}
    assert options["logdir"] == str(tmp_path) and options["no_test"] is True
    for bad_options, message in (({"max_step": 3}, "unknown training option"), ({"seed": 1}, "set by the runner"),
                                 ({"trainer": 3}, "must be a mapping")):
        with pytest.raises(ValueError, match=message):
            load_spec(spec_dict(tmp_path, setups=[{"name": "mine", "options": bad_options}]))
    bad = parse_setup({"name": "mine", "overrides": ["model.params.no_such_node.x=1"]})
    with pytest.raises(ValueError, match="no_such_node"):
        setup_overrides(str(CONFIG), bad, concept)


def test_spec_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        load_spec(spec_dict(tmp_path, n_sample=3))
    with pytest.raises(ValueError, match="unknown setup"):
        load_spec(spec_dict(tmp_path, setups=["one_word"]))
    with pytest.raises(ValueError, match="needs a captions file"):
        load_spec(spec_dict(tmp_path, setups=["human_captions"]))
    custom = load_spec(
        spec_dict(
            tmp_path,
            setups=[
                {
                    "name": "regularized",
                    "label": "Reg 0.1",
                    "overrides": ["model.params.embedding_reg_weight=0.1"],
                }
            ],
        )
    )
    assert custom.setups[0].label == "Reg 0.1"
    assert custom.setups[0].overrides[-1] == "model.params.embedding_reg_weight=0.1"  # later wins
    assert custom.all_prompts == PROMPTS and custom.editing_prompts == ["a red *"]


def test_human_captions_dataset(tmp_path):
    render_rings(tmp_path / "imgs", n=2)
    captions = {"ring_0.png": "A photo of * on a grey bed", "ring_1": "a * next to a mug"}
    (tmp_path / "c.json").write_text(json.dumps(captions))
    data = CaptionedPersonalizedBase(
        tmp_path / "imgs", captions_file=tmp_path / "c.json", size=16, repeats=3, coarse_class_text="toy"
    )
    assert len(data) == 6
    assert [data[i]["caption"] for i in range(3)] == [
        "A photo of toy * on a grey bed",
        "a toy * next to a mug",
        "A photo of toy * on a grey bed",
    ]
    assert data[0]["image"].shape == (16, 16, 3)
    (tmp_path / "c.tsv").write_text("ring_0.png\tA * on a bed\nring_1.png\tA * by a mug\n")
    tsv = CaptionedPersonalizedBase(tmp_path / "imgs", captions_file=tmp_path / "c.tsv", size=16)
    assert tsv[1]["caption"] == "A * by a mug"
    (tmp_path / "missing.json").write_text(json.dumps({"ring_0.png": "A * on a bed"}))
    with pytest.raises(ValueError, match="no caption for ring_1.png"):
        CaptionedPersonalizedBase(tmp_path / "imgs", captions_file=tmp_path / "missing.json")
    (tmp_path / "nostar.json").write_text(json.dumps({"ring_0.png": "A cat", "ring_1.png": "A * cat"}))
    with pytest.raises(ValueError, match="does not contain the placeholder"):
        CaptionedPersonalizedBase(tmp_path / "imgs", captions_file=tmp_path / "nostar.json")


# ---------------------------------------------------------------------------------------------------
# The runner end to end: 2 setups, 2 prompts, both references
# ---------------------------------------------------------------------------------------------------


def test_runner_writes_the_table(runner_output):
    spec, table = runner_output
    out = Path(spec.out_dir)
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == TABLE_COLUMNS
    assert [r["setup"] for r in rows] == ["single_word", "two_words", "image_only", "prompt_only"]
    assert [r["kind"] for r in rows] == ["setup", "setup", "reference", "reference"]
    for row in rows:
        values = {k: float(row[k]) for k in TABLE_COLUMNS[3:]}
        assert all(math.isfinite(v) for v in values.values()), row
        assert values["image_ci_low"] <= values["image_similarity"] <= values["image_ci_high"]
        assert values["text_ci_low"] <= values["text_similarity"] <= values["text_ci_high"]
        assert -1.0 <= values["image_similarity"] <= 1.0 and -1.0 <= values["text_similarity"] <= 1.0
    n = {r["setup"]: (int(r["image_n"]), int(r["text_n"])) for r in rows}
    assert n == {"single_word": (2, 2), "two_words": (2, 2), "image_only": (4, 4), "prompt_only": (2, 2)}

    per_prompt = read_csv(out / "per_prompt.csv")
    assert len(per_prompt) == 8  # (2 setups + prompt_only) x 2 prompts, image_only x 2 prompts
    sampled = {(r["setup"], r["prompt"]): r["sampled_prompt"] for r in per_prompt}
    assert sampled[("prompt_only", "a red *")] == "a red ring"
    assert sampled[("two_words", "a red *")] == "a red *"
    scored = {r["scored_text"] for r in per_prompt}
    assert scored == {"a photo of ", "a red "}
    # Same seeds in both setups: the samples differ only through the learned embedding.
    image = {(r["setup"], r["prompt"]): float(r["image_similarity"]) for r in per_prompt}
    assert image[("single_word", "a photo of *")] != image[("two_words", "a photo of *")]

    record = json.loads((out / "results.json").read_text())
    assert "raw cosine" in record["metric"] and record["seed"] == 7 and record["table"] == table
    embeddings = {
        name: torch.load(out / "embeddings" / name / "rings.pt", weights_only=False)
        for name in ("single_word", "two_words")
    }
    assert embeddings["single_word"]["string_to_param"]["*"].shape[0] == 1
    assert embeddings["two_words"]["string_to_param"]["*"].shape[0] == 2


def test_trained_embeddings_are_reused_only_with_the_same_settings(runner_output):
    spec, _ = runner_output
    setup, concept = spec.setups[0], spec.concepts[0]
    runs = Path(spec.out_dir) / "runs" / setup.name / concept.name
    assert (
        train_embedding(spec, setup, concept) == Path(spec.out_dir) / "embeddings" / setup.name / "rings.pt"
    )
    assert len(list(runs.iterdir())) == 1  # not trained again
    with pytest.raises(ValueError, match="other settings"):
        train_embedding(dataclasses.replace(spec, max_steps=6), setup, concept)


def test_runner_image_only_reference_is_the_training_set_against_itself(runner_output, workspace):
    from evaluation.clip_eval import CLIPEvaluator

    spec, table = runner_output
    evaluator = CLIPEvaluator("cpu", str(workspace / "clip"))
    train = load_training_images(workspace / "rings", 32)
    row = next(r for r in table if r["setup"] == "image_only")
    assert row["image_similarity"] == pytest.approx(
        evaluator.img_to_img_similarity(train, train).item(), abs=1e-5
    )
    assert row["text_similarity"] == pytest.approx(
        evaluator.txt_to_img_similarity("a red ", train).item(), abs=1e-5
    )


def test_runner_draws_the_tradeoff_plot(runner_output):
    spec, table = runner_output
    plot = Image.open(Path(spec.out_dir) / "tradeoff.png")
    assert plot.format == "PNG" and plot.size == (960, 640)
    pixels = plot.convert("RGB")
    assert len(pixels.getcolors(maxcolors=1 << 16) or []) > 20  # axes, text, markers, error bars
    assert json.loads(plot.text["rows"]) == table
    assert "raw cosine" in plot.text["title"]
    assert len(list((Path(spec.out_dir) / "samples").rglob("*.png"))) == 6


# ---------------------------------------------------------------------------------------------------
# Scripts and the LDM evaluator
# ---------------------------------------------------------------------------------------------------


def common_args(workspace, runner_output) -> list[str]:
    spec, _ = runner_output
    return [
        "--ckpt_path",
        str(workspace / "base.ckpt"),
        "--config",
        str(CONFIG),
        "--embedding_path",
        str(Path(spec.out_dir) / "embeddings" / "single_word" / "rings.pt"),
        "--clip_model",
        str(workspace / "clip"),
        "--ddim_steps",
        "2",
        "--batch_size",
        "2",
        "--device",
        "cpu",
        "--tokenizer_path",
        str(TOKENIZER),
        "--image_size",
        "32",
    ]


def test_evaluate_model_prints_and_writes_results(workspace, runner_output, tmp_path, capsys):
    script = load_script("evaluate_model")
    args = [
        "--prompt",
        "a photo of *",
        "--data_dir",
        str(workspace / "rings"),
        "--n_samples",
        "3",
        "--seed",
        "11",
        "--out_dir",
        str(tmp_path),
        *common_args(workspace, runner_output),
    ]
    assert script.main([*args, "--coverage", "--coverage_samples", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    printed = [
        float(line.split(": ")[1]) for line in lines if line.startswith(("Image similarity", "Text sim"))
    ]
    (record,) = json.loads((tmp_path / "clip_eval.json").read_text())
    assert printed == [record["image_similarity"], record["text_similarity"]]  # reference: never printed
    assert (
        record["seed"] == 11
        and record["scored_text"] == "a photo of "
        and len(record["image_per_sample"]) == 3
    )
    assert record["image_similarity"] == pytest.approx(sum(record["image_per_sample"]) / 3, abs=1e-6)
    assert "raw cosine" in record["metric"]
    (row,) = read_csv(tmp_path / "clip_eval.csv")
    assert float(row["text_similarity"]) == pytest.approx(record["text_similarity"], abs=1e-9)
    coverage = read_csv(tmp_path / "coverage.csv")
    assert [r["factor"] for r in coverage] == ["1", "1/2", "1/4", "1/6", "1/8"]
    assert all(0.0 <= float(r["p_value"]) <= 1.0 for r in coverage)
    assert [int(r["kept"]) for r in coverage] == [4, 2, 2, 2, 2]


def test_clip_rank_saves_candidates_and_best(workspace, runner_output, tmp_path):
    script = load_script("clip_rank")
    args = [
        "--prompt",
        "a red *",
        "--n_candidates",
        "3",
        "--keep",
        "2",
        "--criterion",
        "image",
        "--data_dir",
        str(workspace / "rings"),
        "--seed",
        "3",
        "--outdir",
        str(tmp_path),
        *common_args(workspace, runner_output),
    ]
    assert script.main(args) == 0
    record = json.loads((tmp_path / "ranking.json").read_text())
    scores, order = record["scores"], record["order"]
    assert len(scores) == 3 and sorted(order) == [0, 1, 2]
    assert [scores[i] for i in order] == sorted(scores, reverse=True)
    assert len(list((tmp_path / "candidates").glob("*.png"))) == 3
    best = sorted((tmp_path / "best").glob("*.png"))
    assert [p.name for p in best] == [f"rank0_{order[0]:05}.png", f"rank1_{order[1]:05}.png"]
    meta = Image.open(best[0]).text
    assert meta["criterion"] == "image" and meta["seed"] == "3" and meta["prompt"] == "a red *"
    assert float(meta["score"]) == pytest.approx(scores[order[0]], abs=1e-6)


def test_ldm_evaluator_partial_batches_and_seeding(workspace):
    from ldm.loading import load_model

    model = load_model(str(CONFIG), str(workspace / "base.ckpt"), tokenizer_path=str(TOKENIZER))
    evaluator = LDMCLIPEvaluator("cpu", str(workspace / "clip"))
    src = load_training_images(workspace / "rings", 32)

    def measure(seed):
        return evaluator.measure(
            model,
            src,
            "a photo of *",
            n_samples=3,
            n_steps=2,
            batch_size=2,
            generator=torch.Generator().manual_seed(seed),
            progress=False,
        )

    (sims, samples), (other, _) = measure(1), measure(2)
    assert samples.shape == (3, 3, 32, 32) and samples.min() >= -1 and samples.max() <= 1
    assert len(sims.image_per_sample) == len(sims.text_per_sample) == 3
    assert other.image_per_sample != sims.image_per_sample
    # The reference's entry point, same seed: the same numbers.
    img, txt = evaluator.evaluate(
        model,
        src,
        "a photo of *",
        n_samples=3,
        n_steps=2,
        batch_size=2,
        generator=torch.Generator().manual_seed(1),
    )
    assert (img.item(), txt.item()) == pytest.approx((sims.image_similarity, sims.text_similarity), abs=1e-6)
