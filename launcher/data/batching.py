"""From tokenised examples to micro batches: packing into rows, the distributed sampler, collate.

    sampler = data.Sampler(len(splits.train), rank=r, world_size=w, micro_batch_size=4, seed=s)
    for idx in sampler:
        batch = data.collate([splits.train[i] for i in idx], pad_id)

Packing. With `data.packing` whole examples (each cut to `max_seq_len` first) are packed into
rows of at most `max_seq_len` tokens (`pack`). A packed row's documents do not see each other:
`collate` gives them their own position ids and an attention restricted to each document, and
the first label of every document is -100, so the loss of a packed row equals the losses of its
documents run alone (token-weighted).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

from launcher.data.reading import print_warning
from launcher.data.tokenize import IGNORE, Tokens

if TYPE_CHECKING:  # pragma: no cover
    import torch


# ------------------------------------------------------------------------------ packing
def pack(tokens: Tokens, max_len: int, key: str, split: str, warnings: list[str]) -> Tokens:
    """Whole examples (each at most max_len, cut before) placed into rows of at most max_len
    tokens, longest first, each into the row with the most room left (worst-fit decreasing:
    O(n log n), deterministic). The result's `docs` holds every document's start; the first
    label of every document is -100 (no document learns from the one before it)."""
    import heapq

    import numpy as np

    n = len(tokens)
    lengths = np.diff(tokens.offsets)
    order = np.lexsort((np.arange(n), -lengths))  # longest first, ties in file order
    rows: list[list[int]] = []
    heap: list[tuple[int, int]] = []  # (-room, row)
    for i in order.tolist():
        ln = int(lengths[i])
        if heap and -heap[0][0] >= ln:
            room, r = heapq.heappop(heap)
            rows[r].append(i)
            heapq.heappush(heap, (room + ln, r))
        else:
            rows.append([i])
            heapq.heappush(heap, (-(max_len - ln), len(rows) - 1))
    doc_order = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=n)
    starts, ends = tokens.offsets[:-1][doc_order], tokens.offsets[1:][doc_order]
    idx = np.concatenate([np.arange(a, b) for a, b in zip(starts.tolist(), ends.tolist())]) \
        if n else np.zeros(0, dtype=np.int64)
    doc_len = (ends - starts)
    docs = np.zeros(n, dtype=np.int64)
    np.cumsum(doc_len[:-1], out=docs[1:])
    row_len = np.fromiter((sum(int(lengths[i]) for i in row) for row in rows), dtype=np.int64,
                          count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(row_len, out=offsets[1:])
    labels = tokens.labels[idx].copy()
    labels[docs] = IGNORE
    out = Tokens(tokens.ids[idx], labels, offsets, docs=docs)
    out.stats = dict(tokens.stats, packed_rows=len(rows),
                     packing_fill=round(float(offsets[-1]) / max(1, len(rows) * max_len), 4))
    return out


# ------------------------------------------------------------------------------ sampling
class Sampler:
    """This rank's micro batches, forever: epoch e is a permutation seeded by (seed, e) (or the
    file order with shuffle=False), dealt out so that each micro step the ranks take consecutive
    disjoint slices of it. Every rank gets `batches_per_epoch` = n // (world_size x
    micro_batch_size) micro batches per epoch; the remainder is left out of that epoch (a new
    permutation next epoch leaves out others). With fewer examples than one micro batch on every
    rank, the permutation is repeated to fill exactly one (indices then repeat within an epoch).
    `state_dict()` = {"epoch", "position"}: micro batches this rank consumed in the epoch;
    `load_state_dict` continues exactly there. With a `mixture` (data.mix) each epoch's order is
    the mixture's draw for (seed, epoch) instead of a permutation."""

    def __init__(self, n: int, *, rank: int, world_size: int, micro_batch_size: int, seed: int,
                 shuffle: bool = True, mixture: Any = None):
        if n < 1:
            raise ValueError(f"Sampler needs at least one example, got n={n}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.micro_batch_size, self.seed, self.shuffle = micro_batch_size, seed, shuffle
        self.mixture = mixture  # launcher.data.mixing.Mixture: the epochs' orders draw by weight
        self.batches_per_epoch = max(1, n // (world_size * micro_batch_size))
        self._epoch, self._position = 0, 0
        self._cache: tuple[int, Any] | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    def _order(self, epoch: int):
        import numpy as np

        if self._cache is None or self._cache[0] != epoch:
            if self.mixture is not None:
                perm = self.mixture.order(self.seed, epoch, self.shuffle)
            elif self.shuffle:
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
def collate(examples: list[dict], pad_id: int, attention: str | None = None,
            dtype: Any = None) -> dict[str, "torch.Tensor"]:
    """Right-pad to the longest example: input_ids (pad_id), attention_mask (0 on padding),
    labels (-100 on padding). Padding is known from the lengths, never from the pad id, so a pad
    id equal to EOS is safe. Packed rows (examples with `doc_lengths`) get per-document
    `position_ids` and attention kept inside each document, in the form of the model's
    `attention` kernel: flash attention: the rows flattened into one sequence (varlen over the
    position ids); sdpa: a block-diagonal causal boolean 4D mask; eager and others: the same as
    an additive mask in `dtype` (default float32)."""
    import torch

    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e["input_ids"]) for e in examples)
    if width == 0:
        raise ValueError("collate got only empty examples")
    n = len(examples)
    input_ids = torch.full((n, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids, lab = e["input_ids"], e["labels"]
        if len(ids) != len(lab):
            raise ValueError(f"example {i}: {len(ids)} input_ids but {len(lab)} labels")
        k = len(ids)
        input_ids[i, :k] = torch.as_tensor(ids, dtype=torch.long)
        labels[i, :k] = torch.as_tensor(lab, dtype=torch.long)
        attention_mask[i, :k] = 1
    if "doc_lengths" not in examples[0]:
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return _packed(examples, input_ids, labels, attention, dtype)


def _packed(examples: list[dict], input_ids, labels, attention: str | None, dtype) -> dict:
    """The model inputs of packed rows (see collate)."""
    import torch

    n, width = input_ids.shape
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        at = 0
        for d, ln in enumerate(list(e["doc_lengths"]) + [width - len(e["input_ids"])]):
            position_ids[i, at:at + ln] = torch.arange(ln)
            segment[i, at:at + ln] = d  # the padding is a document of its own
            at += ln
    if attention and attention.startswith("flash"):
        return _flattened(examples, input_ids, position_ids, labels)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    mask = mask[:, None]
    if attention != "sdpa":
        dtype = dtype or torch.float32
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
            "labels": labels}


def _flattened(examples: list[dict], input_ids, position_ids, labels) -> dict:
    """Flash attention's packed form: the rows' tokens as one sequence, with the documents'
    boundaries given as `cu_seq_lens_q/k` (int32 cumulative lengths) and `max_length_q/k`, as
    transformers' DataCollatorWithFlattening(return_flash_attn_kwargs=True) hands them. Without
    them transformers derives the boundaries from position_ids on the device at every layer's
    first call, a `.max()` read back to the host each forward."""
    import torch

    keep = [len(e["input_ids"]) for e in examples]
    flat = lambda t: torch.cat([t[i, :k] for i, k in enumerate(keep)])[None]  # noqa: E731
    docs: list[int] = []
    for k, e in zip(keep, examples):
        row = [int(n) for n in e["doc_lengths"]]
        if sum(row) != k:
            raise ValueError(f"a packed row of {k} tokens has documents of {row} tokens")
        docs += row
    bounds = torch.tensor([0] + docs, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    out = {"input_ids": flat(input_ids), "position_ids": flat(position_ids), "labels": flat(labels)}
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = bounds
    out["max_length_q"] = out["max_length_k"] = max(docs)
    return out


def num_tokens(examples: list[dict]) -> int:
    """Tokens (not padding) of a micro batch's examples."""
    return sum(len(e["input_ids"]) for e in examples)


def counted_collate(examples: list[dict], pad_id: int, attention: str | None = None,
                    dtype: Any = None) -> dict:
    """collate, plus "num_tokens" (a 0-d tensor: the examples' tokens, padding excluded), which
    the training loop pops before the forward (packed rows have no 2-D mask to count from)."""
    import torch
    out = collate(examples, pad_id, attention, dtype)
    out["num_tokens"] = torch.tensor(num_tokens(examples))
    return out


def _model_kwargs(model: Any, dtype: str | None) -> dict[str, Any]:
    from launcher.model.device import torch_dtype
    return {"attention": getattr(model.config, "_attn_implementation", None),
            "dtype": torch_dtype(dtype) if dtype else None}


def model_collate(model: Any, pad_id: int, dtype: str | None = None) -> Callable[[list[dict]], dict]:
    """`counted_collate` for `model`, as a function of the examples (picklable, for DataLoader
    workers): packed rows in the form its attention kernel needs (`dtype`: the run file's
    model.dtype, for an additive mask)."""
    import functools
    return functools.partial(counted_collate, pad_id=pad_id, **_model_kwargs(model, dtype))


def model_batch(model: Any, examples: list[dict], pad_id: int, dtype: str | None = None) -> dict:
    """collate for `model` of these examples: the model's inputs and labels."""
    return collate(examples, pad_id, **_model_kwargs(model, dtype))
