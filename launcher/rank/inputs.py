"""What a rank reads before its model: the tokenizer and the data (rank half: transformers, datasets).

    tok = load_tokenizer(cfg)            # every rank, in launcher.rank.train.setup
    splits = load_data(cfg, tok)         # every rank, same result
    check_data(cfg)                      # `ftlaunch run`, before any rank starts:
    python -m launcher.rank.inputs RUN.yaml [key=value ...] [--rows-to FILE]   # (a child process;
                                         # exit 0 or 2; FILE: {"train": training sequences})

`check_data` is how `ftlaunch run` makes bad data fail in seconds, before it starts ranks: it
reads the tokenizer and the data exactly as the ranks will, in a child process (`main`), and
prints the same ConfigError they would.
"""
from __future__ import annotations

import os
from typing import Any

from launcher import data
from launcher.cluster import layout
from launcher.model import info as model_info
from launcher.config.schema import RunConfig
from launcher.config.errors import ConfigError, Problem
from launcher.common.log import get_logger

log = get_logger(__name__)


def load_tokenizer(cfg: RunConfig) -> Any:
    """The tokenizer (model.tokenizer or the model folder); no pad token -> EOS, with a warning."""
    from transformers import AutoTokenizer
    path = cfg.model.tokenizer or cfg.model.path
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError([Problem("model.tokenizer" if cfg.model.tokenizer else "model.path",
                                   f"cannot load a tokenizer from {path}: {exc}",
                                   "point model.tokenizer at a folder saved with save_pretrained")]
                          ) from exc
    from launcher.model import tokens
    tokens.apply_to_tokenizer(tok, cfg)  # model.pad_token / special_tokens / add_tokens
    if tok.pad_token is None and tok.eos_token is not None:
        log.warning("the tokenizer has no pad token; using its EOS token "
                    f"{tok.eos_token!r} (padding is masked out of attention and loss)")
        tok.pad_token = tok.eos_token
    return tok


def load_data(cfg: RunConfig, tokenizer: Any) -> data.Splits:
    """The training (and eval) examples, checked against the model's positions; tokenized once
    per node and cached (launcher/data/cache.py)."""
    splits = data.cached_load(cfg, tokenizer,
                              max_positions=model_info.folder_max_positions(cfg.model.path))
    if cfg.train.objective != "sft":
        from launcher.data.pairs import as_pairs
        splits = as_pairs(splits)  # 2n sequences seen as n pairs
    return splits


def known_data(cfg: RunConfig) -> data.Splits | None:
    """What the tokenized cache already holds for these data files, tokenizer files and
    settings, found without loading the tokenizer (launcher/data/cache.py `known`): the same
    splits `load_data` would give, None where the cache has no such entry."""
    from launcher.data import cache
    splits = cache.known(cfg, max_positions=model_info.folder_max_positions(cfg.model.path))
    if splits is not None and cfg.train.objective != "sft":
        from launcher.data.pairs import as_pairs
        splits = as_pairs(splits)
    return splits


def check_data(cfg: RunConfig) -> data.Splits:
    """Load the tokenizer and the data once, as the ranks will (or find them in the tokenized
    cache unchanged: `known_data`), and print what was found: a problem stops `ftlaunch run`
    before any rank starts."""
    splits = known_data(cfg)
    if splits is not None:
        from launcher.data.reading import print_warning
        for w in splits.warnings:   # what cached_load prints on a cache hit
            print_warning(w)
    else:
        splits = load_data(cfg, load_tokenizer(cfg))
    print(f"data: {splits.stats.get('train_examples')} training sequences, "
          f"{splits.stats.get('train_tokens')} tokens"
          + (f"; {splits.stats.get('eval_examples')} eval sequences" if splits.eval is not None else "")
          + "".join(f"; {os.path.basename(s['path'])}: {s['share']:.1%} of the draws"
                    for s in splits.stats.get("sources", []) if "share" in s),
          flush=True)
    return splits


def main(argv: list[str]) -> int:
    """`python -m launcher.rank.inputs RUN.yaml [key=value ...] [--rows-to FILE]`: check_data;
    2 on a problem. FILE gets the training sequences counted ({"train": n}), from which
    `ftlaunch run` counts an epoch run's steps."""
    import json
    import sys

    from launcher.common.files import write_atomic
    from launcher.config.runfile import load
    rows_to = None
    if "--rows-to" in argv:
        i = argv.index("--rows-to")
        rows_to, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    try:
        cfg = load(argv[0], argv[1:])
        splits = check_data(cfg)
        if cfg.train.epochs is not None:  # the steps an epoch run will take, counted exactly
            from launcher.config.epochs import describe
            print(describe(cfg, len(splits.train), cfg.world_size), flush=True)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr, flush=True)
        return layout.EXIT_CONFIG
    if rows_to:
        write_atomic(rows_to, json.dumps({"train": len(splits.train)}) + "\n")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
