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
| ZeRO-1/2 | all, lp | lp x elements of the params overlapping this rank's slice of the flat group | 4 x slice | 8 x slice |
| ZeRO-3 | lp x ceil(numel/N) per param + full copies of persistent params | lp x sum ceil(numel/N) trainable | 4 x same | 8 x same |

Activations: the tensors autograd saves in a Hugging Face Llama-family block (eager and sdpa
attention), enumerated tensor by tensor with `torch.autograd.graph.saved_tensors_hooks` and
written as a formula in the style of Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", eq. 1: sbh(34 + 5as/h) for GPT blocks); other
families fall back to that equation, scaled to the training dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from launcher.memory_model import Inventory, Shape

KORTHIKANTI = "Korthikanti et al. 2022, eq. 1"
DS_SRC = "deepspeed 0.19 runtime/zero"
BNB_ADAM8_BLOCK = 256      # bitsandbytes Optimizer2State.init_state: blockwise absmax per 256
BNB_ADAM8_MIN_SIZE = 4096  # min_8bit_size: smaller tensors keep fp32 state
# Allocator and runtime overheads (constants, stated as such in the explain view).
CUDA_CONTEXT = 600 * 2**20       # CUDA context + cuBLAS/NCCL workspaces, outside torch's allocator
CUDA_FRAGMENTATION = 0.05        # caching-allocator slack over the tensor peak
CPU_RUNTIME = 96 * 2**20         # DeepSpeed CPU rank: shm_comm buffers, gloo, lazy modules (measured)
CPU_FRAGMENTATION = 0.10         # glibc malloc slack over the tensor peak (measured, see docs/memory.md)


@dataclass(frozen=True)
class Term:
    key: str
    label: str
    bytes: int
    phase: str      # static (held all along), backward, step (transient), overhead, node
    formula: str
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "bytes": self.bytes, "phase": self.phase,
                "formula": self.formula, "source": self.source}


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


# ------------------------------------------------------------------ activations
@dataclass(frozen=True)
class Activations:
    saved: int            # held from the end of the forward into the backward
    backward_extra: int   # transient on top of `saved` at the backward's worst moment
    per_layer: int        # one block's saved tensors
    formula: str
    source: str


def activations(shape: Shape, b: int, s: int, lp: int, attn: str, checkpointing: bool,
                padded: bool, logits_held: bool) -> Activations:
    """Bytes of activations for one micro batch of b sequences of s tokens.

    attn: "eager" or "sdpa" (flash_attention_2 saves like sdpa). padded: batches carry padding,
    so transformers builds a mask (and sdpa repeats k/v to all heads). logits_held: the training
    loop keeps the model output (the lp logits) alive through the backward.
    """
    h, a, kv, d, i, V, L = (shape.hidden, shape.heads, shape.kv_heads, shape.head_dim,
                            shape.intermediate, shape.vocab, shape.layers)
    bs = b * s
    norm = 4 * bs * h + 4 * bs + 2 * lp * bs * h
    if not shape.known:
        per_layer = int(s * b * h * (34 + 5 * a * s / h) * lp / 2)
        layer_f = f"sbh(34 + 5as/h) x lp/2 [{KORTHIKANTI}; this model family is not enumerated]"
        mask = 0
    else:
        if attn == "eager":
            attn_b = 4 * lp * bs * a * d + 4 * b * a * s * s + (lp if lp < 4 else 0) * b * a * s * s
            attn_f = "4 lp bs ad + (4 + lp) b a s^2"
            mask = lp * b * s * s if padded else 0
        else:
            kv_eff = a if padded else kv
            attn_b = 2 * lp * bs * a * d + 2 * lp * bs * kv_eff * d + 4 * b * a * s
            attn_f = f"2 lp bs ad + 2 lp bs {'a' if padded else 'kv'}d + 4bas"
            mask = b * s * s if padded else 0
        mlp = (4 if shape.gated_mlp else 2) * lp * bs * i
        per_layer = 2 * norm + attn_b + mlp
        layer_f = (f"2 x norm(4bsh + 4bs + 2 lp bsh) + attention({attn_f}) + "
                   f"mlp({4 if shape.gated_mlp else 2} lp bsi)")
    rope = 2 * lp * s * d
    ids = 16 * bs                    # input ids + labels (int64)
    logits_saved = 4 * bs * V        # log_softmax output in fp32 (the loss upcasts)
    logits_live = lp * bs * V if logits_held else 0
    loss_grad = 8 * bs * V           # grad of log_softmax output + its input grad, fp32
    common = norm + ids + mask + logits_saved + logits_live
    if checkpointing:
        # block inputs only (cos/sin are recomputed inside the checkpoint too)
        saved = L * lp * bs * h + common
        # the worst of: the loss backward, or one block recomputed (the logits are gone by then)
        extra = max(loss_grad, per_layer - logits_saved)
        f = (f"L x lp bsh (block inputs) + final norm + logits 4bsV{' + lp bsV' if logits_held else ''}"
             f"; backward: max(8bsV loss grads, one block recomputed: {layer_f})")
    else:
        saved = L * per_layer + rope + common
        extra = loss_grad
        f = (f"L x [{layer_f}] + final norm + logits 4bsV{' + lp bsV' if logits_held else ''}"
             f"{' + mask' if mask else ''}; backward: + 8bsV (fp32 loss grads)")
    return Activations(saved, extra, per_layer, f,
                       "HF Llama block, saved tensors enumerated (tests/test_memory_activations.py)"
                       if shape.known else KORTHIKANTI)


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
        per = [zero3_partition(n, world) for n in t_numels]
        grads, gf = lp * sum(per), "lp x sum ceil(numel/N) over trainable params"
        masters = 4 * sum(per)
        opt_numels = [sum(per)]
        live = int(zero.get("stage3_max_live_parameters", zero.get("max_live_parameters", 10**9)))
        prefetch = int(zero.get("stage3_prefetch_bucket_size", zero.get("prefetch_bucket_size", 5 * 10**7)))
        big = max((p.module_numel for p in inv.params if p.numel > thr), default=0)
        gathered = min(live, big + min(prefetch, big)) if big else 0
        gather = lp * gathered
        gather_f = ("lp x min(max_live, largest module + min(prefetch bucket, largest module)) "
                    f"= lp x min({live:,}, {big:,} + {min(prefetch, big):,})")
    if optimizer == "adamw":
        optim = 8 * sum(opt_numels)
        of = "2 fp32 moments x optimizer elements (8 B each)"
    else:
        optim = adam8_state_bytes(opt_numels)
        of = ("bitsandbytes 8-bit: 2 B + 8 B/256 per element (tensors < 4096 elements: 8 B) "
              "on DeepSpeed's flat fp32 slices" if stage else
              "bitsandbytes 8-bit per parameter: 2 B + 8 B/256 per element, < 4096 elements: 8 B")
    return States(weights, wf, grads, gf, masters, optim, of, sum(opt_numels), gather, gather_f)
