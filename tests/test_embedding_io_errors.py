"""Issue 4 acceptance 3-4: every writer round-trips (single and multi-vector), and the sampling script and
the converter fail cleanly on bad embedding input (wrong width, unknown format, missing file, collision)."""

import pytest
import torch
from conftest import fixture_path, load_script, parity_config, parity_weights
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.modules.embedding_formats import (
    FORMATS,
    EmbeddingFormatError,
    EmbeddingSet,
    read_embeddings,
    write_format,
)
from ldm.scripts_common import run_script


@pytest.mark.parametrize("fmt,suffix", [("official", ".pt"), ("safetensors", ".safetensors"),
                                        ("diffusers", ".bin"), ("diffusers", ".safetensors"), ("a1111", ".pt"),
                                        ("a1111", ".safetensors")])
@pytest.mark.parametrize("k", [1, 3])
def test_every_writer_round_trips(tmp_path, fmt, suffix, k):
    vectors = torch.randn(k, 16)
    path = tmp_path / f"concept{suffix}"
    write_format(EmbeddingSet({"*": vectors}, {"*": 265}, {"step": "7"}), path, fmt)
    back = read_embeddings(path)
    (name, got), = back.vectors.items()
    assert torch.equal(got, vectors)
    expected_name = "concept" if (fmt, suffix) == ("a1111", ".safetensors") else "*"
    assert name == expected_name
    if fmt in ("official", "safetensors", "a1111") and suffix == ".pt" or fmt == "safetensors":
        assert back.tokens == {"*": 265}


def test_unknown_writer_format(tmp_path):
    with pytest.raises(EmbeddingFormatError, match="unknown embeddings format .ckpt."):
        write_format(EmbeddingSet({"*": torch.zeros(1, 4)}, {"*": 1}), tmp_path / "x.pt", "ckpt")
    assert set(FORMATS) == {"official", "safetensors", "diffusers", "a1111"}


@pytest.fixture(scope="module")
def sd_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    sd = load_file(str(parity_weights("sd_tiny")))
    torch.save({"state_dict": {k: v for k, v in sd.items() if not k.startswith("embedding_manager.")}},
               tmp / "base.ckpt")
    OmegaConf.save(parity_config("sd_tiny"), tmp / "config.yaml")
    return tmp


def _sample(sd_setup, tmp_path, embedding_paths):
    script = load_script("stable_txt2img")
    argv = ["--prompt", "a photo of *", "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "2", "--H", "64",
            "--W", "64", "--config", str(sd_setup / "config.yaml"), "--ckpt", str(sd_setup / "base.ckpt"),
            "--device", "cpu", "--outdir", str(tmp_path / "out"), "--precision", "full",
            "--tokenizer_path", str(fixture_path("tokenizers", "clip")), "--embedding_path", *map(str, embedding_paths)]
    return run_script("stable_txt2img.py", script.parser(), script.run_laion_aware, argv)


def test_script_samples_with_two_files(sd_setup, tmp_path):
    write_format(EmbeddingSet({"*": torch.randn(1, 16)}, {"*": 265}), tmp_path / "a.pt", "official")
    write_format(EmbeddingSet({"@": torch.randn(2, 16)}, {"@": 287}), tmp_path / "b.safetensors", "safetensors")
    assert _sample(sd_setup, tmp_path, [tmp_path / "a.pt", tmp_path / "b.safetensors"]) == 0
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1


BAD = {
    "wrong width": (lambda p: write_format(EmbeddingSet({"*": torch.randn(1, 768)}, {"*": 265}), p / "w.pt",
                                           "official") or [p / "w.pt"], "width 768"),
    "unknown format": (lambda p: torch.save({"foo": 1}, p / "u.pt") or [p / "u.pt"], "unknown embeddings layout"),
    "missing file": (lambda p: [p / "missing.pt"], "missing.pt"),
    "collision": (lambda p: [write_format(EmbeddingSet({"*": torch.randn(1, 16)}, {"*": 265}), p / f"{n}.pt",
                                          "official") or p / f"{n}.pt" for n in ("x", "y")], "already used"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_script_bad_embedding_input(sd_setup, tmp_path, capsys, case):
    make, expected = BAD[case]
    paths = make(tmp_path)
    assert _sample(sd_setup, tmp_path, paths) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stable_txt2img.py: error:") and expected in err[0], err
    assert not (tmp_path / "out" / "samples").exists() or not list((tmp_path / "out" / "samples").iterdir())


def test_converter_round_trip_and_errors(tmp_path, capsys):
    conv = load_script("convert_embeddings")
    write_format(EmbeddingSet({"<cat>": torch.randn(2, 16)}, {}), tmp_path / "learned_embeds.bin", "diffusers")
    argv = [str(tmp_path / "learned_embeds.bin"), str(tmp_path / "star.pt"), "--to", "official",
            "--placeholder", "*", "-sd", "--tokenizer_path", str(fixture_path("tokenizers", "clip"))]
    assert run_script("convert_embeddings.py", conv.parser(), conv.convert, argv) == 0
    out = read_embeddings(tmp_path / "star.pt")
    assert out.tokens == {"*": 265} and out.vectors["*"].shape == (2, 16)
    torch.save({"foo": 1}, tmp_path / "bad.pt")
    argv = [str(tmp_path / "bad.pt"), str(tmp_path / "o.safetensors"), "--to", "safetensors"]
    assert run_script("convert_embeddings.py", conv.parser(), conv.convert, argv) == 1
    assert "unknown embeddings layout" in capsys.readouterr().err
