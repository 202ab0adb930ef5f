"""What to change when a plan does not fit: every change, and every combination, that fits,
ranked by what it costs (speed, then quality and precision), the cheapest first.

Each candidate is the run config with one change (`dataclasses.replace`), planned again with the
same formulas through the `replan` callable the planner passes in (so this module never imports
the planner). Costs (`COSTS`, smaller is cheaper; a combination costs the sum of its parts):

    expandable segments (allocator)   0   PYTORCH_CUDA_ALLOC_CONF in cluster.env: less slack
    flash_attention_2 (packed rows)   1   no (b,1,s,s) mask, k/v kept at the kv heads
    ZeRO-2 (from 0/1)                 1   partitions gradients; same traffic as data parallel
    DPO/IPO reference: adapters off   1   LoRA runs: the base under the adapters, no copy
    DPO/IPO reference: precomputed    2   one forward pass before training, no copy
    8-bit AdamW (bitsandbytes)        2   8-bit optimizer state; matches 32-bit Adam in practice
    paged 8-bit AdamW                 3   + state paged to CPU memory under pressure (GPU only)
    gradient checkpointing            4   recomputes each block's forward: about +30% compute
    ZeRO-3                            5   gathers weights in every forward and backward: +50% traffic
    half the micro batch              6   same global batch, smaller kernels
    more nodes (x2)                   7   more hardware, same run
    optimizer offload to CPU          8   the Adam step on the CPU: often 2x slower steps
    SimPO instead of DPO/IPO         11   reference-free: changes what is learned
    half the sequence length          9   changes the data: shorter training sequences
    parameter offload (ZeRO-3)       10   weights cross PCIe in every forward and backward
    8-bit frozen base                12   int8 matmuls for the frozen part (quality)
    LoRA (r=8)                       14   trains adapters only: changes what is learned
    LoRA on a 4-bit base (QLoRA)     16   + 4-bit base weights

A change is advised when the plan with it fits with at least MARGIN (1%) of the GPU's memory
left. Singles, pairs and triples are tried in order of cost (at most MAX_PLANS plans); a
combination that contains a fitting smaller one is not listed. A free change (cost 0) is tried
alone only, and a change validate refuses on its own (flash attention without its package) not
at all.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterator

from launcher.config.schema import RunConfig
from launcher.config.errors import ConfigError
from launcher.model.device import job_device
from launcher.memory.terms import ALLOC_CONF, EXPANDABLE, expandable_segments
from launcher.checks.validate import check

Change = tuple[str, int, str, Callable[[RunConfig], RunConfig]]  # name, cost, what it costs, fn
Replan = Callable[[RunConfig], Any]   # a changed config -> its Plan (ConfigError if it cannot)
MAX_SHOWN = 8
MAX_PLANS = 120
MARGIN = 0.01  # a change is advised only if it leaves 1% of the GPU's memory free: one that
               # "fits" with a few MB to spare fails on the first allocation the plan did not see
# changes of one kind replace each other: a combination takes at most one of each
GROUPS = {"cluster.env.PYTORCH_CUDA_ALLOC_CONF": "alloc",
          "model.attn_implementation": "attn", "deepspeed.zero_stage": "stage", "deepspeed.offload_param": "stage",
          "train.optimizer": "optimizer", "deepspeed.offload_optimizer": "optimizer",
          "freeze.policy": "freeze", "quantization.mode": "freeze",
          "train.reference": "reference", "train.objective": "reference"}


def _rep(obj: Any, **kw: Any) -> Any:
    return dataclasses.replace(obj, **kw)


def _ds(**kw: Any) -> Callable[[RunConfig], RunConfig]:
    def fn(c: RunConfig) -> RunConfig:
        kw2 = dict(kw)
        if "zero_stage" in kw2:
            kw2["zero_stage"] = max(kw2["zero_stage"], c.deepspeed.zero_stage)
        return _rep(c, deepspeed=_rep(c.deepspeed, **kw2))
    return fn


def _halve_micro(c: RunConfig) -> RunConfig:
    t = c.train
    accum = t.grad_accum * 2 if t.grad_accum else (None if t.global_batch_size else 2)
    return _rep(c, train=_rep(t, micro_batch_size=max(1, t.micro_batch_size // 2), grad_accum=accum))


def _lora(c: RunConfig) -> RunConfig:
    return _rep(c, freeze=_rep(c.freeze, policy="lora", train=[], freeze=[],
                               also_train=[g for g in c.freeze.also_train if g != "embeddings"]))


def _optim(name: str) -> Callable[[RunConfig], RunConfig]:
    return lambda c: _rep(c, train=_rep(c.train, optimizer=name))


def _env(name: str, value: str) -> Callable[[RunConfig], RunConfig]:
    return lambda c: _rep(c, cluster=_rep(c.cluster, env={**c.cluster.env, name: value}))


def _train(**kw: Any) -> Callable[[RunConfig], RunConfig]:
    return lambda c: _rep(c, train=_rep(c.train, **kw))


def _long_sequence(c: RunConfig) -> Iterator[Change]:
    """The long-sequence switches, where activations grow with the sequence."""
    t = c.train
    if not t.tiled_loss:
        yield ("train.tiled_loss: true", 1, "lm_head recomputed in chunks (no [tokens x vocab] "
               "logits)", _train(tiled_loss=True))
    if not t.tiled_mlp and c.deepspeed.zero_stage < 3:
        yield "train.tiled_mlp: true", 4, "each MLP recomputed in chunks", _train(tiled_mlp=True)
    if not t.activation_offload and job_device(c) == "cuda":
        yield ("train.activation_offload: true", 5, "activations cross PCIe; needs node memory",
               _train(activation_offload=True))
    n = 2 * t.sequence_parallel
    if job_device(c) == "cuda" and c.world_size % n == 0 and c.data.max_seq_len % n == 0:
        yield (f"train.sequence_parallel: {n}", 6, f"1/{n} of each sequence per GPU, an all-to-all "
               "per layer; data-parallel ranks / 2", _train(sequence_parallel=n))


def candidates(c: RunConfig) -> Iterator[Change]:
    ds, m, t, q, f = c.deepspeed, c.model, c.train, c.quantization, c.freeze
    gpu = job_device(c) == "cuda"
    if gpu and not expandable_segments(c.cluster.env):
        yield (f"cluster.env.{ALLOC_CONF}: {EXPANDABLE}", 0, "none (less allocator "
               "fragmentation)", _env(ALLOC_CONF, EXPANDABLE))
    if gpu and c.data.packing and m.attn_implementation != "flash_attention_2" and m.dtype != "fp32":
        yield ("model.attn_implementation: flash_attention_2", 1, "needs the flash_attn package "
               "on the nodes; packs without a (b,1,s,s) mask", lambda c: _rep(
                   c, model=_rep(c.model, attn_implementation="flash_attention_2")))
    if c.data.max_seq_len >= 4096:  # long sequences: activations (docs/long-sequences.md)
        yield from _long_sequence(c)
    if ds.zero_stage < 2:
        yield "deepspeed.zero_stage: 2", 1, "no slowdown to speak of", _ds(zero_stage=2)
    if t.optimizer == "adamw" and ds.offload_optimizer == "none":
        yield "train.optimizer: adamw_8bit", 2, "8-bit optimizer state", _optim("adamw_8bit")
        if gpu:
            yield ("train.optimizer: paged_adamw_8bit", 3, "8-bit state, paged to CPU under "
                   "pressure", _optim("paged_adamw_8bit"))
    if not m.gradient_checkpointing:
        yield ("model.gradient_checkpointing: true", 4, "about +30% compute",
               lambda c: _rep(c, model=_rep(c.model, gradient_checkpointing=True)))
    if ds.zero_stage < 3 and q.mode != "8bit":
        yield "deepspeed.zero_stage: 3", 5, "+50% communication", _ds(zero_stage=3)
    yield from _preference_changes(c)
    if t.micro_batch_size > 1:
        yield (f"train.micro_batch_size: {t.micro_batch_size // 2} (accumulation x2)", 6,
               "same batch, lower GPU efficiency", _halve_micro)
    if gpu:
        yield (f"cluster.nodes: {c.cluster.nodes * 2}", 7, "twice the hardware",
               lambda c: _rep(c, cluster=_rep(c.cluster, nodes=c.cluster.nodes * 2)))
    if ds.offload_optimizer == "none":
        yield ("deepspeed.offload_optimizer: cpu" + (" (zero_stage: 2)" if ds.zero_stage == 0 else ""),
               8, "optimizer step on the CPU, often 2x slower",
               lambda c: _rep(_ds(zero_stage=2 if c.deepspeed.zero_stage == 0 else 1,
                                  offload_optimizer="cpu")(c), train=_rep(c.train, optimizer="adamw")))
    if c.data.max_seq_len >= 1024:
        yield (f"data.max_seq_len: {c.data.max_seq_len // 2}", 9, "shorter training sequences",
               lambda c: _rep(c, data=_rep(c.data, max_seq_len=c.data.max_seq_len // 2)))
    if ds.offload_param == "none" and q.mode == "none":
        yield ("deepspeed.offload_param: cpu (zero_stage: 3)", 10, "weights cross PCIe every pass",
               _ds(zero_stage=3, offload_param="cpu"))
    if q.mode == "none" and f.policy != "full" and ds.zero_stage < 3:
        yield ("quantization.mode: 8bit", 12, "int8 matmuls for the frozen base",
               lambda c: _rep(c, quantization=_rep(c.quantization, mode="8bit")))
    if f.policy != "lora":
        yield "freeze.policy: lora", 14, "trains adapters only (r=8)", _lora
    if q.mode != "4bit":
        yield ("freeze.policy: lora + quantization.mode: 4bit", 16, "QLoRA: 4-bit base, adapters",
               lambda c: _rep(_lora(c), quantization=_rep(c.quantization, mode="4bit")))


def _preference_changes(c: RunConfig) -> Iterator[Change]:
    """DPO/IPO with a second model as the reference: the reference without the copy
    (adapters off under LoRA, log-probs precomputed before training), or an objective that
    needs none (SimPO)."""
    t = c.train
    if t.objective not in ("dpo", "ipo") or t.reference != "model":
        return
    ref = lambda kind: lambda c: _rep(c, train=_rep(c.train, reference=kind))  # noqa: E731
    if c.freeze.policy == "lora":
        yield ("train.reference: adapters_off", 1, "none: the base under the adapters, no "
               "second copy", ref("adapters_off"))
    yield ("train.reference: precomputed", 2, "one forward pass over the data before "
           "training, no second model", ref("precomputed"))
    yield ("train.objective: simpo", 11, "a reference-free objective: changes what is learned",
           lambda c: _rep(c, train=_rep(c.train, objective="simpo")))


def _try(replan: Replan, cfg: RunConfig) -> Any:
    if [p for p in check(cfg) if not p.key.startswith(("model.path", "data.", "cluster."))]:
        return None
    try:
        return replan(cfg)
    except (ConfigError, ValueError):
        return None


def _refused(cfg: RunConfig) -> bool:
    return any(p.key == "model.attn_implementation" for p in check(cfg))


def _entry(combo: tuple[Change, ...], p: Any) -> dict[str, Any]:
    return {"change": " + ".join(c[0] for c in combo), "cost": "; ".join(c[2] for c in combo),
            "rank": sum(c[1] for c in combo), "total_per_gpu": p.total_per_gpu,
            "node_cpu": p.node_cpu, "fits": True}


def advise(base: Any, replan: Replan) -> list[dict[str, Any]]:
    """Changes and combinations (up to three) that make `base` (a Plan that does not fit) fit,
    cheapest first: tried in order of cost, at most MAX_PLANS plans; a combination containing
    one that already fits is skipped.

    replan(cfg) plans a changed config on base's GPU and node memory (without advice)."""
    # a change validate refuses on its own (flash_attention_2 without the flash_attn package)
    # would only use up the budget of plans in every combination it joins
    changes = [c for c in candidates(base.cfg) if not _refused(c[3](base.cfg))]
    # a free change (cost 0: the allocator setting) is tried alone; in combinations it would
    # only double the plans tried (the note under the plan says when its margin matters)
    free = [(c,) for c in changes if c[1] == 0]
    changes = [c for c in changes if c[1] > 0]
    combos = free + [c for k in (1, 2, 3) for c in itertools.combinations(changes, k)]
    combos.sort(key=lambda combo: (sum(c[1] for c in combo), len(combo)))
    found: list[tuple[frozenset[str], dict[str, Any]]] = []
    tried = 0
    for combo in combos:
        names = frozenset(c[0] for c in combo)
        if len(found) >= MAX_SHOWN or tried >= MAX_PLANS:
            break
        groups = [GROUPS.get(c[0].split(":")[0]) for c in combo]
        if any(f <= names for f, _ in found) or len({g for g in groups if g}) < len([g for g in groups if g]):
            continue
        cfg = base.cfg
        for c in combo:
            cfg = c[3](cfg)
        tried += 1
        p = _try(replan, cfg)
        if p is not None and p.fits and p.headroom >= MARGIN * p.gpu_memory:
            found.append((names, _entry(combo, p)))
    return [e for _, e in found]
