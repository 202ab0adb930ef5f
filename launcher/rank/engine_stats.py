"""Bytes a DeepSpeed engine really holds on this rank: optimizer state, fp32 masters, gradients.

Read from the engine's tensors (not predicted), for ZeRO 0-3, bf16 and fp32, so tests and
benchmarks can compare them with the plan. Where DeepSpeed 0.19 keeps them:

| | fp32 master weights | gradients (at an accumulation boundary) |
|---|---|---|
| ZeRO-0 fp32 | none: the fp32 parameters are the optimizer's | `param.grad` |
| ZeRO-0 bf16 | `fp32_groups` (FP16_UnfusedOptimizer) or `fp32_groups_flat_partition` (BF16_Optimizer) | `param.grad` |
| ZeRO-1/2 | `single_partition_of_fp32_groups` (this rank's partition) | `averaged_gradients`, `all_grad_tensors` |
| ZeRO-3 | `fp32_partitioned_groups_flat` | `grad_partitions_flat_buffer` |

The optimizer state is the innermost torch optimizer's `state` (DeepSpeed's wrappers unwrapped):
for AdamW, `exp_avg` and `exp_avg_sq` per master partition. 0-dim tensors (the `step` counters)
are not counted; torch optimizers create their state at the first `step`, so read it after
one. Every figure is this rank's; sum over ranks with an all_reduce if needed.
torch is imported lazily.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                "fp32_groups_flat_partition", "fp32_groups")


def _tensors(obj: Any) -> Iterator[Any]:
    """Tensors inside nested lists / tuples / dicts."""
    import torch
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


def _sum_unique(tensors: Iterable[Any]) -> int:
    """Bytes of tensors, each distinct (data pointer, size) counted once; 0-dim skipped."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        if t.dim() == 0 or t.numel() == 0:
            continue
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def zero_optimizer(engine: Any) -> Any:
    """DeepSpeed's optimizer wrapper (ZeRO / bf16), or the plain optimizer at ZeRO-0 fp32."""
    return engine.optimizer


def base_optimizer(engine: Any) -> Any:
    """The innermost torch optimizer (DeepSpeed's wrappers keep it in `.optimizer`)."""
    opt = engine.optimizer
    while getattr(opt, "optimizer", None) is not None and opt.optimizer is not opt:
        opt = opt.optimizer
    return opt


def optimizer_state_bytes(engine: Any) -> int:
    """Bytes of the optimizer state on this rank (AdamW: 2 fp32 tensors per master element)."""
    opt = base_optimizer(engine)
    return _sum_unique(t for state in opt.state.values() for t in _tensors(state))


def fp32_master_bytes(engine: Any) -> int:
    """Bytes of fp32 master weights DeepSpeed keeps on this rank (0 at ZeRO-0 fp32, where the
    fp32 parameters themselves are optimized)."""
    wrapper = engine.optimizer
    for attr in MASTER_ATTRS:
        groups = getattr(wrapper, attr, None)
        if groups:
            return _sum_unique(_tensors(groups))
    return 0


def grad_bytes(engine: Any) -> int:
    """Bytes of gradient tensors the engine holds on this rank now. Call it after
    `engine.backward` at a gradient-accumulation boundary (before `engine.step`) for the
    steady-state figure; mid-accumulation ZeRO-1/2 hold full per-parameter gradients."""
    wrapper = engine.optimizer
    flat = getattr(wrapper, "grad_partitions_flat_buffer", None)  # ZeRO-3: views share it
    if flat is not None:
        return _sum_unique([flat])
    tensors = [p.grad for p in engine.module.parameters() if p.grad is not None]
    for attr in ("averaged_gradients", "all_grad_tensors"):
        tensors += [t for t in _tensors(getattr(wrapper, attr, None) or {}) if t is not None]
    for attr in ("fp32_groups", "fp32_groups_flat_partition"):  # bf16 ZeRO-0 fp32 grads
        tensors += [t.grad for t in _tensors(getattr(wrapper, attr, None) or []) if t.grad is not None]
    tensors += list(_tensors(getattr(wrapper, "fp32_groups_gradients_flat", None) or []))
    return _sum_unique(tensors)


def summary(engine: Any) -> dict[str, int]:
    """The three figures for this rank, by name."""
    return {"optimizer_state_bytes": optimizer_state_bytes(engine),
            "fp32_master_bytes": fp32_master_bytes(engine),
            "grad_bytes": grad_bytes(engine)}
