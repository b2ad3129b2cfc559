"""model.params.release_first_stage: the autoencoder out of memory while textual inversion trains, with the
same numbers as without it (tiny LDM config and checkpoint of tests/conftest.py `tiny`)."""

import csv
import gc
from pathlib import Path

import pytest
import torch
from conftest import parity_config
from torch.multiprocessing.reductions import StorageWeakRef

import ldm.models.diffusion.first_stage_release as release_module
from ldm.data.personalized import PersonalizedBase
from ldm.loading import load_model
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.first_stage_release import PARTS, ReleasedError, distinct_images
from ldm.models.diffusion.latent_cache import LatentCache
from ldm.modules.embedding_formats import read_embeddings
from ldm.training import train
from ldm.util import images_from_batch, instantiate_from_config

SEED = 3  # its first epoch has a batch with one image cached and one not (the case the cache encodes whole)
FAST = [
    "data.params.batch_size=2",
    "data.params.train.params.repeats=4",  # 12 items -> 6 steps per epoch
    "lightning.trainer.num_sanity_val_steps=0",
    "lightning.trainer.log_every_n_steps=1",
    "lightning.modelcheckpoint.params.every_n_train_steps=6",
    "lightning.callbacks.image_logger.target=main.ImageLogger",
    "lightning.callbacks.image_logger.params.batch_frequency=6",
    "lightning.callbacks.image_logger.params.max_images=2",
    "lightning.callbacks.image_logger.params.increase_log_steps=False",
    "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
]
RELEASE = "model.params.release_first_stage=true"


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(tiny, **params):
    _, ckpt, _, _ = tiny
    cfg = parity_config("ldm_tiny")
    cfg.model.params.update({"ckpt_path": str(ckpt), **params})
    return instantiate_from_config(cfg.model)


def dataset_images(tiny, flip_p=0.5):
    """The tiny data folder's images as batches of the training loader give them, [N, C, H, W]."""
    arrays = PersonalizedBase(tiny[3], size=64, flip_p=flip_p).distinct_images()
    return arrays, images_from_batch({"image": torch.stack([torch.as_tensor(a) for a in arrays])}, "image")


# -- the cache is exact ---------------------------------------------------------------------------------


def test_batch_composition_does_not_change_moments(tiny):
    """At a given batch size an image's moments do not depend on the other images of the batch nor on its
    position: what the prefill at train start relies on (the batch size itself may change the last bits)."""
    model = build(tiny)
    _, x = dataset_images(tiny)
    encode = model.first_stage_moments
    with torch.no_grad():
        for size in (2, 3, 4):
            alone = encode(x[[0] * size])[0]
            for others in ([1, 2, 3], [5, 4, 3], [2, 2, 2]):
                for pos in range(size):
                    batch = others[: size - 1]
                    batch = batch[:pos] + [0] + batch[pos:]
                    assert torch.equal(encode(x[batch])[pos], alone), (size, batch)


def test_cache_encodes_a_partly_cached_batch_whole(tiny):
    """A batch with one image cached and one not gives bitwise the uncached batch's moments."""
    model = build(tiny)
    _, x = dataset_images(tiny)
    cache, encode = LatentCache(), model.first_stage_moments
    with torch.no_grad():
        cache.moments(x[[0, 1]], encode)
        got = cache.moments(x[[2, 0]], encode)
        assert torch.equal(got, encode(x[[2, 0]]))
        assert torch.equal(cache.moments(x[[1, 2]], encode), encode(x[[1, 2]]))


def test_cache_images_equals_what_training_batches_compute(tiny):
    model = build(tiny)
    arrays, x = dataset_images(tiny)
    assert len(arrays) == 6  # 3 images, each unflipped and flipped
    assert model.cache_images(arrays, batch_size=4) == 6 and model.cache_images(arrays, batch_size=4) == 0
    with torch.no_grad():
        for batch in ([0, 1, 2, 3], [5, 4, 3, 2], [1, 1, 0, 5]):
            uncached = model.first_stage_moments(x[batch])
            cached = torch.stack([model.latent_cache._store[LatentCache.key(x[i])] for i in batch])
            assert torch.equal(cached, uncached), batch


def test_distinct_images_follow_flip_p(tiny):
    images = tiny[3]
    assert len(PersonalizedBase(images, size=64, flip_p=0.0).distinct_images()) == 3
    assert len(PersonalizedBase(images, size=64, flip_p=1.0).distinct_images()) == 3
    ds = PersonalizedBase(images, size=64, flip_p=0.5)
    listed = {a.tobytes() for a in ds.distinct_images()}
    torch.manual_seed(0)
    assert {ds[i]["image"].tobytes() for i in range(40)} == listed
    with pytest.raises(ValueError, match="release_first_stage.*distinct_images"):
        distinct_images(torch.utils.data.TensorDataset(torch.zeros(2, 3)))


