"""Epochs, warmup ratio and "every epoch": step arithmetic over the data the ranks will see.

`train.epochs` replaces `train.max_steps` with a count of passes over the training sequences
(after tokenizing, truncation or packing). The ranks' sampler (`launcher.data.Sampler`) deals
`micro_batches_per_epoch` = max(1, n // (world x micro)) micro batches to every rank per epoch,
and a step takes `grad_accum` of them, so

    steps = max(1, ceil(epochs x micro_batches_per_epoch / grad_accum))

(the last step of an epoch may take micro batches of the next one, as the sampler runs on).
An epoch ends at step s when s x grad_accum micro batches first reach a multiple of
micro_batches_per_epoch: that is where `eval_every: epoch` and `checkpoint_every: epoch` act.
`warmup_ratio` gives ceil(ratio x steps) warmup steps, as the HF Trainer's `get_warmup_steps`.

The ranks count exactly (`resolve`, after tokenizing). The login node cannot tokenize (no
transformers there), so `planned_steps` gives `validate`, `ds-config` and `slurm` an estimate
from the data file (rows, or characters / 4 per token when packing). `ftlaunch run` counts
exactly before its ranks start (its data check reports the rows) and writes ds_config.json with
that count; the ranks count again in memory, and rank 0 records the count in RUN_DIR/steps.json
(a Slurm job's ds_config.json keeps the login node's estimate: nothing rewrites it).
Pure arithmetic, no torch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

from launcher.config.batch import batch_sizes
from launcher.config.data_files import format_of, open_text, parquet_rows
from launcher.config.schema import RunConfig

CHARS_PER_TOKEN = 4  # the login-node estimate of packed sequences


def micro_batches_per_epoch(n_sequences: int, world: int, micro: int) -> int:
    """Micro batches every rank takes per epoch (the sampler's batches_per_epoch)."""
    return max(1, n_sequences // (world * micro))


def steps_for_epochs(epochs: float, n_sequences: int, world: int, micro: int, accum: int) -> int:
    """Optimizer steps that cover `epochs` passes over n_sequences (module docstring)."""
    per_epoch = micro_batches_per_epoch(n_sequences, world, micro)
    return max(1, math.ceil(epochs * per_epoch / accum - 1e-9))


def ends_epoch(step: int, per_epoch: int, accum: int) -> bool:
    """True when optimizer step `step` (1-based) finishes an epoch."""
    return (step * accum) // per_epoch > ((step - 1) * accum) // per_epoch


def due(every: Any, step: int, per_epoch: int, accum: int) -> bool:
    """Whether an eval_every / checkpoint_every of `every` (0, N or "epoch") acts at `step`."""
    if every == "epoch":
        return ends_epoch(step, per_epoch, accum)
    return bool(every) and step % int(every) == 0


def warmup_steps(cfg: RunConfig, steps: int) -> int:
    """train.warmup_steps, or ceil(warmup_ratio x steps)."""
    t = cfg.train
    return math.ceil(t.warmup_ratio * steps) if t.warmup_ratio else t.warmup_steps


def with_steps(cfg: RunConfig, steps: int) -> RunConfig:
    """cfg with train.max_steps = steps and warmup_steps resolved from warmup_ratio."""
    t = cfg.train
    return dataclasses.replace(cfg, train=dataclasses.replace(
        t, max_steps=steps, warmup_steps=warmup_steps(cfg, steps)))


def resolve(cfg: RunConfig, n_sequences: int, world: int) -> RunConfig:
    """The config the ranks train with: max_steps counted from the epochs (if given) over
    n_sequences training sequences on `world` ranks, warmup from the ratio."""
    t = cfg.train
    if t.epochs is None:
        assert t.max_steps is not None
        return with_steps(cfg, t.max_steps)
    micro, accum, _ = batch_sizes(cfg, world)
    dp = world // t.sequence_parallel  # the ranks of a sequence-parallel group read the same data
    return with_steps(cfg, steps_for_epochs(t.epochs, n_sequences, dp, micro, accum))


def describe(cfg: RunConfig, n_sequences: int, world: int) -> str:
    """The line the ranks and `ftlaunch run` print for an epoch run."""
    t = cfg.train
    micro, accum, global_batch = batch_sizes(cfg, world)
    dp = world // t.sequence_parallel
    per_epoch = micro_batches_per_epoch(n_sequences, dp, micro)
    steps = steps_for_epochs(t.epochs or 0, n_sequences, dp, micro, accum)
    return (f"epochs: {t.epochs:g} x {n_sequences} sequences / global batch {global_batch} "
            f"({per_epoch} micro batches of {micro} per rank per epoch, accum {accum}) = "
            f"{steps} steps, warmup {warmup_steps(cfg, steps)}")


# ------------------------------------------------------------------ the login-node estimate
def row_count(path: str, fmt: Optional[str]) -> tuple[Optional[int], int]:
    """(non-blank rows or None when the format cannot be counted without `datasets`, characters)."""
    fmt = fmt or format_of(path)
    if fmt == "parquet" and os.path.isfile(path):
        return parquet_rows(path), _size(path)
    if fmt not in ("jsonl", "json", "csv", "text") or not os.path.isfile(path):
        return None, _size(path)
    try:
        fh = open_text(path, errors="replace")
        if fh is None:  # zstd: read by `datasets` on the ranks only
            return None, _size(path)
        with fh:
            if fmt == "json":
                text = fh.read()
                rows = json.loads(text)
                return (len(rows) if isinstance(rows, list) else None), len(text)
            rows, chars = 0, 0
            for line in fh:
                chars += len(line)
                rows += bool(line.strip())
    except (OSError, ValueError):
        return None, _size(path)
    return (rows - 1 if fmt == "csv" else rows), chars


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path) if os.path.exists(path) else 0


def _sources(cfg: RunConfig) -> list[tuple[str, Optional[str]]]:
    """(path, format) of every training source: data.path, or each of data.mix (an epoch of a
    mixture is as long as all its sources together: launcher/data/mixing.py)."""
    d = cfg.data
    if d.mix:
        return [(m.path, m.format or d.format) for m in d.mix]
    return [(d.path, d.format)] if d.path else []


def estimated_sequences(cfg: RunConfig) -> tuple[int, str]:
    """(training sequences, how they were estimated) from the data files, without tokenizing."""
    d = cfg.data
    rows, chars = 0, 0
    for path, fmt in _sources(cfg):
        r, c = row_count(path, fmt)
        if d.max_samples is not None and r is not None and r > d.max_samples:
            c, r = c * d.max_samples // r, d.max_samples
        rows = None if (rows is None or r is None) else rows + r
        chars += c
    keep = 1.0 - d.eval_fraction if d.eval_path is None else 1.0
    if d.packing or rows is None:
        n = max(1, int(chars * keep / CHARS_PER_TOKEN / d.max_seq_len))
        return n, f"about {n} sequences of {d.max_seq_len} tokens from {chars:,} characters"
    n = max(1, int(rows * keep))
    return n, f"{n} rows"


def planned_steps(cfg: RunConfig, world: Optional[int] = None) -> tuple[int, str]:
    """(steps, "" or a note saying the count is an estimate) for the login node."""
    t = cfg.train
    if t.max_steps is not None:
        return t.max_steps, ""
    world = world or cfg.world_size
    n, how = estimated_sequences(cfg)
    micro, accum, _ = batch_sizes(cfg, world)
    steps = steps_for_epochs(t.epochs or 1, n, world // t.sequence_parallel, micro, accum)
    return steps, (f"estimated from {how}; the ranks count exactly from the tokenized data "
                   "and print it")
