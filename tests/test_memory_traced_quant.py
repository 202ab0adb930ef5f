"""Activations of quantized bases (bitsandbytes 8-bit / 4-bit, LoRA on every linear layer): the
plan's trace (bitsandbytes' matmuls emulated on the meta model, launcher/memory/traced.py)
against the real quantized model on CPU. bitsandbytes' autograd functions keep tensors on their
ctx (`ctx.tensors`, MatMul8bitFp's `ctx.A`), where saved-tensor hooks do not see them: the real
side walks the graph for those too."""
from __future__ import annotations

import pytest

from test_memory_traced import B, S, tiny

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

CASES = [(f, "4bit") for f in ("llama-3-8b", "mistral-7b", "mixtral-8x7b", "qwen2-7b",
                               "gemma-2-9b", "phi-3-mini", "gpt2", "opt-1.3b", "gpt-neox-20b")]
CASES += [(f, "8bit") for f in ("llama-3-8b", "gemma-2-9b", "gpt2", "phi-3-mini")]


def real_saved(m, x) -> int:
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    def pack(t):
        add(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(input_ids=x, labels=x).loss
    stack, done = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in done:
            continue
        done.add(id(node))
        for t in [*(getattr(node, "tensors", None) or ()), getattr(node, "A", None)]:
            add(t)
        stack.extend(f for f, _ in node.next_functions)
    return sum(seen.values())


@pytest.mark.parametrize("family,mode", CASES)
def test_quantized_lora_runs_traced_within_10_percent(tmp_path, family, mode):
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.model import freeze, quantize
    from launcher import memory
    from launcher.config import runfile
    tiny(family, tmp_path / "m")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "m"),
                                     dtype=torch.bfloat16).save_pretrained(tmp_path / "m")
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    run = tmp_path / "run.yaml"
    run.write_text(f"name: t\nmodel: {{path: {tmp_path / 'm'}, dtype: bf16}}\n"
                   f"data: {{path: {tmp_path / 'd.jsonl'}, max_seq_len: {S}, packing: true}}\n"
                   f"train: {{max_steps: 1, micro_batch_size: {B}, device: cpu}}\n"
                   f"quantization: {{mode: {mode}}}\n"
                   "freeze: {policy: lora, lora: {r: 8, dropout: 0.1}}\n")
    cfg = runfile.load(str(run))
    term = next(t for t in memory.plan(cfg, world_size=1, advise=False).terms
                if t.key == "activations")
    assert "traced on the meta device at full depth" in term.formula, term.formula
    # the ranks' model: loaded quantized, prepared, adapters applied, parameters cast to bf16
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16,
                                             **quantize.load_kwargs(cfg, "cpu"))
    quantize.prepare(m, cfg)
    m, _ = freeze.apply(m, cfg, quantized=quantize.quantized_names(m))
    for p in m.parameters():
        if p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
    m.train()
    real = real_saved(m, torch.randint(3, 320, (B, S)))
    assert abs(term.bytes / real - 1) <= 0.10, (family, mode, term.bytes, real)
