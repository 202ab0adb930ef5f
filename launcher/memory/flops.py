"""Floating-point operations of one training step, counted from the meta-device model.

Only matrix products are counted (the linear layers, the output head and attention's two
n^2 products), as `torch.utils.flop_counter.FlopCounterMode` does: a multiply-add is 2 FLOPs,
so a linear layer of `in x out` weights costs 2 x in x out per token forward. Norms, activations,
the loss and the optimizer are left out (a few percent of a step on GPUs).

What the backward pass computes depends on what trains (launcher/model/freeze.py decides it, the
inventory records it), walked block by block in execution order:

- a weight gradient (2 x in x out per token) for each trainable weight;
- an input gradient (2 x in x out per token) for each linear whose input requires grad: that is
  everything above the lowest trainable parameter (the residual stream carries the gradient
  down to it) and nothing below it; inside the lowest trainable block, an input that only frozen
  operations produced (the first projections, under LoRA on frozen norms) needs none;
- attention's backward (dO V^T, then dQ, dK, dV: up to 2 x its forward) where q, k or v
  require grad, only the products whose operand needs it;
- LoRA (y = W x + B A x): the frozen base W costs its forward and, where the input requires
  grad, its input gradient; the adapters cost 2 r (in + out) forward and their gradients;
- gradient checkpointing (HF wraps each decoder block; non-reentrant `torch.utils.checkpoint`
  with early stop) recomputes a block's forward during its backward, in blocks whose backward
  runs. The recomputation stops at the last tensor the backward needs; autograd saves an
  operation's inputs before running it, so the block's last projection (the MLP's down
  projection, or under LoRA its adapter's B, which peft runs after the base) is not recomputed
  unless something after it saves a tensor (a post-MLP norm as in
  Gemma 2, a residual dropout > 0 as in GPT-2).
- under gradient checkpointing transformers makes the embeddings' output require grad
  (`_activation_checkpointing_enable` calls `enable_input_require_grads` for every input_ids
  model), so every block, frozen ones included, runs its input gradients and its recomputation.

Attention is counted at its full n^2 (b x heads x s x s x head_dim x 2 per product), as the
eager and sdpa kernels compute it with a causal mask; FlashAttention skips the masked half
(the wall-time estimate keeps the full count, a bound on the work).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTN_OUT = ("o_proj", "c_proj", "dense", "out_proj", "wo", "o")
MLP_OUT = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "proj_out")
_DROPOUT_KEYS = ("resid_pdrop", "hidden_dropout", "hidden_dropout_prob")


@dataclass(frozen=True)
class Lin:
    """A linear layer as the step sees it."""

    name: str
    fin: int
    fout: int
    trains: bool        # its weight (or bias) is trainable
    lora: int = 0       # adapter rank, 0 for none
    saves_input: bool = False  # weight trainable or adapters: the input is saved for backward

    def fwd(self) -> int:
        return 2 * self.fin * self.fout + 2 * self.lora * (self.fin + self.fout)


@dataclass
class StepFlops:
    """FLOPs of one sequence of `seq` tokens through forward and backward, by part."""

    seq: int
    forward: int = 0
    backward_input: int = 0       # gradients of activations (linear inputs, adapters' inner)
    backward_weight: int = 0      # gradients of trainable weights (adapters included)
    backward_attention: int = 0
    recompute: int = 0            # gradient checkpointing
    attention_forward: int = 0    # the n^2 part of `forward` (kept inside it)

    @property
    def backward(self) -> int:
        return self.backward_input + self.backward_weight + self.backward_attention

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.recompute

    def to_dict(self) -> dict[str, int]:
        return {"seq": self.seq, "forward": self.forward, "attention_forward": self.attention_forward,
                "backward_input": self.backward_input, "backward_weight": self.backward_weight,
                "backward_attention": self.backward_attention, "recompute": self.recompute,
                "total": self.total}


def _linear_of(model: Any) -> dict[str, tuple[int, int]]:
    from launcher.model.lora import _is_linear, in_out
    return {n: in_out(m) for n, m in model.named_modules() if n and _is_linear(m)}


def _trainable(inv: Any) -> tuple[set[str], dict[str, int]]:
    """(trainable parameter names of the base model, {module: LoRA rank})."""
    names: set[str] = set()
    lora: dict[str, int] = {}
    for p in inv.params:
        if not p.trainable:
            continue
        if p.group == "adapters":
            mod, _, leaf = p.name.rpartition(".")
            if leaf == "lora_A":
                lora[mod] = 1
            continue
        names.add(p.name.removesuffix(" (trained copy)"))
    return names, lora


def _lin(name: str, shape: tuple[int, int], train: set[str], lora: dict[str, int], r: int) -> Lin:
    trains = f"{name}.weight" in train or f"{name}.bias" in train
    rank = r if name in lora else 0
    return Lin(name, shape[0], shape[1], trains, rank, f"{name}.weight" in train or rank > 0)


class _Walk:
    """Accumulates one sequence's FLOPs over the operations in execution order."""

    def __init__(self, seq: int):
        self.f = StepFlops(seq)
        self.s = seq

    def linear(self, lin: Lin, in_grad: bool) -> bool:
        """Forward and backward of one linear; returns whether its output requires grad."""
        s, f = self.s, self.f
        f.forward += s * lin.fwd()
        base = 2 * s * lin.fin * lin.fout
        if in_grad:
            f.backward_input += base + 2 * s * lin.lora * lin.fin   # W^T dy, A^T d(Ax)
        if lin.saves_input and not lin.lora:   # a trainable weight: x^T dy
            f.backward_weight += base
        if lin.lora:   # dB = dy^T (Ax), dA = d(Ax)^T x; d(Ax) = B^T dy
            f.backward_weight += 2 * s * lin.lora * lin.fout + 2 * s * lin.lora * lin.fin
            f.backward_input += 2 * s * lin.lora * lin.fout
        return in_grad or lin.trains or lin.lora > 0

    def attention(self, heads_dim: int, q: bool, k: bool, v: bool) -> None:
        one = 2 * self.s * self.s * heads_dim
        self.f.forward += 2 * one
        self.f.attention_forward += 2 * one
        self.f.backward_attention += one * ((q or k) + v + q + k)


