"""Measured step times, the job's time limit from the estimate, and the partition's cap.

Torch-free (login node). A step time is measured in two places:

- `ftlaunch run --dry-run` trains DRY_WARMUP + DRY_MEASURED steps in a temporary folder
  (nothing of the run is kept); `record_dry_run` keeps, in the cache beside the tokenized data
  (step_time/KEY.json under the cache root, launcher/common/files.py cache_root; KEY =
  `compute_key`, so any run with the same settings finds it):
  - the step time: the median of the DRY_MEASURED steps after the first DRY_WARMUP (which warm
    up kernels, allocators and the data loader's workers) and any later ones still warming up
    (`summarize`), and their spread (lowest, highest);
  - the warm-up: what those first steps took beyond as many median steps;
  - the start-up and shut-down: the ranks' wall time (torchrun started to exited, timed by the
    launcher) less the training loop's own time (metrics.jsonl's last elapsed_s); beside it,
    rank 0's start-up by phase (RUN_DIR/startup.json: launch, imports, distributed init, data,
    model load, engine, resume);
  - one evaluation (the final one, where the run has eval data) and one checkpoint save (where
    the launcher asked for it: launcher/cluster/local_run.py `dry_save`), each timed on the ranks;
- a job's own metrics.jsonl (`step_time_s` of each line, launcher/rank/loop_steps.py `log_step`).

The step time is kept per micro batch (step time / accumulation steps), so the measurement
carries over to another world size with the same micro batch: a step there takes accum' micro
batches. A measurement counts only for the settings it was taken with (`compute_key`: the model,
dtype, freeze policy, quantization, DeepSpeed settings, micro batch, sequence length and
device); the time of communication across more nodes is not in a one-node measurement.

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
from dataclasses import dataclass
from typing import Any, Optional

from launcher.cluster import layout
from launcher.model.device import job_device

DRY_WARMUP = 2           # the dry run's first steps, timed apart (kernels, allocator, loader workers)
DRY_MEASURED = 16        # the steps after them whose median is the step time

def compute_key(cfg: Any) -> str:
    """What a step's time depends on, as a short hash: a measurement of other settings is stale."""
    m, f, d, t, z = cfg.model, cfg.freeze, cfg.data, cfg.train, cfg.deepspeed
    keep = [m.path, m.dtype, m.gradient_checkpointing, m.attn_implementation, f.policy,
            f.trainable_layers, list(f.train), list(f.also_train), f.lora.r,
            list(f.lora.target_modules), cfg.quantization.mode, z.zero_stage,
            z.offload_optimizer, z.offload_param, d.max_seq_len, d.packing, t.micro_batch_size,
            t.device, t.optimizer]
    return hashlib.sha256(json.dumps(keep, default=str).encode()).hexdigest()[:16]


