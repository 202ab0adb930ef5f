"""The text of a memory plan (`ftlaunch plan`, `run --dry-run`, plan.txt), with --explain."""
from __future__ import annotations

from typing import Any

from launcher.memory.terms import MOMENT_NAMES, Term, gib


def _explain(t: Term) -> str:
    return f"      = {t.formula}\n        source: {t.source}"


def render(p: Any, explain: bool = False) -> str:
    inv, c = p.inv, p.cfg
    sh = inv.shape
    lines = [f"model {sh.model_type}: {sh.layers} blocks, hidden {sh.hidden}, {sh.heads} heads "
             f"({sh.kv_heads} kv), MLP {sh.intermediate}, vocab {sh.vocab}"
             f"{', tied embeddings' if sh.tied else ''}",
             f"parameters {inv.total:,}: trainable {inv.trainable:,}, frozen {inv.frozen:,}, "
             f"quantized {inv.quantized:,} ({c.freeze.policy}, {c.quantization.mode}, {c.model.dtype})"]
    head = f"  {'group':<11}{'trainable':>14}{'frozen':>14}{'quantized':>14}{'bytes':>12}"
    lines.append(head)
    for g in inv.groups():
        nbytes = g["trainable_bytes"] + g["frozen_bytes"] + g["quantized_bytes"]
        lines.append(f"  {g['group']:<11}{g['trainable']:>14,}{g['frozen']:>14,}{g['quantized']:>14,}"
                     f"{gib(nbytes):>12}")
    unit = "GPU" if p.device == "cuda" else "CPU rank"
    lines.append(f"per {unit} (ZeRO-{c.deepspeed.zero_stage}, {p.world_size} ranks, micro batch "
                 f"{c.train.micro_batch_size} x {c.data.max_seq_len} tokens):")
    if explain:
        lines.append(f"  symbols: N={p.world_size} ranks, lp={inv.lp_bytes} B, P={inv.total:,}, "
                     f"T={inv.trainable:,}, b={c.train.micro_batch_size}, s={c.data.max_seq_len}, "
                     f"h={sh.hidden}, a={sh.heads}, kv={sh.kv_heads}, d={sh.head_dim}, "
                     f"i={sh.intermediate}, V={sh.vocab}, L={sh.layers}")
    lines.append(f"  {'':<38}{'bytes':>12}  alive at")
    for t in p.terms:
        when = ("throughout" if t.phase == "static" else "" if t.phase == "overhead" else
                ", ".join(MOMENT_NAMES[m] for m in t.phase.split()))
        lines.append(f"  {t.label:<38}{gib(t.bytes):>12}  {when}".rstrip())
        if explain:
            lines.append(_explain(t))
    lines.append(f"  {'tensor peak (max_memory_allocated)':<38}{gib(p.peak_allocated):>12}  at the "
                 f"{MOMENT_NAMES[p.worst_moment]}")
    lines.append(f"  {'total':<38}{gib(p.total_per_gpu):>12}")
    lines.append(f"  {'headroom':<38}{gib(p.headroom):>12}  of {gib(p.gpu_memory)} "
                 f"({p.gpu_memory_source})")
    if p.node_terms:
        lines.append("per node (CPU memory):")
        for t in p.node_terms:
            lines.append(f"  {t.label:<38}{gib(t.bytes):>12}")
            if explain:
                lines.append(_explain(t))
    for n in p.notes:
        lines.append(f"note: {n}")
    verdict = "fits" if p.fits else "does NOT fit"
    lines.append(f"verdict: {verdict} in {gib(p.gpu_memory)} per {unit}")
    if not p.fits:
        if p.advice:
            lines.append("cheapest changes that fit (least slowdown first):")
            for a in p.advice:
                lines.append(f"  {a['change']:<52}{gib(a['total_per_gpu']):>12}  ({a['cost']})")
        else:
            lines.append("no single change or combination tried fits: more GPUs, or a smaller model")
    return "\n".join(lines) + "\n"