# -- freeing and reading back ---------------------------------------------------------------------------


@pytest.mark.parametrize("frozen_weights", ["fp32", "bf16"])
def test_free_returns_the_memory_and_restore_is_bitwise(tiny, frozen_weights):
    model = build(tiny, release_first_stage=True, frozen_weights=frozen_weights)
    fs = model.first_stage_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = model.decode_first_stage(z)  # also sizes frozen_weights' upcast scratch
    sizes = {part: sum(n_params(getattr(fs, name)) for name in names) for part, names in PARTS.items()}
    total = n_params(fs)
    assert sizes["encoder"] + sizes["decoder"] == total  # the loss is an Identity
    storages = [StorageWeakRef(p.untyped_storage()) for p in fs.parameters()]
    scratch = [getattr(getattr(m, "upcast_buffer", None), "_data", None) for m in fs.modules()]  # 16-bit
    scratch = [StorageWeakRef(t.untyped_storage()) for t in scratch if t is not None]
    model.first_stage_release.free(fs, "encoder")
    assert n_params(fs) == total - sizes["encoder"]
    model.first_stage_release.free(fs, "decoder")
    del z
    gc.collect()
    assert n_params(fs) == 0 and all(s.expired() for s in storages + scratch)  # no reference kept anywhere
    assert not any(k.startswith("first_stage_model.") for k in model.state_dict())
    with pytest.raises(ReleasedError, match="release_first_stage"):
        model.decode_first_stage(torch.zeros(1, 4, 8, 8))
    model.restore_first_stage()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) and after[k].dtype == v.dtype
                                               for k, v in before.items())
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.decode_first_stage(z), image)


def test_cache_miss_after_release_is_an_error(tiny):
    model = build(tiny, release_first_stage=True)
    arrays, x = dataset_images(tiny, flip_p=0.0)  # unflipped only
    model.cache_images(arrays, batch_size=2)
    expected = model.encode_first_stage(x[[2, 0]]).parameters
    model.first_stage_release.free(model.first_stage_model, "encoder", "decoder")
    assert torch.equal(model.encode_first_stage(x[[2, 0]]).parameters, expected)  # cached: fine
    with pytest.raises(ReleasedError, match="release_first_stage.*not among them"):
        model.encode_first_stage(torch.flip(x[[0]], dims=[3]))


def test_full_checkpoint_gets_the_freed_weights(tiny):
    """unfreeze_model saves the whole state dict: the freed weights are read back into it, never left out."""
    _, _, base, _ = tiny
    model = build(tiny, release_first_stage=True, unfreeze_model=True)
    keys = list(model.state_dict())
    model.first_stage_release.free(model.first_stage_model, "encoder", "decoder")
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    sd = checkpoint["state_dict"]
    assert sorted(sd) == sorted(keys)
    assert all(torch.equal(sd[k], base[k]) for k in base if k.startswith("first_stage_model."))
    assert n_params(model.first_stage_model) == 0  # freed again after the save
    model.on_load_checkpoint(checkpoint)  # loading needs the whole model: it is read back first
    model.load_state_dict(sd)


def test_option_needs_cache_and_checkpoint_and_leaves_sampling_alone(tiny):
    config, ckpt, _, _ = tiny
    with pytest.raises(ValueError, match="cache_first_stage"):
        build(tiny, release_first_stage=True, cache_first_stage=False)
    with pytest.raises(ValueError, match="ckpt_path"):
        build(tiny, release_first_stage=True, ckpt_path=None)
    model = load_model(parity_config("ldm_tiny"), ckpt, release_first_stage=True)  # a model option
    assert model.first_stage_release is not None and not model.first_stage_release.freed
    assert model.decode_first_stage(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 64, 64)


# -- training -------------------------------------------------------------------------------------------


def run(tiny, logdir, steps, *extra):
    config, ckpt, _, images = tiny
    return train(str(config), actual_resume=str(ckpt), data_root=str(images), name="run", logdir=str(logdir),
                 seed=SEED, trainer={"max_steps": steps}, no_test=True, overrides=[*FAST, *extra])


def recording(original, record, kind, count):
    """`original` (a method), recording `count(self)` under `kind` at each call."""

    def wrapper(self, *args, **kwargs):
        record(kind, count(self))
        return original(self, *args, **kwargs)

    return wrapper


