"""Command-line rules of main.py (docs/DIFFERENCES.md#training-command-line) and the resumable data order
(ldm/data/resumable.py)."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.cli import (
    RUN_TIMESTAMP_ENV,
    UsageError,
    apply_overrides,
    count_devices,
    learning_rate,
    merge_configs,
    parse_args,
    parse_gpus,
    run_dirs,
    timestamp,
    trainer_flags,
    trainer_settings,
)
from ldm.data.resumable import KeyedDataset, ResumableDataLoader, ResumableSampler

REPO = Path(__file__).resolve().parents[1]
SD_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-finetune.yaml"
LDM_STYLE_CONFIG = REPO / "configs" / "latent-diffusion" / "txt2img-1p4B-finetune_style.yaml"
NO_TI_CONFIG = REPO / "configs" / "latent-diffusion" / "txt2img-1p4B-eval.yaml"
NOW = "2022-08-22T10-00-00"
STAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d$")


def opts(*argv: str):
    opt, unknown = parse_args(list(argv))
    assert unknown == []
    return opt


def flags(*argv: str) -> dict:
    return trainer_flags(opts(*argv))


# ---------------------------------------------------------------------------------------------------
# --gpus and trainer settings (docs/DIFFERENCES.md#gpus-parsing)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("0,", [0]), ("0,1", [0, 1]), (",1,", [1]), ("1,2,", [1, 2]),
                                                 ("2", 2), (1, 1), (" 3 ", 3)])
def test_parse_gpus(value, expected):
    assert parse_gpus(value) == expected


@pytest.mark.parametrize("value", ["x", "0,x", "", "1.5"])
def test_parse_gpus_rejects(value):
    with pytest.raises(UsageError, match="--gpus"):
        parse_gpus(value)


def test_trainer_settings_gpu_index():
    cfg = trainer_settings({}, flags("--gpus", "0,"))
    assert cfg["accelerator"] == "gpu"
    assert cfg["devices"] == [0]
    assert "gpus" not in cfg
    assert "strategy" not in cfg
    assert count_devices(cfg) == 1


def test_trainer_settings_two_gpus_use_ddp():
    cfg = trainer_settings({}, flags("--gpus", "0,1"))
    assert cfg["devices"] == [0, 1] and cfg["accelerator"] == "gpu" and cfg["strategy"] == "ddp"
    assert count_devices(cfg) == 2
    cfg = trainer_settings({"devices": 2, "accelerator": "gpu"}, {})
    assert cfg["strategy"] == "ddp" and count_devices(cfg) == 2
    cfg = trainer_settings({"gpus": 2}, flags())  # an int count in YAML
    assert cfg == {"accelerator": "gpu", "devices": 2, "strategy": "ddp"}


def test_trainer_settings_gpu_count_string():
    cfg = trainer_settings({}, flags("--gpus", "1"))
    assert cfg["devices"] == 1 and cfg["accelerator"] == "gpu" and "strategy" not in cfg


def test_trainer_settings_cpu_default_keeps_yaml():
    assert trainer_settings({}, flags()) == {"accelerator": "cpu"}
    cfg = trainer_settings({"benchmark": True, "max_steps": 6100}, {})
    assert cfg == {"benchmark": True, "max_steps": 6100, "accelerator": "cpu"}
    assert count_devices(cfg) == 1


def test_trainer_settings_cli_overrides_yaml():
    yaml = {"max_steps": 6100, "accumulate_grad_batches": 2, "gpus": "0,", "strategy": "ddp_spawn"}
    cfg = trainer_settings(yaml, flags("--max_steps", "10", "--gpus", "1,2", "--precision", "16-mixed"))
    assert cfg["max_steps"] == 10
    assert cfg["accumulate_grad_batches"] == 2
    assert cfg["devices"] == [1, 2]
    assert cfg["precision"] == "16-mixed"
    assert cfg["strategy"] == "ddp_spawn"  # an explicit strategy is kept
    assert yaml["max_steps"] == 6100  # the YAML dict is not modified


def test_trainer_settings_devices_string():
    assert trainer_settings({"devices": "0,1"}, {})["devices"] == [0, 1]
    assert trainer_settings({"devices": "auto"}, flags())["devices"] == "auto"
    assert trainer_settings({}, flags("--devices", "2"))["devices"] == 2


@pytest.mark.parametrize(("cfg", "n"), [({}, 1), ({"devices": None}, 1), ({"devices": "auto"}, 1),
                                        ({"devices": [0]}, 1), ({"devices": [0, 1]}, 2),
                                        ({"devices": (2, 3, 4)}, 3),
                                        ({"devices": "0,1,"}, 2), ({"devices": 3}, 3), ({"devices": "3"}, 3)])
def test_count_devices(cfg, n):
    assert count_devices(cfg) == n


# ---------------------------------------------------------------------------------------------------
# Learning-rate scaling (the reference's rule)
# ---------------------------------------------------------------------------------------------------


def test_learning_rate_ldm_one_gpu():
    lr, msg = learning_rate(5.0e-03, 4, 1, 1, True)
    assert lr == pytest.approx(0.02)
    assert msg == ("Setting learning rate to 2.00e-02 = 1 (accumulate_grad_batches) * 1 (num_gpus) "
                   "* 4 (batchsize) * 5.00e-03 (base_lr)")


def test_learning_rate_sd_and_two_gpus():
    assert learning_rate(5.0e-03, 2, 1, 1, True)[0] == pytest.approx(0.01)
    lr, msg = learning_rate(5.0e-03, 4, 2, 1, True)
    assert lr == pytest.approx(0.04)
    assert msg.startswith("Setting learning rate to 4.00e-02 = 1 (accumulate_grad_batches) * 2 (num_gpus)")
    lr, msg = learning_rate(5.0e-03, 2, 1, 3, True)
    assert lr == pytest.approx(0.03)
    assert "= 3 (accumulate_grad_batches) * 1 (num_gpus) * 2 (batchsize)" in msg


def test_learning_rate_without_scaling():
    lr, msg = learning_rate(5.0e-03, 4, 2, 2, False)
    assert lr == 5.0e-03
    assert msg == "++++ NOT USING LR SCALING ++++"


# ---------------------------------------------------------------------------------------------------
# Log directories and resume (the reference's naming and layout)
# ---------------------------------------------------------------------------------------------------


def test_run_dirs_new_run_with_name_and_postfix(tmp_path):
    opt = opts("--base", str(SD_CONFIG), "--data_root", "/data/cat_statue/", "-n", "mycat", "-f", "_v2",
               "-l", str(tmp_path))
    dirs = run_dirs(opt, now=NOW)
    assert dirs.nowname == f"cat_statue{NOW}_mycat_v2"
    assert dirs.logdir == os.path.join(str(tmp_path), dirs.nowname)
    assert dirs.ckptdir == os.path.join(dirs.logdir, "checkpoints")
    assert dirs.cfgdir == os.path.join(dirs.logdir, "configs")
    assert dirs.now == f"cat_statue{NOW}"  # what SetupCallback uses in config file names
    assert dirs.resume_ckpt is None and dirs.resume_configs == []


def test_run_dirs_name_from_config_stem():
    opt = opts("--base", str(SD_CONFIG), str(LDM_STYLE_CONFIG), "--data_root", "imgs/dog")
    assert run_dirs(opt, now=NOW).nowname == f"dog{NOW}_v1-finetune"
    assert run_dirs(opts("--data_root", "imgs/dog"), now=NOW).nowname == f"dog{NOW}"


def test_run_dirs_without_datadir_prefix():
    opt = opts("--base", str(SD_CONFIG), "--data_root", "/data/cat_statue", "--datadir_in_name", "False")
    dirs = run_dirs(opt, now=NOW)
    assert dirs.nowname == f"{NOW}_v1-finetune"
    assert dirs.logdir == os.path.join("logs", f"{NOW}_v1-finetune")


def test_run_dirs_takes_the_run_timestamp(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(RUN_TIMESTAMP_ENV, "2001-02-03T04-05-06")
    assert run_dirs(opts("-n", "x")).nowname == "2001-02-03T04-05-06_x"


def test_run_dirs_name_and_resume_conflict(tmp_path):
    with pytest.raises(UsageError, match="cannot be specified both"):
        run_dirs(opts("-n", "x", "-r", str(tmp_path)), now=NOW)


def _make_run(tmp_path) -> Path:
    logdir = tmp_path / "logs" / f"cat{NOW}_v1-finetune"
    (logdir / "checkpoints").mkdir(parents=True)
    (logdir / "configs").mkdir()
    for name in ("last.ckpt", "epoch=000003.ckpt"):
        (logdir / "checkpoints" / name).write_bytes(b"x")
    for name in (f"{NOW}-project.yaml", f"{NOW}-lightning.yaml", "notes.txt"):
        (logdir / "configs" / name).write_text("a: 1\n")
    return logdir


@pytest.mark.parametrize("trailing_slash", [False, True])
def test_resume_from_log_dir(tmp_path, trailing_slash):
    logdir = _make_run(tmp_path)
    opt = opts("-r", str(logdir) + ("/" if trailing_slash else ""), "--data_root", "/data/other")
    dirs = run_dirs(opt, now=NOW)
    assert dirs.logdir == str(logdir)
    assert dirs.nowname == logdir.name  # no data-dir prefix, no new timestamp
    assert dirs.resume_ckpt == str(logdir / "checkpoints" / "last.ckpt")
    assert dirs.ckptdir == str(logdir / "checkpoints")
    assert dirs.cfgdir == str(logdir / "configs")
    assert dirs.resume_configs == [str(logdir / "configs" / f"{NOW}-lightning.yaml"),
                                   str(logdir / "configs" / f"{NOW}-project.yaml")]


def test_resume_from_checkpoint_file(tmp_path):
    logdir = _make_run(tmp_path)
    ckpt = logdir / "checkpoints" / "epoch=000003.ckpt"
    dirs = run_dirs(opts("-r", str(ckpt)), now=NOW)
    assert dirs.logdir == str(logdir)
    assert dirs.resume_ckpt == str(ckpt)
    assert dirs.nowname == logdir.name
    assert len(dirs.resume_configs) == 2


def test_resume_missing_path(tmp_path):
    with pytest.raises(UsageError, match="Cannot find"):
        run_dirs(opts("-r", str(tmp_path / "nope")), now=NOW)


def test_resume_dir_without_last_ckpt(tmp_path):
    logdir = _make_run(tmp_path)
    (logdir / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(UsageError, match="last.ckpt"):
        run_dirs(opts("-r", str(logdir)), now=NOW)


# ---------------------------------------------------------------------------------------------------
# Config merging and overrides (docs/DIFFERENCES.md#placeholder-string-reaches-the-datasets)
# ---------------------------------------------------------------------------------------------------


def test_merge_configs_later_wins(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model:\n  lr: 1\n  keep: a\nlist: [1, 2]\n")
    b.write_text("model:\n  lr: 2\n  new: b\n")
    cfg = merge_configs([str(a), str(b)], [])
    assert OmegaConf.to_container(cfg) == {"model": {"lr": 2, "keep": "a", "new": "b"}, "list": [1, 2]}
    overrides = ["model.lr=3", "data.params.batch_size=1", "lightning.trainer.max_steps=5"]
    cfg = merge_configs([str(a), str(b)], overrides)
    assert cfg.model.lr == 3 and cfg.model.keep == "a"
    assert cfg.data.params.batch_size == 1
    assert cfg.lightning.trainer.max_steps == 5
    cfg = merge_configs([str(b), str(a)], [])
    assert cfg.model.lr == 1


def test_merge_configs_errors(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("x: 1\n")
    with pytest.raises(UsageError, match="missing.yaml"):
        merge_configs([str(a), str(tmp_path / "missing.yaml")], [])
    with pytest.raises(UsageError, match="foo"):
        merge_configs([str(a)], ["foo"])
    with pytest.raises(UsageError, match="--bar"):
        merge_configs([str(a)], ["--bar=1"])


def _sd_config():
    return merge_configs([str(SD_CONFIG)], [])


def test_apply_overrides_placeholder_everywhere():
    config = _sd_config()
    opt = opts("--placeholder_string", "@", "--init_word", "dog", "--data_root", "/imgs/cat",
               "--tokenizer_path", "/tok/clip", "--embedding_manager_ckpt", "/e/embeddings.pt")
    apply_overrides(config, opt)
    params = config.model.params.personalization_config.params
    assert list(params.placeholder_strings) == ["@"]
    assert list(params.initializer_words) == ["dog"]
    assert params.embedding_manager_ckpt == "/e/embeddings.pt"
    assert config.model.params.cond_stage_config.params.tokenizer_path == "/tok/clip"
    for split in ("train", "validation"):
        node = config.data.params[split].params
        assert node.placeholder_token == "@"  # the reference left the datasets on '*'
        assert node.data_root == "/imgs/cat"


def test_explicit_dataset_placeholder_override_survives(caplog):
    override = "data.params.validation.params.placeholder_token=sks"
    config = merge_configs([str(SD_CONFIG)], [override])
    opt = opts("--placeholder_string", "*")
    opt.overrides = [override]  # what main.py's leftover tokens become (TrainOptions.overrides)
    with caplog.at_level("WARNING", logger="ldm.cli"):
        apply_overrides(config, opt)
    assert config.data.params.validation.params.placeholder_token == "sks"  # the user's explicit value
    assert config.data.params.train.params.placeholder_token == "*"  # the others follow the model
    assert "differs from the model's placeholder" in caplog.text


def test_apply_overrides_style_config_datasets():
    config = merge_configs([str(LDM_STYLE_CONFIG)], [])
    apply_overrides(config, opts("--placeholder_string", "&", "--data_root", "/imgs/style"))
    for split in ("train", "validation"):
        assert config.data.params[split].params.placeholder_token == "&"
        assert config.data.params[split].params.data_root == "/imgs/style"


def test_apply_overrides_defaults():
    config = _sd_config()
    apply_overrides(config, opts())
    params = config.model.params.personalization_config.params
    assert params.embedding_manager_ckpt == ""  # always written
    assert list(params.placeholder_strings) == ["*"]
    assert list(params.initializer_words) == ["sculpture"]
    assert config.data.params.train.params.placeholder_token == "*"
    assert "data_root" not in config.data.params.train.params


def test_apply_overrides_init_word_list_handling():
    config = _sd_config()
    config.model.params.personalization_config.params.initializer_words = ["a", "b"]
    apply_overrides(config, opts("--init_word", "dog"))
    assert list(config.model.params.personalization_config.params.initializer_words) == ["dog", "b"]

    for empty in ([], None):
        config = _sd_config()
        config.model.params.personalization_config.params.initializer_words = empty
        apply_overrides(config, opts("--init_word", "dog"))
        assert list(config.model.params.personalization_config.params.initializer_words) == ["dog"]

    config = _sd_config()
    del config.model.params.personalization_config.params["initializer_words"]
    apply_overrides(config, opts("--init_word", "dog"))
    assert list(config.model.params.personalization_config.params.initializer_words) == ["dog"]


def test_apply_overrides_tokenizer_path_with_existing_params():
    config = merge_configs([str(REPO / "configs" / "latent-diffusion" / "txt2img-1p4B-finetune.yaml")], [])
    before = OmegaConf.to_container(config.model.params.cond_stage_config.params)
    apply_overrides(config, opts("--tokenizer_path", "/tok/bert"))
    after = OmegaConf.to_container(config.model.params.cond_stage_config.params)
    assert after == {**before, "tokenizer_path": "/tok/bert"}


@pytest.mark.parametrize("flag", [("--placeholder_string", "@"), ("--init_word", "dog"),
                                  ("--embedding_manager_ckpt", "e.pt")])
def test_apply_overrides_needs_personalization(flag):
    config = merge_configs([str(NO_TI_CONFIG)], [])
    assert "personalization_config" not in config.model.params
    with pytest.raises(UsageError, match="personalization_config"):
        apply_overrides(config, opts(*flag))
    apply_overrides(merge_configs([str(NO_TI_CONFIG)], []), opts())  # no TI flags: fine


def test_speed_flags_become_model_options():
    config = _sd_config()
    apply_overrides(config, opts())
    assert config.model.params.attention == "sdpa"  # main.py's default kernel
    assert config.model.params.channels_last is True  # and layout
    assert config.model.params.small_gemm is True  # and products
    for key in ("gradient_checkpointing", "frozen_weights", "cache_first_stage"):
        assert key not in config.model.params  # unset flags leave the config's (or the model's) default
    config = _sd_config()
    config.model.params.attention = "math"
    apply_overrides(config, opts("--gradient_checkpointing", "--frozen_weights", "bf16", "--cache_first_stage",
                                 "false"))
    params = config.model.params
    assert (params.attention, params.gradient_checkpointing, params.frozen_weights, params.cache_first_stage) == (
        "math", True, "bf16", False)  # the config's kernel is kept when no flag says otherwise
    config = _sd_config()
    apply_overrides(config, opts("--attention", "math", "--channels_last", "false"))
    assert config.model.params.attention == "math" and config.model.params.channels_last is False
    config = _sd_config()
    config.model.params.channels_last = False
    config.model.params.small_gemm = False
    apply_overrides(config, opts())
    assert config.model.params.channels_last is False  # the config's layout is kept without a flag
    assert config.model.params.small_gemm is False
    config = _sd_config()
    apply_overrides(config, opts("--small_gemm", "false"))
    assert config.model.params.small_gemm is False


def test_lean_fills_the_speed_options_not_given():
    from ldm.loading import LEAN_OPTIONS

    config = _sd_config()
    apply_overrides(config, opts("--lean"))
    params = config.model.params
    assert LEAN_OPTIONS and all(params[k] == v for k, v in LEAN_OPTIONS.items())
    assert params.attention == "sdpa"
    config = _sd_config()
    apply_overrides(config, opts("--lean", "--frozen_weights", "bf16"))
    assert config.model.params.frozen_weights == "bf16"  # an explicit flag wins over the preset
    plain = merge_configs([str(NO_TI_CONFIG)], [])  # no latent cache without textual inversion: nothing freed
    apply_overrides(plain, opts("--lean"))
    assert plain.model.params.frozen_weights == "fp16" and "release_first_stage" not in plain.model.params


def test_speed_flags_need_a_diffusion_model(tmp_path):
    ae = merge_configs([str(REPO / "configs" / "toy" / "autoencoder.yaml")], [])
    apply_overrides(ae, opts())  # no speed flag: an autoencoder config trains as before
    assert "attention" not in ae.model.params
    with pytest.raises(UsageError, match="--gradient_checkpointing"):
        apply_overrides(ae, opts("--gradient_checkpointing"))
    with pytest.raises(UsageError, match="--lean"):
        apply_overrides(ae, opts("--lean"))


# ---------------------------------------------------------------------------------------------------
# parse_args
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,attr", [("--no-test", "no_test"), ("-t", "train"), ("--train", "train"),
                                       ("-d", "debug"), ("--scale_lr", "scale_lr")])
def test_bare_bool_flag_before_override(flag, attr):
    opt, unknown = parse_args(["--base", "x.yaml", flag, "a.b=1", "--data_root", "d"])
    assert getattr(opt, attr) is True
    assert unknown == ["a.b=1"]
    assert opt.base == ["x.yaml"] and opt.data_root == "d"


def test_bool_flags_values():
    opt, unknown = parse_args(["--no-test", "False", "-t", "a.b=1", "c.d=2"])
    assert opt.no_test is False and opt.train is True
    assert unknown == ["a.b=1", "c.d=2"]
    opt, _ = parse_args(["-t", "--no-test"])
    assert opt.train is True and opt.no_test is True
    opt, _ = parse_args(["--scale_lr", "no", "--datadir_in_name", "0"])
    assert opt.scale_lr is False and opt.datadir_in_name is False
    opt, _ = parse_args([])
    assert (opt.train, opt.no_test, opt.scale_lr, opt.datadir_in_name, opt.seed, opt.logdir) == (
        False, False, True, True, 23, "logs")


def test_parse_args_does_not_mutate_argv():
    argv = ["-t", "a.b=1"]
    parse_args(argv)
    assert argv == ["-t", "a.b=1"]


# ---------------------------------------------------------------------------------------------------
# Run timestamp shared with DDP workers
# ---------------------------------------------------------------------------------------------------


def test_timestamp_inherited_by_worker(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(RUN_TIMESTAMP_ENV, "1999-12-31T23-59-59")
    assert timestamp() == "1999-12-31T23-59-59"


@pytest.mark.parametrize("local_rank", [None, "0"])
def test_timestamp_new_on_launcher(monkeypatch, local_rank):
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv(RUN_TIMESTAMP_ENV, "1999-12-31T23-59-59")
    stamp = timestamp()
    assert stamp != "1999-12-31T23-59-59"
    assert STAMP_RE.match(stamp)
    assert os.environ[RUN_TIMESTAMP_ENV] == stamp  # exported for the workers


def test_timestamp_worker_without_env(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv(RUN_TIMESTAMP_ENV, raising=False)
    stamp = timestamp()
    assert STAMP_RE.match(stamp) and os.environ[RUN_TIMESTAMP_ENV] == stamp


# ---------------------------------------------------------------------------------------------------
# ldm/data/resumable.py
# ---------------------------------------------------------------------------------------------------


def _passes(sampler: ResumableSampler, n_passes: int) -> list[list[int]]:
    return [list(sampler) for _ in range(n_passes)]


def test_sampler_passes_are_permutations_of_keys():
    n = 10
    passes = _passes(ResumableSampler(n, seed=7), 3)
    for e, keys in enumerate(passes):
        assert sorted(keys) == list(range(e * n, (e + 1) * n))
    offsets = [[k - e * n for k in keys] for e, keys in enumerate(passes)]
    assert offsets[0] != offsets[1] != offsets[2]
    assert offsets[0] != list(range(n))  # shuffled


def test_sampler_same_seed_same_stream():
    assert _passes(ResumableSampler(10, seed=3), 3) == _passes(ResumableSampler(10, seed=3), 3)
    assert _passes(ResumableSampler(10, seed=3), 2) != _passes(ResumableSampler(10, seed=4), 2)


def test_sampler_without_shuffle():
    assert _passes(ResumableSampler(4, seed=0, shuffle=False), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize("n", [6, 7])
def test_sampler_ranks_partition_a_pass(n):
    full = ResumableSampler(n, seed=5).keys(1)
    r0, r1 = (ResumableSampler(n, seed=5, rank=r, world_size=2) for r in (0, 1))
    k0, k1 = _passes(r0, 2)[1], _passes(r1, 2)[1]
    per_rank = -(-n // 2)
    assert len(k0) == len(k1) == per_rank == len(r0) == len(r1)
    padded = full + full[: 2 * per_rank - n]  # wrapped, as torch's DistributedSampler
    assert k0 == padded[0::2] and k1 == padded[1::2]
    assert set(k0) | set(k1) == set(range(n, 2 * n))
    if n % 2 == 0:
        assert not set(k0) & set(k1)
    else:
        assert sorted(k0 + k1) == sorted(full + full[:1])


def test_sampler_rank_validation():
    with pytest.raises(ValueError):
        ResumableSampler(4, seed=0, rank=2, world_size=2)


def test_sampler_resume_continues_exactly():
    straight = _passes(ResumableSampler(10, seed=9), 3)
    resumed = ResumableSampler(10, seed=9)
    resumed.resume(1, 4)
    assert list(resumed) == straight[1][4:]
    assert list(resumed) == straight[2]


class _RandomDataset(torch.utils.data.Dataset):
    """Items drawn from the three global RNGs (as the reference's captions and flips were)."""

    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {"i": i, "py": random.random(), "np": float(np.random.rand()), "torch": torch.rand(2)}


def _same_item(a, b) -> bool:
    same = a["i"] == b["i"] and a["py"] == b["py"] and a["np"] == b["np"]
    return same and torch.equal(a["torch"], b["torch"])


def test_keyed_dataset_items_are_functions_of_the_key():
    ds = KeyedDataset(_RandomDataset(), seed=1)
    a, b = ds[7], ds[7]
    assert _same_item(a, b) and a["sample_key"] == 7 and a["i"] == 2
    c = ds[12]  # same underlying image (12 % 5 == 2), another key: other draws
    assert c["i"] == 2 and not _same_item(a, c) and a["py"] != c["py"]
    assert not _same_item(ds[7], KeyedDataset(_RandomDataset(), seed=2)[7])


def test_keyed_dataset_restores_global_rngs():
    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3)

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    expected = draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    KeyedDataset(_RandomDataset(), seed=1)[3]
    got = draws()
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_keyed_dataset_non_dict_items():
    ds = KeyedDataset([10, 11, 12], seed=0)
    assert ds[4] == 11 and len(ds) == 3


