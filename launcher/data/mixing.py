"""Mixtures: several sources (`data.mix`) drawn by weight into one training order.

An epoch of a mixture is as long as all the sources together. Each of its positions draws a
source by weight (a generator seeded with (seed, epoch)); the positions that drew a source take
that source's examples in its own seeded permutations (repeated when a small source is drawn
more often than it has examples). The order is a pure function of (seed, epoch), so a resume
(the Sampler's epoch and position) continues the identical sequence.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from launcher.data.tokenize import Tokens

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


class Mixture:
    """The draw of examples from sources of `sizes` examples (concatenated in that order)."""

    def __init__(self, sizes: list[int], weights: list[float]):
        import numpy as np

        self.sizes = [int(s) for s in sizes]
        total = float(sum(weights))
        self.probs = np.asarray([w / total for w in weights], dtype=np.float64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.n = int(sum(self.sizes))

    def order(self, seed: int, epoch: int, shuffle: bool = True) -> "np.ndarray":
        """The n example indices of `epoch`."""
        import numpy as np

        src = np.random.default_rng([int(seed), int(epoch), 0x313]).choice(
            len(self.sizes), size=self.n, p=self.probs)
        out = np.empty(self.n, dtype=np.int64)
        for s, size in enumerate(self.sizes):
            pos = np.flatnonzero(src == s)
            reps = -(-len(pos) // size)
            if shuffle:
                stream = np.concatenate([np.random.default_rng([int(seed), int(epoch), s, k])
                                         .permutation(size) for k in range(reps)] or [[]])
            else:
                stream = np.resize(np.arange(size), reps * size)
            out[pos] = self.starts[s] + stream[:len(pos)].astype(np.int64)
        return out

    def source_of(self, idx: "np.ndarray") -> "np.ndarray":
        import numpy as np
        return np.searchsorted(self.starts, idx, side="right") - 1

    def shares(self, idx) -> list[float]:
        """The share of each source among the example indices `idx`."""
        import numpy as np

        counts = np.bincount(self.source_of(np.asarray(idx, dtype=np.int64)),
                             minlength=len(self.sizes))
        return [float(c) / max(1, len(idx)) for c in counts]


def concat(parts: list[Tokens]) -> Tokens:
    """Several Tokens as one (examples in order)."""
    import numpy as np

    if len(parts) == 1:
        return parts[0]
    ids = np.concatenate([p.ids for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    offsets, docs, base = [np.zeros(1, dtype=np.int64)], [], 0
    for p in parts:
        offsets.append(p.offsets[1:] + base)
        if p.docs is not None:
            docs.append(p.docs + base)
        base += int(p.offsets[-1])
    out = Tokens(ids, labels, np.concatenate(offsets),
                 docs=np.concatenate(docs) if len(docs) == len(parts) else None)
    out.stats = {k: sum(p.stats.get(k, 0) for p in parts)
                 for k in ("examples", "truncated", "dropped", "packed_rows")}
    return out
