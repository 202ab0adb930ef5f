"""Weight-decay groups: the HF Trainer's rule (no decay on biases and norm weights), checked
against transformers' own `Trainer.get_decay_parameter_names` on tiny models of several
families built from their configs."""
from __future__ import annotations

import pytest

from launcher.model import decay

FAMILIES = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128),  # q/k/v biases
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=128),  # nn.LayerNorm ln_1
    "gemma": dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=128, word_embed_proj_dim=32),
    "falcon": dict(model_type="falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   vocab_size=128, new_decoder_architecture=True, num_kv_heads=2, bias=True),
}


def tiny(family: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(FAMILIES[family])
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def hf_decay_names(model) -> set[str]:
    from transformers import Trainer
    return set(Trainer.get_decay_parameter_names(None, model))  # self is not used


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decay_names_equal_the_hf_trainers(family):
    model = tiny(family)
    ours, theirs = decay.decay_names(model), hf_decay_names(model)
    assert ours == theirs
    names = [n for n, _ in model.named_parameters()]
    kept = [n for n in names if n not in theirs]
    assert kept and all("bias" in n or "norm" in n or "ln_" in n for n in kept), kept
    assert any(n not in ours for n in names if n.endswith("bias") or "norm" in n)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_groups_hold_only_trainable_parameters_split_as_the_trainer_does(family):
    model = tiny(family)
    names = [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():  # freeze the first half, norms and biases included
        p.requires_grad = names.index(n) >= len(names) // 2
    groups = decay.param_groups(model, [], 0.1)
    by_id = {id(p): n for n, p in model.named_parameters()}
    theirs = hf_decay_names(model)
    want_decay = [n for n, p in model.named_parameters() if n in theirs and p.requires_grad]
    want_rest = [n for n, p in model.named_parameters() if n not in theirs and p.requires_grad]
    assert [by_id[id(p)] for p in groups[0]["params"]] == want_decay
    assert [by_id[id(p)] for p in groups[1]["params"]] == want_rest
    assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0
    assert decay.param_groups(model, [], 0.0) == [p for p in model.parameters() if p.requires_grad]


def test_row_masked_matrices_never_decay():
    model = tiny("llama")
    emb = model.get_input_embeddings().weight
    groups = decay.param_groups(model, [emb], 0.1)
    assert all(p is not emb for p in groups[0]["params"])
    assert any(p is emb for p in groups[1]["params"])


def test_the_8bit_optimizer_takes_the_groups():
    import bitsandbytes as bnb
    model = tiny("llama")
    opt = bnb.optim.AdamW8bit(decay.param_groups(model, [], 0.1), lr=1e-3, weight_decay=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
