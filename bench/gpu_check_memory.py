"""GPU check: the plan's tensor peak against `torch.cuda.max_memory_allocated`, ~1B Llama.

    run(device, out)                       # called by the GPU check script: fills out["memory"]
    python bench/gpu_check_memory.py       # alone, on a GPU machine
    python bench/gpu_check_memory.py --cpu-dry   # the same code, tiny config, CPU, 1 rank

A Llama of about 1.1B parameters (TinyLlama's shape: 22 blocks, hidden 2048, MLP 5632, 32 heads,
4 key/value heads, vocab 32000) is made from a `LlamaConfig` with random weights (no hub, no
weights on disk: the plan reads the config.json written to a temporary folder). Each setting
(ZeRO-2 / ZeRO-3 on one rank, bf16; full fine-tune, frozen all but the last 2 blocks, LoRA,
gradient checkpointing) builds the model on the device, applies the freeze policy
(launcher.model.freeze / launcher.model.lora, as training does), initializes DeepSpeed with the run's
DeepSpeed config (torch's AdamW: no fused_adam op to compile; the plan is given the same
config), resets the peak counter, runs a few steps and compares the peak with the plan's
`peak_allocated` (the plan's tensor peak: what max_memory_allocated counts). Target: within 10%.

On CPU (--cpu-dry) the measured figure is the process's peak RSS above the point after the
model is built (VmHWM, reset through /proc/self/clear_refs): not the same quantity (code, malloc
slack), so the ratio there only shows the code path works end to end.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
FREEZE_LAST = "{policy: last_layers, trainable_layers: 2, also_train: [norms, lm_head]}"
LORA = "{policy: lora, lora: {r: 16, target_modules: [all-linear]}}"
SETTINGS = [  # name, zero stage, freeze, gradient checkpointing
    ("zero2 full", 2, "{policy: full}", False),
    ("zero2 frozen", 2, FREEZE_LAST, False),
    ("zero2 lora", 2, LORA, False),
    ("zero2 full ckpt", 2, "{policy: full}", True),
    ("zero3 full", 3, "{policy: full}", False),
    ("zero3 frozen", 3, FREEZE_LAST, False),
]
RUN = """\
name: gpu-check
model: {{path: {model}, dtype: bf16, gradient_checkpointing: {gc}}}
data: {{path: {data}, max_seq_len: {seq}, packing: true}}
train: {{max_steps: 10, micro_batch_size: {micro}, device: {device}}}
freeze: {freeze}
deepspeed: {{zero_stage: {stage}}}
cluster: {{gpus_per_node: 1}}
"""


def _rss_peak() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        pass


def _cpu_measurement_setup() -> None:
    """CPU stand-in only: freed memory leaves RSS at once (glibc mmap threshold fixed at
    64 KiB, as bench/plan_vs_measured.py runs ranks) and lazily loaded code is loaded first."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    except OSError:
        pass
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import plan_vs_measured
    plan_vs_measured.warm_code()
    for stage in (2, 3):
        plan_vs_measured.warm_engine({"zero_optimization": {"stage": stage},
                                      "bf16": {"enabled": True}})


def _init_dist(device: str) -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        return
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
        os.environ.setdefault(k, v)
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from launcher.rank.train import skip_cpu_shm_op
        skip_cpu_shm_op()
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl",
                               auto_mpi_discovery=False, verbose=False)


