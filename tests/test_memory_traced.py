"""Activations of every family: the plan (a meta-device forward traced with saved-tensor hooks)
against the saved tensors of the real model on CPU, for a tiny config derived from each family's
real config.json (tests/configs, sizes shrunk, everything else as published)."""
from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
FAMILIES = ["llama-3-8b", "mistral-7b", "mixtral-8x7b", "qwen2-7b", "gemma-2-9b", "phi-3-mini",
            "gpt2", "falcon-7b", "opt-1.3b", "gpt-neox-20b"]
B, S = 2, 48
SHRINK = {  # key -> tiny value (only keys the family's config has are changed)
    "hidden_size": 64, "n_embd": 64, "word_embed_proj_dim": 64, "num_attention_heads": 4,
    "n_head": 4, "head_dim": 16, "query_pre_attn_scalar": 16, "intermediate_size": 96,
    "ffn_dim": 96, "n_inner": 96, "num_hidden_layers": 2, "n_layer": 2, "vocab_size": 320,
    "max_position_embeddings": 256, "original_max_position_embeddings": 256, "n_positions": 256,
    "n_ctx": 256, "num_local_experts": 4, "sliding_window": 32, "pad_token_id": 0,
    "bos_token_id": 1, "eos_token_id": 2,
}


def tiny(src: str, dst) -> dict:
    with open(os.path.join(CONFIGS, src, "config.json"), encoding="utf-8") as fh:
        c = json.load(fh)
    heads = c.get("num_attention_heads", c.get("n_head"))
    for k, v in SHRINK.items():
        if k in c and c[k] is not None:
            c[k] = v
    if c.get("num_key_value_heads"):  # keep grouped-query attention where the family has it
        c["num_key_value_heads"] = 2 if c["num_key_value_heads"] < heads else 4
    if c.get("num_kv_heads"):
        c["num_kv_heads"] = 1 if c["num_kv_heads"] == 1 else 4
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(c))
    return c


def saved_bytes(m) -> int:
    """Bytes autograd keeps in a forward with labels of B x S random tokens (each storage once,
    no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    from launcher.data import batching
    x = torch.randint(3, 320, (B, S))
    # packed rows as the ranks collate them (the plans here pack): two documents a row, with the
    # (B, 1, S, S) mask of the model's attention kernel (none for flash attention)
    rows = [{"input_ids": r.tolist(), "labels": r.tolist(), "doc_lengths": [S // 2, S - S // 2]}
            for r in x]
    batch = batching.collate(rows, 0, m.config._attn_implementation, m.dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(**batch).loss
    del loss
    return sum(seen.values())


def measured(path: str, gc: bool, trainable: frozenset[str] | None = None) -> int:
    """Bytes autograd keeps in a real forward with labels (each storage once, no parameters);
    with `trainable`, only those parameters require a gradient."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    m.train()
    if trainable is not None:
        for name, p in m.named_parameters():
            p.requires_grad_(name in trainable)
        assert any(p.requires_grad for p in m.parameters())
    if gc:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return saved_bytes(m)


def plan_of(tmp_path, model_dir, gc: bool, freeze: str = "{policy: full}", stage: int = 2):
    from launcher import memory
    from launcher.config.runfile import load
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    run = tmp_path / "run.yaml"
    run.write_text(f"name: t\nmodel: {{path: {model_dir}, dtype: bf16, gradient_checkpointing: "
                   f"{str(gc).lower()}}}\ndata: {{path: {tmp_path / 'd.jsonl'}, max_seq_len: {S}, "
                   f"packing: true}}\ntrain: {{max_steps: 1, micro_batch_size: {B}, device: cpu}}\n"
                   f"freeze: {freeze}\ndeepspeed: {{zero_stage: {stage}}}\n")
    return memory.plan(load(str(run)), world_size=1, advise=False)


def planned(tmp_path, model_dir, gc: bool):
    p = plan_of(tmp_path, model_dir, gc)
    return next(t for t in p.terms if t.key == "activations")


