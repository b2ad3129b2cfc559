"""CLIP metrics, the OpenAI CLIP preprocessing, the coverage statistics and CLIP ranking.

No download: a tiny random `CLIPModel` is built here, the tokenizer is the CLIP fixture in
tests/fixtures, and a stub "CLIP" whose image features are the mean normalised colour makes values
computable by hand.
"""

from __future__ import annotations

import json
import math

import mpmath
import numpy as np
import pytest
import torch
from conftest import fixture_path, tiny_clip_model
from PIL import Image

from evaluation.clip_eval import (
    CLIPEvaluator,
    ImageDirEvaluator,
    image_similarity_per_sample,
    load_clip,
    normalize,
    remove_placeholder,
    text_similarity_per_sample,
)
from evaluation.coverage import (
    coverage_test,
    kept_count,
    mean_confidence_interval,
    t_quantile,
    t_two_sided_p,
    welch_t_test,
)
from evaluation.preprocess import CLIP_MEAN, CLIP_STD, preprocess_pil, preprocess_tensor
from evaluation.ranking import rank_candidates, save_ranking

# ---------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread(_torch_defaults):
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine a second thread spins."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(fixture_path("tokenizers", "clip")))


@pytest.fixture(scope="module")
def tiny_evaluator(clip_tokenizer):
    return ImageDirEvaluator("cpu", tiny_clip_model(), tokenizer=clip_tokenizer)


