"""GPU check, quantization section: 8-bit and 4-bit loading of a ~1B-parameter Llama, LoRA steps
under ZeRO-2 on one GPU, peak memory and tokens/s.

    python bench/gpu_check_quant.py            # on a machine with a GPU (cuda:0)
    python bench/gpu_check_quant.py --cpu-dry  # the same code path on CPU with a tiny model

The GPU check script calls `run(device, out)`; it fills `out["quantization"]` and returns it.

No hub: the model is built from a LlamaConfig (hidden 2048, 16 layers, intermediate 5632,
vocab 32000: 1.1B parameters, random weights), saved once to a temporary folder in bf16 and
loaded back through the launcher's own path, as every rank does it:
`train.load_model` (from_pretrained with `quantize.load_kwargs`, then `quantize.prepare`),
`freeze.apply` (LoRA through `lora.apply_lora`), `train.build_engine` (deepspeed.initialize over
the trainable parameters with the DeepSpeed config from `ds_config.build`). Each mode records
load time, memory after load (torch.cuda.memory_allocated; on CPU the quantized bytes),
training peak (torch.cuda.max_memory_allocated), tokens/s over the timed steps and the losses.

AdamW is the launcher's default (torch's, fused on a GPU: no DeepSpeed op is compiled); one extra
4-bit run uses bitsandbytes' AdamW8bit (and its paged variant on a GPU).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import textwrap
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GPU_MODEL = {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 5632,
             "vocab_size": 32000, "num_attention_heads": 16, "num_key_value_heads": 16}
DRY_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
             "vocab_size": 384, "num_attention_heads": 4, "num_key_value_heads": 4}
GPU_SHAPE = {"seq": 1024, "micro": 4, "steps": 8, "warmup": 2}
DRY_SHAPE = {"seq": 32, "micro": 2, "steps": 3, "warmup": 1}
RUNS = [("8bit", "adamw"), ("4bit", "adamw"), ("4bit", "adamw_8bit")]


def build_model(folder: str, arch: dict[str, int], device: str) -> dict[str, Any]:
    """A random-weight Llama saved with save_pretrained (bf16); built on `device` for speed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**arch, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    gc.collect()
    return {"params": n, "build_and_save_s": round(time.time() - t0, 2), **arch}


def run_config(model: str, folder: str, mode: str, optimizer: str, device: str, shape: dict):
    from launcher.config.runfile import parse
    data = os.path.join(folder, "data.jsonl")
    if not os.path.exists(data):
        with open(data, "w", encoding="utf-8") as fh:
            fh.write('{"text": "unused: the check feeds random tokens"}\n')
    text = textwrap.dedent(f"""\
        name: gpu-check-{mode}-{optimizer}
        model: {{path: {model}, dtype: bf16, gradient_checkpointing: true}}
        data: {{path: {data}, max_seq_len: {shape["seq"]}}}
        train: {{max_steps: {shape["steps"]}, micro_batch_size: {shape["micro"]}, lr: 1.0e-4,
                 warmup_steps: 0, scheduler: constant, device: {device}, optimizer: {optimizer}}}
        quantization: {{mode: {mode}}}
        freeze: {{policy: lora, lora: {{r: 16, alpha: 32, dropout: 0.0}}}}
        deepspeed: {{zero_stage: 2}}
        cluster: {{gpus_per_node: 1}}
        output: {{dir: {os.path.join(folder, "runs", mode + "-" + optimizer)}}}
        """)
    cfg, problems = parse(text)
    if problems:
        raise RuntimeError("; ".join(f"{p.key}: {p.message}" for p in problems))
    return cfg


