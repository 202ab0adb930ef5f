"""Optimizer memory vs freeze fraction: ftlaunch (freeze, then initialize) vs freezing after
`deepspeed.initialize` (the common mistake) vs DeepSpeed's estimator.

    python bench/optimizer_memory.py [--out-md FILE] [--png FILE]

A Llama of about 6.5M parameters (8 blocks, hidden 256, MLP 688, vocab ~384; made with
examples/tiny_recipe.build_model, random weights) trains on 2 CPU ranks, ZeRO-2, bf16. One
rank subprocess (torch.distributed.run) builds the engines one after another:

- ftlaunch:  from_pretrained -> freeze.apply -> deepspeed.initialize(trainable)   (launcher/rank/train.py)
- mistake:   from_pretrained -> deepspeed.initialize(all) -> freeze.apply (requires_grad=False)
- estimator: DeepSpeed's estimate_zero2_model_states_mem_needs on the model; it counts every
  parameter (`model_to_params`), trainable or not. Its optimizer-state term is 8 bytes a
  parameter (AdamW's two fp32 moments), split over the ranks.

Each engine runs one optimizer step (torch optimizers create their state at the first step);
the optimizer-state bytes are read from the engine's tensors (launcher/rank/engine_stats.py) and
summed over the ranks. Freeze fractions 0, ~50, ~90, ~99% by last_layers / patterns.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

WORLD = 2
ARCH = dict(layers=8, hidden=256, intermediate=688, heads=4)
SETTINGS = [  # name, freeze section
    ("0%", "{policy: full}"),
    ("~50%", "{policy: last_layers, trainable_layers: 4, also_train: []}"),
    ("~90%", "{policy: last_layers, trainable_layers: 1, also_train: []}"),
    ("~99%", "{policy: patterns, train: ['lm_head']}"),
]
RUN = """\
name: optmem
model: {{path: {model}, dtype: bf16}}
data: {{path: {data}, max_seq_len: 32}}
train: {{max_steps: 1, micro_batch_size: 2, device: cpu}}
freeze: {freeze}
deepspeed: {{zero_stage: 2}}
cluster: {{nodes: 1, gpus_per_node: {world}}}
output: {{dir: {out}}}
"""


def build_inputs(folder: str) -> dict[str, str]:
    """The model (ARCH), its tokenizer and a text file, under folder."""
    import tiny_recipe
    from transformers import AutoTokenizer
    os.makedirs(folder, exist_ok=True)
    text = tiny_recipe.sentences(400)
    tok_dir = tiny_recipe.build_tokenizer(os.path.join(folder, "tokenizer"), text)
    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    model = tiny_recipe.build_model(os.path.join(folder, "model"), vocab, layers=ARCH["layers"],
                                    hidden=ARCH["hidden"], intermediate=ARCH["intermediate"],
                                    heads=ARCH["heads"])
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(model)
    data = tiny_recipe.write_jsonl(os.path.join(folder, "text.jsonl"), [{"text": s} for s in text])
    return {"model": model, "tokenizer": tok_dir, "text": data}


# ------------------------------------------------------------------ rank side
def _one_step(engine, vocab: int) -> None:
    import torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 32), generator=g)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()


def _sum(values: list[int]) -> list[int]:
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t)
    return [int(x) for x in t.tolist()]


def rank_main(model: str, data: str, out_json: str) -> None:
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                      model_to_params)

    from launcher.cluster import dist_env
    from launcher.rank import engine_stats, train
    from launcher.model import freeze
    from launcher.config import runfile
    env = dist_env.from_environ()

    def parse(text: str):
        cfg, problems = runfile.parse(text)
        if cfg is None or problems:
            raise SystemExit("\n".join(str(p) for p in problems))
        return cfg
    rows = []
    for name, fz in SETTINGS:
        cfg = parse(RUN.format(model=model, data=data, freeze=fz, world=WORLD,
                                       out=os.path.dirname(out_json) + "/run"))
        full = parse(RUN.format(model=model, data=data, freeze="{policy: full}",
                                        world=WORLD, out=os.path.dirname(out_json) + "/run"))
        device = train.init_distributed(cfg, env)
        ds = train.build_ds_config(cfg, env, device)
        row: dict = {"setting": name, "freeze": fz}
        # ftlaunch: freeze before initialize
        m, _ = train.load_model(cfg, device, ds)
        m, report = freeze.apply(m, cfg)
        n_all = model_to_params(m)
        n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
        vocab = m.config.vocab_size
        engine = train.build_engine(cfg, m, ds)
        _one_step(engine, vocab)
        st = engine_stats.summary(engine)
        row["ftlaunch"] = dict(zip(st, _sum(list(st.values()))))
        del engine, m
        gc.collect()
        # the mistake: initialize over everything, freeze afterwards
        m, _ = train.load_model(full, device, ds)
        engine = train.build_engine(full, m, ds)
        freeze.apply(engine.module, cfg)
        _one_step(engine, vocab)
        st = engine_stats.summary(engine)
        row["after_init"] = dict(zip(st, _sum(list(st.values()))))
        _, est_rank = estimate_zero2_model_states_mem_needs(n_all, num_gpus_per_node=WORLD,
                                                            cpu_offload=False)
        row.update(params=n_all, trainable=n_train, frozen_pct=100.0 * (1 - n_train / n_all),
                   estimator_model_states=int(est_rank) * WORLD,
                   estimator_optimizer_state=8 * n_all)
        del engine, m
        gc.collect()
        rows.append(row)
        deepspeed.comm.barrier()
    if env.rank == 0:
        with open(out_json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    train.shutdown(barrier=True)


# ------------------------------------------------------------------ driver side
def measure(work: str) -> tuple[list[dict], float]:
    paths = build_inputs(os.path.join(work, "inputs"))
    out_json = os.path.join(work, "optimizer_memory.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", FTLAUNCH_NO_SAVE="1")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(WORLD), os.path.abspath(__file__), "--rank", paths["model"], paths["text"], out_json]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"optimizer_memory ranks failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(out_json, encoding="utf-8") as fh:
        return json.load(fh), time.time() - t0


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| frozen (target) | frozen (actual) | trainable params | ftlaunch optimizer state MiB "
             "| frozen after initialize MiB | DeepSpeed estimator (8 B x all params) MiB "
             "| mistake / ftlaunch | estimator / ftlaunch | ftlaunch model states MiB "
             "| estimator model states MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ft, af = r["ftlaunch"], r["after_init"]
        ours = ft["optimizer_state_bytes"]
        states = ours + ft["fp32_master_bytes"] + ft["grad_bytes"] + 2 * r["params"] * WORLD
        lines.append(
            f"| {r['setting']} | {r['frozen_pct']:.1f}% | {r['trainable']:,} | {_mib(ours)} "
            f"| {_mib(af['optimizer_state_bytes'])} | {_mib(r['estimator_optimizer_state'])} "
            f"| {af['optimizer_state_bytes'] / ours:.2f}x | {r['estimator_optimizer_state'] / ours:.2f}x "
            f"| {_mib(states)} | {_mib(r['estimator_model_states'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [r["frozen_pct"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(x, [r["ftlaunch"]["optimizer_state_bytes"] / 2**20 for r in rows], "o-",
            label="ftlaunch (freeze, then initialize)")
    ax.plot(x, [r["after_init"]["optimizer_state_bytes"] / 2**20 for r in rows], "s--",
            label="frozen after deepspeed.initialize")
    ax.plot(x, [r["estimator_optimizer_state"] / 2**20 for r in rows], "^:",
            label="DeepSpeed estimator (all params)")
    ax.set_xlabel("parameters frozen (%)")
    ax.set_ylabel("AdamW state, 2 ranks summed (MiB)")
    ax.set_title(f"Optimizer state vs freeze fraction ({rows[0]['params'] / 1e6:.1f}M Llama, ZeRO-2)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(out_md: str | None = None, png: str | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="optmem-") as work:
        rows, secs = measure(work)
    print(table(rows))
    for r in rows:
        ours = r["ftlaunch"]["optimizer_state_bytes"]
        print(f"frozen {r['frozen_pct']:.1f}%: after-initialize / ftlaunch = "
              f"{r['after_init']['optimizer_state_bytes'] / ours:.2f}x, "
              f"estimator / ftlaunch = {r['estimator_optimizer_state'] / ours:.2f}x")
    if png:
        plot(rows, png)
    if out_md:
        with open(out_md, "w", encoding="utf-8") as fh:
            fh.write(table(rows) + "\n")
    for r in rows:
        r["_seconds"] = secs
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank_main(*sys.argv[2:5])
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-md", help="write the table here")
    ap.add_argument("--png", help="write the plot here")
    a = ap.parse_args()
    main(a.out_md, a.png)
