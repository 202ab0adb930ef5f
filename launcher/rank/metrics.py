"""What rank 0 records per step: metrics.jsonl, and the trackers of `output.report_to`.

    Metrics(path, main).write({"step": 3, "loss": ...})           # one JSON line, flushed

    trackers = Trackers.open(cfg, start_step, main=env.is_main)   # nothing on other ranks
    trackers.log(step, {"loss": ..., "lr": ...}, prefix="train")  # train/loss, train/lr, ...
    trackers.close()

metrics.jsonl: train lines {step, loss, lr, grad_norm, tokens_per_s, step_time_s, memory_bytes,
[memory_reserved_bytes,] elapsed_s}; eval lines {step, eval_loss, elapsed_s}. On GPUs
memory_bytes is torch.cuda.max_memory_allocated (the plan's "tensor peak") and
memory_reserved_bytes torch.cuda.max_memory_reserved (the tensor peak + the allocator's slack:
what the plan's "max_memory_reserved" line predicts, and what runs out first).

TensorBoard event files go to RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR`); a resume
purges the steps after its checkpoint, so no step is shown twice. W&B writes under RUN_DIR/wandb,
offline unless WANDB_MODE says otherwise (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it),
project WANDB_PROJECT (default ftlaunch), one W&B run per run directory (its id is kept in
RUN_DIR/wandb/run_id, so launches that resume continue it).

Whether each tracker's package is installed is checked on the login node by
launcher/checks/trackers.py.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

from launcher.cluster import layout

class Metrics:
    """metrics.jsonl, one JSON object a line, appended by rank 0 and flushed every line."""

    def __init__(self, path: str, main: bool):
        self.path, self.main = path, main

    def offset(self) -> int:
        return os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def truncate(self, offset: int) -> None:
        """Drop lines written after a checkpoint we resume from (they will be written again)."""
        if self.main and os.path.exists(self.path) and os.path.getsize(self.path) > offset:
            with open(self.path, "r+b") as fh:
                fh.truncate(offset)

    def write(self, record: dict) -> None:
        if self.main:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")


class Trackers:
    """The trackers rank 0 writes to; inert elsewhere or with an empty report_to."""

    def __init__(self) -> None:
        self.tb: Any = None
        self.wandb: Any = None

    @classmethod
    def open(cls, cfg: Any, start_step: int, *, main: bool) -> "Trackers":
        self = cls()
        if not main:
            return self
        run_dir = cfg.run_dir
        if "tensorboard" in cfg.output.report_to:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=os.path.join(run_dir, layout.TENSORBOARD),
                                    purge_step=start_step + 1 if start_step else None)
        if "wandb" in cfg.output.report_to:
            self.wandb = open_wandb(cfg, run_dir)
        return self

    def log(self, step: int, scalars: dict, prefix: str) -> None:
        values = {f"{prefix}/{k}": float(v) for k, v in scalars.items() if v is not None}
        if self.tb is not None:
            for tag, v in values.items():
                self.tb.add_scalar(tag, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def open_wandb(cfg: Any, run_dir: str) -> Any:
    import wandb

    from launcher.config.schema import to_dict
    from launcher.config.secret_env import redacted
    folder = os.path.join(run_dir, layout.WANDB)
    os.makedirs(folder, exist_ok=True)
    id_file = os.path.join(folder, "run_id")
    try:
        with open(id_file, encoding="utf-8") as fh:
            run_id = fh.read().strip()
    except FileNotFoundError:
        run_id = uuid.uuid4().hex[:12]
        with open(id_file, "w", encoding="utf-8") as fh:
            fh.write(run_id + "\n")
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "ftlaunch"), name=cfg.name,
                      id=run_id, resume="allow", dir=run_dir,
                      mode=os.environ.get("WANDB_MODE", "offline"),
                      config=redacted(to_dict(cfg)))   # W&B uploads it: no secret values


def memory_fields(device: str) -> dict[str, int]:
    """The metrics line's memory figures: memory_bytes, and on GPUs memory_reserved_bytes."""
    out = {"memory_bytes": memory_bytes(device)}
    if device.startswith("cuda"):
        import torch
        out["memory_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return out


def memory_bytes(device: str) -> int:
    """Peak memory of this rank: the GPU's allocated peak, or the process's peak RSS on CPU."""
    if device.startswith("cuda"):
        import torch
        return int(torch.cuda.max_memory_allocated())
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