class MeanColourCLIP(torch.nn.Module):
    """Image features = per-channel mean of the CLIP-normalised pixels; text features = the red axis."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # so that .to() has something to move

    def get_image_features(self, pixel_values):
        return pixel_values.mean(dim=(2, 3))

    def get_text_features(self, input_ids):
        return torch.tensor([[1.0, 0.0, 0.0]]).repeat(input_ids.shape[0], 1)


def clip_pixel(rgb) -> np.ndarray:
    """CLIP-normalised value of a solid uint8 colour, by the formula (x / 255 - mean) / std."""
    return (np.array(rgb, dtype=np.float64) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)


def solid(rgb, size=(8, 8)) -> Image.Image:
    return Image.new("RGB", size, tuple(rgb))


def random_image(seed: int, width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 55, height)[:, None, None]
    pixels = np.clip(ramp + rng.integers(0, 60, (height, width, channels)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def uint8_tensor(images: list[Image.Image]) -> torch.Tensor:
    """[-1, 1] tensor of uint8 images, as the datasets make it (v / 127.5 - 1)."""
    arrays = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy((arrays / 127.5 - 1.0).astype(np.float32)).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------
# 1. Metrics against hand-computed values
# ---------------------------------------------------------------------------------------------------


def test_metric_formulas_on_fixed_vectors():
    src = normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    gen = normalize(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]))
    text = normalize(torch.tensor([[3.0, 4.0, 0.0]]))
    # cos(src_i, gen_0) = 1/sqrt(2) for both sources, cos(src_i, gen_1) = 0.
    per_image = image_similarity_per_sample(src, gen)
    assert per_image.tolist() == pytest.approx([1 / math.sqrt(2), 0.0], abs=1e-7)
    assert per_image.mean().item() == pytest.approx(1 / (2 * math.sqrt(2)), abs=1e-7)
    # text (0.6, 0.8, 0): cos with gen_0 = 1.4 / sqrt(2), with gen_1 = 0.
    per_text = text_similarity_per_sample(text, gen)
    assert per_text.tolist() == pytest.approx([1.4 / math.sqrt(2), 0.0], abs=1e-7)


def test_metrics_on_solid_colour_images_by_hand(clip_tokenizer):
    evaluator = CLIPEvaluator("cpu", MeanColourCLIP(), tokenizer=clip_tokenizer, image_size=8)
    src_colours = [(255, 0, 0), (200, 30, 40)]
    gen_colours = [(250, 10, 0), (0, 0, 255), (90, 200, 90)]
    src = [solid(c) for c in src_colours]
    gen = uint8_tensor([solid(c) for c in gen_colours])  # generator-style tensor in [-1, 1]

    def unit(rgb):
        v = clip_pixel(rgb)
        return v / np.linalg.norm(v)

    expected_image = np.mean([unit(s) @ unit(g) for s in src_colours for g in gen_colours])
    expected_text = np.mean([unit(g)[0] for g in gen_colours])  # text features = the first axis
    assert evaluator.img_to_img_similarity(src, gen).item() == pytest.approx(expected_image, abs=1e-5)
    assert evaluator.txt_to_img_similarity("a photo of *", gen).item() == pytest.approx(
        expected_text, abs=1e-5
    )
    sims = evaluator.similarities(gen, src, "a photo of *")
    assert sims.image_similarity == pytest.approx(expected_image, abs=1e-5)
    assert sims.image_per_sample == pytest.approx(
        [np.mean([unit(s) @ unit(g) for s in src_colours]) for g in gen_colours], abs=1e-5
    )
    assert sims.text == "a photo of "


def test_tiny_clip_metrics_match_an_independent_pipeline(tiny_evaluator, clip_tokenizer):
    """Our features and metrics vs Hugging Face's CLIP image processor + the raw model calls."""
    from transformers import CLIPImageProcessorPil

    model = tiny_evaluator.model
    src = [random_image(1, 40, 48), random_image(2, 48, 40), random_image(3, 32, 32)]
    gen_images = [random_image(10 + i, 32, 32) for i in range(4)]
    gen = uint8_tensor(gen_images)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})

    def features(images):
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        out = model.get_image_features(pixel_values=pixels)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return out / out.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        src_f, gen_f = features(src), features(gen_images)
        ids = clip_tokenizer(["a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt")
        text = model.get_text_features(input_ids=ids["input_ids"])
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
        text = text / text.norm(dim=-1, keepdim=True)
    assert tiny_evaluator.img_to_img_similarity(src, gen).item() == pytest.approx(
        (src_f @ gen_f.T).mean().item(), abs=1e-5
    )
    assert tiny_evaluator.txt_to_img_similarity("a photo of a dog", gen).item() == pytest.approx(
        (text @ gen_f.T).mean().item(), abs=1e-5
    )


def test_text_similarity_drops_only_the_placeholder(tiny_evaluator, tmp_path):
    src = [random_image(1, 40, 48), random_image(2, 32, 32)]
    gen_images = [random_image(20 + i, 32, 32) for i in range(3)]
    gen = uint8_tensor(gen_images)
    sim_img, sim_txt = tiny_evaluator.evaluate(gen, src, "a photo of * on the moon")
    without = tiny_evaluator.txt_to_img_similarity("a photo of  on the moon", gen)
    with_star = tiny_evaluator.txt_to_img_similarity("a photo of * on the moon", gen)
    assert remove_placeholder("a photo of * on the moon") == "a photo of  on the moon"
    assert sim_txt.item() == pytest.approx(without.item(), abs=1e-6)
    assert abs(sim_txt.item() - with_star.item()) > 1e-4
    # The tokenizer collapses the double space, as CLIP's whitespace cleaning does.
    assert sim_txt.item() == pytest.approx(
        tiny_evaluator.txt_to_img_similarity("a photo of on the moon", gen).item(), abs=1e-6
    )
    # Folders of saved PNG files give the same numbers as the tensors they came from.
    for folder, images in (("gen", gen_images), ("src", src)):
        (tmp_path / folder).mkdir()
        for i, im in enumerate(images):
            im.save(tmp_path / folder / f"{i}.png")
    from_dirs = tiny_evaluator.evaluate(
        str(tmp_path / "gen"), str(tmp_path / "src"), "a photo of * on the moon"
    )
    assert from_dirs[0].item() == pytest.approx(sim_img.item(), abs=1e-6)
    assert from_dirs[1].item() == pytest.approx(sim_txt.item(), abs=1e-6)


def test_tokenizer_rejects_prompts_longer_than_the_context(tiny_evaluator):
    assert tiny_evaluator.tokenize("a photo of a dog").shape == (1, 77)
    with pytest.raises(ValueError, match="too long"):
        tiny_evaluator.tokenize(" ".join(["dog"] * 80))


def test_clip_loads_from_a_local_folder_and_fails_clearly_offline(tiny_evaluator, clip_tokenizer, tmp_path):
    tiny_evaluator.model.save_pretrained(tmp_path / "clip")
    clip_tokenizer.save_pretrained(tmp_path / "clip")
    local = CLIPEvaluator("cpu", str(tmp_path / "clip"))
    images = uint8_tensor([random_image(5, 32, 32)])
    assert torch.allclose(
        local.get_image_features(images), tiny_evaluator.get_image_features(images), atol=1e-6
    )
    assert torch.allclose(
        local.get_text_features("a dog"), tiny_evaluator.get_text_features("a dog"), atol=1e-6
    )
    with pytest.raises(FileNotFoundError, match="cannot load CLIP"):
        load_clip(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------------
# 2. Preprocessing = OpenAI CLIP's transform
# ---------------------------------------------------------------------------------------------------

# (width, height): chosen so that the centre-crop offsets of torchvision (round half to even) and of
# Hugging Face's processor (floor) agree; the test checks that before comparing.
SIZES = [(224, 224), (300, 200), (200, 300), (640, 480), (225, 230), (500, 224)]


def test_pil_preprocessing_matches_the_clip_reference_transform():
    from transformers import CLIPImageProcessorPil

    from evaluation.preprocess import resized_size

    processor = CLIPImageProcessorPil()  # the OpenAI CLIP settings: shortest edge 224, crop 224, bicubic
    images = [random_image(i, w, h) for i, (w, h) in enumerate(SIZES)] + [random_image(9, 333, 250, mode="L")]
    for image in images:
        new_w, new_h = resized_size(*image.size, 224)
        for excess in (new_w - 224, new_h - 224):
            assert int(round(excess / 2.0)) == excess // 2, "pick sizes where both crop conventions agree"
        ours = preprocess_pil([image])
        reference = processor(images=[image], return_tensors="pt")["pixel_values"]
        assert ours.shape == reference.shape == (1, 3, 224, 224)
        assert (ours - reference).abs().max().item() <= 1e-5, image.size


def test_center_crop_offsets_round_like_torchvision():
    # 224 x 227 needs no resize; the excess of 3 rows gives top = round(1.5) = 2 (torchvision), not 1.
    image = random_image(4, 224, 227)
    rows = np.asarray(image, dtype=np.float64)[2:226] / 255.0
    expected = torch.from_numpy(
        ((rows - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)
    ).float()
    ours = preprocess_pil([image])[0]
    assert (ours - expected).abs().max().item() <= 1e-5
    shifted = np.asarray(image, dtype=np.float64)[1:225] / 255.0
    shifted = torch.from_numpy(
        ((shifted - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)
    ).float()
    assert (ours - shifted).abs().max().item() > 1e-2


def test_default_tensor_path_goes_through_uint8_pil_images():
    images = [random_image(i, 48, 40) for i in range(3)]
    tensor = uint8_tensor(images)
    assert torch.equal(preprocess_tensor(tensor, 32), preprocess_pil(images, 32))


def test_reference_tensor_path_is_bicubic_without_antialias():
    # Columns vary, rows are constant: downsampling 64 -> 32 (factor 2, align_corners=False) puts each
    # output column half-way between input columns 2j and 2j+1, where the cubic kernel (a = -0.75)
    # weighs the four neighbours -0.09375, 0.59375, 0.59375, -0.09375; no antialiasing widens it.
    g = torch.Generator().manual_seed(0)
    columns = torch.rand(3, 64, generator=g) * 2 - 1
    x = columns[:, None, :].expand(3, 64, 64)[None].contiguous()
    out = preprocess_tensor(x, 32, mode="tensor")[0]
    v = (columns + 1) / 2
    mean, std = torch.tensor(CLIP_MEAN)[:, None], torch.tensor(CLIP_STD)[:, None]
    j = torch.arange(1, 31)
    expected = (
        -0.09375 * v[:, 2 * j - 1]
        + 0.59375 * v[:, 2 * j]
        + 0.59375 * v[:, 2 * j + 1]
        - 0.09375 * v[:, 2 * j + 2]
    )
    assert (out[:, 5, 1:31] - (expected - mean) / std).abs().max().item() <= 1e-5
    # At the model's size there is no resize: only (x + 1) / 2 and the CLIP normalisation.
    small = x[..., :32, :32]
    expected_small = (((small + 1) / 2) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        CLIP_STD
    ).view(1, 3, 1, 1)
    assert (preprocess_tensor(small, 32, mode="tensor") - expected_small).abs().max().item() <= 1e-6


# ---------------------------------------------------------------------------------------------------
# 4. Coverage statistics, checked by independent computations
# ---------------------------------------------------------------------------------------------------


def t_pvalue_by_integration(t: float, df: float) -> float:
    """Two-sided p of Student's t by numerically integrating its density (mpmath), not the beta function."""
    mpmath.mp.dps = 30
    df = mpmath.mpf(df)
    c = mpmath.gamma((df + 1) / 2) / (mpmath.sqrt(df * mpmath.pi) * mpmath.gamma(df / 2))
    tail = mpmath.quad(lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2), [abs(t), mpmath.inf])
    return float(2 * tail)


def welch_by_hand(a, b) -> tuple[float, float, float]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, df, t_pvalue_by_integration(t, df)


def test_t_distribution_against_closed_forms_and_integration():
    for t in (0.3, 1.0, 2.5, 7.0):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10)  # Cauchy
        assert t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
        assert t_two_sided_p(t, 7.3) == pytest.approx(t_pvalue_by_integration(t, 7.3), rel=1e-8)
        assert t_two_sided_p(t, 150.0) == pytest.approx(t_pvalue_by_integration(t, 150.0), rel=1e-8)
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2) / math.sqrt(1 - 0.95**2), rel=1e-9)
    mean, low, high = mean_confidence_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t_{0.975, 3} * s / sqrt(n)
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half), rel=1e-9)


