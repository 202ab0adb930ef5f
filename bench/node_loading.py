"""How CPU ranks really load a sharded checkpoint, against the plan's per-node loading terms.

    .venv/bin/python bench/node_loading.py [--doc docs/memory.md]

The 20M-parameter Llama of bench/plan_vs_measured.py, saved in bf16 with `save_pretrained(...,
max_shard_size="8MB")` (6 shards), trained in bf16 on 2 CPU ranks at ZeRO 0-3 and ZeRO-2 with
optimizer offload, one launch (`plan_vs_measured.run_ranks`). Each rank samples its RssAnon
(private memory) and RssFile (checkpoint pages mapped) every 2 ms while `from_pretrained` runs,
above the baseline taken just before it, and reads its peak RSS at the end of
`deepspeed.initialize` (VmHWM, reset at the baseline), when every weight has been read, and
again after 2 training steps: the node's figure is the sum of its ranks' peaks, against the
plan's node peak less the ranks' baselines (the kernels term measured on this machine).

What it shows (the plan's loading model, launcher/memory/node.py):
- ZeRO-0/1/2: `from_pretrained` returns views of the memory-mapped shards: almost no private
  memory, and the file pages are read lazily (when DeepSpeed copies the weights into its
  buffers); the checkpoint is in the node's page cache once, whatever the number of ranks.
- ZeRO-3: rank 0 maps the whole checkpoint and each rank's private memory is its partition plus
  the module being gathered, the same on rank 0 as on rank 1: no second copy of the state dict.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import plan_vs_measured as pvm  # noqa: E402

BEGIN, END = "<!-- node_loading:begin -->", "<!-- node_loading:end -->"
SETTINGS = {"z0": (0, "none"), "z1": (1, "none"), "z2": (2, "none"), "z3": (3, "none"),
            "z2 offload": (2, "cpu")}


def sharded_model(work: str, shard: str = "8MB") -> dict:
    """The bench's 20M model re-saved in bf16, in several shards."""
    paths = pvm.build_model(work, "20m")
    out = os.path.join(work, "20m-sharded")
    if not os.path.exists(os.path.join(out, "config.json")):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.bfloat16)
        model.save_pretrained(out, max_shard_size=shard)
        AutoTokenizer.from_pretrained(paths["model"]).save_pretrained(out)
    return {**paths, "model": out}


def checkpoint_bytes(model_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
               if f.endswith(".safetensors"))


def measure(work: str, settings: list[str], steps: int = 2) -> list[dict]:
    """Per setting: the plan's loading terms and per-node figure (above the ranks' baselines),
    each rank's measured loading memory and its peak RSS over loading and `steps` steps."""
    from launcher import memory
    from launcher.config import runfile
    from launcher.memory import node, probe
    paths = sharded_model(work)
    runs = []
    for name in settings:
        stage, offload = SETTINGS[name]
        pvm.SETTINGS[name] = dict(stage=stage, offload=offload)
        runs.append(pvm.write_run(work, "20m", name, paths))
    res = pvm.run_ranks(runs, os.path.join(work, "out.json"), steps=steps,
                        extra_env={"PVM_TORCH_ADAM_OFFLOAD": "1"})
    rows = []
    for name, run, ranks in zip(settings, runs, res):
        cfg = runfile.load(run)  # the kernels measured on this machine (cached: one probe)
        p = memory.plan(cfg, world_size=2, advise=False, kernels=probe.measure(cfg))
        rows.append({"setting": name, "checkpoint": checkpoint_bytes(paths["model"]),
                     "shards": sum(f.endswith(".safetensors") for f in os.listdir(paths["model"])),
                     "plan_load": {t.key: t.bytes for t in p.node_terms if "load" in t.phase.split()
                                   and t.key != "rank_host"},
                     "weights": p.term("weights"), "ranks": ranks, "node_phase": p.node_phase,
                     # loading and the steps are measured, not the final save
                     "plan_node": max(sum(t.bytes for t in p.node_terms if ph in t.phase.split())
                                      for ph in ("load", "train")) - 2 * node.CPU_RANK_BASE,
                     "measured_node": sum(rk["peak"] for rk in ranks),
                     "plan_rank": p.total_per_gpu,
                     # before offload: where they live does not change the bytes
                     "plan_terms": {"masters": p.states.masters, "optimizer": p.states.optim},
                     "engine": {k: max(rk[k] for rk in ranks) for k in ("masters", "optimizer")}})
    return rows


def table(rows: list[dict]) -> str:
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    out = ["| setting | rank | private memory during from_pretrained MiB | checkpoint pages mapped "
           "MiB (of the checkpoint) | peak RSS to the end of initialize MiB | plan: loading terms "
           "per node MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        terms = ", ".join(f"{k} {mib(v)}" for k, v in r["plan_load"].items()) or "-"
        for i, rk in enumerate(r["ranks"]):
            out.append(f"| {r['setting']} | {i} | {mib(rk['load_anon_peak'])} | "
                       f"{mib(rk['load_file_peak'])} ({rk['load_file_peak'] / r['checkpoint']:.2f}) | "
                       f"{mib(rk['init_peak'])} | {terms if i == 0 else ''} |")
    out += ["", "| setting | node: sum of the ranks' peak RSS above their baselines MiB | plan: "
            "node peak less the ranks' baselines MiB (phase) | measured/plan |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['setting']} | {mib(r['measured_node'])} | {mib(r['plan_node'])} "
                   f"({r['node_phase']}) | {r['measured_node'] / r['plan_node']:.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--work", help="folder for the model and run files (default: a temporary one)")
    ap.add_argument("--doc", help="write the table into this markdown file between the markers")
    a = ap.parse_args(argv)
    work = a.work or tempfile.mkdtemp(prefix="node_loading.")
    rows = measure(work, a.settings.split(","))
    ck = rows[0]["checkpoint"]
    text = (f"Written by `bench/node_loading.py` ({time.strftime('%Y-%m-%d')}, 2 CPU ranks, a "
            f"{ck / 2**20:.1f} MiB bf16 checkpoint in {rows[0]['shards']} shards):\n\n"
            f"    .venv/bin/python bench/node_loading.py --doc docs/memory.md\n\n{table(rows)}")
    print(text)
    if a.doc:
        pvm.write_doc(a.doc, text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