class ReadRecorder(dict):
    """A checkpoint's tensors that report every key read."""

    def __init__(self, tensors, report):
        super().__init__(tensors)
        self.report = report

    def __getitem__(self, key):
        self.report(key)
        return super().__getitem__(key)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """12 steps (two epochs) without and with the option, the latter also stopped at 4 (mid-epoch) and
    resumed, and 2 steps with the option and previews off; `seen[run]` records the first stage's parameter
    count at every training step ("step") and every decode ("decode"), previews drawn and checkpoints read."""
    root = tmp_path_factory.mktemp("release")
    seen, current = {}, [None]

    def record(kind, value):
        seen.setdefault(current[0], {}).setdefault(kind, []).append(value)

    with pytest.MonkeyPatch.context() as mp:
        for name, kind in (("on_train_batch_start", "step"), ("differentiable_decode_first_stage", "decode"),
                           ("log_images", "preview")):
            count = (lambda self: 1) if kind == "preview" else (lambda self: n_params(self.first_stage_model))
            mp.setattr(LatentDiffusion, name, recording(getattr(LatentDiffusion, name), record, kind, count))
        opened = release_module.open_checkpoint

        def open_recorded(path):
            ckpt = opened(path)
            record("read", str(path))
            ckpt.tensors = ReadRecorder(ckpt.tensors, lambda key: record("read_key", key))
            return ckpt

        mp.setattr(release_module, "open_checkpoint", open_recorded)
        out = {}
        quiet = (RELEASE, "lightning.callbacks.image_logger.params.disabled=true")
        for key, steps, extra in (("off", 12, ()), ("on", 12, (RELEASE,)), ("first", 4, (RELEASE,)),
                                  ("quiet", 2, quiet)):
            current[0] = key
            out[key] = run(tiny, root / key, steps, *extra)
        current[0] = "resumed"
        out["resumed"] = train((), resume=str(out["first"].logdir), seed=SEED, trainer={"max_steps": 12},
                               no_test=True, overrides=FAST)
    return out, seen


def losses(run) -> list[str]:
    with open(run.logdir / "csv" / "version_0" / "metrics.csv") as f:
        return [r["train/loss_step"] for r in csv.DictReader(f) if r.get("train/loss_step")]


def previews(run) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((Path(run.logdir) / "images").rglob("*.jpg"))}


def test_training_with_release_equals_training_without(runs):
    out, _ = runs
    off, on = out["off"], out["on"]
    assert off.global_step == on.global_step == 12
    for step in (6, 12):
        a, b = (read_embeddings(r.snapshots[step]).vectors["*"] for r in (off, on))
        assert torch.equal(a, b), step
    assert losses(off) == losses(on) and len(losses(on)) == 12
    # 5 panels at steps 6 and 12, of the training batch and of both validation batches
    assert len(previews(on)) == 30 and previews(on) == previews(off)


def test_autoencoder_is_out_of_memory_during_steps(runs):
    out, seen = runs
    full = n_params(out["off"].model.first_stage_model)
    decoder = sum(n_params(getattr(out["off"].model.first_stage_model, n)) for n in PARTS["decoder"])
    assert seen["off"]["step"] == [full] * 12
    assert seen["on"]["step"] == [0] * 12  # encoder and decoder freed from the first step on
    assert seen["on"]["decode"] and set(seen["on"]["decode"]) == {decoder}  # previews hold the decoder only
    assert len(seen["on"]["read"]) == len(seen["on"]["preview"]) == 6  # one checkpoint read per preview
    assert set(seen["on"]["read"]) == {str(out["on"].model.first_stage_release.ckpt_path)}
    # the mapped checkpoint is read for the decoder's tensors only, not loaded whole
    wanted = {f"first_stage_model.{name}.{key}" for name in PARTS["decoder"]
              for key in getattr(out["off"].model.first_stage_model, name).state_dict()}
    assert set(seen["on"]["read_key"]) == wanted
    assert n_params(out["on"].model.first_stage_model) == 0
    assert "read" not in seen["quiet"] and "decode" not in seen["quiet"]  # previews off: never read back
    assert seen["quiet"]["step"] == [0] * 2


def test_resume_with_release_continues_exactly(runs):
    out, seen = runs
    resumed = out["resumed"]
    assert resumed.global_step == 12 and resumed.model.first_stage_release is not None
    assert seen["resumed"]["step"] == [0] * 8
    assert torch.equal(read_embeddings(resumed.embeddings).vectors["*"],
                       read_embeddings(out["on"].embeddings).vectors["*"])
    saved = torch.load(out["first"].last_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert saved and all(k.startswith("embedding_manager.") for k in saved)  # slim: no first-stage tensor
