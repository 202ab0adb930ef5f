"""The one door for the ranks' collectives: every all-reduce, gather, broadcast and barrier the
rank code calls goes through here (tests/test_collectives.py fails on a direct call elsewhere).

    collectives.all_reduce_sum([loss, tokens, vote], device)   # floats or 0-d tensors -> floats
    collectives.gather_object(obj)  collectives.broadcast_object(obj)  collectives.barrier()

Why one door: a process group only takes tensors of the device types its backends serve. NCCL
serves CUDA tensors alone, so a CPU tensor handed to `all_reduce` on a GPU run fails with "No
backend type associated with device type cpu" before step 1, while gloo on CPU ranks takes it.
Tensors are therefore built on the engine's device (`device`: "cpu" or "cuda:N"), and object
collectives rely on torch putting their pickles on the current CUDA device, which the rank set
(train.init_distributed). The sums run even with one rank, so a single-GPU run exercises the
same calls a multi-GPU run makes. Outside a process group (a plain process) they are identities.
"""
from __future__ import annotations

from typing import Any


def _dist() -> Any:
    import torch.distributed as dist
    return dist


def initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) outside one."""
    if initialized():
        dist = _dist()
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[Any], device: Any) -> list[float]:
    """Sum each value over the ranks (float64, on `device`). Values are Python numbers or 0-d
    tensors (on any device: a loss kept on the GPU is reduced without an extra host copy each).
    One collective for the whole list; one host synchronisation, when the result is read."""
    import torch
    parts = [v.detach().reshape(()).to(device=device, dtype=torch.float64)
             if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64, device=device)
             for v in values]
    t = torch.stack(parts)
    if initialized():
        dist = _dist()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def all_reduce_(tensor: Any, group: Any = None) -> Any:
    """In-place sum of `tensor` over the ranks (of `group`, default all; the caller chose its
    device); returns it."""
    if initialized():
        _dist().all_reduce(tensor, group=group)
    return tensor


def gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not initialized():
        return [obj]
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if initialized():
        _dist().barrier()
