"""validate checks freeze patterns against the names transformers gives the weights at load:
Mixtral's on-disk `block_sparse_moe.experts.N.w1/w2/w3` are `mlp.experts.gate_up_proj/down_proj`."""
from __future__ import annotations

import json
import os

import pytest

from launcher.checks import loaded_names, validate
from launcher.config import runfile
from test_model_weights import write_safetensors

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
TINY = {"hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "num_local_experts": 2, "vocab_size": 16}


def mixtral_on_disk(folder) -> dict:
    """A Mixtral folder as the original checkpoints are saved: per-expert w1/w2/w3."""
    with open(os.path.join(CONFIGS, "mixtral-8x7b", "config.json")) as fh:
        cfg = dict(json.load(fh), **TINY)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    layer = "model.layers.0."
    tensors = {"model.embed_tokens.weight": ("BF16", [16, 8]), "lm_head.weight": ("BF16", [16, 8]),
               "model.norm.weight": ("BF16", [8]), layer + "input_layernorm.weight": ("BF16", [8]),
               layer + "post_attention_layernorm.weight": ("BF16", [8]),
               layer + "block_sparse_moe.gate.weight": ("BF16", [2, 8])}
    for p, shape in (("q", [8, 8]), ("k", [4, 8]), ("v", [4, 8]), ("o", [8, 8])):
        tensors[f"{layer}self_attn.{p}_proj.weight"] = ("BF16", shape)
    for e in range(2):
        for w, shape in (("w1", [4, 8]), ("w2", [8, 4]), ("w3", [4, 8])):
            tensors[f"{layer}block_sparse_moe.experts.{e}.{w}.weight"] = ("BF16", shape)
    write_safetensors(folder / "model.safetensors", tensors)
    return cfg


def problems(tmp_path, train: list[str]) -> list:
    text = (f"name: t\nmodel: {{path: mixtral}}\ndata: {{path: train.jsonl}}\n"
            f"train: {{max_steps: 10}}\nfreeze: {{policy: patterns, train: {json.dumps(train)}}}\n")
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    cfg, found = runfile.parse(text, [], source="run.yaml", base_dir=str(tmp_path))
    assert cfg is not None, found
    return [p for p in validate.check(cfg) if p.key.startswith("freeze.")]


def test_on_disk_block_sparse_moe_patterns_are_refused_naming_the_loaded_names(tmp_path):
    mixtral_on_disk(tmp_path / "mixtral")
    found = problems(tmp_path, ["block_sparse_moe"])
    assert [p.key for p in found] == ["freeze.train[0]"]
    assert "pattern 'block_sparse_moe' matches no parameter" in found[0].message
    assert "mlp.experts.down_proj" in found[0].fix and "block_sparse_moe" not in found[0].fix
    assert problems(tmp_path, [r"mlp\.experts", r"mlp\.gate", "gate_up_proj", "down_proj"]) == []


def test_the_renamed_names_are_those_of_the_loaded_model(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.model import info as model_info
    mixtral_on_disk(tmp_path / "mixtral")
    disk = list(model_info.weight_tensors(str(tmp_path / "mixtral")))
    got = loaded_names.rename(model_info.model_config(str(tmp_path / "mixtral")), disk)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "mixtral"))
    assert got == sorted(n for n, _ in model.named_parameters())
    assert "model.layers.0.mlp.experts.gate_up_proj" in got
    assert not any("block_sparse_moe" in n for n in got)


def test_models_without_load_renaming_keep_their_disk_names():
    names = ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    assert loaded_names.rename({"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
                               names) == sorted(names)


def test_the_parsed_rules_are_kept_between_commands_until_transformers_changes(tmp_path,
                                                                             monkeypatch):
    import ast
    import json
    import os
    from launcher.model import info as model_info
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    mixtral_on_disk(tmp_path / "mixtral")
    cfg = model_info.model_config(str(tmp_path / "mixtral"))
    disk = list(model_info.weight_tensors(str(tmp_path / "mixtral")))
    loaded_names.clear_rules_cache()
    want = loaded_names.rename(cfg, disk)
    assert "model.layers.0.mlp.experts.gate_up_proj" in want
    cached = json.loads(open(loaded_names.cache_file()).read())
    assert cached["key"][0].endswith("conversion_mapping.py")
    # the next command reads the file, not transformers' source
    loaded_names.clear_rules_cache()
    monkeypatch.setattr(ast, "parse", lambda *a, **k: (_ for _ in ()).throw(AssertionError("parsed")))
    assert loaded_names.rename(cfg, disk) == want
    # a cache made from another source file (transformers upgraded: other mtime) is not used
    cached["key"][1] -= 1
    with open(loaded_names.cache_file(), "w") as fh:
        json.dump(cached, fh)
    loaded_names.clear_rules_cache()
    with pytest.raises(AssertionError, match="parsed"):
        loaded_names.rename(cfg, disk)
    monkeypatch.undo()
    monkeypatch.setenv("FTLAUNCH_CACHE", str(tmp_path / "cache"))
    loaded_names.clear_rules_cache()
    assert loaded_names.rename(cfg, disk) == want
    assert json.loads(open(loaded_names.cache_file()).read())["key"][1] == os.path.getmtime(
        cached["key"][0])
    loaded_names.clear_rules_cache()
