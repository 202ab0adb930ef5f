"""The time estimate after a dry run against the run it predicts: `ftlaunch run --dry-run` (its
step time and fixed costs kept beside the data cache), `ftlaunch plan`'s estimate of the whole
run from it, then the real run of STEPS steps on the same machine, one after the other.

    python bench/clock_accuracy.py [--steps 200] [--repeat 3] [--work DIR]

Both sides are the same quantity: the ranks' wall time, torchrun started to exited, as
`ftlaunch run` prints it (`the ranks ran ... s`) for the real run, and as the estimate's total
(start-up and shut-down, the first steps' warm-up, STEPS x the median step, the evaluations and
checkpoint saves at their intervals) for the dry run. The launcher's own checks before the
ranks start (plan, data check) are in neither. Prints, per repeat, each term of the estimate,
the measured time, their ratio, the dry run's step spread, the real run's median logged step
(and the estimate's terms with it in place of the dry run's: how much of the error is the step
time moving between the two), and /proc/loadavg before the dry run, between and after (the
machine may be shared with other work), with the share of the CPU the ranks got: their CPU
seconds per second of wall time (one rank of OMP_NUM_THREADS=1: about 1 on an idle machine,
less when other work takes the cores).

The model is the tiny Llama of examples/tiny_recipe.py (2 blocks, hidden 64), fp32, ZeRO-1,
one CPU rank, packed 128-token rows, micro batch 8, 5% of the data held out for evaluation
every 100 steps, a checkpoint every 50 steps (the final one included), no export.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

RANKS_RAN = re.compile(r"ftlaunch: the ranks ran ([0-9.]+) s .*; ([0-9.]+) CPU seconds")


def ftlaunch(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "launcher", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)


def run_file(work: str, steps: int, tiny: dict) -> str:
    path = os.path.join(work, "run.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"""\
name: measured
model: {{path: {tiny['model']}, dtype: fp32}}
data: {{path: {tiny['text']}, max_seq_len: 128, packing: true, eval_fraction: 0.05,
        cache_dir: {os.path.join(work, 'cache')}}}
train: {{max_steps: {steps}, micro_batch_size: 8, lr: 1.0e-3, device: cpu, log_every: 10,
         eval_every: 100, checkpoint_every: 50}}
deepspeed: {{zero_stage: 1}}
cluster: {{nodes: 1, gpus_per_node: 1}}
output: {{dir: {os.path.join(work, 'run')}, save_final: false}}
""")
    return path


def loadavg() -> str:
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "?"


def ranks_s(proc: subprocess.CompletedProcess) -> tuple[float, float]:
    """The ranks' (wall seconds, CPU seconds), as `ftlaunch run` prints them."""
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    m = RANKS_RAN.search(proc.stdout)
    if not m:
        raise SystemExit(f"no 'the ranks ran' line in:\n{proc.stdout[-3000:]}")
    return float(m.group(1)), float(m.group(2))