def count(cfg: Any, seq: int, inv: Any = None) -> StepFlops:
    """FLOPs of one sequence of `seq` tokens, forward and backward (and recomputation), for the
    run's model, freeze policy, LoRA and gradient checkpointing. Kept on disk like the plan's
    other model facts (launcher/memory/facts_cache.py), by config.json's content and the model,
    freeze and quantization settings: a second plan builds no meta-device model for it."""
    import os

    import launcher.memory.facts_cache as facts_cache
    try:
        with open(os.path.join(cfg.model.path, "config.json"), "rb") as fh:
            content = fh.read()
    except OSError:
        return _count(cfg, seq, inv)
    key = (content, repr(cfg.model), repr(cfg.freeze), repr(cfg.quantization), seq)
    return facts_cache.get("flops", key, lambda: _count(cfg, seq, inv), folder=cfg.model.path)


def _count(cfg: Any, seq: int, inv: Any = None) -> StepFlops:
    from launcher.model import freeze
    from launcher.model.lora import output_head_name
    from launcher.memory.inventory import _text_config, inventory, meta_model_for
    inv = inv if inv is not None else inventory(cfg)
    model = meta_model_for(cfg)
    hf = _text_config(model.config)
    train, lora = _trainable(inv)
    r = cfg.freeze.lora.r if cfg.freeze.policy == "lora" else 0
    linears = _linear_of(model)
    names = [n for n, _ in model.named_parameters()]
    blocks = freeze.find_layers(names)
    head = output_head_name(model)
    sh = inv.shape
    heads_dim = sh.heads * sh.head_dim
    parallel = bool(getattr(hf, "use_parallel_residual", False) or getattr(hf, "parallel_attn", False))
    dropout = any(float(getattr(hf, k, 0) or 0) > 0 for k in _DROPOUT_KEYS)
    w = _Walk(seq)
    in_block = {b: [n for n in linears if n.startswith(b)] for b in blocks}
    seen = {n for ns in in_block.values() for n in ns}
    # the residual stream requires grad from the embeddings up where they train, and always under
    # gradient checkpointing: transformers' activation_checkpointing_enable calls
    # enable_input_require_grads for every input_ids model (the embeddings' output requires grad)
    stream = cfg.model.gradient_checkpointing or any(
        p.trainable and p.group == "embeddings" for p in inv.params)
    for b in blocks:
        before = w.f.forward
        stream, last_fwd, tail_saves = _block(w, b, in_block[b], linears, train, lora, r, stream,
                                              heads_dim, parallel, names, model, dropout)
        runs_backward = stream
        if cfg.model.gradient_checkpointing and runs_backward:
            block_fwd = w.f.forward - before
            w.f.recompute += block_fwd - (0 if tail_saves else last_fwd)
    # linears outside the blocks other than the head (rare: projections of some families)
    for n, shape in linears.items():
        if n in seen or n == head:
            continue
        stream = w.linear(_lin(n, shape, train, lora, r), stream) or stream
    final_norm_trains = any(n in train for n in names
                            if not any(n.startswith(b) for b in blocks) and "norm" in n)
    if head is not None:
        hl = _lin(head, linears[head], train, lora, r)
        head_param = _head_param(model, head)
        if head_param and head_param in train:
            hl = Lin(hl.name, hl.fin, hl.fout, True, hl.lora, True)
        w.linear(hl, stream or final_norm_trains)
    return w.f


