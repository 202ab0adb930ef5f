"""The long-sequence switches in the memory plan (train.sequence_parallel, tiled_loss, tiled_mlp,
activation_offload; launcher/rank/longseq.py runs them) and `ftlaunch plan --max-seq-len`.

With any switch on, the activation terms come from the enumerated formula (activations.py) for
this rank's s / N tokens, then each switch changes what it changes (b micro batch, s sequence,
N sequence_parallel, s_l = s / N, h hidden, a heads, kv KV heads, d head dim, i MLP width,
V vocabulary, lp bytes of the training dtype):
- sequence parallelism: every linear activation is of s_l tokens; attention sees the whole s
  with a / N heads, so eager's (4 + lp) b a s^2 probabilities become (4 + lp) b (a / N) s^2;
  the all-to-all of q, k, v and the output needs 2 lp b s_l d (2a + 2 max(kv, N)) in flight.
- the loss computed in the loop: lm_head on the hidden states, no model logits kept; packed rows
  (and eager) get one (b, 1, s, s) mask of the whole sequence (bool for sdpa, lp for eager).
- tiled_loss: no 4 b s_l V fp32 log-probabilities kept, no 8 b s_l V loss gradients; one chunk
  of C = 2^24 / V tokens at a time: (lp + 8) C V, and the lp b s_l h gradient of the input.
- tiled_mlp: a block keeps its MLP input only, not the (4 lp b s_l i gated) intermediates; one
  chunk of h tokens of them at a time, and the lp b s_l h input gradient.
- activation_offload: everything autograd saves in the forward goes to pinned host memory (a
  node term, ranks per node x the bytes); the GPU keeps one block's input in flight (2 lp b s_l h).

Not traced on the meta device (the trace does not run the sequence-parallel attention): these
are the formula's figures. bench/longseq_memory.py measures them on CPU ranks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from launcher.checks.attn_kernels import resolved as resolved_kernel
from launcher.memory.activations import activations, grads_map
from launcher.memory.terms import Term, gib

LOSS_CHUNK_ELEMS = 1 << 24  # launcher/rank/longseq.py loss_chunks: fp32 logits per chunk
KEYS = ("activations", "loss_backward", "packed_mask", "sp_all_to_all", "sp_mask",
        "offload_staging")
SRC = "launcher/memory/longseq.py (formula); bench/longseq_memory.py (measured on CPU)"


def switches_on(cfg: Any) -> bool:
    t = cfg.train
    return t.sequence_parallel > 1 or t.tiled_loss or t.tiled_mlp or t.activation_offload


@dataclass(frozen=True)
class LongSeqActs:
    """Per-rank activation bytes of one micro batch with the switches as in the config."""

    terms: list[Term]
    offloaded: int  # bytes moved to pinned host memory per rank


def act_terms(cfg: Any, inv: Any, zero3_linear: bool = False) -> LongSeqActs:
    """The activation terms of a run with long-sequence switches (module docstring)."""
    t, shape = cfg.train, inv.shape
    n, b, s, lp = t.sequence_parallel, t.micro_batch_size, cfg.data.max_seq_len, inv.lp_bytes
    s_l = max(1, s // n)
    h, a, kv, d, i, V = (shape.hidden, shape.heads, shape.kv_heads, shape.head_dim,
                         shape.intermediate, shape.vocab)
    attn = resolved_kernel(shape.model_type, cfg.model.attn_implementation)
    kernel = "eager" if attn == "eager" else "sdpa"
    ckpt = cfg.model.gradient_checkpointing
    blocks, head = (grads_map(inv, cfg.freeze.lora.dropout, cfg.freeze.lora.r, zero3=zero3_linear)
                    if shape.known else (None, None))
    base = activations(shape, b, s_l, lp, kernel, ckpt, padded=False, logits_held=False,
                       blocks=blocks, head=head)
    n_active = sum(g.active for g in blocks) if blocks else shape.layers
    saved, per_layer = base.saved, base.per_layer
    logits_saved, loss_grad = 4 * b * s_l * V, 8 * b * s_l * V
    why = [f"b={b}, s={s}, N={n}, s_l={s_l}, {attn}{', checkpointing' if ckpt else ''}: "
           f"{base.formula} at s_l tokens"]
    terms: list[Term] = []

    def add(key: str, label: str, nbytes: float, phase: str, formula: str) -> None:
        terms.append(Term(key, label, int(nbytes), phase, formula, SRC))

    if n > 1 and kernel == "eager":  # probabilities over the whole sequence, a / N heads
        q = (4 + (lp if lp < 4 else 0)) * b * a * (s * s // n - s_l * s_l)
        if ckpt:
            per_layer += q
        else:
            saved += n_active * q
        why.append("eager: + (4 + lp) b a (s^2 / N - s_l^2) per block (whole-sequence attention)")
    # the backward's worst moment: the loss's gradient (first), then one block at a time
    mlp_chunk = loss_chunk = 0
    if t.tiled_mlp:
        mlp = (4 if shape.gated_mlp else 2) * lp * b * s_l * i
        if ckpt:
            per_layer = max(0, per_layer - mlp)
        else:
            saved = max(0, saved - n_active * mlp)
        mlp_chunk = (4 if shape.gated_mlp else 2) * lp * b * min(h, s_l) * i + lp * b * s_l * h
        why.append(f"tiled_mlp: - {4 if shape.gated_mlp else 2} lp b s_l i per block; one chunk "
                   "(4 lp b i gated x min(h, s_l) tokens + lp b s_l h) in the backward")
    if t.tiled_loss:
        saved -= logits_saved
        logits_saved = loss_grad = 0
        c = min(b * s_l, max(1, math.ceil(LOSS_CHUNK_ELEMS / V)))
        loss_chunk = (lp + 8) * c * V + lp * b * s_l * h
        why.append(f"tiled_loss: - 4 b s_l V log-probabilities, - 8 b s_l V loss gradients; one "
                   f"chunk in the backward: (lp + 8) C V, C = {c} tokens (2^24 / V), + lp b s_l h")
    block = (per_layer + mlp_chunk - logits_saved) if ckpt else mlp_chunk
    extra = max(loss_grad, loss_chunk, block)
    offloaded = 0
    if t.activation_offload:
        offloaded = max(0, saved - logits_saved)
        saved = logits_saved
        add("offload_staging", "activation offload: one block's input in flight",
            2 * lp * b * s_l * h, "fwd", "2 lp b s_l h (pinned copies to the host)")
        why.append(f"activation_offload: {gib(offloaded)} to pinned host memory per rank")
    add("activations", "activations", saved, "fwd", "; ".join(why))
    add("loss_backward", "backward temporaries", extra, "fwd",
        "the largest of: fp32 gradients of the loss (8 b s_l V), the tiled loss's chunk, one "
        "block recomputed (with the tiled MLP's chunk)")
    if n > 1:
        add("sp_all_to_all", "sequence parallel all-to-all buffers",
            2 * lp * b * s_l * d * (2 * a + 2 * max(kv, n)), "fwd",
            "2 lp b s_l d (2a + 2 max(kv, N)): q, k, v and the output, before and after")
    packed = cfg.data.packing and attn != "flash_attention_2"
    if kernel == "eager" or packed:
        per = lp if kernel == "eager" else 1
        add("sp_mask", "attention mask of the whole sequence", per * b * s * s, "fwd bwd",
            f"{'lp' if per > 1 else 'bool'} (b, 1, s, s): causal within each document")
    return LongSeqActs(terms, offloaded)


def offload_node_term(cfg: Any, world: int, offloaded: int) -> Optional[Term]:
    """The node's pinned host memory for offloaded activations (None without any)."""
    if not offloaded:
        return None
    ranks = max(1, min(cfg.cluster.gpus_per_node, world))
    return Term("activation_offload", f"offloaded activations ({ranks} x {gib(offloaded)})",
                ranks * offloaded, "train", "ranks per node x the activations each saves "
                "(pinned host memory, torch save_on_cpu)", SRC)


