"""The FLOP count of a training step (launcher/memory/flops.py) against torch's own counter
(`torch.utils.flop_counter.FlopCounterMode`) on real architectures built from their published
config.json (tests/configs), with 3 blocks instead of dozens, on the meta device: the model
is set up as the ranks set it up (launcher/model/freeze.py apply, peft for LoRA, HF gradient
checkpointing, non-reentrant), one forward and backward of a 256-token sequence is counted, and
the analytic count must agree within 5%."""
from __future__ import annotations

import json
import os

import pytest

from launcher.config.runfile import load

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
FAMILIES = ["llama-2-7b", "mistral-7b", "qwen2-7b", "gemma-2-9b", "phi-3-mini", "gpt2",
            "gpt-neox-20b"]
SETTINGS = {
    "full": ("{policy: full}", False),
    "last_layers": ("{policy: last_layers, trainable_layers: 1}", False),
    "lora": ("{policy: lora, lora: {r: 16}}", False),
    "lora_qv": ("{policy: lora, lora: {r: 8, target_modules: [q_proj, v_proj]}}", False),
    "full_checkpointed": ("{policy: full}", True),
    "last_layers_checkpointed": ("{policy: last_layers, trainable_layers: 2}", True),
    "lora_checkpointed": ("{policy: lora, lora: {r: 16}}", True),
}
SEQ = 256
LAYERS = 3


def _model_dir(tmp_path, family: str) -> str:
    with open(os.path.join(CONFIGS, family, "config.json"), encoding="utf-8") as fh:
        conf = json.load(fh)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in conf:
            conf[key] = LAYERS
    conf.pop("layer_types", None)
    folder = tmp_path / family
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(conf))
    return str(folder)


def _cfg(tmp_path, family: str, freeze: str, checkpointing: bool):
    path = _model_dir(tmp_path, family)
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    run = tmp_path / "run.yaml"
    run.write_text(f"""\
name: flops
model: {{path: {path}, dtype: bf16, gradient_checkpointing: {str(checkpointing).lower()}}}
data: {{path: {tmp_path / 'd.jsonl'}, max_seq_len: {SEQ}, packing: true}}
train: {{max_steps: 10, micro_batch_size: 1, device: cuda}}
freeze: {freeze}
deepspeed: {{zero_stage: 2}}
cluster: {{nodes: 1, gpus_per_node: 1}}
""")
    return load(str(run), [])


def counted_by_torch(cfg, monkeypatch) -> int:
    """One forward and backward of a SEQ-token sequence under FlopCounterMode, the model built
    and frozen as launcher/rank/train.py does it, on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.model import freeze
    hf = AutoConfig.from_pretrained(cfg.model.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model, _ = freeze.apply(model, cfg, quantized=set())
    model.train()
    # without a KV cache transformers looks for packed rows in the position ids, reading values
    # a meta tensor does not have (launcher/memory/traced.py does the same)
    from transformers import masking_utils
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    ids = torch.zeros(1, SEQ, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return counter.get_total_flops()


# every family in the four kinds of run; the rarer combinations on two families (suite time)
CASES = [(f, s) for f in FAMILIES for s in ("full", "last_layers", "lora", "lora_checkpointed")] + [
    (f, s) for f in ("llama-2-7b", "gpt2")
    for s in ("lora_qv", "full_checkpointed", "last_layers_checkpointed")]


@pytest.mark.parametrize("family,setting", CASES)
def test_step_flops_agree_with_torch_flop_counter(tmp_path, monkeypatch, family, setting):
    from launcher.memory import clear_meta_cache
    from launcher.memory.flops import count
    freeze, checkpointing = SETTINGS[setting]
    if setting == "lora_qv" and family in ("phi-3-mini", "gpt2", "gpt-neox-20b"):
        freeze = freeze.replace("[q_proj, v_proj]", {"phi-3-mini": "[qkv_proj]", "gpt2": "[c_attn]",
                                                     "gpt-neox-20b": "[query_key_value]"}[family])
    cfg = _cfg(tmp_path, family, freeze, checkpointing)
    clear_meta_cache()
    ours = count(cfg, SEQ)
    theirs = counted_by_torch(cfg, monkeypatch)
    assert abs(ours.total / theirs - 1) < 0.05, (ours.to_dict(), theirs)