def _head_param(model: Any, head: str) -> str | None:
    """The parameter name the output head's weight goes by (its tied embedding's, if tied)."""
    weight = dict(model.named_modules())[head].weight
    return next((n for n, p in model.named_parameters() if p is weight), None)


def _block(w: _Walk, prefix: str, lins: list[str], shapes: dict, train: set[str],
           lora: dict[str, int], r: int, stream: bool, heads_dim: int, parallel: bool,
           names: list[str], model: Any, dropout: bool) -> tuple[bool, int, bool]:
    """One decoder block; (stream requires grad after it, forward FLOPs of its last
    projection, whether something after that projection saves a tensor)."""
    rel = {n: n[len(prefix):] for n in lins}
    attn = [n for n in lins if any(k in rel[n].split(".")[0] for k in ("attn", "attention"))]
    mlp = [n for n in lins if n not in attn]
    a_out = next((n for n in attn if n.rpartition(".")[2] in ATTN_OUT), attn[-1] if attn else None)
    m_out = next((n for n in mlp if n.rpartition(".")[2] in MLP_OUT), mlp[-1] if mlp else None)
    lin_names = {f"{n}.{leaf}" for n in lins for leaf in ("weight", "bias")}
    norm_trains = any(n in train for n in names if n.startswith(prefix) and n not in lin_names)
    a_in = stream or norm_trains
    req = {"q": False, "k": False, "v": False}
    for n in attn:
        if n == a_out:
            continue
        out = w.linear(_lin(n, shapes[n], train, lora, r), a_in)
        leaf = n.rpartition(".")[2]
        hit = [c for c in "qkv" if leaf.startswith(c + "_") or leaf == c]
        for c in hit or "qkv":
            req[c] = req[c] or out
    qkv = any(req.values())
    if attn:
        w.attention(heads_dim, req["q"], req["k"], req["v"])
    attn_out = w.linear(_lin(a_out, shapes[a_out], train, lora, r), qkv) if a_out else qkv
    after_attn = stream or attn_out
    c_in = (stream if parallel else after_attn) or norm_trains
    mid = c_in
    for n in mlp:
        if n == m_out:
            continue
        mid = w.linear(_lin(n, shapes[n], train, lora, r), c_in) or mid
    last_fwd = 0
    out = mid
    if m_out:
        lin = _lin(m_out, shapes[m_out], train, lora, r)
        # the recomputation stops before the last product that saves its input: the projection
        # itself, or under LoRA its B (peft runs the base, then A, then B)
        last_fwd = 2 * w.s * lin.lora * lin.fout if lin.lora else w.s * lin.fwd()
        out = w.linear(lin, mid)
    post_norm = any("post_feedforward" in n for n, _ in model.named_modules() if n.startswith(prefix))
    return after_attn or out, last_fwd, post_norm or dropout
