"""Issue 15.1: training writes a `.safetensors` twin (same vectors plus run metadata) beside every embedding
`.pt`; the twin loads here (scripts, converter), in diffusers and without its metadata."""

import hashlib
import json

import pytest
import torch
from conftest import build_parity_model, load_script
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_embedding_io_errors import _sample, sd_setup  # noqa: F401  (the module fixture)
from test_main import args, train

from ldm.checkpoint import read_file
from ldm.models.diffusion import textual_inversion
from ldm.modules.embedding_formats import EmbeddingSet, read_embeddings, write_format
from ldm.scripts_common import run_script

EMA = ["lightning.callbacks.embedding_ema.target=ldm.embedding_ema.EmbeddingEMA",
       "lightning.callbacks.embedding_ema.params.decay=0.5"]


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """A 20-step run (seed 7) saving every 10 steps, with the EMA files; counts the base checkpoint hashes."""
    calls = []
    real = textual_inversion.file_sha256
    textual_inversion.file_sha256 = lambda path, *a: calls.append(str(path)) or real(path, *a)
    try:
        result = train(args(tiny, tmp_path_factory.mktemp("share") / "logs", "--seed", "7", *EMA, steps=20))
    finally:
        textual_inversion.file_sha256 = real
    return result, calls


def _metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


STEMS = ["embeddings", "embeddings_gs-10", "embeddings_gs-20", "embeddings_ema", "embeddings_ema_gs-10",
         "embeddings_ema_gs-20"]


@pytest.mark.parametrize("stem", STEMS)
def test_every_pt_has_a_bitwise_equal_safetensors_twin(run, stem):
    ckpt = run[0].ckptdir
    official = read_file(ckpt / f"{stem}.pt")  # the official .pt, unchanged
    assert set(official) == {"string_to_token", "string_to_param"}
    assert isinstance(official["string_to_param"], torch.nn.ParameterDict)
    raw = load_file(str(ckpt / f"{stem}.safetensors"))
    assert list(raw) == ["string_to_param.*"]
    assert raw["string_to_param.*"].dtype == torch.float32
    assert torch.equal(raw["string_to_param.*"], official["string_to_param"]["*"].detach())
    twin = read_embeddings(ckpt / f"{stem}.safetensors")
    assert twin.source == "safetensors"
    assert twin.tokens == {"*": int(official["string_to_token"]["*"])}


def test_twin_metadata_names_the_run(run, tiny):
    result, _ = run
    _, base_ckpt, _, _ = tiny
    sha = hashlib.sha256(base_ckpt.read_bytes()).hexdigest()
    for step in (10, 20):
        meta = _metadata(result.ckptdir / f"embeddings_gs-{step}.safetensors")
        assert meta["format"] == "textual_inversion"
        assert json.loads(meta["placeholders"]) == ["*"]
        assert json.loads(meta["string_to_token"]) == {"*": 1008}
        assert json.loads(meta["num_vectors"]) == {"*": 1}
        assert meta["step"] == str(step) and meta["seed"] == "7"
        assert meta["base_checkpoint"] == "base.ckpt" and meta["base_checkpoint_sha256"] == sha
        assert meta["text_encoder_width"] == meta["token_dim"] == "16"
        config = OmegaConf.create(meta["config"])
        assert config.model.params.ckpt_path == str(base_ckpt)
        assert config.model.params.personalization_config.params.placeholder_strings == ["*"]
        assert "ema_decay" not in meta
    latest = _metadata(result.ckptdir / "embeddings.safetensors")
    assert latest["step"] == "20"
    ema = _metadata(result.ckptdir / "embeddings_ema_gs-20.safetensors")
    assert ema["ema_decay"] == "0.5" and ema["base_checkpoint_sha256"] == sha and ema["step"] == "20"


def test_base_checkpoint_is_hashed_once_per_run(run, tiny):
    _, calls = run
    assert calls == [str(tiny[1])]


def test_run_snapshots_still_list_the_pt_files(run):
    result, _ = run
    assert result.embeddings == result.ckptdir / "embeddings.pt"
    assert sorted(result.snapshots) == [10, 20] and all(p.suffix == ".pt" for p in result.snapshots.values())


def test_run_metadata_without_config_or_checkpoint(tmp_path, monkeypatch):
    class Manager(torch.nn.Module):
        token_dim = 8

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert textual_inversion.run_metadata(Manager(), tmp_path / "checkpoints", 3) == {
        "step": "3", "text_encoder_width": "8"}
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "2020-01-01T00-00-00-project.yaml").write_text("model: {params: {ckpt_path: gone.ckpt}}")
    (configs / "2021-01-01T00-00-00-project.yaml").write_text("model: {params: {ckpt_path: gone/base.ckpt}}")
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    meta = textual_inversion.run_metadata(Manager(), tmp_path / "checkpoints", 3)
    assert meta["seed"] == "5" and meta["base_checkpoint"] == "base.ckpt"  # the newest config (a resume)
    assert "base_checkpoint_sha256" not in meta and "gone/base.ckpt" in meta["config"]


def test_sha256_cache_follows_the_file(tmp_path):
    manager = torch.nn.Module()
    path = tmp_path / "w.bin"
    path.write_bytes(b"one")
    assert textual_inversion.cached_sha256(manager, path) == hashlib.sha256(b"one").hexdigest()
    path.write_bytes(b"other")  # a new size: hashed again
    assert textual_inversion.cached_sha256(manager, path) == hashlib.sha256(b"other").hexdigest()
    assert textual_inversion.cached_sha256(manager, tmp_path / "absent") is None
    assert "_file_sha256_cache" not in dict(manager.named_buffers()) and not list(manager.state_dict())


