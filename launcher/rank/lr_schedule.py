"""The learning rate of every optimizer step: one pure function of the step and `train:`.

    lr_schedule.lr_at(step, cfg.train)   # the rate optimizer step `step` (1-based) applies

With W = train.warmup_steps and N = train.max_steps:

    step <= W               lr x step / W                      (linear warmup, never 0)
    p = (step - W - 1) / (N - W)                               (0 at the first step after warmup)
    constant                lr
    linear                  lr x (1 - p)
    cosine                  lr x (m + (1 - m) x (1 + cos(pi x p)) / 2),  m = train.min_lr_ratio

so no step runs at lr 0, the first step after warmup runs at lr, and the curve is a function of
the step alone: a resume with a larger max_steps continues the schedule that max_steps implies
from the next step (no restart, no zero-lr step). The ranks install it as a client-side
`LambdaLR` (`install`) in place of the DeepSpeed scheduler named in ds_config.json (whose
WarmupLR family runs the first steps at lr 0, docs/config.md), and set the rate of the next step
after a resume (`set_next`), since the optimizer state restored from a checkpoint carries the
old schedule's last rate.
"""
from __future__ import annotations

import math
from typing import Any


def lr_at(step: int, train: Any) -> float:
    """The learning rate optimizer step `step` (1-based) applies under `train` (TrainConfig)."""
    lr, warm, total = train.lr, train.warmup_steps, train.max_steps
    step = max(1, step)
    if step <= warm:
        return lr * step / warm
    if train.scheduler == "constant":
        return lr
    p = min(1.0, (step - warm - 1) / max(1, total - warm))
    if train.scheduler == "linear":
        return lr * (1.0 - p)
    m = train.min_lr_ratio
    return lr * (m + (1 - m) * (1 + math.cos(math.pi * p)) / 2)


def install(optimizer: Any, train: Any) -> Any:
    """A LambdaLR over `optimizer` following lr_at: DeepSpeed steps it after every optimizer
    step, so at scheduler epoch e the rate is lr_at(e + 1). Every param group's base rate is
    train.lr (what the factor multiplies). A checkpoint's scheduler state is taken as far as
    it goes (`set_next` sets the rest from the step)."""
    from torch.optim.lr_scheduler import LambdaLR

    class Schedule(LambdaLR):
        def load_state_dict(self, state_dict: dict) -> None:
            if "last_epoch" in state_dict:  # a DeepSpeed WarmupLR state (older runs) has none
                self.last_epoch = int(state_dict["last_epoch"])

    for group in optimizer.param_groups:
        group["lr"] = train.lr
        group["initial_lr"] = train.lr
    return Schedule(optimizer, lambda epoch: lr_at(epoch + 1, train) / train.lr)


def set_next(engine: Any, done: int, train: Any) -> float:
    """After a resume at step `done`: the scheduler continues where the uninterrupted run's would
    be, and every param group gets the rate of its next epoch under the current `train` (the
    checkpoint's optimizer state carries the last rate of the schedule it was written under).
    fp16: DeepSpeed steps neither the optimizer nor the scheduler on a step whose gradients
    overflowed (engine.skipped_steps, restored from the checkpoint), so the scheduler stands at
    `done - skipped_steps`, not at `done`."""
    sched = getattr(engine, "lr_scheduler", None)
    epoch = done - int(getattr(engine, "skipped_steps", 0) or 0)
    if sched is not None and hasattr(sched, "last_epoch"):
        sched.last_epoch = epoch
        sched.base_lrs = [train.lr] * len(sched.base_lrs)
    lr = lr_at(epoch + 1, train)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    if sched is not None and hasattr(sched, "_last_lr"):
        sched._last_lr = [lr] * len(engine.optimizer.param_groups)
    return lr