# ------------------------------------------------------------------ --max-seq-len
def _with(cfg: Any, **train: Any) -> Any:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def _with_len(cfg: Any, s: int) -> Any:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_seq_len=s))


def sp_choice(cfg: Any, world: int, heads: int, kv: int) -> int:
    """The largest N that divides the world size and the heads, with KV heads dividing it or
    divisible by it (1 where none: one GPU). Past one node the all-to-all crosses the network,
    as in ALST's multi-node runs."""
    ok = [n for n in range(1, world + 1) if world % n == 0 and heads % n == 0
          and (kv % n == 0 or n % kv == 0)]
    return max(ok)


def _bytes_at(cfg: Any, inv: Any, s: int) -> tuple[int, int]:
    """(GPU activation bytes, offloaded bytes per rank) at sequence length s."""
    got = act_terms(_with_len(cfg, s), inv)
    return sum(t.bytes for t in got.terms), got.offloaded


def longest(cfg: Any, inv: Any, budget: int, host_budget: Optional[int], step: int) -> int:
    """The largest multiple of `step` whose activations fit `budget` (and whose offloaded bytes fit
    `host_budget` per rank, when known); 0 if not even one step fits."""
    def fits(k: int) -> bool:
        gpu, host = _bytes_at(cfg, inv, k * step)
        return gpu <= budget and (host_budget is None or host <= host_budget)
    lo, hi = 0, 1
    while fits(hi) and hi < (1 << 26) // step:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


