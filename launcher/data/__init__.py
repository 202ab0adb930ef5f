"""Training data: read with `datasets`, tokenise, mask, truncate or pack, split; sample; collate.

    splits = data.load(cfg, tokenizer, max_positions=4096)   # every rank calls it, same result
    sampler = data.Sampler(len(splits.train), rank=r, world_size=w, micro_batch_size=4, seed=s)
    for idx in sampler:
        batch = data.collate([splits.train[i] for i in idx], pad_id)

The stages, one module each:

    reading.py    files and formats -> the texts (and prompts) of the usable rows; eval split
    tokenize.py   tokenizer applied; labels masked on the prompt; truncation; the pad id
    batching.py   packing into rows of max_seq_len; the distributed Sampler; collate

Eval. `data.eval_path` (same format rules) or `data.eval_fraction` of the records, held out by a
permutation seeded with `train.seed` (identical on every rank; the rest stays in file order).

Errors. Every problem is a `ConfigError` (source "data") with the key (data.path,
data.text_field, ...), what is wrong and how to fix it - raised on every rank before training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from launcher.data.batching import Sampler, collate, pack
from launcher.data.reading import Records, fail, print_warning, records, split_eval, subset
from launcher.data.tokenize import IGNORE, Tokens, tokenize_records, tokenizer_pad_id

if TYPE_CHECKING:  # pragma: no cover
    from launcher.config import RunConfig

__all__ = ["IGNORE", "Sampler", "Splits", "Tokens", "collate", "load", "tokenizer_pad_id"]


@dataclass
class Splits:
    """What `load` returns: train and eval (None without eval data) examples, plus what happened."""

    train: Tokens
    eval: Tokens | None
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def _tokens(cfg: "RunConfig", tokenizer, rec: Records, key: str, split: str,
            warnings: list[str]) -> Tokens:
    """The records as training rows: tokenised, masked, then cut (or packed) to max_seq_len."""
    tokens = tokenize_records(cfg, tokenizer, rec, key, split, warnings)
    if cfg.data.packing:
        tokens = pack(tokens, cfg.data.max_seq_len, key, split, warnings)
    if tokens.num_loss_tokens == 0:
        what = "train" if split == "train" else "eval"
        raise fail(key, f"the {what} examples have no token to compute a loss on",
                   "check data.response_field and data.max_seq_len")
    return tokens


def load(cfg: "RunConfig", tokenizer, *, max_positions: int | None = None,
         warn: Callable[[str], None] = print_warning) -> Splits:
    """Read, clean, tokenise, mask and cut (or pack) the training data and the eval data.
    Identical on every rank. Raises ConfigError (source "data") for anything wrong with it;
    warnings (dropped rows, truncation) go to `warn` (stderr on rank 0) and Splits.warnings."""
    d = cfg.data
    if max_positions is not None and d.max_seq_len > max_positions:
        raise fail("data.max_seq_len", f"{d.max_seq_len} exceeds the model's {max_positions} "
                   "positions", f"use data.max_seq_len <= {max_positions}")
    if (d.prompt_field is None) != (d.response_field is None):
        raise fail("data.response_field" if d.response_field is None else "data.prompt_field",
                   "prompt_field and response_field go together",
                   "set both, or neither for plain text")
    warnings: list[str] = []
    if d.packing and not d.add_eos:
        warnings.append("data.packing without data.add_eos: packed documents run together with "
                        "no EOS between them")
    rec = records(cfg, d.path, "data.path", warnings)
    if d.max_samples is not None and len(rec.texts) > d.max_samples:  # the first N usable rows
        rec = subset(rec, list(range(d.max_samples)))
    ev_rec = None
    if d.eval_path:
        ev_rec = records(cfg, d.eval_path, "data.eval_path", warnings)
    elif d.eval_fraction > 0:
        rec, ev_rec = split_eval(rec, d.eval_fraction, cfg.train.seed)
    train = _tokens(cfg, tokenizer, rec, "data.path", "train", warnings)
    ev = None
    if ev_rec is not None:
        ev = _tokens(cfg, tokenizer, ev_rec,
                     "data.eval_path" if d.eval_path else "data.eval_fraction", "eval", warnings)
    for w in warnings:
        warn(w)
    stats = {"train_examples": len(train), "train_tokens": train.num_tokens,
             "train_loss_tokens": train.num_loss_tokens,
             "eval_examples": len(ev) if ev is not None else 0,
             "eval_tokens": ev.num_tokens if ev is not None else 0}
    return Splits(train=train, eval=ev, warnings=warnings, stats=stats)
