"""scripts/export_weights.py: a checkpoint's weights (optionally a prefix, optionally float16) as safetensors."""


import torch
from conftest import load_script
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.scripts_common import run_script


def test_export_prefix_half_and_metadata(tmp_path, capsys):
    mod = load_script("export_weights")
    sd = {"model.a.weight": torch.randn(3, 2), "model.steps": torch.tensor([7]), "other.b": torch.ones(1)}
    torch.save({"state_dict": sd, "global_step": 123}, tmp_path / "last.ckpt")
    argv = [str(tmp_path / "last.ckpt"), str(tmp_path / "w.safetensors"), "--prefix", "model.", "--strip", "--half",
            "--note", "recipe"]
    assert run_script("export_weights.py", mod.parser(), mod.export, argv) == 0
    out = load_file(str(tmp_path / "w.safetensors"))
    assert set(out) == {"a.weight", "steps"}
    assert out["a.weight"].dtype == torch.float16 and torch.equal(out["a.weight"], sd["model.a.weight"].half())
    assert out["steps"].dtype == torch.int64
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["global_step"] == "123" and meta["note"] == "recipe" and meta["dtype"] == "float16"
    argv = [str(tmp_path / "last.ckpt"), str(tmp_path / "x.safetensors"), "--prefix", "nope."]
    assert run_script("export_weights.py", mod.parser(), mod.export, argv) == 1
    assert "no key starts with 'nope.'" in capsys.readouterr().err


def test_pad_rows_grows_a_table_and_keeps_the_old_rows(tmp_path, capsys):
    mod = load_script("export_weights")
    table = torch.randn(3, 4)
    torch.save({"state_dict": {"emb.weight": table, "x": torch.ones(2)}}, tmp_path / "last.ckpt")
    argv = [str(tmp_path / "last.ckpt"), str(tmp_path / "w.safetensors"), "--pad_rows", "emb.weight=5"]
    assert run_script("export_weights.py", mod.parser(), mod.export, argv) == 0
    out = load_file(str(tmp_path / "w.safetensors"))
    assert out["emb.weight"].shape == (5, 4) and torch.equal(out["emb.weight"][:3], table)
    assert not out["emb.weight"][3:].any() and torch.equal(out["x"], torch.ones(2))
    for spec, message in (("emb.weight=2", "integer >= the 3 rows"), ("nope=9", "no tensor 'nope'")):
        argv = [str(tmp_path / "last.ckpt"), str(tmp_path / "y.safetensors"), "--pad_rows", spec]
        assert run_script("export_weights.py", mod.parser(), mod.export, argv) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "y.safetensors").exists()