def max_seq_len_table(p: Any) -> list[tuple[str, int, str]]:
    """(variant, longest sequence per GPU, note) for the plan's run as configured, with each switch
    on alone and with all of them. Everything but the activations is the plan's (weights, states,
    buckets, runtime), the allocator slack scaled with them."""
    cfg, inv = p.cfg, p.inv
    act_now = sum(t.bytes for t in p.terms if t.key in KEYS)
    slack = next((t.bytes for t in p.terms if t.key == "allocator"), 0)
    frac = slack / p.peak_allocated if p.peak_allocated else 0.0
    fixed = p.total_per_gpu - act_now * (1 + frac)
    budget = int((p.gpu_memory - fixed) / (1 + frac))
    ranks = max(1, min(cfg.cluster.gpus_per_node, p.world_size))
    host = None
    if p.node_memory:
        used = sum(t.bytes for t in p.node_terms if "train" in t.phase.split()
                   and t.key != "activation_offload")
        host = max(0, (p.node_memory - used) // ranks)
    sp = sp_choice(cfg, p.world_size, inv.shape.heads, inv.shape.kv_heads)
    variants: list[tuple[str, Any]] = [("as configured", cfg)]
    t = cfg.train
    for name, on in (("tiled_loss", not t.tiled_loss), ("tiled_mlp", not t.tiled_mlp),
                     ("activation_offload", not t.activation_offload)):
        if on:
            variants.append((f"+ train.{name}: true", _with(cfg, **{name: True})))
    if sp > t.sequence_parallel:
        variants.append((f"+ train.sequence_parallel: {sp}", _with(cfg, sequence_parallel=sp)))
    every = _with(cfg, tiled_loss=True, tiled_mlp=True, activation_offload=True,
                  sequence_parallel=max(sp, t.sequence_parallel))
    variants.append(("all of them" + (f" (sequence_parallel {every.train.sequence_parallel})"
                                      if every.train.sequence_parallel > 1 else ""), every))
    out = []
    for name, c in variants:
        step = 256 * c.train.sequence_parallel
        got = longest(c, inv, budget, host if c.train.activation_offload else None, step)
        note = ""
        if c.train.activation_offload and got:
            note = f"host: {gib(_bytes_at(c, inv, got)[1] * ranks)} per node"
        out.append((name, got, note))
    return out


def render_max_seq_len(p: Any) -> str:
    """The text of `ftlaunch plan --max-seq-len`."""
    from launcher.model.info import folder_max_positions
    rows = max_seq_len_table(p)
    cfg = p.cfg
    lines = [f"longest sequence that fits per GPU ({gib(p.gpu_memory)}, {p.world_size} ranks, "
             f"micro batch {cfg.train.micro_batch_size}, multiples of 256 x N):"]
    width = max(len(r[0]) for r in rows)
    for name, got, note in rows:
        lines.append(f"  {name:<{width}}  {got:>12,}" + (f"  ({note})" if note else ""))
    limit = folder_max_positions(cfg.model.path)
    if limit and any(got > limit for _, got, _ in rows):
        lines.append(f"  the model has {limit:,} positions (max_position_embeddings): longer "
                     "sequences need a model trained or scaled (RoPE) for them")
    lines.append("  activations from the formula of launcher/memory/longseq.py; weights, states "
                 "and runtime as in the plan above")
    return "\n".join(lines) + "\n"
