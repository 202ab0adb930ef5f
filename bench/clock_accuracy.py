"""The time estimate after a dry run against the run it predicts: `ftlaunch run --dry-run` (3
steps, its step time kept beside the data cache), `ftlaunch plan`'s estimate of the whole run
from it, then the real run of STEPS steps on the same machine, one after the other.

    python bench/clock_accuracy.py [--steps 200] [--work DIR]

Prints the estimate, the measured training time (metrics.jsonl's elapsed_s at the last step) and
their ratio. The model is the tiny Llama of examples/tiny_recipe.py (2 blocks, hidden 64), fp32,
ZeRO-1, one CPU rank, packed 128-token rows, micro batch 8. A machine shared with other work
moves the step time within a run (0.19-0.35 s a step was seen under a load of 16 on 2 cores):
run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))


def ftlaunch(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "launcher", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)


def run_file(work: str, steps: int) -> str:
    import tiny_recipe
    tiny = tiny_recipe.build(os.path.join(work, "tiny"))
    path = os.path.join(work, "run.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"""\
name: measured
model: {{path: {tiny['model']}, dtype: fp32}}
data: {{path: {tiny['text']}, max_seq_len: 128, packing: true, cache_dir: {os.path.join(work, 'cache')}}}
train: {{max_steps: {steps}, micro_batch_size: 8, lr: 1.0e-3, device: cpu, log_every: 10}}
deepspeed: {{zero_stage: 1}}
cluster: {{nodes: 1, gpus_per_node: 1}}
output: {{dir: {os.path.join(work, 'run')}, save_final: false}}
""")
    return path


def measure(steps: int, work: str) -> dict:
    from launcher.config.runfile import load
    from launcher.memory import clock
    path = run_file(work, steps)
    dry = ftlaunch("run", path, "--dry-run", "--nproc", "1")
    if dry.returncode != 0:
        raise SystemExit(dry.stderr[-3000:])
    est = clock.estimate(load(path, []))
    real = ftlaunch("run", path, "--nproc", "1")
    if real.returncode != 0:
        raise SystemExit(real.stderr[-3000:])
    with open(os.path.join(work, "run", "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(x) for x in fh]
    measured = [r for r in rows if "loss" in r][-1]["elapsed_s"]
    return {"steps": steps, "estimate_s": est.train_s, "measured_s": measured,
            "ratio": est.train_s / measured, "step_how": est.step_how}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--work", help="folder for the model and the run (default: a temporary one)")
    a = ap.parse_args(argv)
    r = measure(a.steps, a.work or tempfile.mkdtemp(prefix="clock_accuracy."))
    print(f"estimate after a dry run {r['estimate_s']:.2f} s ({r['step_how']})")
    print(f"measured {r['steps']}-step run {r['measured_s']:.2f} s")
    print(f"estimate / measured: {r['ratio']:.3f} (error {r['ratio'] - 1:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
