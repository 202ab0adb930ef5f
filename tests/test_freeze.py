"""Freeze policies as pure selection over parameter names (no model), plus one real tiny model."""
from __future__ import annotations

import pytest

from launcher.model import freeze
from launcher.config.schema import FreezeConfig
from launcher.config.errors import ConfigError


def llama_names(n_layers: int = 4, prefix: str = "") -> list[str]:
    names = [f"{prefix}model.embed_tokens.weight"]
    for i in range(n_layers):
        names += [f"{prefix}model.layers.{i}.{m}.weight" for m in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
            "post_attention_layernorm")]
    return names + [f"{prefix}model.norm.weight", f"{prefix}lm_head.weight"]


def gpt2_names(n_layers: int = 3) -> list[str]:
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layers):
        for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{i}.{m}.weight", f"transformer.h.{i}.{m}.bias"]
    return names + ["transformer.ln_f.weight", "transformer.ln_f.bias"]  # lm_head tied to wte


NEOX = ["gpt_neox.embed_in.weight"] + [f"gpt_neox.layers.{i}.attention.dense.weight"
                                       for i in range(6)] + \
       ["gpt_neox.final_layer_norm.weight", "embed_out.weight"]
OPT = ["model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"] + \
      [f"model.decoder.layers.{i}.fc1.weight" for i in range(5)] + \
      ["model.decoder.final_layer_norm.weight", "lm_head.weight"]
MOE = ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.experts.{e}.w1.weight"
                                       for i in range(2) for e in range(8)] + ["lm_head.weight"]


@pytest.mark.parametrize("names, want", [
    (llama_names(4), [f"model.layers.{i}." for i in range(4)]),
    (gpt2_names(3), [f"transformer.h.{i}." for i in range(3)]),
    (NEOX, [f"gpt_neox.layers.{i}." for i in range(6)]),
    (OPT, [f"model.decoder.layers.{i}." for i in range(5)]),
    (llama_names(2, "base_model.model."), ["base_model.model.model.layers.0.",
                                           "base_model.model.model.layers.1."]),
    (MOE, ["model.layers.0.", "model.layers.1."]),  # experts (8 each) are nested, never the blocks
    (["a.weight", "b.bias"], []),
])
def test_find_layers(names, want):
    assert freeze.find_layers(names) == want


def test_find_layers_orders_numerically():
    names = [f"model.layers.{i}.w.weight" for i in (10, 2, 1, 0)]
    assert freeze.find_layers(names) == ["model.layers.0.", "model.layers.1.", "model.layers.2.",
                                         "model.layers.10."]


@pytest.mark.parametrize("name, group", [
    ("model.embed_tokens.weight", "embeddings"),
    ("transformer.wte.weight", "embeddings"),
    ("transformer.wpe.weight", "embeddings"),
    ("gpt_neox.embed_in.weight", "embeddings"),
    ("model.layers.1.self_attn.q_proj.weight", "layers"),
    ("model.layers.1.input_layernorm.weight", "norms"),
    ("transformer.h.0.ln_1.bias", "norms"),
    ("transformer.ln_f.weight", "norms"),
    ("model.norm.weight", "norms"),
    ("gpt_neox.final_layer_norm.weight", "norms"),
    ("lm_head.weight", "lm_head"),
    ("embed_out.weight", "lm_head"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "layers"),
    ("score.weight", "other"),
])
def test_group_of(name, group):
    layers = freeze.find_layers(llama_names(2) + gpt2_names(1) + [name])
    layers += freeze.find_layers([name])  # the block prefix of the name's own family
    assert freeze.group_of(name, layers) == group


def test_is_bias():
    assert freeze.is_bias("transformer.h.0.attn.c_attn.bias")
    assert not freeze.is_bias("transformer.h.0.attn.c_attn.weight")
    assert not freeze.is_bias("model.bias_proj.weight")


def test_full_trains_everything():
    names = llama_names(2)
    assert freeze.select(names, FreezeConfig(policy="full")) == frozenset(names)


def test_last_layers_with_also_train():
    names = llama_names(4)
    got = freeze.select(names, FreezeConfig(policy="last_layers", trainable_layers=1,
                                            also_train=["norms", "lm_head"]))
    want = {n for n in names if n.startswith("model.layers.3.")} | {
        "model.norm.weight", "lm_head.weight"} | {n for n in names if "layernorm" in n}
    assert got == want


def test_last_layers_negative_means_first():
    names = llama_names(4)
    got = freeze.select(names, FreezeConfig(policy="last_layers", trainable_layers=-2))
    assert got == {n for n in names if n.startswith(("model.layers.0.", "model.layers.1."))}


def test_last_layers_too_many():
    with pytest.raises(ConfigError, match=r"freeze.trainable_layers: 5 blocks asked, the model has 4"):
        freeze.select(llama_names(4), FreezeConfig(policy="last_layers", trainable_layers=5))