@pytest.mark.parametrize("gc", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", FAMILIES)
def test_traced_activations_within_10_percent_of_the_real_model(tmp_path, family, gc):
    tiny(family, tmp_path / "m")
    term = planned(tmp_path, tmp_path / "m", gc)
    assert "traced on the meta device (" in term.formula, term.formula
    real = measured(str(tmp_path / "m"), gc)
    assert abs(term.bytes / real - 1) <= 0.10, (family, term.bytes, real)


FROZEN = {  # the last block trains (the graph starts there); or the embeddings too (it reaches all)
    "last": "{policy: last_layers, trainable_layers: 1}",
    "last+embeddings": "{policy: last_layers, trainable_layers: 1, also_train: [embeddings]}",
}


@pytest.mark.parametrize("gc", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("freeze", list(FROZEN))
@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_runs_traced_within_10_percent_of_the_real_model(tmp_path, family, freeze, gc):
    tiny(family, tmp_path / "m")
    p = plan_of(tmp_path, tmp_path / "m", gc, FROZEN[freeze])
    term = next(t for t in p.terms if t.key == "activations")
    assert "traced on the meta device at full depth" in term.formula, term.formula
    trainable = frozenset(x.name for x in p.inv.params if x.trainable)
    assert 0 < len(trainable) < len(p.inv.params)
    real = measured(str(tmp_path / "m"), gc, trainable)
    assert abs(term.bytes / real - 1) <= 0.10, (family, freeze, term.bytes, real)


def measured_lora(path: str, gc: bool, targets: list[str], r: int, dropout: float) -> int:
    """The real model with peft's LoRA adapters on `targets`, measured as `measured` does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
    if gc:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()  # as transformers' Trainer does for peft + checkpointing
    m = get_peft_model(m, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                     target_modules=targets, task_type="CAUSAL_LM"))
    for p in m.parameters():  # peft makes the adapters fp32; deepspeed.initialize casts the
        p.data = p.data.to(torch.bfloat16)  # parameters to bf16 (buffers kept), as here
    m.train()
    return saved_bytes(m)


@pytest.mark.parametrize("dropout,gc", [(0.0, False), (0.1, False), (0.1, True)],
                         ids=["no-dropout", "dropout", "dropout-checkpointing"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_runs_traced_within_10_percent_of_peft(tmp_path, family, dropout, gc):
    """LoRA r=8 on every linear layer: the trace (adapters emulated on the meta model) against
    the real model with peft's adapters."""
    tiny(family, tmp_path / "m")
    p = plan_of(tmp_path, tmp_path / "m", gc,
                f"{{policy: lora, lora: {{r: 8, dropout: {dropout}, target_modules: [all-linear]}}}}")
    term = next(t for t in p.terms if t.key == "activations")
    assert "traced on the meta device at full depth" in term.formula, term.formula
    targets = sorted(x.name.rpartition(".")[0] for x in p.inv.params if x.name.endswith(".lora_A"))
    assert targets
    real = measured_lora(str(tmp_path / "m"), gc, targets, 8, dropout)
    assert abs(term.bytes / real - 1) <= 0.10, (family, dropout, gc, term.bytes, real)


@pytest.mark.parametrize("freeze", ["last", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_zero3_frozen_runs_traced_with_deepspeeds_linear(tmp_path, family, freeze, monkeypatch):
    """Under ZeRO-3 every F.linear is DeepSpeed's memory-efficient linear, which keeps its input
    whether its weight trains or not: the trace runs it so; the real model runs DeepSpeed's own
    (`zero3_linear_wrap`, patched in as zero.Init does)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    tiny(family, tmp_path / "m")
    spec = FROZEN["last"] if freeze == "last" else "{policy: lora, lora: {r: 8, dropout: 0.1}}"
    p = plan_of(tmp_path, tmp_path / "m", False, spec, stage=3)
    term = next(t for t in p.terms if t.key == "activations")
    assert "traced on the meta device at full depth" in term.formula, term.formula
    trainable = frozenset(x.name for x in p.inv.params if x.trainable)
    if freeze == "lora":  # the frozen base layers' inputs: more than without ZeRO-3
        assert term.bytes > plan_of(tmp_path, tmp_path / "m", False, spec).term("activations")
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    if freeze == "last":
        real = measured(str(tmp_path / "m"), False, trainable)
    else:
        targets = sorted(x.name.rpartition(".")[0] for x in p.inv.params if x.name.endswith(".lora_A"))
        real = measured_lora(str(tmp_path / "m"), False, targets, 8, 0.1)
    assert abs(term.bytes / real - 1) <= 0.10, (family, freeze, term.bytes, real)



def test_llama_frozen_trace_equals_the_enumerated_formula(tmp_path):
    """For the Llama family the full-depth trace and the tensor-by-tensor formula (by block,
    from what trains) agree, frozen blocks before the graph saving nothing."""
    from launcher.memory.activations import activations, grads_map
    tiny("llama-3-8b", tmp_path / "m")
    p = plan_of(tmp_path, tmp_path / "m", False, FROZEN["last"])
    traced = next(t for t in p.terms if t.key == "activations").bytes
    blocks, head = grads_map(p.inv)
    # packed rows under sdpa: a (B, 1, S, S) mask, so k/v repeated to every head and the mask
    # kept per block in lp
    want = activations(p.inv.shape, B, S, 2, "sdpa", False, padded=True, logits_held=False,
                       blocks=blocks, head=head).saved
    assert abs(traced / want - 1) < 0.01, (traced, want)


def test_llama_trace_equals_the_enumerated_formula(tmp_path):
    """The trace and the tensor-by-tensor formula agree to the byte for the Llama family."""
    from launcher.memory.activations import activations, from_trace
    from launcher.memory.inventory import meta_model, shape_of
    from launcher.memory.traced import trace
    tiny("llama-3-8b", tmp_path / "m")
    shape = shape_of(meta_model(str(tmp_path / "m")))
    tr = trace(str(tmp_path / "m"), B, S, "bf16", "sdpa")
    got = from_trace(tr, shape, B, S, 2, False, False).saved
    want = activations(shape, B, S, 2, "sdpa", False, padded=False, logits_held=False).saved
    assert abs(got - want) <= 8, (got, want)


def test_untraceable_model_falls_back_to_the_formula_and_says_why(tmp_path):
    from launcher.memory.traced import trace
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama", "hidden_size": 0}')
    why = trace(str(tmp_path / "m"), B, S, "bf16", "sdpa")
    assert isinstance(why, str) and why
    assert "no config.json" in trace(str(tmp_path / "missing"), B, S, "bf16", "sdpa")


@pytest.mark.parametrize("freeze", list(FROZEN))
@pytest.mark.parametrize("family", ["llama-3-8b", "gemma-2-9b", "falcon-7b", "gpt2"])
def test_deep_frozen_runs_are_traced_on_three_blocks_and_extrapolated(tmp_path, family, freeze):
    """8 blocks, the last 6 training: 4 blocks traced (the frozen one before the graph, the
    first one the graph reaches, two alike), the rest extrapolated; with the embeddings training
    too the blocks differ (2 frozen
    ones reached, then 6 training) and all 8 are traced. Within 10% of the real model."""
    from launcher.memory.traced import frozen_layout
    c = tiny(family, tmp_path / "m")
    for key in ("num_hidden_layers", "n_layer"):
        if key in c:
            c[key] = 8
    if isinstance(c.get("layer_types"), list):
        c["layer_types"] = [c["layer_types"][i % len(c["layer_types"])] for i in range(8)]
    (tmp_path / "m" / "config.json").write_text(json.dumps(c))
    p = plan_of(tmp_path, tmp_path / "m", False, FROZEN[freeze].replace("trainable_layers: 1",
                                                                        "trainable_layers: 6"))
    trainable = frozenset(x.name for x in p.inv.params if x.trainable)
    idx, _, first = frozen_layout(trainable, 8)
    assert (idx, first) == ((list(range(8)), 0) if "embeddings" in freeze else ([1, 2, 3, 4], 2))
    term = next(t for t in p.terms if t.key == "activations")
    real = measured(str(tmp_path / "m"), False, trainable)
    assert abs(term.bytes / real - 1) <= 0.10, (family, freeze, term.bytes, real)
