"""Per-step cost of textual inversion: time per phase (median after warm-up) and peak memory.

    # CI-sized: the bundled tiny model
    python scripts/benchmark.py --config configs/toy/tiny-demo.yaml --res 32 --steps 5
    # the full LDM 1.4B architecture with random weights (no checkpoint needed; about 6 GB of RAM)
    python scripts/benchmark.py --config configs/latent-diffusion/txt2img-1p4B-finetune.yaml --res 256 \
        --threads 1 --tokenizer_path ../shared/fixtures/tokenizers/bert-base-uncased --json bench.json

Each variant runs in its own process so its peak RSS is its own. With `--from_ckpt` (default on) the parent
first writes the config's model with random weights as an official-format checkpoint (`{"state_dict": ...}`,
fp32) and every variant loads it, so the whole-process peak includes the load, as in `main.py --actual_resume`.

Variants: the presets
  default:   exactly what `main.py` does without speed flags (ldm.cli.speed_options);
  lean:      `main.py --lean` (ldm.loading.LEAN_OPTIONS, and its allocator: tcmalloc where the system has
             it, else glibc's fixed mmap threshold and huge pages; ldm/malloc.py);
or '+'-joined switches:
  reference: the faithful path (encoder every step, math attention, no checkpointing);
  cache:     first-stage moments of the training images cached (exact);
  sdpa:      PyTorch scaled-dot-product attention in the UNet and the BERT encoder;
  ckpt:      gradient checkpointing of the UNet's transformer blocks;
  cl:        channels-last memory format for the UNet;
  gemm:      the UNet's frozen layers on few positions as weight-on-the-left products, wide linear layers
             of the UNet and the text encoder in blocks of outputs (ldm/modules/small_gemm.py);
  compile:   torch.compile of the UNet;
  bf16w, fp16w: frozen weights stored in bfloat16 / float16, computed in float32 (weights rounded; see
             ldm/modules/frozen_weights.py);
  fp16a:     the activations a step keeps for backward stored in float16 (ldm/modules/saved_activations.py);
  release:   the autoencoder freed once the training latents are cached (needs cache; textual inversion),
             before the first step, as training does at train start.
Peak RSS is reported twice: over the whole process (model build and load included) and over the training
steps only (the kernel's high-water mark is reset after the build; Linux only). The UNet's FLOPs per step
(forward + backward, counted with torch.utils.flop_counter) and the FLOP/s its two phases achieve are printed
per variant. `--precision bf16` on a CPU is run only where oneDNN has bf16 instructions (AVX512-BF16 or AMX);
elsewhere bf16 compute is emulated and slower than fp32, and the variant is skipped with a note.
Phases: first stage (get_input), conditioning (text encoder with the embedding), UNet forward + loss,
backward, optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.malloc import allocator, find_tcmalloc, lean_environment, return_freed_memory  # noqa: E402
from ldm.scripts_common import one_line_parser  # noqa: E402

SWITCHES = ("reference", "cache", "sdpa", "ckpt", "cl", "gemm", "compile", "bf16w", "fp16w", "fp16a", "release")
PRESETS = ("default", "lean")
PHASES = ("first_stage", "conditioning", "unet_forward", "backward", "optimizer")


def parse_args(argv=None):
    p = one_line_parser("benchmark.py", argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--config", required=True)
    p.add_argument("--res", type=int, default=256, help="training image size in pixels")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after one pass over the images")
    p.add_argument("--images", type=int, default=5, help="distinct training images (textual inversion: 3-5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["reference", "cache+sdpa", "cache+sdpa+ckpt"])
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], nargs="+", default=["fp32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokenizer_path", default=None)
    p.add_argument("--from_ckpt", type=int, default=1, choices=[0, 1],
                   help="1: load every variant from a saved random checkpoint (the load counts in the peak)")
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)  # set by the parent for the children
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


def variant_options(variant: str, model_params) -> dict:
    """The model options (ldm.loading.MODEL_OPTIONS) of a preset or a '+'-joined list of switches."""
    from ldm.cli import speed_options

    if variant in PRESETS:
        return speed_options(model_params, {}, lean=variant == "lean")
    switches = set(variant.split("+"))
    frozen = "bf16" if "bf16w" in switches else "fp16" if "fp16w" in switches else "fp32"
    return {"attention": "sdpa" if "sdpa" in switches else "math", "gradient_checkpointing": "ckpt" in switches,
            "cache_first_stage": "cache" in switches, "frozen_weights": frozen,
            "channels_last": "cl" in switches, "small_gemm": "gemm" in switches,
            "release_first_stage": "release" in switches,
            "saved_activations": "fp16" if "fp16a" in switches else "fp32"}


def build(opt, overrides, variant: str):
    """The model a variant trains, built (and loaded from `opt.ckpt`) as main.py builds it."""
    import torch

    from ldm.loading import load_config, load_model

    torch.manual_seed(0)
    params = load_config(opt.config, overrides).model.params
    model = load_model(opt.config, opt.ckpt, overrides=overrides, tokenizer_path=opt.tokenizer_path,
                       device=opt.device, **variant_options(variant, params))
    model.train()
    model.learning_rate = 1e-3
    return model


def write_random_checkpoint(opt, overrides, path: Path) -> None:
    """The config's model with seeded random weights, saved the way official checkpoints are."""
    import torch

    from ldm.loading import load_model
    from ldm.util import atomic_write

    torch.manual_seed(0)
    model = load_model(opt.config, overrides=overrides, tokenizer_path=opt.tokenizer_path)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("embedding_manager.")}
    atomic_write(path, lambda tmp: torch.save({"state_dict": state, "global_step": 0}, tmp))


