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


def largest_matrix(model_cfg: dict) -> int | None:
    """Elements of the biggest weight matrix: the embedding (vocab x hidden) or an MLP matrix
    (intermediate x hidden); None if config.json does not give the hidden size."""
    h = hidden_size(model_cfg)
    if h is None:
        return None
    vocab = _positive_int(model_cfg, ("vocab_size", "padded_vocab_size")) or 0
    inter = _positive_int(model_cfg, ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")) \
        or 4 * h
    return h * max(vocab, inter, h)


def model_type(model_cfg: dict) -> str | None:
    """The architecture name transformers dispatches on ("llama", "gpt2"), or None."""
    v = _lookup(model_cfg, "model_type")
    return v if isinstance(v, str) and v else None


def folder_max_positions(path: str) -> int | None:
    """max_positions of the model folder at path (None if its config.json is unreadable or silent)."""
    mc = model_config(path)
    return max_positions(mc) if mc else None


# ------------------------------------------------------------------ weights, without torch
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                     "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class WeightsError(ValueError):
    """A model folder's weights cannot be read as safetensors: the message names the file."""


def safetensors_header(path: str) -> dict[str, dict]:
    """One .safetensors file's tensors: name -> {"dtype", "shape"}, read from its JSON header
    (the first 8 bytes give the header's length); no tensor data is read."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise WeightsError(f"{path}: shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > 100 * 2**20:
                raise WeightsError(f"{path}: not a safetensors file (header length {n})")
            raw = fh.read(n)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise WeightsError(f"{path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise WeightsError(f"{path}: the safetensors header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: the safetensors header is not a JSON object")
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and isinstance(info.get("shape"), list)
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2):
            raise WeightsError(f"{path}: tensor {name!r} has no shape or data_offsets")
        out[name] = {"dtype": info.get("dtype"), "shape": [int(d) for d in info["shape"]]}
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end > size:
        raise WeightsError(f"{path}: truncated ({size:,} bytes, the header needs {8 + n + end:,})")
    return out


def weight_files(path: str) -> list[str]:
    """The safetensors files of a model folder: the shards its index names (every one must be
    there), else every *.safetensors file. Raises WeightsError naming what is missing."""
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{index}: not a safetensors index ({exc})") from exc
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise WeightsError(f"{index} names {len(missing)} shard(s) that are not in the folder: "
                               + ", ".join(missing[:5]))
        return [os.path.join(path, s) for s in shards]
    try:
        names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    except OSError as exc:
        raise WeightsError(f"{path}: {exc.strerror or exc}") from exc
    return [os.path.join(path, f) for f in names]


def weight_tensors(path: str) -> dict[str, dict]:
    """Every tensor of a model folder's safetensors weights: name -> {"dtype", "shape", "file"};
    {} when the folder holds no safetensors file. Raises WeightsError on an unreadable file."""
    out: dict[str, dict] = {}
    for f in weight_files(path):
        for name, info in safetensors_header(f).items():
            out[name] = {**info, "file": os.path.basename(f)}
    return out
