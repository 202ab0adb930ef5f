"""Which GPU a rank uses: the local rank modulo the devices its process sees (launcher/model/device.py),
and the node's own devices restored under the deepspeed launcher. CUDA cannot run here: the
device count is torch's own parse of CUDA_VISIBLE_DEVICES, and init_distributed's calls to
torch.cuda and deepspeed are recorded."""
from __future__ import annotations

import os

import pytest

from launcher.model import device
from launcher.cluster import dist_env
from launcher.config import runfile
from launcher.rank import train

UUIDS = "GPU-5f6a1b2c-aaaa-bbbb-cccc-000000000001,GPU-5f6a1b2c-aaaa-bbbb-cccc-000000000002"
MIG = "MIG-1b2c3d4e-aaaa-bbbb-cccc-000000000003"

# (launcher environment, CUDA_VISIBLE_DEVICES, the device index the rank must use)
CASES = {
    # torchrun on a node whose task sees all 8 GPUs: the local rank picks one
    "torchrun, 8 visible": ({"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3",
                             "LOCAL_WORLD_SIZE": "8"}, "0,1,2,3,4,5,6,7", 3),
    # torchrun on a shared node: Slurm gave the task GPUs 4-7; index 2 is GPU 6
    "torchrun, a subset": ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2",
                            "LOCAL_WORLD_SIZE": "4"}, "4,5,6,7", 2),
    # srun, one task per GPU (--gpus-per-task=1 / --gpu-bind): the task sees one device
    "srun, one GPU per task": ({"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3",
                                "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_STEP_ID": "0",
                                "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "9"}, "3", 0),
    # srun, every task sees the node's GPUs: the local id picks one
    "srun, all visible": ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "5",
                           "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_STEP_ID": "0",
                           "SLURM_JOB_ID": "9"}, "0,1,2,3,4,5,6,7", 5),
    # GPU UUIDs, two per task (the local rank 3 on the second)
    "UUIDs": ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"},
              UUIDS, 1),
    # one MIG instance per task
    "MIG UUID": ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
                  "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_STEP_ID": "0",
                  "SLURM_JOB_ID": "9"}, MIG, 0),
}


def _torch_count() -> int:
    """What torch.cuda.device_count() answers on a machine with enough GPUs: the entries of
    CUDA_VISIBLE_DEVICES that torch's own parser accepts."""
    import torch
    return len(torch.cuda._parse_visible_devices())


@pytest.mark.parametrize("case", list(CASES))
def test_rank_device_index_over_launchers(case, monkeypatch):
    env, visible, want = CASES[case]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    rank = dist_env.from_environ(env)
    assert device.rank_device_index(rank.local_rank, _torch_count()) == want


def test_no_visible_device_is_named():
    with pytest.raises(RuntimeError, match="local rank 2: no CUDA device is visible"):
        device.rank_device_index(2, 0)


@pytest.fixture
def recorded_cuda(monkeypatch, tmp_path, fake_model):
    """torch.cuda as on a machine with GPUs (count from CUDA_VISIBLE_DEVICES), set_device and
    deepspeed.init_distributed recorded instead of run."""
    import deepspeed
    import torch
    calls: dict[str, list] = {"set_device": [], "init": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", _torch_count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls["set_device"].append(i))
    monkeypatch.setattr(deepspeed, "init_distributed",
                        lambda **kw: calls["init"].append((kw, os.environ["LOCAL_RANK"])))
    monkeypatch.setattr(train, "set_tf32", lambda on: None)
    monkeypatch.setattr(train, "inherit_timeout", lambda t: None)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", device.NODE_DEVICES_ENV):
        monkeypatch.setenv(key, "")  # recorded, so what init_distributed exports is undone after
        monkeypatch.delenv(key)
    text = f"""
name: dev
model: {{path: {fake_model}}}
data: {{path: {tmp_path}/train.jsonl, max_seq_len: 64}}
train: {{max_steps: 1}}
"""
    cfg, problems = runfile.parse(text, [], source="run.yaml", base_dir=str(tmp_path))
    assert problems == []
    return cfg, calls


def test_init_distributed_one_gpu_per_task_uses_device_0(recorded_cuda, monkeypatch):
    """srun with --gpus-per-task=1: SLURM_LOCALID 3 sees one GPU; set_device(3) would fail
    ("invalid device ordinal"). The rank takes device 0, and DeepSpeed, which reads LOCAL_RANK
    as the device ordinal (init_process_group's device_id=cuda:LOCAL_RANK in
    deepspeed/comm/torch.py, the engine, zero.Init), is started with LOCAL_RANK 0."""
    cfg, calls = recorded_cuda
    env, visible, _ = CASES["srun, one GPU per task"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    got = train.init_distributed(cfg, dist_env.from_environ({**env, "MASTER_ADDR": "127.0.0.1",
                                                             "MASTER_PORT": "1"}))
    assert got == "cuda:0"
    assert calls["set_device"] == [0]
    (kw, local_rank), = calls["init"]
    assert kw["dist_backend"] == "nccl" and local_rank == "0"


def test_init_distributed_torchrun_keeps_the_local_rank(recorded_cuda, monkeypatch):
    cfg, calls = recorded_cuda
    env, visible, _ = CASES["torchrun, 8 visible"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    got = train.init_distributed(cfg, dist_env.from_environ({**env, "MASTER_ADDR": "127.0.0.1",
                                                             "MASTER_PORT": "1"}))
    assert (got, calls["set_device"], calls["init"][0][1]) == ("cuda:3", [3], "3")


# ------------------------------------------------------------------ the deepspeed launcher
DS_ENV = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "0",
          "CROSS_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.mark.parametrize("node, given, want", [
    ("4,5", "0,1", "4,5"),                      # a shared node: Slurm gave GPUs 4 and 5
    ("6", "0", "6"),
    (UUIDS, "0,1", UUIDS),                      # UUIDs pass through as Slurm wrote them
    ("0,1,2,3", "0,1", "0,1"),                  # the first two of a whole node: unchanged
])
def test_restore_node_devices(node, given, want):
    env = {device.NODE_DEVICES_ENV: node, "CUDA_VISIBLE_DEVICES": given}
    assert device.restore_node_devices(env, "deepspeed") == want
    assert env["CUDA_VISIBLE_DEVICES"] == want


def test_restore_node_devices_leaves_other_launchers_alone():
    env = {device.NODE_DEVICES_ENV: "4,5", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert device.restore_node_devices(env, "torchrun") is None
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert device.restore_node_devices({"CUDA_VISIBLE_DEVICES": "0,1"}, "deepspeed") is None


def test_restore_node_devices_refuses_more_positions_than_devices():
    env = {device.NODE_DEVICES_ENV: "4,5", "CUDA_VISIBLE_DEVICES": "0,1,2"}
    with pytest.raises(RuntimeError, match="sees only 2 .*cluster.gpus_per_node is more than Slurm"):
        device.restore_node_devices(env, "deepspeed")


def test_init_distributed_under_deepspeed_launcher_uses_slurms_gpus(recorded_cuda, monkeypatch):
    """deepspeed's launch.py set CUDA_VISIBLE_DEVICES=0,1 on a node where Slurm gave GPUs 4,5
    (the job script kept them): the rank restores 4,5 before CUDA reads the variable."""
    cfg, calls = recorded_cuda
    monkeypatch.setenv(device.NODE_DEVICES_ENV, "4,5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    got = train.init_distributed(cfg, dist_env.from_environ(DS_ENV))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert (got, calls["set_device"]) == ("cuda:1", [1])