def unet_flops(model, z, cond, t) -> int:
    """FLOPs of one UNet forward + backward (to the inputs; the weights are frozen)."""
    from torch.utils.flop_counter import FlopCounterMode

    z = z.detach()
    cond = cond.detach().requires_grad_(True)  # the gradient that reaches the embedding
    with FlopCounterMode(display=False) as counter:
        model.apply_model(z, t, cond).float().pow(2).mean().backward()
    return counter.get_total_flops()


def child(opt, overrides) -> dict:
    import torch

    variant = opt.child.split(":")[0]
    switches = set() if variant in PRESETS else set(variant.split("+"))
    batch_size, precision = int(opt.child.split(":")[1]), opt.child.split(":")[2]
    torch.set_num_threads(opt.threads)
    if variant == "lean":  # as main.py --lean (ldm.training.prepare)
        return_freed_memory()
    t0 = time.perf_counter()
    model = build(opt, overrides, variant)
    build_s = time.perf_counter() - t0
    unet = model.model.diffusion_model
    if "compile" in switches:
        model.model.diffusion_model = torch.compile(unet)
    opt_ = model.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(opt.images, opt.res, opt.res, 3, generator=g) * 2 - 1  # the "training images"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device = torch.device(opt.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if getattr(model, "first_stage_release", None) is not None:  # as training does at train start
        model.cache_and_release([(list(images), batch_size)])
    build_peak_mb = step_peak_rss_mb()  # the reset below clears the process-wide mark too
    reset_peak_rss()
    times = {p: [] for p in PHASES}
    # steady state, as in a real run: every training image has been seen (the latent cache is warm)
    warmup = -(-opt.images // batch_size) + opt.warmup
    for i in range(warmup + opt.steps):
        idx = [(i * batch_size + j) % opt.images for j in range(batch_size)]
        batch = {"image": images[idx], "caption": ["a photo of *"] * batch_size}
        stamps = [time.perf_counter()]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), model.saved_activations_scope():
            z, c = model.get_input(batch, model.first_stage_key)
            sync(), stamps.append(time.perf_counter())
            cond = model.get_learned_conditioning(c)
            sync(), stamps.append(time.perf_counter())
            t = torch.randint(0, model.num_timesteps, (batch_size,), device=device)
            loss, _ = model.p_losses(z, cond, t)
            sync(), stamps.append(time.perf_counter())
        loss.backward()
        sync(), stamps.append(time.perf_counter())
        opt_.step()
        opt_.zero_grad(set_to_none=True)
        sync(), stamps.append(time.perf_counter())
        if i >= warmup:
            for p, a, b in zip(PHASES, stamps[:-1], stamps[1:], strict=True):
                times[p].append(b - a)
    steps = [sum(v) for v in zip(*times.values(), strict=True)]
    step_peak = step_peak_rss_mb()
    # The whole run's peak (build, load and steps) from this process's own marks. Not ru_maxrss: a child
    # started by vfork + exec inherits the parent's peak there (the parent built a model to write the
    # random checkpoint), which made a smaller variant report the parent's 6.2 GB.
    marks = [m for m in (build_peak_mb, step_peak) if m is not None]
    whole_peak = max(marks) if len(marks) == 2 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        z, c = model.get_input(batch, model.first_stage_key)
        flops = unet_flops(model, z, model.get_learned_conditioning(c), t)
    unet_s = statistics.median(times["unet_forward"]) + statistics.median(times["backward"])
    out = {"variant": variant, "batch": batch_size, "precision": precision, "threads": opt.threads,
           "device": opt.device, "res": opt.res, "build_s": round(build_s, 2),
           "median_step_s": statistics.median(steps), "step_times_s": steps,
           "phases_median_s": {p: statistics.median(v) for p, v in times.items()},
           "peak_rss_mb": whole_peak,
           "step_peak_rss_mb": step_peak, "unet_flops": flops, "unet_flop_per_s": flops / unet_s,
           "options": variant_options(variant, model_params_of(opt, overrides)), "from_ckpt": bool(opt.ckpt),
           "torch": torch.__version__, "allocator": allocator(), "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def model_params_of(opt, overrides):
    from ldm.loading import load_config

    return load_config(opt.config, overrides).model.params


def bf16_compute_available(device: str) -> bool:
    """Whether bf16 autocast is worth running: always on CUDA; on a CPU only with oneDNN's bf16 support."""
    import torch

    return device.startswith("cuda") or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux: /proc/self/clear_refs, value 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def step_peak_rss_mb() -> float | None:
    """Peak RSS since `reset_peak_rss` (VmHWM), or None where /proc is not available."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kb = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(kb) / 1024 if kb else None


def table(results: list[dict]) -> str:
    ref = {(r["batch"], r["precision"]): r for r in results if r["variant"] == "reference"}
    head = ["variant", "batch", "prec", "alloc", "step s", "x ref", "RSS MB", "x ref", "steps RSS MB", *PHASES,
            "UNet GFLOP", "GFLOP/s"]
    rows = [head]
    for r in results:
        base = ref.get((r["batch"], r["precision"]))
        rows.append([r["variant"], str(r["batch"]), r["precision"], r.get("allocator", "-"),
                     f"{r['median_step_s']:.3f}",
                     f"{r['median_step_s'] / base['median_step_s']:.2f}" if base else "-",
                     f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if base else "-",
                     "-" if r["step_peak_rss_mb"] is None else f"{r['step_peak_rss_mb']:.0f}",
                     *(f"{r['phases_median_s'][p]:.3f}" for p in PHASES),
                     f"{r['unet_flops'] / 1e9:.1f}", f"{r['unet_flop_per_s'] / 1e9:.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def main(argv=None) -> int:
    opt, overrides = parse_args(argv)
    if opt.child:
        print("RESULT " + json.dumps(child(opt, overrides)))
        return 0
    for v in opt.variants:
        unknown = set() if v in PRESETS else set(v.split("+")) - set(SWITCHES)
        if unknown:
            raise SystemExit(f"benchmark.py: error: unknown switch(es) {sorted(unknown)} in --variants; choose "
                             f"a preset {PRESETS} or '+'-joined switches from {SWITCHES}")
    args = list(sys.argv[1:] if argv is None else argv)
    precisions = [p for p in opt.precision if p != "bf16" or bf16_compute_available(opt.device)]
    if precisions != opt.precision:
        print("skipped --precision bf16: this CPU has no bf16 instructions for oneDNN (AVX512-BF16 or AMX), so "
              "bf16 compute would be emulated and slower than fp32", flush=True)
    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
        if opt.from_ckpt:
            t0 = time.perf_counter()
            args += ["--ckpt", str(Path(tmp) / "random.ckpt")]
            write_random_checkpoint(opt, overrides, Path(tmp) / "random.ckpt")
            print(f"wrote a random official-format checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
        results = run_variants(opt, args, precisions)
    print(f"threads {opt.threads}, device {opt.device}, res {opt.res}, config {opt.config}, "
          f"{opt.steps} timed steps after {opt.warmup} warm-up (medians), from_ckpt {opt.from_ckpt}, "
          f"cpu {cpu_name()}")
    print(table(results))
    if opt.json:
        Path(opt.json).write_text(json.dumps(results, indent=1))
    return 0


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def run_variants(opt, args: list[str], precisions: list[str]) -> list[dict]:
    results = []
    for b in opt.batch:
        for prec in precisions:
            for v in opt.variants:
                cmd = [sys.executable, __file__, *args, "--child", f"{v}:{b}:{prec}"]
                lean = lean_environment(os.environ, find_tcmalloc()) if v == "lean" else None
                env = lean or os.environ  # as main.py --lean
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if out.returncode or line is None:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"benchmark.py: variant {v} failed")
                results.append(json.loads(line[len("RESULT "):]))
                print(f"done: {v} batch {b} {prec}: {results[-1]['median_step_s']:.3f} s/step", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
