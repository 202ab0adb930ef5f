"""GPU check, the real rank path: `ftlaunch run` through torchrun with NCCL on the local GPU(s),
as users start it, with the launcher's own defaults (torch's fused AdamW, the collectives of the
loop forced through launcher/rank/collectives.py even at one rank, checkpoints, the final export).

Rows (each its own try/except in `run`; a missing package skips its row with the reason):
  dry-run        `ftlaunch run RUN --dry-run`: checks, plan, 3 steps, nothing kept
  sdpa packed    `ftlaunch run` with packed rows and sdpa (the block mask), tokens/s, the peak
                 memory logged by the ranks beside the plan's figure
  flash packed   the same with flash_attention_2 (packed rows flattened with cu_seq_lens), only
                 where the flash_attn package imports
  zero3 lora     ZeRO-3 + LoRA with output.merge_lora: the adapter and the merged model exported
                 from partitioned weights, loaded back and compared on the same input
  vs hand loop   tokens/s of `ftlaunch run` (full, ZeRO-2, packed rows, sdpa) against a minimal
                 hand-written DeepSpeed loop (`hand_loop` below: the same model, the DeepSpeed
                 config the run wrote, micro batch and sequence length, full rows of the same
                 text) on one GPU, each over the steps after 2: the per-step cost of the loop
On CPU (--cpu-dry) the dry-run, zero3 lora and vs hand loop rows run with one gloo rank and the
tiny model.

    python bench/gpu_check_ranks.py --hand MODEL TOKENIZER DATA DS_JSON STEPS MICRO SEQ OUT_JSON
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

RUN = """\
name: gpu-check-{name}
model: {{path: {model}, dtype: {dtype}, attn_implementation: {attn}}}
data: {{path: {data}, max_seq_len: {seq}, packing: true}}
train: {{max_steps: {steps}, micro_batch_size: {micro}, lr: 1.0e-4, warmup_steps: 2, log_every: 1,
         device: {device}, dist_timeout_s: 300}}
freeze: {freeze}
deepspeed: {{zero_stage: {stage}}}
cluster: {{nodes: 1, gpus_per_node: 1}}
output: {{dir: {out}, merge_lora: {merge}, save_final: {save}}}
"""
ROWS = [  # name, attention, zero stage, freeze, steps, save the final model
    ("dry-run", "sdpa", 2, "{policy: full}", 6, False),
    ("sdpa packed", "sdpa", 2, "{policy: full}", 20, False),
    ("flash packed", "flash_attention_2", 2, "{policy: full}", 20, False),
    ("zero3 lora", "sdpa", 3, "{policy: lora, lora: {r: 16, target_modules: [all-linear]}}", 6, True),
    ("vs hand loop", "sdpa", 2, "{policy: full}", 20, False),
]
DRY_ROWS = {"dry-run", "zero3 lora", "vs hand loop"}
WARM = 2  # steps left out of the tokens/s of both loops


def build_assets(folder: str, *, tiny: bool) -> dict[str, str]:
    """A Llama saved and read back through from_pretrained, its tokenizer, packed text data."""
    import tiny_recipe
    if tiny:
        return tiny_recipe.build(folder)
    assets = tiny_recipe.build(folder, n_text=4000, n_qa=10)
    # ~110M parameters: big enough for real kernels, small enough for a minute's check
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    model = tiny_recipe.build_model(os.path.join(folder, "model-gpu"), len(tok), layers=8,
                                    hidden=1024, heads=16, intermediate=2816, max_positions=2048)
    tok.save_pretrained(model)
    assets["model"] = model
    return assets


def ftlaunch(args: list[str], timeout: int) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout[-2000:] + p.stderr[-4000:], time.time() - t0


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [r for r in map(json.loads, fh) if "loss" in r]


def compare_export(final: str, base_path: str, device: str) -> dict:
    """The adapter on its base and the merged model on the same tokens: max |logit difference|."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device).eval()
    adapted = PeftModel.from_pretrained(base, final).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(final, "merged"), dtype=dtype).to(device).eval()
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        a, m = adapted(input_ids=ids).logits.float(), merged(input_ids=ids).logits.float()
    return {"max_abs_logit_diff": float((a - m).abs().max()), "logit_scale": float(a.abs().max())}


