"""ftlaunch's time estimate beside training times published for fine-tuning runs (docs/time.md).

    python bench/published_times.py          # prints the markdown table of docs/time.md

Each setting is rebuilt as a run file over the published architecture (config.json written
here from the paper's sizes, no weights) and estimated with launcher/memory/clock.py: FLOPs of
the step from the meta-device model, the GPU's peak from launcher/config/gpus.py, the assumed MFU.
The mean tokens per example is our assumption where the paper gives none (said in the row).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
         "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
         "tie_word_embeddings": False}
SIZES = {"llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32),
         "llama-65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                           num_attention_heads=64, num_key_value_heads=64)}

# (name, model, run-file sections, GPU type, GPUs, published hours, what the paper says)
SETTINGS = [
    ("Stanford Alpaca 7B, full fine-tune", "llama-7b",
     "train: {max_steps: 1219, micro_batch_size: 4, global_batch_size: 128}\n"
     "freeze: {policy: full}\nmodel_extra: {gradient_checkpointing: false}\n",
     "A100-80GB", 8, 3.0, 256,
     "52K examples x 3 epochs, global batch 128 (1,219 steps), max length 512, 8 x A100 80GB, "
     "\"3 hours\" (Taori et al., Stanford Alpaca, 2023; quoted from memory); rows of 256 tokens "
     "(mean length with padding) are our assumption"),
    ("QLoRA Guanaco 65B", "llama-65b",
     "train: {max_steps: 1875, micro_batch_size: 1, global_batch_size: 16}\n"
     "freeze: {policy: lora, lora: {r: 64, target_modules: [all-linear]}}\n"
     "quantization: {mode: 4bit}\nmodel_extra: {gradient_checkpointing: true}\n",
     "A6000", 1, 24.0, 512,
     "OASST1, 1,875 steps of batch 16, LoRA r 64 on every linear layer of a 4-bit LLaMA-65B, "
     "one 48 GB GPU, \"24 hours\" (Dettmers et al., QLoRA, 2023; quoted from memory); the 48 GB "
     "card is taken as an RTX A6000; rows of 512 tokens (source 384 + target 128, the paper's "
     "maximum lengths) are an upper bound"),
]


def run_file(folder: str, model_dir: str, sections: str, gpu: str, gpus: int, seq: int) -> str:
    gc = "true" if "gradient_checkpointing: true" in sections else "false"
    body = "\n".join(line for line in sections.splitlines() if not line.startswith("model_extra"))
    text = f"""\
name: published
model: {{path: {model_dir}, dtype: bf16, gradient_checkpointing: {gc}}}
data: {{path: {os.path.join(folder, 'd.jsonl')}, max_seq_len: {seq}, packing: true}}
{body}
deepspeed: {{zero_stage: {3 if gpus > 1 else 2}}}
cluster: {{nodes: 1, gpus_per_node: {gpus}, gpu_type: {gpu}}}
output: {{dir: {os.path.join(folder, 'run')}}}
"""
    path = os.path.join(folder, "run.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path


def main() -> int:
    from launcher.memory import clock
    from launcher.config.runfile import load
    rows = ["| setting | published | ftlaunch estimate (MFU 35%) | FLOPs per token | published = MFU of |",
            "|---|---|---|---|---|"]
    notes = []
    for name, model, sections, gpu, gpus, hours, seq, said in SETTINGS:
        with tempfile.TemporaryDirectory() as folder:
            model_dir = os.path.join(folder, model)
            os.makedirs(model_dir)
            with open(os.path.join(model_dir, "config.json"), "w", encoding="utf-8") as fh:
                json.dump({**LLAMA, **SIZES[model]}, fh)
            with open(os.path.join(folder, "d.jsonl"), "w", encoding="utf-8") as fh:
                fh.write('{"text": "x"}\n')
            cfg = load(run_file(folder, model_dir, sections, gpu, gpus, seq), [])
            est = clock.estimate(cfg)
        per_token = est.flops_per_sequence.total / est.seq
        implied = est.train_s * est.mfu / (hours * 3600)
        rows.append(f"| {name} ({gpus} x {gpu}) | {hours:g} h | {est.train_s / 3600:.1f} h, "
                    f"{est.gpu_hours:.0f} GPU-h | {per_token:.3g} | {implied:.0%} |")
        notes.append(f"- {name}: {said}.")
    print("\n".join(rows + [""] + notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