def train_lines(metrics_path: str) -> list[dict]:
    """The train lines (those with a loss and a step_time_s) of a metrics.jsonl, in order."""
    out: list[dict] = []
    try:
        with open(metrics_path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "loss" in rec and isinstance(rec.get("step_time_s"), (int, float)):
                    out.append(rec)
    except OSError:
        return []
    return out


def step_times(metrics_path: str) -> list[float]:
    """Seconds per step of each train line of a metrics.jsonl, the first line left out (it
    includes the warm-up: first kernels, allocator growth)."""
    return [float(r["step_time_s"]) for r in train_lines(metrics_path)][1:]


@dataclass(frozen=True)
class StepSummary:
    """A dry run's steps, summarized: `summarize`."""
    step_s: float          # median of the measured steps
    measured: int          # how many steps the median is of
    warmup: int            # the first steps left out of it
    warmup_extra_s: float  # what those took beyond `warmup` median steps (never below 0)
    low_s: float           # the fastest and slowest measured step
    high_s: float


SETTLED = 1.25   # a step slower than this times the later steps' median is still warming up


def summarize(times: list[float], warmup: int) -> Optional[StepSummary]:
    """The step time of per-step times `times` (one a step, in order): the median of those after
    the warm-up, and what the warm-up cost beyond as many median steps; None when no step is
    left after it. The warm-up is the first `warmup` steps and, after them, every step still
    slower than SETTLED x the median of the second half of `times` (at most half of them): on a
    CPU the first steps can stay slow for several steps (allocator and page growth), and they
    would raise the median of a short dry run that a long run's steps never see."""
    half = len(times) // 2
    settled = statistics.median(times[half:]) if times[half:] else 0.0
    while warmup < half and times[warmup] > SETTLED * settled:
        warmup += 1
    kept = times[warmup:]
    if not kept:
        return None
    step = statistics.median(kept)
    extra = max(0.0, sum(times[:warmup]) - warmup * step)
    return StepSummary(step, len(kept), warmup, extra, min(kept), max(kept))


def loop_timings(metrics_path: str) -> dict[str, Optional[float]]:
    """From a dry run's metrics.jsonl: the training loop's seconds (the last line's elapsed_s),
    one evaluation's (the final eval line's elapsed_s less the last train line's) and one
    checkpoint save's (the line launcher/rank/loop_steps.py `finish` writes when asked to time
    one); None for what is not in it."""
    rows: list[dict] = []
    try:
        with open(metrics_path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    train = [r for r in rows if "loss" in r and "elapsed_s" in r]
    evals = [r for r in rows if "eval_loss" in r and "elapsed_s" in r]
    saves = [r for r in rows if "checkpoint_s" in r]
    loop = max((float(r["elapsed_s"]) for r in rows if "elapsed_s" in r), default=None)
    eval_s = None
    if train and evals and float(evals[-1]["elapsed_s"]) >= float(train[-1]["elapsed_s"]):
        eval_s = float(evals[-1]["elapsed_s"]) - float(train[-1]["elapsed_s"])
    return {"loop_s": loop, "eval_s": eval_s,
            "checkpoint_s": float(saves[-1]["checkpoint_s"]) if saves else None}


def startup_phases(run_dir: str) -> Optional[dict]:
    """Rank 0's start-up by phase (RUN_DIR/startup.json, launcher/rank/startup.py), or None."""
    try:
        with open(os.path.join(run_dir, layout.STARTUP), encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return None
    phases = rec.get("phases_s") if isinstance(rec, dict) else None
    return phases if isinstance(phases, dict) else None


def store_path(cfg: Any) -> str:
    """Where a dry run's measurement for cfg's settings is kept (the module docstring)."""
    from launcher.common.files import cache_root
    return os.path.join(cache_root(), "step_time", compute_key(cfg) + ".json")


def record_dry_run(metrics_path: str, cfg: Any, world: int, device: str,
                   ranks_s: Optional[float] = None) -> Optional[dict]:
    """Keep the dry run's measurement (store_path); the record, or None when fewer than
    DRY_WARMUP + 1 steps were logged. ranks_s: the ranks' wall time, timed by the launcher
    (torchrun started to exited), for the start-up and shut-down term."""
    from launcher.config.batch import batch_sizes
    from launcher.cluster.rundir import write_atomic
    summary = summarize([float(r["step_time_s"]) for r in train_lines(metrics_path)], DRY_WARMUP)
    if summary is None:
        return None
    _, accum, _ = batch_sizes(cfg, world)
    timed = loop_timings(metrics_path)
    startup = None
    if ranks_s is not None and timed["loop_s"] is not None:
        startup = max(0.0, ranks_s - timed["loop_s"])
    phases = startup_phases(os.path.dirname(metrics_path))
    rec = {"micro_batch_s": summary.step_s / accum, "step_time_s": summary.step_s,
           "accum": accum, "world": world, "device": device, "steps": summary.measured,
           "warmup_steps": summary.warmup, "warmup_extra_s": summary.warmup_extra_s,
           "low_s": summary.low_s, "high_s": summary.high_s, "startup_s": startup,
           "eval_s": timed["eval_s"], "checkpoint_s": timed["checkpoint_s"],
           "startup_phases_s": phases,
           "source": "ftlaunch run --dry-run",
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
    rec = dry_record(cfg)
    if rec is None:
        return None
    per = float(rec["micro_batch_s"])
    spread = ""
    if rec.get("low_s") is not None and rec.get("high_s") is not None:
        spread = (f", median of {rec.get('steps')} steps after {rec.get('warmup_steps')} warm-up "
                  f"({float(rec['low_s']):.3g}-{float(rec['high_s']):.3g} s)")
    return per * accum, (f"measured: {rec.get('source')} ({rec.get('time')}{spread}), {per:.3g} s "
                         f"per micro batch x {accum} accumulation steps")


def dry_record(cfg: Any) -> Optional[dict]:
    """The dry run's record (record_dry_run) for cfg's settings on its device; None when there
    is none, or it was taken with other settings or on another kind of device."""
    rec = _stored(cfg)
    if rec is None or rec.get("key") != compute_key(cfg) or rec.get("device") != job_device(cfg):
        return None
    return rec


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