def measure(steps: int, work: str, tiny: dict) -> dict:
    from launcher.cluster import step_time
    from launcher.config.runfile import load
    from launcher.memory import clock
    path = run_file(work, steps, tiny)
    shutil.rmtree(os.path.join(work, "run"), ignore_errors=True)   # a fresh run each repeat
    load_before = loadavg()
    dry_ranks, dry_cpu = ranks_s(ftlaunch("run", path, "--dry-run", "--nproc", "1"))
    cfg = load(path, [])
    est = clock.estimate(cfg)
    rec = step_time.dry_record(cfg) or {}
    load_between = loadavg()
    measured, real_cpu = ranks_s(ftlaunch("run", path, "--nproc", "1"))
    load_after = loadavg()
    with open(os.path.join(work, "run", "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(x) for x in fh]
    logged = [r["step_time_s"] for r in rows if "loss" in r][1:]
    real_step = statistics.median(logged) if logged else None
    # the run's own start-up and shut-down: its ranks' time less its loop (the last line's
    # elapsed_s) and less its final checkpoint save (after that line; the dry run's time for it)
    loop = max(float(r["elapsed_s"]) for r in rows if "elapsed_s" in r)
    real_phases = step_time.startup_phases(os.path.join(work, "run")) or {}
    real_startup = measured - loop - float(rec.get("checkpoint_s") or 0.0)
    # the run at the dry run's CPU share: how much of the error is the share the machine gave
    at_dry_share = real_cpu / (dry_cpu / dry_ranks)
    # the estimate's terms with the real run's own step time: what is left is the fixed terms'
    own = est.total_s - est.train_s + steps * real_step if real_step else None
    return {"steps": steps, "estimate_s": est.total_s, "train_s": est.train_s,
            "fixed": est.fixed, "measured_s": measured, "ratio": est.total_s / measured,
            "step_s": est.step_s, "low_s": rec.get("low_s"), "high_s": rec.get("high_s"),
            "dry_ranks_s": dry_ranks, "real_step_s": real_step, "own_s": own,
            "startup_s": rec.get("startup_s"), "real_startup_s": real_startup,
            "dry_phases": rec.get("startup_phases_s") or {}, "real_phases": real_phases,
            "dry_cpu": dry_cpu / dry_ranks, "real_cpu": real_cpu / measured,
            "at_dry_share_s": at_dry_share,
            "load_before": load_before, "load_between": load_between, "load_after": load_after}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--work", help="folder for the model and the runs (default: a temporary one)")
    a = ap.parse_args(argv)
    import tiny_recipe
    work = a.work or tempfile.mkdtemp(prefix="clock_accuracy.")
    tiny = tiny_recipe.build(os.path.join(work, "tiny"))
    results = []
    for i in range(a.repeat):
        r = measure(a.steps, work, tiny)
        results.append(r)
        print(f"run {i + 1}: load {r['load_before']} before the dry run, {r['load_between']} "
              f"before the real run, {r['load_after']} after; the ranks' CPU share (CPU seconds per "
              f"second) {r['dry_cpu']:.2f} in the dry run, {r['real_cpu']:.2f} in the run")
        print(f"  estimate after a dry run {r['estimate_s']:.2f} s = {r['steps']} steps x "
              f"{r['step_s']:.4f} s {r['train_s']:.2f} s"
              + "".join(f" + {what} {x:.2f} s" for what, x in r["fixed"]))
        print(f"  dry run: steps {r['low_s']:.4f}-{r['high_s']:.4f} s, its ranks ran "
              f"{r['dry_ranks_s']:.2f} s")
        print(f"  measured {r['steps']}-step run {r['measured_s']:.2f} s (the ranks' wall time), "
              f"median logged step {r['real_step_s']:.4f} s")
        print(f"  start-up and shut-down: {r['startup_s']:.2f} s in the dry run, "
              f"{r['real_startup_s']:.2f} s in the run")
        for phase in dict.fromkeys([*r["dry_phases"], *r["real_phases"]]):
            dry, real = r["dry_phases"].get(phase), r["real_phases"].get(phase)
            print(f"    {phase:28} dry run {dry if dry is not None else '-':>7} s, "
                  f"run {real if real is not None else '-':>7} s")
        print(f"  estimate / measured: {r['ratio']:.3f} (error {r['ratio'] - 1:+.1%})")
        print(f"  the run at the dry run's CPU share would take {r['at_dry_share_s']:.2f} s: "
              f"estimate / that {r['estimate_s'] / r['at_dry_share_s']:.3f}")
        if r["own_s"]:
            print(f"  the same terms with the real run's median step: {r['own_s']:.2f} s (error "
                  f"{r['own_s'] / r['measured_s'] - 1:+.1%}: the fixed terms' share of the error; "
                  "the rest is the step time moving between the dry run and the run)", flush=True)
    if len(results) > 1:
        print("errors: " + ", ".join(f"{r['ratio'] - 1:+.1%}" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
