"""The one door for the ranks' collectives: every all-reduce, gather, broadcast and barrier the
rank code calls goes through here (tests/test_collectives.py fails on a direct call elsewhere).

    collectives.all_reduce_sum([loss, tokens, vote], device)   # floats or 0-d tensors -> floats
    collectives.gather_object(obj)  collectives.broadcast_object(obj)  collectives.barrier()
    pending = collectives.all_reduce_start([1.0, 0.0])   # host values, on a gloo group: never
    ...; pending.wait()                                  # touches the device queue; -> floats

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


def all_reduce_sum(values: list[Any], device: Any, out: Any = None) -> list[float]:
    """Sum each value over the ranks (float64, on `device`). Values are Python numbers or 0-d
    tensors (on any device: a loss kept on the GPU is reduced without an extra host copy each).
    One collective for the whole list; one host synchronisation, when the result is read.
    `out`: a float64 tensor of len(values) on `device`, kept by a caller that reduces every
    step, filled in place (the numbers in one copy) instead of a new tensor per value."""
    import torch
    if out is not None:
        out.copy_(torch.tensor([0.0 if isinstance(v, torch.Tensor) else float(v) for v in values],
                               dtype=torch.float64))
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor):
                out[i].copy_(v.detach().reshape(()))
        t = out
    else:
        t = torch.stack([v.detach().reshape(()).to(device=device, dtype=torch.float64)
                         if isinstance(v, torch.Tensor)
                         else torch.tensor(float(v), dtype=torch.float64, device=device)
                         for v in values])
    if initialized():
        dist = _dist()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


class Pending:
    """An all-reduce under way (`all_reduce_start`); `wait()` gives the sums as floats."""

    def __init__(self, work: Any, tensor: Any):
        self.work, self.tensor = work, tensor

    def wait(self) -> list[float]:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.tensor.tolist()


_HOST_GROUP: list[Any] = []  # the gloo group of all ranks for host values, made once


def host_group() -> Any:
    """A gloo group of every rank, for sums of host values that must not wait behind the
    device's queue (NCCL serves CUDA tensors only). Collective the first time: every rank calls
    it at the same point. It takes the collective timeout (train.init_distributed)."""
    if not _HOST_GROUP or _HOST_GROUP[0][0] is not _dist().group.WORLD:
        _HOST_GROUP[:] = [(_dist().group.WORLD, _dist().new_group(backend="gloo"))]
    return _HOST_GROUP[0][1]


def all_reduce_start(values: list[float]) -> Pending:
    """Start summing host numbers over the ranks (float64, CPU, on `host_group()`) and return
    at once; `Pending.wait()` later gives the sums. No device work and no host synchronisation:
    the training loop overlaps its stop vote with the next step this way."""
    import torch
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    work = None
    if initialized():
        dist = _dist()
        work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=host_group(), async_op=True)
    return Pending(work, t)


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