def one_run(cfg: Any, device: str, shape: dict) -> dict[str, Any]:
    """Load, LoRA, engine, steps: the launcher's own functions; memory and speed recorded."""
    import torch

    from launcher.dsconfig import build as ds_config
    from launcher.model import freeze, quantize
    from launcher.rank import train
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    ds = ds_config.build(cfg, 1, "cuda" if cuda else "cpu")
    t0 = time.time()
    model, _ = train.load_model(cfg, device, ds)
    load_s = time.time() - t0
    rec: dict[str, Any] = {"mode": cfg.quantization.mode, "optimizer": cfg.train.optimizer,
                           "load_s": round(load_s, 2),
                           "quantized_tensors": len(quantize.quantized_names(model)),
                           "quantized_bytes": quantize.quantized_bytes(model)}
    if cuda:
        rec["after_load_bytes"] = torch.cuda.memory_allocated() - base
        rec["load_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
    model, report = freeze.apply(model, cfg)
    rec["trainable_params"] = report.trainable_params
    engine = train.build_engine(cfg, model, ds)
    engine.train()
    vocab = engine.module.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    micro, seq = shape["micro"], shape["seq"]
    losses, timed, t_start = [], 0, 0.0
    for step in range(shape["warmup"] + shape["steps"]):
        if step == shape["warmup"]:
            if cuda:
                torch.cuda.synchronize()
            t_start = time.time()
        x = torch.randint(3, vocab, (micro, seq), generator=gen).to(device)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(round(float(loss.detach().float()), 4))
        if step >= shape["warmup"]:
            timed += micro * seq
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.time() - t_start
    rec.update({"tokens_per_s": round(timed / elapsed, 1), "step_s": round(elapsed / shape["steps"], 4),
                "losses": losses, "seq": seq, "micro_batch": micro})
    if cuda:
        rec["train_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        rec["train_peak_gib"] = round(rec["train_peak_bytes"] / 2**30, 3)
        rec["after_load_gib"] = round(rec["after_load_bytes"] / 2**30, 3)
    from launcher.rank import engine_stats
    rec.update(engine_stats.summary(engine))
    del engine, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rec


def run(device: Any, out: dict, *, tiny: bool | None = None) -> dict:
    """Fill out["quantization"] (and return it): the model, then one record per RUNS entry.
    device: "cuda", "cuda:N" or "cpu"; tiny (default: device is cpu) picks the dry-run sizes.
    A failing run is recorded with its error and the others still run."""
    import torch

    from launcher.cluster import dist_env
    from launcher.rank import train
    device = str(device)
    if device == "cuda":
        device = "cuda:0"
    tiny = (not device.startswith("cuda")) if tiny is None else tiny
    arch, shape = (DRY_MODEL, DRY_SHAPE) if tiny else (GPU_MODEL, GPU_SHAPE)
    section: dict[str, Any] = {"device": device, "runs": []}
    out["quantization"] = section
    if device.startswith("cuda"):
        section["gpu"] = torch.cuda.get_device_name(torch.device(device))
        torch.cuda.set_device(torch.device(device))
    with tempfile.TemporaryDirectory(prefix="ftlaunch-gpu-check-quant-") as folder:
        model_dir = os.path.join(folder, "model")
        section["model"] = build_model(model_dir, arch, device)
        env = dist_env.from_environ()
        first = True
        for mode, optimizer in RUNS:
            if optimizer == "adamw_8bit" and device.startswith("cuda"):
                optimizer = "paged_adamw_8bit"
            cfg = run_config(model_dir, folder, mode, optimizer,
                             "cuda" if device.startswith("cuda") else "cpu", shape)
            if first:  # the process group once, as a rank of world size 1
                train.init_distributed(cfg, env)
                first = False
            try:
                section["runs"].append(one_run(cfg, device, shape))
            except Exception as exc:  # noqa: BLE001 - one broken mode must not hide the rest
                section["runs"].append({"mode": mode, "optimizer": optimizer,
                                        "error": f"{type(exc).__name__}: {exc}"})
    return section


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-dry", action="store_true", help="tiny model on CPU: check the code path")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1" if args.cpu_dry else os.environ.get("OMP_NUM_THREADS", "8"))
    if args.cpu_dry:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    if not args.cpu_dry and not torch.cuda.is_available():
        print("no GPU visible: use --cpu-dry for the CPU check of this script", file=sys.stderr)
        return 2
    out: dict = {}
    run("cpu" if args.cpu_dry else "cuda:0", out)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    failed = [r for r in out["quantization"]["runs"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
