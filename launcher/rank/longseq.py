"""Long sequences on the ranks (docs/long-sequences.md): Ulysses sequence parallelism, the tiled
loss, the tiled MLP and activation offload (train.sequence_parallel / tiled_loss / tiled_mlp /
activation_offload).

Sequence parallelism (N ranks per sequence): consecutive ranks form a group (DeepSpeed's
`parallel_state_sp`, passed to `deepspeed.initialize` as mpu, so gradients are summed over the
group and averaged over the world / N data-parallel groups). Every rank of a group collates the
same examples (the sampler deals by data-parallel rank) and keeps its 1/N slice of the tokens
(`sp_collate`). Attention: DeepSpeed's `UlyssesSPAttentionHF` (all-to-all: the whole sequence,
heads / N) around the model's own kernel, given the mask of the whole sequence rebuilt from the
gathered position ids (`_core`): causal within each packed document. That is what lets eager and
packed rows work too (DeepSpeed's `register_with_transformers` refuses eager and drops the
document boundaries of packed rows under sdpa).

Loss: the hidden states go through lm_head here, whole or in chunks (`TiledLoss`: one chunk's
logits at a time, recomputed in the backward, so it is exact under any gradient scaling), as a
sum over this rank's tokens divided by the labelled tokens of the whole sequence (summed over
the group): the group's losses add up to the sequence's mean, and so do their gradients.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

IGNORE = -100


@dataclass
class SeqPar:
    """This rank's place in the sequence-parallel layout (size 1: off)."""

    size: int = 1
    rank: int = 0          # within the group
    group: Any = None      # the torch process group of the N ranks
    mpu: Any = None        # deepspeed.runtime.sequence_parallel.parallel_state_sp

    @property
    def on(self) -> bool:
        return self.size > 1


def active(cfg: Any) -> bool:
    """Whether the loop computes the loss here (sequence parallel, tiled, or with the forward
    under activation offload) instead of the model."""
    t = cfg.train
    return t.sequence_parallel > 1 or t.tiled_loss or t.activation_offload