def one(name: str, attn: str, stage: int, freeze: str, steps: int, save: bool, assets: dict,
        folder: str, *, dry: bool) -> dict:
    cuda = not dry
    if attn.startswith("flash") and importlib.util.find_spec("flash_attn") is None:
        return {"skipped": "flash_attn is not installed in this Python"}
    run_dir = os.path.join(folder, name.replace(" ", "-"))
    text = RUN.format(name=name.replace(" ", "-"), model=assets["model"], data=assets["text"],
                      dtype="bf16" if cuda else "fp32", attn=attn, seq=1024 if cuda else 32,
                      micro=4 if cuda else 2, steps=3 if dry else steps, device="auto" if cuda else "cpu",
                      freeze=freeze, stage=stage, out=run_dir, merge="true" if save else "false",
                      save="true" if save else "false")
    path = os.path.join(folder, f"{name.replace(' ', '-')}.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(textwrap.dedent(text))
    args = ["run", path] + ([] if cuda else ["--nproc", "1"]) + (["--dry-run"] if name == "dry-run" else [])
    rc, tail, secs = ftlaunch(args, timeout=300)
    row: dict = {"rc": rc, "seconds": round(secs, 1)}
    if rc != 0:
        row["error"] = tail
        return row
    if name == "dry-run":
        row["said"] = [ln for ln in tail.splitlines() if "dry run" in ln.lower()][-3:]
        return row
    ms = metrics(run_dir)
    steady = ms[WARM:] or ms
    row.update({"steps": len(ms), "loss_first": ms[0]["loss"], "loss_last": ms[-1]["loss"],
                "tokens_per_s": sum(m["tokens_per_s"] for m in steady) / len(steady),
                "memory_bytes": max(m["memory_bytes"] for m in ms)})
    for key in ("memory_reserved_bytes",):  # logged by ranks that record reserved memory too
        if key in ms[-1]:
            row[key] = max(m.get(key, 0) for m in ms)
    plan_txt = os.path.join(run_dir, "plan.txt")
    if os.path.exists(plan_txt):
        with open(plan_txt, encoding="utf-8") as fh:
            row["plan_head"] = fh.read().splitlines()[:6]
    if save:
        row.update(compare_export(os.path.join(run_dir, "final"), assets["model"],
                                  "cuda" if cuda else "cpu"))
    if name == "vs hand loop":
        row.update(versus_hand(assets, run_dir, 3 if dry else steps, 2 if dry else 4,
                               32 if dry else 1024, folder))
    return row


def versus_hand(assets: dict, run_dir: str, steps: int, micro: int, seq: int, folder: str) -> dict:
    """The hand loop (torchrun, one rank) with the DeepSpeed config `ftlaunch run` wrote in
    run_dir: its tokens/s and ftlaunch's over it."""
    out = os.path.join(folder, "hand.json")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "1", os.path.abspath(__file__), "--hand",
                        assets["model"], assets["tokenizer"], assets["text"],
                        os.path.join(run_dir, "ds_config.json"), str(steps), str(micro), str(seq),
                        out], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        return {"hand_error": (p.stdout[-1000:] + p.stderr[-2000:])}
    with open(out, encoding="utf-8") as fh:
        hand = json.load(fh)
    return {"hand_tokens_per_s": hand["tokens_per_s"], "hand_steps": hand["steps"]}


def hand_loop(model: str, tokenizer: str, data: str, ds_json: str, steps: int, micro: int,
              seq: int, out: str) -> None:
    """A minimal hand-written DeepSpeed loop on this rank's device: full rows of `seq` tokens of
    the text (each text + EOS, concatenated), forward / backward / step, no logging in the loop."""
    import torch
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.rank.train import skip_cpu_shm_op
    if cuda:
        torch.cuda.set_device(0)
    else:
        skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = "cuda:0" if cuda else "cpu"
    tok = AutoTokenizer.from_pretrained(tokenizer)
    ids: list[int] = []
    with open(data, encoding="utf-8") as fh:
        for line in fh:
            ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
    blocks = [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)]
    with open(ds_json, encoding="utf-8") as fh:
        ds = json.load(fh)
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if cuda else torch.float32,
                                               attn_implementation="sdpa")
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=ds)
    engine.train()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.time()
    for step in range(steps):
        if step == WARM:
            sync()
            t0 = time.time()
        i = (step * micro) % max(1, len(blocks) - micro)
        x = torch.tensor(blocks[i:i + micro], device=device)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
    sync()
    timed = steps - WARM if steps > WARM else steps
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"tokens_per_s": micro * seq * timed / (time.time() - t0), "steps": steps}, fh)
    torch.distributed.destroy_process_group()


def run(device: str, out: dict, *, deadline: float) -> dict:
    dry = device == "cpu"
    part = out.setdefault("ranks", {"rows": {}})
    with tempfile.TemporaryDirectory(prefix="gpu-check-ranks-") as folder:
        assets = build_assets(os.path.join(folder, "assets"), tiny=dry)
        for name, attn, stage, freeze, steps, save in ROWS:
            if dry and name not in DRY_ROWS:
                continue
            if time.time() > deadline:
                part["rows"][name] = {"skipped": "deadline reached"}
                continue
            print(f"   ranks: {name}", flush=True)
            try:
                part["rows"][name] = one(name, attn, stage, freeze, steps, save, assets, folder, dry=dry)
            except Exception:  # noqa: BLE001 - the other rows still run
                part["rows"][name] = {"error": traceback.format_exc()[-3000:]}
    return part


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hand"]:
        m, t, d, ds_json, n, b, sq, o = sys.argv[2:10]
        hand_loop(m, t, d, ds_json, int(n), int(b), int(sq), o)
