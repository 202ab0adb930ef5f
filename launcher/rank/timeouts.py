"""The ranks' collective timeouts: short while all ranks work, long while rank 0 works alone.

train.dist_timeout_s (600 s) bounds every collective, so that a dead or frozen peer ends the job
within it. On GPUs an expired collective is not a Python exception: ProcessGroupNCCL's watchdog
thread aborts the process (TORCH_NCCL_ASYNC_ERROR_HANDLING, default 3: tear down without
cleaning up: SIGABRT), and nothing after it runs. So that such a death is still told:
`nccl_debug_env` turns on NCCL's flight recorder dump (TORCH_NCCL_DUMP_ON_TIMEOUT, the ring
buffer of the last collectives, written to RUN_DIR/logs/nccl-trace-rank-N), and the rank's
guardian records the signal in exit_status.json (launcher/cluster/rank_guard.py). Blocking wait
(TORCH_NCCL_BLOCKING_WAIT=1, which would raise in Python instead) is left off: it makes the host
wait for every collective, which costs the overlap of communication with compute.

Some phases keep the other ranks waiting in a collective while rank 0 alone works: a checkpoint
(DeepSpeed's rank 0 writes the 16-bit model states behind a barrier; ours writes the manifest,
prunes old checkpoints), the final export (the merged LoRA model, `save_pretrained` of a 70B
model) and the hashing of a resume. `rank0_phase(seconds)` gives every process group the
timeout train.save_timeout_s for the phase (torch's `_set_pg_timeout`: collectives issued from
then on use it) and restores train.dist_timeout_s after it.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator, MutableMapping

from launcher.cluster import layout

NCCL_TRACE_PREFIX = "nccl-trace-rank-"   # + the rank: the flight recorder's dump, in RUN_DIR/logs


def _groups() -> list:
    """Every process group of this rank: the world group and those DeepSpeed made."""
    from torch.distributed import distributed_c10d as c10d
    return list(c10d._world.pg_map.keys())


def set_timeout(seconds: float) -> int:
    """The timeout of every process group, for the collectives issued from now on; returns the
    number of groups changed (0 when no process group is started)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    timeout = datetime.timedelta(seconds=seconds)
    changed = 0
    for group in _groups():
        try:
            c10d._set_pg_timeout(timeout, group)
            changed += 1
        except ValueError:   # a group this rank is not in
            pass
    return changed


@contextlib.contextmanager
def rank0_phase(long_s: float, normal_s: float) -> Iterator[None]:
    """Collectives inside wait up to long_s (rank 0 works alone); normal_s again after."""
    set_timeout(long_s)
    try:
        yield
    finally:
        set_timeout(normal_s)


def nccl_debug_env(run_dir: str, env: MutableMapping[str, str] | None = None) -> None:
    """Before the NCCL process group starts: on a collective timeout, NCCL's watchdog dumps its
    flight recorder (the last collectives of every group, with their state) to
    RUN_DIR/logs/nccl-trace-rank-N before it aborts the rank. Values set by the user win."""
    env = os.environ if env is None else env
    logs = os.path.join(run_dir, layout.LOGS)
    try:
        os.makedirs(logs, exist_ok=True)
    except OSError:
        return  # no dump file then; the abort and its record still happen
    env.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    env.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    env.setdefault("TORCH_NCCL_ENABLE_MONITORING", "1")
    if "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" not in env:
        env.setdefault("TORCH_FR_DUMP_TEMP_FILE", os.path.join(logs, NCCL_TRACE_PREFIX))