def _loader(seed: int = 11) -> ResumableDataLoader:
    ds = KeyedDataset(_RandomDataset(), seed)
    return ResumableDataLoader(ds, ResumableSampler(len(ds), seed), batch_size=2, num_workers=0)


def _assert_same_batches(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(torch.as_tensor(x[key]), torch.as_tensor(y[key])), key


def test_loader_state_round_trip_reproduces_the_stream():
    straight = _loader()
    reference = [list(straight) for _ in range(3)]  # passes of 3 batches (2, 2, 1)
    assert [len(p) for p in reference] == [3, 3, 3]

    interrupted = _loader()
    list(interrupted)  # pass 0
    it = iter(interrupted)
    seen = [next(it), next(it)]  # 2 batches into pass 1
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    _assert_same_batches(seen, reference[1][:2])

    restored = _loader()
    restored.load_state_dict(state)
    _assert_same_batches(list(restored), reference[1][2:])
    assert restored.state_dict() == {"epoch": 1, "batches": 3}
    _assert_same_batches(list(restored), reference[2])


def test_loader_state_at_pass_end():
    straight = _loader()
    reference = [list(straight) for _ in range(2)]
    first = _loader()
    list(first)
    restored = _loader()
    restored.load_state_dict(first.state_dict())
    assert list(restored) == []  # the finished pass has nothing left
    _assert_same_batches(list(restored), reference[1])


def test_loader_state_before_any_batch():
    """A checkpoint written before the first training batch (e.g. an early interrupt) must restore to
    the start of the stream."""
    reference = list(_loader())
    fresh = _loader()
    restored = _loader()
    restored.load_state_dict(fresh.state_dict())
    _assert_same_batches(list(restored), reference)


def test_gpus_zero_means_cpu_as_in_lightning_1():
    cfg = trainer_settings({}, flags("--gpus", "0"))
    assert cfg["accelerator"] == "cpu" and "devices" not in cfg


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16", "16-mixed"])
def test_cpu_mixed_precision_only_where_the_cpu_computes_it(monkeypatch, precision):
    import ldm.cli as cli

    detected = cli.cpu_half_compute()  # this machine's answer: two booleans
    assert set(detected) == {"bf16", "16"} and all(isinstance(v, bool) for v in detected.values())
    settings = {"precision": precision, "accelerator": "cpu"}
    monkeypatch.setattr(cli, "cpu_half_compute", lambda: {"bf16": False, "16": False})
    with pytest.raises(UsageError, match="--precision=.*emulated and slower"):
        cli.check_trainer_settings(settings, {"precision": precision})
    cli.check_trainer_settings({"precision": "32-true", "accelerator": "cpu"}, {"precision": "32-true"})
    monkeypatch.setattr(cli, "cpu_half_compute", lambda: {"bf16": True, "16": True})
    cli.check_trainer_settings(settings, {"precision": precision})  # a CPU that has the instructions
