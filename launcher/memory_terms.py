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
# CPU ranks, above a baseline taken after imports and a code warm-up (bench/plan_vs_measured.py):
# oneDNN kernels, gloo and DeepSpeed bookkeeping, measured on the tiny model.
CPU_RUNTIME = {"fp32": 8 * 2**20, "bf16": 20 * 2**20, "fp16": 20 * 2**20}
CPU_FRAGMENTATION = 0.0          # with a fixed mmap threshold freed tensors leave RSS at once


@dataclass(frozen=True)
class Term:
    key: str
    label: str
    bytes: int
    phase: str      # "static", "overhead", "node", or the moments it is alive at: "fwd bwd step"
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


@dataclass(frozen=True)
class BlockGrads:
    """What autograd must keep in one block, from which of its weights train.

    active: the graph reaches the block (a parameter at or before it trains); before the
    first trainable parameter nothing is saved. A linear layer saves its input only when its
    weight trains, or when it is quantized (bitsandbytes' 8/4-bit matmuls keep the input
    whenever it needs a gradient). lora_bytes_per_token: what peft's adapters add (dropout
    output and mask per target, the r-wide input of lora_B).
    """

    active: bool = True
    first: bool = False       # the graph starts here: the block's input needs no gradient
    norm1: bool = True
    qkv: bool = True
    o: bool = True
    norm2: bool = True
    gate_up: bool = True
    down: bool = True
    lora_bytes_per_token: int = 0


@dataclass(frozen=True)
class HeadGrads:
    active: bool = True      # the final norm's input needs a gradient
    norm: bool = True        # final norm weight trains
    lm_head: bool = True     # lm_head saves its input (trains, or quantized)
    embeddings: bool = True  # the embedding trains: it keeps the input ids


def _block(shape: Shape, g: BlockGrads, b: int, s: int, lp: int, attn: str, padded: bool) -> int:
    """Saved bytes of one block, following the graph through it: a tensor is kept only when
    something before it (or its own weight) needs a gradient."""
    if not g.active:
        return 0
    h, a, kv, d, i = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim, shape.intermediate
    bs = b * s
    core = 4 * bs * h + 4 * bs                      # fp32 input and rsqrt of an RMSNorm
    graph = not g.first                             # does the current tensor need a gradient?
    out = core if graph else 0
    out += lp * bs * h if g.norm1 else 0
    graph = graph or g.norm1
    out += lp * bs * h if g.qkv else 0              # q/k/v input (the norm output)
    graph = graph or g.qkv
    if graph:                                       # attention inputs need a gradient
        if attn == "eager":
            out += 3 * lp * bs * a * d + 4 * b * a * s * s + (lp if lp < 4 else 0) * b * a * s * s
        else:
            kv_eff = a if padded else kv
            out += 2 * lp * bs * a * d + 2 * lp * bs * kv_eff * d + 4 * b * a * s  # q, k, v, out, lse
            out += lp * b * s * s if padded else 0  # the float mask, a copy per block
    if g.o and (attn == "eager" or not graph):
        out += lp * bs * a * d                      # o_proj input (sdpa's out is kept already)
    graph = graph or g.o
    out += core if graph else 0
    out += lp * bs * h if g.norm2 else 0
    graph = graph or g.norm2
    out += lp * bs * h if g.gate_up else 0          # gate/up input
    graph = graph or g.gate_up
    if shape.gated_mlp:
        out += 3 * lp * bs * i if graph else 0      # gate out (silu), silu out and up out (mul)
    else:
        out += lp * bs * i if graph else 0
    out += lp * bs * i if g.down else 0             # down_proj input
    return out + bs * g.lora_bytes_per_token