def dp_layout(rank: int, world: int, n: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size) of a global rank when groups of n consecutive
    ranks share each sequence."""
    return rank // n, world // n


def init_groups(n: int, rank: int) -> SeqPar:
    """The sequence-parallel groups (collective; after init_distributed)."""
    if n <= 1:
        return SeqPar()
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    mpu.initialize_sequence_parallel(sequence_parallel_size=n)
    return SeqPar(n, rank % n, mpu.get_sequence_parallel_group(), mpu)


# ------------------------------------------------------------------ batches
def sp_collate(examples: list[dict], pad_id: int, size: int = 1, rank: int = 0) -> dict:
    """A micro batch for the loss computed here: input_ids, position_ids (per document for packed
    rows), shift_labels (the next token's label; -100 where none), this rank's 1/size slice of
    each (width padded to a multiple of size), and num_tokens (the examples' tokens, this rank's
    share when size > 1, so the world's sum counts each token once)."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    width = -(-width // size) * size
    n = len(examples)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    labels = torch.full((n, width + 1), IGNORE, dtype=torch.long)
    position_ids = torch.arange(width).repeat(n, 1)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[i, :k] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[i, :k] = torch.as_tensor(e["labels"], dtype=torch.long)
        if "doc_lengths" in e:
            at = 0
            for ln in list(e["doc_lengths"]) + [width - k]:
                position_ids[i, at:at + ln] = torch.arange(ln)
                at += ln
    chunk = width // size
    cut = slice(rank * chunk, (rank + 1) * chunk)
    total = sum(len(e["input_ids"]) for e in examples)
    return {"input_ids": input_ids[:, cut], "position_ids": position_ids[:, cut],
            "shift_labels": labels[:, 1:][:, cut].contiguous(),
            "num_tokens": torch.tensor(total // size + (rank < total % size))}


# ------------------------------------------------------------------ attention
def doc_mask(position_ids: Any, additive_dtype: Any = None) -> Any:
    """[b, 1, s, s] mask of the whole sequence: causal, within each document (a document starts
    where the position id is 0). Boolean (True: attend), or additive in `additive_dtype`."""
    import torch
    seg = (position_ids == 0).cumsum(dim=1)
    s = position_ids.shape[1]
    causal = torch.ones((s, s), dtype=torch.bool, device=position_ids.device).tril()
    mask = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
    if additive_dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=additive_dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(additive_dtype).min)


def _core(kernel: Callable, name: str) -> Callable:
    """The model's kernel over the gathered sequence, with the mask the sequence needs."""
    def core(module, query, key, value, attention_mask, *args, position_ids=None, **kwargs):
        if name.startswith("flash"):  # varlen over the gathered position ids
            mask = None
        elif name == "eager":
            mask = doc_mask(position_ids, query.dtype)
        elif bool((position_ids[:, 1:] == 0).any()):  # packed rows: documents apart
            mask = doc_mask(position_ids)
        else:
            mask = None  # sdpa: is_causal
        return kernel(module, query, key, value, mask, *args, position_ids=position_ids, **kwargs)
    return core


def install_attention(model: Any, sp: SeqPar) -> Callable[[], None]:
    """Route the model's attention kernel through Ulysses; returns the function that undoes it.
    transformers looks kernels up by the model's `_attn_implementation` name in one registry,
    so the kernel is replaced under its own name and every branch keyed on it still runs."""
    import sys

    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation
    had = name in ALL_ATTENTION_FUNCTIONS._local_mapping
    before = ALL_ATTENTION_FUNCTIONS._local_mapping.get(name)
    if name == "eager":
        kernel = sys.modules[type(model).__module__].eager_attention_forward
    else:
        kernel = ALL_ATTENTION_FUNCTIONS[name]
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    by_batch: dict[int, Any] = {}

    def ulysses(module, query, key, value, attention_mask, *args, **kwargs):
        bs = query.shape[0]
        if bs not in by_batch:
            by_batch[bs] = UlyssesSPAttentionHF(
                attn=_core(kernel, name), batch_size=bs, attn_head_count=cfg.num_attention_heads,
                attn_head_size=head_dim, kv_head_count=cfg.num_key_value_heads,
                num_hidden_layers=cfg.num_hidden_layers, process_group=sp.group,
                seq_length_is_variable=True)
        return by_batch[bs](module, query, key, value, None, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[name] = ulysses

    def undo() -> None:
        if had:
            ALL_ATTENTION_FUNCTIONS[name] = before
        else:
            del ALL_ATTENTION_FUNCTIONS._local_mapping[name]
    return undo


# ------------------------------------------------------------------ tiled MLP
def mlp_shards(seq_len: int, hidden: int) -> int:
    """DeepSpeed's choice: chunks of about `hidden` tokens (the intermediates of one chunk are
    then about the size of the layer's weights)."""
    return max(1, math.ceil(seq_len / hidden))


def install_tiled_mlp(model: Any, shards: Optional[int] = None) -> int:
    """Every decoder layer's `mlp` runs through DeepSpeed's TiledMLP (forward in chunks without
    keeping intermediates, each chunk recomputed in the backward). Returns the layers patched."""
    import types

    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def tiled(self, x):
        n = shards or mlp_shards(x.shape[-2], x.shape[-1])
        params = [p for p in self.parameters() if p.requires_grad]
        return TiledMLP.apply(lambda mod, h: mod._untiled_forward(h), self, x, n, params)

    count = 0
    for mod in model.modules():
        if hasattr(mod, "mlp") and isinstance(mod.mlp, __import__("torch").nn.Module):
            mlp = mod.mlp
            if not hasattr(mlp, "_untiled_forward"):
                mlp._untiled_forward = mlp.forward
                mlp.forward = types.MethodType(tiled, mlp)
                count += 1
    return count


# ------------------------------------------------------------------ the loss
def _tiled_loss_class() -> Any:
    import torch

    class TiledLoss(torch.autograd.Function):
        """sum over tokens of cross_entropy(lm_head(h), y) / denom, in `chunks` chunks of tokens:
        the forward keeps no logits; the backward recomputes one chunk's logits at a time and
        hands its gradient on (to lm_head's weight and to h), scaled by the incoming gradient."""

        @staticmethod
        def forward(ctx, head, h, y, chunks, denom):
            ctx.head, ctx.chunks, ctx.denom = head, chunks, denom
            ctx.save_for_backward(h, y)
            flat_h, flat_y = h.reshape(-1, h.shape[-1]), y.reshape(-1)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            with torch.no_grad():
                for hc, yc in zip(flat_h.chunk(chunks), flat_y.chunk(chunks)):
                    total += _ce_sum(head(hc), yc)
            return total / denom

        @staticmethod
        def backward(ctx, grad):
            h, y = ctx.saved_tensors
            flat_h, flat_y = h.detach().reshape(-1, h.shape[-1]), y.reshape(-1)
            h_grad = torch.zeros_like(flat_h)
            params = [p for p in ctx.head.parameters() if p.requires_grad]
            pieces = list(zip(flat_h.chunk(ctx.chunks), flat_y.chunk(ctx.chunks)))
            at = 0
            for i, (hc, yc) in enumerate(pieces):
                for p in params:  # DeepSpeed ZeRO: reduce the weight's gradient after the last chunk
                    p.ds_grad_is_ready = i == len(pieces) - 1
                hc = hc.requires_grad_(h.requires_grad)
                with torch.enable_grad():
                    part = _ce_sum(ctx.head(hc), yc) / ctx.denom
                inputs = [hc] if h.requires_grad else []
                if inputs or params:
                    torch.autograd.backward(part, grad)
                if h.requires_grad:
                    h_grad[at:at + hc.shape[0]] = hc.grad
                at += hc.shape[0]
            return None, (h_grad.view_as(h) if h.requires_grad else None), None, None, None

    return TiledLoss


def _ce_sum(logits: Any, labels: Any) -> Any:
    import torch
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE,
                                             reduction="sum")


def loss_chunks(tokens: int, vocab: int, budget_elems: int = 1 << 24) -> int:
    """Chunks for the tiled loss: about `budget_elems` fp32 logits each (64 MiB)."""
    return max(1, math.ceil(tokens * vocab / budget_elems))


def head_loss(head: Any, hidden: Any, shift_labels: Any, denom: Any, tiled: bool,
              chunks: Optional[int] = None) -> Any:
    """sum of the token losses over `hidden`'s tokens / denom, whole or tiled."""
    if not tiled:
        return _ce_sum(head(hidden).reshape(-1, _out_features(head)), shift_labels.reshape(-1)) / denom
    n = chunks or loss_chunks(hidden.shape[0] * hidden.shape[1], _out_features(head))
    return _tiled_loss_class().apply(head, hidden, shift_labels, n, denom)


def _out_features(head: Any) -> int:
    return int(getattr(head, "out_features", 0) or head.weight.shape[0])


class HiddenStates:
    """Captures the decoder's last hidden states during `engine(...)` (a forward hook on the
    model's base), so the loss is computed here while DeepSpeed's forward runs as usual."""

    def __init__(self, model: Any):
        self.value = None
        self.handle = model.get_decoder().register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self.value = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def take(self) -> Any:
        value, self.value = self.value, None
        return value


def micro_loss(engine: Any, hidden: HiddenStates, batch: dict, sp: SeqPar, tiled: bool,
               offload: bool = False) -> tuple[Any, Any, float]:
    """Forward one micro batch (from `sp_collate`) and compute its loss here. Returns (the loss
    to backpropagate on this rank, the micro batch's mean token loss for the log (the same on
    every rank of the group), labelled tokens of the whole sequence)."""
    import torch

    from launcher.rank import collectives

    labels = batch["shift_labels"]
    count = (labels != IGNORE).sum().float()
    if sp.on:
        collectives.all_reduce_(count, group=sp.group)
    denom = count.clamp(min=1.0)
    ctx = (torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
           if offload else contextlib.nullcontext())
    with ctx:
        engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
               logits_to_keep=1, use_cache=False)
    h = hidden.take()
    head = getattr(engine, "module", engine).get_output_embeddings()
    loss = head_loss(head, h, labels, denom, tiled)
    shown = loss.detach().clone()
    if sp.on:
        collectives.all_reduce_(shown, group=sp.group)
    return loss, shown, float(count)


# ------------------------------------------------------------------ setup
def mpu_for(sp: SeqPar) -> Any:
    """What `deepspeed.initialize(mpu=...)` gets: DeepSpeed's `parallel_state_sp` functions, plus
    the model-parallel rank and size its checkpoint code asks every mpu for (0 and 1: the
    weights are whole on every rank)."""
    import types
    if not sp.on:
        return None
    names = {k: getattr(sp.mpu, k) for k in dir(sp.mpu) if k.startswith(("get_", "initialize_"))}
    names.setdefault("get_model_parallel_rank", lambda: 0)
    names.setdefault("get_model_parallel_world_size", lambda: 1)
    return types.SimpleNamespace(**names)


def prepare_model(model: Any, cfg: Any, sp: SeqPar) -> Optional[HiddenStates]:
    """Install what the run file asks for on a loaded model (before deepspeed.initialize):
    the sequence-parallel attention, the tiled MLP, and the hook the loss reads the hidden states
    from (when the loss is computed here). Returns that hook, or None."""
    if sp.on:
        install_attention(model, sp)
    if cfg.train.tiled_mlp:
        install_tiled_mlp(model)
    return HiddenStates(model) if active(cfg) else None
