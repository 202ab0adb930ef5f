"""One door for collectives (launcher/rank/collectives.py): tensors on the engine's device, the sums run
at any world size, and no other module calls torch.distributed / deepspeed.comm collectives."""
from __future__ import annotations

import ast
import os

import pytest

import launcher
from launcher.rank import collectives

PKG = os.path.dirname(os.path.abspath(launcher.__file__))
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor",
               "broadcast", "broadcast_object_list", "barrier", "monitored_barrier", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
               "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv",
               "isend", "irecv", "batch_isend_irecv", "inference_all_reduce"}
DIST_MODULES = {"torch.distributed", "deepspeed.comm", "torch.distributed.distributed_c10d"}


def direct_calls(source: str) -> list[str]:
    """`alias.collective(...)` calls and `from torch.distributed import collective` in source."""
    tree = ast.parse(source)
    aliases, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES:
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            for a in node.names:
                if f"{mod}.{a.name}" in DIST_MODULES:
                    aliases.add(a.asname or a.name)
                elif mod in DIST_MODULES and a.name in COLLECTIVES:
                    found.append(f"line {node.lineno}: from {mod} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in COLLECTIVES:
            base = ast.unparse(node.func.value)
            if base in aliases or base in DIST_MODULES:
                found.append(f"line {node.lineno}: {base}.{node.func.attr}(...)")
    return found


def test_the_scanner_finds_a_direct_collective():
    src = ("import torch.distributed as dist\nfrom deepspeed import comm\n"
           "def f(t):\n    dist.all_reduce(t)\n    comm.barrier()\n"
           "    import torch\n    torch.distributed.broadcast(t, 0)\n")
    assert [c.split(":")[1].strip() for c in direct_calls(src)] == [
        "dist.all_reduce(...)", "comm.barrier(...)", "torch.distributed.broadcast(...)"]


def test_no_module_but_the_door_calls_a_collective():
    offenders = {}
    for dirpath, _, names in os.walk(PKG):
        for n in names:
            path = os.path.join(dirpath, n)
            if not n.endswith(".py") or path == collectives.__file__:
                continue
            with open(path, encoding="utf-8") as fh:
                calls = direct_calls(fh.read())
            if calls:
                offenders[os.path.relpath(path, PKG)] = calls
    assert offenders == {}, f"collectives outside launcher/rank/collectives.py: {offenders}"


class _RecordingDist:
    """torch.distributed as the door sees it, with the collectives recorded."""

    class ReduceOp:
        SUM = "sum"

    def __init__(self, world: int):
        self.world, self.calls = world, []

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self):
        return self.world

    def get_rank(self):
        return 0

    def all_reduce(self, t, op=None):
        self.calls.append(("all_reduce", str(t.device), str(t.dtype), tuple(t.shape), op))


def test_the_sum_is_built_on_the_engine_device_and_runs_at_world_size_one(monkeypatch):
    """A GPU run's loop hands the door "cuda:N": the tensor must be made there, since NCCL takes no
    CPU tensor. Shown with the meta device (not CPU), whose tensors cannot be read back."""
    import torch
    rec = _RecordingDist(world=1)
    monkeypatch.setattr(collectives, "_dist", lambda: rec)
    loss = torch.tensor(2.5)  # a loss left on its device by the loop
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        collectives.all_reduce_sum([loss, 4.0, 0.0], torch.device("meta"))
    assert rec.calls == [("all_reduce", "meta", "torch.float64", (3,), "sum")]


def test_the_sum_over_a_real_process_group_reads_back_floats(monkeypatch):
    import torch
    import torch.distributed as dist
    dist.init_process_group("cpu:gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        seen = []
        real = dist.all_reduce
        monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: (seen.append(t.device.type), real(t, **kw)))
        out = collectives.all_reduce_sum([torch.tensor(1.5), 2, 0.25], "cpu")
        assert out == [1.5, 2.0, 0.25] and all(isinstance(v, float) for v in out)
        assert seen == ["cpu"]  # one collective, even with one rank
        assert collectives.gather_object({"a": 1}) == [{"a": 1}]
        assert collectives.broadcast_object([3]) == [3]
        assert collectives.rank_world() == (0, 1)
    finally:
        dist.destroy_process_group()


def test_a_cpu_tensor_on_a_gpu_only_process_group_fails_as_nccl_does():
    """Why the device matters: a group whose only backend serves CUDA tensors (NCCL's situation,
    emulated with gloo registered for cuda alone) refuses the CPU tensor the loop used to reduce."""
    import torch.distributed as dist
    dist.init_process_group("cuda:gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            collectives.all_reduce_sum([1.0], "cpu")
    finally:
        dist.destroy_process_group()


def test_outside_a_process_group_the_door_is_an_identity():
    import torch
    assert collectives.all_reduce_sum([torch.tensor(3.0), 1], "cpu") == [3.0, 1.0]
    assert collectives.gather_object(7) == [7] and collectives.broadcast_object(7) == 7
    collectives.barrier()
    assert collectives.rank_world() == (0, 1)


def test_the_loop_hands_the_door_its_device():
    """Every all_reduce_sum call in the rank code names the engine's device."""
    for mod in ("rank/loop_sync.py", "rank/loop_steps.py"):
        with open(os.path.join(PKG, mod), encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and (
            isinstance(n.func, ast.Name) and n.func.id == "all_reduce_sum"
            or isinstance(n.func, ast.Attribute) and n.func.attr == "all_reduce_sum")]
        assert calls, mod
        assert all(len(c.args) in (2, 3) and ast.unparse(c.args[1]) in ("s.device", "self.s.device")
                   for c in calls), mod


