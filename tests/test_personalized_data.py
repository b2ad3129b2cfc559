"""The personalized datasets: bit parity with the reference, template lists, and the fixes of
docs/DIFFERENCES.md#training-data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixture_path
from PIL import Image

from ldm.data import personalized, personalized_style
from ldm.data.image_folder import IMAGE_EXTENSIONS, list_image_files, to_rgb
from ldm.data.personalized import PersonalizedBase
from ldm.data.placeholder_tokens import per_img_token_list

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def seed_all(seed: int) -> None:
    """The reference's three global generators, seeded as the parity fixtures were."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Invert the dataset's `uint8 / 127.5 - 1` exactly."""
    return np.rint((image.astype(np.float64) + 1.0) * 127.5).astype(np.uint8)


def save_images(folder: Path, count: int, size: tuple[int, int] = (8, 8)) -> None:
    for k in range(count):
        Image.new("RGB", size, (k, 2 * k, 3 * k)).save(folder / f"img_{k:02d}.png")


def half_red_image(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, size[0] // 2, size[1]))
    return image


# ---------------------------------------------------------------------------------------------------------
# (a) parity with the reference (tests/fixtures, procedure (7))


@pytest.fixture(params=["ldm_tiny", "sd_tiny"])
def parity(request):
    folder = fixture_path("parity", request.param)
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "dataset.safetensors"))
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))["dataset"]
    return folder / "data_images", tensors, meta


@pytest.mark.parametrize("exif_transpose", [True, False])
def test_parity_images_and_captions(parity, exif_transpose):
    data_root, tensors, meta = parity
    dataset = PersonalizedBase(
        data_root=str(data_root), size=64, repeats=100, flip_p=0.0, set="train", placeholder_token="*",
        exif_transpose=exif_transpose,
    )
    assert [Path(p).name for p in dataset.image_paths] == meta["image_paths_order"]
    seed_all(707)
    items = [dataset[i] for i in range(6)]
    assert [item["caption"] for item in items] == meta["captions"]
    for k, item in enumerate(items):
        assert item["image"].dtype == np.float32 and item["image"].shape == (64, 64, 3)
        assert np.array_equal(item["image"], tensors["images"][k]), f"item {k}"


def test_parity_center_crop(parity):
    data_root, tensors, meta = parity
    dataset = PersonalizedBase(data_root=data_root, size=64, repeats=100, flip_p=0.0, center_crop=True)
    seed_all(708)
    items = [dataset[i] for i in range(3)]
    assert [item["caption"] for item in items] == meta["captions_center_crop"]
    for k, item in enumerate(items):
        assert np.array_equal(item["image"], tensors["images_center_crop"][k]), f"item {k}"


def test_parity_per_image_tokens_with_coarse_class(parity):
    data_root, _, meta = parity
    dataset = PersonalizedBase(
        data_root=data_root, size=64, flip_p=0.0, per_image_tokens=True, coarse_class_text="toy"
    )
    seed_all(709)
    assert [dataset[i]["caption"] for i in range(8)] == meta["captions_per_image_tokens_coarse_toy"]


def test_default_collation(parity):
    """Section 4.4: batches hold a float32 [B, H, W, 3] tensor and a list of B captions."""
    data_root, _, _ = parity
    batch = next(iter(torch.utils.data.DataLoader(PersonalizedBase(data_root, size=64), batch_size=2)))
    assert batch["image"].shape == (2, 64, 64, 3) and batch["image"].dtype == torch.float32
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 2


def test_parity_lengths(parity):
    data_root, _, meta = parity
    assert len(PersonalizedBase(data_root, size=64, repeats=100, set="train")) == meta["len_train"] == 300
    assert len(PersonalizedBase(data_root, size=64, repeats=10, set="val")) == meta["len_val"] == 3


def test_style_dataset_shares_the_image_pipeline(parity):
    """Same seeds, same torch draws: the style dataset yields the reference's pixels with style captions."""
    data_root, tensors, _ = parity
    dataset = personalized_style.PersonalizedBase(data_root, size=64, flip_p=0.0, placeholder_token="*")
    seed_all(707)
    for k in range(6):
        item = dataset[k]
        assert np.array_equal(item["image"], tensors["images"][k])
        assert item["caption"] in [t.format("*") for t in personalized_style.imagenet_templates_small]


