"""Measured step times, the job's time limit from the estimate, and the partition's cap.

Torch-free (login node). A step time is measured in two places:

- `ftlaunch run --dry-run` trains a few steps in a temporary folder (nothing of the run is
  kept); `record_dry_run` keeps their median (the first step, which warms up kernels and
  allocators, left out) in the cache beside the tokenized data: step_time/KEY.json under the
  cache root (launcher/common/files.py cache_root), KEY = `compute_key`, so any run with the same
  settings finds it;
- a job's own metrics.jsonl (`step_time_s` of each line, launcher/rank/loop_steps.py `log_step`).

Both are kept per micro batch (step time / accumulation steps), so the measurement carries
over to another world size with the same micro batch: a step there takes accum' micro batches.
A measurement counts only for the settings it was taken with (`compute_key`: the model, dtype,
freeze policy, quantization, DeepSpeed settings, micro batch, sequence length and device);
the time of communication across more nodes is not in a one-node measurement.

`time_limit(seconds)` writes Slurm's D-HH:MM:SS; `partition_max_time(partition)` reads the
partition's MaxTime from `scontrol show partition` (None when it reports none or UNLIMITED).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import time
from typing import Any, Optional

from launcher.cluster import layout
from launcher.model.device import job_device



def compute_key(cfg: Any) -> str:
    """What a step's time depends on, as a short hash: a measurement of other settings is stale."""
    m, f, d, t, z = cfg.model, cfg.freeze, cfg.data, cfg.train, cfg.deepspeed
    keep = [m.path, m.dtype, m.gradient_checkpointing, m.attn_implementation, f.policy,
            f.trainable_layers, list(f.train), list(f.also_train), f.lora.r,
            list(f.lora.target_modules), cfg.quantization.mode, z.zero_stage,
            z.offload_optimizer, z.offload_param, d.max_seq_len, d.packing, t.micro_batch_size,
            t.device, t.optimizer]
    return hashlib.sha256(json.dumps(keep, default=str).encode()).hexdigest()[:16]


def step_times(metrics_path: str) -> list[float]:
    """Seconds per step of each train line of a metrics.jsonl, the first line left out (it
    includes the warm-up: first kernels, allocator growth)."""
    out: list[float] = []
    try:
        with open(metrics_path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "loss" in rec and isinstance(rec.get("step_time_s"), (int, float)):
                    out.append(float(rec["step_time_s"]))
    except OSError:
        return []
    return out[1:]


def store_path(cfg: Any) -> str:
    """Where a dry run's measurement for cfg's settings is kept (the module docstring)."""
    from launcher.common.files import cache_root
    return os.path.join(cache_root(), "step_time", compute_key(cfg) + ".json")


def record_dry_run(metrics_path: str, cfg: Any, world: int, device: str) -> Optional[dict]:
    """Keep the dry run's measurement (store_path); the record, or None when no step after the
    first was logged."""
    from launcher.config.batch import batch_sizes
    from launcher.cluster.rundir import write_atomic
    times = step_times(metrics_path)
    if not times:
        return None
    _, accum, _ = batch_sizes(cfg, world)
    step = statistics.median(times)
    rec = {"micro_batch_s": step / accum, "step_time_s": step, "accum": accum, "world": world,
           "device": device, "steps": len(times), "source": "ftlaunch run --dry-run",
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "key": compute_key(cfg)}
    path = store_path(cfg)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, json.dumps(rec, indent=2) + "\n")
    return rec


def measured(cfg: Any, world: int) -> Optional[tuple[float, str]]:
    """(seconds per optimizer step on `world` ranks, where from) from the run directory: the
    job's own steps (metrics.jsonl) first, else a dry run's (store_path); None when neither
    was measured with these settings on this kind of device."""
    from launcher.config.batch import batch_sizes
    _, accum, _ = batch_sizes(cfg, world)
    times = step_times(os.path.join(cfg.run_dir, layout.METRICS))
    if times:
        recent = times[-50:]
        return statistics.median(recent), f"measured: median of {len(recent)} logged steps in " \
            f"{layout.METRICS}"
    rec = _stored(cfg)
    want = job_device(cfg)
    if rec is None or rec.get("key") != compute_key(cfg) or rec.get("device") != want:
        return None
    per = float(rec["micro_batch_s"])
    return per * accum, (f"measured: {rec.get('source')} ({rec.get('time')}), {per:.3g} s per "
                         f"micro batch x {accum} accumulation steps")


def _stored(cfg: Any) -> Optional[dict]:
    try:
        with open(store_path(cfg), encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def stale_note(cfg: Any) -> str:
    """Why a dry run's measurement of these settings is not used ('' when none or used)."""
    rec = _stored(cfg)
    want = job_device(cfg)
    if rec is not None and rec.get("device") != want:
        return (f"the dry run of these settings ran on {rec.get('device')} ranks, the run trains "
                f"on {want}: its step time is not used")
    return ""


# ------------------------------------------------------------------ Slurm's time limit
def time_limit(seconds: float) -> str:
    """Slurm's --time for `seconds`, rounded up to the minute: H:MM:00 or D-HH:MM:00."""
    minutes = max(1, math.ceil(seconds / 60))
    d, rem = divmod(minutes, 1440)
    h, m = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h}:{m:02d}:00"


def parse_max_time(text: str, partition: Optional[str]) -> Optional[str]:
    """The MaxTime of `partition` (the default one when None) in `scontrol show partition`'s
    output; None for UNLIMITED or when not found."""
    for block in re.split(r"\n\s*\n", text.strip()):
        name = re.search(r"PartitionName=(\S+)", block)
        if not name:
            continue
        default = re.search(r"\bDefault=YES\b", block)
        if (partition and name.group(1) == partition) or (not partition and default):
            m = re.search(r"\bMaxTime=(\S+)", block)
            if not m or m.group(1).upper() in ("UNLIMITED", "INFINITE", "NONE"):
                return None
            return m.group(1)
    return None


def partition_max_time(partition: Optional[str]) -> Optional[str]:
    """The partition's MaxTime as Slurm writes it (`scontrol show partition`), None without one."""
    cmd = ["scontrol", "show", "partition"] + ([partition] if partition else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_max_time(proc.stdout, partition) if proc.returncode == 0 else None
