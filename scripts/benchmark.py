"""Per-step cost of textual inversion: time per phase (median after warm-up) and peak memory.

    # CI-sized: the bundled tiny model
    python scripts/benchmark.py --config configs/toy/tiny-demo.yaml --res 32 --steps 5
    # the full LDM 1.4B architecture with random weights (no checkpoint needed; about 6 GB of RAM)
    python scripts/benchmark.py --config configs/latent-diffusion/txt2img-1p4B-finetune.yaml --res 256 \
        --threads 1 --tokenizer_path ../shared/fixtures/tokenizers/bert-base-uncased --json bench.json

Each variant runs in its own process so its peak RSS is its own. Variants (switches, combinable):
  reference: the faithful path (encoder every step, math attention, no checkpointing);
  cache:     first-stage moments of the training images cached (exact);
  sdpa:      PyTorch scaled-dot-product attention in the UNet and the BERT encoder;
  ckpt:      gradient checkpointing of the UNet's transformer blocks;
  cl:        channels-last memory format for the UNet;
  compile:   torch.compile of the UNet;
  bf16w:     frozen weights stored in bfloat16, computed in float32 (weights rounded; see
             ldm/modules/frozen_weights.py).
Peak RSS is reported twice: over the whole process (model build included) and over the training steps only
(the kernel's high-water mark is reset after the build; Linux only).
A variant is a '+'-joined list, e.g. `cache+sdpa`. Phases: first stage (get_input), conditioning (text
encoder with the embedding), UNet forward + loss, backward, optimizer step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.scripts_common import one_line_parser  # noqa: E402

SWITCHES = ("reference", "cache", "sdpa", "ckpt", "cl", "compile", "bf16w")
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
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


def build(opt, overrides, switches):
    """The model a variant trains: its switches are model options (see ldm/loading.py)."""
    import torch

    from ldm.loading import load_model

    torch.manual_seed(0)
    model = load_model(opt.config, overrides=overrides, tokenizer_path=opt.tokenizer_path, device=opt.device,
                       attention="sdpa" if "sdpa" in switches else "math",
                       gradient_checkpointing="ckpt" in switches, cache_first_stage="cache" in switches,
                       frozen_weights="bf16" if "bf16w" in switches else "fp32")
    model.train()
    model.learning_rate = 1e-3
    return model


def child(opt, overrides) -> dict:
    import torch

    switches = set(opt.child.split(":")[0].split("+"))
    batch_size, precision = int(opt.child.split(":")[1]), opt.child.split(":")[2]
    torch.set_num_threads(opt.threads)
    t0 = time.perf_counter()
    model = build(opt, overrides, switches)
    build_s = time.perf_counter() - t0
    unet = model.model.diffusion_model
    if "cl" in switches:
        unet.to(memory_format=torch.channels_last)
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

    build_peak_mb = step_peak_rss_mb()  # the reset below clears the process-wide mark too
    reset_peak_rss()
    times = {p: [] for p in PHASES}
    # steady state, as in a real run: every training image has been seen (the latent cache is warm)
    warmup = -(-opt.images // batch_size) + opt.warmup
    for i in range(warmup + opt.steps):
        idx = [(i * batch_size + j) % opt.images for j in range(batch_size)]
        batch = {"image": images[idx], "caption": ["a photo of *"] * batch_size}
        stamps = [time.perf_counter()]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
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
    out = {"variant": opt.child.split(":")[0], "batch": batch_size, "precision": precision, "threads": opt.threads,
           "device": opt.device, "res": opt.res, "build_s": round(build_s, 2),
           "median_step_s": statistics.median(steps), "step_times_s": steps,
           "phases_median_s": {p: statistics.median(v) for p, v in times.items()},
           "peak_rss_mb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, build_peak_mb or 0),
           "step_peak_rss_mb": step_peak_rss_mb(),
           "torch": torch.__version__, "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


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
    head = ["variant", "batch", "prec", "step s", "x ref", "RSS MB", "x ref", "steps RSS MB", *PHASES]
    rows = [head]
    for r in results:
        base = ref.get((r["batch"], r["precision"]))
        rows.append([r["variant"], str(r["batch"]), r["precision"], f"{r['median_step_s']:.3f}",
                     f"{r['median_step_s'] / base['median_step_s']:.2f}" if base else "-",
                     f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if base else "-",
                     "-" if r["step_peak_rss_mb"] is None else f"{r['step_peak_rss_mb']:.0f}",
                     *(f"{r['phases_median_s'][p]:.3f}" for p in PHASES)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def main(argv=None) -> int:
    opt, overrides = parse_args(argv)
    if opt.child:
        print("RESULT " + json.dumps(child(opt, overrides)))
        return 0
    for v in opt.variants:
        unknown = set(v.split("+")) - set(SWITCHES)
        if unknown:
            raise SystemExit(f"benchmark.py: error: unknown switch(es) {sorted(unknown)}; choose from {SWITCHES}")
    args = list(sys.argv[1:] if argv is None else argv)
    results = []
    for b in opt.batch:
        for prec in opt.precision:
            for v in opt.variants:
                cmd = [sys.executable, __file__, *args, "--child", f"{v}:{b}:{prec}"]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if out.returncode or line is None:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"benchmark.py: variant {v} failed")
                results.append(json.loads(line[len("RESULT "):]))
                print(f"done: {v} batch {b} {prec}: {results[-1]['median_step_s']:.3f} s/step", flush=True)
    print(f"threads {opt.threads}, device {opt.device}, res {opt.res}, config {opt.config}, "
          f"{opt.steps} timed steps after {opt.warmup} warm-up (medians)")
    print(table(results))
    if opt.json:
        Path(opt.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
