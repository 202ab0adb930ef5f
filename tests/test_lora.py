"""LoRA: target selection (pure and on meta models), adapters on a quantized base, exports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from launcher.model import lora, quantize
from launcher.config.schema import LoraConfig
from launcher.config.errors import ConfigError
from launcher.config.runfile import parse

LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def llama_names(layers: int = 2):
    import torch
    out = [("model", torch.nn.Module), ("model.embed_tokens", torch.nn.Embedding)]
    for i in range(layers):
        out += [(f"model.layers.{i}", torch.nn.Module),
                (f"model.layers.{i}.input_layernorm", torch.nn.LayerNorm)]
        out += [(f"model.layers.{i}.{m}", torch.nn.Linear) for m in LLAMA_LINEARS]
    return out + [("model.norm", torch.nn.LayerNorm), ("lm_head", torch.nn.Linear)]


def test_target_modules_rules():
    names = llama_names()
    every = [n for n, t in names if t.__name__ == "Linear" and n != "lm_head"]
    assert lora.target_modules(names, ["all-linear"]) == every
    assert "lm_head" not in lora.target_modules(names, ["all-linear"])
    assert lora.target_modules(names, ["all-linear"], head=None)[-1] == "lm_head"
    assert lora.target_modules(names, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert lora.target_modules(names, ["mlp\\.(up|down)_proj"]) == [
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert lora.target_modules(names, [r"model\.layers\.1\..*_proj"]) == every[7:]
    # "proj" alone is no module name: suffixes are whole dotted components
    with pytest.raises(ConfigError, match=r"freeze.lora.target_modules\[1\]: 'proj' matches no "
                       r"module(.|\n)*fix: use all-linear or names of linear layers, e.g. down_proj"):
        lora.target_modules(names, ["q_proj", "proj"])
    with pytest.raises(ConfigError, match=r"target_modules\[0\]: 'embed_tokens' matches only "
                       r"non-linear modules \(model.embed_tokens\)"):
        lora.target_modules(names, ["embed_tokens"])


def tiny_llama_config(tiny):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(tiny["model"])


def test_adapter_param_count_on_a_meta_model_equals_peft(tiny):
    import torch
    from transformers import AutoModelForCausalLM
    config = tiny_llama_config(tiny)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    h, f = config.hidden_size, config.intermediate_size
    per_layer = 4 * (h + h) + 2 * (h + f) + (f + h)  # q k v o (square), gate up (h->f), down
    lc = LoraConfig(r=8)
    assert lora.adapter_param_count(meta, lc) == 8 * per_layer * config.num_hidden_layers
    assert lora.adapter_param_count(meta, LoraConfig(r=2, target_modules=["q_proj"])) == \
        2 * 2 * h * config.num_hidden_layers

    cfg = run_config(tiny, "{mode: 4bit}", "{policy: lora, lora: {r: 8}}")
    model = load(cfg)
    peft_model = lora.apply_lora(model, cfg)
    adapters = sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n)
    assert adapters == lora.adapter_param_count(meta, lc)


def run_config(tiny, quant: str, freeze: str, dtype: str = "bf16"):
    cfg, problems = parse(textwrap.dedent(f"""\
        name: l
        model: {{path: {tiny["model"]}, dtype: {dtype}}}
        data: {{path: {tiny["text"]}, max_seq_len: 32}}
        train: {{max_steps: 4, device: cpu}}
        quantization: {quant}
        freeze: {freeze}
        """))
    assert not problems, problems
    return cfg


def load(cfg):
    import torch
    from transformers import AutoModelForCausalLM
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.model.dtype]
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype,
                                                 **quantize.load_kwargs(cfg, "cpu"))
    quantize.prepare(model, cfg)
    return model


def test_apply_lora_trains_adapters_and_also_train_groups_only(tiny):
    cfg = run_config(tiny, "{mode: 8bit}",
                     "{policy: lora, also_train: [lm_head, norms, embeddings], lora: {r: 4}}")
    peft_model = lora.apply_lora(load(cfg), cfg)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    kinds = {("lora" if ".lora_" in n else n.split(".modules_to_save.")[0].rsplit(".", 1)[-1])
             for n in trainable}
    assert kinds == {"lora", "lm_head", "embed_tokens", "input_layernorm",
                     "post_attention_layernorm", "norm"}
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    quantized = quantize.quantized_names(peft_model)
    assert len(quantized) == 14 and not quantized & trainable

    with pytest.raises(ConfigError, match="freeze.also_train: lm_head is quantized and cannot "
                       "train(.|\n)*fix: add lm_head to quantization.skip_modules"):
        bad = run_config(tiny, "{mode: 8bit, skip_modules: ['model.layers.0.mlp']}",
                         "{policy: lora}")
        bad = bad.__class__(**{**bad.__dict__, "freeze": bad.freeze.__class__(
            **{**bad.freeze.__dict__, "also_train": ["lm_head"]})})  # validate refuses it
        lora.apply_lora(load(bad), bad)


def test_adapter_and_merged_exports(tiny, tmp_path):
    """Train a few steps on a 4-bit base, export: the adapter reloads through peft to the same
    logits; the merged fp32 model loads with plain from_pretrained (no bitsandbytes imported,
    no quantization_config) and matches the adapter model within 1e-4 (the same dequantized
    weights plus B@A*scale in fp32: only summation order differs)."""
    import torch
    from peft import PeftModel
    cfg = run_config(tiny, "{mode: 4bit}", "{policy: lora, also_train: [norms, lm_head], "
                     "lora: {r: 4, dropout: 0.0}}", dtype="fp32")
    model = lora.apply_lora(load(cfg), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    x = torch.randint(3, 300, (2, 16))
    model.train()
    losses = []
    for _ in range(4):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        ref = model(input_ids=x).logits  # train mode, no dropout: dequantize-and-matmul
        model.eval()
        model(input_ids=x)  # on AVX512-bf16 CPUs this repacks the 4-bit weights for bnb's
        model.train()       # CPU kernel, a layout the export must undo before dequantizing
    lora.export_adapter(model, str(tmp_path / "adapter"))
    lora.export_merged(model, cfg, str(tmp_path / "merged"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and "lm_head" in saved["modules_to_save"]
    assert sorted(saved["target_modules"]) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in LLAMA_LINEARS)

    base = load(cfg)
    again = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    again.train()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, ref, atol=1e-5, rtol=0)

    script = textwrap.dedent("""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        x = torch.tensor(json.loads(sys.argv[2]))
        with torch.no_grad():
            logits = m(input_ids=x).logits
        print(json.dumps({"logits": logits.tolist(), "dtype": str(m.dtype),
                          "bnb": "bitsandbytes" in sys.modules,
                          "linear": type(m.model.layers[0].self_attn.q_proj).__name__}))
        """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "merged"),
                           json.dumps(x.tolist())], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bnb"] is False and out["linear"] == "Linear" and out["dtype"] == "torch.float32"
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    torch.testing.assert_close(torch.tensor(out["logits"]), ref, atol=1e-4, rtol=0)
    assert not os.path.exists(tmp_path / "merged" / "adapter_config.json")


def test_apply_lora_says_nothing_the_user_cannot_act_on(tiny):
    """peft reads transformers 5's deprecated `is_gradient_checkpointing`: its FutureWarning is
    not shown on every LoRA run."""
    import warnings
    cfg = run_config(tiny, "{mode: none}", "{policy: lora, lora: {r: 4}}")
    model = load(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lora.apply_lora(model, cfg)
    assert [str(w.message) for w in seen if issubclass(w.category, FutureWarning)] == []
