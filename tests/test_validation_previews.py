"""Validation previews (`--validation_prompts`, ldm/validation_previews.py) on the tiny LDM config: fixed
starting noise per prompt, bitwise-identical grids between runs of one seed and after `--resume`, a contact
sheet over steps, the training run left exactly as without previews, and the flags' checks."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli import UsageError, parse_args
from ldm.modules.embedding_formats import read_embeddings
from ldm.training import train
from ldm.validation_previews import ValidationPreviews, contact_sheet, folder_name, read_prompts

SEED = 5
FAST = [
    "data.params.batch_size=2",
    "data.params.train.params.repeats=4",
    "lightning.trainer.num_sanity_val_steps=0",
    "lightning.modelcheckpoint.params.every_n_train_steps=4",
    "lightning.callbacks.image_logger.target=main.ImageLogger",
    "lightning.callbacks.image_logger.params.batch_frequency=2",
    "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
]
PROMPTS = ["a photo of *", "a photo"]  # the second never shows the learned word
PREVIEWS = dict(validation_prompts=PROMPTS, validation_every=4, validation_samples=2, validation_steps=3)


def run(tiny, logdir, steps, **options):
    config, ckpt, _, images = tiny
    return train(str(config), actual_resume=str(ckpt), data_root=str(images), name="run", logdir=str(logdir),
                 seed=SEED, trainer={"max_steps": steps}, no_test=True, overrides=FAST, **options)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("previews")
    out = {"a": run(tiny, root / "a", 8, **PREVIEWS), "b": run(tiny, root / "b", 8, **PREVIEWS),
           "plain": run(tiny, root / "plain", 8), "first": run(tiny, root / "first", 4, **PREVIEWS)}
    out["resumed"] = train((), resume=str(out["first"].logdir), seed=SEED, trainer={"max_steps": 8},
                           no_test=True, overrides=FAST, **PREVIEWS)
    return out


def grids(run, index: int) -> dict[int, bytes]:
    folder = Path(run.logdir) / "validation" / folder_name(index, PROMPTS[index])
    return {int(p.stem.split("-")[1]): p.read_bytes() for p in sorted(folder.glob("gs-*.png"))}


def pixels(data: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_a_grid_per_prompt_at_start_every_n_and_end(runs):
    for index in (0, 1):
        assert sorted(grids(runs["a"], index)) == [0, 4, 8]
    image = Image.open(Path(runs["a"].logdir) / "validation" / folder_name(0, PROMPTS[0]) / "gs-000004.png")
    assert image.text["prompt"] == "a photo of *" and image.text["step"] == "4"
    assert image.text["seed"] == str(SEED)
    assert image.text["sampler"] == "dpmpp2m" and image.text["steps"] == "3"
    assert image.size == (2 * 64 + 3 * 2, 64 + 2 * 2)  # one row of 2 samples, make_grid's padding


def test_two_runs_with_one_seed_give_identical_grids(runs):
    for index in (0, 1):
        assert grids(runs["a"], index) == grids(runs["b"], index)


def test_every_render_starts_from_the_same_noise(runs):
    """The prompt without the learned word is conditioned the same at every step, so its grids are equal
    only if every render starts from the same noise; the learned word's grids change as it is learned."""
    word, control = grids(runs["a"], 0), grids(runs["a"], 1)
    assert np.array_equal(pixels(control[0]), pixels(control[4])) and np.array_equal(pixels(control[0]),
                                                                                     pixels(control[8]))
    assert not np.array_equal(pixels(word[0]), pixels(word[8]))
    callback = ValidationPreviews(PROMPTS, seed=SEED, samples=2)
    assert torch.equal(callback.noise(0, (4, 8, 8)), callback.noise(0, (4, 8, 8)))
    assert not torch.equal(callback.noise(0, (4, 8, 8)), callback.noise(1, (4, 8, 8)))
    assert not torch.equal(callback.noise(0, (4, 8, 8)),
                           ValidationPreviews(PROMPTS, seed=SEED + 1, samples=2).noise(0, (4, 8, 8)))


