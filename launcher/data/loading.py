"""The whole data path of one run: every source read, tokenized, masked, cut or packed, the
eval split, the mixture over data.mix's sources, and the stats (`load` -> `Splits`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from launcher.data.batching import pack
from launcher.data.mixing import Mixture, concat
from launcher.checks.input_checks import source_settings
from launcher.data.reading import Records, fail, print_warning, records, split_eval, subset
from launcher.data.splits import Splits
from launcher.data.tokenize import Tokens, tokenize_records

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config.schema import DataConfig, RunConfig

def _tokens(cfg: "RunConfig", d: "DataConfig", tokenizer, rec: Records, key: str, split: str,
            warnings: list[str]) -> Tokens:
    """The records as training rows: tokenised, masked, cut to max_seq_len, packed if asked."""
    tokens = tokenize_records(cfg, tokenizer, rec, key, split, warnings, d)
    if cfg.data.packing:
        tokens = pack(tokens, cfg.data.max_seq_len, key, split, warnings)
    if tokens.num_loss_tokens == 0:
        what = "train" if split == "train" else "eval"
        raise fail(key, f"the {what} examples have no token to compute a loss on",
                   "check data.response_field, data.messages_field and data.max_seq_len")
    return tokens


def _check(cfg: "RunConfig", max_positions: int | None) -> None:
    d = cfg.data
    if max_positions is not None and d.max_seq_len > max_positions:
        raise fail("data.max_seq_len", f"{d.max_seq_len} exceeds the model's {max_positions} "
                   "positions", f"use data.max_seq_len <= {max_positions}")
    if (d.prompt_field is None) != (d.response_field is None):
        raise fail("data.response_field" if d.response_field is None else "data.prompt_field",
                   "prompt_field and response_field go together",
                   "set both, or neither for plain text")
    if (d.path is None) == (not d.mix):
        raise fail("data.path", "give data.path (one source) or data.mix (several), not "
                   + ("both" if d.path else "neither"), "set exactly one of them")


def load(cfg: "RunConfig", tokenizer, *, max_positions: int | None = None,
         warn: Callable[[str], None] = print_warning) -> Splits:
    """Read, clean, tokenise, mask and cut (or pack) the training data and the eval data, each
    source of data.mix on its own. Identical on every rank. Raises ConfigError (source "data")
    for anything wrong with it; warnings (dropped rows, truncation) go to `warn` (stderr on rank
    0) and Splits.warnings."""
    if cfg.train.objective != "sft":  # preference pairs (launcher/data/pairs.py)
        from launcher.data.pairs import load_pairs
        return load_pairs(cfg, tokenizer, max_positions=max_positions, warn=warn)
    d = cfg.data
    _check(cfg, max_positions)
    warnings: list[str] = []
    trains, evals, weights, sources = [], [], [], []
    for i, (ds, weight) in enumerate(source_settings(d)):
        key = f"data.mix[{i}].path" if d.mix else "data.path"
        rec = records(cfg, ds.path, key, warnings, ds)
        if d.max_samples is not None and len(rec) > d.max_samples:  # the first N usable rows
            rec = subset(rec, list(range(d.max_samples)))
        ev_rec = None
        if d.eval_fraction > 0 and not d.eval_path:
            rec, ev_rec = split_eval(rec, d.eval_fraction, cfg.train.seed)
        trains.append(_tokens(cfg, ds, tokenizer, rec, key, "train", warnings))
        if ev_rec is not None:
            evals.append(_tokens(cfg, ds, tokenizer, ev_rec, "data.eval_fraction", "eval", warnings))
        weights.append(weight)
        sources.append({"path": ds.path, "weight": weight, "rows": rec.rows,
                        "examples": len(trains[-1])})
    if d.eval_path:
        ev_d = source_settings(d)[0][0]
        evals = [_tokens(cfg, ev_d, tokenizer, records(cfg, d.eval_path, "data.eval_path",
                                                       warnings, ev_d),
                         "data.eval_path", "eval", warnings)]
    for w in warnings:
        warn(w)
    train = concat(trains)
    ev = concat(evals) if evals else None
    mixture = Mixture([len(t) for t in trains], weights) if d.mix else None
    if mixture is not None:
        drawn = mixture.shares(mixture.order(cfg.train.seed, 0, d.shuffle))
        for s, share in zip(sources, drawn):
            s["share"] = round(share, 4)
    stats = {"train_examples": len(train), "train_tokens": train.num_tokens,
             "train_loss_tokens": train.num_loss_tokens,
             "eval_examples": len(ev) if ev is not None else 0,
             "eval_tokens": ev.num_tokens if ev is not None else 0,
             "truncated": train.stats.get("truncated", 0), "dropped": train.stats.get("dropped", 0),
             "sources": sources}
    if d.packing:
        stats["packing_fill"] = round(train.num_tokens / max(1, len(train) * d.max_seq_len), 4)
    return Splits(train=train, eval=ev, warnings=warnings, stats=stats, mixture=mixture)

