"""Collated micro batches, made in the training process or by DataLoader workers (data.num_workers).

    make = data.model_collate(model, pad_id, "bf16")     # collate in the model's mask form
    batches = data.loader.train_batches(sampler, splits.train, make, num_workers=2)
    batch = next(batches)                     # {"input_ids", "attention_mask", "labels"} tensors
    sampler.state_dict()                      # counts the batches taken, not those prefetched
    for batch in data.loader.batches(splits.eval, index_lists, make, num_workers=2): ...

The sampler stays the source of the indices and of the resumable state. With workers, a torch
DataLoader draws the index lists from a copy of the sampler (`batch_sampler`, so the order is the
sampler's) and runs `collate` in its worker processes, ahead of the step; the sampler itself is
advanced by one as each batch is handed out, so a checkpoint records the batches consumed and a
resume continues exactly there, as with num_workers 0 (collate in the training process). The
workers are forked (the data is already in memory; `python -m launcher` is not import-safe for
spawn) and persistent: an eval loader is reused by every evaluation.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any, Callable

from launcher.data.batching import Sampler

Collate = Callable[[list[dict]], dict]


class _InProcess:
    """The num_workers 0 loader: collate in this process, as each batch is asked for."""

    def __init__(self, dataset: Any, index_lists: Iterable[list[int]], make: Collate):
        self.dataset, self.index_lists, self.make = dataset, index_lists, make

    def __iter__(self) -> Iterator[dict]:
        for idx in self.index_lists:
            yield self.make([self.dataset[i] for i in idx])


def batches(dataset: Any, index_lists: Iterable[list[int]], make: Collate,
            num_workers: int) -> Iterable[dict]:
    """The collated batches of `index_lists` (a re-iterable of lists of example indices), in
    that order; with num_workers > 0 a DataLoader with persistent forked workers."""
    if num_workers <= 0:
        return _InProcess(dataset, index_lists, make)
    from torch.utils.data import DataLoader
    return DataLoader(dataset, batch_sampler=index_lists, num_workers=num_workers,
                      collate_fn=make,
                      persistent_workers=True, multiprocessing_context="fork")


def train_batches(sampler: Sampler, dataset: Any, make: Collate, num_workers: int) -> Iterator[dict]:
    """The sampler's micro batches, collated, forever; `sampler` is advanced by one per batch
    handed out (its state_dict() is what was consumed, whatever the workers prefetched)."""
    made = batches(dataset, copy.copy(sampler), make, num_workers)  # the copy runs ahead
    taken = iter(sampler)
    for batch in made:
        next(taken)
        yield batch
