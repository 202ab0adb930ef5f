"""The GPU check: memory vs plan, throughput and MFU, quantized runs, on one GPU, in ~8 minutes.

    bash bench/gpu_check.sh                          # on the GPU machine (installs .whl/ first)
    python bench/gpu_check.py --out DIR              # the same, without the wheel step
    python bench/gpu_check.py --cpu-dry --out DIR    # the same code, tiny model, CPU (no GPU)

Parts, each in its own try/except so one failure does not lose the others, in this order:

0. ranks (bench/gpu_check_ranks.run): the real rank path, `ftlaunch run` through torchrun with
   NCCL (dry run; packed rows with sdpa and, where installed, flash attention; ZeRO-3 + LoRA with
   the adapter and merged export loaded back; tokens/s against a hand-written DeepSpeed loop),
   the launcher's default optimizer throughout.
1. memory (bench/gpu_check_memory.run): ~1.1B Llama (TinyLlama's shape) from a config, ZeRO-2 and
   ZeRO-3 on one rank, bf16, full / frozen / LoRA / gradient checkpointing: peak
   torch.cuda.max_memory_allocated against the plan (launcher.memory.plan).
2. throughput (this file): the same model, ZeRO-2 and ZeRO-3, full / frozen (last 2 blocks +
   norms + lm_head) / LoRA (r 16, all linear) / 8-bit AdamW (bitsandbytes), micro batch 4 x 1024
   tokens; tokens/s over the steps after 2 warm-up steps, and model FLOPs utilisation:

       MFU = FLOPs per token x tokens/s / peak bf16 FLOP/s of the GPU
       FLOPs per token = 2 N  (forward)  +  2 N_path  (input gradients)  +  2 N_trainable  (weight gradients)
         full:   N_path = N                 -> 6 N
         frozen: N_path = N_trainable       -> 2 N + 4 N_trainable (gradients stop below the lowest trainable block)
         LoRA:   N_path = N                 -> 4 N + 2 N_trainable (input gradients through every frozen linear)
       N = parameters doing matmuls (all but the input embedding); attention-score FLOPs
       (~12 x layers x hidden x seq a token) are left out, so MFU is slightly understated.
       Peak dense bf16 FLOP/s from PEAK_BF16 by GPU name (H100 / H200 SXM 989 TFLOP/s); an
       unknown GPU gets no MFU.
3. quantization (bench/gpu_check_quant.run): bitsandbytes 8-bit / 4-bit bases with LoRA.

A deadline (default 450 s from the start) skips what is left rather than overrun 8 minutes.
Writes DIR/gpu_check.json and DIR/gpu-results.md (rows to paste into docs/gpu-results.md,
with the date and the GPU name).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

PEAK_BF16 = [  # (substring of torch.cuda.get_device_name, dense bf16 FLOP/s)
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("A10", 125e12), ("L4", 121e12), ("4090", 165e12), ("V100", 125e12), ("MI300X", 1307e12),
]
FROZEN = "{policy: last_layers, trainable_layers: 2, also_train: [norms, lm_head]}"
LORA = "{policy: lora, lora: {r: 16, target_modules: [all-linear]}}"
THROUGHPUT = [  # name, zero stage, freeze, optimizer
    ("zero2 full", 2, "{policy: full}", "adamw"),
    ("zero2 frozen", 2, FROZEN, "adamw"),
    ("zero2 lora", 2, LORA, "adamw"),
    ("zero2 full 8-bit adam", 2, "{policy: full}", "adamw_8bit"),
    ("zero3 full", 3, "{policy: full}", "adamw"),
    ("zero3 frozen", 3, FROZEN, "adamw"),
    ("zero3 lora", 3, LORA, "adamw"),
]
RUN = """\
name: gpu-check-throughput
model: {{path: {model}, dtype: bf16}}
data: {{path: {data}, max_seq_len: {seq}}}
train: {{max_steps: 10, micro_batch_size: {micro}, lr: 1.0e-5, device: {device}, optimizer: {opt}}}
freeze: {freeze}
deepspeed: {{zero_stage: {stage}}}
cluster: {{gpus_per_node: 1}}
output: {{dir: {out}}}
"""


def peak_flops(name: str) -> float | None:
    for key, flops in PEAK_BF16:
        if key in name:
            return flops
    return None


def flops_per_token(n_matmul: int, n_trainable: int, policy: str) -> int:
    path = n_trainable if policy == "last_layers" else n_matmul
    return 2 * n_matmul + 2 * path + 2 * n_trainable


def throughput_one(cfg, device: str, warm: int, steps: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.dsconfig import build as ds_config
    from launcher.model import freeze
    from launcher.rank import train
    cuda = device.startswith("cuda")
    ds = ds_config.build(cfg, 1, "cuda" if cuda else "cpu")  # the launcher's optimizer, as runs get it
    torch.manual_seed(0)
    hf = AutoConfig.from_pretrained(cfg.model.path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    model.train()
    n_all = sum(p.numel() for p in model.parameters())
    n_matmul = n_all - model.get_input_embeddings().weight.numel()
    model, _ = freeze.apply(model, cfg, quantized=set())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = train.build_engine(cfg, model, ds)
    b, s = cfg.train.micro_batch_size, cfg.data.max_seq_len
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = None
    for i in range(warm + steps):
        if i == warm:
            sync()
            t0 = time.time()
        x = torch.randint(3, hf.vocab_size, (b, s), device=device)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
    sync()
    secs = time.time() - t0
    tps = b * s * steps / secs
    fpt = flops_per_token(n_matmul, n_train, cfg.freeze.policy)
    row = {"params": n_all, "trainable": n_train, "tokens_per_s": tps, "step_s": secs / steps,
           "flops_per_token": fpt, "achieved_flops": fpt * tps, "loss": float(loss)}
    if cuda:
        row["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    del engine, model, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def run_throughput(device: str, out: dict, *, tiny: bool, deadline: float) -> dict:
    """Fill out["throughput"]: one row per THROUGHPUT setting (or its error / skip)."""
    import torch
    from transformers import LlamaConfig

    import gpu_check_memory as gm
    from launcher.config.runfile import parse
    work = tempfile.mkdtemp(prefix="gpu_check_tput.")
    model_dir = os.path.join(work, "model")
    LlamaConfig(**(gm.TINY if tiny else gm.BIG)).save_pretrained(model_dir)
    data = os.path.join(work, "d.jsonl")
    with open(data, "w", encoding="utf-8") as fh:
        fh.write('{"text": "x"}\n')
    gm._init_dist("cpu" if device == "cpu" else "cuda")
    micro, seq, warm, steps = (2, 64, 1, 2) if tiny else (4, 1024, 2, 5)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    peak = peak_flops(name) if device.startswith("cuda") else None
    sec = out.setdefault("throughput", {"device": name, "peak_bf16_flops": peak, "micro_batch": micro,
                                        "seq": seq, "timed_steps": steps, "rows": {}})
    for label, stage, freeze, opt in THROUGHPUT:
        if time.time() > deadline:
            sec["rows"][label] = {"skipped": "deadline reached"}
            continue
        text = RUN.format(model=model_dir, data=data, seq=seq, micro=micro, freeze=freeze,
                          stage=stage, opt=opt, device="cpu" if device == "cpu" else "cuda",
                          out=os.path.join(work, "run"))
        try:
            cfg, problems = parse(text, source=f"gpu check {label}", base_dir=work)
            if problems:
                raise RuntimeError("; ".join(f"{p.key}: {p.message}" for p in problems))
            row = throughput_one(cfg, device, warm, steps)
            if peak:
                row["mfu"] = row["achieved_flops"] / peak
        except Exception as exc:  # noqa: BLE001 - one failing setting must not hide the others
            row = {"error": f"{type(exc).__name__}: {exc}"}
        sec["rows"][label] = row
        print(f"{label:<24} " + (f"{row['tokens_per_s']:9.0f} tokens/s"
                                 + (f"  MFU {row['mfu']:.3f}" if "mfu" in row else "")
                                 if "tokens_per_s" in row else str(row)), flush=True)
    return out


# ------------------------------------------------------------------ report
def _gib(b) -> str:
    return f"{b / 2**30:.2f}" if isinstance(b, (int, float)) else "-"


def markdown(res: dict) -> str:
    head = (f"### {res['date']} — {res['device_name']}\n\n"
            f"`{res['command']}`; torch {res['torch']}, deepspeed {res.get('deepspeed', '?')}; "
            f"{res['seconds']:.0f} s{' (CPU dry run: tiny model, numbers mean nothing)' if res['dry'] else ''}.\n")
    parts = [head]
    mem = res.get("memory", {})
    if "rows" in mem:
        lines = ["| memory setting | plan peak_allocated GiB | measured GiB | measured / plan "
                 "| plan peak_reserved GiB | max_memory_reserved GiB | reserved / plan |",
                 "|---|---|---|---|---|---|---|"]
        for k, r in mem["rows"].items():
            if "ratio" in r:
                reserved, plan_res = r.get("max_memory_reserved"), r.get("plan_peak_reserved")
                rr = f"{reserved / plan_res:.3f}" if reserved and plan_res else "-"
                lines.append(f"| {k} | {_gib(r['plan_peak_allocated'])} | {_gib(r['measured'])} "
                             f"| {r['ratio']:.3f} | {_gib(plan_res)} | {_gib(reserved)} | {rr} |")
            else:
                lines.append(f"| {k} | error: {r.get('error', '?')[:120]} | | | | | |")
        kind = next((r.get("measured_kind") for r in mem["rows"].values() if "measured_kind" in r), "?")
        parts.append("\n".join(lines) + f"\n\nmeasured = {kind}\n")
    tp = res.get("throughput", {})
    if "rows" in tp:
        lines = [f"| throughput setting (micro {tp['micro_batch']} x {tp['seq']} tokens) | trainable "
                 "| tokens/s | FLOPs/token | MFU | max allocated GiB |", "|---|---|---|---|---|---|"]
        for k, r in tp["rows"].items():
            if "tokens_per_s" in r:
                mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
                lines.append(f"| {k} | {r['trainable']:,} | {r['tokens_per_s']:.0f} "
                             f"| {r['flops_per_token']:.3g} | {mfu} | {_gib(r.get('max_memory_allocated'))} |")
            else:
                lines.append(f"| {k} | {r.get('error', r.get('skipped', '?'))[:120]} | | | | |")
        parts.append("\n".join(lines) + "\n")
    rk = res.get("ranks", {})
    if "rows" in rk:
        lines = ["| rank path (`ftlaunch run`, torchrun) | rc | s | steps | loss first -> last | tokens/s "
                 "| peak GiB (ranks' log) | export: max logit diff |", "|---|---|---|---|---|---|---|---|"]
        for k, r in rk["rows"].items():
            if "skipped" in r or "error" in r:
                why = (r.get("skipped") or r["error"].strip().splitlines()[-1])[:160]
                lines.append(f"| {k} | {r.get('rc', '-')} | {why} | | | | | |")
                continue
            loss = f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}" if "loss_first" in r else "-"
            tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
            if "hand_tokens_per_s" in r and "tokens_per_s" in r:  # the `vs hand loop` row
                tps += (f" (hand loop {r['hand_tokens_per_s']:.0f}: "
                        f"{r['tokens_per_s'] / r['hand_tokens_per_s']:.3f}x)")
            elif "hand_error" in r:
                tps += f" (hand loop failed: {r['hand_error'].strip().splitlines()[-1][:120]})"
            diff = f"{r['max_abs_logit_diff']:.3g}" if "max_abs_logit_diff" in r else "-"
            lines.append(f"| {k} | {r['rc']} | {r['seconds']} | {r.get('steps', '-')} | {loss} | {tps} "
                         f"| {_gib(r.get('memory_bytes'))} | {diff} |")
        parts.append("\n".join(lines) + "\n")
    q = res.get("quantization", {})
    if "runs" in q:
        lines = ["| quantized run | result |", "|---|---|"]
        for r in q["runs"]:
            body = r.get("error") or ", ".join(f"{k}={v}" for k, v in r.items()
                                                if k not in ("mode", "optimizer") and not isinstance(v, dict))
            lines.append(f"| {r.get('mode')} + {r.get('optimizer')} | {str(body)[:300]} |")
        parts.append("\n".join(lines) + "\n")
    for k, v in res.get("errors", {}).items():
        parts.append(f"Part `{k}` failed: `{v.splitlines()[-1] if v else '?'}`\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-dry", action="store_true", help="tiny model on CPU: check the code path")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="results folder")
    ap.add_argument("--budget-s", type=float, default=450, help="skip what is left after this")
    ap.add_argument("--parts", default="ranks,memory,throughput,quantization")
    a = ap.parse_args(argv)
    t_start = time.time()
    deadline = t_start + a.budget_s
    if a.cpu_dry:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.makedirs(a.out, exist_ok=True)
    import torch
    if not a.cpu_dry and not torch.cuda.is_available():
        print("no GPU visible: use --cpu-dry for the CPU check of this script", file=sys.stderr)
        return 2
    device = "cpu" if a.cpu_dry else "cuda"
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry": a.cpu_dry,
                 "device_name": torch.cuda.get_device_name() if not a.cpu_dry else f"CPU ({platform.machine()})",
                 "torch": torch.__version__,
                 "command": " ".join(["python bench/gpu_check.py"] + (argv or sys.argv[1:])),
                 "errors": {}}
    try:
        import deepspeed
        res["deepspeed"] = deepspeed.__version__
    except Exception as exc:  # noqa: BLE001
        res["errors"]["import deepspeed"] = f"{type(exc).__name__}: {exc}"
    path = os.path.join(a.out, "gpu_check.json")

    def save() -> None:
        res["seconds"] = time.time() - t_start
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=1, default=str)
        with open(os.path.join(a.out, "gpu-results.md"), "w", encoding="utf-8") as fh:
            fh.write(markdown(res))

    for part in a.parts.split(","):
        if time.time() > deadline:
            res["errors"][part] = "skipped: deadline reached"
            continue
        print(f"== {part}", flush=True)
        try:
            if part == "memory":
                import gpu_check_memory
                if a.cpu_dry:
                    gpu_check_memory.run("cpu", res, tiny=True, steps=2, micro=2, seq=64)
                else:
                    gpu_check_memory.run("cuda", res, steps=3)
            elif part == "throughput":
                run_throughput(device, res, tiny=a.cpu_dry, deadline=deadline)
            elif part == "ranks":
                import gpu_check_ranks
                gpu_check_ranks.run(device, res, deadline=deadline)
            elif part == "quantization":
                import gpu_check_quant
                gpu_check_quant.run("cpu" if a.cpu_dry else "cuda:0", res)
            else:
                raise ValueError(f"unknown part {part!r} (ranks, memory, throughput, quantization)")
        except Exception:  # noqa: BLE001 - keep the other parts
            res["errors"][part] = traceback.format_exc()[-3000:]
            print(res["errors"][part], file=sys.stderr, flush=True)
        save()
    save()
    print(markdown(res))
    print(f"wrote {path} and {os.path.join(a.out, 'gpu-results.md')} in {res['seconds']:.0f} s")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
