"""Preference objectives in the memory plan: two sequences per pair (the chosen and the
rejected answer share one forward pass, 2 x micro_batch_size rows), and DPO/IPO's reference
model: a second frozen copy of the base in the training dtype (quantized as the policy's base;
partitioned over the ranks under ZeRO-3, no gradients, masters or optimizer state), nothing
for adapters_off (the policy's own base) and precomputed (host memory: 16 B a pair), nothing
for the reference-free SimPO and ORPO."""
from __future__ import annotations

from typing import Any

from launcher.config.schema import RunConfig
from launcher.memory.terms import Term


def sequences_per_micro_batch(cfg: RunConfig) -> int:
    """Rows of one forward pass: micro_batch_size, twice that for preference pairs."""
    return cfg.train.micro_batch_size * (1 if cfg.train.objective == "sft" else 2)


def reference_bytes(r: Any) -> tuple[int, str]:
    """One rank's bytes of the reference copy and how they are counted."""
    inv, cfg = r.inv, r.cfg
    base = sum(p.nbytes for p in inv.params
               if p.group != "adapters" and not p.name.endswith("(trained copy)"))
    total = base + inv.buffer_bytes
    if r.stage == 3 and cfg.quantization.mode == "none":
        return (-(-base // r.world) + inv.buffer_bytes,
                f"base parameters {base:,} B / {r.world} ranks (ZeRO-3 partitions, an "
                "inference engine: no optimizer) + buffers")
    return total, "the base's parameters as stored (lp, quantized as the policy's) + buffers"


def reference_terms(r: Any) -> list[Term]:
    t = r.cfg.train
    if t.objective not in ("dpo", "ipo") or t.reference != "model":
        return []
    n, formula = reference_bytes(r)
    return [Term("reference", "reference model (frozen copy)", int(n), "static", formula,
                 "launcher/rank/preference.py build_model_reference; TRL prepare_deepspeed")]
