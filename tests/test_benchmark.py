"""Issue 7 acceptance 1: the benchmark runs on CPU for a tiny config in CI-friendly time."""

import json
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_benchmark_tiny(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--config", "configs/toy/tiny-demo.yaml",
           "--res", "32", "--steps", "2", "--warmup", "1", "--threads", "1", "--variants", "reference",
           "cache+sdpa+bf16w", "lean", "--json", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert [r["variant"] for r in results] == ["reference", "cache+sdpa+bf16w", "lean"]
    assert results[2]["options"]["release_first_stage"] is True  # the autoencoder freed before the steps
    for r in results:
        assert r["threads"] == 1 and len(r["step_times_s"]) == 2 and r["median_step_s"] > 0
        assert set(r["phases_median_s"]) == {"first_stage", "conditioning", "unet_forward", "backward", "optimizer"}
        assert r["peak_rss_mb"] > 100 and 0 < r["step_peak_rss_mb"] <= r["peak_rss_mb"] + 1
    assert "x ref" in run.stdout and "cache+sdpa+bf16w" in run.stdout