def test_last_layers_without_blocks():
    with pytest.raises(ConfigError, match="no numbered transformer blocks"):
        freeze.select(["a.weight"], FreezeConfig(policy="last_layers"))


def test_patterns_order_freeze_wins():
    names = llama_names(3)
    cfg = FreezeConfig(policy="patterns", train=[r"layers\.2\.", r"mlp"],
                       also_train=["embeddings"], freeze=[r"down_proj", r"embed"])
    got = freeze.select(names, cfg)
    assert "model.layers.2.self_attn.q_proj.weight" in got
    assert "model.layers.0.mlp.up_proj.weight" in got
    assert not any("down_proj" in n for n in got)          # freeze wins over train
    assert "model.embed_tokens.weight" not in got          # ... and over also_train
    assert "lm_head.weight" not in got


def test_pattern_matching_nothing_names_key_and_pattern():
    cfg = FreezeConfig(policy="patterns", train=[r"layers\.0\.", r"no_such_module"],
                       freeze=[r"nope"])
    with pytest.raises(ConfigError, match=r"freeze.train\[1\]: pattern 'no_such_module' matches no") as e:
        freeze.select(llama_names(2), cfg)
    assert e.value.keys == ["freeze.train[1]", "freeze.freeze[0]"]  # every problem at once


def test_nothing_trainable():
    cfg = FreezeConfig(policy="patterns", train=[r"lm_head"], freeze=[r"head"])
    with pytest.raises(ConfigError, match="leaves nothing trainable"):
        freeze.select(llama_names(2), cfg)


def test_also_train_group_absent():
    with pytest.raises(ConfigError, match="group 'biases' matches no parameter"):
        freeze.select(llama_names(2), FreezeConfig(policy="last_layers", also_train=["biases"]))


def test_biases_group():
    names = gpt2_names(2)
    got = freeze.select(names, FreezeConfig(policy="patterns", also_train=["biases"]))
    assert got == {n for n in names if n.endswith(".bias")}


def test_quantized_cannot_train():
    names = llama_names(2)
    quant = {n for n in names if "proj" in n}
    with pytest.raises(ConfigError, match=r"freeze.trainable_layers: selects 7 quantized parameters"
                                          r".*quantized weights cannot train"):
        freeze.select(names, FreezeConfig(policy="last_layers"), quantized=quant)
    ok = freeze.select(names, FreezeConfig(policy="patterns", also_train=["norms", "lm_head"]),
                       quantized=quant)
    assert not ok & quant and "lm_head.weight" in ok


def test_lora_selects_only_also_train():
    names = llama_names(2)
    assert freeze.select(names, FreezeConfig(policy="lora")) == frozenset()
    assert freeze.select(names, FreezeConfig(policy="lora", also_train=["lm_head"])) == {"lm_head.weight"}


def test_tied_embeddings_count_once():
    names = gpt2_names(1)  # named_parameters() drops the tied lm_head.weight
    tied = {"lm_head.weight": "transformer.wte.weight"}
    got = freeze.select(names, FreezeConfig(policy="patterns", also_train=["lm_head"]), tied=tied)
    assert got == {"transformer.wte.weight"}  # training the head trains the shared tensor
    frozen = freeze.select(names, FreezeConfig(policy="patterns", train=["h\\.0\\."],
                                               also_train=["lm_head"], freeze=["wte"]), tied=tied)
    assert "transformer.wte.weight" not in frozen and "lm_head.weight" not in frozen


def test_apply_on_tiny_model(tiny):
    from transformers import AutoModelForCausalLM

    from launcher.config.runfile import parse
    model = AutoModelForCausalLM.from_pretrained(tiny["model"])
    cfg, problems = parse(f"""
name: t
model: {{path: {tiny['model']}, dtype: fp32}}
data: {{path: {tiny['text']}, max_seq_len: 32}}
train: {{max_steps: 2, device: cpu}}
freeze: {{policy: last_layers, trainable_layers: 1, also_train: [norms, lm_head]}}
""", [])
    assert not problems
    out, rep = freeze.apply(model, cfg)
    assert out is model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(rep.trainable)
    assert all(n.startswith("model.layers.1.") or "norm" in n or n == "lm_head.weight"
               for n in trainable)
    expect = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rep.trainable_params == expect
    assert rep.total_params == sum(p.numel() for p in model.parameters())
    assert rep.trainable_bytes == expect * 4
    rows = {r.group: r for r in rep.rows}
    assert rows["embeddings"].trainable_params == 0 and rows["embeddings"].frozen_params > 0
    assert rows["lm_head"].frozen_params == 0
    text = rep.render()
    assert f"{rep.trainable_params:,} of {rep.total_params:,}" in text and "lm_head" in text
    assert rep.to_dict()["trainable_params"] == expect
