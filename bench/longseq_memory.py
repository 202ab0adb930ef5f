"""Long sequences on CPU ranks: each switch's step memory against the plan, and the longest
sequence that trains under a fixed memory budget with the switches on vs off (one run).

    .venv/bin/python bench/longseq_memory.py [--seq 4096] [--budget 1GiB] [--doc docs/long-sequences.md]

Model: a Llama of 4 blocks, hidden 256, 4 heads (2 KV), MLP 688, vocabulary 32,000, fp32,
gradient checkpointing, ZeRO-2 (buckets of 5M elements: RLIMIT_AS counts DeepSpeed's
default 500M-element bucket as 2 GB of address space even where it is never touched), built here
(examples/tiny_recipe.py). Each setting runs in its own
ranks (torchrun; 2 ranks for sequence_parallel 2, else 1), through the training loop's own code
(launcher/rank/train.py setup, launcher/rank/loop_steps.py collate_for,
launcher/rank/longseq.py micro_loss).

1. Step memory: after one warm step at a short length (optimizer state, gradients and kernels
   allocated), the rank's RSS is the baseline and its high-water mark is reset; one step at --seq
   tokens; measured = VmHWM - baseline. Plan: the sum of the plan's activation terms at that
   length (launcher/memory/longseq.py KEYS: activations, backward temporaries, chunks, masks,
   all-to-all buffers); the weights, gradients and optimizer state are in the baseline.
2. Longest sequence under a budget: after the warm step, RLIMIT_AS is set to the process's address
   space + --budget, then steps at growing lengths (x1.25, multiples of 256) until one fails to
   allocate; the longest that trained is reported. Sequence-parallel ranks fail together
   (torchrun ends the group when a rank fails); the last length both finished is the answer.

activation_offload is not measured: on CPU ranks the activations are in host memory already
(validate refuses it there); the plan's figure for it is what moves to the node's memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

BEGIN = "<!-- longseq_memory:begin -->"
END = "<!-- longseq_memory:end -->"
SETTINGS = {  # name -> train.* keys
    "plain": {},
    "tiled_loss": {"tiled_loss": "true"},
    "tiled_mlp": {"tiled_mlp": "true"},
    "sequence_parallel 2": {"sequence_parallel": "2"},
    "all": {"tiled_loss": "true", "tiled_mlp": "true", "sequence_parallel": "2"},
}
RUN = """\
name: ls-{tag}
model: {{path: {model}, tokenizer: {tok}, dtype: fp32, gradient_checkpointing: true}}
data: {{path: {data}, max_seq_len: {seq}, packing: false}}
train: {{max_steps: 10, micro_batch_size: 1, device: cpu{train}}}
deepspeed: {{zero_stage: 2, overrides: {{zero_optimization: {{reduce_bucket_size: 5000000,
           allgather_bucket_size: 5000000}}}}}}
