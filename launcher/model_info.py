"""What a model folder says about the model without torch: its config.json, read as JSON.

The login-node rules (`validate`) and the data check (sequence length against the model's
positions) ask here; nothing is imported but the standard library. Multimodal configs keep the
language model's numbers under `text_config`; each reader looks there too.
"""
from __future__ import annotations

import json
import os


def model_config(path: str) -> dict | None:
    """The model's config.json as a dict, or None if unreadable (no torch needed)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _lookup(model_cfg: dict, key: str):
    v = model_cfg.get(key)
    if v is None and isinstance(model_cfg.get("text_config"), dict):
        v = model_cfg["text_config"].get(key)
    return v


def _positive_int(model_cfg: dict, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        v = _lookup(model_cfg, key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def max_positions(model_cfg: dict) -> int | None:
    """Longest sequence the model takes, from its config.json (None if it does not say)."""
    return _positive_int(model_cfg, ("max_position_embeddings", "n_positions",
                                     "max_sequence_length", "seq_length"))


def num_layers(model_cfg: dict) -> int | None:
    """Transformer blocks, from config.json (None if it does not say)."""
    return _positive_int(model_cfg, ("num_hidden_layers", "n_layer", "num_layers", "n_layers"))


def hidden_size(model_cfg: dict) -> int | None:
    """Width of the residual stream, from config.json (None if it does not say)."""
    return _positive_int(model_cfg, ("hidden_size", "n_embd", "d_model"))


def model_type(model_cfg: dict) -> str | None:
    """The architecture name transformers dispatches on ("llama", "gpt2"), or None."""
    v = _lookup(model_cfg, "model_type")
    return v if isinstance(v, str) and v else None


def folder_max_positions(path: str) -> int | None:
    """max_positions of the model folder at path (None if its config.json is unreadable or silent)."""
    mc = model_config(path)
    return max_positions(mc) if mc else None
