"""`ftlaunch preflight` without a cluster: the judgement of node reports (pure), GPU counting
through a fake nvidia-smi, the run-directory checks, the summary, and a whole one-node run."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cluster"))
from helpers import write_exe

from launcher.rank import preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = {"python": "3.11.7", "ftlaunch": "0.1", "torch": "2.13", "deepspeed": "0.19", "transformers": "5.0"}


def report(node, problems=(), gpus=(), **versions):
    return {"node": node, "problems": list(problems), "gpus": list(gpus), "write_bytes_s": 5e8,
            "versions": {**V, **versions}}


def test_judge_names_each_bad_node_with_its_reason():
    names = {0: "node1", 1: "node2", 2: "node3", 3: "node4"}
    gib = 2**30
    reports = {0: report("node1", gpus=[{"index": 0, "free": 70 * gib, "total": 80 * gib}]),
               1: report("node2", ["cannot write in the run directory /r: Read-only file system"]),
               2: None,
               3: report("node4", gpus=[{"index": 1, "free": 10 * gib, "total": 80 * gib}],
                         torch="2.12")}
    bad = preflight.judge(reports, names, per_gpu_need=40 * gib)
    assert sorted(bad) == ["node2", "node3", "node4"]
    assert bad["node2"] == ["cannot write in the run directory /r: Read-only file system"]
    assert bad["node3"][0].startswith("no report")
    assert bad["node4"] == ["torch 2.12, the other nodes have 2.13",
                            "GPU 1: 10.0 GiB free, the memory plan needs 40.0 GiB"]
    assert preflight.judge({0: report("node1"), 1: report("node2")}, {0: "node1", 1: "node2"}) == {}


def test_judge_without_a_majority_takes_node_0s_versions():
    bad = preflight.judge({0: report("a"), 1: report("b", deepspeed="0.18")}, {0: "a", 1: "b"})
    assert bad == {"b": ["deepspeed 0.18, the other nodes have 0.19"]}


def test_gpus_are_counted_as_torch_counts_them_not_by_nvidia_smi(tmp_path, monkeypatch):
    """nvidia-smi lists every GPU of the node by index; the task was given two by UUID. The
    count is torch's in the task's environment (what the ranks will see): 2, with each GPU's
    model and compute capability, and the driver version from nvidia-smi."""
    import types

    import torch
    write_exe(str(tmp_path / "nvidia-smi"), "#!/bin/bash\ncase \"$*\" in *driver_version*) "
              "echo 550.54.15; echo 550.54.15 ;; *) for i in 0 1 2 3 4 5 6 7; do "
              "echo \"$i, 81000, 81559\"; done ;; esac\n")
    uuids = "GPU-11111111-2222-3333-4444-555555555555,GPU-66666666-7777-8888-9999-000000000000"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuids)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(torch.cuda._parse_visible_devices()))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(
        name="NVIDIA H100 80GB HBM3", major=9, minor=0, uuid=uuids.split(",")[i][4:]))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (70 * 2**30, 80 * 2**30))
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": uuids}
    gpus = preflight.gpu_inventory(env)
    assert [(g["index"], g["name"], g["capability"]) for g in gpus] == [
        (0, "NVIDIA H100 80GB HBM3", "9.0"), (1, "NVIDIA H100 80GB HBM3", "9.0")]
    from launcher.rank import node_checks
    assert node_checks.driver_version(env) == "550.54.15"
    r = {**report("node1", gpus=gpus), "driver": "550.54.15", "driver_cuda": "12.4",
         "torch_cuda": "12.4", "checks": node_checks.optimizer_checks(
             types.SimpleNamespace(train=types.SimpleNamespace(optimizer="adamw"),
                                   deepspeed=types.SimpleNamespace(offload_optimizer="none")), True)}
    text = preflight.summary_text({0: r}, {0: "node1"}, {}, None, [], 1.0)
    assert ("node1        GPUs: 2 x NVIDIA H100 80GB HBM3 (compute capability 9.0); driver "
            "550.54.15, CUDA 12.4 (torch built for 12.4)") in text
    assert "node1        ok  optimizer: AdamW: torch's fused AdamW on GPUs" in text


def test_run_dir_checks_token_and_writability(tmp_path):
    (tmp_path / "preflight").mkdir()
    (tmp_path / "preflight" / "token").write_text("abc\n")
    problems, speed = preflight.check_run_dir(str(tmp_path), "abc", "node1")
    assert problems == [] and speed > 0
    problems, _ = preflight.check_run_dir(str(tmp_path), "other", "node1")
    assert len(problems) == 1 and "is not the one the batch node sees" in problems[0]
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "preflight").write_text("a file where the folder should be")
    problems, speed = preflight.check_run_dir(str(blocked), None, "node1")
    assert speed is None and problems[0].startswith(f"cannot write in the run directory {blocked}")


def test_checkpoint_note_warns_when_grace_is_too_short():
    reports = {0: report("a"), 1: {**report("b"), "write_bytes_s": 1e8}}
    ok = preflight.checkpoint_note(2 * 10**9, reports, grace_s=120)
    assert "20.0 s at the slowest node's 100 MB/s" in ok and "WARNING" not in ok
    short = preflight.checkpoint_note(2 * 10**10, reports, grace_s=120)
    assert "WARNING: a checkpoint takes longer than cluster.grace_s" in short
    assert "raise cluster.grace_s above 201 s" in short


def test_import_is_login_safe():
    code = ("import sys, launcher.rank.preflight, launcher.cli; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.slow
def test_one_node_preflight_passes_and_prints_its_all_reduce(tiny, tmp_path):
    """`python -m launcher preflight` outside Slurm: one node, gloo; the summary files are written."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tree = {"name": "pf", "model": {"path": tiny["model"]}, "data": {"path": tiny["text"],
            "max_seq_len": 32}, "train": {"max_steps": 2, "device": "cpu"},
            "output": {"dir": str(run_dir)}}
    (run_dir / "resolved.yaml").write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "MASTER_"))}
    out = subprocess.run([sys.executable, "-m", "launcher", "preflight", str(run_dir / "resolved.yaml"),
                          "--bad-nodes", str(tmp_path / "bad")], capture_output=True, text=True,
                         timeout=300, env={**env, "PYTHONPATH": ROOT}, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "node(s), all passed" in out.stdout
    assert "all-reduce (gloo, 1 node(s), 8 MiB x 5): bus bandwidth" in out.stdout
    summary = json.loads((run_dir / preflight.SUMMARY_JSON).read_text())
    assert summary["bad"] == {} and summary["allreduce"]["backend"] == "gloo"
    assert summary["checkpoint_bytes"] > 0
    assert not (tmp_path / "bad").exists()


def test_cli_registers_preflight():
    from launcher import cli
    args = cli.build_parser().parse_args(["preflight", "r/resolved.yaml", "--bad-nodes", "f"])
    assert args.command == "preflight" and args.bad_nodes == "f" and args.run_file == "r/resolved.yaml"
    assert isinstance(args, argparse.Namespace)


def _nvme_cfg(tmp_path, path, offload="nvme"):
    import types
    ds = types.SimpleNamespace(offload_optimizer=offload, offload_param="none", nvme_path=str(path))
    return types.SimpleNamespace(deepspeed=ds)


def test_nvme_checks_are_skipped_without_nvme_offload(tmp_path):
    assert preflight.check_nvme(_nvme_cfg(tmp_path, tmp_path, offload="cpu"), aio_compatible=False) == []


def test_nvme_checks_name_libaio_and_an_unwritable_path(tmp_path):
    (tmp_path / "a-file").write_text("x")
    bad = tmp_path / "a-file" / "swap"  # a folder below a file: cannot exist
    problems = preflight.check_nvme(_nvme_cfg(tmp_path, bad), aio_compatible=False, pinned=0)
    assert any("async_io op cannot be built" in p and "libaio" in p for p in problems)
    assert any(f"deepspeed.nvme_path {bad}: not writable here" in p for p in problems)
    good = preflight.check_nvme(_nvme_cfg(tmp_path, tmp_path / "swap"), aio_compatible=True, pinned=0)
    assert good == [] and (tmp_path / "swap").is_dir() and not list((tmp_path / "swap").iterdir())


def test_nvme_checks_the_memlock_limit_against_the_pinned_buffers(tmp_path):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    low = 64 * 1024 if hard == resource.RLIM_INFINITY else min(64 * 1024, hard)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (low, hard))
    try:
        cfg = _nvme_cfg(tmp_path, tmp_path / "swap")
        problems = preflight.check_nvme(cfg, aio_compatible=True, pinned=2**30)
        assert len(problems) == 1 and "ulimit -l (locked memory) is 64 KiB" in problems[0]
        assert "pins 1.0 GiB per rank" in problems[0]
        assert preflight.check_nvme(cfg, aio_compatible=True, pinned=4096) == []
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))
