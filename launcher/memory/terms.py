"""The formulas of the memory plan: one `Term` per thing that holds memory, with its source.

Per rank (one GPU, or one CPU process with train.device cpu), in bytes. Symbols used in the
formulas: N ranks, lp bytes per element of the training dtype, T trainable elements,
P all elements, b micro batch, s sequence length (data.max_seq_len), h hidden size,
a attention heads (kv: key/value heads, d: head dim), i MLP width, V vocabulary, L blocks.

Model states follow DeepSpeed 0.19's own allocations (read from its source, checked against
live engines in tests/test_memory_engine.py):

| | weights | gradients | fp32 masters | Adam state |
|---|---|---|---|---|
| ZeRO-0 | all, lp | T x lp (`param.grad`) | T x 4 (none in fp32) | T x 8 |
| ZeRO-1 | all, lp | T x lp (full, until the step) | 4 x slice | 8 x slice |
| ZeRO-2 | all, lp | lp x elements of the params overlapping this rank's slice of the flat group | 4 x slice | 8 x slice |
| ZeRO-3 | lp x ceil(numel/N) per param + full copies of persistent params | lp x sum ceil(numel/N) trainable | 4 x same | 8 x same |

Activations live in launcher/memory/activations.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from launcher.memory.inventory import Inventory

DS_SRC = "deepspeed 0.19 runtime/zero"
BNB_ADAM8_BLOCK = 256      # bitsandbytes Optimizer2State.init_state: blockwise absmax per 256
BNB_ADAM8_MIN_SIZE = 4096  # min_8bit_size: smaller tensors keep fp32 state
# Allocator and runtime overheads (constants, stated as such in the explain view; each to be
# confirmed on a GPU run: docs/gpu-results.md, "Plan and card checks").
CUDA_CONTEXT = 600 * 2**20       # CUDA context + cuBLAS workspaces (NCCL is its own term)
NCCL_PER_COMM = (512 * 2**20, 1638 * 2**20)  # one NCCL communicator's buffers: low, high
CUDA_FRAGMENTATION = 0.05        # caching-allocator slack over the tensor peak
CUDA_FRAGMENTATION_EXPANDABLE = 0.02  # the same with PYTORCH_CUDA_ALLOC_CONF expandable_segments
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE = "expandable_segments:True"
# CPU ranks, above a baseline taken after imports and a code warm-up: DeepSpeed and gloo
# bookkeeping (a constant) and oneDNN kernels (measured on this machine, or a stated range):
# launcher/memory/probe.py.
CPU_FRAGMENTATION = 0.0          # with a fixed mmap threshold freed tensors leave RSS at once


MOMENT_NAMES = {"fwd": "end of forward", "bwd": "end of backward", "step": "optimizer step",
                "load": "load (before deepspeed.initialize)"}


def nccl_communicators(stage: int, world: int, zero: dict[str, Any]) -> list[str]:
    """The NCCL communicators one rank joins under DeepSpeed 0.19 (each is created at its first
    collective and holds its own buffers): torch's default group (the launcher's collectives;
    ZeRO-3 partitions parameters over it: partition_parameters.py `ds_process_group =
    dist.get_world_group()`), DeepSpeed's clone of the world (`groups._clone_world_group`, the
    data-parallel group the engine reduces gradients over, every stage) and, at ZeRO-3 with
    zero_hpz_partition_size > 1 (ZeRO++ hpZ), the intra-node group of the secondary partition
    (`groups._create_zero_param_parallel_group`). One rank: none (no peers)."""
    if world <= 1:
        return []
    out = ["torch's default group (launcher collectives" + (", ZeRO-3 parameter gathers)"
                                                            if stage == 3 else ")"),
           "DeepSpeed's data-parallel clone of the world (gradient reduction)"]
    hpz = int(zero.get("zero_hpz_partition_size", 1) or 1)
    if stage == 3 and hpz > 1:
        out.append(f"ZeRO++ hpZ group of {hpz} ranks (secondary partition)")
    return out


def nccl_range() -> tuple[int, int]:
    return NCCL_PER_COMM


def expandable_segments(env: dict[str, str]) -> bool:
    """cluster.env (which reaches every rank, in the job script and under `ftlaunch run`) sets
    PYTORCH_CUDA_ALLOC_CONF with expandable_segments:True."""
    conf = str(env.get(ALLOC_CONF, "")).replace(" ", "").lower()
    return "expandable_segments:true" in conf


def cuda_slack(env: dict[str, str]) -> tuple[float, str]:
    """(fraction of the tensor peak the caching allocator keeps beyond it, why)."""
    if expandable_segments(env):
        return CUDA_FRAGMENTATION_EXPANDABLE, f"with {ALLOC_CONF}={EXPANDABLE} (cluster.env)"
    return CUDA_FRAGMENTATION, f"without expandable segments ({ALLOC_CONF} not set in cluster.env)"


@dataclass(frozen=True)
class Term:
    key: str
    label: str
    bytes: int
    phase: str      # "static", "overhead", "node", or the moments it is alive at: "fwd bwd step"
    formula: str
    source: str
    low: int | None = None   # a term known only as a range: its lower end (bytes is the upper)

    def to_dict(self) -> dict[str, Any]:
        out = {"key": self.key, "label": self.label, "bytes": self.bytes, "phase": self.phase,
               "formula": self.formula, "source": self.source}
        if self.low is not None:
            out["low"] = self.low
        return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------ ZeRO partitioning
def flat_partition(numels: Sequence[int], world: int) -> tuple[int, int]:
    """ZeRO-1/2: (slice elements, max elements of the params overlapping one rank's slice).

    DeepSpeed flattens a param group, pads it to a multiple of 2 x N and gives each rank an
    equal slice; gradients are kept for every parameter that overlaps the slice, in full.
    """
    total = sum(numels)
    align = 2 * world
    size = -(-total // align) * align // world if total else 0
    worst = 0
    for r in range(world):
        lo, hi, pos, held = r * size, (r + 1) * size, 0, 0
        for n in numels:
            if lo <= pos < hi or pos < lo < pos + n:
                held += n
            pos += n
        worst = max(worst, held)
    return size, worst


def zero3_partition(numel: int, world: int) -> int:
    return -(-numel // world)


def adam8_state_bytes(numels: Iterable[int]) -> int:
    """bitsandbytes AdamW8bit state: per tensor 2 x uint8 + 2 fp32 absmax per 256 elements;
    tensors under 4096 elements keep two fp32 moments. (The 256-entry qmaps are shared.)"""
    total = 0
    for n in numels:
        if n < BNB_ADAM8_MIN_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * (-(-n // BNB_ADAM8_BLOCK))
    return total


def param_groups(inv: Inventory, weight_decay: float) -> list[list[int]]:
    """The trainable elements of each optimizer param group, in order, as the ranks build them
    (launcher/model/decay.py): with weight decay, the decayed parameters, then biases and norms."""
    train = [p for p in inv.params if p.trainable]
    if not weight_decay:
        return [[p.numel for p in train]]
    groups = [[p.numel for p in train if p.decay], [p.numel for p in train if not p.decay]]
    return [g for g in groups if g] or [[]]


# ------------------------------------------------------------------ model states per rank
@dataclass(frozen=True)
class States:
    weights: int
    weights_f: str
    grads: int
    grads_f: str
    masters: int
    optim: int
    optim_f: str
    opt_elems: int          # elements the optimizer updates on this rank (its fp32 slice)
    gather: int             # ZeRO-3 parameters gathered at once in forward/backward
    gather_f: str


def states(inv: Inventory, stage: int, world: int, zero: dict[str, Any], optimizer: str,
           groups: Sequence[Sequence[int]] | None = None) -> States:
    """Weights, gradients, fp32 masters and optimizer state on one rank (before offload)."""
    lp = inv.lp_bytes
    train = [p for p in inv.params if p.trainable]
    t_numels = [p.numel for p in train]
    T = sum(t_numels)
    W = inv.weight_bytes
    groups = groups or [t_numels]
    gather, gather_f = 0, "0 (ZeRO-3 only)"
    if stage == 0:
        weights, wf = W, "all parameters (lp, quantized as stored) + buffers"
        grads, gf = T * lp, "T x lp (param.grad)"
        masters = 0 if lp == 4 else 4 * T
        opt_numels = t_numels
    elif stage in (1, 2):
        weights, wf = W, "all parameters (lp, quantized as stored) + buffers"
        parts = [flat_partition(g, world) for g in groups]
        slice_n = sum(p[0] for p in parts)
        if stage == 1:
            # ZeRO-1 does not partition gradients: every param.grad is whole until the step
            grads, gf = T * lp, "T x lp (ZeRO-1 keeps every parameter's full gradient until the step)"
        else:
            grads = lp * sum(p[1] for p in parts)
            gf = "lp x elements of the params overlapping this rank's 1/N slice (DeepSpeed keeps them whole)"
        masters = 4 * slice_n
        opt_numels = [p[0] for p in parts]
    else:
        thr = int(zero.get("stage3_param_persistence_threshold",
                           zero.get("param_persistence_threshold", 100_000)))
        model_thr = int(zero.get("stage3_model_persistence_threshold",
                                 zero.get("model_persistence_threshold", 2**63 - 1)))
        persistent, part = 0, 0
        for p in inv.params:
            part += (zero3_partition(p.numel, world) * lp if p.quant == "none"
                     else -(-p.nbytes // world))
            if p.numel <= thr and persistent + p.numel <= model_thr:
                persistent += p.numel
        weights = part + persistent * lp + inv.buffer_bytes
        wf = (f"lp x sum ceil(numel/N) + full copies of {persistent:,} persistent elements "
              f"(params <= {thr:,} elements) + buffers")
        hpz = int(zero.get("zero_hpz_partition_size", 1) or 1)
        if hpz > 1:  # ZeRO++ hpZ: a secondary partition over hpz ranks (partition_parameters.py)
            weights += lp * sum(-(-p.numel // hpz) for p in inv.params
                                if p.numel > thr and p.quant == "none")
            wf += f" + hpZ secondary partition: lp x sum ceil(numel/{hpz})"
        per = [zero3_partition(n, world) for n in t_numels]
        grads, gf = lp * sum(per), "lp x sum ceil(numel/N) over trainable params"
        masters = 4 * sum(per)
        opt_numels = [sum(per)]
        live = int(zero.get("stage3_max_live_parameters", zero.get("max_live_parameters", 10**9)))
        prefetch = int(zero.get("stage3_prefetch_bucket_size", zero.get("prefetch_bucket_size", 5 * 10**7)))
        reuse = int(zero.get("stage3_max_reuse_distance", zero.get("max_reuse_distance", 10**9)))
        big = max((p.module_numel for p in inv.params if p.numel > thr), default=0)
        nonpersist = sum(p.numel for p in inv.params if p.numel > thr)
        if reuse >= nonpersist:
            # nothing is released before its reuse in the backward: the forward's gathered
            # copy stays, and the backward gathers again (2 copies seen at the peak)
            gathered = min(live, 2 * nonpersist)
            gather_f = (f"lp x min(max_live {live:,}, 2 x {nonpersist:,} partitioned elements) "
                        f"(max_reuse_distance {reuse:,} >= model: kept gathered)")
        else:
            gathered = min(live, 2 * big + min(prefetch, big))
            gather_f = (f"lp x min(max_live, 2 x largest module + prefetch) = lp x min({live:,}, "
                        f"2 x {big:,} + {min(prefetch, big):,})")
        gather = lp * gathered
    if optimizer == "adamw":
        optim = 8 * sum(opt_numels)
        of = "2 fp32 moments x optimizer elements (8 B each)"
    else:
        optim = adam8_state_bytes(opt_numels)
        of = ("bitsandbytes 8-bit: 2 B + 8 B/256 per element (tensors < 4096 elements: 8 B) "
              "on DeepSpeed's flat fp32 slices" if stage else
              "bitsandbytes 8-bit per parameter: 2 B + 8 B/256 per element, < 4096 elements: 8 B")
    return States(weights, wf, grads, gf, masters, optim, of, sum(opt_numels), gather, gather_f)
