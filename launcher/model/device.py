"""Where a run trains and in which torch dtype: one answer for `ftlaunch run` and the ranks.

torch is imported inside the functions: `ftlaunch run` asks before it starts any rank, the
ranks ask as they start; the login-node commands never call these.

Which GPU a rank uses (`rank_device_index`): its local rank modulo the devices it sees, as
Accelerate does (accelerate/state.py `set_device`). Under torchrun every rank of a node sees the
node's GPUs and the local rank picks one; where Slurm gives each task its own GPU
(`--gpus-per-task`, `--gpu-bind`), a task sees one device, index 0, whatever its SLURM_LOCALID.
The deepspeed launcher rewrites each rank's CUDA_VISIBLE_DEVICES to positions 0..N-1 of the
node; the job script keeps what Slurm gave the node in FTLAUNCH_NODE_CUDA_VISIBLE_DEVICES and
`restore_node_devices` maps the positions back onto it (indices, GPU-/MIG- UUIDs alike).
"""
from __future__ import annotations

import os
from typing import Any, MutableMapping, Optional

from launcher.config.schema import TORCH_DTYPE, RunConfig
from launcher.config.errors import ConfigError, Problem


def gpu_driver_present() -> bool:
    """An NVIDIA (or ROCm) driver on this machine: without one torch sees no GPU either, so a
    login-node check need not import torch to find none."""
    return os.path.exists("/proc/driver/nvidia/gpus") or os.path.exists("/dev/kfd")


def local_gpu_memory() -> int | None:
    """The memory of this machine's first GPU, None where it has none (torch is imported only
    where a driver is) or CUDA is broken."""
    if not gpu_driver_present():
        return None
    try:
        import torch
        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001  # pragma: no cover - a broken CUDA install must not break planning
        pass
    return None


def visible_gpus() -> int:
    """CUDA devices this process can see (0 without CUDA)."""
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


NODE_DEVICES_ENV = "FTLAUNCH_NODE_CUDA_VISIBLE_DEVICES"   # set by slurm/job.sbatch's node task


def rank_device_index(local_rank: int, visible: int) -> int:
    """The CUDA device index of the rank with this local rank, among the `visible` devices its
    process sees: local_rank % visible (one visible device per task: 0)."""
    if visible < 1:
        raise RuntimeError(f"local rank {local_rank}: no CUDA device is visible to this process "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    return local_rank % visible


def restore_node_devices(env: MutableMapping[str, str], launcher: str) -> Optional[str]:
    """Under the deepspeed launcher, CUDA_VISIBLE_DEVICES is "0,1,..": positions among the
    node's devices, not the devices Slurm gave the task. Replace each position by the node's own
    entry (NODE_DEVICES_ENV). Returns the new value, or None when nothing was changed (another
    launcher, or no record of the node's devices). A position past the node's list is a
    RuntimeError: the launcher was told of more GPUs than the task has."""
    node, given = env.get(NODE_DEVICES_ENV), env.get("CUDA_VISIBLE_DEVICES")
    if launcher != "deepspeed" or not node or given is None:
        return None
    devices = [d.strip() for d in node.split(",") if d.strip()]
    positions = [p.strip() for p in given.split(",") if p.strip()]
    if not all(p.isdigit() for p in positions):
        return None   # not the launcher's 0..N-1 (the user's own list): leave it
    if any(int(p) >= len(devices) for p in positions):
        raise RuntimeError(
            f"the deepspeed launcher gave this rank GPU position(s) {given} but the node's task "
            f"sees only {len(devices)} ({NODE_DEVICES_ENV}={node}): cluster.gpus_per_node is "
            "more than Slurm gave the node")
    mapped = ",".join(devices[int(p)] for p in positions)
    env["CUDA_VISIBLE_DEVICES"] = mapped
    return mapped


def job_device(cfg: RunConfig) -> str:
    """The ranks' device as the login node decides it, without looking for GPUs: "cpu" for
    train.device cpu, else "cuda" (auto means GPUs on the nodes a job gets). The DeepSpeed config,
    the memory plan, its advice and the job script all ask here; `ftlaunch run` and the ranks,
    which run where they look, use resolve_device."""
    return "cpu" if cfg.train.device == "cpu" else "cuda"


def resolve_device(cfg: RunConfig) -> str:
    """"cuda" or "cpu": train.device, with auto -> cuda when a GPU is visible, else cpu.
    train.device cuda where no GPU is visible is a ConfigError."""
    if cfg.train.device == "cpu":
        return "cpu"
    gpus = visible_gpus()
    if cfg.train.device == "cuda" and gpus == 0:
        raise ConfigError([Problem("train.device", "cuda asked but no GPU is visible here",
                                   "use train.device: auto or cpu to run on CPU ranks")])
    return "cuda" if gpus else "cpu"


def torch_dtype(name: str) -> Any:
    """The torch dtype of a run-file dtype name (model.dtype, quantization.*_dtype)."""
    import torch
    return getattr(torch, TORCH_DTYPE[name])
