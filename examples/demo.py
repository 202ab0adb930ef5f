"""The demo (`make demo`): fine-tune a tiny Llama end to end on this machine, no hub needed.

1. builds the tiny model, tokenizer and data into examples/build/ (once; examples/tiny_recipe.py)
2. `ftlaunch run examples/demo.yaml --overwrite`: 2 CPU ranks (or the local GPUs), DeepSpeed
   ZeRO-2, only the last block, the norms and lm_head train
3. shows the loss falling (metrics.jsonl) and loads final/ with `from_pretrained` to continue
   a prompt

    python examples/demo.py [extra ftlaunch run arguments, e.g. --nproc 1]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.path.join(HERE, "build")
RUN_FILE = os.path.join(HERE, "demo.yaml")


def build_assets() -> None:
    if os.path.exists(os.path.join(BUILD, "model", "config.json")) and \
            os.path.exists(os.path.join(BUILD, "data", "text.jsonl")):
        return
    sys.path.insert(0, HERE)
    import tiny_recipe
    print(f"building the tiny model, tokenizer and data in {BUILD}", flush=True)
    tiny_recipe.build(BUILD)


def run(extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "launcher", "run", RUN_FILE, "--overwrite", *extra]
    print("$ ftlaunch run examples/demo.yaml --overwrite " + " ".join(extra), flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call(cmd, cwd=ROOT, env=env)


def run_dir() -> str:
    sys.path.insert(0, ROOT)
    from launcher.config.runfile import load
    return load(RUN_FILE).run_dir


def show(run: str) -> None:
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    losses = [r for r in rows if "loss" in r]
    first, last = losses[0], losses[-1]
    print(f"\nloss: {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step "
          f"{last['step']}  ({100 * (1 - last['loss'] / first['loss']):.0f}% lower)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    final = os.path.join(run, "final")
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    model.eval()
    prompt = "the cat"
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    print(f"from_pretrained({os.path.relpath(final, ROOT)}) continues {prompt!r}: "
          f"{tok.decode(out[0], skip_special_tokens=True)!r}")


def main() -> int:
    t0 = time.time()
    build_assets()
    rc = run(sys.argv[1:])
    if rc != 0:
        print(f"demo: ftlaunch run exited with {rc}", file=sys.stderr)
        return rc
    show(run_dir())
    print(f"demo finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