def activations(shape: Shape, b: int, s: int, lp: int, attn: str, checkpointing: bool,
                padded: bool, logits_held: bool, blocks: list[BlockGrads] | None = None,
                head: HeadGrads | None = None) -> Activations:
    """Bytes of activations for one micro batch of b sequences of s tokens.

    attn: "eager" or "sdpa" (flash_attention_2 saves like sdpa). padded: batches carry padding,
    so transformers builds a mask (and sdpa repeats k/v to all heads). logits_held: the training
    loop keeps the model output (the lp logits) alive through the backward. blocks / head:
    which parts train (default: everything), see BlockGrads.
    """
    h, a, d, V, L = shape.hidden, shape.heads, shape.head_dim, shape.vocab, shape.layers
    bs = b * s
    blocks = blocks or [BlockGrads()] * L
    head = head or HeadGrads()
    if not shape.known:
        one = int(s * b * h * (34 + 5 * a * s / h) * lp / 2)
        per_block = [one if g.active else 0 for g in blocks]
        layer_f = f"sbh(34 + 5as/h) x lp/2 per block [{KORTHIKANTI}; this family is not enumerated]"
    else:
        per_block = [_block(shape, g, b, s, lp, attn, padded) for g in blocks]
        attn_f = ("3 lp bs ad + (4 + lp) b a s^2 + lp bs ad (o_proj input)" if attn == "eager" else
                  f"2 lp bs ad + 2 lp bs {'a' if padded else 'kv'}d + 4bas"
                  + (" + lp b s^2 (mask)" if padded else ""))
        layer_f = (f"per block: 2 x (4bsh + 4bs) norms + lp bsh per trained norm + attention({attn_f})"
                   f" + 3 lp bsi + lp bsh / lp bsi per linear input kept (trained or quantized)")
    active = [g.active for g in blocks]
    n_active = sum(active)
    final = (4 * bs * h + 4 * bs if head.active else 0) + (lp * bs * h if head.norm and head.active else 0) \
        + (lp * bs * h if head.lm_head else 0)
    rope = 2 * lp * s * d if any(active) else 0
    ids = (16 if head.embeddings else 8) * bs   # labels (+ input ids for a trained embedding)
    logits_saved = 4 * bs * V        # log_softmax output in fp32 (the loss upcasts)
    logits_live = lp * bs * V if logits_held else 0
    loss_grad = 8 * bs * V           # grad of log_softmax output + its input grad, fp32
    common = final + ids + logits_saved + logits_live
    biggest = max(per_block, default=0)
    if checkpointing:
        # active block inputs only (cos/sin are recomputed inside the checkpoint too)
        saved = n_active * lp * bs * h + common
        extra = max(loss_grad, biggest - logits_saved)
        f = (f"{n_active} active blocks x lp bsh (block inputs) + final norm + logits 4bsV"
             f"{' + lp bsV' if logits_held else ''}; backward: max(8bsV loss grads, one block "
             f"recomputed: {layer_f})")
    else:
        saved = sum(per_block) + rope + common
        extra = loss_grad
        f = (f"{n_active} of {L} blocks reached by the graph, {layer_f}; + final norm + logits 4bsV"
             f"{' + lp bsV' if logits_held else ''}; backward: + 8bsV (fp32 loss grads)")
    return Activations(saved, extra, biggest, f,
                       "HF Llama block, saved tensors enumerated (tests/test_memory_activations.py)"
                       if shape.known else KORTHIKANTI)


def grads_map(inv: Inventory, lora_dropout: float = 0.0, lora_r: int = 0, zero3: bool = False
              ) -> tuple[list[BlockGrads], HeadGrads]:
    """BlockGrads per block and HeadGrads from the inventory's trainable / quantized names.

    zero3: DeepSpeed ZeRO-3 runs every linear layer through its own autograd function
    (`zero3_linear_wrap`, memory_efficient_linear), which keeps the input whether the weight
    trains or not."""
    from launcher.freeze import find_layers
    names = [p.name for p in inv.params if p.group not in ("adapters", "copies")]
    layers = find_layers(names)
    keep = {p.name for p in inv.params if p.trainable or p.quant != "none" or zero3}
    trains = {p.name for p in inv.params if p.trainable}
    copies = {p.name[: -len(" (trained copy)")] for p in inv.params if p.group == "copies"}
    keep |= copies
    trains |= copies
    lora = {p.name.rsplit(".", 1)[0]: p.numel for p in inv.params if p.group == "adapters"
            and p.name.endswith(".lora_A")}
    lp = inv.lp_bytes

    def has(prefix: str, leafs: tuple[str, ...], pool: set[str]) -> bool:
        return any(n.startswith(prefix) and any(f".{x}." in n or n.endswith(f".{x}.weight") for x in leafs)
                   for n in pool)

    blocks: list[BlockGrads] = []
    embeddings = any(p.group == "embeddings" and p.name in trains for p in inv.params)
    active = embeddings
    for pre in layers:
        lora_here = {t: n for t, n in lora.items() if t.startswith(pre)}
        first = not active
        active = active or any(n.startswith(pre) for n in trains) or bool(lora_here)
        first = first and active
        per_tok = 0
        for t, a_numel in lora_here.items():
            width = a_numel // max(lora_r, 1)
            # dropout output (lp) and its mask (1 B), conservative by ~3% (tests)
            per_tok += lp * lora_r + ((lp + 1) * width if lora_dropout > 0 else 0)
        lo = set(lora_here)
        blocks.append(BlockGrads(
            active=active, first=first,
            norm1=has(pre, ("input_layernorm",), trains),
            qkv=has(pre, ("q_proj", "k_proj", "v_proj"), keep) or
            (lora_dropout == 0 and any(t.endswith(("q_proj", "k_proj", "v_proj")) for t in lo)),
            o=has(pre, ("o_proj",), keep) or (lora_dropout == 0 and any(t.endswith("o_proj") for t in lo)),
            norm2=has(pre, ("post_attention_layernorm",), trains),
            gate_up=has(pre, ("gate_proj", "up_proj"), keep) or
            (lora_dropout == 0 and any(t.endswith(("gate_proj", "up_proj")) for t in lo)),
            down=has(pre, ("down_proj",), keep) or (lora_dropout == 0 and any(t.endswith("down_proj") for t in lo)),
            lora_bytes_per_token=per_tok))
    final_norm = any(p.name in trains and p.group == "norms"
                     and not any(p.name.startswith(x) for x in layers) for p in inv.params)
    lm_head = any(p.name in keep and p.group == "lm_head" for p in inv.params)
    return blocks, HeadGrads(active=active or final_norm, norm=final_norm, lm_head=lm_head,
                             embeddings=embeddings)


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