# ---------------------------------------------------------------------------------------------------
# Readers: without metadata, the converter, the sampling script, diffusers
# ---------------------------------------------------------------------------------------------------


def test_twin_without_metadata_still_loads(run, tmp_path):
    src = run[0].ckptdir / "embeddings.safetensors"
    stripped = tmp_path / "stripped.safetensors"
    save_file(load_file(str(src)), str(stripped))  # no metadata at all
    emb = read_embeddings(stripped)
    assert list(emb.vectors) == ["*"] and emb.tokens == {} and emb.source == "safetensors"
    assert torch.equal(emb.vectors["*"], read_embeddings(src).vectors["*"])
    model = run[0].model
    before = model.embedding_manager.string_to_token_dict["*"].clone()
    model.embedding_manager.load(stripped)  # token id from the tokenizer
    assert torch.equal(model.embedding_manager.string_to_token_dict["*"], before)


def test_older_reader_ignores_the_new_fields(run):
    """The reader as it was before the run metadata: only format/placeholders/string_to_token are used."""
    path = run[0].ckptdir / "embeddings.safetensors"
    meta = _metadata(path)
    tensors = load_file(str(path))
    placeholders = json.loads(meta["placeholders"])
    assert {p: tensors["string_to_param." + p] for p in placeholders}.keys() == {"*"}
    assert all(isinstance(v, str) for v in meta.values())


@pytest.mark.parametrize("fmt,suffix", [("official", ".pt"), ("a1111", ".pt"), ("a1111", ".safetensors"),
                                        ("diffusers", ".bin"), ("safetensors", ".safetensors")])
def test_converter_reads_the_twin(run, tmp_path, fmt, suffix):
    conv = load_script("convert_embeddings")
    src = run[0].ckptdir / "embeddings_gs-20.safetensors"
    out = tmp_path / f"concept{suffix}"
    argv = [str(src), str(out), "--to", fmt]
    assert run_script("convert_embeddings.py", conv.parser(), conv.convert, argv) == 0
    back = read_embeddings(out)
    assert torch.equal(next(iter(back.vectors.values())), read_embeddings(src).vectors["*"])
    if fmt == "a1111" and suffix == ".pt":
        assert read_file(out)["step"] == 20  # the step travels into A1111's file
    if fmt == "safetensors":
        assert _metadata(out)["base_checkpoint_sha256"] == _metadata(src)["base_checkpoint_sha256"]


def test_sampling_script_reads_a_safetensors_with_training_metadata(sd_setup, tmp_path):  # noqa: F811
    emb = EmbeddingSet({"*": torch.randn(1, 16)}, {"*": 265},
                       {"step": "4", "seed": "7", "config": "model: {}\n", "base_checkpoint": "base.ckpt",
                        "base_checkpoint_sha256": "0" * 64, "text_encoder_width": "16"})
    write_format(emb, tmp_path / "embeddings.safetensors", "safetensors")
    assert _sample(sd_setup, tmp_path, [tmp_path / "embeddings.safetensors"]) == 0
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1


def test_txt2img_loads_the_twin_of_a_training_run(run, tmp_path):
    """The LDM sampling script on the run's own config and base checkpoint, with the new file."""
    result, _ = run
    txt2img = load_script("txt2img")
    config = next((result.logdir / "configs").glob("*-project.yaml"))
    base = OmegaConf.load(config).model.params.ckpt_path
    argv = ["--prompt", "a photo of *", "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "2", "--H", "64",
            "--W", "64", "--config", str(config), "--ckpt_path", str(base), "--device", "cpu",
            "--outdir", str(tmp_path / "out"), "--seed", "1",
            "--embedding_path", str(result.ckptdir / "embeddings.safetensors")]
    assert txt2img.main(argv) == 0
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return build_parity_model("sd_tiny", tmp_path_factory.mktemp("sd"), num_vectors=2)


@pytest.mark.parametrize("k", [1, 2])
def test_diffusers_loads_our_safetensors(ours, tmp_path, k):
    """diffusers' load_textual_inversion reads the training twin (one placeholder: one tensor) directly."""
    pytest.importorskip("diffusers", reason="diffusers is a test dependency (requirements-lock.txt)")
    from test_interop import diffusers_embeds, tiny_pipeline

    torch.manual_seed(10 + k)
    vectors = torch.randn(k, 16)
    with torch.no_grad():
        ours.embedding_manager.string_to_param_dict["*"].data = vectors.clone()
        expected = ours.get_learned_conditioning(["a photo of * on the beach"])
    path = tmp_path / "embeddings.safetensors"
    textual_inversion.save_embedding_files(ours.embedding_manager, str(tmp_path), 0)  # as training does
    assert _metadata(path)["format"] == "textual_inversion"
    pipe = tiny_pipeline(ours.cond_stage_model.transformer.text_model)
    pipe.load_textual_inversion(str(path), token="<my-concept>")
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer.convert_tokens_to_ids(["<my-concept>"] + [f"<my-concept>_{i}" for i in range(1, k)])
    assert torch.equal(encoder.get_input_embeddings().weight[ids].detach(), vectors)
    got = diffusers_embeds(pipe, "a photo of <my-concept> on the beach")
    assert (got - expected).abs().max().item() <= 1e-5