# ---------------------------------------------------------------------------------------------------------
# (b) template lists


def test_object_template_lists():
    assert personalized.imagenet_templates_smallest == ["a photo of a {}"]
    small = personalized.imagenet_templates_small
    assert (len(small), len(set(small))) == (81, 57)
    assert small[0] == "a photo of a {}" and small[-1] == "a depiction of a small {}"
    assert small[27] == "an illustration of a {}" and small[54] == "a depiction of a {}"
    dual = personalized.imagenet_dual_templates_small
    assert (len(dual), len(set(dual))) == (27, 27)
    assert dual[0] == "a photo of a {} with {}" and dual[-1] == "a photo of a small {} with {}"
    assert not any(t.endswith(".") for t in small + dual)


def test_style_template_lists():
    small = personalized_style.imagenet_templates_small
    assert (len(small), len(set(small))) == (19, 17)
    assert small[0] == "a painting in the style of {}" and small[-1] == "a large painting in the style of {}"
    dual = personalized_style.imagenet_dual_templates_small
    assert (len(dual), len(set(dual))) == (17, 16)
    assert dual[0] == "a painting in the style of {} with {}"
    assert dual[-1] == "a large painting in the style of {} with {}"
    assert dual[12] == "a painting of one {} in the style of {}"  # the reference's inverted entry


def test_per_image_token_list_is_reexported():
    expected = [chr(c) for c in (0x5D0, 0x5D1, 0x5D2, 0x5D3, 0x5D4, 0x5D5, 0x5D6, 0x5D7, 0x5D8, 0x5D9, 0x5DB,
                                 0x5DC, 0x5DE, 0x5E0, 0x5E1, 0x5E2, 0x5E4, 0x5E6, 0x5E7, 0x5E8, 0x5E9, 0x5EA)]
    assert per_img_token_list == expected
    assert personalized.per_img_token_list is per_img_token_list
    assert personalized_style.per_img_token_list is per_img_token_list


# ---------------------------------------------------------------------------------------------------------
# (c) fixes and options