def test_previews_leave_training_unchanged(runs):
    """Same seed with and without previews: the same learned vectors, bit for bit."""
    a = read_embeddings(runs["a"].embeddings).vectors
    plain = read_embeddings(runs["plain"].embeddings).vectors
    assert a.keys() == plain.keys() and all(torch.equal(a[k], plain[k]) for k in a)


def test_they_replace_the_image_logger(runs):
    assert not list((Path(runs["a"].logdir) / "images").rglob("*.jpg"))
    assert list((Path(runs["plain"].logdir) / "images").rglob("*.jpg"))


def test_resume_continues_the_grids_and_the_contact_sheet(runs):
    """4 steps, then `--resume` to 8: the same grids as the uninterrupted run, and one contact sheet with
    the rows of steps 0, 4 and 8."""
    for index in (0, 1):
        assert grids(runs["resumed"], index) == grids(runs["a"], index)
    folder = Path(runs["resumed"].logdir) / "validation" / folder_name(0, PROMPTS[0])
    sheet = np.asarray(Image.open(folder / "contact_sheet.png").convert("RGB"))
    row = pixels(grids(runs["a"], 0)[4])
    assert sheet.shape[0] == 3 * row.shape[0]
    assert np.array_equal(sheet[row.shape[0] : 2 * row.shape[0], -row.shape[1]:], row)  # step 4 is row 2


def test_contact_sheet_rows_in_step_order_and_enlarged():
    rows = [(20, np.full((10, 30, 3), 200, np.uint8)), (0, np.zeros((10, 30, 3), np.uint8))]
    sheet = contact_sheet(rows, label_width=50)
    assert sheet.shape == (2 * 70, 50 + 30 * 7, 3)  # 10 px high rows enlarged 7x to reach 64
    assert (sheet[:70, 50:] == 0).all() and (sheet[70:, 50:] == 200).all()
    assert (sheet[:, :50] < 255).any()  # the step labels


def test_prompts_from_a_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of *\n\n  a * on the beach \n")
    assert read_prompts([str(path), "a red *"]) == ["a photo of *", "a * on the beach", "a red *"]
    path.write_text("\n")
    with pytest.raises(ValueError, match="prompts.txt: the file holds no prompt"):
        read_prompts([str(path)])


def test_command_line_keeps_overrides_after_the_prompts():
    opt, overrides = parse_args(["-t", "--validation_prompts", "a photo of *", "a * on the beach",
                                 "model.base_learning_rate=0.1", "--validation_every", "5", "data.x=1"])
    assert opt.validation_prompts == ["a photo of *", "a * on the beach"] and opt.validation_every == 5
    assert overrides == ["model.base_learning_rate=0.1", "data.x=1"]


@pytest.mark.parametrize("option, message", [
    (dict(validation_sampler="euler"), "--validation_sampler euler: expected one of dpmpp2m, ddim, plms"),
    (dict(validation_every=0), "--validation_every 0: expected a whole number of steps >= 1"),
    (dict(validation_samples=0), "--validation_samples 0: expected a whole number >= 1"),
])
def test_bad_settings_are_one_line_errors_before_anything_is_written(tiny, tmp_path, option, message):
    with pytest.raises(UsageError, match=message):
        run(tiny, tmp_path / "logs", 2, validation_prompts=["a photo of *"], **option)
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_negative_prompt_and_weighting_reach_the_previews(tiny):
    """The preview's unconditional branch is the negative prompt, and prompts are weighted: `(*:1.0)` renders
    exactly as `*`, `(*:1.5)` and a negative prompt render differently."""
    from ldm.loading import load_model

    config, ckpt, _, _ = tiny
    model = load_model(str(config), str(ckpt))

    def render(prompt, negative=""):
        callback = ValidationPreviews([prompt], samples=1, steps=2, negative_prompt=negative, seed=SEED)
        return callback.images(model, 0)

    plain = render("a photo of *")
    assert torch.equal(render("a photo of (*:1.0)"), plain)
    assert not torch.equal(render("a photo of (*:1.5)"), plain)
    assert not torch.equal(render("a photo of *", negative="a photo"), plain)
