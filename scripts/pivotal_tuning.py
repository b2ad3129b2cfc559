"""Pivotal tuning (paper Appendix E): invert a word, then fine-tune the UNet around that fixed pivot word.

    python scripts/pivotal_tuning.py --data_root imgs/ --actual_resume models/toy/toy_ldm.safetensors \
        --stage1_config configs/toy/invert.yaml --config configs/toy/pivotal.yaml --steps 150 --model_lr 5e-5
    python scripts/pivotal_tuning.py --embedding_path logs/<run>/checkpoints/embeddings.pt ...   # skip stage 1
    python scripts/pivotal_tuning.py --config configs/latent-diffusion/txt2img-1p4B-finetune_unfrozen.yaml \
        --stage1_config configs/latent-diffusion/txt2img-1p4B-finetune.yaml \
        --actual_resume models/ldm/text2img-large/model.ckpt --data_root imgs/ --init_word sculpture \
        --template "a photo of {}" --model_lr 1e-6 --steps 500

Stage 1 is a normal textual inversion run (`--stage1_config`, `--stage1_steps`). Stage 2 trains `--config`
with `model.params.unfreeze_model=true` and `model.params.freeze_embedding=true`: the word (loaded as
`embedding_manager_ckpt`) and the text encoder stay fixed, the UNet alone trains at `--model_lr` (AdamW), on
captions from `--template` (default: the config's templates). Both stages go through `ldm.training.train`.
Writes, in stage 2's checkpoints folder, `pivotal_model.safetensors` (the full state dict without the
embedding manager: loads strictly into the sampling config's model, e.g. `scripts/txt2img.py --ckpt_path ...
--embedding_path <the pivot>`) and `pivotal.json` (both runs, the files, and the check that the word is
bitwise its pivot). Trailing `key.path=value` arguments override both stages' configs.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ldm.checkpoint import read_state_dict  # noqa: E402
from ldm.modules.embedding_formats import read_embeddings  # noqa: E402
from ldm.scripts_common import run_script  # noqa: E402
from ldm.util import atomic_write  # noqa: E402

MANAGER_PREFIX = "embedding_manager."


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/toy/pivotal.yaml", help="stage 2 (unfrozen) config")
    p.add_argument("--stage1_config", default="configs/toy/invert.yaml", help="stage 1 (inversion) config")
    p.add_argument("--actual_resume", required=True, help="base model weights")
    p.add_argument("--data_root", required=True, help="folder of the concept's images")
    p.add_argument("--embedding_path", default=None, help="the pivot word (skips stage 1)")
    p.add_argument("--init_word", default=None, help="stage 1 initializer word (default: the config's)")
    p.add_argument("--stage1_steps", type=int, default=None, help="stage 1 max_steps (default: the config's)")
    p.add_argument("--steps", type=int, default=None, help="stage 2 max_steps (default: the config's)")
    p.add_argument("--model_lr", type=float, default=None, help="stage 2 UNet learning rate (default: config's)")
    p.add_argument("--template", default=None, help="stage 2 caption, e.g. 'a photo of {}' (default: config's)")
    p.add_argument("--name", default="pivotal")
    p.add_argument("--logdir", default="logs")
    p.add_argument("--seed", type=int, default=23)
    return p


def check_flags(opt) -> None:
    for flag in ("config", "stage1_config", "actual_resume", "embedding_path"):
        value = getattr(opt, flag)
        if value and not Path(value).is_file():
            raise ValueError(f"--{flag} {value}: no such file")
    if not Path(opt.data_root).is_dir():
        raise ValueError(f"--data_root {opt.data_root}: no such folder")
    for flag in ("stage1_steps", "steps"):
        if getattr(opt, flag) is not None and getattr(opt, flag) < 1:
            raise ValueError(f"--{flag} {getattr(opt, flag)}: expected a whole number >= 1")
    if opt.model_lr is not None and not opt.model_lr > 0:
        raise ValueError(f"--model_lr {opt.model_lr}: expected a positive number")
    if opt.template is not None and "{}" not in opt.template:
        raise ValueError(f"--template {opt.template!r}: needs '{{}}' where the word goes, e.g. 'a photo of {{}}'")


def stage1(opt, overrides) -> tuple[Path, Path]:
    from ldm.training import train

    run = train(opt.stage1_config, actual_resume=opt.actual_resume, data_root=opt.data_root,
                name=f"{opt.name}_stage1", logdir=opt.logdir, seed=opt.seed, init_word=opt.init_word,
                no_test=True, datadir_in_name=False, overrides=list(overrides),
                trainer={"max_steps": opt.stage1_steps} if opt.stage1_steps else {})
    if run.embeddings is None:
        raise ValueError(f"stage 1 ({run.logdir}) wrote no embeddings.pt")
    return run.embeddings, run.logdir


def stage2_overrides(opt) -> list[str]:
    out = ["model.params.unfreeze_model=true", "model.params.freeze_embedding=true"]
    if opt.model_lr is not None:
        out.append(f"model.params.model_lr={opt.model_lr}")
    if opt.template is not None:
        out.append("data.params.train.params.templates=" + json.dumps([opt.template]))
    return out


def export_model(ckpt: Path, output: Path, note: str) -> int:
    """The stage-2 checkpoint's state dict without the embedding manager, as safetensors; returns #tensors."""
    from safetensors.torch import save_file

    sd, meta = read_state_dict(ckpt)
    kept = {k: v.contiguous() for k, v in sd.items() if not k.startswith(MANAGER_PREFIX)}
    info = {"source": str(ckpt), "note": note, **{k: str(v) for k, v in meta.items()}}
    atomic_write(output, lambda tmp: save_file(kept, tmp, metadata=info))
    return len(kept)


def run(opt, overrides) -> dict:
    check_flags(opt)
    from ldm.training import train

    stage1_logdir = None
    if opt.embedding_path:
        pivot = Path(opt.embedding_path)
    else:
        pivot, stage1_logdir = stage1(opt, overrides)
    run2 = train(opt.config, actual_resume=opt.actual_resume, data_root=opt.data_root,
                 embedding_manager_ckpt=str(pivot), name=f"{opt.name}_stage2", logdir=opt.logdir, seed=opt.seed,
                 no_test=True, datadir_in_name=False, overrides=[*stage2_overrides(opt), *overrides],
                 trainer={"max_steps": opt.steps} if opt.steps else {})
    ckpt = run2.last_ckpt
    if not ckpt.is_file():
        raise ValueError(f"stage 2 ({run2.logdir}) wrote no last.ckpt")
    model_file = run2.ckptdir / "pivotal_model.safetensors"
    n = export_model(ckpt, model_file, f"pivotal tuning stage 2 of {opt.config}, pivot {pivot}")
    before, after = read_embeddings(pivot).vectors, read_embeddings(run2.embeddings).vectors
    fixed = sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    report = {"pivot": str(pivot), "stage1_logdir": str(stage1_logdir) if stage1_logdir else None,
              "stage2_logdir": str(run2.logdir), "stage2_steps": run2.global_step,
              "model_lr": float(run2.model.model_lr), "last_ckpt": str(ckpt), "model": str(model_file),
              "tensors": n, "embedding_unchanged": fixed,
              "sample_with": f"--ckpt {model_file} --embedding_path {pivot}"}
    atomic_write(run2.ckptdir / "pivotal.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    if not fixed:
        raise ValueError(f"stage 2 changed the pivot word ({run2.embeddings} differs from {pivot})")
    print(json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    return run_script("pivotal_tuning.py", parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