def test_listing_keeps_only_images_sorted(tmp_path):
    for name, file_format in [("b.JPG", "JPEG"), ("a.png", "PNG"), ("c.webp", "WEBP")]:
        Image.new("RGB", (4, 4)).save(tmp_path / name, format=file_format)
    Image.new("RGB", (4, 4)).save(tmp_path / "._a.png", format="PNG")  # macOS resource-fork companion
    (tmp_path / ".DS_Store").write_bytes(b"\0\1\2")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub.png").mkdir()
    (tmp_path / ".ipynb_checkpoints").mkdir()
    assert [Path(p).name for p in list_image_files(tmp_path)] == ["a.png", "b.JPG", "c.webp"]
    dataset = PersonalizedBase(tmp_path, size=4, repeats=2)
    assert dataset.num_images == 3 and len(dataset) == 6
    assert set(IMAGE_EXTENSIONS) >= {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[274] = 6  # stored sideways: rotate 90 degrees clockwise to display
    half_red_image((40, 20)).save(tmp_path / "phone.png", exif=exif)
    seed_all(0)
    upright = to_uint8(PersonalizedBase(tmp_path, size=32, flip_p=0.0)[0]["image"])
    sideways = to_uint8(PersonalizedBase(tmp_path, size=32, flip_p=0.0, exif_transpose=False)[0]["image"])
    # Displayed upright the red half is on top; the reference (no EXIF handling) keeps it on the left.
    assert (upright[:14] == RED).all() and (upright[18:] == BLUE).all()
    assert (sideways[:, :14] == RED).all() and (sideways[:, 18:] == BLUE).all()


def test_alpha_drop_is_the_reference_and_white_composites(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 100, 200)
    rgba[:, :2, 3] = 0  # left half transparent
    rgba[:, 2:, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    dropped = to_uint8(PersonalizedBase(tmp_path, size=None, flip_p=0.0)[0]["image"])
    white = to_uint8(PersonalizedBase(tmp_path, size=None, flip_p=0.0, alpha="white")[0]["image"])
    assert (dropped == (10, 100, 200)).all()
    assert (white[:, :2] == WHITE).all() and (white[:, 2:] == (10, 100, 200)).all()


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535], [128, 1000, 60000, 12345]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode == "I;16"
    image = to_uint8(PersonalizedBase(tmp_path, size=None, flip_p=0.0)[0]["image"])
    expected = np.rint(values / 257.0).astype(np.uint8)  # [[0, 1, 128, 255], [0, 4, 233, 48]]
    assert np.array_equal(image, np.repeat(expected[..., None], 3, axis=2))
    # Pillow opens some 16-bit files as mode "I"; they get the same scaling.
    as_int32 = to_rgb(Image.fromarray(values.astype(np.int32)))
    assert np.array_equal(np.asarray(as_int32)[..., 0], expected)


def test_palette_cmyk_and_float_images_convert(tmp_path):
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=0)
    Image.new("CMYK", (6, 4), (10, 20, 30, 40)).save(tmp_path / "print.jpg")
    Image.new("L", (6, 4), 77).save(tmp_path / "grey.bmp")
    for alpha in ("drop", "white"):
        dataset = PersonalizedBase(tmp_path, size=8, flip_p=0.0, alpha=alpha, set="val")
        images = [to_uint8(dataset[i]["image"]) for i in range(len(dataset))]
        grey, palette_rgb, cmyk = images  # sorted: grey.bmp, palette.png, print.jpg
        assert (grey == 77).all()
        assert (palette_rgb == (0, 255, 0)).all()
        direct = np.asarray(Image.new("CMYK", (1, 1), (10, 20, 30, 40)).convert("RGB"), dtype=int)[0, 0]
        assert cmyk.shape == (8, 8, 3) and np.abs(cmyk.astype(int) - direct).max() <= 3
    floats = to_rgb(Image.fromarray(np.array([[-5.0, 12.4], [12.6, 300.0]], dtype=np.float32)))
    assert np.array_equal(np.asarray(floats)[..., 1], [[0, 12], [13, 255]])


def test_interpolation_names(tmp_path):
    half_red_image((40, 20)).save(tmp_path / "a.png")
    kwargs = {"size": 16, "flip_p": 0.0}
    linear = PersonalizedBase(tmp_path, interpolation="linear", **kwargs)[0]["image"]
    bilinear = PersonalizedBase(tmp_path, interpolation="bilinear", **kwargs)[0]["image"]
    assert np.array_equal(linear, bilinear)
    assert PersonalizedBase(tmp_path, interpolation="lanczos", **kwargs)[0]["image"].shape == (16, 16, 3)
    with pytest.raises(ValueError, match="nearest"):
        PersonalizedBase(tmp_path, interpolation="nearest")


def test_flip_uses_exactly_one_torch_draw(tmp_path):
    half_red_image((8, 8)).save(tmp_path / "a.png")
    plain, flipped = PersonalizedBase(tmp_path, flip_p=0.0), PersonalizedBase(tmp_path, flip_p=1.0)
    assert np.array_equal(flipped[0]["image"], plain[0]["image"][:, ::-1])
    torch.manual_seed(3)
    _ = plain[0]
    after_item = torch.rand(4)
    torch.manual_seed(3)
    torch.rand(1)
    assert torch.equal(after_item, torch.rand(4))


def test_own_rng_leaves_global_generators_alone(tmp_path, monkeypatch):
    save_images(tmp_path, 3)

    def make(seed):
        return PersonalizedBase(tmp_path, size=8, per_image_tokens=True, rng=random.Random(seed))

    seed_all(11)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    def captions(dataset):
        return [dataset[i]["caption"] for i in range(20)]

    first = captions(make(5))
    assert first == captions(make(5)) and first != captions(make(6))
    assert len(set(first)) > 5
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])

    # In a DataLoader worker each copy re-seeds from the worker's seed.
    class Worker:
        def __init__(self, seed):
            self.seed = seed

    worker = Worker(100)
    monkeypatch.setattr(personalized, "get_worker_info", lambda: worker)
    in_worker_a = captions(make(5))
    assert in_worker_a == captions(make(5)) and in_worker_a != first
    worker.seed = 101
    assert in_worker_a != captions(make(5))


