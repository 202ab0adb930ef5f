"""NVMe offload's host memory: the page-locked buffers DeepSpeed 0.19's swappers allocate on
every rank, as its source computes them (torch-free arithmetic, tested against DeepSpeed's own
functions in tests/test_memory_nvme.py).

- Sub-groups (runtime/zero/stage3.py `_create_fp16_sub_groups`): each optimizer param group's
  parameters, in order, are cut into sub-groups; a sub-group closes when its partition elements
  reach `sub_group_size` (so it overshoots by at most one parameter's partition).
- Optimizer swapper (offload_optimizer nvme; runtime/swap_tensor/optimizer_utils.py
  `OptimizerSwapper.__init__` -> utils.py `SwapBufferManager`): `buffer_count` (default 4)
  pinned buffers of the largest sub-group's partition elements, I/O aligned, in the master
  dtype (fp32): buffer_count x aligned(largest sub-group) x 4 B. With the default sub_group_size
  1e9, a 7B model on 8 ranks is one sub-group of 842M elements: 13.5 GB pinned per rank.
  Beside it the rank keeps its gradient partitions on the CPU (stage3.py
  `grad_partitions_flat_buffer`, counted at 4 B as for CPU offload).
- Parameter swapper (offload_param nvme; partitioned_param_swapper.py `_configure_aio`):
  `buffer_count` (default 5) x aligned(`buffer_size`, default 1e8) x lp, pinned. Every
  partition swapped in must fit one buffer (`get_buffer` asserts it), so the builder sizes
  `buffer_size` to the largest parameter's partition.
- Trainable partitions kept in CPU memory (stage3.py `_create_param_groups_fp16_flat_cpu_memory`):
  min(trainable partition elements, `max_in_cpu` (default 1e9)) x lp, pinned; when the partition
  exceeds max_in_cpu, a reuse buffer of the largest sub-group's parameters, whole (`ds_numel`,
  not partitioned), x lp (stage3.py `reserve_partitioned_swap_space`).
- I/O alignment (`_io_aligned_numel`): elements rounded up to a multiple of
  1024 B x aio.intra_op_parallelism / element size.
"""
from __future__ import annotations

from typing import Any, Sequence

from launcher.memory.terms import Term, gib, zero3_partition

AIO_ALIGNED_BYTES = 1024          # swap_tensor/utils.py
OPT_BUFFER_COUNT = 4              # zero/offload_config.py DeepSpeedZeroOffloadOptimizerConfig
PARAM_BUFFER_COUNT = 5            # DeepSpeedZeroOffloadParamConfig.buffer_count
PARAM_BUFFER_SIZE = 10**8         # DeepSpeedZeroOffloadParamConfig.buffer_size
MAX_IN_CPU = 10**9                # DeepSpeedZeroOffloadParamConfig.max_in_cpu
SUB_GROUP_SIZE = 10**9            # DeepSpeedZeroConfig.sub_group_size
SRC = "deepspeed 0.19 runtime/swap_tensor (optimizer_utils.py, partitioned_param_swapper.py), zero/stage3.py"


def io_aligned(numel: int, element_size: int, intra_op_parallelism: int = 1) -> int:
    """`_io_aligned_numel`: numel rounded up to the swapper's alignment."""
    align = AIO_ALIGNED_BYTES * intra_op_parallelism // element_size
    return numel if numel % align == 0 else numel + align - numel % align


def sub_groups(numels: Sequence[int], sub_group_size: int | None) -> list[list[int]]:
    """`_create_fp16_sub_groups` over one param group's partition elements."""
    total = sum(numels)
    if sub_group_size is None or sub_group_size >= total:
        return [list(numels)]
    out, cur, size = [], [], 0
    for i, n in enumerate(numels):
        cur.append(n)
        size += n
        if size >= sub_group_size or i == len(numels) - 1:
            out.append(cur)
            cur, size = [], 0
    return out