def one(cfg, device: str, steps: int) -> dict:
    """Build, train `steps` steps, measure; the plan given the same DeepSpeed config."""
    import deepspeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.dsconfig import build as ds_config
    from launcher.model import freeze
    from launcher import memory
    ds = ds_config.build(cfg, 1, device="cpu" if device == "cpu" else "cuda")
    p = memory.plan(cfg, world_size=1, advise=False, ds=ds)
    torch.manual_seed(0)
    dev = torch.device(device)
    hf = AutoConfig.from_pretrained(cfg.model.path)
    with dev:
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16,
                                                 attn_implementation=cfg.model.attn_implementation or "sdpa")
    model.train()
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model, _ = freeze.apply(model, cfg, quantized=set())
    trainable = [q for q in model.parameters() if q.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds)
    b, s = cfg.train.micro_batch_size, cfg.data.max_seq_len
    if device == "cpu":
        gc.collect()
        _reset_rss_peak()
        base = _rss_peak()
    else:
        torch.cuda.synchronize()
        init_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(steps):
        x = torch.randint(3, hf.vocab_size, (b, s), device=dev)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
    if device == "cpu":
        measured = _rss_peak() - base + p.term("weights")  # weights were resident before the reset
        extra = {"measured_kind": "peak RSS above the built model + planned weights (CPU stand-in)"}
    else:
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
        extra = {"measured_kind": "torch.cuda.max_memory_allocated", "initialize_peak": init_peak,
                 "max_memory_reserved": torch.cuda.max_memory_reserved(),
                 # the node side: this one rank's host peak RSS since it started (VmHWM) beside
                 # the plan's per-node CPU figure for one rank (process + page cache + offload)
                 "host_peak_rss": _rss_peak(), "plan_node_cpu": p.node_cpu,
                 "plan_node_phase": p.node_phase}
    row = {"params": p.inv.total, "trainable": p.inv.trainable,
           "plan_peak_allocated": p.peak_allocated, "plan_peak_reserved": p.peak_reserved,
           "plan_total": p.total_per_gpu,
           "measured": measured, "ratio": measured / p.peak_allocated,
           "step_s": round((time.time() - t0) / steps, 3),
           "plan_terms": {t.key: t.bytes for t in p.terms}, **extra}
    del engine, model, trainable, loss
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()
    return row


def run(device: str, out: dict, *, tiny: bool = False, steps: int = 3, micro: int = 1,
        seq: int = 1024, settings=None) -> dict:
    """Every setting on `device` ("cuda", "cuda:0" or "cpu"); results in out["memory"]."""
    from transformers import LlamaConfig

    from launcher.config.errors import ConfigError
    from launcher.config.runfile import parse
    work = tempfile.mkdtemp(prefix="gpu_check_memory.")
    model_dir = os.path.join(work, "model")
    LlamaConfig(**(TINY if tiny else BIG)).save_pretrained(model_dir)  # config.json only
    data = os.path.join(work, "d.jsonl")
    with open(data, "w", encoding="utf-8") as fh:
        fh.write('{"text": "x"}\n')
    _init_dist("cpu" if device == "cpu" else "cuda")
    if device == "cpu":
        _cpu_measurement_setup()
    results = out.setdefault("memory", {"device": device, "model": "tiny" if tiny else "llama-1.1b",
                                        "micro_batch": micro, "seq": seq, "rows": {}})
    for name, stage, freeze, ckpt in settings or SETTINGS:
        text = RUN.format(model=model_dir, data=data, seq=seq, micro=micro, freeze=freeze,
                          stage=stage, gc=str(ckpt).lower(),
                          device="cpu" if device == "cpu" else "cuda")
        cfg, problems = parse(text, source=f"gpu check {name}", base_dir=work)
        if problems:
            raise ConfigError(problems, f"gpu check {name}")
        try:
            row = one(cfg, device, steps)
        except Exception as exc:  # noqa: BLE001 - one failing setting must not hide the others
            row = {"error": f"{type(exc).__name__}: {exc}"}
        results["rows"][name] = row
        if "ratio" in row:
            print(f"{name:<18} plan {row['plan_peak_allocated'] / 2**30:7.3f} GiB  measured "
                  f"{row['measured'] / 2**30:7.3f} GiB  ratio {row['ratio']:.3f}", flush=True)
        else:
            print(f"{name:<18} {row['error']}", flush=True)
    ok = [r for r in results["rows"].values() if "ratio" in r]
    results["within_10pct"] = sum(abs(r["ratio"] - 1) <= 0.10 for r in ok)
    results["settings"] = len(results["rows"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-dry", action="store_true", help="tiny config on CPU (no GPU needed)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    out: dict = {}
    if a.cpu_dry:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        run("cpu", out, tiny=True, steps=a.steps, micro=2, seq=128)
    else:
        run("cuda", out, steps=a.steps)
    text = json.dumps(out, indent=1)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