def test_inputs_are_not_mutated(tmp_path):
    save_images(tmp_path, 3)
    tokens_before = list(per_img_token_list)
    lists = personalized.imagenet_templates_small, personalized.imagenet_dual_templates_small
    lists_before = [list(templates) for templates in lists]
    dataset = PersonalizedBase(
        tmp_path, size=8, per_image_tokens=True, mixing_prob=1.0, coarse_class_text="toy"
    )
    seed_all(1)
    assert dataset[4]["caption"].endswith(f"toy * with {per_img_token_list[1]}")
    assert per_img_token_list == tokens_before
    assert [list(templates) for templates in lists] == lists_before


# ---------------------------------------------------------------------------------------------------------
# (d) errors


def test_missing_or_non_directory_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="does not exist") as info:
        PersonalizedBase(missing)
    assert str(missing) in str(info.value)
    a_file = tmp_path / "file.png"
    half_red_image().save(a_file)
    with pytest.raises(ValueError, match="not a directory") as info:
        PersonalizedBase(a_file)
    assert str(a_file) in str(info.value)


def test_folder_without_images(tmp_path):
    with pytest.raises(ValueError, match="no image files") as info:
        PersonalizedBase(tmp_path)
    assert str(tmp_path) in str(info.value) and "found: nothing" in str(info.value)
    (tmp_path / "readme.txt").write_text("not an image")
    (tmp_path / "more").mkdir()
    with pytest.raises(ValueError, match="no image files") as info:
        PersonalizedBase(tmp_path)
    assert "more/, readme.txt" in str(info.value)


def test_corrupt_image_names_the_file(tmp_path):
    save_images(tmp_path, 1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="cannot read image") as info:
        PersonalizedBase(tmp_path)
    assert str(broken) in str(info.value)


def test_per_image_tokens_allow_22_images(tmp_path):
    save_images(tmp_path, 22, size=(2, 2))
    dataset = PersonalizedBase(tmp_path, size=2, per_image_tokens=True, mixing_prob=1.0)
    seed_all(0)
    assert dataset[21]["caption"].endswith(f"* with {per_img_token_list[21]}")
    save_images(tmp_path, 23, size=(2, 2))
    with pytest.raises(ValueError, match="23 images") as info:
        PersonalizedBase(tmp_path, per_image_tokens=True)
    assert str(tmp_path) in str(info.value)
    assert len(PersonalizedBase(tmp_path, per_image_tokens=False, set="val")) == 23


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"set": "training"}, "set="),
        ({"alpha": "black"}, "alpha="),
        ({"flip_p": 1.5}, "flip_p"),
        ({"repeats": 0}, "repeats"),
        ({"size": 0}, "size"),
    ],
)
def test_bad_options_raise(tmp_path, kwargs, match):
    save_images(tmp_path, 1)
    with pytest.raises(ValueError, match=match):
        PersonalizedBase(tmp_path, **kwargs)


def test_style_dataset_signature(tmp_path):
    save_images(tmp_path, 2)
    with pytest.raises(TypeError):
        personalized_style.PersonalizedBase(tmp_path, mixing_prob=0.5)
    with pytest.raises(TypeError):
        personalized_style.PersonalizedBase(tmp_path, coarse_class_text="toy")
    dataset = personalized_style.PersonalizedBase(
        tmp_path, size=8, per_image_tokens=True, placeholder_token="@"
    )
    assert dataset.mixing_prob == 0.25 and dataset.placeholder_string == "@"
    seed_all(2)
    captions = {dataset[i]["caption"] for i in range(40)}
    singles = {t.format("@") for t in personalized_style.imagenet_templates_small}
    duals = {t.format("@", per_img_token_list[k]) for t in personalized_style.imagenet_dual_templates_small
             for k in range(2)}
    assert captions <= singles | duals and captions & duals and captions & singles
