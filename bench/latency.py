"""Login-node latency: how long `ftlaunch validate` and `ftlaunch ds-config` take, next to
`deepspeed --help` and `accelerate launch --help`, measured in the same run.

    .venv/bin/python bench/latency.py                 # print the table
    .venv/bin/python bench/latency.py --write         # also write docs/benchmarks-latency.md
    .venv/bin/python bench/latency.py --runs 11

Every command runs once to warm the disk cache, then N times (default 7); the median wall
time is reported with min and max. The run file describes a Llama-7B-shaped model (config.json,
sharded safetensors whose headers the login-node checks read, a tokenizer.json) on 4 nodes x 8 GPUs.
`ftlaunch slurm` (render only, no submit) and `ftlaunch plan` are measured too when they work
here; a command that fails is listed with its error instead of a time.

`main(out_md=None) -> list[dict]` is the entry point for bench/run_all.py: one dict per
command with name, command, ok, median_s, min_s, max_s, runs, note, and for ftlaunch
commands the ratios deepspeed_ratio / accelerate_ratio (peer median / ftlaunch median).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
DOC = os.path.join(ROOT, "docs", "benchmarks-latency.md")
REPRODUCE = ".venv/bin/python bench/latency.py --write"
TARGET = 10.0  # ftlaunch should be at least this many times faster than both peers

MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
}
RUN_FILE = """\
name: llama7b-latency
model: {path: model, dtype: bf16, gradient_checkpointing: true}
data: {path: train.jsonl, max_seq_len: 2048}
train: {max_steps: 1000, micro_batch_size: 4, global_batch_size: 256, lr: 2.0e-5, warmup_steps: 50}
freeze: {policy: last_layers, trainable_layers: 4, also_train: [lm_head, norms]}
deepspeed: {zero_stage: 2}
cluster: {nodes: 4, gpus_per_node: 8, partition: gpu, time: 24:00:00}
output: {dir: runs/llama7b-latency}
"""


def _tool(name: str) -> str:
    """The console script next to this Python (the venv's), else the bare name."""
    path = os.path.join(BIN, name)
    return path if os.path.exists(path) else name


def commands() -> list[tuple[str, list[str], bool]]:
    """(name, argv, required): required commands make the benchmark fail if they fail."""
    ft = _tool("ftlaunch")
    return [
        ("ftlaunch validate", [ft, "validate", "run.yaml"], True),
        ("ftlaunch ds-config", [ft, "ds-config", "run.yaml", "-o", "ds.json"], True),
        ("ftlaunch slurm (render)", [ft, "slurm", "run.yaml"], False),
        ("ftlaunch plan", [ft, "plan", "run.yaml"], False),
        ("deepspeed --help", [_tool("deepspeed"), "--help"], True),
        ("accelerate launch --help", [_tool("accelerate"), "launch", "--help"], True),
    ]


def _once(argv: list[str], cwd: str, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - start, res


def llama_tensors(c: dict) -> dict[str, list[int]]:
    """Name -> shape of every parameter of a Llama config, as save_pretrained writes them."""
    h, i, v, kv = (c["hidden_size"], c["intermediate_size"], c["vocab_size"],
                   c["hidden_size"] * c["num_key_value_heads"] // c["num_attention_heads"])
    out = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out.update({p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
                    p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
                    p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h],
                    p + "mlp.down_proj.weight": [h, i], p + "input_layernorm.weight": [h],
                    p + "post_attention_layernorm.weight": [h]})
    return out


def write_model_folder(path: str, shards: int = 3) -> None:
    """A folder as a 7B checkpoint looks to the login-node checks: config.json, a safetensors
    index and its shards (real headers; the data is a sparse hole of the right size, so nothing
    is written) and a tokenizer.json."""
    import struct
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(MODEL_CONFIG, fh)
    names = list(llama_tensors(MODEL_CONFIG).items())
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        header, at = {}, 0
        for name, shape in part:
            n = 2
            for d in shape:
                n *= d
            header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [at, at + n]}
            at += n
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        with open(os.path.join(path, fname), "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + at)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(path, "tokenizer.json"), "w") as fh:
        json.dump({"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": []}, fh)


def measure(runs: int = 7) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ftlaunch-latency-") as work:
        write_model_folder(os.path.join(work, "model"))
        with open(os.path.join(work, "train.jsonl"), "w") as fh:
            fh.write('{"text": "hello"}\n')
        with open(os.path.join(work, "run.yaml"), "w") as fh:
            fh.write(RUN_FILE)
        env = dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
        # as installed: the warm-up run writes every module's bytecode (the peers' is written by
        # pip); with PYTHONDONTWRITEBYTECODE set ftlaunch alone would compile its source each run
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        for name, argv, required in commands():
            row: dict[str, Any] = {"name": name, "command": " ".join(shlex.quote(a) for a in argv),
                                   "required": required}
            _, res = _once(argv, work, env)  # warm-up, not counted
            if res.returncode != 0:
                tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["(no output)"]
                rows.append({**row, "ok": False, "note": f"exit {res.returncode}: {tail[0][:160]}"})
                continue
            times = []
            for _ in range(runs):
                t, res = _once(argv, work, env)
                if res.returncode != 0:
                    break
                times.append(t)
            if len(times) < runs:
                rows.append({**row, "ok": False, "note": f"failed on a repeat (exit {res.returncode})"})
                continue
            rows.append({**row, "ok": True, "runs": runs, "median_s": statistics.median(times),
                         "min_s": min(times), "max_s": max(times), "note": ""})
    peers = {r["name"].split()[0]: r.get("median_s") for r in rows if not r["name"].startswith("ftlaunch")}
    for r in rows:
        if r["name"].startswith("ftlaunch") and r["ok"]:
            for peer, median in peers.items():
                r[f"{peer}_ratio"] = median / r["median_s"] if median else None
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| command | median s | min s | max s | deepspeed --help / this | "
             "accelerate launch --help / this |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| `{r['name']}` | - | - | - | - | - |  <!-- {r['note']} -->")
            continue
        ratios = [f"{r[k]:.1f}x" if r.get(k) else "" for k in ("deepspeed_ratio", "accelerate_ratio")]
        lines.append(f"| `{r['name']}` | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} | "
                     f"{ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        if r["name"] in ("ftlaunch validate", "ftlaunch ds-config") and r["ok"]:
            worst = min(v for k, v in r.items() if k.endswith("_ratio") and v)
            out.append(f"{r['name']}: at least {worst:.1f}x faster than both peers "
                       f"({'meets' if worst >= TARGET else 'misses'} the {TARGET:g}x target)")
    for r in rows:
        if not r["ok"]:
            out.append(f"{r['name']}: not measured ({r['note']})")
    return "\n".join(out)


def markdown(rows: list[dict[str, Any]], runs: int) -> str:
    return f"""# Login-node latency

Median wall time of {runs} runs (after one warm-up run) of each command, all measured in one
run of the benchmark on the same machine, so the ratios compare like with like. The run file
describes a Llama-7B-shaped model (config.json, a 3-shard safetensors index whose headers the
checks read, a tokenizer.json) on 4 nodes x 8 GPUs, ZeRO-2, last 4 blocks
trained. The peers are the first thing a user of those tools waits for: `deepspeed --help`
and `accelerate launch --help` import torch (and more) before printing anything.

{table(rows)}

{verdict(rows)}

Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},
load average {os.getloadavg()[0]:.1f} when measured ({time.strftime('%Y-%m-%d')}). Timings on
a shared machine are noisy; the ratios, measured side by side, are what this page is for.
`ftlaunch plan` is not a login-node-latency command: it builds the model on the meta device
(torch and transformers), and is listed for completeness.

Reproduce: `{REPRODUCE}` (prints the table; `--write` rewrites this page).
"""


def main(out_md: str | None = None, runs: int = 7) -> list[dict[str, Any]]:
    rows = measure(runs)
    print(table(rows))
    print(verdict(rows))
    if out_md:
        os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
        with open(out_md, "w", encoding="utf-8") as fh:
            fh.write(markdown(rows, runs))
        print(f"wrote {os.path.relpath(out_md, ROOT)}")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="timed runs per command (default 7)")
    ap.add_argument("--write", action="store_true", help=f"write {os.path.relpath(DOC, ROOT)}")
    args = ap.parse_args()
    result = main(DOC if args.write else None, args.runs)
    raise SystemExit(0 if all(r["ok"] for r in result if r["required"]) else 1)
