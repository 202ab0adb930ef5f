"""Benchmark scripts: the GPU check's CPU dry mode end to end, and the pure helpers they use."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from ranks import rank_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_flops_per_token_formulas():
    import gpu_check
    n, t = 1000, 100
    assert gpu_check.flops_per_token(n, n, "full") == 6 * n
    assert gpu_check.flops_per_token(n, t, "last_layers") == 2 * n + 4 * t
    assert gpu_check.flops_per_token(n, t, "lora") == 4 * n + 2 * t


def test_peak_flops_lookup():
    import gpu_check
    assert gpu_check.peak_flops("NVIDIA H200") == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_flops("Some Unknown Accelerator") is None


def test_steady_rate_skips_warm_steps():
    import train_overhead as to
    # 5 slow warm-up steps, then 10 steps of 100 tokens in 1 s each
    rows = [{"step": i, "t": 10.0 * i, "tokens": 100} for i in range(1, to.WARM + 1)]
    last = rows[-1]["t"]
    rows += [{"step": to.WARM + i, "t": last + i, "tokens": 100} for i in range(1, 11)]
    assert to.steady_rate(rows, "t") == pytest.approx(100.0)
    with pytest.raises(RuntimeError, match="only 3 steps logged"):
        to.steady_rate(rows[:3], "t")


def test_gpu_markdown_reports_errors_and_rows():
    import gpu_check
    res = {"date": "2026-01-01 00:00 UTC", "device_name": "NVIDIA H200", "torch": "2.x",
           "command": "python bench/gpu_check.py", "seconds": 12.0, "dry": False,
           "throughput": {"micro_batch": 4, "seq": 1024, "rows": {
               "zero2 full": {"trainable": 10, "tokens_per_s": 123.0, "flops_per_token": 60,
                              "mfu": 0.5, "max_memory_allocated": 2**30},
               "zero3 lora": {"skipped": "deadline reached"}}},
           "memory": {"rows": {"zero2 full": {"plan_peak_allocated": 2**30, "measured": 2**30,
                                              "ratio": 1.0, "plan_peak_reserved": 2 * 2**30,
                                              "max_memory_reserved": 3 * 2**29}}},
           "errors": {"quantization": "Traceback ...\nModuleNotFoundError: No module named 'bitsandbytes'"}}
    text = gpu_check.markdown(res)
    assert "| zero2 full | 1.00 | 1.00 | 1.000 | 2.00 | 1.50 | 0.750 |" in text  # reserved vs plan
    assert "NVIDIA H200" in text and "| zero2 full | 10 | 123 | 60 | 0.500 | 1.00 |" in text
    assert "deadline reached" in text
    assert "No module named 'bitsandbytes'" in text


@pytest.mark.slow
def test_gpu_check_cpu_dry_end_to_end(tmp_path):
    """The GPU script's every part on CPU with a tiny model, through bench/gpu_check.sh as the GPU
    machine runs it: no typo waits for a GPU, and a wheel that does not install is recorded while
    every part still runs."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-0.1-py3-none-any.whl").write_bytes(b"not a zip file")
    env = rank_env(PYTHON=sys.executable, OUT=str(tmp_path), GPU_CHECK_WHEELS=str(wheels),
                   GPU_CHECK_SITE=str(tmp_path / "site"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--cpu-dry"],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"wheel not installed: {wheels}/broken-0.1-py3-none-any.whl" in \
        (tmp_path / "env.txt").read_text()
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["dry"] is True and res["errors"] == {}
    mem = res["memory"]["rows"]
    assert set(mem) >= {"zero2 full", "zero2 lora", "zero3 full"}
    assert all(r["measured"] > 0 and r["plan_peak_allocated"] > 0 for r in mem.values())
    tp = res["throughput"]["rows"]
    assert set(tp) == {"zero2 full", "zero2 frozen", "zero2 lora", "zero2 full 8-bit adam",
                       "zero3 full", "zero3 frozen", "zero3 lora"}
    for name, r in tp.items():
        assert r["tokens_per_s"] > 0, (name, r)
        assert 0 < r["trainable"] <= r["params"]
    assert tp["zero2 frozen"]["trainable"] < tp["zero2 full"]["trainable"]
    assert tp["zero2 lora"]["flops_per_token"] < tp["zero2 full"]["flops_per_token"]
    quant = res["quantization"]["runs"]
    assert quant and all("error" not in r for r in quant), quant
    ranks = res["ranks"]["rows"]
    assert set(ranks) == {"dry-run", "zero3 lora", "vs hand loop"}
    assert all(r["rc"] == 0 for r in ranks.values()), ranks
    hand = ranks["vs hand loop"]
    assert hand["tokens_per_s"] > 0 and hand["hand_tokens_per_s"] > 0 and hand["hand_steps"] == 3, hand
    lora = ranks["zero3 lora"]
    assert lora["steps"] == 3 and lora["max_abs_logit_diff"] < 1e-3 * max(1.0, lora["logit_scale"])
    md = (tmp_path / "gpu-results.md").read_text()
    assert "CPU dry run" in md and "| zero3 lora |" in md and "| dry-run | 0 |" in md
    assert "| vs hand loop | 0 |" in md and "(hand loop " in md