def test_welch_t_test_matches_an_independent_computation():
    a = [0.61, 0.58, 0.66, 0.70, 0.59, 0.63, 0.64]
    b = [0.55, 0.52, 0.60, 0.49, 0.57]
    t, df, p = welch_by_hand(a, b)
    result = welch_t_test(a, b)
    assert (result.t, result.df) == pytest.approx((t, df), rel=1e-12)
    assert result.p_value == pytest.approx(p, rel=1e-8)


def test_coverage_reproduces_p_values_computed_independently():
    g = torch.Generator().manual_seed(3)
    centre = torch.randn(16, generator=g)
    train = normalize(centre + 0.6 * torch.randn(5, 16, generator=g))
    samples = normalize(centre + torch.linspace(0.5, 2.5, 256)[:, None] * torch.randn(256, 16, generator=g))
    rows = coverage_test(samples, train)

    s, tr = samples.double().numpy(), train.double().numpy()
    sample_dist = np.sqrt(np.clip(2 - 2 * s @ tr.T, 0, None)).mean(axis=1)  # |a - b| = sqrt(2 - 2 cos)
    train_pair = np.sqrt(np.clip(2 - 2 * tr @ tr.T, 0, None))
    train_dist = (train_pair.sum(axis=1) - np.diag(train_pair)) / (len(tr) - 1)
    ordered = np.sort(sample_dist)
    assert [r.kept for r in rows] == [256, 128, 64, 43, 32]
    assert [r.factor for r in rows] == ["1", "1/2", "1/4", "1/6", "1/8"]
    for row in rows:
        t, df, p = welch_by_hand(ordered[: row.kept], train_dist)
        assert row.t == pytest.approx(t, rel=1e-6)
        assert row.df == pytest.approx(df, rel=1e-6)
        assert row.p_value == pytest.approx(p, rel=1e-6, abs=1e-12)
        assert row.indistinguishable == (p > 0.05)
        assert row.train_distance == pytest.approx(train_dist.mean(), rel=1e-6)
    # The data are built so that cherry-picking matters: all samples differ from the training set,
    # the closest eighth does not.
    assert not rows[0].indistinguishable and rows[-1].indistinguishable
    assert kept_count(1 / 6, 6) == 2  # never fewer than the t-test needs


