"""Preprocessing throughput of chat data: ftlaunch's data path vs plain `datasets.map`.

1. Throughput (tokens/s), one run each, same tokenizer (the tiny ChatML tokenizer of
   examples/chat_demo.py), same template (the built-in chatml, with generation markers), same
   conversations, `datasets` and transformers imported before either is timed:
   `launcher.data.cached_load` with data.cache false (read, render, assistant masks, tokenize,
   as a rank without the cache; data.preprocessing_workers null: this machine's CPUs) vs
   `datasets.load_dataset("json")` + `Dataset.map(apply_chat_template(tokenize=True,
   return_assistant_tokens_mask=True), batched=True)` (one process, its default). Target: ratio
   >= 0.9. The same path with data.preprocessing_workers 1 is shown beside it.
2. Once per node: N processes started together, as N ranks of one node (LOCAL_WORLD_SIZE=N),
   each loading the data the ranks' way (`launcher.rank.inputs.load_data`) before their first step:
   with data.cache (one tokenizes with every CPU, the others wait and map the result) vs
   data.cache: false (each tokenizes, the CPUs shared). N = 2, and 8 (8 ranks emulated on the
   machine's cores).

    python bench/data_preprocess.py [--conversations 20000] [--ranks 2 8]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

RANK = """
import sys, time, json
t0 = time.time()
from launcher.rank import inputs
from launcher.config import runfile
cfg = runfile.load(sys.argv[1], sys.argv[2:])
tok = inputs.load_tokenizer(cfg)
splits = inputs.load_data(cfg, tok)
print(json.dumps({"s": time.time() - t0, "cache": splits.stats.get("cache", "off"),
                  "cpu": time.process_time()}))
"""


def write_data(folder: str, n: int) -> str:
    import chat_demo
    rng = random.Random(1)
    path = os.path.join(folder, "chat.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps({"messages": chat_demo.conversation(rng)}) + "\n")
    return path


def ours(path: str, tok, workers: int | None = None) -> tuple[float, int]:
    from launcher import data
    from launcher.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig
    cfg = RunConfig(name="b", model=ModelConfig(path="/none"), train=TrainConfig(max_steps=1),
                    data=DataConfig(path=path, messages_field="messages", chat_template="chatml",
                                    max_seq_len=512, cache=False, preprocessing_workers=workers))
    t = time.perf_counter()
    splits = data.cached_load(cfg, tok, warn=lambda m: None)
    return time.perf_counter() - t, splits.train.num_tokens


def plain_map(path: str, tok) -> tuple[float, int]:
    import datasets
    from launcher.data.chat import CHATML
    datasets.disable_progress_bars()
    t = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=path, split="train",
                               cache_dir=tempfile.mkdtemp(), keep_in_memory=True)

    def fn(batch):
        out = tok.apply_chat_template(batch["messages"], chat_template=CHATML, tokenize=True,
                                      return_dict=True, return_assistant_tokens_mask=True)
        return {"input_ids": out["input_ids"], "assistant_masks": out["assistant_masks"]}

    ds = ds.map(fn, batched=True, remove_columns=ds.column_names, keep_in_memory=True)
    n = sum(len(x) for x in ds["input_ids"])
    return time.perf_counter() - t, n


def node_ranks(folder: str, path: str, cache: bool, n: int) -> list[dict]:
    run = os.path.join(folder, "run.yaml")
    with open(run, "w") as fh:
        fh.write(f"name: b\nmodel: {{path: {os.path.join(ROOT, 'examples/build/chat/model')}}}\n"
                 f"data: {{path: {path}, messages_field: messages, chat_template: chatml, "
                 f"max_seq_len: 256, cache: {str(cache).lower()}, "
                 f"cache_dir: {tempfile.mkdtemp(dir=folder)}}}\n"
                 "train: {max_steps: 1, device: cpu}\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               LOCAL_WORLD_SIZE=str(n))
    procs = [subprocess.Popen([sys.executable, "-c", RANK, run], stdout=subprocess.PIPE,
                              text=True, env=dict(env, LOCAL_RANK=str(i))) for i in range(n)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3,
                    help="interleaved runs of each path; the medians are compared")
    ap.add_argument("--ranks", type=int, nargs="*", default=[2, 8],
                    help="ranks of one node to emulate in part 2 (none: skip it)")
    args = ap.parse_args()
    import chat_demo
    chat_demo.build_assets()
    import datasets  # noqa: F401 - imported before either contender is timed
    from transformers import AutoTokenizer

    from launcher.data.tokenize import node_cpus
    from machine_info import processor
    tok = AutoTokenizer.from_pretrained(os.path.join(chat_demo.BUILD, "model"))
    folder = tempfile.mkdtemp(prefix="ftlaunch-bench-data-")
    path = write_data(folder, args.conversations)
    runs: dict[str, list[float]] = {"ours": [], "one": [], "map": []}
    for _ in range(args.repeat):  # interleaved, so a noisy neighbour's minute hits all three
        t_ours, n_ours = ours(path, tok)
        t_one, n_one = ours(path, tok, workers=1)
        t_map, n_map = plain_map(path, tok)
        for k, t in (("ours", t_ours), ("one", t_one), ("map", t_map)):
            runs[k].append(t)
    t_ours, t_one, t_map = (statistics.median(runs[k]) for k in ("ours", "one", "map"))
    print(f"{args.conversations} conversations, {n_ours} tokens (datasets.map: {n_map}), "
          f"{node_cpus()} CPUs, load {os.getloadavg()[0]:.1f}, {processor()}; median of "
          f"{args.repeat} interleaved runs each")
    for label, k, n in (("ftlaunch data path:           ", "ours", n_ours),
                        ("  with preprocessing_workers 1:", "one", n_one),
                        ("datasets.map:                 ", "map", n_map)):
        t = statistics.median(runs[k])
        print(f"{label} {t:6.2f} s  {n / t:10.0f} tokens/s  (runs: "
              + ", ".join(f"{x:.2f}" for x in runs[k]) + ")")
    print(f"ratio (ftlaunch / datasets.map): {(n_ours / t_ours) / (n_map / t_map):.2f}x "
          f"(preprocessing_workers 1: {(n_one / t_one) / (n_map / t_map):.2f}x)")
    for n in args.ranks:
        wall = {}
        for cache in (True, False):
            ranks = node_ranks(folder, path, cache, n)
            wall[cache] = max(r["s"] for r in ranks)
            print(f"{n} ranks on one node, data.cache {str(cache).lower():5}: before the first "
                  f"step {wall[cache]:.1f} s (last rank); "
                  + ", ".join(f"rank {i} {r['s']:.1f} s ({r['cache']}, {r['cpu']:.1f} CPU s)"
                              for i, r in enumerate(ranks)))
        print(f"{n} ranks: with the cache / without: {wall[True] / wall[False]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
