"""Reading a model folder's safetensors headers without torch (launcher.model.info)."""
from __future__ import annotations

import json
import struct

import pytest

from launcher.model import info as model_info


def write_safetensors(path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A real safetensors file (zeros), written by hand: 8-byte length, JSON header, data."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = model_info.SAFETENSORS_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_headers_of_a_file_written_by_safetensors_itself(tmp_path):
    import torch
    from safetensors.torch import save_file
    save_file({"a.weight": torch.zeros(3, 4, dtype=torch.bfloat16), "b": torch.zeros(5)},
              str(tmp_path / "model.safetensors"))
    got = model_info.weight_tensors(str(tmp_path))
    assert got == {"a.weight": {"dtype": "BF16", "shape": [3, 4], "file": "model.safetensors"},
                   "b": {"dtype": "F32", "shape": [5], "file": "model.safetensors"}}


def test_sharded_folder_reads_every_shard_and_names_a_missing_one(tmp_path):
    write_safetensors(tmp_path / "s1.safetensors", {"x": ("F16", [2, 2])})
    write_safetensors(tmp_path / "s2.safetensors", {"y": ("F32", [3])})
    (tmp_path / model_info.SAFETENSORS_INDEX).write_text(json.dumps(
        {"weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}}))
    assert set(model_info.weight_tensors(str(tmp_path))) == {"x", "y"}
    (tmp_path / "s2.safetensors").unlink()
    with pytest.raises(model_info.WeightsError, match="names 1 shard.*s2.safetensors"):
        model_info.weight_tensors(str(tmp_path))


def test_truncated_and_garbage_files_are_named(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"x": ("F32", [100])})
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(model_info.WeightsError, match="truncated"):
        model_info.weight_tensors(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(model_info.WeightsError, match="not a safetensors file"):
        model_info.weight_tensors(str(tmp_path))


def test_folder_without_weights_gives_nothing(tmp_path):
    assert model_info.weight_tensors(str(tmp_path)) == {}
