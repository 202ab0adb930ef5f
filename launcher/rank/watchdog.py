"""The loss watchdog (train.watchdog): stop a run whose loss turned NaN/Inf or stays too high.

The ranks agree on the step's loss in the per-step all-reduce, which runs after the step's
backward passes and before its optimizer update (launcher/rank/train.py). So when the watchdog
fires, the offending update is not applied: the weights, optimizer and schedule are those of
the last good step, the data position is put back to before the step, a checkpoint of that step
is written (unless the newest one is of it already), rank 0 prints why and what to change, and
the ranks exit with layout.EXIT_DIVERGED (76). RUN_DIR/exit_status.json records the code, and
the Slurm job script does not requeue a run that ended so: resuming would diverge again.
"""
from __future__ import annotations

import math
from typing import Optional

from launcher.config.schema import WatchdogConfig


class Watchdog:
    """Feeds on one agreed loss per step; `check` says why to stop, or None."""

    def __init__(self, cfg: WatchdogConfig):
        self.cfg = cfg
        self.streak: list[tuple[int, float]] = []  # (step, loss) above max_loss, in a row

    def check(self, step: int, loss: float) -> Optional[str]:
        c = self.cfg
        if not math.isfinite(loss):
            return f"the loss of step {step} is {loss}" if c.nan else None
        if c.max_loss is None or loss <= c.max_loss:
            self.streak = []
            return None
        self.streak.append((step, loss))
        if len(self.streak) < c.patience:
            return None
        first, last = self.streak[0][0], self.streak[-1][0]
        steps = f"step {last}" if first == last else f"steps {first}-{last}"
        return (f"the loss stayed above train.watchdog.max_loss {c.max_loss:g} for {c.patience} "
                f"step{'s' if c.patience > 1 else ''} ({steps}; last {loss:.4g})")

    @staticmethod
    def advice() -> str:
        return ("lower train.lr, raise train.warmup_steps / warmup_ratio, keep train.grad_clip on, "
                "or check the data; then resume from the checkpoint")
