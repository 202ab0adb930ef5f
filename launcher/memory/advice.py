"""What to change when a plan does not fit: candidate changes, ranked by their cost in speed.

Each candidate is the run config with one change (`dataclasses.replace`), planned again with the
same formulas through the `replan` callable the planner passes in (so this module never imports
the planner). Order (least slowdown first, the usual ranking on GPUs):

1. ZeRO-2 from ZeRO-0/1: partitions gradients too; same communication volume as data parallel.
2. Gradient checkpointing: recomputes each block's forward, about +30% compute.
3. ZeRO-3: partitions the weights; gathers them in every forward and backward (+50% traffic).
4. Halve the micro batch, double the accumulation: same global batch, smaller GPU kernels.
5. Optimizer offload to CPU: the Adam step runs on the CPU and gradients cross PCIe each step.
6. 8-bit base (frozen weights stored int8): slower matmuls, only the trained part stays 16-bit.
7. LoRA (r=8 on every linear layer, base frozen): changes what is trained, not only how.
8. LoRA on a 4-bit base (QLoRA).

If no single change fits, the changes are stacked in that order and the first stack that fits
is offered.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

from launcher.config import RunConfig
from launcher.errors import ConfigError
from launcher.validate import check

Change = tuple[str, str, Callable[[RunConfig], RunConfig]]
Replan = Callable[[RunConfig], Any]   # a changed config -> its Plan (ConfigError if it cannot)


def _rep(obj: Any, **kw: Any) -> Any:
    return dataclasses.replace(obj, **kw)


def _zero(stage: int) -> Callable[[RunConfig], RunConfig]:
    return lambda c: _rep(c, deepspeed=_rep(c.deepspeed, zero_stage=stage))


def _halve_micro(c: RunConfig) -> RunConfig:
    t = c.train
    accum = t.grad_accum * 2 if t.grad_accum else (None if t.global_batch_size else 2)
    return _rep(c, train=_rep(t, micro_batch_size=t.micro_batch_size // 2, grad_accum=accum))


def _lora(c: RunConfig) -> RunConfig:
    return _rep(c, freeze=_rep(c.freeze, policy="lora", train=[], freeze=[],
                               also_train=[g for g in c.freeze.also_train if g != "embeddings"]))


def candidates(c: RunConfig) -> Iterator[Change]:
    ds, m, t, q, f = c.deepspeed, c.model, c.train, c.quantization, c.freeze
    if ds.zero_stage < 2:
        yield "deepspeed.zero_stage: 2", "no slowdown to speak of", _zero(2)
    if not m.gradient_checkpointing:
        yield ("model.gradient_checkpointing: true", "about +30% compute",
               lambda c: _rep(c, model=_rep(c.model, gradient_checkpointing=True)))
    if ds.zero_stage < 3 and q.mode == "none":
        yield "deepspeed.zero_stage: 3", "+50% communication", _zero(3)
    if t.micro_batch_size > 1:
        yield (f"train.micro_batch_size: {t.micro_batch_size // 2} (accumulation x2)",
               "same batch, lower GPU efficiency", _halve_micro)
    if ds.offload_optimizer == "none" and ds.zero_stage >= 1 and t.optimizer == "adamw":
        yield ("deepspeed.offload_optimizer: cpu", "optimizer step on the CPU, often 2x slower",
               lambda c: _rep(c, deepspeed=_rep(c.deepspeed, offload_optimizer="cpu")))
    if q.mode == "none" and f.policy != "full" and ds.zero_stage < 3:
        yield ("quantization.mode: 8bit", "int8 matmuls for the frozen base",
               lambda c: _rep(c, quantization=_rep(c.quantization, mode="8bit")))
    if f.policy != "lora":
        yield "freeze.policy: lora", "trains adapters only (r=8)", _lora
    if q.mode != "4bit":
        yield ("freeze.policy: lora + quantization.mode: 4bit", "QLoRA: 4-bit base, adapters",
               lambda c: _rep(_lora(c), quantization=_rep(c.quantization, mode="4bit"),
                              deepspeed=_rep(c.deepspeed, zero_stage=min(c.deepspeed.zero_stage, 2))))


def _try(replan: Replan, cfg: RunConfig) -> Any:
    if [p for p in check(cfg) if not p.key.startswith(("model.path", "data.", "cluster."))]:
        return None
    try:
        return replan(cfg)
    except (ConfigError, ValueError):
        return None


def advise(base: Any, replan: Replan) -> list[dict[str, Any]]:
    """Changes that make `base` (a Plan that does not fit) fit, least slowdown first.

    replan(cfg) plans a changed config on base's GPU memory and ranks (without advice)."""
    out: list[dict[str, Any]] = []
    tried: list[tuple[str, str, Any]] = []
    for name, cost, fn in candidates(base.cfg):
        p = _try(replan, fn(base.cfg))
        if p is None:
            continue
        tried.append((name, cost, fn))
        if p.fits:
            out.append({"change": name, "cost": cost, "total_per_gpu": p.total_per_gpu,
                        "fits": True})
    if out:
        return out
    cfg, names = base.cfg, []
    for name, cost, fn in tried:  # stack in order of cost until it fits
        nxt = fn(cfg)
        p = _try(replan, nxt)
        if p is None:
            continue
        cfg = nxt
        names.append(name)
        if p.fits:
            return [{"change": " + ".join(names), "cost": "combined", "total_per_gpu": p.total_per_gpu,
                     "fits": True}]
    return []
