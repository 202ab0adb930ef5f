"""From tokenised examples to micro batches: packing into rows, the distributed sampler, collate.

    sampler = data.Sampler(len(splits.train), rank=r, world_size=w, micro_batch_size=4, seed=s)
    for idx in sampler:
        batch = data.collate([splits.train[i] for i in idx], pad_id)

Packing. With `data.packing` the examples (each with its EOS) are concatenated in file order and
cut into rows of exactly `max_seq_len` tokens, labels keeping the prompt masking; training drops
the last partial row, evaluation keeps it. Documents in a packed row attend to each other (plain
concatenation, as most packers do).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from launcher.data.reading import fail, print_warning
from launcher.data.tokenize import IGNORE, Tokens

if TYPE_CHECKING:  # pragma: no cover
    import torch


# ------------------------------------------------------------------------------ packing
def pack(tokens: Tokens, max_len: int, key: str, split: str, warnings: list[str]) -> Tokens:
    """The examples concatenated and cut into rows of max_len tokens; `split` "train" drops
    the last partial row (with a warning), "eval" keeps it."""
    import numpy as np

    flat_ids, flat_lab = tokens.ids, tokens.labels
    total = len(flat_ids)
    rows = total // max_len
    if split == "train":
        if rows == 0:
            raise fail("data.max_seq_len", f"packing needs at least max_seq_len={max_len} tokens, "
                       f"but the training data has {total}", "lower data.max_seq_len, add "
                       "data, or set data.packing: false")
        if total - rows * max_len:
            warnings.append(f"{key}: packing into {rows} rows of {max_len} tokens leaves out the "
                            f"last {total - rows * max_len} tokens")
        offsets = np.arange(0, rows * max_len + 1, max_len, dtype=np.int64)
        flat_ids, flat_lab = flat_ids[: rows * max_len], flat_lab[: rows * max_len]
    else:  # evaluation keeps the partial last row
        offsets = np.unique(np.append(np.arange(0, total, max_len, dtype=np.int64), total))
    return Tokens(flat_ids, flat_lab, offsets)


# ------------------------------------------------------------------------------ sampling
class Sampler:
    """This rank's micro batches, forever: epoch e is a permutation seeded by (seed, e) (or the
    file order with shuffle=False), dealt out so that each micro step the ranks take consecutive
    disjoint slices of it. Every rank gets `batches_per_epoch` = n // (world_size x
    micro_batch_size) micro batches per epoch; the remainder is left out of that epoch (a new
    permutation next epoch leaves out others). With fewer examples than one micro batch on every
    rank, the permutation is repeated to fill exactly one (indices then repeat within an epoch).
    `state_dict()` = {"epoch", "position"}: micro batches this rank consumed in the epoch;
    `load_state_dict` continues exactly there."""

    def __init__(self, n: int, *, rank: int, world_size: int, micro_batch_size: int, seed: int,
                 shuffle: bool = True):
        if n < 1:
            raise ValueError(f"Sampler needs at least one example, got n={n}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.micro_batch_size, self.seed, self.shuffle = micro_batch_size, seed, shuffle
        self.batches_per_epoch = max(1, n // (world_size * micro_batch_size))
        self._epoch, self._position = 0, 0
        self._cache: tuple[int, Any] | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    def _order(self, epoch: int):
        import numpy as np

        if self._cache is None or self._cache[0] != epoch:
            if self.shuffle:
                perm = np.random.default_rng([int(self.seed), int(epoch)]).permutation(self.n)
            else:
                perm = np.arange(self.n)
            need = self.batches_per_epoch * self.world_size * self.micro_batch_size
            if need > self.n:
                perm = np.resize(perm, need)  # repeats the permutation cyclically
            self._cache = (epoch, perm)
        return self._cache[1]

    def batch(self, epoch: int, position: int) -> list[int]:
        """This rank's micro batch number `position` of `epoch`."""
        order = self._order(epoch)
        m = self.micro_batch_size
        a = (position * self.world_size + self.rank) * m
        return [int(i) for i in order[a:a + m]]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            if self._position >= self.batches_per_epoch:
                self._epoch, self._position = self._epoch + 1, 0
            out = self.batch(self._epoch, self._position)
            self._position += 1
            yield out

    def __len__(self) -> int:
        """Micro batches per epoch on this rank (the iterator itself never ends)."""
        return self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"a sampler state needs integer 'epoch' and 'position', got {state!r}") from None
        if epoch < 0 or position < 0:
            raise ValueError(f"a sampler state cannot be negative: {state!r}")
        if position > self.batches_per_epoch:
            print_warning(f"the saved data position ({position} micro batches into epoch {epoch}) "
                          f"is past this run's {self.batches_per_epoch} per epoch (data or world "
                          f"size changed?); continuing with epoch {epoch + 1}")
            epoch, position = epoch + 1, 0
        self._epoch, self._position = epoch, position


# ------------------------------------------------------------------------------ batching
def collate(examples: list[dict], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-pad to the longest example: input_ids (pad_id), attention_mask (0 on padding),
    labels (-100 on padding). Padding is known from the lengths, never from the pad id, so a pad
    id equal to EOS is safe."""
    import torch

    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    if width == 0:
        raise ValueError("collate got only empty examples")
    n = len(examples)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids, lab = e["input_ids"], e["labels"]
        if len(ids) != len(lab):
            raise ValueError(f"example {i}: {len(ids)} input_ids but {len(lab)} labels")
        k = len(ids)
        input_ids[i, :k] = torch.as_tensor(ids, dtype=torch.long)
        labels[i, :k] = torch.as_tensor(lab, dtype=torch.long)
        attention[i, :k] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
