"""What a model folder says without torch (launcher/model/info.py)."""
from __future__ import annotations

import json

from launcher.model import info as model_info


def test_config_json_readers_look_into_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llava", "text_config": {"model_type": "llama", "max_position_embeddings": 4096,
                                                "num_hidden_layers": 30, "hidden_size": 2048}}))
    mc = model_info.model_config(str(tmp_path))
    assert model_info.max_positions(mc) == 4096 and model_info.num_layers(mc) == 30
    assert model_info.hidden_size(mc) == 2048
    assert model_info.model_type(mc) == "llava"  # the top-level architecture wins
    assert model_info.folder_max_positions(str(tmp_path)) == 4096


def test_other_spellings_and_nonsense_values():
    assert model_info.max_positions({"n_positions": 1024, "n_layer": True}) == 1024
    assert model_info.num_layers({"n_layer": True}) is None  # a bool is not a count
    assert model_info.hidden_size({"n_embd": 768}) == 768
    assert model_info.hidden_size({"hidden_size": 0}) is None
    assert model_info.model_type({"model_type": ""}) is None
    assert model_info.model_type({}) is None


def test_an_unreadable_folder_says_nothing(tmp_path):
    assert model_info.model_config(str(tmp_path)) is None  # no config.json
    assert model_info.folder_max_positions(str(tmp_path)) is None
    (tmp_path / "config.json").write_text("[1, 2]")
    assert model_info.model_config(str(tmp_path)) is None
    (tmp_path / "config.json").write_text("{not json")
    assert model_info.model_config(str(tmp_path)) is None
