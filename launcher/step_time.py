"""Measured step times, the job's time limit from the estimate, and the partition's cap.

Torch-free (login node). A step time is measured in two places:

- `ftlaunch run --dry-run` trains a few steps in a temporary folder; `record_dry_run` keeps
  their median (the first step, which warms up kernels and allocators, left out) in
  RUN_DIR/step_time.json of the run's real directory;
- a job's own metrics.jsonl (`step_time_s` of each line, launcher/loop_steps.py `log_step`).

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

from launcher import layout

STEP_TIME = layout.STEP_TIME


def compute_key(cfg: Any) -> str:
    """What a step's time depends on, as a short hash: a measurement of other settings is stale."""
    from launcher.config import to_dict
    d = to_dict(cfg)
    keep = {"model": d["model"], "freeze": d["freeze"], "quantization": d["quantization"],
            "deepspeed": d["deepspeed"], "seq": d["data"]["max_seq_len"],
            "packing": d["data"]["packing"], "micro": d["train"]["micro_batch_size"],
            "device": d["train"]["device"], "optimizer": d["train"]["optimizer"]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def record_dry_run(metrics_path: str, cfg: Any, world: int, device: str) -> Optional[dict]:
    """Write the dry run's measurement into cfg.run_dir/step_time.json; the record, or None when
    fewer than one step after the first was logged."""
    from launcher.batch import batch_sizes
    from launcher.rundir import write_atomic
    times = step_times(metrics_path)
    if not times:
        return None
    _, accum, _ = batch_sizes(cfg, world)
    step = statistics.median(times)
    rec = {"micro_batch_s": step / accum, "step_time_s": step, "accum": accum, "world": world,
           "device": device, "steps": len(times), "source": "ftlaunch run --dry-run",
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "key": compute_key(cfg)}
    os.makedirs(cfg.run_dir, exist_ok=True)
    write_atomic(os.path.join(cfg.run_dir, STEP_TIME), json.dumps(rec, indent=2) + "\n")
    return rec


def measured(cfg: Any, world: int) -> Optional[tuple[float, str]]:
    """(seconds per optimizer step on `world` ranks, where from) from the run directory: the
    job's own steps (metrics.jsonl) first, else the dry run's step_time.json; None when neither
    was measured with these settings on this kind of device."""
    from launcher.batch import batch_sizes
    _, accum, _ = batch_sizes(cfg, world)
    times = step_times(os.path.join(cfg.run_dir, layout.METRICS))
    if times:
        recent = times[-50:]
        return statistics.median(recent), f"measured: median of {len(recent)} logged steps in " \
            f"{layout.METRICS}"
    try:
        with open(os.path.join(cfg.run_dir, STEP_TIME), encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return None
    want = "cpu" if cfg.train.device == "cpu" else "cuda"
    if rec.get("key") != compute_key(cfg) or rec.get("device") != want:
        return None
    per = float(rec["micro_batch_s"])
    return per * accum, (f"measured: {rec.get('source')} ({rec.get('time')}), {per:.3g} s per "
                         f"micro batch x {accum} accumulation steps")


def stale_note(cfg: Any) -> str:
    """Why a step_time.json present is not used ('' when absent or used)."""
    try:
        with open(os.path.join(cfg.run_dir, STEP_TIME), encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return ""
    want = "cpu" if cfg.train.device == "cpu" else "cuda"
    if rec.get("device") != want:
        return (f"{STEP_TIME} was measured on {rec.get('device')} ranks, the run trains on {want}: "
                "not used")
    if rec.get("key") != compute_key(cfg):
        return f"{STEP_TIME} was measured with other settings (model, batch, freeze, DeepSpeed): not used"
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
