"""The text of a memory plan (`ftlaunch plan`, `run --dry-run`, plan.txt), with --explain.

Tables are laid out from their content: each column as wide as its widest cell, columns two
spaces apart, so 12-digit parameter counts and long labels never run together.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

from launcher.memory.terms import MOMENT_NAMES, Term, gib

Row = tuple[str, ...]
GAP = "  "


def table(items: Sequence[Union[Row, str]], right: Sequence[int] = ()) -> list[str]:
    """Rows (tuples of cells) in aligned columns, indented by two spaces; the columns numbered in
    `right` right-aligned. Strings among the items are lines kept as they are (they do not
    widen the columns)."""
    rows = [it for it in items if isinstance(it, tuple)]
    widths = [max((len(r[c]) for r in rows if c < len(r)), default=0)
              for c in range(max((len(r) for r in rows), default=0))]
    out = []
    for it in items:
        if isinstance(it, str):
            out.append(it)
            continue
        cells = [cell.rjust(w) if c in right else cell.ljust(w)
                 for c, (cell, w) in enumerate(zip(it, widths))]
        out.append((GAP + GAP.join(cells)).rstrip())
    return out


def _explain(t: Term) -> str:
    return f"      = {t.formula}\n        source: {t.source}"


def _groups(inv: Any) -> list[str]:
    rows: list[Row] = [("group", "trainable", "frozen", "quantized", "bytes")]
    for g in inv.groups():
        nbytes = g["trainable_bytes"] + g["frozen_bytes"] + g["quantized_bytes"]
        rows.append((g["group"], f"{g['trainable']:,}", f"{g['frozen']:,}", f"{g['quantized']:,}",
                     gib(nbytes)))
    return table(rows, right=(1, 2, 3, 4))


def _alive(t: Term) -> str:
    if t.phase == "static":
        return "throughout"
    if t.phase == "overhead":
        return ""
    return ", ".join(MOMENT_NAMES[m] for m in t.phase.split())


def _per_rank(p: Any, explain: bool) -> list[str]:
    """The per-rank terms, the tensor peak, total and headroom."""
    items: list[Union[Row, str]] = [("", "bytes", "alive at")]
    for t in p.terms:
        items.append((t.label, gib(t.bytes), _alive(t)))
        if explain:
            items.append(_explain(t))
    items += [("tensor peak (max_memory_allocated)", gib(p.peak_allocated),
               f"at the {MOMENT_NAMES[p.worst_moment]}"),
              *([("  + allocator slack (max_memory_reserved)", gib(p.peak_reserved),
                  "what the ranks' metrics log as memory_reserved_bytes")]
                if p.device == "cuda" else []),
              ("total", gib(p.total_per_gpu)),
              *([("  (range: a term is not measured)", gib(p.total_low),
                  f"to {gib(p.total_per_gpu)}; the verdict counts the upper end")]
                if p.total_low != p.total_per_gpu else []),
              *([("headroom", gib(p.headroom), f"of {gib(p.gpu_memory)} ({p.gpu_memory_source})")]
                if p.device == "cuda" else [])]
    return table(items, right=(1,))


def _per_node(p: Any, explain: bool) -> list[str]:
    if not p.node_terms:
        return []
    items: list[Union[Row, str]] = [("", "bytes", "while")]
    for t in p.node_terms:
        items.append((t.label, gib(t.bytes), " and ".join(
            {"load": "loading", "train": "training", "save": "final save"}[x]
            for x in t.phase.split())))
        if explain:
            items.append(_explain(t))
    items.append((f"node peak ({p.node_phase})", gib(p.node_cpu)))
    if p.node_memory is not None:
        items.append(("headroom", gib(p.node_memory - p.node_cpu),
                      f"of {gib(p.node_memory)} ({p.node_memory_source})"))
    ranks = max(1, min(p.cfg.cluster.gpus_per_node, p.world_size))
    return [f"per node (CPU memory, {ranks} rank{'s' if ranks > 1 else ''}):"] + table(items, right=(1,))


def _verdict(p: Any) -> list[str]:
    unit = "GPU" if p.device == "cuda" else "CPU rank"
    lines = []
    if p.device == "cuda":
        lines.append(f"verdict per GPU: {'fits' if p.fits_gpu else 'does NOT fit'} in "
                     f"{gib(p.gpu_memory)} per {unit}")
    if p.node_memory is None:
        known = ("cluster.mem 0 asks for all of the node's memory, whose size the login node "
                 "cannot know" if str(getattr(p, "node_memory_source", "")).startswith("cluster.mem 0")
                 else "node memory unknown")
        lines.append(f"verdict per node: {known}: pass --node-memory (or set cluster.mem to the "
                     f"size); this plan needs {gib(p.node_cpu)} of CPU memory per node")
    else:
        lines.append(f"verdict per node: {'fits' if p.fits_node else 'does NOT fit'}: needs "
                     f"{gib(p.node_cpu)} ({p.node_phase}) of {gib(p.node_memory)} "
                     f"({p.node_memory_source})")
    lines.append(f"verdict: {'fits' if p.fits else 'does NOT fit'}")
    return lines


def render(p: Any, explain: bool = False) -> str:
    inv, c = p.inv, p.cfg
    sh = inv.shape
    lines = [f"model {sh.model_type}: {sh.layers} blocks, hidden {sh.hidden}, {sh.heads} heads "
             f"({sh.kv_heads} kv), MLP {sh.intermediate}, vocab {sh.vocab}"
             f"{', tied embeddings' if sh.tied else ''}",
             f"parameters {inv.total:,}: trainable {inv.trainable:,}, frozen {inv.frozen:,}, "
             f"quantized {inv.quantized:,} ({c.freeze.policy}, {c.quantization.mode}, {c.model.dtype})"]
    lines += _groups(inv)
    unit = "GPU" if p.device == "cuda" else "CPU rank"
    lines.append(f"per {unit} (ZeRO-{c.deepspeed.zero_stage}, {p.world_size} ranks, micro batch "
                 f"{c.train.micro_batch_size} x {c.data.max_seq_len} tokens):")
    if explain:
        lines.append(f"  symbols: N={p.world_size} ranks, lp={inv.lp_bytes} B, P={inv.total:,}, "
                     f"T={inv.trainable:,}, b={c.train.micro_batch_size}, s={c.data.max_seq_len}, "
                     f"h={sh.hidden}, a={sh.heads}, kv={sh.kv_heads}, d={sh.head_dim}, "
                     f"i={sh.intermediate}, V={sh.vocab}, L={sh.layers}")
    lines += _per_rank(p, explain) + _per_node(p, explain)
    for n in p.notes:
        lines.append(f"note: {n}")
    lines += _verdict(p)
    if not p.fits:
        if p.advice:
            lines.append("changes that fit, cheapest first (per GPU, per node, what it costs):")
            lines += table([(a["change"], gib(a["total_per_gpu"]), gib(a["node_cpu"]),
                             f"({a['cost']})") for a in p.advice], right=(1, 2))
        else:
            lines.append("no change or combination tried fits: more GPUs, more node memory, or a smaller model")
    return "\n".join(lines) + "\n"
