"""Training data: read with `datasets`, tokenise, mask, truncate or pack, split; sample; collate.

    splits = data.load(cfg, tokenizer, max_positions=4096)   # every rank calls it, same result
    sampler = data.Sampler(len(splits.train), rank=r, world_size=w, micro_batch_size=4, seed=s)
    for idx in sampler:
        batch = data.collate([splits.train[i] for i in idx], pad_id)

The stages, one module each:

    reading.py    files and formats -> the texts (prompts, conversations) of the usable rows;
                  bad rows counted against data.max_bad_rows; eval split
    chat.py       conversations rendered with the chat template, cut into trained segments
    tokenize.py   tokenizer applied; labels masked on the prompt (assistant turns); truncation
    batching.py   neat packing into rows of max_seq_len; the distributed Sampler; collate
    mixing.py     data.mix: sources drawn by weight, deterministic for (seed, epoch)
    cache.py      tokenized data kept on disk, built once per node

Eval. `data.eval_path` (same format rules) or `data.eval_fraction` of the records, held out by a
permutation seeded with `train.seed` (identical on every rank; the rest stays in file order).

Errors. Every problem is a `ConfigError` (source "data") with the key (data.path,
data.text_field, ...), what is wrong and how to fix it - raised on every rank before training.
"""
from __future__ import annotations

from launcher.data.batching import (Sampler, collate, model_batch, model_collate,
                                     num_tokens, pack)
from launcher.data.cache import cached_load
from launcher.data.loading import Splits, load
from launcher.data.mixing import Mixture
from launcher.data.tokenize import IGNORE, Tokens, tokenizer_pad_id

__all__ = ["IGNORE", "Mixture", "Sampler", "Splits", "Tokens", "cached_load", "collate", "load",
           "model_batch", "model_collate", "num_tokens", "pack", "tokenizer_pad_id"]
