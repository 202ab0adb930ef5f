"""What the run's optimizer needs on a node (launcher/rank/node_checks.py), as preflight checks it:
DeepSpeedCPUAdam's compiler and ninja (or a built op), bitsandbytes' native library."""
from __future__ import annotations

import os
import sys

import pytest

from launcher.rank import node_checks
from launcher.config import runfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
from helpers import write_exe


def cfg_of(tmp_path, fake_model, train="{max_steps: 1}", ds="{zero_stage: 2}"):
    text = f"""
name: nc
model: {{path: {fake_model}}}
data: {{path: {tmp_path}/train.jsonl, max_seq_len: 64}}
train: {train}
deepspeed: {ds}
"""
    cfg, problems = runfile.parse(text, [], source="run.yaml", base_dir=str(tmp_path))
    assert problems == []
    return cfg


def test_the_optimizer_is_decided_from_the_run_file(tmp_path, fake_model):
    assert node_checks.optimizer_kind(cfg_of(tmp_path, fake_model)) == "torch_adamw"
    assert node_checks.optimizer_kind(cfg_of(
        tmp_path, fake_model, ds="{zero_stage: 2, offload_optimizer: cpu}")) == "cpu_adam"
    assert node_checks.optimizer_kind(cfg_of(
        tmp_path, fake_model, train="{max_steps: 1, optimizer: adamw_8bit}")) == "bnb_8bit"


@pytest.fixture
def offload(tmp_path, fake_model, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.delenv("CXX", raising=False)
    return cfg_of(tmp_path, fake_model, ds="{zero_stage: 2, offload_optimizer: cpu}")


def test_offload_without_compiler_or_ninja_fails_with_the_fix(offload, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    row, = node_checks.optimizer_checks(offload, gpu=True)
    assert row["check"] == "optimizer: DeepSpeedCPUAdam (deepspeed.offload_optimizer)"
    assert not row["ok"]
    assert row["detail"] == ("cpu_adam is compiled on first use, and this node has no C++ "
                             "compiler (c++) and no ninja")
    assert "DS_BUILD_CPU_ADAM=1 pip install deepspeed" in row["fix"]


def test_offload_with_compiler_and_ninja_passes(offload, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(str(bin_dir / "c++"), "#!/bin/sh\nexit 0\n")
    write_exe(str(bin_dir / "ninja"), "#!/bin/sh\necho 1.13.2\n")
    monkeypatch.setenv("PATH", str(bin_dir))
    row, = node_checks.optimizer_checks(offload, gpu=True)
    assert row["ok"] and row["detail"].startswith("cpu_adam compiled on first use (c++, ninja)"), row


def test_offload_with_the_op_built_needs_no_compiler(offload, tmp_path, monkeypatch):
    built = tmp_path / "extensions" / "py311_cu124" / "cpu_adam"
    built.mkdir(parents=True)
    (built / "cpu_adam.so").write_bytes(b"\x7fELF")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    row, = node_checks.optimizer_checks(offload, gpu=True)
    assert row["ok"] and row["detail"] == f"cpu_adam built already ({built / 'cpu_adam.so'})", row


@pytest.fixture
def eight_bit(tmp_path, fake_model):
    return cfg_of(tmp_path, fake_model, train="{max_steps: 1, optimizer: adamw_8bit}")


def test_8bit_on_cpu_ranks_needs_no_native_library(eight_bit):
    row, = node_checks.optimizer_checks(eight_bit, gpu=False)
    assert row["ok"] and row["detail"].startswith("bitsandbytes 0."), row


def test_8bit_on_gpus_without_the_native_library_fails(eight_bit, monkeypatch):
    from bitsandbytes import cextension
    mock = cextension.ErrorHandlerMockBNBNativeLibrary("libcudart.so.13: cannot open shared object file")
    monkeypatch.setattr(cextension, "lib", mock)
    row, = node_checks.optimizer_checks(eight_bit, gpu=True)
    assert not row["ok"]
    assert row["detail"] == ("bitsandbytes' native library did not load: libcudart.so.13: cannot "
                             "open shared object file")
    assert "bitsandbytes wheel built for the node's CUDA" in row["fix"]


def test_8bit_on_gpus_with_a_cpu_build_fails(eight_bit, monkeypatch):
    from bitsandbytes import cextension

    class CpuLib(cextension.BNBNativeLibrary):
        compiled_with_cuda = False

        def __init__(self):
            pass
    monkeypatch.setattr(cextension, "lib", CpuLib())
    row, = node_checks.optimizer_checks(eight_bit, gpu=True)
    assert not row["ok"] and "is a CPU build" in row["detail"], row