cluster: {{gpus_per_node: {ranks}}}
output: {{dir: {out}}}
"""


# ------------------------------------------------------------------ rank side
def one_step(s, seq: int, gen) -> None:
    import torch

    from launcher.rank import longseq
    from launcher.rank.loop_steps import collate_for, to_device
    vocab = int(s.engine.module.config.vocab_size)
    ids = torch.randint(3, vocab, (seq,), generator=gen).tolist()
    batch = collate_for(s)([{"input_ids": ids, "labels": ids}])
    batch.pop("num_tokens")
    batch = to_device(batch, s.device)
    if longseq.active(s.cfg):
        loss, _, _ = longseq.micro_loss(s.engine, s.hidden, batch, s.sp, s.cfg.train.tiled_loss)
    else:
        loss = s.engine(**batch).loss
    s.engine.backward(loss)
    s.engine.step()


def rank_main(run: str, lengths: list[int], budget: int, out: str) -> None:
    import gc
    import resource

    import torch
    import torch.distributed as dist

    from launcher.config import runfile
    from launcher.rank import train
    from launcher.cluster.dist_env import from_environ
    from plan_vs_measured import _reset_peak, _status
    cfg = runfile.load(run)
    env = from_environ()
    s = train.setup(cfg, env, load_data=False)
    s.engine.train()
    gen = torch.Generator().manual_seed(0)  # the same tokens on every rank of a group
    one_step(s, 512, gen)  # optimizer state, gradient buffers, kernels
    gc.collect()
    base = _status("VmRSS")
    _reset_peak()
    if budget:
        space = _status("VmSize")
        resource.setrlimit(resource.RLIMIT_AS, (space + budget, space + budget))
    done = []
    for seq in lengths:
        try:
            one_step(s, seq, gen)
        except (RuntimeError, MemoryError) as exc:
            print(f"rank {env.rank}: {seq} tokens: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
            os._exit(3)  # torchrun ends the other ranks of the group
        done.append({"seq": seq, "peak": _status("VmHWM") - base})
        gc.collect()
        if env.rank == 0:
            with open(out, "w", encoding="utf-8") as fh:
                json.dump(done, fh)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------ driver side
def build(work: str) -> dict:
    import tiny_recipe
    base = os.path.join(work, "tiny")
    if not os.path.exists(os.path.join(base, "model", "config.json")):
        tiny_recipe.build(base)
    model = os.path.join(work, "llama-32k")
    if not os.path.exists(os.path.join(model, "config.json")):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(
            vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 17,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(model)
    return {"model": model, "tok": os.path.join(base, "tokenizer"),
            "data": os.path.join(base, "data", "text.jsonl")}


def write_run(work: str, paths: dict, name: str, seq: int) -> str:
    keys = SETTINGS[name]
    tag = name.replace(" ", "-")
    train = "".join(f", {k}: {v}" for k, v in keys.items())
    ranks = int(keys.get("sequence_parallel", 1))
    path = os.path.join(work, f"{tag}-{seq}.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(RUN.format(tag=tag, seq=seq, train=train, ranks=ranks,
                            out=os.path.join(work, "runs", tag), **paths))
    return path


def ranks(run: str, nproc: int, lengths: list[int], budget: int, out: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.abspath(__file__), "--rank", run,
           "--lengths", ",".join(map(str, lengths)), "--budget", str(budget), "--out", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 and not budget:
        raise RuntimeError(proc.stderr[-4000:])
    if not os.path.exists(out):
        return []
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)


def planned(run: str) -> int:
    from launcher import memory
    from launcher.config import runfile
    from launcher.memory.longseq import KEYS
    p = memory.plan(runfile.load(run), advise=False)
    return sum(t.bytes for t in p.terms if t.key in KEYS)


def growing(start: int, stop: int, step: int = 256) -> list[int]:
    out, s = [], start
    while s <= stop:
        out.append(s)
        s = max(s + step, int(s * 1.25) // step * step)
    return out


def main(argv: list[str] | None = None) -> int:
    from launcher.config.sizes import parse_size
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", help=argparse.SUPPRESS)
    ap.add_argument("--lengths", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=4096, help="length of the step-memory comparison")
    ap.add_argument("--budget", default="1GiB", help="memory above the baseline for part 2")
    ap.add_argument("--start", type=int, default=1024, help="first length tried in part 2")
    ap.add_argument("--max", type=int, default=1 << 17, help="longest length tried in part 2")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--parts", default="1,2", help="1: step memory vs plan; 2: longest under budget")
    ap.add_argument("--doc", help="write the tables into this markdown file between the markers")
    ap.add_argument("--work", default=os.path.join("/tmp", f"longseq-bench-{os.getuid()}"))
    a = ap.parse_args(argv)
    if a.rank:
        rank_main(a.rank, [int(x) for x in a.lengths.split(",")], int(a.budget), a.out)
        return 0
    os.makedirs(a.work, exist_ok=True)
    paths = build(a.work)
    out = os.path.join(a.work, "out.json")
    names = a.settings.split(",")
    lines = [f"Step memory at {a.seq:,} tokens (one rank's RSS high-water mark above its baseline "
             "after a warm step; plan: its activation terms):", "",
             "| setting | ranks | plan | measured | measured / plan |", "|---|---|---|---|---|"]
    for name in names if "1" in a.parts.split(",") else []:
        run = write_run(a.work, paths, name, a.seq)
        n = int(SETTINGS[name].get("sequence_parallel", 1))
        t0 = time.time()
        got = ranks(run, n, [a.seq], 0, out)
        plan = planned(run)
        peak = got[-1]["peak"]
        lines.append(f"| {name} | {n} | {plan / 2**20:,.1f} MiB | {peak / 2**20:,.1f} MiB | "
                     f"{peak / plan:.2f} |")
        print(lines[-1], f"({time.time() - t0:.0f} s)", flush=True)
    budget = parse_size(a.budget, "--budget")
    lines += ["", f"Longest sequence that trains under a budget of {a.budget} above the baseline "
              f"(RLIMIT_AS; lengths x1.25 from {a.start:,}):", "", "| setting | ranks | longest | plan's "
              "activations there |", "|---|---|---|---|"]
    longest = {}
    for name in ("plain", "all") if "2" in a.parts.split(",") else []:
        n = int(SETTINGS[name].get("sequence_parallel", 1))
        run = write_run(a.work, paths, name, a.seq)
        got = ranks(run, n, growing(a.start, a.max), budget, out)
        longest[name] = got[-1]["seq"] if got else 0
        plan = planned(write_run(a.work, paths, name, longest[name])) if longest[name] else 0
        lines.append(f"| {name} | {n} | {longest[name]:,} | {plan / 2**20:,.1f} MiB |")
        print(lines[-1], flush=True)
    if longest.get("plain"):
        lines += ["", f"all switches / none: {longest['all'] / longest['plain']:.1f}x"]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.doc:
        from plan_vs_measured import write_doc
        write_doc(a.doc, text, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
