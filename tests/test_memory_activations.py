"""The activation formula against what autograd really keeps, and the backward peak.

Saved tensors are collected with `torch.autograd.graph.saved_tensors_hooks` (each storage once,
parameters excluded); the peak with torch's MemTracker (a TorchDispatchMode that follows every
tensor's storage: on CPU, the same count as CUDA's max_memory_allocated without rounding).
"""
from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")


def _model(attn: str, dtype, kv: int, gc: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=256)
    torch.manual_seed(0)
    m = LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=dtype)
    m.train()
    if gc:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


def _saved(m, **batch) -> int:
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(**batch).loss  # the training loop keeps only the loss
    del loss
    return sum(seen.values())


def _peak_without_params_and_grads(m, **batch) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker
    mt = MemTracker()
    mt.track_external(m)
    with mt:
        m(**batch).loss.backward()
    peak = {str(k).rsplit(".", 1)[-1]: v for k, v in mt.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
    m.zero_grad(set_to_none=True)
    return peak["Total"] - peak["PARAM"] - peak["BUFFER"] - peak["GRAD"]


CASES = list(itertools.product(["sdpa", "eager"], ["bf16", "fp32"], [4, 2], [False, True]))


@pytest.mark.parametrize("attn,dtype,kv,gc", CASES)
def test_saved_activations_match_formula(attn, dtype, kv, gc):
    from launcher.memory.inventory import shape_of
    from launcher.memory.activations import activations
    m = _model(attn, getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype]), kv, gc)
    b, s = 3, 48
    x = torch.randint(3, 320, (b, s))
    lp = 2 if dtype == "bf16" else 4
    plan = activations(shape_of(m), b, s, lp, attn, gc, padded=False, logits_held=False)
    saved = _saved(m, input_ids=x, labels=x)
    assert abs(plan.saved - saved) <= 8, (plan.saved, saved)  # the 0-dim loss: 4 bytes
    peak = _peak_without_params_and_grads(m, input_ids=x, labels=x)
    # the backward's worst moment: exact for the loss phase, conservative (<= 15%) when a
    # recomputed block is the peak
    assert 0.99 * peak <= plan.saved + plan.backward_extra <= 1.15 * peak, (plan, peak)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batches_add_the_mask_and_repeat_kv(attn):
    from launcher.memory.inventory import shape_of
    from launcher.memory.activations import activations
    m = _model(attn, torch.bfloat16, 2, False)
    b, s = 2, 40
    x = torch.randint(3, 320, (b, s))
    mask = torch.ones_like(x)
    mask[0, -7:] = 0  # right padding in one row: transformers builds a mask tensor
    plan = activations(shape_of(m), b, s, 2, attn, False, padded=True, logits_held=False)
    saved = _saved(m, input_ids=x, attention_mask=mask, labels=x)
    assert abs(plan.saved - saved) <= 8, (plan.saved, saved)
    unpadded = activations(shape_of(m), b, s, 2, attn, False, padded=False, logits_held=False)
    if attn == "sdpa":  # a float mask per block, and k/v repeated to all heads
        assert plan.saved - unpadded.saved == 2 * (2 * b * s * s + 2 * 2 * b * s * (4 - 2) * 16)
    else:
        assert plan.saved == unpadded.saved


def test_unknown_family_falls_back_to_korthikanti():
    from launcher.memory.inventory import Shape
    from launcher.memory.activations import activations
    sh = Shape("gpt2", hidden=768, layers=12, heads=12, kv_heads=12, head_dim=64, intermediate=3072,
               vocab=50257, tied=True, gated_mlp=False, known=False)
    a = activations(sh, 1, 1024, 2, "sdpa", False, padded=False, logits_held=False)
    per_layer = 1024 * 768 * (34 + 5 * 12 * 1024 / 768)
    assert a.per_layer == int(per_layer)
    assert "Korthikanti" in a.formula


FREEZES = {
    "last block + norms + head": "{policy: last_layers, trainable_layers: 1, also_train: [norms, lm_head]}",
    "last block only": "{policy: last_layers, trainable_layers: 1}",
    "mlp of block 1 + head": "{policy: patterns, train: ['layers\\.1\\.mlp\\.'], also_train: [lm_head]}",
    "norms only": "{policy: patterns, also_train: [norms]}",
    "lora q,v r=4 p=0": "{policy: lora, lora: {r: 4, dropout: 0.0, target_modules: [q_proj, v_proj]}}",
    "lora all-linear with dropout": "{policy: lora, also_train: [lm_head], lora: {r: 4, dropout: 0.1}}",
}


@pytest.mark.parametrize("name", list(FREEZES))
def test_saved_activations_under_freezing_and_lora(tmp_path, name):
    """What trains decides what autograd keeps: frozen linears keep no input, nothing before the
    first trainable parameter is kept, LoRA keeps dropout copies. Plan == saved tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.model import freeze
    from launcher import memory
    from launcher.config.runfile import load
    cfg_hf = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg_hf.save_pretrained(tmp_path / "m")
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    run = tmp_path / "run.yaml"
    run.write_text(f"name: t\nmodel: {{path: {tmp_path / 'm'}, dtype: bf16}}\n"
                   f"data: {{path: {tmp_path / 'd.jsonl'}, max_seq_len: 48, packing: true}}\n"
                   f"train: {{max_steps: 1, micro_batch_size: 3, device: cpu}}\nfreeze: {FREEZES[name]}\n")
    cfg = load(str(run))
    p = memory.plan(cfg, world_size=1, advise=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg_hf, attn_implementation="sdpa", dtype=torch.bfloat16)
    model, _ = freeze.apply(model, cfg, quantized=set())
    model = model.to(torch.bfloat16)  # DeepSpeed casts peft's fp32 adapters to the training dtype
    model.train()
    x = torch.randint(3, 320, (3, 48))
    # packed rows as the ranks collate them (two documents a row, a (3, 1, 48, 48) mask)
    rows = [{"input_ids": r.tolist(), "labels": r.tolist(), "doc_lengths": [20, 28]} for r in x]
    from launcher.data import batching
    saved = _saved(model, **batching.collate(rows, 0, "sdpa"))
    if "with dropout" in name:  # peft's dropout copies: counted conservatively, within 3%
        assert saved <= p.term("activations") <= 1.03 * saved, (p.term("activations"), saved)
    else:
        assert abs(p.term("activations") - saved) <= 16, (p.term("activations"), saved)