# ---------------------------------------------------------------------------------------------------
# CLIP ranking
# ---------------------------------------------------------------------------------------------------


def test_ranking_orders_by_clip_score_and_saves_both_sets(clip_tokenizer, tmp_path):
    evaluator = CLIPEvaluator("cpu", MeanColourCLIP(), tokenizer=clip_tokenizer, image_size=8)
    colours = [(0, 0, 255), (255, 0, 0), (120, 120, 120), (200, 40, 40)]
    candidates = uint8_tensor([solid(c) for c in colours])

    def red_score(rgb):  # cosine with the stub's text direction (the first axis)
        v = clip_pixel(rgb)
        return v[0] / np.linalg.norm(v)

    ranking = rank_candidates(evaluator, candidates, "text", prompt="a red *")
    assert ranking.scores == pytest.approx([red_score(c) for c in colours], abs=1e-5)
    assert ranking.order == list(np.argsort([-red_score(c) for c in colours], kind="stable"))
    assert ranking.text == "a red "
    by_image = rank_candidates(evaluator, candidates, "image", reference_images=[solid((0, 10, 240))])
    assert by_image.order[0] == 0  # the blue candidate is closest to a blue reference

    best = save_ranking(candidates, ranking, tmp_path, keep=2, info={"prompt": "a red *", "seed": 7})
    assert len(list((tmp_path / "candidates").glob("*.png"))) == 4
    assert [p.name for p in best] == [f"rank0_{ranking.order[0]:05}.png", f"rank1_{ranking.order[1]:05}.png"]
    meta = Image.open(best[0]).text
    assert meta["rank"] == "0" and meta["prompt"] == "a red *" and meta["seed"] == "7"
    assert float(meta["score"]) == pytest.approx(max(ranking.scores), abs=1e-6)
    record = json.loads((tmp_path / "ranking.json").read_text())
    assert record["order"] == ranking.order and record["keep"] == 2
