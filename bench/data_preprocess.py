"""Preprocessing throughput of chat data: ftlaunch's data path vs plain `datasets.map`.

1. Throughput (tokens/s), one run each, same tokenizer (the tiny ChatML tokenizer of
   examples/chat_demo.py), same template (the built-in chatml, with generation markers), same
   conversations: `launcher.data.load` (read, render, assistant masks, tokenize; no cache) vs
   `datasets.load_dataset("json")` + `Dataset.map(apply_chat_template(tokenize=True,
   return_assistant_tokens_mask=True), batched=True)`. Target: ratio >= 0.9.
2. Once per node: two processes started together, as two ranks of one node, each loading the data
   the ranks' way (`launcher.rank.inputs.load_data`) before their first step: with data.cache (one
   tokenizes, the other waits and maps the result) vs data.cache: false (both tokenize).

    python bench/data_preprocess.py [--conversations 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
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


def ours(path: str, tok) -> tuple[float, int]:
    from launcher import data
    from launcher.config.schema import DataConfig, ModelConfig, RunConfig, TrainConfig
    cfg = RunConfig(name="b", model=ModelConfig(path="/none"), train=TrainConfig(max_steps=1),
                    data=DataConfig(path=path, messages_field="messages", chat_template="chatml",
                                    max_seq_len=512, cache=False))
    t = time.perf_counter()
    splits = data.load(cfg, tok, warn=lambda m: None)
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


def two_ranks(folder: str, path: str, cache: bool) -> list[dict]:
    run = os.path.join(folder, "run.yaml")
    with open(run, "w") as fh:
        fh.write(f"name: b\nmodel: {{path: {os.path.join(ROOT, 'examples/build/chat/model')}}}\n"
                 f"data: {{path: {path}, messages_field: messages, chat_template: chatml, "
                 f"max_seq_len: 256, cache: {str(cache).lower()}, "
                 f"cache_dir: {tempfile.mkdtemp(dir=folder)}}}\n"
                 "train: {max_steps: 1, device: cpu}\n")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    procs = [subprocess.Popen([sys.executable, "-c", RANK, run], stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=20000)
    args = ap.parse_args()
    import chat_demo
    chat_demo.build_assets()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(chat_demo.BUILD, "model"))
    folder = tempfile.mkdtemp(prefix="ftlaunch-bench-data-")
    path = write_data(folder, args.conversations)
    t_ours, n_ours = ours(path, tok)
    t_map, n_map = plain_map(path, tok)
    print(f"{args.conversations} conversations, {n_ours} tokens (datasets.map: {n_map})")
    print(f"ftlaunch data path: {t_ours:6.2f} s  {n_ours / t_ours:10.0f} tokens/s")
    print(f"datasets.map:       {t_map:6.2f} s  {n_map / t_map:10.0f} tokens/s")
    print(f"ratio (ftlaunch / datasets.map): {(n_ours / t_ours) / (n_map / t_map):.2f}x")
    for cache in (True, False):
        ranks = two_ranks(folder, path, cache)
        print(f"2 ranks on one node, data.cache {str(cache).lower():5}: before the first step "
              + ", ".join(f"rank {i} {r['s']:.1f} s ({r['cache']}, {r['cpu']:.1f} CPU s)"
                          for i, r in enumerate(ranks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
