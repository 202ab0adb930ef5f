"""Every CPU benchmark in one run; writes docs/benchmarks.md and its plots (`make bench`).

    .venv/bin/python bench/run_all.py               # ~5 minutes on 2 cores
    .venv/bin/python bench/run_all.py --full        # + plan vs measured / vs estimator (~6 min more)
    .venv/bin/python bench/run_all.py --only optimizer_memory,train_overhead --doc /tmp/b.md

Parts, each against a peer measured in the same run:
- latency (bench/latency.py): ftlaunch validate / ds-config / slurm / plan vs `deepspeed --help`
  and `accelerate launch --help`;
- optimizer_memory (bench/optimizer_memory.py): optimizer state vs freeze fraction, ftlaunch vs
  freezing after deepspeed.initialize vs DeepSpeed's estimator;
- train_overhead (bench/train_overhead.py): tokens/s and time to first step, `ftlaunch run` vs a
  hand-written DeepSpeed loop vs the Hugging Face Trainer;
- with --full: bench/plan_vs_measured.py + bench/plan_vs_estimator.py (they update docs/memory.md).
A part that fails is reported in the page with its error; the others still run.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(ROOT, "examples"))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
PARTS = ("latency", "optimizer_memory", "train_overhead")


def machine() -> str:
    from machine_info import processor
    model = processor()
    import torch
    return (f"{os.cpu_count()} CPUs (nproc), {model}; Python {platform.python_version()}, "
            f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f} at the start")


def part_latency(docs: str) -> str:
    import latency
    rows = latency.main(None, runs=5)
    return ("## Login-node latency\n\nMedian of 5 runs after a warm-up; ratio = peer median / "
            "ftlaunch median (how many times faster ftlaunch answers).\n\n"
            f"{latency.table(rows)}\n\n{latency.verdict(rows)}\n\n"
            "Command: `.venv/bin/python bench/latency.py --runs 5` (details: docs/benchmarks-latency.md)\n")


def part_optimizer_memory(docs: str) -> str:
    import optimizer_memory as om
    png = os.path.join(docs, "optimizer_memory.png")
    rows = om.main(None, png)
    lines = [f"- {r['frozen_pct']:.1f}% frozen: frozen after initialize holds "
             f"{r['after_init']['optimizer_state_bytes'] / r['ftlaunch']['optimizer_state_bytes']:.2f}x "
             "the optimizer state of ftlaunch; DeepSpeed's estimator counts "
             f"{r['estimator_optimizer_state'] / r['ftlaunch']['optimizer_state_bytes']:.2f}x" for r in rows]
    return (f"## Optimizer memory vs freeze fraction\n\n{rows[0]['params']:,}-parameter Llama "
            "(8 blocks, hidden 256), bf16, ZeRO-2, 2 CPU ranks; AdamW state read from the engines "
            "after one step (launcher/rank/engine_stats.py), summed over ranks. \"Frozen after "
            "initialize\" builds the engine over all parameters and then sets requires_grad=False "
            "(the common mistake); the estimator column is the 8 bytes a parameter of AdamW state "
            "in DeepSpeed's `estimate_zero2_model_states_mem_needs`, which counts every parameter. "
            "Model states = optimizer state + fp32 masters + gradients + bf16 weights, all ranks; "
            "the estimator's model states are its per-GPU figure x 2.\n\n"
            f"{om.table(rows)}\n\n" + "\n".join(lines) +
            f"\n\n![optimizer state vs freeze fraction]({os.path.basename(png)})\n\n"
            "Command: `.venv/bin/python bench/optimizer_memory.py --png docs/optimizer_memory.png`\n")


def _overhead_plot(res: dict, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = {"ftlaunch": "ftlaunch run", "ftlaunch_train": "ranks alone", "deepspeed": "DeepSpeed loop",
             "hf_trainer": "HF Trainer"}
    keys = [k for k in names if k in res and "error" not in res[k]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in keys:
        runs = res[k]["runs"]
        a.scatter([names[k]] * len(runs), [r["tokens_per_s"] for r in runs], alpha=0.6)
        a.bar(names[k], res[k]["tokens_per_s"], alpha=0.3)
        b.scatter([names[k]] * len(runs), [r["first_step_s"] for r in runs], alpha=0.6)
        b.bar(names[k], res[k]["first_step_s"], alpha=0.3)
    a.set_ylabel("tokens/s (bars: median, dots: runs)")
    b.set_ylabel("time to first step (s)")
    a.set_title("throughput, 2 CPU ranks", fontsize=9)
    b.set_title("start-up", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def part_train_overhead(docs: str) -> str:
    import train_overhead as to
    res = to.main(steps=30, hf=True, rounds=3)
    png = os.path.join(docs, "train_overhead.png")
    _overhead_plot(res, png)
    ratio = res["ftlaunch"]["tokens_per_s"] / res["deepspeed"]["tokens_per_s"]
    hf = res.get("hf_trainer", {})
    hf_note = (f"\n\nThe HF Trainer did not run here: `{hf['error'][-400:]}`" if "error" in hf else "")
    return (f"## Training overhead and time to first step\n\n~6.5M-parameter Llama, bf16, ZeRO-2, "
            f"2 CPU ranks (OMP_NUM_THREADS=1), micro batch {res['micro']}, {res['seq']}-token packed "
            f"sequences, {res['steps']} steps; tokens/s over steps {res['warm'] + 1}-{res['steps']}. "
            f"{res['rounds']} rounds, contenders interleaved, medians; {res['rounds']} x 4 jobs. "
            "Every contender uses the same "
            "DeepSpeed config (the one `ftlaunch` builds) and trains the same collated micro "
            "batches (ftlaunch's packed rows, per-document position ids and block-diagonal "
            "causal mask: `--batches ftlaunch`, the default), so each step is the same "
            "computation and the comparison is of the loops. Time to first step is "
            "from starting the command to the end of the first optimizer step.\n\n"
            f"{to.table(res)}\n\n"
            f"ftlaunch / hand-written DeepSpeed loop, tokens/s: **{ratio:.3f}** (target >= 0.97). "
            "In the time-to-first-step column a ratio above 1 means ftlaunch takes longer. "
            "`ftlaunch run` does work before it starts the ranks that the peers do not: it "
            "computes and prints the memory plan (the model on the meta device: the ~3 s of "
            "`ftlaunch plan` above), checks the data and writes the run directory. The "
            "\"ftlaunch train\" row is the rank half alone, started the way the peers are: its "
            "start-up is comparable to the hand-written loop's. Tokens/s ratios within a few "
            "percent either way are within this shared machine's run-to-run noise (the dots in "
            "the plot are the single runs). The HF Trainer runs here with `use_cpu=True` and "
            "TrainingArguments set to the DeepSpeed config's values (warmup, lr, betas, eps, "
            "weight decay, clipping): transformers refuses a config that disagrees with them."
            f"{hf_note}\n\n![training overhead]({os.path.basename(png)})\n\n"
            "Command: `.venv/bin/python bench/train_overhead.py --steps 30 --rounds 3`\n")


def part_full(docs: str) -> str:
    import tempfile
    rows = os.path.join(tempfile.mkdtemp(prefix="bench-full-"), "rows.json")
    py = sys.executable
    for cmd in ([py, "bench/plan_vs_measured.py", "--json", rows],
                [py, "bench/plan_vs_estimator.py", "--from", rows, "--doc", "docs/memory.md"]):
        subprocess.run(cmd, cwd=ROOT, check=True)
    return ("## Memory plan vs measured and vs DeepSpeed's estimator\n\nWritten into "
            "docs/memory.md by `bench/plan_vs_measured.py --json rows.json` and "
            "`bench/plan_vs_estimator.py --from rows.json --doc docs/memory.md`.\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="also the memory plan benchmarks (~6 min)")
    ap.add_argument("--only", help=f"comma list of parts among {', '.join(PARTS)}")
    ap.add_argument("--doc", default=DOC, help="page to write (plots go beside it)")
    a = ap.parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/ftlaunch-torch-extensions"))
    parts = a.only.split(",") if a.only else list(PARTS) + (["full"] if a.full else [])
    docs = os.path.dirname(os.path.abspath(a.doc))
    os.makedirs(docs, exist_ok=True)
    head = (f"# Benchmarks\n\nWritten by `.venv/bin/python bench/run_all.py` (`make bench`) on "
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}. Machine: {machine()}. Every result is a ratio "
            "against a peer measured in the same run; the machine is shared, so absolute "
            "timings are noisy. GPU measurements (memory vs plan, tokens/s, MFU) come from a separate "
            "script: see docs/gpu-results.md.\n")
    sections, failed = [], []
    t_all = time.time()
    for part in parts:
        t0 = time.time()
        print(f"== {part}", flush=True)
        try:
            text = globals()[f"part_{part}"](docs)
        except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others
            failed.append(part)
            traceback.print_exc()
            text = f"## {part}\n\nFailed in this run: `{type(exc).__name__}: {str(exc)[-800:]}`\n"
        sections.append(text + f"\n({part}: {time.time() - t0:.0f} s)\n")
    body = head + "\n" + "\n".join(sections) + f"\nTotal: {time.time() - t_all:.0f} s.\n"
    with open(a.doc, "w", encoding="utf-8") as fh:
        fh.write(body)
    print(f"wrote {a.doc} in {time.time() - t_all:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