def _largest(groups: Sequence[Sequence[int]], world: int, sub_group_size: int | None
             ) -> tuple[int, list[int]]:
    """(partition elements of the largest sub-group, its parameters' whole elements)."""
    best, whole = 0, []
    for g in groups:
        parts = [zero3_partition(n, world) for n in g]
        start = 0
        for sg in sub_groups(parts, sub_group_size):
            if sum(sg) > best:
                best, whole = sum(sg), list(g[start:start + len(sg)])
            start += len(sg)
    return best, whole


def pinned(groups: Sequence[Sequence[int]], world: int, lp: int, zero: dict[str, Any],
           aio: dict[str, Any], optimizer_nvme: bool, param_nvme: bool) -> dict[str, int]:
    """Pinned host bytes per rank of each NVMe buffer. groups: each optimizer param group's
    trainable parameters' (whole) elements, in order."""
    intra = int(aio.get("intra_op_parallelism", 1))
    sgs = zero.get("sub_group_size", SUB_GROUP_SIZE)
    largest, whole = _largest(groups, world, int(sgs) if sgs is not None else None)
    out: dict[str, int] = {}
    if optimizer_nvme:
        opt = zero.get("offload_optimizer", {})
        count = int(opt.get("buffer_count", OPT_BUFFER_COUNT))
        out["optimizer_swap"] = count * io_aligned(largest, 4, intra) * 4
    if param_nvme:
        par = zero.get("offload_param", {})
        count = int(par.get("buffer_count", PARAM_BUFFER_COUNT))
        size = int(par.get("buffer_size", PARAM_BUFFER_SIZE))
        out["param_swap"] = count * io_aligned(size, lp, intra) * lp
        local = sum(zero3_partition(n, world) for g in groups for n in g)
        max_in_cpu = int(par.get("max_in_cpu", MAX_IN_CPU))
        out["param_cpu"] = min(local, max_in_cpu) * lp
        if local > max_in_cpu:
            out["param_reuse"] = sum(io_aligned(n, lp, intra) for n in whole) * lp
    return out


LABELS = {
    "optimizer_swap": ("NVMe optimizer swap buffers (pinned)",
                       "offload_optimizer.buffer_count x aligned(largest sub-group's partition) x 4 B"),
    "param_swap": ("NVMe parameter swap buffers (pinned)",
                   "offload_param.buffer_count x aligned(buffer_size) x lp"),
    "param_cpu": ("trainable partitions kept in CPU memory (pinned)",
                  "min(trainable partition elements, offload_param.max_in_cpu) x lp"),
    "param_reuse": ("NVMe parameter reuse buffer (pinned)",
                    "the largest sub-group's parameters, whole, x lp (partition > max_in_cpu)"),
}


def node_terms(r: Any, n: int, groups: Sequence[Sequence[int]]) -> list[Term]:
    """The node's NVMe-offload terms: n ranks x each pinned buffer, and the gradient partitions
    an optimizer-offloading rank keeps in CPU memory. r: the planner's setting."""
    ds = r.cfg.deepspeed
    opt_nvme, par_nvme = ds.offload_optimizer == "nvme", ds.offload_param == "nvme"
    if not (opt_nvme or par_nvme):
        return []
    sizes = pinned(groups, r.world, r.inv.lp_bytes, r.zero, r.ds.get("aio") or {}, opt_nvme, par_nvme)
    out = []
    for key, per in sizes.items():
        label, formula = LABELS[key]
        out.append(Term(f"nvme_{key}", label, n * per, "train",
                        f"{n} ranks x {formula} = {n} x {gib(per)}", SRC))
    if opt_nvme:
        per = 4 * r.st.opt_elems
        out.append(Term("nvme_grads", "gradient partitions on the CPU (optimizer offload)", n * per,
                        "train", f"{n} ranks x 4 B x this rank's slice = {n} x {gib(per)}",
                        "deepspeed 0.19 zero/stage3.py grad_partitions_flat_buffer"))
    return out
