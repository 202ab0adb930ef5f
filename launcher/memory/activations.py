"""Activations of a training step: what autograd keeps, block by block, given what trains.

Enumerated tensor by tensor for the Hugging Face Llama family (eager and sdpa attention) with
`torch.autograd.graph.saved_tensors_hooks` and written in the notation of Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models"; its eq. 1, sbh(34 + 5as/h),
is the fallback for other families, scaled to the training dtype). Checked against real models
in tests/test_memory_activations.py. Symbols: b micro batch, s sequence length, h hidden,
a heads (kv key/value heads, d head dim), i MLP width, V vocabulary, L blocks, lp bytes per
element of the training dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.memory.inventory import Inventory, Shape

KORTHIKANTI = "Korthikanti et al. 2022, eq. 1"


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
    weight trains, or when it is 8-bit (bitsandbytes' MatMul8bitLt / MatMul8bitFp keep the
    input whenever it needs a gradient; MatMul4Bit keeps only the quantized weight).
    lora_bytes_per_token: what peft's adapters add (dropout
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
                   f" + 3 lp bsi + lp bsh / lp bsi per linear input kept (trained or 8-bit)")
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


def from_trace(tr, shape: Shape, b: int, s: int, lp: int, checkpointing: bool,
               logits_held: bool) -> Activations:
    """Activations from a traced meta-device forward (launcher/memory/traced.py): the model's
    own saved tensors per block x blocks + what is outside the blocks. Under checkpointing a
    block keeps its input only (lp bsh) and the backward recomputes one block at a time."""
    L, bs = shape.layers, b * s
    logits_live = lp * bs * shape.vocab if logits_held else 0
    loss_grad = 8 * bs * shape.vocab
    how = (f"traced on the meta device ({tr.attn} attention"
           f"{', ' + tr.experts + ' experts' if tr.experts else ''}): "
           f"{tr.per_block:,} B saved per block x {L} blocks + {tr.common:,} B outside the blocks "
           f"(embeddings, final norm, logits, loss){' + lp bsV (logits held)' if logits_held else ''}")
    if checkpointing:
        saved = L * lp * bs * shape.hidden + tr.common + logits_live
        extra = max(loss_grad, tr.per_block - 4 * bs * shape.vocab)
        f = (f"{L} blocks x lp bsh (block inputs, checkpointing) + {tr.common:,} B outside the "
             f"blocks [{how}]; backward: max(8bsV loss grads, one block recomputed)")
    else:
        saved = L * tr.per_block + tr.common + logits_live
        extra = loss_grad
        f = how + "; backward: + 8bsV (fp32 loss grads)"
    return Activations(saved, extra, tr.per_block, f,
                       "saved_tensors_hooks on a meta-device forward of 1 and 3 blocks "
                       "(launcher/memory/traced.py; tests/test_memory_traced.py)")


def from_frozen_trace(tr, tr_ckpt, shape: Shape, b: int, s: int, lp: int,
                      logits_held: bool) -> Activations:
    """Activations of a partly frozen run from its full-depth traces (launcher/memory/traced.py,
    at the run's b and s): each block's own saved tensors, only in the blocks the graph
    reaches. tr_ckpt: the trace with the blocks checkpointed (None without checkpointing): it
    gives what the forward keeps, and the backward recomputes one block (of `tr`) at a time."""
    L, bs = shape.layers, b * s
    blocks = list(tr.blocks)
    logits_live = lp * bs * shape.vocab if logits_held else 0
    loss_grad = 8 * bs * shape.vocab
    biggest = max(blocks, default=0)
    how = (f"traced on the meta device at full depth with the run's trainable parameters "
           f"({tr.attn} attention{', ' + tr.experts + ' experts' if tr.experts else ''}): "
           f"{tr.active} of {L} blocks reached by the graph")
    if tr_ckpt is not None:
        kept = sum(tr_ckpt.blocks) + tr_ckpt.common
        saved = kept + logits_live
        extra = max(loss_grad, biggest - 4 * bs * shape.vocab)
        f = (f"{how}, checkpointed: {kept:,} B kept by the forward"
             f"{' + lp bsV (logits held)' if logits_held else ''}; backward: max(8bsV loss "
             f"grads, one block recomputed: up to {biggest:,} B)")
    else:
        common = tr.common
        saved = sum(blocks) + common + logits_live
        extra = loss_grad
        f = (f"{how}, {sum(blocks):,} B saved in them + {common:,} B outside the blocks"
             f"{' + lp bsV (logits held)' if logits_held else ''}; backward: + 8bsV (fp32 loss "
             "grads)")
    return Activations(saved, extra, biggest, f,
                       "saved_tensors_hooks on a full-depth meta-device forward "
                       "(launcher/memory/traced.py; tests/test_memory_traced.py)")


def grads_map(inv: Inventory, lora_dropout: float = 0.0, lora_r: int = 0, zero3: bool = False
              ) -> tuple[list[BlockGrads], HeadGrads]:
    """BlockGrads per block and HeadGrads from the inventory's trainable / quantized names.

    zero3: DeepSpeed ZeRO-3 runs every linear layer through its own autograd function
    (`zero3_linear_wrap`, memory_efficient_linear), which keeps the input whether the weight
    trains or not."""
    from launcher.model.freeze import find_layers
    names = [p.name for p in inv.params if p.group not in ("adapters", "copies")]
    layers = find_layers(names)
    # bitsandbytes' 8-bit matmuls keep their input for the backward, the 4-bit one does not
    keep = {p.name for p in inv.params if p.trainable or p.quant == "8bit" or zero3}
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
        for a_numel in lora_here.values():
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
