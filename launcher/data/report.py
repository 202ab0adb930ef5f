"""`ftlaunch data RUN.yaml [--show N] [--json]`: what the model will learn, before a GPU is paid.

Loads the tokenizer and the data exactly as the ranks will (the cache included) and prints:
examples, tokens, tokens trained on, truncated and dropped examples, a length histogram, each
source's share of the draws; `--show N` prints N training sequences with the trained part marked
(green on a terminal, [[...]] otherwise).
"""
from __future__ import annotations

import json
import sys
from typing import Any
from dataclasses import dataclass

from launcher.data.tokenize import IGNORE, Tokens


def histogram(tokens: Tokens, bins: int = 8) -> list[dict[str, int]]:
    """Sequence lengths in `bins` equal-width buckets: [{"from", "to", "count"}]."""
    import numpy as np

    lengths = np.diff(tokens.offsets)
    if not len(lengths):
        return []
    top = int(lengths.max())
    edges = np.linspace(0, top, bins + 1).round().astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    return [{"from": int(edges[i]) + (1 if i else 0), "to": int(edges[i + 1]),
             "count": int(c)} for i, c in enumerate(counts)]


def summary(splits) -> dict[str, Any]:
    s = splits.stats
    train = getattr(splits.train, "tokens", splits.train)  # preference pairs: both sides
    info = {"examples": s.get("train_examples"), "tokens": s.get("train_tokens"),
            "trained_tokens": s.get("train_loss_tokens"), "truncated": s.get("truncated", 0),
            "dropped": s.get("dropped", 0), "eval_examples": s.get("eval_examples", 0),
            "packing_fill": s.get("packing_fill"), "lengths": histogram(train),
            "sources": s.get("sources", []), "warnings": splits.warnings,
            "cache": s.get("cache_dir")}
    if train is not splits.train:
        info["pairs"] = pair_summary(train)
    return info


def pair_summary(t: Tokens) -> dict[str, Any]:
    """Preference pairs (chosen at 2i, rejected at 2i+1): tokens and trained tokens per side."""
    import numpy as np

    lengths = np.diff(t.offsets)
    trained = np.add.reduceat((np.asarray(t.labels) != IGNORE).astype(np.int64),
                              t.offsets[:-1]) if len(lengths) else lengths
    side = lambda a, k: round(float(a[k::2].mean()), 1) if len(a) else 0.0  # noqa: E731
    return {"count": len(lengths) // 2, "chosen_mean_tokens": side(lengths, 0),
            "rejected_mean_tokens": side(lengths, 1), "chosen_mean_trained": side(trained, 0),
            "rejected_mean_trained": side(trained, 1), "longest": int(lengths.max(initial=0))}


def marked(tokenizer, ids: list[int], labels: list[int], colour: bool) -> str:
    """The sequence decoded, its trained runs marked."""
    out, run, trained = [], [], None
    for t, lab in list(zip(ids, labels)) + [(None, None)]:
        now = lab is not None and lab != IGNORE
        if t is None or (trained is not None and now != trained):
            text = tokenizer.decode(run)
            if trained:
                text = f"\033[1;32m{text}\033[0m" if colour else f"[[{text}]]"
            out.append(text)
            run = []
        if t is not None:
            run.append(t)
            trained = now
    return "".join(out)


def render(info: dict[str, Any]) -> str:
    lines = [f"examples: {info['examples']} training sequences"
             + (f" ({info['eval_examples']} eval)" if info["eval_examples"] else ""),
             f"tokens: {info['tokens']}, trained on: {info['trained_tokens']} "
             f"({100 * info['trained_tokens'] / max(1, info['tokens']):.1f}%)",
             f"truncated: {info['truncated']}, dropped: {info['dropped']}"]
    if info.get("pairs"):
        p = info["pairs"]
        lines.append(f"pairs: {p['count']}; mean tokens chosen {p['chosen_mean_tokens']} "
                     f"(trained {p['chosen_mean_trained']}), rejected {p['rejected_mean_tokens']} "
                     f"(trained {p['rejected_mean_trained']}); longest {p['longest']}")
    if info["packing_fill"] is not None:
        lines.append(f"packed rows filled to {100 * info['packing_fill']:.1f}%")
    lines.append("lengths:")
    peak = max([b["count"] for b in info["lengths"]] or [1])
    for b in info["lengths"]:
        bar = "#" * round(30 * b["count"] / max(1, peak))
        lines.append(f"  {b['from']:>6}-{b['to']:<6} {b['count']:>8} {bar}")
    for s in info["sources"]:
        share = f", drawn {100 * s['share']:.1f}%" if "share" in s else ""
        lines.append(f"source {s['path']}: {s['examples']} examples, weight {s['weight']:g}{share}")
    lines += [f"warning: {w}" for w in info["warnings"]]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class DataCall:
    """What `ftlaunch data` was asked: the run file and overrides, examples to show, JSON output."""
    run_file: str
    overrides: tuple[str, ...] = ()
    show: int = 0
    json: bool = False


def main(call: DataCall) -> int:
    from launcher.rank import inputs
    from launcher.config.runfile import load

    cfg = load(call.run_file, call.overrides, inputs=True)
    tok = inputs.load_tokenizer(cfg)
    splits = inputs.load_data(cfg, tok)
    info = summary(splits)
    n = max(0, min(call.show or 0, len(splits.train)))
    shown = [splits.train[i] for i in range(n)]
    if "pairs" in info:
        return _show_pairs(tok, info, shown, call.json)
    if call.json:
        info["shown"] = [marked(tok, e["input_ids"], e["labels"], False) for e in shown]
        print(json.dumps(info, indent=1))
        return 0
    sys.stdout.write(render(info))
    colour = sys.stdout.isatty()
    for i, e in enumerate(shown):
        print(f"--- example {i} ({len(e['input_ids'])} tokens; trained part "
              f"{'in green' if colour else 'in [[ ]]'})")
        print(marked(tok, e["input_ids"], e["labels"], colour))
    return 0


def _show_pairs(tok, info: dict[str, Any], shown: list[dict], as_json: bool) -> int:
    """`ftlaunch data` of preference pairs: both sides of each shown pair, answers marked."""
    if as_json:
        info["shown"] = [{side: marked(tok, e[side]["input_ids"], e[side]["labels"], False)
                          for side in ("chosen", "rejected")} for e in shown]
        print(json.dumps(info, indent=1))
        return 0
    sys.stdout.write(render(info))
    colour = sys.stdout.isatty()
    for i, e in enumerate(shown):
        for side in ("chosen", "rejected"):
            ex = e[side]
            n_trained = sum(1 for x in ex["labels"] if x != IGNORE)
            print(f"--- pair {i} {side} ({len(ex['input_ids'])} tokens, {n_trained} trained; "
                  f"trained part {'in green' if colour else 'in [[ ]]'})")
            print(marked(tok, ex["input_ids"], ex["labels"], colour))
    return 0
