"""Peak memory of building a model from its checkpoint (`ldm.loading.load_model`), next to its weights.

    python scripts/load_memory.py --config configs/latent-diffusion/txt2img-1p4B-finetune.yaml \
        --tokenizer_path tests/fixtures/tokenizers/bert-base-uncased
    python scripts/load_memory.py --config ... --formats safetensors --frozen_weights bf16 \
        model.params.unet_config.params.model_channels=64

Writes a random checkpoint of the config's model in the official layout (a `.ckpt` Lightning dict with
`state_dict`, or a flat `.safetensors`) to --workdir (default: a temporary folder, deleted after), loads it in
a fresh process per case and prints one JSON line per case:
- `peak_growth`: the peak resident memory of the load (VmHWM, reset through /proc/self/clear_refs) over the
  process's memory after a build on the meta device, which did the imports and read the tokenizers;
- `weights`: the bytes of the loaded model's own tensors, in their storage dtype; `ratio`: the two's ratio.
Linux only. Trailing `key.path=value` arguments override the config.
"""

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.loading import load_config, load_model, set_tokenizer_path  # noqa: E402
from ldm.modules.frozen_weights import DTYPES  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="model config (YAML)")
    p.add_argument("--tokenizer_path", default=None, help="local tokenizer folder of the text encoder")
    p.add_argument("--formats", nargs="+", default=["ckpt", "safetensors"], choices=["ckpt", "safetensors"])
    p.add_argument("--frozen_weights", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES),
                   help="storage dtypes to measure")
    p.add_argument("--workdir", default=None, help="folder for the random checkpoints (default: temporary)")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child process: load this file
    return p


def model_config(opt, overrides):
    cfg = load_config(opt.config, overrides)
    cfg.model.params.pop("ckpt_path", None)
    set_tokenizer_path(cfg.model.params, opt.tokenizer_path)
    return cfg


def write_checkpoint(cfg, path: Path) -> int:
    """A random checkpoint of `cfg.model` without the embedding manager (.ckpt: {"state_dict": ...}, or flat
    .safetensors); returns its bytes of tensors."""
    with torch.device("meta"):
        skeleton = instantiate_from_config(cfg.model).state_dict()
    sd = {}
    for key, t in skeleton.items():
        if key.startswith("embedding_manager."):
            continue
        floating = t.is_floating_point()
        sd[key] = (0.02 * torch.randn(t.shape)).to(t.dtype) if floating else torch.zeros_like(t, device="cpu")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 0}, path)
    return sum(t.numel() * t.element_size() for t in sd.values())


def status(field: str) -> int:
    """A `/proc/self/status` field in bytes (e.g. VmHWM, VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def measure(opt, overrides) -> dict:
    """In this process: build the model once on the meta device (imports, tokenizers, caches; no weights),
    then load the checkpoint and report the peak."""
    cfg = model_config(opt, overrides)
    with torch.device("meta"):
        instantiate_from_config(cfg.model)
    gc.collect()
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    model = load_model(cfg, opt.measure, frozen_weights=opt.frozen_weights[0])
    seconds = time.perf_counter() - start
    growth, weights = status("VmHWM") - before, tensor_bytes(model)
    return {"file": Path(opt.measure).suffix[1:], "frozen_weights": opt.frozen_weights[0],
            "seconds": round(seconds, 2), "peak_growth": growth, "weights": weights,
            "ratio": round(growth / weights, 3)}


def run(opt, overrides) -> list[dict]:
    """Every (format, frozen_weights) case, each loaded in its own process."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(opt.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for fmt in opt.formats:
            path = workdir / f"random_model.{fmt}"
            write_checkpoint(model_config(opt, overrides), path)
            gc.collect()
            for dtype in opt.frozen_weights:
                argv = [sys.executable, __file__, *overrides, "--config", opt.config, "--measure", str(path),
                        "--frozen_weights", dtype]
                argv += ["--tokenizer_path", opt.tokenizer_path] if opt.tokenizer_path else []
                done = subprocess.run(argv, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"measuring {path.name} ({dtype}) failed:\n{done.stderr[-3000:]}")
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
            path.unlink()
    return results


def main(argv=None) -> int:
    opt, overrides = parser().parse_known_args(argv)
    if opt.measure:
        print(json.dumps(measure(opt, overrides)))
    else:
        run(opt, overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
